"""The EDM networks in flax.linen, NHWC: SongUNet (DDPM++ / NCSN++), DhariwalUNet (ADM), and ADM's
noise-aware classifier EncoderUNet (for classifier guidance, `edm_jax.guidance`).

Both are ports of NVlabs/edm `training/networks.py` with the reference's constructor keywords and
defaults, plus `dtype` (compute dtype, float32 or bfloat16; parameters stay float32).

    net = SongUNet(img_resolution=32, in_channels=3, out_channels=3, channel_mult=(2, 2, 2))
    variables = net.init({"params": key}, x, noise_labels)      # {'params': ...} (+ 'buffers' for NCSN++)
    y = net.apply(variables, x, noise_labels, class_labels, augment_labels,
                  train=True, rngs={"dropout": dropout_key})     # [N, H, W, out_channels]

The `buffers` collection holds non-trainable state (the NCSN++ Fourier frequencies); pass it to
`apply` unchanged and keep it out of the optimizer. Reference weights: `edm_jax.convert`.
"""

from edm_jax.networks.classifier import EncoderUNet
from edm_jax.networks.dhariwal_unet import DhariwalUNet
from edm_jax.networks.layers import UNetBlock
from edm_jax.networks.song_unet import SongUNet

__all__ = ["SongUNet", "DhariwalUNet", "EncoderUNet", "UNetBlock"]
