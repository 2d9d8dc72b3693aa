"""The FID feature extractor: pytorch-fid's Inception-v3 in flax.linen (NHWC), and its weights.

The network is pytorch-fid's `InceptionV3(output_blocks=[3], resize_input=True, normalize_input=True,
use_fid_inception=True)`: torchvision's Inception-v3 (`BasicConv2d` = conv without bias, BatchNorm with
eps 0.001 in inference mode, ReLU) whose Mixed_5b-d, 6b-e, 7b and 7c are replaced by the FID blocks
that reproduce the TensorFlow graph `inception-2015-12-05`:
  * `FIDInceptionA/C/E_1`: the pool branch averages a 3x3 window *without* the zero padding
    (`avg_pool2d(..., padding=1, count_include_pad=False)`);
  * `FIDInceptionE_2` (Mixed_7c): the pool branch is a 3x3 *max* pool (stride 1, padding 1);
  * 1008 classes in `fc` (unused by FID; kept so the state dict maps one-to-one).
Input: images in [0, 1], resized bilinearly to 299x299 (`F.interpolate(mode='bilinear',
align_corners=False)`, no antialiasing), then mapped to [-1, 1]. Output: pool3, the 2048-d global
average of Mixed_7c, which FID uses (Heusel et al. 2017); also the block 0-2 maps and the logits.

Weights: `load_inception_weights(path)` reads the pytorch-fid file `pt_inception-2015-12-05-6726825d.pth`
(a `torch.save`d state dict; read here without torch and without running pickled code) and never
downloads anything. `deterministic_weights(names, shapes)` builds the synthetic weights of the test
fixture (`../shared/fixtures/inception_fid.npz`), so tests need no 95 MB file.
"""

import functools
import hashlib
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from edm_jax import torch_pickle

__all__ = ["InceptionV3FID", "resize_bilinear", "state_dict_shapes", "flax_location", "match_state_dict",
           "variables_from_state_dict", "deterministic_weights", "read_torch_state_dict",
           "load_inception_weights", "default_weights_path", "missing_weights_message", "WEIGHTS_FILENAME",
           "WEIGHTS_URL", "WEIGHTS_BYTES", "WEIGHTS_SHA256_PREFIX", "WEIGHTS_ENV", "FEATURE_DIM", "NUM_CLASSES",
           "INPUT_SIZE"]

FEATURE_DIM = 2048
NUM_CLASSES = 1008
INPUT_SIZE = 299
BN_EPS = 1e-3

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_BYTES = 95_628_359
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch-hub naming: the file name ends in the first 8 hex digits of its sha256
WEIGHTS_ENV = "EDM_JAX_INCEPTION_WEIGHTS"


# ---------------------------------------------------------------------------------------------------
# Architecture table: every BasicConv2d as (name, in, out, kernel, stride, padding), in the order torch
# registers them, which is also the state-dict order. The flax modules and the name map both read it.

def _conv(name, cin, cout, kernel, stride=1, padding=0):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    return name, cin, cout, pair(kernel), stride, pair(padding)


def _convs_a(cin, pool_features):
    return [_conv("branch1x1", cin, 64, 1),
            _conv("branch5x5_1", cin, 48, 1), _conv("branch5x5_2", 48, 64, 5, padding=2),
            _conv("branch3x3dbl_1", cin, 64, 1), _conv("branch3x3dbl_2", 64, 96, 3, padding=1),
            _conv("branch3x3dbl_3", 96, 96, 3, padding=1),
            _conv("branch_pool", cin, pool_features, 1)]


def _convs_b(cin):
    return [_conv("branch3x3", cin, 384, 3, stride=2),
            _conv("branch3x3dbl_1", cin, 64, 1), _conv("branch3x3dbl_2", 64, 96, 3, padding=1),
            _conv("branch3x3dbl_3", 96, 96, 3, stride=2)]


def _convs_c(cin, c7):
    return [_conv("branch1x1", cin, 192, 1),
            _conv("branch7x7_1", cin, c7, 1), _conv("branch7x7_2", c7, c7, (1, 7), padding=(0, 3)),
            _conv("branch7x7_3", c7, 192, (7, 1), padding=(3, 0)),
            _conv("branch7x7dbl_1", cin, c7, 1), _conv("branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0)),
            _conv("branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3)),
            _conv("branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0)),
            _conv("branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3)),
            _conv("branch_pool", cin, 192, 1)]


def _convs_d(cin):
    return [_conv("branch3x3_1", cin, 192, 1), _conv("branch3x3_2", 192, 320, 3, stride=2),
            _conv("branch7x7x3_1", cin, 192, 1), _conv("branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3)),
            _conv("branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0)),
            _conv("branch7x7x3_4", 192, 192, 3, stride=2)]


def _convs_e(cin):
    return [_conv("branch1x1", cin, 320, 1),
            _conv("branch3x3_1", cin, 384, 1), _conv("branch3x3_2a", 384, 384, (1, 3), padding=(0, 1)),
            _conv("branch3x3_2b", 384, 384, (3, 1), padding=(1, 0)),
            _conv("branch3x3dbl_1", cin, 448, 1), _conv("branch3x3dbl_2", 448, 384, 3, padding=1),
            _conv("branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1)),
            _conv("branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0)),
            _conv("branch_pool", cin, 192, 1)]


_STEM = [_conv("Conv2d_1a_3x3", 3, 32, 3, stride=2), _conv("Conv2d_2a_3x3", 32, 32, 3),
         _conv("Conv2d_2b_3x3", 32, 64, 3, padding=1), _conv("Conv2d_3b_1x1", 64, 80, 1),
         _conv("Conv2d_4a_3x3", 80, 192, 3)]

# (name, block kind, constructor arguments): Mixed_5b ... Mixed_7c as pytorch-fid's fid_inception_v3() builds them.
_MIXED = [("Mixed_5b", "A", (192, 32)), ("Mixed_5c", "A", (256, 64)), ("Mixed_5d", "A", (288, 64)),
          ("Mixed_6a", "B", (288,)), ("Mixed_6b", "C", (768, 128)), ("Mixed_6c", "C", (768, 160)),
          ("Mixed_6d", "C", (768, 160)), ("Mixed_6e", "C", (768, 192)), ("Mixed_7a", "D", (768,)),
          ("Mixed_7b", "E_1", (1280,)), ("Mixed_7c", "E_2", (2048,))]
_BLOCK_CONVS = {"A": _convs_a, "B": _convs_b, "C": _convs_c, "D": _convs_d, "E_1": _convs_e, "E_2": _convs_e}


def state_dict_shapes():
    """{pytorch-fid state-dict name: torch shape}, in the file's order (566 entries)."""
    out = {}

    def conv_entries(prefix, spec):
        _, cin, cout, (kh, kw), _, _ = spec
        out[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.bn.{leaf}"] = (cout,)
        out[f"{prefix}.bn.num_batches_tracked"] = ()

    for spec in _STEM:
        conv_entries(spec[0], spec)
    for block, kind, args in _MIXED:
        for spec in _BLOCK_CONVS[kind](*args):
            conv_entries(f"{block}.{spec[0]}", spec)
    out["fc.weight"] = (NUM_CLASSES, FEATURE_DIM)
    out["fc.bias"] = (NUM_CLASSES,)
    return out


# ---------------------------------------------------------------------------------------------------
# Layers.

def _bilinear_matrix(n_in, n_out):
    """[n_out, n_in] weights of torch's bilinear resize (align_corners=False, no antialias) along one axis.

    torch (aten/src/ATen/native/UpSample.h), in float32: src = (in/out)·(dst + ½) − ½, clamped at 0;
    i0 = ⌊src⌋, i1 = min(i0 + 1, in − 1), weights (1 − λ, λ) with λ = src − i0. The multiply-add is
    rounded once, as torch's CPU build does (fused); that reproduces its weights bit for bit.
    """
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    src = np.maximum((np.float64(scale) * dst - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0.astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), np.float32(1) - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def resize_bilinear(x, height=INPUT_SIZE, width=INPUT_SIZE):
    """Resize NHWC images like `F.interpolate(x, (height, width), mode='bilinear', align_corners=False)`.

    Separable: two small matrix products with exact float32 weights (HIGHEST precision, so a GPU/TPU
    does not round the pixels to bf16/TF32). Same size in and out is the identity, as in torch.
    """
    _, h, w, _ = x.shape
    hp = jax.lax.Precision.HIGHEST
    if h != height:
        x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(_bilinear_matrix(h, height)), x, precision=hp)
    if w != width:
        x = jnp.einsum("pw,nhwc->nhpc", jnp.asarray(_bilinear_matrix(w, width)), x, precision=hp)
    return x


def _max_pool_3x3_s2(x):  # nn.MaxPool2d(3, stride=2) / F.max_pool2d(x, 3, stride=2): no padding
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def _avg_pool_3x3_same(x):  # F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):  # F.max_pool2d(x, 3, stride=1, padding=1): torch pads with -inf, as does flax
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) -> BatchNorm(eps=0.001, running statistics) -> ReLU."""
    features: int
    kernel_size: tuple
    strides: int = 1
    padding: tuple = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=((ph, ph), (pw, pw)),
                    use_bias=False, precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _make_convs(specs, precision):
    """The BasicConv2d submodules of one table entry list, by name (call inside a compact method)."""
    return {name: BasicConv2d(cout, kernel, stride, padding, precision, name=name)
            for name, _, cout, kernel, stride, padding in specs}


class FIDInceptionA(nn.Module):
    in_channels: int
    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = _make_convs(_convs_a(self.in_channels, self.pool_features), self.precision)
        b1 = c["branch1x1"](x)
        b5 = c["branch5x5_2"](c["branch5x5_1"](x))
        b3 = c["branch3x3dbl_3"](c["branch3x3dbl_2"](c["branch3x3dbl_1"](x)))
        bp = c["branch_pool"](_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a, unchanged from torchvision
    in_channels: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = _make_convs(_convs_b(self.in_channels), self.precision)
        b3 = c["branch3x3"](x)
        bd = c["branch3x3dbl_3"](c["branch3x3dbl_2"](c["branch3x3dbl_1"](x)))
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    in_channels: int
    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = _make_convs(_convs_c(self.in_channels, self.channels_7x7), self.precision)
        b1 = c["branch1x1"](x)
        b7 = c["branch7x7_3"](c["branch7x7_2"](c["branch7x7_1"](x)))
        bd = x
        for i in range(1, 6):
            bd = c[f"branch7x7dbl_{i}"](bd)
        bp = c["branch_pool"](_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a, unchanged from torchvision
    in_channels: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = _make_convs(_convs_d(self.in_channels), self.precision)
        b3 = c["branch3x3_2"](c["branch3x3_1"](x))
        b7 = x
        for i in range(1, 5):
            b7 = c[f"branch7x7x3_{i}"](b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (`pool='avg'`, Mixed_7b) and FIDInceptionE_2 (`pool='max'`, Mixed_7c)."""
    in_channels: int
    pool: str
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        c = _make_convs(_convs_e(self.in_channels), self.precision)
        b1 = c["branch1x1"](x)
        b3 = c["branch3x3_1"](x)
        b3 = jnp.concatenate([c["branch3x3_2a"](b3), c["branch3x3_2b"](b3)], axis=-1)
        bd = c["branch3x3dbl_2"](c["branch3x3dbl_1"](x))
        bd = jnp.concatenate([c["branch3x3dbl_3a"](bd), c["branch3x3dbl_3b"](bd)], axis=-1)
        bp = c["branch_pool"](_max_pool_3x3_same(x) if self.pool == "max" else _avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def _mixed_block(name, kind, args, precision):
    if kind == "A":
        return FIDInceptionA(*args, precision=precision, name=name)
    if kind == "B":
        return InceptionB(*args, precision=precision, name=name)
    if kind == "C":
        return FIDInceptionC(*args, precision=precision, name=name)
    if kind == "D":
        return InceptionD(*args, precision=precision, name=name)
    return FIDInceptionE(*args, pool="avg" if kind == "E_1" else "max", precision=precision, name=name)


class InceptionV3FID(nn.Module):
    """pytorch-fid's FID Inception-v3, NHWC.

    Call: `module.apply(variables, x)` with `x` float [N, H, W, 3] in [0, 1] (any H, W when
    `resize_input`; at least 75x75 otherwise) and `variables = {'params', 'batch_stats'}` (from
    `load_inception_weights` or `variables_from_state_dict`). Returns a dict:
      `pool` [N, 2048] (the FID features), `logits` [N, 1008] (`fc(pool)`),
      `block0` [N, 73, 73, 64], `block1` [N, 35, 35, 192], `block2` [N, 17, 17, 768]
    (pytorch-fid's output blocks 0-2, sizes for 299x299). Under jit, unused outputs cost nothing.
    `precision`: the conv/fc matmul precision; HIGHEST by default so that accelerators compute in
    full float32 like the reference.
    """
    resize_input: bool = True
    normalize_input: bool = True
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3FID takes images of shape [N, H, W, 3] in [0, 1]; got {x.shape}.")
        x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE)
        if self.normalize_input:
            x = 2 * x - 1
        c = _make_convs(_STEM, self.precision)
        x = c["Conv2d_2b_3x3"](c["Conv2d_2a_3x3"](c["Conv2d_1a_3x3"](x)))
        block0 = x = _max_pool_3x3_s2(x)
        x = c["Conv2d_4a_3x3"](c["Conv2d_3b_1x1"](x))
        block1 = x = _max_pool_3x3_s2(x)
        for name, kind, args in _MIXED:
            x = _mixed_block(name, kind, args, self.precision)(x)
            if name == "Mixed_6e":
                block2 = x
        pool = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
        logits = nn.Dense(NUM_CLASSES, precision=self.precision, name="fc")(pool)
        return dict(block0=block0, block1=block1, block2=block2, pool=pool, logits=logits)


@functools.lru_cache(maxsize=None)
def _variable_shapes():
    """{(collection, *path): shape} of the module's variables (abstract init; no arrays)."""
    module = InceptionV3FID(resize_input=False)
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


# ---------------------------------------------------------------------------------------------------
# State dict (torch names and layouts) -> flax variables.

_LEAVES = {("conv", "weight"): ("params", "kernel"), ("bn", "weight"): ("params", "scale"),
           ("bn", "bias"): ("params", "bias"), ("bn", "running_mean"): ("batch_stats", "mean"),
           ("bn", "running_var"): ("batch_stats", "var"), ("fc", "weight"): ("params", "kernel"),
           ("fc", "bias"): ("params", "bias")}


def flax_location(name):
    """Where a pytorch-fid state-dict entry goes, `(collection, *path)`; None for `num_batches_tracked`.

      `Mixed_5b.branch1x1.conv.weight`   -> ('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel')
      `Conv2d_1a_3x3.bn.weight` / `.bias`  -> ('params', 'Conv2d_1a_3x3', 'bn', 'scale' / 'bias')
      `*.bn.running_mean` / `running_var`  -> ('batch_stats', ..., 'bn', 'mean' / 'var')
      `fc.weight` / `fc.bias`              -> ('params', 'fc', 'kernel' / 'bias')
    Unknown leaves raise ValueError.
    """
    *path, leaf = name.split(".")
    if leaf == "num_batches_tracked":  # BatchNorm's training counter: no meaning in inference
        return None
    target = _LEAVES.get((path[-1] if path else "", leaf))
    if target is None:
        raise ValueError(f"state-dict entry {name!r} is not an Inception-v3 conv/bn/fc tensor.")
    return (target[0], *path, target[1])


def _listing(items, limit=12):
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def match_state_dict(shapes: Mapping[str, tuple]):
    """Pair every state-dict entry with a flax variable and check the pairing both ways.

    Args: {state-dict name: torch shape}. Returns {name: (collection, *path)} for every entry that
    becomes a variable. Raises ValueError listing entries with no variable (leftovers), shape
    mismatches, malformed counters and variables nothing fills (unset).
    """
    targets = _variable_shapes()
    plan, leftover, mismatched = {}, [], []
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        try:
            loc = flax_location(name)
        except ValueError:
            leftover.append(name)
            continue
        if loc is None:  # a counter: its BatchNorm must exist
            if ("batch_stats", *name.split(".")[:-1], "mean") not in targets:
                leftover.append(name)
            elif shape not in ((), (1,)):
                mismatched.append(f"{name}: {list(shape)} (expected a scalar counter)")
            continue
        if loc not in targets:
            leftover.append(name)
            continue
        flax_shape = torch_pickle.flax_shape(shape)
        if flax_shape != targets[loc]:
            mismatched.append(f"{name}: torch {list(shape)} -> flax {list(flax_shape)}, "
                              f"but {'/'.join(loc)} is {list(targets[loc])}")
            continue
        plan[name] = loc
    unset = sorted("/".join(k) for k in set(targets) - set(plan.values()))
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
    if leftover:
        problems.append(f"{len(leftover)} entries with no flax variable: {_listing(leftover)}")
    if unset:
        problems.append(f"{len(unset)} flax variables missing from the state dict: {_listing(unset)}")
    if problems:
        raise ValueError("The state dict is not pytorch-fid's FID Inception-v3 (pt_inception-2015-12-05): "
                         + " | ".join(problems))
    return plan


def variables_from_state_dict(state_dict: Mapping[str, Any]):
    """pytorch-fid state dict `{name: array in torch layout}` -> flax `{'params', 'batch_stats'}` (float32)."""
    plan = match_state_dict({k: np.shape(v) for k, v in state_dict.items()})
    flat = {loc: jnp.asarray(torch_pickle.to_flax_layout(state_dict[name]))
            for name, loc in plan.items()}
    return traverse_util.unflatten_dict(flat)


def deterministic_weights(names=None, shapes=None):
    """The synthetic state dict of the `inception_fid.npz` fixture (torch layouts, float32 numpy).

    `rng = numpy.random.default_rng(0)`, one draw `z = rng.standard_normal(shape)` per entry in order
    (`num_batches_tracked`: zeros, no draw): conv weight z·√(2/fan_in), bn weight 1 + 0.1z, bn bias and
    running_mean 0.1z, running_var 1 + 0.1|z|, fc weight z·√(1/in), fc bias 0·z.
    `names`/`shapes` default to `state_dict_shapes()`; shapes may be tuples or "d0,d1,..." strings.
    """
    if names is None:
        table = state_dict_shapes()
        names, shapes = list(table), list(table.values())
    if shapes is None or len(names) != len(shapes):
        raise ValueError("deterministic_weights needs one shape per name.")
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in zip(names, shapes):
        name = str(name)
        if isinstance(shape, str):
            shape = tuple(int(s) for s in shape.split(",") if s)
        shape = tuple(int(s) for s in shape)
        if name.endswith("num_batches_tracked"):
            out[name] = np.zeros(shape, np.int64)
            continue
        z = rng.standard_normal(shape)
        if name.endswith("conv.weight"):
            w = z * np.sqrt(2 / np.prod(shape[1:]))
        elif name.endswith("bn.weight"):
            w = 1 + 0.1 * z
        elif name.endswith(("bn.bias", "running_mean")):
            w = 0.1 * z
        elif name.endswith("running_var"):
            w = 1 + 0.1 * np.abs(z)
        elif name == "fc.weight":
            w = z * np.sqrt(1 / shape[1])
        elif name == "fc.bias":
            w = 0 * z
        else:
            raise ValueError(f"deterministic_weights has no rule for state-dict entry {name!r}.")
        out[name] = w.astype(np.float32)
    return out


def read_torch_state_dict(path):
    """A `torch.save`d state dict -> {name: numpy array}, without torch and without running pickled code
    (`edm_jax.torch_pickle.load_torch_save`)."""
    obj = torch_pickle.load_torch_save(path)
    if not (isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())):
        raise torch_pickle.SnapshotFormatError(f"{os.fspath(path)} holds a {type(obj).__name__}, not a state dict "
                                               "of tensors")
    return dict(obj)


def default_weights_path():
    """`$EDM_JAX_INCEPTION_WEIGHTS`, else `~/.cache/edm_jax/pt_inception-2015-12-05-6726825d.pth`."""
    return os.environ.get(WEIGHTS_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "edm_jax", WEIGHTS_FILENAME)


def missing_weights_message(path):
    return (f"Inception weights {path} not found: download {WEIGHTS_URL} ({WEIGHTS_BYTES:,} bytes) on a machine "
            f"with internet access and copy it to that path (or pass its location as `path` or in ${WEIGHTS_ENV}); "
            "edm_jax never downloads anything, so it cannot be fetched from here.")


def load_inception_weights(path=None, *, check_hash=True):
    """Flax variables `{'params', 'batch_stats'}` from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`.

    `path` defaults to `default_weights_path()`. The file must exist (this never downloads: get it from
    `WEIGHTS_URL` yourself), have exactly 95,628,359 bytes and, unless `check_hash=False`, a sha256 that
    starts with 6726825d (torch-hub's file-name convention). It is decoded without torch; every entry
    must land on a variable and every variable must be filled (`match_state_dict`).
    """
    path = os.fspath(path) if path is not None else default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_weights_message(path))
    size = os.path.getsize(path)
    if size != WEIGHTS_BYTES:
        raise ValueError(f"Inception weights {path} has {size:,} bytes, not the {WEIGHTS_BYTES:,} of "
                         f"{WEIGHTS_FILENAME}: it is truncated or a different file; download {WEIGHTS_URL} again.")
    if check_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digest = digest.hexdigest()
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise ValueError(f"Inception weights {path} has sha256 {digest[:8]}..., not {WEIGHTS_SHA256_PREFIX}... "
                             f"as its name {WEIGHTS_FILENAME} promises: the file is corrupt or a different one; "
                             f"download {WEIGHTS_URL} again (or pass check_hash=False if you trust it).")
    return variables_from_state_dict(read_torch_state_dict(path))
