"""Building blocks shared by SongUNet and DhariwalUNet (reference: NVlabs/edm `training/networks.py`).

Everything is NHWC. Parameters are created in float32; a layer's `dtype` is its *compute* dtype
(float32 or bfloat16). GroupNorm statistics and the attention softmax always run in float32 and are
cast back to the compute dtype afterwards, as the reference does under fp16.

Leaf names follow flax (`kernel`, `bias`, `scale`); conv kernels are HWIO, linear kernels [in, out].
The converter (`edm_jax.convert`) maps the reference's `weight` onto `kernel`/`scale` and transposes.
"""

from typing import Any, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any


# ---------------------------------------------------------------------------------------------------
# Initialisation (reference `weight_init`, with explicit fans so that biases can use the weight's fans).

class Init(NamedTuple):
    """How a Linear/Conv2d layer is initialised: `weight_init(mode) * weight`, `weight_init(mode) * bias`."""
    mode: str = "kaiming_normal"
    weight: float = 1.0
    bias: float = 0.0


def weight_init(mode, fan_in, fan_out, gain=1.0):
    """A flax initializer drawing `gain * weight_init(shape, mode, fan_in, fan_out)` (reference §1.1).

    The fans are given explicitly (conv: in·k·k and out·k·k) rather than read from the shape, because
    the reference draws biases with the same mode and fans as the weights.
    """
    if mode not in ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"):
        raise ValueError(f'Invalid init mode "{mode}"; expected xavier_/kaiming_ uniform/normal.')

    def init(key, shape, dtype=jnp.float32):
        if gain == 0:  # the reference's init_weight=0: exact zeros, no draw needed
            return jnp.zeros(shape, dtype)
        if mode.endswith("uniform"):
            z = jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
        else:
            z = jax.random.normal(key, shape, dtype)
        var = {"xavier_uniform": 6 / (fan_in + fan_out), "xavier_normal": 2 / (fan_in + fan_out),
               "kaiming_uniform": 3 / fan_in, "kaiming_normal": 1 / fan_in}[mode]
        return (gain * np.sqrt(var)) * z
    return init


# ---------------------------------------------------------------------------------------------------
# Resampling. The reference uses depthwise (transposed) convs with f = outer(f1, f1) / sum(f1)^2.
# That filter is separable, so we apply the 1-D filter f1/sum(f1) along H and then W with strided
# slices: exactly the same function, but plain elementwise work that XLA fuses (depthwise convs
# are slow on GPUs). [1,1] gives 2x2 average pooling (down) and nearest-neighbour (up).

def _filter_1d(resample_filter):
    f = np.asarray(resample_filter, np.float64)
    return f / f.sum()


def _pad_axis(x, axis, lo, hi, interior=0):
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (lo, hi, interior)
    return lax.pad(x, jnp.zeros((), x.dtype), config)


def _correlate_axis(x, taps, axis, stride):
    """sum_j taps[j] * x[stride*i + j] along `axis` (a valid correlation), accumulated in float32."""
    n_out = (x.shape[axis] - len(taps)) // stride + 1
    y = 0.0
    for j, t in enumerate(taps):
        part = lax.slice_in_dim(x, j, j + stride * (n_out - 1) + 1, stride=stride, axis=axis)
        y = y + float(t) * part.astype(jnp.float32)
    return y.astype(x.dtype)


def downsample2d(x, resample_filter, pad):
    """Reference `conv2d(x, f, groups=C, stride=2, padding=pad)` on NHWC `x`."""
    f = _filter_1d(resample_filter)
    for axis in (1, 2):
        x = _correlate_axis(_pad_axis(x, axis, pad, pad), f, axis, stride=2)
    return x


def upsample2d(x, resample_filter, pad):
    """Reference `conv_transpose2d(x, 4 f, groups=C, stride=2, padding=pad)` on NHWC `x`.

    A transposed conv is a correlation of the zero-dilated input (interior padding 1) padded by
    k-1-pad with the flipped filter; the gain 4 = 2 per axis keeps the mean unchanged.
    """
    f = 2 * _filter_1d(resample_filter)[::-1]
    edge = len(f) - 1 - pad
    for axis in (1, 2):
        x = _correlate_axis(_pad_axis(x, axis, edge, edge, interior=1), f, axis, stride=1)
    return x


# ---------------------------------------------------------------------------------------------------
# Layers.

class Linear(nn.Module):
    """Fully connected layer, reference `Linear`: kernel [in, out] (= reference weight transposed)."""
    features: int
    use_bias: bool = True
    init: Init = Init()
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in, fan_out = x.shape[-1], self.features
        w = self.param("kernel", weight_init(self.init.mode, fan_in, fan_out, self.init.weight),
                       (fan_in, fan_out))
        x = x.astype(self.dtype) @ w.astype(self.dtype)
        if self.use_bias:
            b = self.param("bias", weight_init(self.init.mode, fan_in, fan_out, self.init.bias),
                           (fan_out,))
            x = x + b.astype(self.dtype)
        return x


class Conv2d(nn.Module):
    """Reference `Conv2d`: `kernel`x`kernel` conv (HWIO) with optional 2x up/down-sampling.

    `kernel=0` is a pure resampling layer without parameters. Unfused: resample first, then the conv
    runs at the new resolution. `fused_resample` (used only by NCSN++'s `aux_residual` for down):
    conv with padding w_pad+f_pad, then blur-and-subsample without padding.
    """
    features: int
    kernel: int
    use_bias: bool = True
    up: bool = False
    down: bool = False
    resample_filter: Sequence[int] = (1, 1)
    fused_resample: bool = False
    init: Init = Init()
    dtype: Dtype = jnp.float32

    def _conv(self, x, w, pad):
        return lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @nn.compact
    def __call__(self, x):
        assert not (self.up and self.down)
        x = x.astype(self.dtype)
        c_in, k = x.shape[-1], self.kernel
        w = b = None
        if k:
            fan_in, fan_out = c_in * k * k, self.features * k * k
            w = self.param("kernel", weight_init(self.init.mode, fan_in, fan_out, self.init.weight),
                           (k, k, c_in, self.features)).astype(self.dtype)
            if self.use_bias:
                b = self.param("bias", weight_init(self.init.mode, fan_in, fan_out, self.init.bias),
                               (self.features,)).astype(self.dtype)
        w_pad = k // 2
        f_pad = (len(self.resample_filter) - 1) // 2 if (self.up or self.down) else 0

        if self.fused_resample and self.up and w is not None:
            x = upsample2d(x, self.resample_filter, max(f_pad - w_pad, 0))
            x = self._conv(x, w, max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = self._conv(x, w, w_pad + f_pad)
            x = downsample2d(x, self.resample_filter, 0)
        else:
            if self.up:
                x = upsample2d(x, self.resample_filter, f_pad)
            if self.down:
                x = downsample2d(x, self.resample_filter, f_pad)
            if w is not None:
                x = self._conv(x, w, w_pad)
        if b is not None:
            x = x + b
        return x


class GroupNorm(nn.Module):
    """Reference `GroupNorm`: groups = min(num_groups, C // min_channels_per_group); stats in float32."""
    num_groups: int = 32
    min_channels_per_group: int = 4
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        groups = min(self.num_groups, c // self.min_channels_per_group)
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        x32 = x.astype(jnp.float32)
        mean = _group_mean(x32, groups)
        centred = x32 - mean
        var = _group_mean(jnp.square(centred), groups)  # two passes and biased, as torch.group_norm
        y = centred * lax.rsqrt(var + self.eps)
        return (y * scale + bias).astype(self.dtype)


def _group_mean(x, groups):
    """Mean of `x` [N, *spatial, C] over its spatial positions and each group's C/G channels, broadcast back
    to every channel of the group: [N, 1, ..., 1, C].

    Summed over the spatial axes first (channels kept innermost), then over each group's channels: the same
    sum as one reduction over [N, *spatial, G, C/G], which XLA:CPU runs slowly because it also reduces the
    innermost axis (batch 64 at 16x16x16: the GroupNorm forward 0.9 -> 0.5 ms, its gradient 8 -> 5 ms). The
    summation order moves results by rounding only (~1e-6).
    """
    n, c = x.shape[0], x.shape[-1]
    spatial = tuple(range(1, x.ndim - 1))
    count = np.prod([x.shape[a] for a in spatial]) * (c // groups)
    sums = x.sum(spatial).reshape(n, groups, c // groups).sum(-1, keepdims=True)  # [N, G, 1]
    return jnp.broadcast_to(sums / count, (n, groups, c // groups)).reshape(n, *(1,) * len(spatial), c)


def attention(qkv, num_heads):
    """Self-attention of the reference's UNetBlock on an NHWC `qkv` [N, H, W, 3C] -> [N, H, W, C].

    The reference reshapes qkv (NCHW) to [N*heads, C/heads, 3, HW], so the channel index is
    head*(3*C/heads) + c*3 + {0: q, 1: k, 2: v}: q, k, v are *interleaved* within each head block.
    Logits and softmax in float32 with scale 1/sqrt(C/heads); weights cast back before the value sum.
    """
    n, h, w, c3 = qkv.shape
    c = c3 // 3
    ch = c // num_heads
    qkv = qkv.reshape(n, h * w, num_heads, ch, 3)
    q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
    logits = jnp.einsum("nqhc,nkhc->nhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * (1 / np.sqrt(ch)), axis=-1).astype(qkv.dtype)
    out = jnp.einsum("nhqk,nkhc->nqhc", weights, v)
    return out.reshape(n, h, w, c)


class UNetBlock(nn.Module):
    """Reference `UNetBlock`: the union of DDPM++, NCSN++ and ADM residual blocks (+ optional attention).

    Call with `x` [N, H, W, C_in] (compute dtype) and `emb` [N, emb_channels] (float32, already silu'd).
    Sub-module names are the reference's: norm0, conv0, affine, norm1, conv1, skip, norm2, qkv, proj.
    """
    out_channels: int
    up: bool = False
    down: bool = False
    attention: bool = False
    num_heads: Optional[int] = None
    channels_per_head: int = 64
    dropout: float = 0.0
    skip_scale: float = 1.0
    eps: float = 1e-5
    resample_filter: Sequence[int] = (1, 1)
    resample_proj: bool = False
    adaptive_scale: bool = True
    init: Init = Init()
    init_zero: Init = Init(weight=0.0)
    init_attn: Optional[Init] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, train=False):
        c_in, c_out, dt = x.shape[-1], self.out_channels, self.dtype
        heads = 0 if not self.attention else (
            self.num_heads if self.num_heads is not None else c_out // self.channels_per_head)
        resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)

        orig = x
        x = GroupNorm(eps=self.eps, dtype=dt, name="norm0")(x)
        x = Conv2d(c_out, 3, init=self.init, dtype=dt, name="conv0", **resample)(nn.silu(x))
        # The reference computes the affine projection from the float32 embedding, then casts.
        params = Linear(c_out * (2 if self.adaptive_scale else 1), init=self.init, name="affine")(emb)
        params = params.astype(dt)[:, None, None, :]
        if self.adaptive_scale:  # ADM: first half is the scale, second half the shift
            scale, shift = jnp.split(params, 2, axis=-1)
            x = nn.silu(shift + GroupNorm(eps=self.eps, dtype=dt, name="norm1")(x) * (scale + 1))
        else:  # DDPM++/NCSN++: the embedding is added before the norm
            x = nn.silu(GroupNorm(eps=self.eps, dtype=dt, name="norm1")(x + params))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = Conv2d(c_out, 3, init=self.init_zero, dtype=dt, name="conv1")(x)

        if c_out != c_in or self.up or self.down:
            kernel = 1 if (self.resample_proj or c_out != c_in) else 0
            orig = Conv2d(c_out, kernel, init=self.init, dtype=dt, name="skip", **resample)(orig)
        x = (x + orig) * self.skip_scale

        if heads:
            qkv = GroupNorm(eps=self.eps, dtype=dt, name="norm2")(x)
            qkv = Conv2d(c_out * 3, 1, init=self.init_attn or self.init, dtype=dt, name="qkv")(qkv)
            a = attention(qkv, heads)
            x = (Conv2d(c_out, 1, init=self.init_zero, dtype=dt, name="proj")(a) + x) * self.skip_scale
        return x


# ---------------------------------------------------------------------------------------------------
# Noise-level embeddings (float32 in, float32 out).

def positional_embedding(x, num_channels, max_positions=10000, endpoint=False):
    """Reference `PositionalEmbedding`: [cos(x f), sin(x f)], f_i = (1/max_positions)^(i/(C/2 - endpoint))."""
    half = num_channels // 2
    freqs = np.arange(half, dtype=np.float32) / np.float32(half - (1 if endpoint else 0))
    freqs = jnp.asarray((np.float32(1) / np.float32(max_positions)) ** freqs, jnp.float32)
    x = jnp.outer(x.astype(jnp.float32), freqs)
    return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class FourierEmbedding(nn.Module):
    """Reference `FourierEmbedding` (NCSN++): [cos(2π f x), sin(2π f x)] with fixed random f.

    `freqs` ~ N(0, 1)·scale is not trained: it lives in the `buffers` collection, drawn from the
    init rng (so every device gets the same values) or copied from a checkpoint.
    """
    num_channels: int
    scale: float = 16.0

    @nn.compact
    def __call__(self, x):
        freqs = self.variable(
            "buffers", "freqs",
            lambda: jax.random.normal(self.make_rng("params"), (self.num_channels // 2,)) * self.scale)
        x = jnp.outer(x.astype(jnp.float32), (2 * np.pi) * freqs.value.astype(jnp.float32))
        return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)
