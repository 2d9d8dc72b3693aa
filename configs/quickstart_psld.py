r"""Quickstart for PSLD (Pandey & Mandt 2023): the EDM quickstart's data, network size and loop, with the
phase-space process instead of EDM's — offline, CPU, a few minutes.

Run:
  python main.py --config=configs/quickstart_psld.py --mode=train            # workdir runs/quickstart_psld
  python main.py --mode=sample --workdir=runs/quickstart_psld --seeds=0-63 --sampler=em --steps=200
The network sees z = (x, m), 6 channels, and log t through Fourier features (as PSLD's NCSN++); the
trainer, checkpoints and grids are the EDM quickstart's (configs/quickstart.py), unchanged.
"""

import ml_collections

from configs.quickstart import get_config as quickstart_config


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/quickstart_psld.py takes no argument, got {arg!r}; drop the ':{arg}'")
    c = quickstart_config()
    c.model.embedding_type = "fourier"                 # PSLD's time embedding: Fourier features of log t
    c.model.channel_mult_noise = 2
    c.process = ml_collections.ConfigDict(dict(kind="psld", gamma=0.01, nu=4.01, hsm=True, embedding="fourier"))
    # Snapshot grids: Euler–Maruyama with quadratic striding (dense near the data; Table 5's better grid at low NFE).
    c.sample = ml_collections.ConfigDict(dict(num_images=64, seed=0, sampler="em", num_steps=100,
                                              stride="quadratic"))
    return c
