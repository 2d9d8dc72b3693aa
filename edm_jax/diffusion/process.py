"""The forward-process seam: one object owns everything a driver needs from a diffusion family.

A driver (the trainer, the sampler driver, guidance, the classifier trainer, the CLI) never asks which
family it runs. It asks the process:

    in_ch, out_ch = process.network_channels(C)          # the raw network's channels for data of C channels
    model = process.model(net_apply)                     # raw network -> the model the process samples with
    loss = process.loss(model_fn, images, labels, key=k, augment_labels=a)   # per-element training loss
    z = process.prior(keys, data_shape)                  # the sampler's starting state, per-image keys
    run = process.sampler(settings)                      # run(model_fn, z, class_labels, key) -> final state
    x = process.to_data(z)                               # final state -> data in [-1, 1]
    model_fn = process.guide(model_fn, log_prob_fn, s)   # classifier guidance, in the family's own form
    x_in, level = process.noisy(images, key, ...)        # the noisy input a noise-aware classifier sees
    kw = process.likelihood_settings(**overrides)        # the PF-ODE integral's range (σ or t), resolved
    out = process.log_likelihood(model_fn, x, labels, key=k, **kw, ...)  # log p(x) per image, bits/dim

`model_fn(state, level, class_labels[, augment_labels])` is the bound model: for the σ family the
preconditioned denoiser D(x; σ) of Eq. 7 with `level` = σ [N]; for PSLD (edm_jax.diffusion.psld) the noise
prediction ε_θ(z_t, t) with `level` = forward time t [N]. The sampler settings are the process's own
(`process.sampler_settings(...)` builds them from the paper's defaults and named overrides), so flags and
config fields that only one family understands are refused by that family, in one sentence.

This module holds the contract's σ family — EDM's Table 1 columns (VP, VE, iDDPM, EDM) — and the preset
table `PROCESSES`; a new family is a new frozen dataclass with the same methods, added to that table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol

import jax
import jax.numpy as jnp

from edm_jax.diffusion import guidance, likelihood, losses, sampling
from edm_jax.diffusion import precond as precond_lib
from edm_jax.diffusion import ksamplers
from edm_jax.diffusion.sampler_settings import SamplerSettings, settings_for

__all__ = ["Process", "SigmaProcess", "sigma_process", "make_process", "PROCESSES", "SIGMA_PRESETS"]


class Process(Protocol):
    """What every diffusion family provides (module docstring); `SigmaProcess` is the σ family's."""

    name: str

    def network_channels(self, data_channels: int) -> tuple[int, int]: ...
    def data_channels(self, network_in_channels: int) -> int: ...
    def model(self, net_apply: Callable) -> Callable: ...
    def loss(self, model_fn: Callable, images, labels=None, *, key, augment_labels=None): ...
    def prior(self, keys, data_shape, dtype=jnp.float32): ...
    def to_data(self, state): ...
    def sampler_settings(self, *, resolution=None, dataset=None, **overrides): ...
    def sampler(self, settings) -> Callable: ...
    def guide(self, model_fn: Callable, log_prob_fn: Callable, scale) -> Callable: ...
    def noisy(self, images, key, **noise) -> tuple: ...
    def likelihood_settings(self, **overrides) -> dict: ...
    def log_likelihood(self, model_fn: Callable, x, class_labels=None, *, key=None, **options) -> dict: ...
    def describe(self) -> dict: ...


# Table 1: the preconditioning and the training loss of each column. iDDPM has no training loss in the
# reference (it exists to sample the released ADM models), so its `loss` must be named explicitly.
SIGMA_PRESETS = {
    "vp": ("vp", "vp"),
    "ve": ("ve", "ve"),
    "iddpm": ("iddpm", None),
    "edm": ("edm", "edm"),
}


@dataclasses.dataclass(frozen=True)
class SigmaProcess:
    """The σ family x_σ = y + σ n of EDM (Karras et al. 2022): one Table 1 column.

    precond: a preconditioner of `edm_jax.precond` (Eq. 7; owns the σ range, `round_sigma` and c_noise).
    loss_kind: 'vp' | 've' | 'edm' — p_train and λ(σ) of Eq. 8 (`edm_jax.losses`); None = sampling only.
    loss_kwargs: the loss's hyperparameters as sorted (name, value) pairs (frozen, hashable).
    name: the preset's name ('edm', 'vp', ...), for logs and run directories.
    """

    precond: Any
    loss_kind: Optional[str] = None
    loss_kwargs: tuple = ()
    name: str = "edm"

    # ---- The network.
    def network_channels(self, data_channels: int) -> tuple[int, int]:
        """(in, out) channels of the raw network F; iDDPM's F also predicts a variance (2·C out)."""
        out = 2 * data_channels if isinstance(self.precond, precond_lib.iDDPMPrecond) else data_channels
        return data_channels, out

    def model(self, net_apply: Callable) -> Callable:
        """D(variables, x, sigma, class_labels=None, augment_labels=None, **kw) of Eq. 7 around F."""
        return self.precond.denoiser(net_apply)

    def data_channels(self, network_in_channels: int) -> int:
        """The data's channels, read back from the network's input width (the inverse of the above)."""
        return network_in_channels

    # ---- Training (Eq. 8).
    def loss(self, model_fn: Callable, images, labels=None, *, key, augment_labels=None):
        """Per-element λ(σ)‖D(y + σn; σ) − y‖², images' shape; `model_fn(x, sigma, labels, augment_labels)`."""
        if self.loss_kind is None:
            raise ValueError(f"the {self.name!r} process has no training loss (the reference trains no iDDPM "
                             "loss); name one: process.loss='vp', 've' or 'edm'")
        return losses.LOSSES[self.loss_kind](model_fn, images, labels, key=key, augment_labels=augment_labels,
                                             **dict(self.loss_kwargs))

    # ---- Sampling.
    def prior(self, keys, data_shape, dtype=jnp.float32):
        """Unit normals [N, *data_shape], one per key; the samplers scale them by σ_max·s(t_0)."""
        return jax.vmap(lambda k: jax.random.normal(k, tuple(data_shape), dtype))(keys)

    def to_data(self, state):
        """The σ family's state is the image itself."""
        return state

    def sampler_settings(self, *, resolution=None, dataset=None, base: Optional[SamplerSettings] = None,
                         **overrides) -> SamplerSettings:
        """The paper's settings for this data (or `base`), with the named overrides (None = keep), σ range
        clamped to the network's (`SamplerSettings.override` documents the fields). Data the paper has no
        preset for raises `NoPresetError`; without resolution and dataset the CIFAR-10 settings are used."""
        if base is None:  # with neither resolution nor dataset: the paper's CIFAR-10 settings
            base = SamplerSettings() if resolution is None and dataset is None else settings_for(resolution, dataset)
        return base.override(**overrides).clamp_to(self.precond)

    def sampler(self, settings: SamplerSettings) -> Callable:
        """`run(model_fn, latents, class_labels=None, key=None)` -> samples: Algorithm 1/2 (`edm`), the
        ablation sampler or a k-diffusion sampler on the Karras grid, with the network's σ rounding (iDDPM)
        applied to every σ the grid holds (the denoiser sees)."""
        if settings.is_ksampler:
            return _ksampler_run(settings, self.precond.round_sigma)
        fn = sampling.edm_sampler if settings.sampler == "edm" else sampling.ablation_sampler
        kwargs = settings.sampler_kwargs()

        def run(model_fn, latents, class_labels=None, key=None):
            return fn(model_fn, latents, class_labels, key=key, round_sigma=self.precond.round_sigma, **kwargs)

        return run

    # ---- Guidance and the noise-aware classifier.
    def guide(self, model_fn: Callable, log_prob_fn: Callable, scale) -> Callable:
        """D + scale·σ²·∇ₓ log p(y | x, σ) (`guidance.classifier_guided`)."""
        return guidance.classifier_guided(model_fn, log_prob_fn, scale)

    def noisy(self, images, key=None, *, rnd=None, noise=None, P_mean=-1.2, P_std=1.2):
        """(x₀ + σn, σ [N]) with ln σ ~ N(P_mean, P_std²): what the noise-aware classifier is trained on.
        `key` is one key or N per-example keys; or pass `rnd` [N] and `noise` (images' shape)."""
        return guidance.noisy_images(images, key, rnd=rnd, noise=noise, P_mean=P_mean, P_std=P_std)

    # ---- Likelihood (Song et al. 2021, App. D).
    def likelihood_settings(self, **overrides) -> dict:
        """{sigma_min, sigma_max} of the PF-ODE integral: the Karras grid's [0.002, 80] or the overrides
        (None = keep), clamped to the network's range; another family's setting is refused."""
        given = likelihood.given_settings(self.name, overrides, ("sigma_min", "sigma_max"))
        settings = self.sampler_settings(**given)
        return dict(sigma_min=float(settings.sigma_min), sigma_max=float(settings.sigma_max))

    def log_likelihood(self, model_fn: Callable, x, class_labels=None, *, key=None, **options) -> dict:
        """log p_{σ_min}(x) per image, nats and bits/dim: `likelihood.sigma_ode_log_likelihood`, whose
        keywords `options` are (sigma_min, sigma_max, divergence, num_probes, solver, ...)."""
        return likelihood.sigma_ode_log_likelihood(model_fn, x, class_labels, key=key, **options)

    def describe(self) -> dict:
        """The hyperparameters as one flat dict, the form of a config's `process` section."""
        out = {"kind": self.name, **dataclasses.asdict(self.precond), **dict(self.loss_kwargs)}
        if self.loss_kind not in (None, SIGMA_PRESETS.get(self.name, (None, None))[1]):
            out["loss"] = self.loss_kind
        return out


def _ksampler_run(settings: SamplerSettings, round_sigma) -> Callable:
    """`run(model_fn, latents, class_labels=None, key=None)` of k-sampler `settings.sampler` on its Karras grid.

    dpm_fast / dpm_adaptive stop at σ_min (k-diffusion's convention); one more D(x; σ_min) maps their
    state to data, as the other samplers' last step onto σ = 0 does (one extra NFE).
    """
    name, grid, kwargs = settings.sampler, settings.ksampler_grid(round_sigma), settings.ksampler_kwargs()
    fn = ksamplers.KSAMPLERS[name]

    def run(model_fn, latents, class_labels=None, key=None):
        x = fn(model_fn, latents, class_labels, sigmas=grid, key=key, **kwargs)
        if name not in ("dpm_fast", "dpm_adaptive"):
            return x
        x = x[0] if name == "dpm_adaptive" else x  # (samples, info)
        return model_fn(x, jnp.full((x.shape[0],), grid[-2], x.dtype), class_labels)

    return run


def sigma_process(kind: str = "edm", *, loss: Optional[str] = None, precond_kwargs: Optional[Mapping] = None,
                  loss_kwargs: Optional[Mapping] = None, **hyperparameters) -> SigmaProcess:
    """A σ-family process by Table 1 column, each hyperparameter written once.

    kind: 'vp' | 've' | 'iddpm' | 'edm'. loss: the Eq. 8 loss if not the column's own ('vp' | 've' | 'edm').
    hyperparameters: any field of the preconditioner or parameter of the loss (e.g. EDM's sigma_data,
      which both use; VP's beta_d, beta_min, epsilon_t; VE's sigma_min, sigma_max); each goes to whichever
      of the two takes it. precond_kwargs / loss_kwargs: the two sets given apart (old run directories).
    """
    if kind not in SIGMA_PRESETS:
        raise ValueError(f"unknown σ-family process {kind!r}; choose one of {sorted(SIGMA_PRESETS)}")
    precond_kind, default_loss = SIGMA_PRESETS[kind]
    loss_kind = default_loss if loss is None else loss
    if loss_kind is not None and loss_kind not in losses.LOSSES:
        raise ValueError(f"process.loss={loss_kind!r} is not a loss; choose one of {sorted(losses.LOSSES)}")
    precond_fields = {f.name for f in dataclasses.fields(precond_lib.PRECONDS[precond_kind])}
    loss_fields = set(losses.DEFAULTS.get(loss_kind, {}))  # the loss's hyperparameters, with their defaults
    unknown = sorted(set(hyperparameters) - precond_fields - loss_fields)
    if unknown:
        raise ValueError(f"the {kind!r} process has no hyperparameter(s) {unknown}; it takes "
                         f"{sorted(precond_fields | loss_fields)}")
    p_kw = {k: v for k, v in hyperparameters.items() if k in precond_fields}
    l_kw = {**losses.DEFAULTS.get(loss_kind, {}), **{k: v for k, v in hyperparameters.items() if k in loss_fields}}
    p_kw.update(precond_kwargs or {})
    l_kw.update(loss_kwargs or {})
    return SigmaProcess(precond=precond_lib.make_precond(precond_kind, **p_kw), loss_kind=loss_kind,
                        loss_kwargs=tuple(sorted(l_kw.items())), name=kind)


# The families by name. A new family adds its factory here (e.g. 'psld' from edm_jax.diffusion.psld).
PROCESSES: dict[str, Callable[..., Any]] = {k: (lambda k=k, **kw: sigma_process(k, **kw)) for k in SIGMA_PRESETS}


def make_process(kind: str, **hyperparameters):
    """The process `kind` of `PROCESSES` with its hyperparameters (a config's `process` section, flat)."""
    if kind not in PROCESSES:
        raise ValueError(f"process.kind={kind!r} is not a diffusion process; choose one of {sorted(PROCESSES)}")
    return PROCESSES[kind](**hyperparameters)


def _register_phase_space():
    # PSLD and the VP-SDE / CLD of the same recipe (edm_jax.diffusion.psld_process), by name.
    from edm_jax.diffusion.psld_process import psld_process

    for kind in ("psld", "cld", "vpsde"):
        PROCESSES[kind] = lambda kind=kind, **kw: psld_process(kind, **kw)


_register_phase_space()
