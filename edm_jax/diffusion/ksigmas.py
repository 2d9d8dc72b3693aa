"""The σ grids of k-diffusion's sampler menu, float64 on the host, each with the final σ = 0 appended.

Every grid is n decreasing noise levels from σ_max to σ_min followed by 0, so `len = n + 1` and a sampler
takes S = n steps. The Karras grid is Eq. 5 of Karras et al. (2022), `schedules.edm_sigma_steps`.
"""

from __future__ import annotations

import numpy as np

from edm_jax.diffusion import schedules

__all__ = ["karras_sigmas", "exponential_sigmas", "polyexponential_sigmas", "KSIGMAS"]


def _check(n, sigma_min, sigma_max):
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer ≥ 2 (the number of positive noise levels), got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """Eq. 5: σ_j = (σ_max^{1/ρ} + j/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, then 0. float64 [n + 1]."""
    _check(n, sigma_min, sigma_max)
    return np.append(schedules.edm_sigma_steps(n, sigma_min, sigma_max, rho), 0.0)


def exponential_sigmas(n, sigma_min, sigma_max):
    """σ_j = exp(v_j), v = linspace(log σ_max, log σ_min, n): uniform in log σ, then 0. float64 [n + 1]."""
    _check(n, sigma_min, sigma_max)
    return np.append(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), n)), 0.0)


def polyexponential_sigmas(n, sigma_min, sigma_max, rho=1.0):
    """σ_j = exp(u_j^ρ (log σ_max − log σ_min) + log σ_min), u = linspace(1, 0, n), then 0. float64 [n + 1].

    ρ = 1 is the exponential grid; ρ > 1 spends more steps at small σ.
    """
    _check(n, sigma_min, sigma_max)
    u = np.linspace(1.0, 0.0, n) ** rho
    return np.append(np.exp(u * (np.log(sigma_max) - np.log(sigma_min)) + np.log(sigma_min)), 0.0)


KSIGMAS = {"karras": karras_sigmas, "exponential": exponential_sigmas, "polyexponential": polyexponential_sigmas}
