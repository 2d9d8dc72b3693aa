"""Preconditioning of the denoiser (Karras et al. 2022, Table 1 and Eq. 7).

The network F is never asked to output the clean image directly. Instead

    D(x; σ) = c_skip(σ) · x + c_out(σ) · F(c_in(σ) · x; c_noise(σ))        (Eq. 7)

with coefficients chosen per parameterization so that F's input and target have unit variance (EDM) or so
that an existing model family is reproduced exactly (VP, VE, iDDPM). Each class below is a frozen dataclass
of hyperparameters with pure methods; `denoiser` wraps any network apply function into D.

Everything here runs in float32 whatever the network's compute dtype (DESIGN.md: precision), and the
hyperparameter defaults are those of the reference implementation (NVlabs/edm, training/networks.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

__all__ = ["VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "make_precond", "PRECONDS"]


class _Precond:
    """Shared behaviour: σ rounding (identity unless overridden) and the D(x; σ) wrapper (Eq. 7)."""

    def round_sigma(self, sigma):
        """Map σ onto the values the model supports; identity except for iDDPM."""
        return sigma

    def coefficients(self, sigma):
        raise NotImplementedError

    def denoiser(self, net_apply: Callable[..., Any]) -> Callable[..., jnp.ndarray]:
        """Wrap a raw network into the preconditioned denoiser D (Eq. 7).

        `net_apply(variables, x_in, c_noise, class_labels, augment_labels, **kwargs)` is the network F — a
        Flax module's `apply` fits as is. It may compute in any dtype; its output is cast to float32.

        Returns `D(variables, x, sigma, class_labels=None, augment_labels=None, **kwargs)` where
        `x` is [N, ..., C] (NHWC for images), `sigma` is a scalar or [N], and the result is float32 with
        the shape of `x`. If F returns more channels than `x` has (iDDPM's learned variance, 2·C), only the
        first C are used, as in the reference.
        """

        def denoise(variables, x, sigma, class_labels=None, augment_labels=None, **kwargs):
            x = jnp.asarray(x, jnp.float32)
            sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
            c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
            bcast = (-1,) + (1,) * (x.ndim - 1)  # per-example scalars against any trailing layout
            f = net_apply(variables, c_in.reshape(bcast) * x, c_noise, class_labels, augment_labels, **kwargs)
            f = jnp.asarray(f, jnp.float32)[..., : x.shape[-1]]
            return c_skip.reshape(bcast) * x + c_out.reshape(bcast) * f

        return denoise


def _vp_sigma_f32(beta_d, beta_min, t):
    """σ_VP(t) rounded like the reference's float32 torch evaluation of its supported range.

    Each float32 operation is done in float64 and rounded to float32, which is what a correctly rounded
    float32 op gives; numpy's own float32 exp is not correctly rounded and lands one ulp off here
    (σ_min would be 0.0010358 instead of the reference's 0.0009765625).
    """
    f32 = np.float32
    t = f32(t)
    arg = f32(f32(f32(0.5) * f32(beta_d)) * f32(t * t)) + f32(f32(beta_min) * t)
    return float(np.sqrt(f32(f32(np.exp(np.float64(arg))) - f32(1))))


@dataclasses.dataclass(frozen=True)
class VPPrecond(_Precond):
    """Variance-preserving (DDPM++ / score_sde VP) preconditioning, Table 1 column "VP".

    σ(t) = sqrt(exp(½β_d t² + β_min t) − 1); c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1),
    c_noise = (M − 1) · σ⁻¹(σ). The supported range is [σ(ε_t), σ(1)], computed in float32 as the reference
    does (σ_min = 0.0009765625 rather than the float64 0.0010005).
    """

    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5

    @property
    def sigma_min(self) -> float:
        return _vp_sigma_f32(self.beta_d, self.beta_min, self.epsilon_t)

    @property
    def sigma_max(self) -> float:
        return _vp_sigma_f32(self.beta_d, self.beta_min, 1.0)

    def sigma(self, t):
        """σ(t) (Eq. 4's VP schedule), float32."""
        t = jnp.asarray(t, jnp.float32)
        return jnp.sqrt(jnp.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1)

    def sigma_inv(self, sigma):
        """t = σ⁻¹(σ), float32."""
        sigma = jnp.asarray(sigma, jnp.float32)
        return (jnp.sqrt(self.beta_min**2 + 2 * self.beta_d * jnp.log1p(sigma**2)) - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        c_skip = jnp.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / jnp.sqrt(sigma**2 + 1)
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


@dataclasses.dataclass(frozen=True)
class VEPrecond(_Precond):
    """Variance-exploding (NCSN++ / score_sde VE) preconditioning, Table 1 column "VE".

    c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2); supported σ ∈ [sigma_min, sigma_max].
    """

    sigma_min: float = 0.02
    sigma_max: float = 100.0

    def coefficients(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        one = jnp.ones_like(sigma)
        return one, sigma, one, jnp.log(0.5 * sigma)


def iddpm_u_table(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008, dtype=np.float32) -> np.ndarray:
    """The M + 1 discrete noise levels u_0 > … > u_M = 0 of improved DDPM (Table 1, "iDDPM" row).

    ᾱ(j) = sin²(π/2 · j / (M (C_2 + 1))), and for j = M … 1:
    u_{j−1} = sqrt((u_j² + 1) / max(ᾱ(j−1)/ᾱ(j), C_1) − 1).
    The preconditioner builds u in float32 and the ablation sampler's iddpm discretisation in float64
    (dtype=np.float64), as the reference does; in both, the reference evaluates ᾱ(j) and the ratio in
    float32 (j is an integer tensor, which torch promotes to float32), and so does this function.

    Float32 caveat: torch's float32 sin is faithfully but not correctly rounded, so 56 of the 1001 ᾱ(j)
    differ from ours by one ulp and the recursion carries that into u at up to ~1.5e-5 relative. The
    nearest-level indices, which are what the network sees (c_noise), are unaffected.
    """
    f32 = np.float32
    j = np.arange(M + 1).astype(f32)
    # Same operation order as the reference: (π/2 · j) / M / (C_2 + 1), then a correctly rounded sin.
    angle = f32(0.5 * np.pi) * j / f32(M) / f32(C_2 + 1)
    alpha_bar = np.sin(angle.astype(np.float64)).astype(f32) ** 2
    ratio = np.maximum(alpha_bar[:-1] / alpha_bar[1:], f32(C_1))  # ratio[k - 1] = ᾱ(k − 1) / ᾱ(k)
    u = np.zeros(M + 1, dtype)
    for k in range(M, 0, -1):  # a 1000-step host recursion, run once per hyperparameter set
        u[k - 1] = np.sqrt((u[k] ** 2 + 1) / ratio[k - 1].astype(dtype) - 1)
    return u


@dataclasses.dataclass(frozen=True)
class iDDPMPrecond(_Precond):  # noqa: N801 (the paper's and the reference's name)
    """Improved-DDPM (ADM baseline) preconditioning, Table 1 column "iDDPM".

    σ is restricted to the discrete levels u_j; c_skip = 1, c_out = −σ, c_in = 1/sqrt(σ² + 1),
    c_noise = M − 1 − j where u_j is the level nearest to σ. The network has 2·C output channels (learned
    variance); D uses the first C.
    """

    C_1: float = 0.001
    C_2: float = 0.008
    M: int = 1000

    @property
    def u(self) -> np.ndarray:
        """The float32 table u [M + 1], built once per hyperparameter set."""
        return _u_table_f32(self.M, self.C_1, self.C_2)

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def round_sigma_index(self, sigma):
        """Index j of the nearest level u_j (first one on a tie), int32 with the shape of σ."""
        sigma = jnp.asarray(sigma, jnp.float32)
        u = jnp.asarray(self.u)
        return jnp.argmin(jnp.abs(sigma[..., None] - u), axis=-1).astype(jnp.int32)

    def round_sigma(self, sigma):
        """Nearest level u_j to σ, float32."""
        return jnp.asarray(self.u)[self.round_sigma_index(sigma)]

    def coefficients(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        c_skip = jnp.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / jnp.sqrt(sigma**2 + 1)
        c_noise = (self.M - 1 - self.round_sigma_index(sigma)).astype(jnp.float32)
        return c_skip, c_out, c_in, c_noise


@functools.lru_cache(maxsize=None)
def _u_table_f32(M, C_1, C_2):
    u = iddpm_u_table(M, C_1, C_2)
    u.setflags(write=False)  # shared between calls through the cache
    return u


@dataclasses.dataclass(frozen=True)
class EDMPrecond(_Precond):
    """The paper's own preconditioning (Table 1 column "ours", derived in Appendix B.6).

    c_skip = σ_d² / (σ² + σ_d²), c_out = σ σ_d / sqrt(σ² + σ_d²), c_in = 1 / sqrt(σ² + σ_d²),
    c_noise = ln(σ) / 4. Any σ > 0 is supported.
    """

    sigma_min: float = 0.0
    sigma_max: float = math.inf
    sigma_data: float = 0.5

    def coefficients(self, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / jnp.sqrt(sigma**2 + sd2)
        c_in = 1 / jnp.sqrt(sigma**2 + sd2)
        c_noise = jnp.log(sigma) / 4
        return c_skip, c_out, c_in, c_noise


PRECONDS = {"vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond, "edm": EDMPrecond}


def make_precond(kind: str, **hyperparameters) -> _Precond:
    """Build a preconditioner by name ('vp', 've', 'iddpm', 'edm') with hyperparameter overrides."""
    try:
        cls = PRECONDS[kind]
    except KeyError:
        raise ValueError(f"unknown preconditioning {kind!r}; choose one of {sorted(PRECONDS)}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(hyperparameters) - fields)
    if unknown:
        raise ValueError(f"{cls.__name__} has no hyperparameter(s) {unknown}; it takes {sorted(fields)}")
    return cls(**hyperparameters)
