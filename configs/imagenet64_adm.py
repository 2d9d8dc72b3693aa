r"""ImageNet 64x64, class-conditional ADM (DhariwalUNet) with EDM preconditioning and loss: the paper's
ImageNet preset (reference README: --cond=1 --arch=adm --duration=2500 --batch=4096 --lr=1e-4 --ema=50
--dropout=0.10 --augment=0 --fp16=1 --ls=100 --tick=200; edm-imagenet-64x64-cond-adm, 32 A100s, ~13 days).

  python main.py --config=configs/imagenet64_adm.py --mode=train --config.data.path=datasets/imagenet-64x64.zip

fp16 there is bfloat16 here (parameters, preconditioning and loss stay float32); the loss scaling of 100
is kept and, as in the reference, never undone (it acts on Adam's eps). Paper FID: 1.36 with the
stochastic sampler (256 steps, S_churn 40, S_min 0.05, S_max 50, S_noise 1.003).
"""

from configs.cifar10_edm import get_config as cifar10_config


def get_config(arg=None):
    c = cifar10_config(arg or "cond,adm")
    c.data.tfds_name = None  # a reference-format zip: set data.path
    c.model.dropout = 0.10
    c.model.dtype = "bfloat16"
    c.augment.p = 0.0
    c.train.batch_size = 4096
    c.train.lr = 1e-4
    c.train.ema_halflife_kimg = 50000.0
    c.train.loss_scaling = 100.0
    c.train.total_kimg = 2500000.0
    c.train.tick_kimg = 200.0
    c.train.matmul_precision = "default"
    return c
