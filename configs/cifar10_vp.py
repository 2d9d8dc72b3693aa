r"""CIFAR-10 32x32 with VP preconditioning and loss (Karras et al. 2022, Table 1 "VP"; reference
train.py --precond=vp). Everything else (DDPM++, data, optimiser, schedule) is the CIFAR-10 preset.

  python main.py --config=configs/cifar10_vp.py --mode=train                 # DDPM++, unconditional
  python main.py --config=configs/cifar10_vp.py:cond,ncsnpp --mode=train     # any network: ddpmpp|ncsnpp|adm
"""

import ml_collections

from configs.cifar10_edm import get_config as cifar10_config


def get_config(arg=None):
    c = cifar10_config(arg)
    c.process = ml_collections.ConfigDict(dict(kind="vp", beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5))
    return c
