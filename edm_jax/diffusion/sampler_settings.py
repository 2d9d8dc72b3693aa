"""Sampler settings of the σ family: which EDM sampler, its time steps and stochasticity.

`SamplerSettings` is a frozen record of every choice the reference's generate.py exposes (Algorithm 1/2
or the ablation sampler's solver, discretization, schedule and scaling; the σ range, ρ and the churn
parameters) plus k-diffusion's sampler menu (`edm_jax.diffusion.ksamplers`, on the Karras grid of Eq. 5
with its η, tolerances and order), and `settings_for` gives the paper's per-dataset defaults. A σ-family process
(edm_jax.diffusion.process) turns settings into a sampler; drivers never read the fields themselves.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Optional

import numpy as np

from edm_jax.diffusion import sampling, schedules
from edm_jax.diffusion import ksigmas
from edm_jax.diffusion.ksamplers import KSAMPLERS

__all__ = ["SamplerSettings", "settings_for", "SAMPLERS", "NoPresetError"]


def _defaults(name: str) -> dict:
    """The keyword hyperparameters of k-sampler `name` with their defaults (its keyword-only arguments)."""
    return {k: p.default for k, p in inspect.signature(KSAMPLERS[name]).parameters.items()
            if p.kind is p.KEYWORD_ONLY and k not in ("sigmas", "key", "noise", "sigma_min", "sigma_max")}


class NoPresetError(ValueError):
    """The paper gives no sampler settings for this resolution or dataset."""

_EDM_ONLY = {"solver": "heun", "discretization": "edm", "schedule": "linear", "scaling": "none"}
SAMPLERS = ("edm", "ablation", *sorted(set(KSAMPLERS) - {"edm"}))
# The k-sampler keyword each settings field feeds (EDM's churn names -> k-diffusion's), when it takes it.
KSAMPLER_FIELDS = {"S_churn": "s_churn", "S_min": "s_tmin", "S_max": "s_tmax", "S_noise": "s_noise",
                   "eta": "eta", "rtol": "rtol", "atol": "atol", "order": "order"}
_FIELD_DEFAULTS = {"S_churn": 0.0, "S_min": 0.0, "S_max": math.inf, "S_noise": 1.0}


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Everything that picks the sampler and its time steps; defaults are the paper's CIFAR-10 settings.

    sampler: 'edm' (Algorithm 2 with Heun / Eq. 5 grid / σ(t) = t / s(t) = 1), 'ablation' (any solver,
      discretization, schedule, scaling — the reference switches to it when one of those is given), or a
      k-diffusion sampler of `ksamplers.KSAMPLERS` ('euler', 'dpmpp_2m', ...) on the Karras grid of
      num_steps levels from σ_max to σ_min (S = num_steps steps; dpm_fast makes n = num_steps evaluations;
      dpm_fast / dpm_adaptive end at σ_min and one more D(x; σ_min) call denoises their output).
    eta: the ancestral / SDE samplers' η (None = the sampler's default, 1 or 0 for dpm_fast / adaptive).
    rtol / atol: dpm_adaptive's tolerances; order: lms' (default 4) or dpm_adaptive's (2 or 3; default 3).
      The churn fields S_churn, S_min, S_max feed euler / heun / dpm_2; S_noise every noisy k-sampler.
    sigma_min / sigma_max: None = the sampler's default ([0.002, 80] for edm, the discretization's for
      ablation, `schedules.default_sigma_range`); `clamp_to(precond)` then clips to the network's range.
    """

    sampler: str = "edm"
    num_steps: int = 18
    sigma_min: Optional[float] = None
    sigma_max: Optional[float] = None
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    solver: str = "heun"
    discretization: str = "edm"
    schedule: str = "linear"
    scaling: str = "none"
    eta: Optional[float] = None
    rtol: Optional[float] = None
    atol: Optional[float] = None
    order: Optional[int] = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if self.sampler != "ablation":
            off = {k: getattr(self, k) for k, v in _EDM_ONLY.items() if getattr(self, k) != v}
            if off:
                raise ValueError(f"{off} needs sampler='ablation' (only it takes {sorted(_EDM_ONLY)}; "
                                 f"the {self.sampler} sampler runs with {_EDM_ONLY})")
        self._check_ksampler_fields()
        for name, allowed in (("solver", sampling.SOLVERS), ("discretization", schedules.DISCRETIZATIONS),
                              ("schedule", schedules.SCHEDULES), ("scaling", tuple(schedules.SCALINGS))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {list(allowed)}")
        if not isinstance(self.num_steps, (int, np.integer)) or self.num_steps < 2:
            raise ValueError(f"num_steps must be an integer ≥ 2, got {self.num_steps!r}")
        if not self.rho > 0:
            raise ValueError(f"rho must be > 0 (the time-step exponent of Eq. 5), got {self.rho}")
        for name in ("sigma_min", "sigma_max"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a noise level > 0, got {getattr(self, name)}")
        if self.S_churn < 0 or self.S_noise < 0:
            raise ValueError(f"S_churn and S_noise must be ≥ 0, got {self.S_churn}, {self.S_noise}")

    def _check_ksampler_fields(self):
        """A field set away from its default must be one the chosen sampler takes (one sentence naming them)."""
        takes = set(_defaults(self.sampler)) if self.is_ksampler else {KSAMPLER_FIELDS[f] for f in _FIELD_DEFAULTS}
        for name, kw in KSAMPLER_FIELDS.items():
            if getattr(self, name) != _FIELD_DEFAULTS.get(name) and kw not in takes:
                users = sorted(k for k in SAMPLERS if k in KSAMPLERS and kw in _defaults(k))
                raise ValueError(f"sampler {self.sampler!r} takes no {name}; samplers that do: {users}")
        if self.eta is not None and self.eta < 0:
            raise ValueError(f"eta must be ≥ 0, got {self.eta}")

    @property
    def is_ksampler(self) -> bool:
        """A sampler of k-diffusion's menu (`ksamplers.KSAMPLERS`), run on the Karras grid."""
        return self.sampler not in ("edm", "ablation")

    @property
    def stochastic(self) -> bool:
        if not self.is_ksampler:
            return self.S_churn > 0
        kw = {**_defaults(self.sampler), **self.ksampler_kwargs()}
        return kw.get("s_churn", 0) > 0 or kw.get("eta", 0) > 0

    def ksampler_kwargs(self) -> dict:
        """The k-sampler's own keywords from the fields it takes (None fields keep its defaults)."""
        if not self.is_ksampler:
            return {}
        params = _defaults(self.sampler)
        kw = {KSAMPLER_FIELDS[f]: getattr(self, f) for f in KSAMPLER_FIELDS
              if KSAMPLER_FIELDS[f] in params and getattr(self, f) is not None}
        if self.sampler == "dpm_fast":  # its step count is its number of evaluations n
            kw["n"] = self.num_steps
        return {k: (int(v) if k in ("order", "n") else float(v)) for k, v in kw.items()}

    def sigma_range(self) -> tuple[float, float]:
        """(σ_min, σ_max) with None replaced by the sampler's default (before any clamping)."""
        if self.sampler != "ablation":  # edm and the k-samplers: the Karras grid's defaults
            lo, hi = 0.002, 80.0
        else:
            lo, hi = schedules.default_sigma_range(self.discretization)
        return (lo if self.sigma_min is None else float(self.sigma_min),
                hi if self.sigma_max is None else float(self.sigma_max))

    def clamp_to(self, precond) -> "SamplerSettings":
        """σ range clipped to the preconditioner's supported range, as the reference samplers do
        (`σ_min = max(σ_min, net.sigma_min)`, `σ_max = min(σ_max, net.sigma_max)`)."""
        lo, hi = self.sigma_range()
        lo, hi = max(lo, float(precond.sigma_min)), min(hi, float(precond.sigma_max))
        if not 0 < lo < hi:
            raise ValueError(f"σ range [{lo}, {hi}] is empty after clamping to the network's "
                             f"[{precond.sigma_min}, {precond.sigma_max}]")
        return dataclasses.replace(self, sigma_min=lo, sigma_max=hi)

    def override(self, **changes) -> "SamplerSettings":
        """Replace the fields that are not None (command-line style); giving solver, discretization,
        schedule or scaling switches to the ablation sampler, like the reference's generate.py."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"SamplerSettings has no field(s) {unknown}")
        if "sampler" not in changes and set(changes) & set(_EDM_ONLY):
            changes["sampler"] = "ablation"
        return dataclasses.replace(self, **changes)

    def ksampler_grid(self, round_sigma=None) -> np.ndarray:
        """The k-sampler's σ grid, float64 [num_steps + 1]: Eq. 5 over the (clamped) σ range, then 0, with the
        network's σ rounding (iDDPM's discrete levels) applied on the host to every positive level, as
        `sampling.edm_sampler` rounds its t_i."""
        lo, hi = self.sigma_range()
        grid = ksigmas.karras_sigmas(int(self.num_steps), lo, hi, float(self.rho))
        grid[:-1] = sampling._host_round_sigma(round_sigma)(grid[:-1])
        if np.any(np.diff(grid) >= 0):
            raise ValueError(f"{self.num_steps} steps over [{lo}, {hi}] repeat a noise level once rounded to the "
                             "network's discrete σ levels; use fewer steps")
        return grid

    def sampler_kwargs(self) -> dict:
        """Keyword arguments for `sampling.edm_sampler` / `ablation_sampler` (σ range resolved)."""
        lo, hi = self.sigma_range()
        kw = dict(num_steps=int(self.num_steps), sigma_min=lo, sigma_max=hi, rho=float(self.rho),
                  S_churn=float(self.S_churn), S_min=float(self.S_min), S_max=float(self.S_max),
                  S_noise=float(self.S_noise))
        if self.sampler == "ablation":
            kw.update(solver=self.solver, discretization=self.discretization, schedule=self.schedule,
                      scaling=self.scaling)
        return kw


# The paper's recommended settings (README / example.py, notes §5.4): NFE 35 at 32×32, 79 at 64×64,
# and the stochastic sampler for ImageNet-64 (FID 1.36).
_DATASET_SETTINGS = {
    "cifar10": dict(num_steps=18),
    "ffhq": dict(num_steps=40),
    "afhqv2": dict(num_steps=40),
    "imagenet": dict(num_steps=256, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003),
}
_DATASET_ALIASES = (("imagenet", "imagenet"), ("cifar", "cifar10"), ("ffhq", "ffhq"), ("afhq", "afhqv2"))
_RESOLUTION_STEPS = {32: 18, 64: 40}


def settings_for(resolution: int, dataset: Optional[str] = None, *, precond=None) -> SamplerSettings:
    """The paper's sampler settings for a model: 18 deterministic steps at 32×32 (CIFAR-10), 40 at
    64×64 (FFHQ, AFHQv2), and for ImageNet-64 256 steps with S_churn 40, S_min 0.05, S_max 50,
    S_noise 1.003. `dataset` (a name or a path such as 'datasets/imagenet-64x64.zip') takes precedence
    over the resolution. With `precond`, the σ range is clamped to the network's range.
    """
    if dataset is not None:
        name = next((canon for key, canon in _DATASET_ALIASES if key in str(dataset).lower()), None)
        if name is None:
            raise NoPresetError(f"no paper sampler settings for dataset {dataset!r}; known: {sorted(_DATASET_SETTINGS)}"
                             " (or build SamplerSettings(num_steps=...) yourself)")
        settings = SamplerSettings(**_DATASET_SETTINGS[name])
    elif resolution in _RESOLUTION_STEPS:
        settings = SamplerSettings(num_steps=_RESOLUTION_STEPS[resolution])
    else:
        raise NoPresetError(f"no paper sampler settings for {resolution}×{resolution} images (the paper gives 32 "
                         "and 64); build SamplerSettings(num_steps=...) yourself")
    return settings.clamp_to(precond) if precond is not None else settings
