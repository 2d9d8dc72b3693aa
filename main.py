r"""edm-jax command line: train, sample, evaluate and convert EDM models.

  python main.py --config=configs/cifar10_edm.py --mode=train              # workdir: runs/cifar10_edm
  python main.py --config=configs/cifar10_edm.py:cond --mode=train         # class-conditional variant
  python main.py --config=configs/quickstart.py --mode=train               # offline, CPU, minutes
  python main.py --config=configs/quickstart_classifier.py --mode=train_classifier  # guidance classifier
  python main.py --mode=convert --checkpoint=edm-cifar10-32x32-cond-vp.pkl --workdir=runs/edm_cond_vp
  python main.py --mode=convert --checkpoint=psld.ckpt --config=configs/cifar10_psld.py --workdir=runs/psld
  python main.py --mode=sample --workdir=runs/edm_cond_vp --sampler=dpmpp_2m --steps=20   # k-diffusion samplers
  python main.py --mode=likelihood --workdir=runs/edm_cond_vp --data=cifar10.zip --num_images=1000   # bits/dim

Config fields can be overridden from the command line, e.g. `--config.train.batch_size=64`.
Re-running the same train command resumes from the newest checkpoint in the workdir.
"""

from __future__ import annotations

import logging as std_logging
import os
import pathlib
import pickle
import re
import sys

from edm_jax import host_memory

# First, before any library starts a thread: on a CPU, reuse XLA's per-call scratch memory (host_memory.py).
host_memory.keep_freed_memory()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
MODES = ("train", "sample", "eval", "likelihood", "convert", "train_classifier")

config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_string("checkpoint", None, "A reference snapshot pickle (network-snapshot-*.pkl, edm-*.pkl) or a "
                    "PSLD Lightning checkpoint (.ckpt, with --config for its network): "
                    "--mode=convert converts it into --workdir; --mode=sample samples from it directly.")

# --mode=sample (edm_jax.generate). Sampler flags left unset keep the paper's per-dataset settings.
flags.DEFINE_string("seeds", "0-63", "Seeds to sample, e.g. 0-49999 or 0-9,20.")
flags.DEFINE_integer("batch", 64, "Global batch (all devices of all hosts together).")
flags.DEFINE_string("outdir", None, "Output folder; default <workdir>/samples.")
flags.DEFINE_enum("format", "png", ["png", "npz"], "One PNG per seed (subfolders of 1000) or one npz.")
flags.DEFINE_boolean("overwrite", False, "Delete the samples already in --outdir (images, grid, npz, manifest; "
                     "nothing else) before sampling, instead of refusing a folder made by another model or settings.")
flags.DEFINE_boolean("subdirs", True, "PNGs in subfolders of 1000 seeds (000000/000123.png).")
flags.DEFINE_integer("class", None, "Class label for conditional models; default: random, drawn from the seed.")
flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight w: D = (1 + w) D(x; y) - w D(x; no label), "
                   "for class-conditional models trained with label_dropout > 0.")
flags.DEFINE_string("classifier", None, "Classifier guidance: a --mode=train_classifier run directory (ADM's "
                    "noise-aware classifier); the sampler adds scale * sigma^2 * grad log p(y | x, sigma) to D.")
flags.DEFINE_float("classifier_scale", 1.0, "Classifier guidance scale s (ADM's classifier_scale).")
flags.DEFINE_integer("base_seed", 0, "Root of the per-seed keys (image s uses fold_in(key(base_seed), s)).")
flags.DEFINE_integer("steps", None, "Sampler steps N (NFE = 2N - 1 for Heun).")
flags.DEFINE_string("stride", None, "PSLD samplers' time grid: uniform | quadratic.")
flags.DEFINE_float("sigma_min", None, "Lowest noise level.")
flags.DEFINE_float("sigma_max", None, "Highest noise level.")
flags.DEFINE_float("rho", None, "Time-step exponent (Eq. 5).")
flags.DEFINE_float("S_churn", None, "Stochasticity strength (Algorithm 2).")
flags.DEFINE_float("S_min", None, "Churn only for sigma >= S_min.")
flags.DEFINE_float("S_max", None, "Churn only for sigma <= S_max.")
flags.DEFINE_float("S_noise", None, "Noise inflation of the churn noise.")
flags.DEFINE_string("sampler", None, "Sampler of the model's family. σ family (EDM): edm (default), ablation, or a "
                    "k-diffusion sampler: euler, heun, dpm_2, lms, euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, "
                    "dpmpp_sde, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde, dpm_fast, dpm_adaptive (on the Karras grid of "
                    "--steps levels). PSLD: em (default), sscs, ode_euler, ode_heun, ode_rk45.")
flags.DEFINE_float("eta", None, "k-samplers: ancestral / SDE noise amount eta (default: the sampler's own).")
flags.DEFINE_float("rtol", None, "dpm_adaptive's relative tolerance; --mode=likelihood: the rk45 solver's (1e-5).")
flags.DEFINE_float("atol", None, "dpm_adaptive's absolute tolerance; --mode=likelihood: the rk45 solver's (1e-5).")
flags.DEFINE_enum("solver", None, ["euler", "heun", "rk45"], "Ablation sampler: ODE solver (euler, heun); "
                  "--mode=likelihood: rk45 (adaptive, default) or heun (--steps grid points, default 64).")
flags.DEFINE_enum("disc", None, ["vp", "ve", "iddpm", "edm"], "Ablation sampler: time-step discretisation.")
flags.DEFINE_enum("schedule", None, ["vp", "ve", "linear"], "Ablation sampler: noise schedule sigma(t).")
flags.DEFINE_enum("scaling", None, ["vp", "none"], "Ablation sampler: signal scaling s(t).")

# --mode=eval (edm_jax.evaluate): FID of --images, or of the model in --checkpoint/--workdir sampled on the
# fly; or, with --ref_out, the reference statistics of --data.
flags.DEFINE_string("images", None, "A sample folder (PNGs) or npz (--format=npz output) to evaluate.")
flags.DEFINE_string("ref", None, "Reference statistics: an npz with mu and sigma (the published fid-refs format).")
flags.DEFINE_string("ref_out", None, "Write the reference statistics of --data to this npz instead of scoring.")
flags.DEFINE_string("data", None, "Dataset for --ref_out (a reference-format zip or folder, or tfds:<name>) or "
                    "--mode=likelihood (zip or folder).")
flags.DEFINE_string("inception", None, "pt_inception-2015-12-05-6726825d.pth; default $EDM_JAX_INCEPTION_WEIGHTS "
                    "or ~/.cache/edm_jax/.")
flags.DEFINE_integer("num", 50000, "Images per FID when sampling a model (seeds 0..num-1 unless --seeds is given).")
flags.DEFINE_enum("protocol", "single", ["single", "paper"], "paper: three seed ranges of --num, report each and "
                  "the minimum (Karras et al. 2022).")


# --mode=likelihood (edm_jax.likelihood_driver): bits/dim of --data or --images under the probability-flow ODE,
# with --batch, --base_seed (dequantisation and probe keys), --sigma_min/--sigma_max, --steps (heun), --rtol/--atol.
flags.DEFINE_integer("num_images", None, "N images (a --data set's reference random subset, an --images folder's "
                     "first N); default all.")
flags.DEFINE_integer("probes", 1, "Hutchinson probes per image (the divergence estimate's sample count).")
flags.DEFINE_enum("divergence", "hutchinson", ["hutchinson", "exact"], "Divergence of the ODE's drift: Hutchinson's "
                  "estimate or the exact Jacobian trace (small images only).")
flags.DEFINE_string("compilation_cache", None, "Folder of JAX's persistent compilation cache (a second run compiles "
                    "nothing the first compiled); default $EDM_JAX_COMPILATION_CACHE or ~/.cache/edm-jax/xla; "
                    "'off' turns it off.")
flags.DEFINE_string("out", None, "JSON summary; default <outdir or workdir>/likelihood.json.")
flags.DEFINE_string("cpu_devices", "auto", "On a CPU: split the host into this many JAX devices, the batch sharded "
                    "over them as over GPUs (edm_jax/cpu_devices.py; all cores then compute). auto: the largest power "
                    "of two up to the usable cores (and 8) that divides the training batch; one per process in a "
                    "multi-process run. $XLA_FLAGS' --xla_force_host_platform_device_count wins.")


def config_name(config_arg: str | None) -> str:
    """runs/<name> for `configs/cifar10_edm.py:cond` is `cifar10_edm_cond`."""
    if not config_arg:
        return "default"
    path, _, arg = config_arg.partition(":")
    stem = pathlib.Path(path).stem
    return f"{stem}_{arg}" if arg else stem


def _config_arg() -> str | None:
    """The --config argument as given (path[:arg]); None without one."""
    return FLAGS["config"].config_filename if FLAGS["config"].present else None


def _config_file_missing(config_arg: str) -> bool:
    """Whether the file part of a --config=path[:arg] argument does not exist."""
    return not os.path.isfile(config_arg.partition(":")[0])


def _config_field_error(config, dotted: str, config_arg: str) -> str | None:
    """One sentence for a --config.<dotted> override naming no field of `config` (loaded from `config_arg`),
    with the closest names (difflib) of the section it points into; None when the field exists."""
    import difflib

    node, prefix = config, []
    for name in dotted.split("."):
        if not hasattr(node, "keys"):
            return (f"--config.{dotted}: config field {'.'.join(prefix)} is {node!r}, not a section with fields; "
                    f"set it whole, e.g. --config.{'.'.join(prefix)}=...")
        if name not in node:
            where = ".".join(prefix)
            names = sorted(node.keys())
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            full = lambda n: f"{where}.{n}" if where else n  # noqa: E731
            hint = (f"did you mean {' or '.join(full(n) for n in close)}?" if close else
                    f"the {'section ' + where if where else 'config'} has {', '.join(names)}")
            return f"config field {full(name)} does not exist in {config_arg}; {hint}"
        node, prefix = node[name], prefix + [name]
    return None


def _config_arg_from(argv) -> str | None:
    """The --config=FILE[:arg] of a command line, before the flags are parsed."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config_file(config_arg: str):
    """`get_config(arg)` of a configs/*.py[:arg] file, as the config flag loads it."""
    import importlib.util

    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("_edm_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _parse_flags(argv):
    """absl's flag parsing, with mistakes in the config as one sentence and exit status 2: a --config.<field>
    that does not exist names the closest fields, and a config file that refuses its argument (an unknown
    ':variant') says its own sentence instead of a FATAL message with an embedded traceback."""
    try:
        return FLAGS(argv)
    except flags.IllegalFlagValueError as e:
        text = str(e)
        if "Error whilst parsing config file" not in text:
            raise
        # The config file's own exception is the embedded traceback's last line ("ValueError: ...").
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        _usage_error(f"{_config_arg_from(argv)}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}")
    except (AttributeError, KeyError, flags.UnrecognizedFlagError):
        config_arg = _config_arg_from(argv)
        overrides = [a.split("=", 1)[0].lstrip("-") for a in argv[1:] if re.match(r"^--(no)?config\.", a)]
        if config_arg is None or not overrides:
            raise
        config = _load_config_file(config_arg)
        for name in overrides:
            message = _config_field_error(config, name.split(".", 1)[1], config_arg)
            if message:
                _usage_error(message)
        raise


def _usage_error(message: str) -> None:
    """A mistake on the command line, found before anything started: one sentence, exit status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _fail(message: str) -> None:
    """One clear sentence on stderr and exit status 2 (no traceback for user errors). It is the last line:
    the process ends here, so no library's shutdown hook (orbax's event loops) prints after it."""
    from edm_jax import distributed

    distributed.wait_for_peers_on_error()  # a dead peer is the real cause, said by the watchdog (status 3)
    std_logging.shutdown()
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _load_model(workdir):
    """The model in --checkpoint or --workdir; a PSLD .ckpt holds no settings, so its network and process
    come from --config."""
    from edm_jax import generate
    from edm_jax.interop import psld_checkpoint
    from edm_jax.interop.rundir import process_from_config

    if FLAGS.checkpoint is None and workdir is None:
        raise ValueError(f"--mode={FLAGS.mode} needs --checkpoint=PATH.pkl or --workdir=DIR (a training or converted run)")
    psld = {}
    ckpt = FLAGS.checkpoint
    if ckpt and os.path.isfile(ckpt) and psld_checkpoint.is_lightning_checkpoint(ckpt):
        psld = dict(network_kwargs=psld_checkpoint.network_kwargs_from_config(FLAGS.config, ckpt, _config_arg()),
                    process=process_from_config(FLAGS.config))
    return generate.load_model(workdir=workdir, checkpoint=FLAGS.checkpoint, **psld)


def _sample_fn(workdir):
    """The sharded sample function of the model in --checkpoint or --workdir, with the sampler flags applied."""
    from edm_jax import generate, guided_models

    model = _load_model(workdir)
    settings, note = generate.sampler_settings_of(model, **_sampler_flags())
    if note:
        print(f"note: {note}", flush=True)
    denoise = model.denoise
    if FLAGS.guidance:
        denoise = guided_models.with_classifier_free_guidance(model, FLAGS.guidance)
    if FLAGS.classifier:
        denoise = guided_models.with_classifier_guidance(denoise, model.label_dim, FLAGS.classifier,
                                                        FLAGS.classifier_scale, process=model.process)
    sample_fn = generate.make_sample_fn(denoise, image_shape=model.image_shape, label_dim=model.label_dim,
                                        settings=settings, mesh=generate.make_mesh(), class_idx=FLAGS["class"].value,
                                        process=model.process)
    return sample_fn, settings, model


def _sampler_flags() -> dict:
    """The sampler flags as the process's settings overrides (None = not given); the process refuses the
    ones its family does not have."""
    return dict(sampler=FLAGS.sampler, eta=FLAGS.eta, rtol=FLAGS.rtol, atol=FLAGS.atol, num_steps=FLAGS.steps,
                stride=FLAGS.stride, sigma_min=FLAGS.sigma_min, sigma_max=FLAGS.sigma_max, rho=FLAGS.rho,
                S_churn=FLAGS.S_churn, S_min=FLAGS.S_min, S_max=FLAGS.S_max, S_noise=FLAGS.S_noise,
                solver=FLAGS.solver, discretization=FLAGS.disc, schedule=FLAGS.schedule, scaling=FLAGS.scaling)


def _sample(workdir):
    """--mode=sample: images for --seeds from --checkpoint (a reference .pkl) or --workdir, sharded over all
    devices of all hosts; reruns skip seeds already written, when the folder's manifest says the same model
    and settings made them (edm_jax.manifest)."""
    from edm_jax import generate, manifest

    seeds = generate.parse_seeds(FLAGS.seeds)  # a bad list is refused before the model loads
    sample_fn, settings, model = _sample_fn(workdir)
    outdir = FLAGS.outdir or os.path.join(workdir or ".", "samples")
    source = model.config.get("source")
    step = os.path.basename(os.path.normpath(source)) if isinstance(source, str) else ""
    manifest.prepare(outdir, manifest.describe(
        source=FLAGS.checkpoint or workdir, step=int(step) if step.isdigit() else None,
        fingerprint=manifest.params_fingerprint(model.denoise.params), settings=settings, base_seed=FLAGS.base_seed,
        class_idx=FLAGS["class"].value, guidance=FLAGS.guidance, classifier=FLAGS.classifier,
        classifier_scale=FLAGS.classifier_scale, fmt=FLAGS.format, subdirs=FLAGS.subdirs), overwrite=FLAGS.overwrite)
    print(f"sampling seeds {FLAGS.seeds} with {settings} -> {outdir}", flush=True)
    summary = generate.generate(sample_fn, seeds, batch=FLAGS.batch, outdir=outdir,
                                fmt=FLAGS.format, subdirs=FLAGS.subdirs, base_seed=FLAGS.base_seed)
    import jax

    # Every process says what it did (its devices computed only their rows of each batch).
    print(f"process {jax.process_index()} of {jax.process_count()}: computed {summary.rows_computed} rows of "
          f"{summary.batches_computed} batches, wrote {summary.written} images, skipped {summary.skipped} already "
          f"there, in {summary.seconds:.1f} s -> {outdir}", flush=True)


def _evaluate(workdir):
    """--mode=eval: reference statistics (--ref_out), or FID of --images or of a model against --ref."""
    import json

    from edm_jax import data, evaluate, fid, generate

    inception = fid.load_inception_weights(FLAGS.inception)
    mesh = generate.make_mesh()
    if FLAGS.ref_out:
        if not FLAGS.data:
            raise ValueError("--ref_out needs --data=PATH (a reference-format zip or folder, or tfds:<name>)")
        dataset = data.load_dataset_spec(FLAGS.data)
        mu, sigma = evaluate.reference_stats_of_dataset(dataset, inception, FLAGS.batch, mesh=mesh)
        fid.save_reference_stats(FLAGS.ref_out, mu, sigma)
        print(f"reference statistics of {len(dataset.images)} images of {FLAGS.data} -> {FLAGS.ref_out}")
        return
    if not FLAGS.ref:
        raise ValueError("--mode=eval needs --ref=STATS.npz (mu/sigma, e.g. a published fid-refs file), "
                         "or --ref_out with --data to make one")
    if FLAGS.images:
        images = evaluate.load_images(FLAGS.images)
        score = evaluate.fid_against(*evaluate.stats_of_images(images, inception, FLAGS.batch, mesh=mesh), FLAGS.ref)
        print(f"FID {score:.4f} of {len(images)} images in {FLAGS.images} against {FLAGS.ref}")
        return
    sample_fn, settings, _ = _sample_fn(workdir)
    if FLAGS.protocol == "paper":
        ranges = evaluate.paper_seed_ranges(FLAGS.num)
    else:
        ranges = [generate.parse_seeds(FLAGS.seeds) if FLAGS["seeds"].present else range(FLAGS.num)]
    scores = []
    for seeds in ranges:
        mu, sigma = evaluate.stats_of_model(sample_fn, seeds, inception, batch=FLAGS.batch,
                                            base_seed=FLAGS.base_seed, mesh=mesh)
        scores.append(evaluate.fid_against(mu, sigma, FLAGS.ref))
        print(f"FID {scores[-1]:.4f} for seeds {seeds[0]}-{seeds[-1]}", flush=True)
    result = {"fid": scores, "min": min(scores), "num": len(ranges[0]), "protocol": FLAGS.protocol,
              "ref": FLAGS.ref, "settings": str(settings), "checkpoint": FLAGS.checkpoint, "workdir": workdir}
    print(f"FID min {result['min']:.4f} over {len(scores)} seed range(s)")
    if workdir and os.path.isdir(workdir):
        with open(os.path.join(workdir, "fid.jsonl"), "a") as f:
            f.write(json.dumps(result) + "\n")


def _likelihood(workdir):
    """--mode=likelihood: bits/dim of --data or --images under the model in --checkpoint/--workdir."""
    import json

    from edm_jax import evaluate, generate, likelihood_driver as lik

    if bool(FLAGS.data) == bool(FLAGS.images):
        raise ValueError("--mode=likelihood needs exactly one of --data=ZIP|FOLDER (a dataset) or --images=DIR")
    model = _load_model(workdir)
    labels = None
    if FLAGS.data:
        from edm_jax import data

        dataset = data.load_image_dataset(FLAGS.data, max_size=FLAGS.num_images, use_labels=model.label_dim > 0)
        images, labels = dataset.images, dataset.labels
    else:
        images = evaluate.load_images(FLAGS.images, FLAGS.num_images)
    if model.label_dim and labels is None:
        raise ValueError(f"the model is class-conditional ({model.label_dim} classes): give --data with labels "
                         "(a dataset.json), not an unlabelled image folder")
    if tuple(images.shape[1:]) != model.image_shape:
        raise ValueError(f"images are {images.shape[1:]} but the model takes {model.image_shape}")
    family = model.process.likelihood_settings(sigma_min=FLAGS.sigma_min, sigma_max=FLAGS.sigma_max)
    settings = dict(**family, num_probes=FLAGS.probes, divergence=FLAGS.divergence,
                    solver=FLAGS.solver or "rk45", rtol=FLAGS.rtol or 1e-5, atol=FLAGS.atol or 1e-5,
                    num_steps=FLAGS.steps or 64)
    if settings["solver"] not in ("rk45", "heun"):
        raise ValueError(f"--mode=likelihood takes --solver=rk45 or heun, got {settings['solver']}")
    mesh = generate.make_mesh()
    fn = lik.make_likelihood_fn(model.denoise, process=model.process, mesh=mesh, label_dim=model.label_dim,
                                **settings)
    result = lik.likelihood_of_images(fn, images, labels, batch=FLAGS.batch, mesh=mesh, base_seed=FLAGS.base_seed,
                                      progress=True)
    print(f"{result['bits_per_dim']:.4f} ± {result['std_err']:.4f} bits/dim over {result['num_images']} images "
          f"(mean NFE {result['nfe_mean']:.0f})", flush=True)
    out = FLAGS.out or os.path.join(FLAGS.outdir or workdir or ".", "likelihood.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(lik.summary_json(result, source=FLAGS.data or FLAGS.images, checkpoint=FLAGS.checkpoint,
                                   workdir=workdir, process=model.process.name, base_seed=FLAGS.base_seed,
                                   **settings), f, indent=1)
    print(f"wrote {out}", flush=True)


def _console():
    """The console is this file's: the library only logs (the `edm_jax` loggers). Their lines go to stdout, one
    handler, timestamped like the run's log.txt, and not on to absl's stderr handler as well; stderr keeps
    the warnings of other libraries and the one `error:` sentence of a failure, last."""
    handler = std_logging.StreamHandler(sys.stdout)
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    package = std_logging.getLogger("edm_jax")
    package.addHandler(handler)
    package.setLevel(std_logging.DEBUG if FLAGS.verbosity >= 1 else std_logging.INFO)
    package.propagate = False


def _peer_lost(sentence: str) -> None:
    """The watchdog's reason, as the process's last line (it exits with status 3 next)."""
    sys.stdout.flush()
    print(f"error: {sentence}", file=sys.stderr, flush=True)


class _OwnInfoOnly(std_logging.Filter):
    """Lets INFO through only from this repository's loggers ('edm_jax'). Orbax reports every stage of every checkpoint
    save at INFO through absl (a dozen lines per save) and JAX its backend probing; that buries the
    progress lines. Their warnings and errors still show; `-v 1` shows everything."""

    def filter(self, record):
        # By logger name, not file path: a virtualenv inside the repository holds the libraries too.
        return record.levelno >= std_logging.WARNING or record.name == "edm_jax" or record.name.startswith("edm_jax.")


def _split_cpu() -> None:
    """--cpu_devices on CPU runs (edm_jax/cpu_devices.py); before anything starts a JAX backend."""
    from edm_jax import cpu_devices, distributed

    if not host_memory.runs_on_cpu():
        return
    if FLAGS.cpu_devices.strip().lower() == "auto" and distributed.requested():
        return  # processes sharing a host would oversubscribe its cores; say a count to split each
    batch = None  # training shards a fixed batch: auto picks a count that divides it
    config_arg = _config_arg()
    # A missing file is main()'s one-sentence error; reading FLAGS.config here would raise it as a traceback.
    if FLAGS.mode in ("train", "train_classifier") and config_arg and not _config_file_missing(config_arg):
        batch = getattr(FLAGS.config.get("train", None), "batch_size", None)
    try:
        cpu_devices.split_host(cpu_devices.choose(FLAGS.cpu_devices, cpu_devices.usable_cores(), batch))
    except ValueError as e:
        _fail(str(e))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --mode=train")
    _console()
    if FLAGS.verbosity < 1:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    from edm_jax import compile_cache

    compile_cache.enable(FLAGS.compilation_cache)
    _split_cpu()
    config_arg = _config_arg()
    workdir = FLAGS.workdir or os.path.join("runs", config_name(config_arg))

    if FLAGS.mode == "convert":
        if not FLAGS.checkpoint:
            _fail("--mode=convert needs --checkpoint=PATH.pkl (a reference snapshot; or a PSLD .ckpt with "
                  "--config) and --workdir=DIR")
        if not FLAGS.workdir:
            _fail("--mode=convert needs --workdir=DIR: the folder that will hold the converted checkpoint")
        from edm_jax import convert  # heavy imports only for the mode that needs them
        from edm_jax.interop import psld_checkpoint

        try:
            if psld_checkpoint.is_lightning_checkpoint(FLAGS.checkpoint):
                done = psld_checkpoint.convert_from_config(FLAGS.checkpoint, FLAGS.workdir, FLAGS.config, config_arg)
            else:
                done = convert.convert_snapshot(FLAGS.checkpoint, FLAGS.workdir)
        except (OSError, ValueError, pickle.UnpicklingError) as e:  # incl. unsafe or corrupt pickles
            _fail(str(e))
        print(done.summary(), flush=True)
        return

    from edm_jax import distributed  # before anything touches a JAX backend; a no-op on one process

    try:
        distributed.initialize(on_peer_lost=_peer_lost)
    except distributed.DistributedError as e:
        _fail(str(e))

    if FLAGS.mode in ("sample", "eval", "likelihood"):
        run = {"sample": _sample, "eval": _evaluate, "likelihood": _likelihood}[FLAGS.mode]
        try:
            run(FLAGS.workdir or (os.path.join("runs", config_name(config_arg)) if config_arg else None))
        except (OSError, ValueError, NotImplementedError, pickle.UnpicklingError) as e:
            _fail(str(e))
        return

    if config_arg is None:
        _fail(f"--mode={FLAGS.mode} needs --config=configs/<name>.py (see configs/)")
    if _config_file_missing(config_arg):
        _fail(f"config file {config_arg.partition(':')[0]} not found; the presets live in configs/")
    std_logging.getLogger("edm_jax").info("mode=%s config=%s workdir=%s", FLAGS.mode, config_arg, workdir)

    if FLAGS.mode == "train":
        from edm_jax import checkpoint, data, train
        from edm_jax.interop.runlock import WorkdirLockedError

        try:
            train.train_and_evaluate(FLAGS.config, workdir)
        except (ValueError, OSError, checkpoint.CheckpointError, data.DatasetUnavailableError,
                WorkdirLockedError) as e:
            _fail(str(e))  # bad config, missing data or a foreign checkpoint: one sentence, no traceback

    if FLAGS.mode == "train_classifier":
        from edm_jax import checkpoint, classifier_train, data
        from edm_jax.interop.runlock import WorkdirLockedError

        try:
            classifier_train.train_classifier(FLAGS.config, workdir)  # holds the workdir's lock, as training
        except (ValueError, OSError, checkpoint.CheckpointError, data.DatasetUnavailableError,
                WorkdirLockedError) as e:
            _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
