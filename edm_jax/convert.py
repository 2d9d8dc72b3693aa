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

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax.networks import DhariwalUNet, SongUNet

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

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


def flax_shape(shape):
    """The flax shape of a reference tensor of `shape`: OIHW -> HWIO, [out, in] -> [in, out]."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        return shape[2], shape[3], shape[1], shape[0]
    if len(shape) == 2:
        return shape[1], shape[0]
    return shape


def to_flax_layout(array):
    """Transpose one reference array to the flax layout (float32 numpy)."""
    array = np.asarray(array, np.float32)
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


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
