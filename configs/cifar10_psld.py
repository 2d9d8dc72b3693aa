r"""CIFAR-10 32x32, unconditional, PSLD (Pandey & Mandt 2023, "A Complete Recipe for Diffusion Generative
Models"): the paper's SOTA CIFAR-10 network, NCSN++ with 97,627,910 parameters (128 of them PSLD's frozen
Fourier frequencies, a buffer here), built as edm-jax's SongUNet. The mapping is exact
(../shared/fixtures/PSLD_README.md; `edm_jax.interop.psld_checkpoint`).

Convert a released PSLD checkpoint (PyTorch Lightning .ckpt, EMA weights; read without torch):
  python main.py --mode=convert --checkpoint=psld.ckpt --config=configs/cifar10_psld.py --workdir=runs/psld
The checkpoint holds no hyperparameters: the network comes from `model` and `network_io` below, and a file
that does not fit them is refused with the first parameter that differs.

Training recipe (scripts_psld/sota/uncond/cifar10/train_uncond_psld.sh + cifar10_psld.yaml; notes §3): Adam
lr 2e-4 (betas 0.9/0.999, eps 1e-8) with a linear warm-up over 5000 steps (lr 0 at step 0), gradient-norm
clipping 1.0, batch 128 (16 per GPU x 8), dropout 0.15, EMA 0.9999 per step, 2500 epochs (~975k steps).

Train (data: TFDS cifar10, or the reference-format zip, e.g. ../shared/data's):
  python main.py --config=configs/cifar10_psld.py --mode=train --config.data.path=../shared/data/cifar10-jpeg-train.zip
"""

import ml_collections

from configs.cifar10_edm import get_config as cifar10_config

# The SOTA preset's network (psld_checkpoint.psld_network_kwargs('cifar10_sota') without the data-dependent
# sizes): ch_mult [2, 2, 2], 8 residual blocks, attention at 16x16, Fourier embedding of log t (2·nf
# features), residual input pyramid, FIR [1, 3, 3, 1], BigGAN up/down blocks.
MODEL = dict(name="SongUNet", model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=8,
             attn_resolutions=(16,), dropout=0.15, label_dropout=0.0, embedding_type="fourier",
             channel_mult_noise=2, encoder_type="residual", decoder_type="standard", resample_filter=(1, 3, 3, 1),
             dtype="float32")

# The network's sizes. Training takes them from the dataset and the process (z = [x, m]: 2·C channels in;
# out 2·C, or C for the models that predict one component); conversion has neither, so they are here.
NETWORK_IO = dict(img_resolution=32, in_channels=6, out_channels=6)

WARMUP_STEPS = 5000  # the reference's LR multiplier min(step / 5000, 1)


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/cifar10_psld.py takes no argument, got {arg!r}; drop the ':{arg}'")
    c = cifar10_config("uncond")  # the CIFAR-10 data and training schema; the values below differ
    c.model = ml_collections.ConfigDict(MODEL)
    c.network_io = ml_collections.ConfigDict(NETWORK_IO)

    c.augment.p = 0.0  # PSLD uses no non-leaky augmentation (its random h-flip: with the training section)
    c.train.batch_size = 128
    c.train.lr = 2e-4
    c.train.lr_rampup_kimg = WARMUP_STEPS * c.train.batch_size / 1000  # lr · min(step / 5000, 1)
    c.train.ema_decay = 0.9999                         # every step from the first, no ramp-up
    c.train.grad_clip_norm = 1.0
    # The trainer's objective is the reference's mean ε-MSE times H·W·C (psld_process's docstring): Adam
    # does not see that factor, the clipping does, so scale it out to clip the reference's gradient.
    c.train.loss_scaling = 1.0 / (32 * 32 * 3)
    c.train.total_kimg = 2500 * 50000 / 1000           # 2500 epochs of the 50k training images

    c.data.xflip = True  # the reference's random horizontal flip, as dataset mirroring (same distribution)

    # The forward process (edm_jax.diffusion.psld_process): the SOTA training config, notes §2 (β = 8
    # constant, Γ = 0.01, ν = Γ + 4, κ = 0.04, ε_num = 1e-9, lower factor, HSM, ε_train 1e-5, ε_eval 1e-3).
    c.process = ml_collections.ConfigDict(dict(kind="psld", beta_min=8.0, beta_max=8.0, gamma=0.01, nu=4.01,
                                               kappa=0.04, numerical_eps=1e-9, decomp_mode="lower", hsm=True,
                                               embedding="fourier", train_eps=1e-5, eval_eps=1e-3))
    # Snapshot grids: Euler–Maruyama, uniform striding, NFE 1000 (Table 1: FID 2.21-2.23).
    c.sample = ml_collections.ConfigDict(dict(num_images=64, seed=0, sampler="em", num_steps=1000,
                                              stride="uniform"))
    return c
