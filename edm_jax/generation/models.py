"""Models for sampling: a reference pickle, a PSLD checkpoint, a converted or a training run directory, and
their sampler settings."""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax.numpy as jnp

from edm_jax.generation.sample_fn import BoundDenoiser
from edm_jax.interop.rundir import load_training_checkpoint

__all__ = ["load_model", "LoadedModel", "sampler_settings_of"]

def sampler_settings_of(model: "LoadedModel", **overrides):
    """(settings, note) for sampling `model`: the paper's settings for its resolution (ImageNet-64 has its
    own stochastic ones, recognised by the dataset's name), with `overrides` (None = not given; the process
    refuses what its family lacks). A resolution without a preset gets the CIFAR-10 settings and a note
    saying so (the caller shows it); note is None otherwise."""
    from edm_jax.diffusion.sampler_settings import NoPresetError

    dataset = (model.config.get("dataset") or {}).get("path") if isinstance(model.config.get("dataset"), dict) else None
    hint = dataset if dataset and "imagenet" in str(dataset).lower() else None
    try:
        return model.process.sampler_settings(resolution=model.image_shape[0], dataset=hint, **overrides), None
    except NoPresetError:
        res = model.image_shape[0]
        return model.process.sampler_settings(**overrides), (
            f"no paper sampler preset for {res}x{res} images; using the CIFAR-10 settings (18 Heun steps) unless "
            "flags say otherwise")


class LoadedModel(NamedTuple):
    """What `load_model` returns: the pieces `make_sample_fn` needs, plus the model's plain-data config."""

    denoise: "BoundDenoiser"
    image_shape: tuple
    label_dim: int
    process: Any
    config: dict


def load_model(workdir=None, checkpoint=None, *, dtype=jnp.float32, network_kwargs=None,
               process=None) -> LoadedModel:
    """(denoise_fn, image_shape, label_dim, process, config) of a model for `make_sample_fn`.

    `checkpoint`: a reference snapshot pickle (`convert.load_snapshot`), a PSLD Lightning `.ckpt`
    (`psld_checkpoint.load_psld_snapshot`, which needs the SongUNet `network_kwargs` and the `process`: the
    file holds neither), or a directory of training checkpoints (`load_training_checkpoint`). Otherwise
    `workdir`: a folder made by `--mode=convert` (`convert.load_converted`), else its training checkpoints.
    `denoise_fn` is a `BoundDenoiser` over the EMA network's variables (the process's model, e.g. D of Eq. 7;
    NHWC); image_shape is the data's (H, W, C).
    """
    from edm_jax import convert
    from edm_jax.interop import psld_checkpoint

    if checkpoint is not None:
        if os.path.isdir(checkpoint):
            snap = load_training_checkpoint(checkpoint, dtype)
        elif os.path.isfile(checkpoint) and psld_checkpoint.is_lightning_checkpoint(checkpoint):
            if network_kwargs is None or process is None:
                raise ValueError(f"{checkpoint} is a PSLD Lightning checkpoint, which holds no network or process "
                                 "settings; load_model needs network_kwargs= and process= for it")
            snap = psld_checkpoint.load_psld_snapshot(checkpoint, network_kwargs, process, dtype=dtype)
        elif os.path.isfile(checkpoint):
            snap = convert.load_snapshot(checkpoint, dtype=dtype)
        else:
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    elif workdir is not None:
        if os.path.isfile(os.path.join(workdir, convert.CONFIG_FILE)):
            snap = convert.load_converted(workdir, dtype=dtype)
        elif os.path.isdir(workdir):
            snap = load_training_checkpoint(workdir, dtype)
        else:
            raise FileNotFoundError(f"workdir {workdir} does not exist")
    else:
        raise ValueError("load_model needs checkpoint= (a reference .pkl) or workdir= (a converted or training run)")
    config = snap.config
    channels = snap.process.data_channels(int(snap.module.in_channels))  # PSLD's network sees 2·C channels
    image_shape = (int(config["img_resolution"]), int(config["img_resolution"]), channels)
    denoise = BoundDenoiser(snap.process.model(snap.module.apply), snap.params)
    return LoadedModel(denoise, image_shape, int(config.get("label_dim") or 0), snap.process, config)
