"""The network of a config's `model` section: the one builder that training, generation and the configs'
tests share (it names the network classes; the data-dependent keywords come from the caller)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax.numpy as jnp

from edm_jax.networks.dhariwal_unet import DhariwalUNet
from edm_jax.networks.song_unet import SongUNet

__all__ = ["NETWORKS", "build_network"]

NETWORKS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}  # a config's model.name -> class


def build_network(model: Mapping, *, resolution: int, channels: int, label_dim: int, augment_dim: int,
                  out_channels: int):
    """The flax network from a config's `model` section: {'name': 'SongUNet' | 'DhariwalUNet', 'dtype':
    'float32' | 'bfloat16', **constructor keywords}; the data-dependent keywords come from the dataset,
    as in the reference's train.py."""
    kwargs = dict(model)
    name = kwargs.pop("name", "SongUNet")
    dtype = kwargs.pop("dtype", "float32")
    classes = NETWORKS
    if name not in classes:
        raise ValueError(f"model.name={name!r} is not a network; choose one of {sorted(classes)}")
    fields = {f.name for f in dataclasses.fields(classes[name])} - {"parent", "name"}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{name} has no constructor keyword(s) {unknown}; remove them from the config's model "
                         f"section (valid: {sorted(fields)})")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype={dtype!r} is not a compute dtype; use 'float32' or 'bfloat16'")
    for key in ("channel_mult", "attn_resolutions", "resample_filter"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = tuple(kwargs[key])
    return classes[name](img_resolution=resolution, in_channels=channels, out_channels=out_channels,
                         label_dim=label_dim, augment_dim=augment_dim, dtype=jnp.dtype(dtype), **kwargs)
