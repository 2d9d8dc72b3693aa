"""Run-directory and config schemas: the one reader of how a process is written down.

A config's (or a run directory's `config.json`'s) diffusion process is one flat `process` section,
{'kind': 'edm', 'sigma_data': 0.5, ...}, each hyperparameter written once. Run directories and converted
checkpoints written before that section existed carry `precond` {kind, kwargs} + `loss` {kind, kwargs}
instead; `process_from_config` reads both, so old runs still load and sample. The run directories it reads:

  training run        config.json, checkpoints/<step>/           `load_training_checkpoint` (its EMA network)
  converted model     converted_config.json, converted/           `load_converted` (convert.py writes it)
  classifier run      classifier_config.json, checkpoints/<step>/ `load_classifier` (classifier_train.py writes it)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion.process import make_process, sigma_process
from edm_jax.networks.build import build_network

__all__ = ["process_from_config", "process_section", "load_training_checkpoint", "load_converted",
           "load_classifier", "classifier_network", "as_dict", "CONVERTED_DIR", "CONVERTED_CONFIG",
           "CLASSIFIER_CONFIG"]

log = logging.getLogger(__name__)

CONVERTED_DIR = "converted"                   # orbax: {'params', ['buffers']} of a converted network
CONVERTED_CONFIG = "converted_config.json"    # its `convert.Snapshot.config`
CLASSIFIER_CONFIG = "classifier_config.json"  # a classifier run's EncoderUNet kwargs and preconditioning


def as_dict(section) -> dict:
    """A config section (ConfigDict, mapping or None) as a plain dict; None -> {}."""
    if section is None:
        return {}
    return section.to_dict() if hasattr(section, "to_dict") else dict(section)



def process_from_config(config: Mapping[str, Any]):
    """The process of a config (ConfigDict or the plain dict of a config.json).

    New schema: `process` = {'kind': ..., **hyperparameters}. Old schemas: `precond` = {'kind', 'kwargs'}
    and `loss` = {'kind', 'kwargs'} (training runs), or both flat {'kind', **hyperparameters} with the loss
    possibly None (converted reference snapshots).
    """
    if config.get("process"):
        section = as_dict(config["process"])
        kind = section.pop("kind", None)
        if kind is None:
            raise ValueError("the config's process section has no 'kind'; e.g. process.kind='edm'")
        return make_process(kind, **section)
    if config.get("precond"):
        precond, loss = _legacy(config["precond"]), _legacy(config.get("loss"))
        return sigma_process(precond.pop("kind"), loss=loss.pop("kind", None), precond_kwargs=precond,
                             loss_kwargs=loss)
    raise ValueError("the config has no 'process' section (e.g. process.kind='edm'); start from "
                     "configs/quickstart.py or configs/cifar10_edm.py")


def _legacy(section) -> dict:
    """{'kind', 'kwargs': {...}} (training config.json) or {'kind', **kwargs} (converted snapshots) -> flat."""
    section = as_dict(section)
    return {**{k: v for k, v in section.items() if k != "kwargs"}, **as_dict(section.get("kwargs"))}


def process_section(process) -> dict:
    """The flat `process` config section that rebuilds `process` (`process_from_config` inverts it)."""
    return process.describe()


def _network_io_from_params(params):
    """The data-dependent constructor arguments of an EDM network, read off its parameter tree.

    The training loop takes img_resolution / in_channels / out_channels / label_dim / augment_dim from the
    dataset rather than the config, so a checkpoint's weights are where they are written down.
    """
    convs = sorted(k for k in params if k.startswith("enc_") and k.endswith("_conv"))
    if not convs:
        raise ValueError("the checkpoint's EMA parameters have no enc_<res>x<res>_conv layer: not an EDM network")
    in_kernel = params[convs[0]]["kernel"]
    resolution = int(convs[0][len("enc_"):].split("x")[0])
    outs = [k for k in params if k == "out_conv" or (k.startswith("dec_") and k.endswith("_aux_conv"))]
    width = lambda name: int(params[name]["kernel"].shape[0]) if name in params else 0  # noqa: E731
    return dict(img_resolution=resolution, in_channels=int(in_kernel.shape[2]),
                out_channels=int(params[outs[0]]["kernel"].shape[-1]), label_dim=width("map_label"),
                augment_dim=width("map_augment"))


def load_training_checkpoint(path, dtype=jnp.float32):
    """The EMA network of a training run's newest checkpoint, as a `convert.Snapshot`.

    `path`: a training workdir (holding `config.json` and `checkpoints/<step>/`, as `edm_jax.train` writes
    them), its `checkpoints/` folder, or one `checkpoints/<step>` folder. Only the EMA parameters and the
    buffers are read; the optimizer state stays on disk.
    """
    from edm_jax import convert

    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(os.path.join(path, "state")):  # one step's folder
        workdir = os.path.dirname(os.path.dirname(path))
        step_dir, state, meta = _restore_first_intact([path])
    else:
        ckpt_dir = path if os.path.basename(path) == "checkpoints" else os.path.join(path, "checkpoints")
        workdir = os.path.dirname(ckpt_dir)
        steps = sorted(int(d) for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])
                       if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d, "state")))
        if not steps:
            raise FileNotFoundError(f"{path} holds no training checkpoint (checkpoints/<step>/state) and no "
                                    "converted_config.json; train first, or pass --checkpoint=<reference .pkl>")
        step_dirs = [os.path.join(ckpt_dir, str(step)) for step in reversed(steps)]
        step_dir, state, meta = _restore_first_intact(step_dirs)
    config_path = os.path.join(workdir, "config.json")
    if not meta.get("config") and not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: the training run's resolved config is needed to rebuild "
                                "its network")
    if meta.get("config"):  # the config the checkpoint was trained with, kept beside it
        config = meta["config"]
    else:
        with open(config_path) as f:
            config = json.load(f)
    ema = state["ema"]
    io = _network_io_from_params(ema)
    model = {**config["model"], "dtype": jnp.dtype(dtype).name}
    module = build_network(model, resolution=io["img_resolution"], channels=io["in_channels"],
                           label_dim=io["label_dim"], augment_dim=io["augment_dim"], out_channels=io["out_channels"])
    process = process_from_config(config)
    data = config.get("data", {})
    snap_config = {
        "source": step_dir, "process": process.describe(),
        "network": {"model_type": model.get("name", "SongUNet"), **{k: v for k, v in model.items() if k != "name"},
                    **io},
        "img_resolution": io["img_resolution"], "img_channels": process.data_channels(io["in_channels"]),
        "label_dim": io["label_dim"],
        "dataset": {"path": data.get("path") or data.get("tfds_name") or data.get("source")},
    }
    params = jax.tree.map(jnp.asarray, {"params": ema, **state.get("buffers", {})})
    return convert.Snapshot(config=snap_config, params=params, module=module, process=process)


def load_converted(workdir, dtype=jnp.float32):
    """The `convert.Snapshot` that `--mode=convert` (`convert.write_converted`) wrote into `workdir`."""
    import orbax.checkpoint as ocp

    from edm_jax import convert

    workdir = os.path.abspath(workdir)
    config_path = os.path.join(workdir, CONVERTED_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found; run main.py --mode=convert --workdir={workdir} first")
    with open(config_path) as f:
        config = json.load(f)
    if not {"img_resolution", "in_channels", "out_channels"} <= set(config["network"]):
        raise convert.SnapshotError(f"{config_path} lacks the network's img_resolution/in_channels/out_channels")
    module = convert.network_from_config(config["network"], dtype=dtype)
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), convert.variable_shapes(module))
    variables = ocp.StandardCheckpointer().restore(os.path.join(workdir, CONVERTED_DIR), target)
    return convert.Snapshot(config=config, params=variables, module=module, process=process_from_config(config))


def classifier_network(kwargs: Mapping):
    """The `EncoderUNet` of a classifier_config.json's `network` kwargs (JSON lists and dtype names)."""
    from edm_jax.networks.classifier import EncoderUNet

    kwargs = dict(kwargs)
    for k in ("channel_mult", "attn_resolutions"):
        if k in kwargs:
            kwargs[k] = tuple(kwargs[k])
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return EncoderUNet(**kwargs)


def load_classifier(workdir: str):
    """(module, variables, precond) of the newest checkpoint of a `train_classifier` run in `workdir`.

    The checkpoint holds the whole train state (step, params, opt_state), so it is restored into that
    state's shapes (`classifier_train.abstract_state` with the default optimizer) and the params kept.
    """
    from edm_jax.checkpoint import Checkpointer
    from edm_jax.classifier_train import abstract_state
    from edm_jax.diffusion.precond import make_precond
    from edm_jax.distributed import make_mesh, replicated
    from edm_jax.train import make_optimizer

    workdir = os.path.abspath(os.path.expanduser(workdir))
    path = os.path.join(workdir, CLASSIFIER_CONFIG)
    if not os.path.isfile(path):
        raise OSError(f"{path} not found: {workdir} is not a train_classifier run directory")
    with open(path) as f:
        meta = json.load(f)
    module = classifier_network(meta["network"])
    precond = make_precond(meta["precond"]["kind"], **meta["precond"].get("kwargs", {}))
    shape = (module.img_resolution, module.img_resolution, module.in_channels)
    _, abstract = abstract_state(module, make_optimizer(), shape, replicated(make_mesh()))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        restored = ckpt.restore_latest(abstract)
    finally:
        ckpt.close()
    if restored is None:
        raise OSError(f"no classifier checkpoint in {os.path.join(workdir, 'checkpoints')}")
    state, _ = restored
    return module, {"params": state["params"]}, precond


def _restore_on_host(path):
    """A saved tree as host numpy arrays, whatever topology saved it: a checkpoint of N processes restores
    in M (orbax refuses a plain restore across topologies); make_sample_fn replicates the parameters."""
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _restore_first_intact(step_dirs):
    """(step_dir, state, meta) of the first of `step_dirs` that restores and whose EMA and buffers match
    their checksums; the damaged ones are skipped with a warning (as training does), never moved."""
    from edm_jax.checkpoint import verify_checksums

    errors = []
    for step_dir in step_dirs:
        try:
            meta_path = os.path.join(step_dir, "meta", "metadata")
            meta = json.load(open(meta_path)) if os.path.isfile(meta_path) else {}
            state = _restore_on_host(os.path.join(step_dir, "state"))
            verify_checksums({"ema": state["ema"], "buffers": state.get("buffers", {})}, meta.get("checksums"),
                             prefixes=("ema/", "buffers/"))
            if errors:
                log.warning("sampling from %s instead of the damaged newest checkpoint", step_dir)
            return step_dir, state, meta
        except Exception as e:  # noqa: BLE001 (any failure: this one is unusable, try the previous)
            errors.append(f"{step_dir}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            log.warning("checkpoint %s is damaged; trying the previous one", errors[-1])
    raise ValueError(f"no checkpoint could be read ({'; '.join(errors[:2])}); train again or use another --workdir")
