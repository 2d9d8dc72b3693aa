"""PSLD's phase-space forward process and the VP-SDE baseline (Pandey & Mandt 2023, "A Complete Recipe for
Diffusion Generative Models"; Song et al. 2021).

The PSLD state is z = (x, m), stored NHWC as `concat([x, m], axis=-1)` (x block first, C channels each).
Forward SDE (paper Eq. 7, per pixel, acting on the pair (x, m)):

    dz = (β(t)/2) A z dt + G(t) dW,   A = [[−Γ, M⁻¹], [−1, −ν]],   G = diag(√(βΓ), √(βMν)),

with M fixed by critical damping, M⁻¹ = (Γ − ν)²/4, so A = −λI + N with λ = (Γ + ν)/2 and N² = 0: every
matrix exponential is exact, exp(A s/2) = e^{−λs/2}(I + N s/2), and the kernel depends on t only through
b(t) = ∫₀ᵗ β. Γ = 0 is CLD (Dockhorn et al.), the VP-SDE is a one-block process of its own (`VPSDE`).

Time-dependent methods take forward time t (a float, a NumPy array, or a traced JAX array, e.g. [N]);
NumPy/float inputs are computed on the host in float64, JAX inputs in their own dtype. The kernel
covariance uses the cancellation-free arrangement (φ3 with a Taylor branch), so float32 stays accurate at
t = 1e-5, where the expanded closed form of the reference loses three digits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion.rng import per_example_keys

__all__ = ["PhaseSpaceSDE", "VPSDE", "Cov", "Factor", "PRESETS"]


class Cov(NamedTuple):
    """A symmetric 2×2 covariance per time: entries xx, xm, mm (each of t's shape)."""
    xx: object
    xm: object
    mm: object


class Factor(NamedTuple):
    """A 2×2 matrix per time, row-major (c11, c12, c21, c22)."""
    c11: object
    c12: object
    c21: object
    c22: object


def _xp(*args):
    """NumPy (host float64) when every input is static, else jax.numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in args) else np


def _host(t):
    return np.asarray(t, np.float64) if _xp(t) is np else t


def _bc(c, like):
    """Per-example coefficient [N] (or scalar) → broadcastable against an NHWC array `like`."""
    c = jnp.asarray(c, like.dtype)
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim)) if c.ndim else c


def _split(z):
    c = z.shape[-1] // 2
    return z[..., :c], z[..., c:]


def _apply(f: Factor, z):
    """Per-pixel 2×2 product f·(x, m) on an NHWC phase-space array; f entries [N] or scalars."""
    x, m = _split(z)
    c11, c12, c21, c22 = (_bc(c, z) for c in f)
    return jnp.concatenate([c11 * x + c12 * m, c21 * x + c22 * m], axis=-1)


def _std_normal_log_prob(u):
    """log N(u; 0, I) summed over all but the leading axis, [N]."""
    return -0.5 * jnp.sum(u.reshape(u.shape[0], -1) ** 2, axis=-1) - 0.5 * u[0].size * math.log(2 * math.pi)


def _exp_mphi3(y, xp):
    """e^{−y} φ3(y), φ3(y) = eʸ − 1 − y − y²/2, for y ≥ 0 without cancellation (Taylor series for y < 2)."""
    ys = xp.minimum(y, 2.0)
    term, series = ys**3 / 6.0, 0.0 * ys
    for k in range(4, 24):  # 2^23/23! ≈ 3e-16: converged for ys ≤ 2
        series = series + term
        term = term * ys / k
    big = 1.0 - xp.exp(-y) * (1.0 + y + 0.5 * y * y)
    return xp.where(y < 2.0, xp.exp(-y) * series, big)


@dataclasses.dataclass(frozen=True)
class PhaseSpaceSDE:
    """PSLD / CLD forward process (hyperparameters as in the reference config; M is derived).

    mode: 'score_xm' (the network predicts ε_x and ε_m), 'score_m' (Γ = 0: only ε_m; lower factor), or
    'score_x' (ν = 0: only ε_x; upper factor).
    """

    beta_min: float = 8.0
    beta_max: float = 8.0
    gamma: float = 0.01
    nu: float = 4.01
    kappa: float = 0.04
    numerical_eps: float = 1e-9
    decomp_mode: str = "lower"
    T: float = 1.0
    train_eps: float = 1e-5
    eval_eps: float = 1e-3

    def __post_init__(self):
        if self.gamma == 0 and self.nu == 0:
            raise ValueError("PhaseSpaceSDE: gamma and nu cannot both be 0 (no noise enters the process); "
                             "set gamma > 0 (PSLD), nu > 0 (CLD) or both.")
        if self.gamma < 0 or self.nu < 0 or self.gamma == self.nu:
            raise ValueError(f"PhaseSpaceSDE: need gamma, nu >= 0 and gamma != nu (critical damping sets "
                             f"M = 4/(gamma - nu)^2), got gamma={self.gamma}, nu={self.nu}.")
        if self.decomp_mode not in ("lower", "upper"):
            raise ValueError(f"PhaseSpaceSDE: decomp_mode must be 'lower' or 'upper', got {self.decomp_mode!r}.")

    # --- derived constants -------------------------------------------------------------------------------
    @property
    def m_inv(self) -> float:
        return (self.gamma - self.nu) ** 2 / 4.0  # critical damping: double eigenvalue of A

    @property
    def M(self) -> float:
        return 1.0 / self.m_inv

    @property
    def lam(self) -> float:
        return (self.gamma + self.nu) / 2.0

    @property
    def mode(self) -> str:
        return "score_m" if self.gamma == 0 else "score_x" if self.nu == 0 else "score_xm"

    @property
    def predicts(self) -> str:
        """Which noise blocks the network outputs: 'm', 'x' or 'xm' (the reference's reduced modes)."""
        if self.mode == "score_m" and self.decomp_mode == "lower":
            return "m"
        if self.mode == "score_x" and self.decomp_mode == "upper":
            return "x"
        return "xm"

    def network_channels(self, data_channels: int) -> tuple[int, int]:
        """(in, out) channels of ε_θ for C-channel data."""
        return 2 * data_channels, data_channels * (1 if self.predicts != "xm" else 2)

    # --- schedule, drift, diffusion (per pixel) ----------------------------------------------------------
    def beta(self, t):
        return self.beta_min + _host(t) * (self.beta_max - self.beta_min)

    def b(self, t):
        """b(t) = ∫₀ᵗ β(s) ds."""
        t = _host(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def drift_matrix(self, t) -> Factor:
        """F(t) = (β/2) A, f(z, t) = F z per pixel."""
        h = 0.5 * self.beta(t)
        return Factor(-self.gamma * h, self.m_inv * h, -1.0 * h, -self.nu * h)

    def diffusion(self, t):
        """(g_x, g_m) = (√(βΓ), √(βMν))."""
        xp, beta = _xp(t), self.beta(t)
        return xp.sqrt(beta * self.gamma), xp.sqrt(beta * self.M * self.nu)

    def drift(self, z, t):
        return _apply(self.drift_matrix(t), z)

    def diffusion_like(self, z, t):
        """G(t) broadcast over the state z [N, H, W, 2C]."""
        gx, gm = self.diffusion(t)
        x, m = _split(z)
        return jnp.concatenate([_bc(gx, z) * jnp.ones_like(x), _bc(gm, z) * jnp.ones_like(m)], axis=-1)

    # --- the perturbation kernel (notes §2.1) ------------------------------------------------------------
    def _expm(self, s, sign=1.0) -> Factor:
        """exp(A s/2) = e^{−λs/2}(I + N s/2); sign = −1 gives SSCS's Ã (off-diagonals negated)."""
        xp, d = _xp(s), self.nu - self.gamma
        e = xp.exp(-self.lam * s / 2)
        return Factor(e * (1 + d * s / 4), sign * e * self.m_inv * s / 2, -sign * e * s / 2, e * (1 - d * s / 4))

    def _cov_b(self, s, sxx0=0.0, smm0=0.0, sign=1.0) -> Cov:
        """E Σ₀ Eᵀ + K(s) + ε_num I for Σ₀ = diag(sxx0, smm0), in b-time s (cancellation-free form)."""
        xp, g, n, lam = _xp(s, sxx0, smm0), self.gamma, self.nu, self.lam
        e11, e12, e21, e22 = self._expm(s, sign)
        ex, phi = xp.exp(-lam * s), _exp_mphi3(lam * s, xp)
        kxx = phi + ex * (g * s + g * n * s * s / 2)
        kxm = sign * ex * (n - g) * s * s / 4
        kmm = self.M * (phi + ex * (n * s + g * n * s * s / 2))
        eps = self.numerical_eps
        return Cov(sxx0 * e11**2 + smm0 * e12**2 + kxx + eps,
                   sxx0 * e11 * e21 + smm0 * e12 * e22 + kxm,
                   sxx0 * e21**2 + smm0 * e22**2 + kmm + eps)

    def mean_matrix(self, t) -> Factor:
        """S(t) with μ_t = S (x₀, m₀) per pixel."""
        return self._expm(self.b(t))

    def cov(self, t, sxx0=0.0, smm0=0.0) -> Cov:
        """Kernel covariance at t for initial covariance diag(sxx0, smm0)."""
        return self._cov_b(self.b(t), sxx0, smm0)

    def cov_hsm(self, t) -> Cov:
        """HSM: m₀ ~ N(0, κM) integrated out."""
        return self.cov(t, 0.0, self.kappa * self.M)

    def cov_dsm(self, t) -> Cov:
        """DSM: m₀ drawn, Σ₀ = 0."""
        return self.cov(t, 0.0, 0.0)

    def factor(self, cov: Cov, decomp_mode: str | None = None) -> Factor:
        """Triangular L with L Lᵀ = Σ: lower (Cholesky) or upper (notes §2.1)."""
        xp = _xp(*cov)
        if (decomp_mode or self.decomp_mode) == "lower":
            l11 = xp.sqrt(cov.xx)
            l21 = cov.xm / l11
            return Factor(l11, 0.0 * l11, l21, xp.sqrt(cov.mm - l21 * l21))
        u22 = xp.sqrt(cov.mm)
        u12 = cov.xm / u22
        return Factor(xp.sqrt(cov.xx - u12 * u12), u12, 0.0 * u22, u22)

    def inv_factor_T(self, cov: Cov, decomp_mode: str | None = None) -> Factor:
        """L^{-T} from the closed-form 2×2 inverse (det = xx·mm − xm²), as the reference's score uses."""
        xp = _xp(*cov)
        sdet = xp.sqrt(cov.xx * cov.mm - cov.xm**2)
        if (decomp_mode or self.decomp_mode) == "lower":
            sxx = xp.sqrt(cov.xx)
            return Factor(1 / sxx, -cov.xm / (sxx * sdet), 0.0 * sxx, sxx / sdet)
        smm = xp.sqrt(cov.mm)
        return Factor(smm / sdet, 0.0 * smm, -cov.xm / (smm * sdet), 1 / smm)

    def perturb(self, x0, t, eps, m0=None):
        """z_t = μ_t + L_t ε; HSM kernel when m0 is None, else DSM around (x0, m0). Returns (z_t, μ_t).

        x0 [N, H, W, C], t [N], eps [N, H, W, 2C] unit normal, m0 [N, H, W, C] or None.
        """
        cov = self.cov_hsm(t) if m0 is None else self.cov_dsm(t)
        mu = _apply(self.mean_matrix(t), jnp.concatenate([x0, jnp.zeros_like(x0) if m0 is None else m0], -1))
        return mu + _apply(self.factor(cov), eps), mu

    # --- prior, score, reverse drift ---------------------------------------------------------------------
    def prior(self, key_or_noise, shape, dtype=jnp.float32):
        """z_T ~ N(0, I) × N(0, M I) for data of shape [N, H, W, C]. Either per-image keys (or one base key,
        folded with the image index), or explicit unit noise [2, *shape] (x draw, then m draw)."""
        if isinstance(key_or_noise, jax.Array) and jnp.issubdtype(key_or_noise.dtype, jax.dtypes.prng_key):
            keys = per_example_keys(key_or_noise, shape[0])
            noise = jax.vmap(lambda k: jax.random.normal(k, (2, *shape[1:]), dtype), out_axes=1)(keys)
        else:
            noise = jnp.asarray(key_or_noise, dtype)
        return jnp.concatenate([noise[0], math.sqrt(self.M) * noise[1]], axis=-1)

    def to_data(self, z):
        """x, the first C of 2C channels."""
        return _split(z)[0]

    def prior_log_prob(self, z):
        """log of the prior N(0, I) × N(0, M I) at z [N, H, W, 2C], summed per image [N]."""
        x, m = _split(z)
        log_jacobian = -0.5 * m[0].size * math.log(self.M)  # m = √M·u with u standard normal
        return _std_normal_log_prob(x) + _std_normal_log_prob(m / math.sqrt(self.M)) + log_jacobian

    def score_inv_factor(self, t, dtype=None) -> Factor:
        """L_t^{-T} of the HSM covariance: the samplers' score conversion regardless of the training mode."""
        c = self.inv_factor_T(self.cov_hsm(t))
        return c if dtype is None else Factor(*(jnp.asarray(v, dtype) for v in c))

    def score_from_eps(self, eps_net, t, z):
        """s = −L_t^{-T} ε̂ (paper Eq. 10), [N, H, W, 2C]. eps_net has 2C channels, or C for the reduced
        modes ('m': ε_m only, s_x = 0; 'x': ε_x only, s_m = 0)."""
        c = self.score_inv_factor(t, z.dtype)
        full = {"xm": lambda: eps_net, "m": lambda: jnp.concatenate([jnp.zeros_like(eps_net), eps_net], -1),
                "x": lambda: jnp.concatenate([eps_net, jnp.zeros_like(eps_net)], -1)}[self.predicts]()
        s = -_apply(c, full)
        x_s, m_s = _split(s)
        if self.predicts == "m":
            x_s = jnp.zeros_like(x_s)
        if self.predicts == "x":
            m_s = jnp.zeros_like(m_s)
        return jnp.concatenate([x_s, m_s], axis=-1)

    def eps_from_score(self, score, t):
        """The inverse map, ε = −L_tᵀ s (for the reduced modes only the predicted block)."""
        lt = self.factor(self.cov_hsm(t))
        eps = -_apply(Factor(lt.c11, lt.c21, lt.c12, lt.c22), score)
        x_e, m_e = _split(eps)
        return {"xm": eps, "m": m_e, "x": x_e}[self.predicts]

    def reverse_drift_from_score(self, z, tau, score, ode=False):
        """f̄(z, τ) = −f + G² s (SDE) or −f + ½ G² s (probability flow), at t = T − τ (paper Eq. 11)."""
        t = self.T - tau
        g2 = self.diffusion_like(z, t) ** 2
        return -self.drift(z, t) + (0.5 if ode else 1.0) * g2 * score

    def reverse_drift(self, z, tau, eps_net, ode=False):
        return self.reverse_drift_from_score(z, tau, self.score_from_eps(eps_net, self.T - tau, z), ode)


@dataclasses.dataclass(frozen=True)
class VPSDE:
    """The VP-SDE baseline of the PSLD code (Song et al. 2021, Eq. 11): dx = −(β/2) x dt + √β dW on C channels."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0
    train_eps: float = 1e-5
    eval_eps: float = 1e-3

    predicts = "x"

    def network_channels(self, data_channels: int) -> tuple[int, int]:
        return data_channels, data_channels

    def beta(self, t):
        return self.beta_min + _host(t) * (self.beta_max - self.beta_min)

    def b(self, t):
        t = _host(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def mean_coeff(self, t):
        return _xp(t).exp(-0.5 * self.b(t))

    def std(self, t):
        xp = _xp(t)
        return xp.sqrt(-xp.expm1(-self.b(t)))  # 1 − α² without cancellation at small t

    def drift(self, z, t):
        return -0.5 * _bc(self.beta(t), z) * z

    def diffusion_like(self, z, t):
        return _bc(_xp(t).sqrt(self.beta(t)), z) * jnp.ones_like(z)

    def perturb(self, x0, t, eps, m0=None):
        """x_t = α x₀ + σ ε; returns (x_t, α x₀)."""
        del m0
        mu = _bc(self.mean_coeff(t), x0) * x0
        return mu + _bc(self.std(t), x0) * eps, mu

    def prior(self, key_or_noise, shape, dtype=jnp.float32):
        if isinstance(key_or_noise, jax.Array) and jnp.issubdtype(key_or_noise.dtype, jax.dtypes.prng_key):
            keys = per_example_keys(key_or_noise, shape[0])
            return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(keys)
        noise = jnp.asarray(key_or_noise, dtype)
        return noise[0] if noise.shape[0] == 1 and noise.ndim == len(shape) + 1 else noise

    def to_data(self, z):
        return z

    def prior_log_prob(self, z):
        """log N(z; 0, I) summed per image [N]."""
        return _std_normal_log_prob(z)

    def score_from_eps(self, eps_net, t, z):
        return -eps_net / _bc(self.std(t), z)

    def eps_from_score(self, score, t):
        return -score * _bc(self.std(t), score)

    def reverse_drift_from_score(self, z, tau, score, ode=False):
        t = self.T - tau
        return -self.drift(z, t) + (0.5 if ode else 1.0) * self.diffusion_like(z, t) ** 2 * score

    def reverse_drift(self, z, tau, eps_net, ode=False):
        return self.reverse_drift_from_score(z, tau, self.score_from_eps(eps_net, self.T - tau, z), ode)


PRESETS = {
    "psld": PhaseSpaceSDE(),                                     # CIFAR-10 SOTA training config (Γ = 0.01)
    "psld_g002": PhaseSpaceSDE(gamma=0.02, nu=4.02),             # the released sampling scripts' model
    "cld": PhaseSpaceSDE(gamma=0.0, nu=4.0),                     # CLD: M = 1/4, Γ̄ = 1, β̄ = 4 (notes §1)
    "vpsde": VPSDE(),
}
