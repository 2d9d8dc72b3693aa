"""DhariwalUNet: the ADM architecture (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis"), as reimplemented by EDM (NVlabs/edm `training/networks.py`, class `DhariwalUNet`;
EDM paper Appendix F.2). NHWC, flax.linen.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.networks.layers import Conv2d, GroupNorm, Init, Linear, UNetBlock, positional_embedding


class DhariwalUNet(nn.Module):
    """ADM U-Net F(x; c_noise, class_labels, augment_labels).

    Constructor keywords and defaults are the reference's, plus `dtype` (compute dtype; parameters
    are always float32). Variables: `params` only.

    Call: `apply(variables, x, noise_labels, class_labels=None, augment_labels=None, train=False,
    rngs={'dropout': key})` with x [N, H, W, in_channels], noise_labels [N], class_labels
    [N, label_dim] (zeros if None), augment_labels [N, augment_dim] (None = zeros). Returns
    [N, H, W, out_channels] in the compute dtype. Dropout and label dropout only when `train`.
    """
    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 192
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    channel_mult_emb: int = 4
    num_blocks: int = 3
    attn_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.10
    label_dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        n, dt = x.shape[0], self.dtype
        emb_channels = self.model_channels * self.channel_mult_emb
        # PyTorch-default-like U(±1/sqrt(fan_in)) for weights and biases; exact zeros for "zero" layers.
        init = Init("kaiming_uniform", weight=np.sqrt(1 / 3), bias=np.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
        block = dict(channels_per_head=64, dropout=self.dropout, init=init, init_zero=init_zero, dtype=dt)

        # Mapping network in float32. Positional embedding without endpoint and without the
        # sin/cos swap; labels are not scaled (their weights are N(0, 1) instead).
        emb = positional_embedding(noise_labels, self.model_channels)
        if self.augment_dim:
            aug = (jnp.zeros((n, self.augment_dim), jnp.float32) if augment_labels is None
                   else augment_labels.astype(jnp.float32))
            emb = emb + Linear(self.model_channels, use_bias=False, init=init_zero, name="map_augment")(aug)
        emb = nn.silu(Linear(emb_channels, init=init, name="map_layer0")(emb))
        emb = Linear(emb_channels, init=init, name="map_layer1")(emb)
        if self.label_dim:
            labels = (jnp.zeros((n, self.label_dim), jnp.float32) if class_labels is None
                      else class_labels.astype(jnp.float32))
            if train and self.label_dropout:
                keep = jax.random.uniform(self.make_rng("dropout"), (n, 1)) >= self.label_dropout
                labels = labels * keep
            label_init = Init("kaiming_normal", weight=np.sqrt(self.label_dim))
            emb = emb + Linear(emb_channels, use_bias=False, init=label_init, name="map_label")(labels)
        emb = nn.silu(emb)

        # Encoder: every output (conv, down blocks, blocks) is a skip.
        x = x.astype(dt)
        skips = []
        cout = self.in_channels
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            tag = f"enc_{res}x{res}"
            if level == 0:
                cout = self.model_channels * mult
                x = Conv2d(cout, 3, init=init, dtype=dt, name=f"{tag}_conv")(x)
            else:
                x = UNetBlock(cout, down=True, **block, name=f"{tag}_down")(x, emb, train)
            skips.append(x)
            for idx in range(self.num_blocks):
                cout = self.model_channels * mult
                x = UNetBlock(cout, attention=res in self.attn_resolutions, **block,
                              name=f"{tag}_block{idx}")(x, emb, train)
                skips.append(x)

        # Decoder.
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            res = self.img_resolution >> level
            tag = f"dec_{res}x{res}"
            if level == len(self.channel_mult) - 1:
                x = UNetBlock(cout, attention=True, **block, name=f"{tag}_in0")(x, emb, train)
                x = UNetBlock(cout, **block, name=f"{tag}_in1")(x, emb, train)
            else:
                x = UNetBlock(cout, up=True, **block, name=f"{tag}_up")(x, emb, train)
            for idx in range(self.num_blocks + 1):
                cout = self.model_channels * mult
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = UNetBlock(cout, attention=res in self.attn_resolutions, **block,
                              name=f"{tag}_block{idx}")(x, emb, train)
        x = GroupNorm(eps=1e-5, dtype=dt, name="out_norm")(x)
        return Conv2d(self.out_channels, 3, init=init_zero, dtype=dt, name="out_conv")(nn.silu(x))
