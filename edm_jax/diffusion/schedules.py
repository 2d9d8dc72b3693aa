"""Noise schedules σ(t), scalings s(t) and time-step discretisations (Karras et al. 2022, Table 1, Eq. 4–5).

The ODE of Eq. 4 is written for a general noise level σ(t) and signal scaling s(t). This module gives the
choices the paper compares: schedules vp / ve / linear (σ, σ', σ⁻¹), scalings vp / none (s, s') and the
discretisations vp / ve / iddpm / edm (the σ_i at which the solver evaluates the denoiser).

The formulas accept numpy arrays (the samplers evaluate them once, in float64, on the host: every step's
coefficients depend only on hyperparameters) and JAX arrays alike.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion.precond import iddpm_u_table

__all__ = [
    "Schedule", "Scaling", "vp_sigma", "vp_schedule", "ve_schedule", "linear_schedule", "SCHEDULES",
    "vp_scaling", "no_scaling", "SCALINGS", "vp_refit_betas", "default_sigma_range", "DISCRETIZATIONS",
    "edm_sigma_steps", "vp_sigma_steps", "ve_sigma_steps", "iddpm_sigma_steps", "sigma_steps",
    "make_schedule", "make_scaling",
]


def _xp(*xs):
    """jax.numpy if any argument is a JAX array (or tracer), else numpy."""
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


class Schedule(NamedTuple):
    """σ(t), dσ/dt and the inverse t(σ) of one noise schedule."""

    sigma: Callable
    sigma_deriv: Callable
    sigma_inv: Callable


class Scaling(NamedTuple):
    """s(t) and ds/dt of one signal scaling."""

    s: Callable
    s_deriv: Callable


def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """σ_VP(t) = sqrt(exp(½β_d t² + β_min t) − 1) (Table 1, VP)."""
    xp = _xp(t)
    return xp.sqrt(xp.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_schedule(beta_d=19.9, beta_min=0.1) -> Schedule:
    """VP schedule: σ(t) as `vp_sigma`, σ'(t) = ½(β_min + β_d t)(σ + 1/σ), σ⁻¹ from solving the quadratic."""

    def sigma(t):
        return vp_sigma(t, beta_d, beta_min)

    def sigma_deriv(t):
        s = sigma(t)
        return 0.5 * (beta_min + beta_d * t) * (s + 1 / s)

    def sigma_inv(sigma_):
        xp = _xp(sigma_)
        return (xp.sqrt(beta_min**2 + 2 * beta_d * xp.log1p(sigma_**2)) - beta_min) / beta_d

    return Schedule(sigma, sigma_deriv, sigma_inv)


def ve_schedule() -> Schedule:
    """VE schedule: σ(t) = sqrt(t), σ'(t) = 1 / (2 sqrt(t)), σ⁻¹(σ) = σ²."""
    return Schedule(
        sigma=lambda t: _xp(t).sqrt(t),
        sigma_deriv=lambda t: 0.5 / _xp(t).sqrt(t),
        sigma_inv=lambda sigma_: sigma_**2,
    )


def linear_schedule() -> Schedule:
    """The paper's choice: σ(t) = t (so σ' = 1 and the ODE's time is the noise level itself)."""
    return Schedule(
        sigma=lambda t: t,
        sigma_deriv=lambda t: _xp(t).ones_like(t),
        sigma_inv=lambda sigma_: sigma_,
    )


def vp_scaling(schedule: Schedule) -> Scaling:
    """VP scaling s(t) = 1 / sqrt(1 + σ(t)²), s'(t) = −σ σ' s³ (for the given σ(t))."""

    def s(t):
        return 1 / _xp(t).sqrt(1 + schedule.sigma(t) ** 2)

    def s_deriv(t):
        return -schedule.sigma(t) * schedule.sigma_deriv(t) * s(t) ** 3

    return Scaling(s, s_deriv)


def no_scaling(schedule: Schedule | None = None) -> Scaling:
    """s(t) = 1: the signal is not scaled (VE and the paper's choice)."""
    del schedule
    return Scaling(s=lambda t: _xp(t).ones_like(t), s_deriv=lambda t: _xp(t).zeros_like(t))


SCHEDULES = ("vp", "ve", "linear")  # by name: VP is refit to the σ range, see make_schedule
SCALINGS = {"vp": vp_scaling, "none": no_scaling}
DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")


def vp_refit_betas(sigma_min, sigma_max, epsilon_s=1e-3):
    """β_d, β_min such that σ_VP(ε_s) = σ_min and σ_VP(1) = σ_max (the ablation sampler's VP refit)."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    beta_min = math.log(sigma_max**2 + 1) - 0.5 * beta_d
    return beta_d, beta_min


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3):
    """The reference's default (σ_min, σ_max) per discretisation: vp [σ_VP(ε_s), σ_VP(1)], ve [0.02, 100],
    iddpm [0.002, 81], edm [0.002, 80]."""
    _check(discretization, DISCRETIZATIONS, "discretization")
    if discretization == "vp":
        return float(vp_sigma(np.float64(epsilon_s))), float(vp_sigma(np.float64(1.0)))
    return {"ve": (0.02, 100.0), "iddpm": (0.002, 81.0), "edm": (0.002, 80.0)}[discretization]


def edm_sigma_steps(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … N−1, float64 [N]."""
    i = np.arange(num_steps, dtype=np.float64)
    return (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s=1e-3):
    """VP: uniform t from 1 to ε_s through the VP schedule refit to [σ_min, σ_max] (Table 1), float64 [N]."""
    beta_d, beta_min = vp_refit_betas(sigma_min, sigma_max, epsilon_s)
    t = 1 + np.arange(num_steps, dtype=np.float64) / (num_steps - 1) * (epsilon_s - 1)
    return vp_sigma(t, beta_d, beta_min)


def ve_sigma_steps(num_steps, sigma_min, sigma_max):
    """VE: geometric σ from σ_max to σ_min (Table 1), float64 [N]."""
    i = np.arange(num_steps, dtype=np.float64)
    return np.sqrt(sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (num_steps - 1)))


def iddpm_sigma_steps(num_steps, sigma_min, sigma_max, C_1=0.001, C_2=0.008, M=1000):
    """iDDPM: N levels picked evenly (rounded indices) from the float64 u table within [σ_min, σ_max]."""
    u = iddpm_u_table(M, C_1, C_2, dtype=np.float64)
    u = u[(u >= sigma_min) & (u <= sigma_max)]
    if u.size == 0:
        raise ValueError(f"no iDDPM noise level lies in [{sigma_min}, {sigma_max}]")
    index = np.round((len(u) - 1) / (num_steps - 1) * np.arange(num_steps, dtype=np.float64))
    return u[index.astype(np.int64)]


def sigma_steps(discretization, num_steps, sigma_min, sigma_max, *, rho=7.0, epsilon_s=1e-3, C_1=0.001,
                C_2=0.008, M=1000):
    """The discretisation by name ('vp', 've', 'iddpm', 'edm'), float64 [num_steps], decreasing."""
    _check(discretization, DISCRETIZATIONS, "discretization")
    if discretization == "vp":
        return vp_sigma_steps(num_steps, sigma_min, sigma_max, epsilon_s)
    if discretization == "ve":
        return ve_sigma_steps(num_steps, sigma_min, sigma_max)
    if discretization == "iddpm":
        return iddpm_sigma_steps(num_steps, sigma_min, sigma_max, C_1, C_2, M)
    return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho)


def make_schedule(name: str, sigma_min=None, sigma_max=None, epsilon_s=1e-3) -> Schedule:
    """Schedule by name. 'vp' is refit to [σ_min, σ_max] over t ∈ [ε_s, 1], as in the ablation sampler."""
    _check(name, SCHEDULES, "schedule")
    if name == "vp":
        return vp_schedule(*vp_refit_betas(sigma_min, sigma_max, epsilon_s))
    return ve_schedule() if name == "ve" else linear_schedule()


def make_scaling(name: str, schedule: Schedule) -> Scaling:
    """Scaling by name ('vp' or 'none') for the given schedule."""
    _check(name, SCALINGS, "scaling")
    return SCALINGS[name](schedule)


def _check(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {sorted(allowed)}")
