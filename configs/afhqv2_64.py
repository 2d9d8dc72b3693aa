r"""AFHQv2 64x64: the FFHQ-64 preset with dropout 0.25 (reference README; edm-afhqv2-64x64-uncond-vp/-ve).

  python main.py --config=configs/afhqv2_64.py --mode=train --config.data.path=datasets/afhqv2-64x64.zip

Paper FID (Table 2, 40-step Heun, NFE 79): 1.96 (DDPM++).
"""

from configs.ffhq64 import get_config as ffhq64_config


def get_config(arg=None):
    return ffhq64_config(arg, dropout=0.25)
