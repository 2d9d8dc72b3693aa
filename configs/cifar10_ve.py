r"""CIFAR-10 32x32 with VE preconditioning and loss (Karras et al. 2022, Table 1 "VE"; reference
train.py --precond=ve), NCSN++ by default as in score_sde. Everything else is the CIFAR-10 preset.

  python main.py --config=configs/cifar10_ve.py --mode=train                 # NCSN++, unconditional
  python main.py --config=configs/cifar10_ve.py:cond,ddpmpp --mode=train     # any network: ddpmpp|ncsnpp|adm
"""

import ml_collections

from configs.cifar10_edm import get_config as cifar10_config
from configs.cifar10_edm import parse_arg


def get_config(arg=None):
    cond, arch = parse_arg(arg, default_arch="ncsnpp")
    c = cifar10_config(f"{'cond' if cond else 'uncond'},{arch}")
    c.process = ml_collections.ConfigDict(dict(kind="ve", sigma_min=0.02, sigma_max=100.0))
    return c
