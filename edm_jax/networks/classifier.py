"""EncoderUNet: ADM's noise-aware classifier (Dhariwal & Nichol 2021, Section 4 and Appendix; guided-diffusion
`EncoderUNetModel` with `pool='attention'`), built from the same blocks as `DhariwalUNet`. NHWC, flax.linen.

The network is the encoder half of the ADM U-Net — input conv, `num_blocks` residual blocks per level with
attention at `attn_resolutions`, a residual down-sampling block between levels — followed by ADM's middle
block (residual block with attention, residual block), GroupNorm + SiLU and the attention-pooling head
`AttentionPool2d` (adapted by ADM from CLIP): the mean of the spatial tokens is prepended as an extra
token, a learned positional embedding is added, and the mean token's multi-head attention over all
tokens is projected to the class logits. The noise level enters through the same embedding as the U-Net
(positional embedding of c_noise, two linear layers); there is no class-label input.

With guided-diffusion's flags `use_scale_shift_norm=True, resblock_updown=True, num_head_channels=64`
the blocks are the EDM `UNetBlock`s one for one (same parameter count; tests/test_guidance.py checks it).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.networks.layers import Conv2d, GroupNorm, Init, Linear, UNetBlock, positional_embedding

__all__ = ["EncoderUNet", "AttentionPool2d"]


class AttentionPool2d(nn.Module):
    """guided-diffusion `AttentionPool2d`: [N, H, W, C] -> [N, out_features].

    Tokens t_0 = mean_{hw} x_hw, t_{1+h·W+w} = x_hw, plus a learned positional embedding [HW + 1, C]
    (init N(0, 1/C)); qkv = t W_qkv split into contiguous thirds q | k | v (ADM's `QKVAttention` order),
    heads of `channels_per_head` channels; out = c_proj(softmax(q_0 kᵀ / √d) v). Softmax in float32.
    """
    out_features: int
    channels_per_head: int = 64
    kernel_init: Init = Init()  # not `init`, which would shadow Module.init
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        if c % self.channels_per_head:
            raise ValueError(f"AttentionPool2d: {c} channels are not a multiple of channels_per_head="
                             f"{self.channels_per_head}")
        heads, d = c // self.channels_per_head, self.channels_per_head
        tokens = x.reshape(n, h * w, c)
        mean = jnp.mean(tokens.astype(jnp.float32), axis=1, keepdims=True).astype(tokens.dtype)
        tokens = jnp.concatenate([mean, tokens], axis=1)  # [N, HW + 1, C]
        pos = self.param("positional_embedding", lambda k, s: jax.random.normal(k, s) / np.sqrt(c),
                         (h * w + 1, c))
        tokens = tokens + pos.astype(tokens.dtype)
        q, k, v = jnp.split(Linear(3 * c, init=self.kernel_init, dtype=self.dtype, name="qkv_proj")(tokens), 3, axis=-1)
        q = q[:, :1].reshape(n, 1, heads, d)  # only the mean token's output is kept
        k, v = k.reshape(n, h * w + 1, heads, d), v.reshape(n, h * w + 1, heads, d)
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (1 / np.sqrt(d)), axis=-1).astype(v.dtype)
        pooled = jnp.einsum("nhqk,nkhd->nqhd", weights, v).reshape(n, c)
        return Linear(self.out_features, init=self.kernel_init, dtype=self.dtype, name="c_proj")(pooled)


class EncoderUNet(nn.Module):
    """ADM classifier F(x; c_noise) -> logits [N, num_classes] float32.

    Keywords as `DhariwalUNet` where they exist; defaults are guided-diffusion's ImageNet-64 classifier
    (`--classifier_width 128 --classifier_depth 4 --classifier_attention_resolutions 32,16,8`, channel
    multipliers (1, 2, 3, 4), 64 channels per head, no dropout). `dtype` is the compute dtype (parameters
    are float32; the embedding, GroupNorm statistics, softmax and logits are float32).

    Call: `apply(variables, x, noise_labels, train=False, rngs={'dropout': key})`, x [N, H, W, in_channels]
    with H = W = img_resolution, noise_labels [N] (c_noise of a preconditioning; see
    `edm_jax.guidance.classifier_log_prob`). Dropout only when `train`.
    """
    img_resolution: int
    in_channels: int
    num_classes: int
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.0
    channels_per_head: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, noise_labels, train=False):
        if x.shape[1:] != (self.img_resolution, self.img_resolution, self.in_channels):
            raise ValueError(f"EncoderUNet expects x of shape [N, {self.img_resolution}, {self.img_resolution}, "
                             f"{self.in_channels}] (NHWC), got {tuple(x.shape)}")
        dt = self.dtype
        init = Init("kaiming_uniform", weight=np.sqrt(1 / 3), bias=np.sqrt(1 / 3))  # torch defaults
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)  # ADM's zero_module layers
        block = dict(channels_per_head=self.channels_per_head, dropout=self.dropout, init=init,
                     init_zero=init_zero, dtype=dt)

        # Noise embedding, as DhariwalUNet's mapping network (float32).
        emb_channels = self.model_channels * self.channel_mult_emb
        emb = positional_embedding(noise_labels, self.model_channels)
        emb = nn.silu(Linear(emb_channels, init=init, name="map_layer0")(emb))
        emb = nn.silu(Linear(emb_channels, init=init, name="map_layer1")(emb))

        # Encoder: DhariwalUNet's, block for block (same names).
        x = x.astype(dt)
        cout = self.model_channels * self.channel_mult[0]
        res = self.img_resolution
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            tag = f"enc_{res}x{res}"
            if level == 0:
                x = Conv2d(cout, 3, init=init, dtype=dt, name=f"{tag}_conv")(x)
            else:
                x = UNetBlock(cout, down=True, **block, name=f"{tag}_down")(x, emb, train)
            for idx in range(self.num_blocks):
                cout = self.model_channels * mult
                x = UNetBlock(cout, attention=res in self.attn_resolutions, **block,
                              name=f"{tag}_block{idx}")(x, emb, train)

        # ADM's middle block (DhariwalUNet's decoder entry `in0`, `in1`), then the attention-pooling head.
        x = UNetBlock(cout, attention=True, **block, name=f"mid_{res}x{res}_in0")(x, emb, train)
        x = UNetBlock(cout, **block, name=f"mid_{res}x{res}_in1")(x, emb, train)
        x = nn.silu(GroupNorm(eps=1e-5, dtype=dt, name="out_norm")(x))
        logits = AttentionPool2d(self.num_classes, self.channels_per_head, kernel_init=init, dtype=dt,
                                 name="out_pool")(x)
        return logits.astype(jnp.float32)
