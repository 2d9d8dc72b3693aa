r"""CIFAR-10 32x32, DDPM++ network with EDM preconditioning and loss: the paper's CIFAR-10 preset.

Karras et al. 2022, Table 2 / Appendix F.1 (Table 7); NVlabs/edm `train.py` with `--arch=ddpmpp
--precond=edm` and its defaults. The released checkpoints edm-cifar10-32x32-{uncond,cond}-vp were trained
with exactly these values on 8 V100s for about 2 days (200 Mimg, 390,625 steps of batch 512).

Run (unconditional / class-conditional):
  python main.py --config=configs/cifar10_edm.py --mode=train                # workdir runs/cifar10_edm
  python main.py --config=configs/cifar10_edm.py:cond --mode=train           # workdir runs/cifar10_edm_cond
Data: TFDS `cifar10` by default (prepared under data.tfds_data_dir or ~/tensorflow_datasets); to train on a
reference-format zip instead (e.g. what the reference's dataset_tool.py writes):
  python main.py --config=configs/cifar10_edm.py --config.data.path=../shared/data/cifar10-jpeg-train.zip
  (note: that zip holds JPEG-compressed images; the paper trained on the lossless PNG zip.)
Re-running the same command resumes from the newest checkpoint. On a smaller machine keep the global
batch and set --config.train.batch_per_device=N (gradient accumulation; same result).

Expected (paper, Table 2, 18-step Heun sampler, NFE 35): FID 1.97 unconditional, 1.79 conditional.
Throughput reference: the PyTorch original does 353 img/s in fp32 on one H100 at batch 512
(../shared/reference/pytorch_reference_h100.jsonl), i.e. ~6.5 days for 200 Mimg on one H100.
"""

import ml_collections
from ml_collections import config_dict


ARCHS = ("ddpmpp", "ncsnpp", "adm")


def parse_arg(arg, default_arch="ddpmpp"):
    """':cond', ':uncond', an architecture (':ncsnpp') or both (':cond,ncsnpp') -> (cond, arch)."""
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = [t for t in tokens if t not in ("cond", "uncond", *ARCHS)]
    if unknown:
        raise ValueError(f"the config argument takes cond|uncond and/or {'|'.join(ARCHS)} (e.g. ':cond,ncsnpp'), "
                         f"got {unknown}")
    archs = [t for t in tokens if t in ARCHS]
    return "cond" in tokens, (archs[-1] if archs else default_arch)


def set_arch(model, arch):
    """The reference train.py's --arch presets: network fields of `model` (a ConfigDict) for ddpmpp,
    ncsnpp (SongUNet) or adm (DhariwalUNet, ImageNet-64 widths)."""
    keep = {"dropout": model.dropout, "label_dropout": model.label_dropout, "dtype": model.dtype}
    for key in list(model.keys()):
        del model[key]
    if arch == "adm":
        model.update(name="DhariwalUNet", model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                     num_blocks=3, attn_resolutions=(32, 16, 8), **keep)
        return model
    model.update(name="SongUNet", model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), encoder_type="standard", decoder_type="standard", **keep)
    if arch == "ddpmpp":
        model.update(embedding_type="positional", channel_mult_noise=1, resample_filter=(1, 1))
    else:  # ncsnpp
        model.update(embedding_type="fourier", channel_mult_noise=2, resample_filter=(1, 3, 3, 1),
                     encoder_type="residual")
    return model


def get_config(arg=None):
    """arg: 'uncond' (default) or 'cond' (class-conditional, label_dim 10), optionally with the network:
    ':ddpmpp' (default), ':ncsnpp' or ':adm', e.g. ':cond,ncsnpp' (reference train.py --cond/--arch)."""
    cond, arch = parse_arg(arg)
    c = ml_collections.ConfigDict()

    # Data (train.py --data, --cond, --xflip). `source='auto'`: data.path if set, else TFDS data.tfds_name.
    c.data = ml_collections.ConfigDict()
    c.data.source = "auto"
    c.data.path = config_dict.placeholder(str)         # reference-format zip or folder
    c.data.tfds_name = "cifar10"
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = config_dict.placeholder(str)
    c.data.tfds_download = False                       # offline by default; True lets TFDS download
    c.data.synthetic = None                            # kwargs of data.synthetic_dataset (quickstart)
    c.data.max_size = config_dict.placeholder(int)     # keep a random subset (reference --max_size)
    c.data.use_labels = cond                           # --cond
    c.data.xflip = False                               # --xflip: dataset doubling by mirroring (off)

    # Network (train.py --arch=ddpmpp; SongUNet defaults for the rest). img_resolution, in/out_channels,
    # label_dim and augment_dim come from the dataset and the augmentation, as in the reference.
    c.model = ml_collections.ConfigDict()
    c.model.name = "SongUNet"
    c.model.model_channels = 128                       # --cbase
    c.model.channel_mult = (2, 2, 2)                   # --cres
    c.model.channel_mult_emb = 4
    c.model.num_blocks = 4
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.13                             # --dropout
    c.model.label_dropout = 0.0
    c.model.embedding_type = "positional"
    c.model.channel_mult_noise = 1
    c.model.encoder_type = "standard"
    c.model.decoder_type = "standard"
    c.model.resample_filter = (1, 1)
    c.model.dtype = "float32"                          # compute dtype ('bfloat16' for speed; --fp16 analogue)
    if arch != "ddpmpp":
        set_arch(c.model, arch)

    # The forward process (edm_jax.diffusion.process): Table 1's "ours" column, EDMPrecond (Eq. 7) and EDMLoss
    # (Eq. 8) in one section, each hyperparameter once (sigma_data serves both).
    c.process = ml_collections.ConfigDict(dict(kind="edm", sigma_data=0.5, P_mean=-1.2, P_std=1.2))

    # Non-leaky augmentation (--augment=0.12; train.py's AugmentPipe multipliers, augment.py's stds).
    c.augment = ml_collections.ConfigDict()
    c.augment.p = 0.12
    c.augment.xflip = 1e8
    c.augment.yflip = 1.0
    c.augment.scale = 1.0
    c.augment.rotate_frac = 1.0
    c.augment.aniso = 1.0
    c.augment.translate_frac = 1.0
    c.augment.scale_std = 0.2
    c.augment.aniso_std = 0.2
    c.augment.translate_frac_std = 0.125

    # Optimisation and schedule (train.py + training_loop.py defaults).
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 512                           # --batch (global, all devices)
    c.train.batch_per_device = config_dict.placeholder(int)  # --batch-gpu: gradient accumulation if smaller
    c.train.lr = 1e-3                                  # --lr 10e-4
    c.train.lr_rampup_kimg = 10000.0                     # linear warm-up over 10 Mimg, no decay
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.ema_halflife_kimg = 500.0                    # --ema 0.5 (Mimg)
    c.train.ema_rampup_ratio = 0.05
    c.train.ema_decay = config_dict.placeholder(float)  # None: the half-life EMA; PSLD: 0.9999 per step
    c.train.grad_clip_norm = config_dict.placeholder(float)  # None: no clipping (EDM); PSLD: 1.0
    c.train.loss_scaling = 1.0                         # --ls
    c.train.total_kimg = 200000.0                        # --duration 200 (Mimg)
    c.train.tick_kimg = 50.0                             # --tick
    c.train.progress_sec = 30.0                          # also a progress line (step, %, ETA) this often
    c.train.snapshot_ticks = 50                        # --snap: checkpoint + sample grid every 2.5 Mimg
    c.train.state_dump_ticks = 500                     # --dump: these checkpoints are kept forever (25 Mimg)
    c.train.max_to_keep = 3                            # newest checkpoints kept besides those
    c.train.async_checkpointing = True
    c.train.seed = 0                                   # --seed (the reference draws a random one)
    # The reference trains in true fp32 (TF32 disabled): 'highest'. 'default' allows TF32 / bf16 passes
    # (the reference's own numbers on an H100: 353 img/s fp32 vs 945 img/s TF32).
    c.train.matmul_precision = "highest"
    c.train.compilation_cache_dir = config_dict.placeholder(str)  # persistent XLA cache (faster restarts)

    # Snapshot sample grids (generate.py's defaults: 18 steps, σ ∈ [0.002, 80], ρ = 7, deterministic).
    c.sample = ml_collections.ConfigDict()
    c.sample.num_images = 64
    c.sample.seed = 0
    c.sample.num_steps = 18
    c.sample.sigma_min = 0.002
    c.sample.sigma_max = 80.0
    c.sample.rho = 7.0
    return c
