"""SongUNet: the DDPM++ and NCSN++ architectures (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations"), as reimplemented by EDM (NVlabs/edm `training/networks.py`,
class `SongUNet`; EDM paper Appendix F.2). NHWC, flax.linen.

Preset settings (EDM Table 7 / `train.py`):
  DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
          resample_filter=(1, 1)
  NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
          resample_filter=(1, 3, 3, 1)
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.networks.layers import (Conv2d, FourierEmbedding, GroupNorm, Init, Linear, UNetBlock,
                                     positional_embedding)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net F(x; c_noise, class_labels, augment_labels).

    Constructor keywords and defaults are the reference's, plus `dtype` (compute dtype; parameters
    are always float32). Variables: `params`, and for embedding_type='fourier' also `buffers`
    (the fixed Fourier frequencies `map_noise/freqs`).

    Call: `apply(variables, x, noise_labels, class_labels=None, augment_labels=None, train=False,
    rngs={'dropout': key})` with x [N, H, W, in_channels], noise_labels [N], class_labels
    [N, label_dim] (zeros if None), augment_labels [N, augment_dim] (None = zeros). Returns
    [N, H, W, out_channels] in the compute dtype. Dropout and label dropout only when `train`.
    Sub-module names mirror the reference's state dict: `enc.16x16_block0` -> `enc_16x16_block0`.
    """
    img_resolution: int
    in_channels: int
    out_channels: int
    label_dim: int = 0
    augment_dim: int = 0
    model_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    channel_mult_emb: int = 4
    num_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.10
    label_dropout: float = 0.0
    embedding_type: str = "positional"
    channel_mult_noise: int = 1
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: Sequence[int] = (1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        if self.embedding_type not in ("fourier", "positional"):
            raise ValueError("SongUNet: embedding_type must be 'fourier' or 'positional', "
                             f"got {self.embedding_type!r}.")
        if self.encoder_type not in ("standard", "skip", "residual"):
            raise ValueError("SongUNet: encoder_type must be 'standard', 'skip' or 'residual', "
                             f"got {self.encoder_type!r}.")
        if self.decoder_type not in ("standard", "skip"):
            raise ValueError("SongUNet: decoder_type must be 'standard' or 'skip', "
                             f"got {self.decoder_type!r}.")
        n, dt, f = x.shape[0], self.dtype, tuple(self.resample_filter)
        emb_channels = self.model_channels * self.channel_mult_emb
        noise_channels = self.model_channels * self.channel_mult_noise
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)  # "zero" layers are tiny, not exactly zero
        init_attn = Init("xavier_uniform", weight=np.sqrt(0.2))
        block = dict(num_heads=1, dropout=self.dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                     resample_filter=f, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn, dtype=dt)

        # Mapping network, float32 as in the reference (the noise labels reach it in float32).
        if self.embedding_type == "positional":
            emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
        else:
            emb = FourierEmbedding(noise_channels, name="map_noise")(noise_labels)
        emb = jnp.concatenate(jnp.split(emb, 2, axis=1)[::-1], axis=1)  # swap halves: [sin, cos]
        if self.label_dim:
            labels = (jnp.zeros((n, self.label_dim), jnp.float32) if class_labels is None
                      else class_labels.astype(jnp.float32))
            if train and self.label_dropout:
                keep = jax.random.uniform(self.make_rng("dropout"), (n, 1)) >= self.label_dropout
                labels = labels * keep
            emb = emb + Linear(noise_channels, init=init, name="map_label")(labels * np.sqrt(self.label_dim))
        if self.augment_dim:
            # No augment labels (sampling) is the same as zeros; always apply so init creates the layer.
            aug = (jnp.zeros((n, self.augment_dim), jnp.float32) if augment_labels is None
                   else augment_labels.astype(jnp.float32))
            emb = emb + Linear(noise_channels, use_bias=False, init=init, name="map_augment")(aug)
        emb = nn.silu(Linear(emb_channels, init=init, name="map_layer0")(emb))
        emb = nn.silu(Linear(emb_channels, init=init, name="map_layer1")(emb))

        # Encoder. Every non-aux output is kept as a skip; aux carries the input image pyramid.
        x = x.astype(dt)
        skips, aux = [], x
        cout = self.in_channels
        for level, mult in enumerate(self.channel_mult):
            res = self.img_resolution >> level
            tag = f"enc_{res}x{res}"
            if level == 0:
                cout = self.model_channels  # not model_channels * mult[0], as in the reference
                x = Conv2d(cout, 3, init=init, dtype=dt, name=f"{tag}_conv")(x)
                skips.append(x)
            else:
                x = UNetBlock(cout, down=True, **block, name=f"{tag}_down")(x, emb, train)
                skips.append(x)
                if self.encoder_type == "skip":
                    aux = Conv2d(aux.shape[-1], 0, down=True, resample_filter=f, dtype=dt,
                                 name=f"{tag}_aux_down")(aux)
                    x = skips[-1] = x + Conv2d(cout, 1, init=init, dtype=dt, name=f"{tag}_aux_skip")(aux)
                if self.encoder_type == "residual":
                    res_conv = Conv2d(cout, 3, down=True, resample_filter=f, fused_resample=True,
                                      init=init, dtype=dt, name=f"{tag}_aux_residual")
                    x = skips[-1] = aux = (x + res_conv(aux)) / np.sqrt(2)
            for idx in range(self.num_blocks):
                cout = self.model_channels * mult
                x = UNetBlock(cout, attention=res in self.attn_resolutions, **block,
                              name=f"{tag}_block{idx}")(x, emb, train)
                skips.append(x)

        # Decoder. Attention only in the last block of a level (and in the `in0` block).
        aux = None
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
                attn = idx == self.num_blocks and res in self.attn_resolutions
                x = UNetBlock(cout, attention=attn, **block, name=f"{tag}_block{idx}")(x, emb, train)
            if self.decoder_type == "skip" or level == 0:
                if self.decoder_type == "skip" and level < len(self.channel_mult) - 1:
                    aux = Conv2d(self.out_channels, 0, up=True, resample_filter=f, dtype=dt,
                                 name=f"{tag}_aux_up")(aux)
                tmp = GroupNorm(eps=1e-6, dtype=dt, name=f"{tag}_aux_norm")(x)
                tmp = Conv2d(self.out_channels, 3, init=init_zero, dtype=dt,
                             name=f"{tag}_aux_conv")(nn.silu(tmp))
                aux = tmp if aux is None else tmp + aux
        return aux
