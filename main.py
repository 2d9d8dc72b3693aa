r"""edm-jax command line: train, sample, evaluate and convert EDM models.

  python main.py --config=configs/cifar10_edm.py --mode=train              # workdir: runs/cifar10_edm
  python main.py --config=configs/cifar10_edm.py:cond --mode=train         # class-conditional variant
  python main.py --config=configs/quickstart.py --mode=train               # offline, CPU, minutes
  python main.py --mode=convert --checkpoint=edm-cifar10-32x32-cond-vp.pkl --workdir=runs/edm_cond_vp

Config fields can be overridden from the command line, e.g. `--config.train.batch_size=64`.
Re-running the same train command resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
MODES = ("train", "sample", "eval", "convert")

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string("checkpoint", None, "--mode=convert: a reference snapshot pickle (network-snapshot-*.pkl, "
                    "edm-*.pkl) to convert into an orbax checkpoint in --workdir.")


def config_name(config_arg: str | None) -> str:
    """runs/<name> for `configs/cifar10_edm.py:cond` is `cifar10_edm_cond`."""
    if not config_arg:
        return "default"
    path, _, arg = config_arg.partition(":")
    stem = pathlib.Path(path).stem
    return f"{stem}_{arg}" if arg else stem


def _fail(message: str) -> None:
    """One clear sentence on stderr and exit status 2 (no traceback for user errors)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --mode=train")
    config_arg = FLAGS["config"].config_filename if FLAGS["config"].present else None
    workdir = FLAGS.workdir or os.path.join("runs", config_name(config_arg))

    if FLAGS.mode == "convert":
        if not FLAGS.checkpoint:
            _fail("--mode=convert needs --checkpoint=PATH.pkl (a reference snapshot) and --workdir=DIR")
        if not FLAGS.workdir:
            _fail("--mode=convert needs --workdir=DIR: the folder that will hold the converted checkpoint")
        import pickle

        from edm_jax import convert  # heavy imports only for the mode that needs them

        try:
            convert.convert_snapshot(FLAGS.checkpoint, FLAGS.workdir)
        except (OSError, ValueError, pickle.UnpicklingError) as e:  # incl. unsafe or corrupt pickles
            _fail(str(e))
        return

    if config_arg is None:
        _fail(f"--mode={FLAGS.mode} needs --config=configs/<name>.py (see configs/)")
    if not os.path.isfile(config_arg.partition(":")[0]):
        _fail(f"config file {config_arg.partition(':')[0]} not found; the presets live in configs/")
    logging.info("mode=%s config=%s workdir=%s", FLAGS.mode, config_arg, workdir)

    if FLAGS.mode == "train":
        from edm_jax import train

        train.train_and_evaluate(FLAGS.config, workdir)
        return
    # Modes whose code has not landed yet: say so plainly instead of failing somewhere deep inside.
    _fail(f"--mode={FLAGS.mode} is not implemented yet in this version of edm-jax (see README.md, 'Status')")


if __name__ == "__main__":
    app.run(main)
