r"""Quickstart: EDM on the built-in synthetic shapes, offline, on a laptop CPU in about five minutes.

Run:
  python main.py --config=configs/quickstart.py --mode=train                 # workdir runs/quickstart
The CIFAR-10 preset's recipe (configs/cifar10_edm.py: EDM preconditioning and loss, Adam with lr ramp-up,
EMA with ramp-up, checkpoints, sample grids; the same fields), only smaller: 16x16 class-conditional
images of four shapes (disc, square, ring, stripes: `edm_jax.data.synthetic_dataset`), a 0.32M-parameter
SongUNet, no augmentation, short ramps, 1000 steps of batch 32 (32 kimg).

Expected (measured on 2 CPU cores): 4m53s wall in all, of which ~1 min is compilation (step, sampler);
then ~150 img/s; the loss goes 1.36 -> 0.23. The final grid runs/quickstart/samples/
samples-000032kimg-step0001000.png (8x8, class = column mod 4) shows bright shapes on dark backgrounds:
columns of discs, squares, rings (some still open, C-shaped) and clean horizontal or vertical stripes;
colours are sometimes two-tone where the data's are one hue. Re-running resumes (once done, it says
there is nothing to do); delete runs/quickstart to start over.
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.path = config_dict.placeholder(str)
    c.data.tfds_name = config_dict.placeholder(str)
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = config_dict.placeholder(str)
    c.data.tfds_download = False
    c.data.synthetic = ml_collections.ConfigDict(dict(n=4096, resolution=16, channels=3, num_classes=4, seed=0))
    c.data.max_size = config_dict.placeholder(int)
    c.data.use_labels = True
    c.data.xflip = False

    c.model = ml_collections.ConfigDict()
    c.model.name = "SongUNet"
    c.model.model_channels = 16
    c.model.channel_mult = (1, 2, 2)
    c.model.channel_mult_emb = 4
    c.model.num_blocks = 1
    c.model.attn_resolutions = (8,)
    c.model.dropout = 0.0
    c.model.label_dropout = 0.0
    c.model.embedding_type = "positional"
    c.model.channel_mult_noise = 1
    c.model.encoder_type = "standard"
    c.model.decoder_type = "standard"
    c.model.resample_filter = (1, 1)
    c.model.dtype = "float32"

    c.precond = ml_collections.ConfigDict()
    c.precond.kind = "edm"
    c.precond.kwargs = ml_collections.ConfigDict(dict(sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5))
    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "edm"
    c.loss.kwargs = ml_collections.ConfigDict(dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5))

    c.augment = ml_collections.ConfigDict()
    c.augment.p = 0.0                                  # off: small data is not the point here
    c.augment.xflip = 1e8
    c.augment.yflip = 1.0
    c.augment.scale = 1.0
    c.augment.rotate_frac = 1.0
    c.augment.aniso = 1.0
    c.augment.translate_frac = 1.0
    c.augment.scale_std = 0.2
    c.augment.aniso_std = 0.2
    c.augment.translate_frac_std = 0.125

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32
    c.train.batch_per_device = config_dict.placeholder(int)
    c.train.lr = 2e-3
    c.train.lr_rampup_kimg = 10.0
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.ema_halflife_kimg = 5.0
    c.train.ema_rampup_ratio = 0.05
    c.train.loss_scaling = 1.0
    c.train.total_kimg = 32.0
    c.train.tick_kimg = 4.0
    c.train.snapshot_ticks = 2
    c.train.state_dump_ticks = 0                       # no checkpoints kept forever
    c.train.max_to_keep = 2
    c.train.async_checkpointing = True
    c.train.seed = 0
    c.train.matmul_precision = "default"
    c.train.compilation_cache_dir = config_dict.placeholder(str)

    c.sample = ml_collections.ConfigDict()
    c.sample.num_images = 64
    c.sample.seed = 0
    c.sample.num_steps = 18
    c.sample.sigma_min = 0.002
    c.sample.sigma_max = 80.0
    c.sample.rho = 7.0
    return c
