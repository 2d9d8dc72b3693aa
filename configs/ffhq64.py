r"""FFHQ 64x64, EDM preconditioning and loss (reference README: --arch=ddpmpp --batch=256 --cres=1,2,2,2
--lr=2e-4 --dropout=0.05 --augment=0.15; 200 Mimg; the released edm-ffhq-64x64-uncond-vp/-ve).

  python main.py --config=configs/ffhq64.py --mode=train --config.data.path=datasets/ffhq-64x64.zip
  python main.py --config=configs/ffhq64.py:ncsnpp --mode=train --config.data.path=...

The data is a reference-format zip (the reference dataset_tool.py, --resolution=64x64). Paper FID
(Table 2, 40-step Heun, NFE 79): 2.39 (DDPM++).
"""

from configs.cifar10_edm import get_config as cifar10_config


def get_config(arg=None, dropout=0.05):
    c = cifar10_config(arg)
    c.data.tfds_name = None  # no TFDS version: set data.path
    c.model.channel_mult = (1, 2, 2, 2) if c.model.name == "SongUNet" else c.model.channel_mult
    c.model.dropout = dropout
    c.augment.p = 0.15
    c.train.batch_size = 256
    c.train.lr = 2e-4
    return c
