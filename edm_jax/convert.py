"""Reference (NVlabs/edm, PyTorch) network weights -> flax variables for `edm_jax.networks`.

The name map is generic, read off the reference's state-dict names:
  `enc.16x16_block0.qkv.weight`  -> params / enc_16x16_block0 / qkv / kernel
  `map_layer0.bias`              -> params / map_layer0 / bias
  `dec.32x32_aux_norm.weight`    -> params / dec_32x32_aux_norm / scale   (1-D weight = GroupNorm)
  `map_noise.freqs`              -> buffers / map_noise / freqs          (NCSN++ Fourier buffer)
  `*.resample_filter`            -> no variable: a constant of the config, checked against it
i.e. `enc.`/`dec.` become prefixes joined with `_`, `weight` becomes `kernel` (>= 2-D) or `scale`
(1-D). Layouts: conv OIHW -> HWIO, linear [out, in] -> [in, out]. The qkv channel order needs no
permutation: the flax attention reads the reference's interleaved layout directly.

Every state-dict entry must land on a flax leaf and every flax leaf must be filled, with matching
shapes, or a `ValueError` names the offenders. This module never imports torch.
"""

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.interop.rundir import CONVERTED_CONFIG as CONFIG_FILE, CONVERTED_DIR  # noqa: F401 (the schema's names)
from edm_jax.networks.build import NETWORKS
from edm_jax.torch_pickle import flax_shape, to_flax_layout  # noqa: F401 (re-exported; the one transpose)

MODEL_TYPES = NETWORKS  # the one table of network classes

# Keys that appear next to the network kwargs in reference configs/pickles but are not network
# constructor arguments (class name, precision switch, preconditioner hyperparameters): ignored.
REFERENCE_ONLY_KEYS = frozenset({
    "use_fp16", "img_channels", "sigma_min", "sigma_max", "sigma_data", "beta_d", "beta_min", "M",
    "epsilon_t", "C_1", "C_2", "class_name",
})


# ---------------------------------------------------------------------------------------------------
# Name and layout map (works on shapes alone, so tests can check full-size networks without arrays).

def flax_location(name, ndim):
    """Where a reference state-dict entry goes: `(collection, path tuple)`, or None for a resample filter."""
    parts = name.split(".")
    if parts[-1] == "resample_filter":
        return None
    if parts[0] in ("enc", "dec") and len(parts) > 2:
        parts = [f"{parts[0]}_{parts[1]}"] + parts[2:]
    leaf = parts[-1]
    if leaf == "freqs":
        return "buffers", tuple(parts)
    if leaf == "weight":
        leaf = "kernel" if ndim >= 2 else "scale"
    elif leaf != "bias":
        raise ValueError(f"state-dict entry {name!r}: unknown leaf {parts[-1]!r} "
                         "(expected weight, bias, freqs or resample_filter).")
    return "params", tuple(parts[:-1]) + (leaf,)


def resample_filter_2d(resample_filter):
    """The reference's registered filter buffer: outer(f, f) / sum(f)^2, shape [1, 1, k, k]."""
    f = np.asarray(resample_filter, np.float32)
    return (np.outer(f, f) / np.square(f.sum()))[None, None]


def _listing(items, sep=", ", limit=20):
    more = f"{sep}... and {len(items) - limit} more" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


def match_state_dict(state_dict_shapes, variable_shapes, resample_filter=None):
    """Pair every reference entry with a flax leaf, checking shapes both ways.

    Args:
      state_dict_shapes: {reference name: shape}.
      variable_shapes: the module's variables as a pytree of arrays or ShapeDtypeStructs
        (e.g. `jax.eval_shape(module.init, ...)`).
      resample_filter: the config's 1-D filter, to check the `*.resample_filter` buffers' shapes.
    Returns:
      {reference name: (collection, path)} for every entry that becomes a variable.
    Raises:
      ValueError naming shape mismatches, unused state-dict entries and unset flax leaves.
    """
    targets = {(k[0], tuple(k[1:])): tuple(v.shape)
               for k, v in traverse_util.flatten_dict(dict(variable_shapes)).items()}
    expected_filter = None if resample_filter is None else resample_filter_2d(resample_filter).shape
    plan, unused, mismatched = {}, [], []
    for name, shape in state_dict_shapes.items():
        shape = tuple(int(s) for s in shape)
        loc = flax_location(name, len(shape))
        if loc is None:
            if expected_filter is not None and shape != expected_filter:
                mismatched.append(f"{name}: reference {list(shape)} vs config resample_filter "
                                  f"{list(resample_filter)} -> {list(expected_filter)}")
            continue
        if loc not in targets:
            unused.append(name)
            continue
        if flax_shape(shape) != targets[loc]:
            mismatched.append(f"{name}: reference {list(shape)} -> flax {list(flax_shape(shape))}, "
                              f"but {'/'.join((loc[0],) + loc[1])} is {list(targets[loc])}")
            continue
        plan[name] = loc
    unset = sorted("/".join((c,) + p) for (c, p) in set(targets) - set(plan.values()))
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: " + _listing(mismatched, "; "))
    if unused:
        problems.append(f"{len(unused)} state-dict entries with no flax variable: " + _listing(unused))
    if unset:
        problems.append(f"{len(unset)} flax variables missing from the state dict: " + _listing(unset))
    if problems:
        raise ValueError("The state dict does not fit the network built from the config (check "
                         "model_type and kwargs such as channel_mult, num_blocks, attn_resolutions): "
                         + " | ".join(problems))
    return plan


# ---------------------------------------------------------------------------------------------------
# Building the module from a reference config.

def _infer_missing_kwargs(model_type, kwargs, shapes):
    """Fill constructor arguments the config leaves out but the state dict implies.

    Preconditioner configs pass img_resolution / in_channels / out_channels / label_dim to the
    network themselves, so their inner `model` dicts lack them; the weights pin them down.
    """
    kw = dict(kwargs)
    convs = [n for n in shapes if n.startswith("enc.") and n.endswith("_conv.weight")]
    if convs:
        kw.setdefault("img_resolution", int(convs[0].split(".")[1].split("x")[0]))
        kw.setdefault("in_channels", int(shapes[convs[0]][1]))
    out_name = "out_conv.weight" if model_type == "DhariwalUNet" else None
    if out_name is None:
        outs = [n for n in shapes if n.startswith("dec.") and n.endswith("_aux_conv.weight")]
        out_name = outs[0] if outs else None
    if out_name in shapes:
        kw.setdefault("out_channels", int(shapes[out_name][0]))
    for key, entry in (("label_dim", "map_label.weight"), ("augment_dim", "map_augment.weight")):
        kw.setdefault(key, int(shapes[entry][1]) if entry in shapes else 0)
    return kw


def network_from_config(config, state_dict_shapes=None, dtype=jnp.float32):
    """The flax module for `{"model_type": ..., **reference kwargs}`.

    Unknown reference-only keys (`use_fp16`, preconditioner hyperparameters) are ignored; any other
    unknown key is an error. Missing required kwargs are inferred from `state_dict_shapes` if given.
    """
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config model_type is {model_type!r}; expected one of {sorted(MODEL_TYPES)}.")
    cls = MODEL_TYPES[model_type]
    fields = set(cls.__dataclass_fields__) - {"parent", "name", "dtype"}
    unknown = sorted(set(config) - fields - REFERENCE_ONLY_KEYS)
    if unknown:
        raise ValueError(f"{model_type} has no constructor argument(s) {unknown}; "
                         f"valid ones are {sorted(fields)}.")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields}
    if state_dict_shapes is not None:
        kwargs = _infer_missing_kwargs(model_type, kwargs, state_dict_shapes)
    missing = sorted({"img_resolution", "in_channels", "out_channels"} - set(kwargs))
    if missing:
        raise ValueError(f"{model_type} config lacks {missing} and the state dict does not imply them.")
    return cls(**kwargs, dtype=dtype)


def variable_shapes(module):
    """`jax.eval_shape` of the module's init: the variable tree as ShapeDtypeStructs, no allocation."""
    r = module.img_resolution
    x = jax.ShapeDtypeStruct((1, r, r, module.in_channels), jnp.float32)
    sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(lambda x, s: module.init(jax.random.key(0), x, s), x, sigma)


def network_from_state_dict(config, state_dict: Mapping[str, np.ndarray], dtype=jnp.float32):
    """Build `(module, variables)` from a reference config and raw reference state dict.

    Args:
      config: `{"model_type": "SongUNet" | "DhariwalUNet", **reference constructor kwargs}`.
      state_dict: reference names -> arrays in reference layout (anything `np.asarray` accepts);
        a preconditioner's state dict (every name prefixed `model.`) is accepted too.
      dtype: the module's compute dtype (parameters are float32 regardless).
    Returns:
      The flax module and `{'params': ..., ['buffers': ...]}` of float32 jax arrays.
    """
    if state_dict and all(name.startswith("model.") for name in state_dict):
        # A preconditioner's state dict (e.g. `ema.state_dict()`): the network is its `model`.
        state_dict = {name[len("model."):]: value for name, value in state_dict.items()}
    shapes = {name: np.shape(value) for name, value in state_dict.items()}
    module = network_from_config(config, shapes, dtype=dtype)
    filt = getattr(module, "resample_filter", (1, 1))  # DhariwalUNet always uses [1, 1]
    plan = match_state_dict(shapes, variable_shapes(module), filt)
    for name in shapes:
        if name.endswith(".resample_filter") and not np.allclose(np.asarray(state_dict[name]),
                                                                 resample_filter_2d(filt)):
            raise ValueError(f"{name} does not match the config's resample_filter {list(filt)}; "
                             "set resample_filter in the config to the one the weights were trained with.")
    flat = {(coll,) + path: jnp.asarray(to_flax_layout(state_dict[name]))
            for name, (coll, path) in plan.items()}
    return module, traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------
# Reference training snapshots (network-snapshot-*.pkl, edm-*.pkl, baseline-*.pkl).

class SnapshotError(ValueError):
    """A reference snapshot that is readable but not one this converter understands."""


_PRECOND_KINDS = {"VPPrecond": "vp", "VEPrecond": "ve", "iDDPMPrecond": "iddpm", "EDMPrecond": "edm"}
_LOSS_KINDS = {"VPLoss": "vp", "VELoss": "ve", "EDMLoss": "edm"}
# AugmentPipe settings that edm_jax.augment reproduces; the reference's colour and integer transforms
# are off in every EDM preset (notes §3), and a snapshot that turns them on is refused below.
_AUGMENT_KEYS = ("p", "xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac", "scale_std",
                 "rotate_frac_max", "aniso_std", "aniso_rotate_prob", "translate_frac_std")
_AUGMENT_UNSUPPORTED = ("rotate_int", "translate_int", "brightness", "contrast", "lumaflip", "hue", "saturation")


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A reference model in JAX form.

    config: plain data — `precond` ({"kind", **hyperparameters}), `network` ({"model_type", **kwargs}),
      `loss` ({"kind", **hyperparameters} or None), `augment` (dict or None), `dataset` (dict or None),
      `img_resolution`, `img_channels`, `label_dim`.
    params: flax variables of the EMA network ({'params', ['buffers']}).
    module: the flax module; process: its forward process (`edm_jax.diffusion.process`: the σ family for
      EDM pickles, PSLD's for converted PSLD checkpoints).
    """

    config: dict
    params: dict
    module: Any
    process: Any

    @property
    def precond(self):
        """The σ family's preconditioner (`edm_jax.precond`); None for a process without one (PSLD)."""
        return getattr(self.process, "precond", None)

    def denoise(self, x, sigma, class_labels=None):
        """D(x; σ) of the EMA network: x NHWC [N, H, W, C], σ scalar or [N]; float32, x's shape."""
        return _jitted_model(self.process, self.module)(self.params, x, sigma, class_labels)


@functools.lru_cache(maxsize=8)
def _jitted_model(process, module):
    return jax.jit(process.model(module.apply))


def _plain(value):
    """numpy scalars (as the pickles store some hyperparameters) -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def snapshot_config(data: Mapping, source="snapshot") -> dict:
    """The plain-data description of a loaded reference pickle (see `Snapshot.config`)."""
    from edm_jax.diffusion import precond as precond_lib
    from edm_jax import torch_pickle

    ema = data.get("ema") if isinstance(data, Mapping) else None
    if not isinstance(ema, torch_pickle.PersistentObject):
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise SnapshotError(f"{source} has no 'ema' network (found {keys}); expected a reference "
                            "network-snapshot-*.pkl or edm-*.pkl")
    kind = _PRECOND_KINDS.get(ema.class_name)
    if kind is None:
        raise SnapshotError(f"{source}: 'ema' is a {ema.class_name}, not one of {sorted(_PRECOND_KINDS)}")
    state = ema.state
    model = state.get("_modules", {}).get("model")
    if not isinstance(model, torch_pickle.PersistentObject):
        raise SnapshotError(f"{source}: the {ema.class_name} holds no persistent 'model' network")
    fields = {f.name for f in dataclasses.fields(precond_lib.PRECONDS[kind])}
    config = {
        "source": str(source),
        "precond": {"kind": kind, **{k: _plain(state[k]) for k in sorted(fields) if k in state}},
        "network": {"model_type": model.class_name, **_plain(dict(model.init_kwargs))},
        "img_resolution": int(state["img_resolution"]),
        "img_channels": int(state["img_channels"]),
        "label_dim": int(state["label_dim"]),
        "loss": None, "augment": None, "dataset": _plain(data.get("dataset_kwargs")),
    }
    loss = data.get("loss_fn")
    if isinstance(loss, torch_pickle.PersistentObject) and loss.class_name in _LOSS_KINDS:
        config["loss"] = {"kind": _LOSS_KINDS[loss.class_name],
                          **{k: _plain(v) for k, v in loss.state.items() if not k.startswith("_") and k != "training"}}
    pipe = data.get("augment_pipe")
    if isinstance(pipe, torch_pickle.PersistentObject):
        active = [k for k in _AUGMENT_UNSUPPORTED if float(pipe.state.get(k, 0) or 0) != 0]
        if active:
            raise SnapshotError(f"{source}: its AugmentPipe enables {active}, which edm_jax.augment does not "
                                "implement (EDM's presets use only flips, scale, rotation, anisotropy, translation)")
        config["augment"] = {k: _plain(pipe.state[k]) for k in _AUGMENT_KEYS if k in pipe.state}
    return config


def _build(config, state_dict, dtype=jnp.float32) -> Snapshot:
    from edm_jax.interop.rundir import process_from_config

    module, variables = network_from_state_dict(config["network"], state_dict, dtype=dtype)
    return Snapshot(config=config, params=variables, module=module, process=process_from_config(config))


def load_snapshot(path, dtype=jnp.float32) -> Snapshot:
    """Load a reference training snapshot pickle as a `Snapshot` (EMA network, precond, settings).

    Reads the pickle with `edm_jax.torch_pickle` — no torch, none of the reference's code, nothing
    embedded in the file executed; anything but tensors and plain records is refused.
    """
    from edm_jax import torch_pickle

    data = torch_pickle.load_reference_pickle(path)
    config = snapshot_config(data, source=path)
    weights = torch_pickle.state_dict(data["ema"].state["_modules"]["model"])
    return _build(config, weights, dtype)


@dataclasses.dataclass(frozen=True)
class Converted:
    """What `write_converted` wrote: the checkpoint directory, the network's parameter count, what it is."""

    directory: str
    num_parameters: int
    description: str

    def summary(self) -> str:
        """The one line `main.py --mode=convert` prints: parameters, description, where it went."""
        return f"converted: {self.num_parameters:,} parameters, {self.description} -> {self.directory}"


def convert_snapshot(path, workdir) -> Converted:
    """`main.py --mode=convert`: write a reference snapshot as an orbax checkpoint plus its config.

    Layout: `<workdir>/converted/` (orbax, {'params', ['buffers']} of the EMA network, reference weights
    in flax layout) and `<workdir>/converted_config.json` (`Snapshot.config`). `load_converted(workdir)`
    reads both back. Returns what was written (`Converted`).
    """
    snap = load_snapshot(path)
    return write_converted(workdir, snap.params, snap.config,
                           f"{snap.config['network']['model_type']}, {snap.config['precond']['kind']} "
                           f"preconditioning, from {path}")


def write_converted(workdir, variables, config: Mapping, description: str) -> Converted:
    """Write converted network `variables` (orbax, `<workdir>/converted/`) and `config` (plain data with a
    `network` entry, `{"model_type", **kwargs}`; `<workdir>/converted_config.json`), refusing to overwrite.
    Returns the directory, the parameter count and `description` (`Converted.summary()` is the line to show)."""
    import orbax.checkpoint as ocp

    workdir = os.path.abspath(workdir)
    target = os.path.join(workdir, CONVERTED_DIR)
    if os.path.exists(target):
        raise SnapshotError(f"{target} already exists; pick another --workdir or remove it first")
    os.makedirs(workdir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)  # σ_max = inf is written as Infinity, which json reads back
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    return Converted(directory=target, num_parameters=n, description=description)


def load_converted(workdir, dtype=jnp.float32) -> Snapshot:
    """Read back what `convert_snapshot` (or `write_converted`) wrote into `workdir`
    (`edm_jax.interop.rundir.load_converted`, the reader of that layout)."""
    from edm_jax.interop import rundir

    return rundir.load_converted(workdir, dtype=dtype)
