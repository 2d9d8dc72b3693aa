r"""Quickstart: EDM on the built-in synthetic shapes, offline, on a laptop CPU in about four minutes.

Run:
  python main.py --config=configs/quickstart.py --mode=train                 # workdir runs/quickstart
The CIFAR-10 preset's recipe (configs/cifar10_edm.py: EDM preconditioning and loss, Adam with lr ramp-up,
EMA with ramp-up, checkpoints, sample grids; the same fields), only smaller: 16x16 class-conditional
images of four shapes (disc, square, ring, stripes: `edm_jax.data.synthetic_dataset`), a 0.32M-parameter
SongUNet, no augmentation, short ramps, 1000 steps of batch 32 (32 kimg).

Expected (measured on 2 quiet CPU cores): 2m26s wall in all, of which ~26 s is compilation (step,
sampler; 2m02s when the persistent compilation cache already holds them); then ~325 img/s; the loss goes
1.36 -> 0.23. The final grid runs/quickstart/samples/
samples-000032kimg-step0001000.png (8x8: seeds 0-63, each seed's class drawn as --mode=sample draws it, so
cell s is `--mode=sample --seeds=s` of that snapshot) shows bright shapes on dark backgrounds: discs,
squares, rings (some still open, C-shaped) and clean horizontal or vertical stripes;
colours are sometimes two-tone where the data's are one hue. Re-running resumes (once done, it says
there is nothing to do); delete runs/quickstart to start over.
"""

import ml_collections

from configs.cifar10_edm import get_config as cifar10_config


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/quickstart.py takes no argument, got {arg!r}; drop the ':{arg}'")
    c = cifar10_config("cond")  # the CIFAR-10 recipe and schema; only these values change
    c.data.source = "synthetic"
    c.data.tfds_name = None
    c.data.synthetic = ml_collections.ConfigDict(dict(n=4096, resolution=16, channels=3, num_classes=4, seed=0))

    c.model.model_channels = 16
    c.model.channel_mult = (1, 2, 2)
    c.model.num_blocks = 1
    c.model.attn_resolutions = (8,)
    c.model.dropout = 0.0

    c.augment.p = 0.0                                  # off: small data is not the point here

    c.train.batch_size = 32
    c.train.lr = 2e-3
    c.train.lr_rampup_kimg = 10.0
    c.train.ema_halflife_kimg = 5.0
    c.train.total_kimg = 32.0
    c.train.tick_kimg = 4.0
    c.train.snapshot_ticks = 2
    c.train.state_dump_ticks = 0                       # no checkpoints kept forever
    c.train.max_to_keep = 2
    c.train.matmul_precision = "default"
    return c
