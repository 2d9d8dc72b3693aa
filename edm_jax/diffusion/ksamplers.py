"""k-diffusion's sampler menu for the σ-family ODE/SDE, each a jitted `lax.scan` (or `lax.while_loop`).

All samplers integrate the probability-flow ODE dx/dσ = d(x; σ) = (x − D(x; σ))/σ (Karras et al. 2022,
Eq. 4 with σ(t) = t, s(t) = 1), or the matching reverse SDE, over a decreasing grid σ_0 > … > σ_{S−1} >
σ_S = 0 (`edm_jax.diffusion.ksigmas`). Notation: λ = −log σ, h_i = λ_{i+1} − λ_i, expm1(u) = e^u − 1.

Contract (as `edm_jax.sampling.edm_sampler`): `sampler(denoise_fn, latents, class_labels=None, *, sigmas,
key=None, noise=None, **hyper)`, `denoise_fn(x, sigma[N], class_labels)`. `latents` are unit normals
[N, ...] (any layout) scaled here by σ_0 = sigmas[0] (σ_max for dpm_fast / dpm_adaptive). Randomness:
* `noise` [num_draws, *latents.shape]: the draws in the order k-diffusion consumes them (its noise
  sampler's, or `randn_like`'s for the churn samplers). `num_draws(name, sigmas, **hyper)` gives the count.
* `key`: one key (image i uses `fold_in(key, i)`) or N keys; draw j of image i is `normal(fold_in(key_i,
  j))`. **Deliberate difference:** k-diffusion draws per batch, we draw per image, so an image never depends
  on its batch. For dpmpp_sde the two draws of a step come from one Brownian motion in σ (the second
  interval contains the first: correlation ρ = √((σ_i − σ_s)/(σ_i − σ_{i+1}))), as with k-diffusion's default
  Brownian tree; 2m_sde / 3m_sde draw over disjoint intervals, i.e. independent normals.
* Draws that k-diffusion makes but multiplies by zero (η = 0, churn off) are skipped: the result is
  bitwise the same, and no key is needed then.

Each fixed-step sampler is one `lax.scan` over steps 0 … S−2 with every scalar precomputed on the host in
float64 (`_Plan`), and the last step (onto σ = 0) peeled off; a step whose second evaluation is skipped
(σ↓ = 0 under a capped η) is a `lax.cond` inside the scan, so NFE is exact. NFE for S = len(sigmas) − 1:
euler, euler_ancestral, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde: S; heun, dpm_2, dpmpp_sde: 2S − 1;
dpm_2_ancestral, dpmpp_2s_ancestral: 2S − 1 minus the capped steps; dpm_fast: n; dpm_adaptive: order ×
attempts (returned). `nfe(name, sigmas, **hyper)` computes it.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion.rng import per_example_keys

__all__ = [
    "euler", "heun", "dpm_2", "euler_ancestral", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_sde",
    "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpm_fast", "dpm_adaptive", "edm", "KSAMPLERS", "nfe",
    "num_draws", "ancestral_step",
]


# ----------------------------------------------------------------------------------------------- host side
class _Plan(NamedTuple):
    """Per-step float64 constants [S] (names per sampler), and the host facts the driver needs.

    second [S] bool: the step evaluates D twice. draw [S, slots] int: global index of each draw, −1 = none.
    """

    consts: dict
    second: np.ndarray
    draw: np.ndarray
    x_scale: float
    brownian_rho: np.ndarray | None = None


def _grid(sigmas):
    """The grid as float64 numpy, checked: 1-D, positive and strictly decreasing, ending at 0."""
    try:
        s = np.asarray(sigmas, np.float64)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise TypeError("sigmas must be a concrete array (numpy or a JAX constant): the step constants are "
                        "computed on the host, so the grid is static under jax.jit") from None
    if s.ndim != 1 or len(s) < 2 or s[-1] != 0 or np.any(s[:-1] <= 0) or np.any(np.diff(s) >= 0):
        raise ValueError("sigmas must be a strictly decreasing 1-D grid of positive noise levels ending with "
                         f"0 (e.g. ksigmas.karras_sigmas(n, 0.002, 80)), got {s}")
    return s


def _xp(*xs):
    """jax.numpy for JAX arrays (traced step sizes of the adaptive solver), numpy for host constants."""
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def _lam(sigma):
    """λ = −log σ (+∞ at σ = 0), float64."""
    with np.errstate(divide="ignore"):
        return -np.log(np.asarray(sigma, np.float64))


def _sig(lam):
    """σ(λ) = e^{−λ}, float64."""
    return np.exp(-np.asarray(lam, np.float64))


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """Ancestral split (σ↓, σ↑): σ↑ = min(σ_t, η √(σ_t² (σ_f² − σ_t²) / σ_f²)), σ↓ = √(σ_t² − σ↑²).

    A deterministic move σ_f → σ↓ plus fresh noise of std σ↑ lands at variance σ_t² (η = 1: the DDPM
    posterior, Ho et al. 2020). Arrays of the broadcast shape: float64 numpy, or JAX for JAX inputs.
    """
    xp = _xp(sigma_from, sigma_to)
    sigma_from, sigma_to = xp.asarray(sigma_from), xp.asarray(sigma_to)
    if xp is np:
        sigma_from, sigma_to = sigma_from.astype(np.float64), sigma_to.astype(np.float64)
    if not eta:
        return sigma_to, xp.zeros_like(sigma_to)
    up = xp.minimum(sigma_to, eta * xp.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return xp.sqrt(sigma_to**2 - up**2), up


def _draw_table(mask, slots=1):
    """Global draw indices [S, slots] for the steps where `mask` [S] is set (consecutive), −1 elsewhere."""
    mask = np.asarray(mask, bool)
    idx = np.full((len(mask), slots), -1, np.int32)
    idx[mask] = np.arange(mask.sum() * slots, dtype=np.int32).reshape(-1, slots)
    return idx


def _plan_churn(sigmas, s_churn, s_tmin, s_tmax, s_noise, solver):
    """Algorithm 2 of Karras et al. (2022): γ_i, σ̂_i, the churn std, and Euler / Heun / DPM-2 constants."""
    s = _grid(sigmas)
    cur, nxt = s[:-1], s[1:]
    steps = len(cur)
    gamma = np.where((s_tmin <= cur) & (cur <= s_tmax), min(s_churn / steps, math.sqrt(2) - 1), 0.0)
    hat = cur * (gamma + 1)
    std = np.where(gamma > 0, s_noise * np.sqrt(np.maximum(hat**2 - cur**2, 0.0)), 0.0)
    # dpm_2's midpoint in log σ (Lu et al. 2022a, DPM-Solver-2 with r = ½); only used where σ_{i+1} > 0.
    with np.errstate(divide="ignore"):
        mid = np.exp(np.log(hat) + 0.5 * (np.log(np.where(nxt > 0, nxt, hat)) - np.log(hat)))
    second = (nxt > 0) if solver != "euler" else np.zeros(steps, bool)
    consts = dict(sigma_hat=hat, std=std, h=nxt - hat, sigma_next=np.where(nxt > 0, nxt, hat), sigma_mid=mid,
                  h_mid=mid - hat)
    return _Plan(consts, second, _draw_table(np.ones(steps, bool)), float(s[0]))


def _plan_ancestral(sigmas, eta, s_noise, kind):
    """euler_ancestral / dpm_2_ancestral / dpmpp_2s_ancestral: the split per step and its constants."""
    s = _grid(sigmas)
    cur, nxt = s[:-1], s[1:]
    down, up = ancestral_step(cur, nxt, eta)
    second = (down > 0) if kind != "euler" else np.zeros(len(cur), bool)
    safe_down = np.where(down > 0, down, cur)
    lam, lam_down = _lam(cur), _lam(safe_down)
    if kind == "dpm_2":  # midpoint in log σ between σ_i and σ↓
        mid = np.exp(np.log(cur) + 0.5 * (np.log(safe_down) - np.log(cur)))
        consts = dict(sigma_mid=mid, h_mid=mid - cur)
        drawn = down > 0  # dpm_2_ancestral neither draws nor re-noises on a σ↓ = 0 step
    else:  # DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1 with r = ½): λ_s = λ + h/2
        h = lam_down - lam
        lam_s = lam + 0.5 * h
        consts = dict(sigma_mid=_sig(lam_s), a_mid=_sig(lam_s) / _sig(lam), e_mid=np.expm1(-0.5 * h),
                      a_full=_sig(lam_down) / _sig(lam), e_full=np.expm1(-h))
        drawn = nxt > 0
    consts.update(sigma=cur, h=down - cur, std=np.where(drawn, s_noise * up, 0.0))
    return _Plan(consts, second, _draw_table(drawn), float(s[0]))


def _lms_coefficients(s, order):
    """c[i, j] = ∫_{σ_i}^{σ_{i+1}} ℓ_{i,j}(τ) dτ, the Lagrange basis on σ_i … σ_{i−q+1}, q = min(i+1, order).

    Exact polynomial integrals (in τ − σ_i, to keep the monomial basis well conditioned). float64 [S, order].
    """
    P = np.polynomial.Polynomial
    steps = len(s) - 1
    c = np.zeros((steps, order))
    for i in range(steps):
        q = min(i + 1, order)
        nodes = s[i - np.arange(q)] - s[i]
        for j in range(q):
            others = np.delete(nodes, j)
            basis = P.fromroots(others) / np.prod(nodes[j] - others) if q > 1 else P([1.0])
            c[i, j] = basis.integ()(s[i + 1] - s[i])
    return c


def _plan_lms(sigmas, order):
    s = _grid(sigmas)
    if not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"lms order must be a positive integer, got {order!r}")
    steps = len(s) - 1
    return _Plan(dict(sigma=s[:-1], c=_lms_coefficients(s, order)), np.zeros(steps, bool),
                 _draw_table(np.zeros(steps, bool)), float(s[0]))


def _plan_dpmpp_sde(sigmas, eta, s_noise, r):
    """DPM-Solver++ SDE, two stages per step (Lu et al. 2022b; k-diffusion's `sample_dpmpp_sde`)."""
    s = _grid(sigmas)
    cur, nxt = s[:-1], s[1:]
    last = nxt == 0
    lam, lam_n = _lam(cur), _lam(np.where(last, cur / 2, nxt))  # the last step is Euler: dummies there
    h = lam_n - lam
    lam_s = lam + r * h
    sig_t = _sig(lam)  # k-diffusion's e^{log σ_i}, an ulp off σ_i at times
    down1, up1 = ancestral_step(sig_t, _sig(lam_s), eta)
    down2, up2 = ancestral_step(sig_t, _sig(lam_n), eta)
    lam_s_, lam_n_ = _lam(down1), _lam(down2)
    consts = dict(sigma=cur, h=nxt - cur, sigma_s=_sig(lam_s), a1=_sig(lam_s_) / sig_t, e1=np.expm1(lam - lam_s_),
                  std1=np.where(last, 0.0, s_noise * up1), a2=_sig(lam_n_) / sig_t, e2=np.expm1(lam - lam_n_),
                  std2=np.where(last, 0.0, s_noise * up2), fac=np.full_like(cur, 1 / (2 * r)))
    rho = np.sqrt((sig_t - _sig(lam_s)) / (sig_t - _sig(lam_n)))
    return _Plan(consts, ~last, _draw_table(~last, 2), float(s[0]), brownian_rho=rho)


def _plan_multistep(sigmas, eta, s_noise, kind, solver_type="midpoint"):
    """dpmpp_2m (Lu et al. 2022b, Alg. 2), dpmpp_2m_sde and dpmpp_3m_sde: x ← a x + A D + history terms.

    The history enters as k0 (D_i − D_{i−1}) + k1 (D_{i−1} − D_{i−2}); on the last step a = 0, A = 1, k = 0,
    so the output is D_{S−1} exactly, and the unused higher-order branch (r = 0 there) is never formed.
    """
    s = _grid(sigmas)
    cur, nxt = s[:-1], s[1:]
    steps = len(cur)
    last = nxt == 0
    lam = _lam(cur)
    lam_n = _lam(np.where(last, cur / 2, nxt))
    h = lam_n - lam
    h_prev = np.append(np.nan, h[:-1])
    r = h_prev / h  # h_{i−1}/h_i
    k0, k1 = np.zeros(steps), np.zeros(steps)
    has1 = (np.arange(steps) >= 1) & ~last
    has2 = (np.arange(steps) >= 2) & ~last
    if kind == "2m":
        a, big_a = _sig(lam_n) / _sig(lam), -np.expm1(-h)
        k0[has1] = (big_a / (2 * r))[has1]  # D' = (1 + 1/2r) D_i − (1/2r) D_{i−1}
        std = np.zeros(steps)
    else:
        big_h = h * (eta + 1)  # H = h + ηh
        big_a = -np.expm1(-big_h)
        phi2 = np.expm1(-big_h) / big_h + 1
        std = s_noise * nxt * np.sqrt(-np.expm1(-2 * eta * h)) if eta else np.zeros(steps)
        if kind == "2m_sde":
            a = nxt / cur * np.exp(-eta * h)  # the grid ratio, as k-diffusion has it
            k0[has1] = ((0.5 * big_a if solver_type == "midpoint" else phi2) * (1 / r))[has1]
        else:  # 3m_sde: third-order multistep in λ
            a = np.exp(-big_h)
            r0, r1 = r, np.append([np.nan, np.nan], h[:-2]) / h
            phi3 = phi2 / big_h - 0.5
            # φ2 d1 − φ3 d2 with d1 = δ0 + (δ0 − δ1) r0/(r0+r1), d2 = (δ0 − δ1)/(r0+r1), δ0 = (D−D1)/r0,
            # δ1 = (D1−D2)/r1, regrouped onto the two differences.
            only1 = has1 & ~has2
            k0[only1] = (phi2 / r0)[only1]
            k0[has2] = ((phi2 * (1 + r0 / (r0 + r1)) - phi3 / (r0 + r1)) / r0)[has2]
            k1[has2] = (-(phi2 * r0 - phi3) / ((r0 + r1) * r1))[has2]
    a, big_a, std = np.where(last, 0.0, a), np.where(last, 1.0, big_a), np.where(last, 0.0, std)
    consts = dict(sigma=cur, a=a, A=big_a, k0=k0, k1=k1, std=std)
    drawn = ~last & bool(eta) & (kind != "2m")  # with η = 0 the SDE samplers make no draws at all
    return _Plan(consts, np.zeros(steps, bool), _draw_table(drawn), float(s[0]))


# ---------------------------------------------------------------------------------------------- the driver
def _if(pred, true_fn, false_fn, *ops):
    """Static branch for a host bool, `lax.cond` for a traced one."""
    if isinstance(pred, (bool, np.bool_)):
        return true_fn(*ops) if pred else false_fn(*ops)
    return jax.lax.cond(pred, true_fn, false_fn, *ops)


def _dtype(latents):
    return latents.dtype if jnp.issubdtype(latents.dtype, jnp.floating) else jnp.float32


def _denoiser(denoise_fn, class_labels, n, dtype):
    """D(x; σ) for one scalar σ, broadcast to the [N] the contract promises, in the sampler's dtype."""
    return lambda x, sigma: jnp.asarray(denoise_fn(x, jnp.full((n,), sigma, dtype), class_labels), dtype)


def _normals(keys, index, shape, dtype):
    """Per-image unit normals: image i's draw `index` is normal(fold_in(key_i, index)). [N, *shape]."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), shape, dtype))(keys)


def _noise_source(plan: _Plan, latents, dtype, key, noise, needed: bool):
    """A function of a step's constants returning its draws [slots] (zeros when no noise is used)."""
    slots = plan.draw.shape[1]
    total = int((plan.draw >= 0).sum())
    if noise is not None:
        noise = jnp.asarray(noise, dtype)
        if noise.shape != (total, *latents.shape):
            raise ValueError(f"noise must have shape [num_draws, *latents.shape] = {(total, *latents.shape)} "
                             f"for this sampler and grid, got {noise.shape}")
        if total == 0:
            return lambda c: [jnp.zeros((), dtype)] * slots
        return lambda c: [noise[jnp.maximum(c["draw"][j], 0)] for j in range(slots)]
    if not needed:
        return lambda c: [jnp.zeros((), dtype)] * slots
    if key is None:
        raise ValueError("this sampler adds noise with these settings (η > 0 or churn): pass `key` or `noise`")
    keys = per_example_keys(key, latents.shape[0])

    def from_keys(c):
        z = [_normals(keys, c["draw"][j], latents.shape[1:], dtype) for j in range(slots)]
        if plan.brownian_rho is not None:  # W over the sub-interval given W over the whole one (a bridge)
            rho = c["brownian_rho"]
            z[0] = rho * z[1] + jnp.sqrt(1 - rho**2) * z[0]
        return z

    return from_keys


def _run(plan: _Plan, step: Callable, init: Callable, denoise_fn, latents, class_labels, key, noise):
    """x_0 = latents·σ_0; one scan over steps 0 … S−2, then step S−1; returns x_S (latents' shape/dtype).

    `step(den, carry, c, z, second) -> carry` with carry = (x, *history); `init(x) -> carry`.
    """
    latents = jnp.asarray(latents)
    dtype = _dtype(latents)
    needed = any(np.any(v != 0) for k, v in plan.consts.items() if k.startswith("std"))
    draws = _noise_source(plan, latents, dtype, key, noise, needed)
    den = _denoiser(denoise_fn, class_labels, latents.shape[0], dtype)
    consts = {k: jnp.asarray(v, dtype) for k, v in plan.consts.items()}
    consts["draw"] = jnp.asarray(plan.draw)
    consts["second"] = jnp.asarray(plan.second)
    if plan.brownian_rho is not None:
        consts["brownian_rho"] = jnp.asarray(np.nan_to_num(plan.brownian_rho), dtype)
    inner = plan.second[:-1]
    static = bool(inner[0]) if inner.size and np.all(inner == inner[0]) else None

    def body(carry, c):
        return step(den, carry, c, draws(c), c["second"] if static is None else static), None

    carry = init(latents.astype(dtype) * jnp.asarray(plan.x_scale, dtype))
    carry, _ = jax.lax.scan(body, carry, {k: v[:-1] for k, v in consts.items()})
    carry = step(den, carry, {k: v[-1] for k, v in consts.items()}, draws({k: v[-1] for k, v in consts.items()}),
                 bool(plan.second[-1]))
    return carry[0]


def _slope(den, x, sigma):
    """d(x; σ) = (x − D(x; σ))/σ, the probability-flow ODE's dx/dσ (Karras et al. 2022, Eq. 4)."""
    return (x - den(x, sigma)) / sigma


def _single(x):
    return (x,)


# ------------------------------------------------------------------------------------- the step functions
def _step_churn(solver):
    def step(den, carry, c, z, second):
        (x,) = carry
        x_hat = x + c["std"] * z[0]  # Alg. 2 line 5: raise σ_i to σ̂_i
        d = _slope(den, x_hat, c["sigma_hat"])

        def two(x_hat, d):
            if solver == "heun":  # Alg. 2 lines 9–11: trapezoid with the slope at σ_{i+1}
                d2 = _slope(den, x_hat + c["h"] * d, c["sigma_next"])
                return x_hat + (d + d2) / 2 * c["h"]
            # dpm_2: the slope at the log-σ midpoint carries the whole step
            return x_hat + _slope(den, x_hat + c["h_mid"] * d, c["sigma_mid"]) * c["h"]

        return (_if(second, two, lambda x_hat, d: x_hat + d * c["h"], x_hat, d),)

    return step


def _step_ancestral(kind):
    def step(den, carry, c, z, second):
        (x,) = carry
        denoised = den(x, c["sigma"])
        d = (x - denoised) / c["sigma"]

        def two(x, denoised, d):
            if kind == "dpm_2":  # DPM-2 midpoint from σ_i to σ↓
                return x + _slope(den, x + d * c["h_mid"], c["sigma_mid"]) * c["h"]
            # DPM-Solver++(2S): u = (σ_s/σ) x − expm1(−h/2) D_i; x ← (σ↓/σ) x − expm1(−h) D(u; σ_s)
            u = c["a_mid"] * x - c["e_mid"] * denoised
            return c["a_full"] * x - c["e_full"] * den(u, c["sigma_mid"])

        x = _if(second, two, lambda x, denoised, d: x + d * c["h"], x, denoised, d)
        return (x + c["std"] * z[0],)  # re-noise from σ↓ to σ_{i+1} (std 0 where no draw)

    return step


def _step_lms(den, carry, c, z, second):
    """Linear multistep in σ: x_{i+1} = x_i + Σ_j c_{i,j} d_{i−j} over the last `order` slopes."""
    x, hist = carry
    d = _slope(den, x, c["sigma"])
    hist = jnp.concatenate([d[None], hist[:-1]])
    for j in range(hist.shape[0]):
        x = x + c["c"][j] * hist[j]
    return x, hist


def _step_dpmpp_sde(den, carry, c, z, second):
    (x,) = carry
    denoised = den(x, c["sigma"])

    def two(x, denoised):
        u = c["a1"] * x - c["e1"] * denoised + c["std1"] * z[0]  # stage 1, to σ_s = σ_i^{1−r} σ_{i+1}^r
        mixed = (1 - c["fac"]) * denoised + c["fac"] * den(u, c["sigma_s"])
        return c["a2"] * x - c["e2"] * mixed + c["std2"] * z[1]  # stage 2, to σ_{i+1}

    return (_if(second, two, lambda x, denoised: x + (x - denoised) / c["sigma"] * c["h"], x, denoised),)


def _step_multistep(den, carry, c, z, second):
    x, d1, d2 = carry
    denoised = den(x, c["sigma"])
    x = c["a"] * x + c["A"] * denoised
    x = x + c["k0"] * (denoised - d1) + c["k1"] * (d1 - d2)
    return x + c["std"] * z[0], denoised, d1


def _init_history(count):
    return lambda x: (x, *([jnp.zeros_like(x)] * count))


# ------------------------------------------------------------------------------------ public grid samplers
def _floats(**hyper):
    """Hyperparameters as Python floats (they shape the host plan, so they are static under jit)."""
    try:
        return [float(v) for v in hyper.values()]
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"sampler hyperparameters ({', '.join(hyper)}) must be Python numbers: they are static "
                        "under jax.jit") from None


def euler(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, s_churn=0.0, s_tmin=0.0,
          s_tmax=math.inf, s_noise=1.0):
    """Euler steps with Algorithm 2's churn (Karras et al. 2022): x_{i+1} = x̂ + (σ_{i+1} − σ̂_i) d(x̂; σ̂_i).

    γ_i = min(s_churn/S, √2 − 1) where s_tmin ≤ σ_i ≤ s_tmax; noise [S, *latents.shape] (one draw per step,
    used only where γ_i > 0). NFE S. Returns samples shaped like `latents`.
    """
    plan = _plan_churn(sigmas, *_floats(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise), "euler")
    return _run(plan, _step_churn("euler"), _single, denoise_fn, latents, class_labels, key, noise)


def heun(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, s_churn=0.0, s_tmin=0.0,
         s_tmax=math.inf, s_noise=1.0):
    """Algorithm 2 of Karras et al. (2022) on any grid: Heun steps, Euler onto σ = 0. NFE 2S − 1.

    Arguments as in `euler`. On `ksigmas.karras_sigmas` this is `sampling.edm_sampler`.
    """
    plan = _plan_churn(sigmas, *_floats(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise), "heun")
    return _run(plan, _step_churn("heun"), _single, denoise_fn, latents, class_labels, key, noise)


def dpm_2(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, s_churn=0.0, s_tmin=0.0,
          s_tmax=math.inf, s_noise=1.0):
    """DPM-Solver-2-like midpoint rule in log σ (Lu et al. 2022a, Alg. 1 with r = ½, in x): the slope at
    σ_m = √(σ̂_i σ_{i+1}) carries the step; Euler onto σ = 0. Churn as in `euler`. NFE 2S − 1."""
    plan = _plan_churn(sigmas, *_floats(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise), "dpm_2")
    return _run(plan, _step_churn("dpm_2"), _single, denoise_fn, latents, class_labels, key, noise)


def euler_ancestral(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, eta=1.0,
                    s_noise=1.0):
    """Euler to σ↓ then fresh noise of std s_noise·σ↑ (`ancestral_step(σ_i, σ_{i+1}, η)`). NFE S; S − 1 draws."""
    plan = _plan_ancestral(sigmas, *_floats(eta=eta, s_noise=s_noise), "euler")
    return _run(plan, _step_ancestral("euler"), _single, denoise_fn, latents, class_labels, key, noise)


def dpm_2_ancestral(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, eta=1.0,
                    s_noise=1.0):
    """DPM-2 midpoint step to σ↓, then noise of std s_noise·σ↑. Where σ↓ = 0 (the last step, or a capped η)
    it jumps to D with no noise and no draw. NFE 2 per step with σ↓ > 0, else 1; one draw per σ↓ > 0 step."""
    plan = _plan_ancestral(sigmas, *_floats(eta=eta, s_noise=s_noise), "dpm_2")
    return _run(plan, _step_ancestral("dpm_2"), _single, denoise_fn, latents, class_labels, key, noise)


def dpmpp_2s_ancestral(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, eta=1.0,
                       s_noise=1.0):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = ½) to σ↓, then noise s_noise·σ↑ wherever σ_{i+1} > 0.
    Euler where σ↓ = 0. NFE 2 per step with σ↓ > 0, else 1; S − 1 draws."""
    plan = _plan_ancestral(sigmas, *_floats(eta=eta, s_noise=s_noise), "dpmpp_2s")
    return _run(plan, _step_ancestral("dpmpp_2s"), _single, denoise_fn, latents, class_labels, key, noise)


def lms(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, order=4):
    """Linear multistep (Adams–Bashforth in σ on a non-uniform grid), orders 1, 2, … up to `order`. NFE S."""
    del key, noise  # deterministic; accepted for the common contract
    plan = _plan_lms(sigmas, order)
    init = lambda x: (x, jnp.zeros((order, *x.shape), x.dtype))
    return _run(plan, _step_lms, init, denoise_fn, latents, class_labels, None, None)


def dpmpp_sde(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, eta=1.0, s_noise=1.0,
              r=0.5):
    """DPM-Solver++ SDE, two stages per step (to λ + rh, then λ + h), each ancestral with η; Euler onto σ = 0.

    NFE 2S − 1; 2(S − 1) draws, for (σ_i, σ_s) and (σ_i, σ_{i+1}) (correlated Brownian increments).
    """
    plan = _plan_dpmpp_sde(sigmas, *_floats(eta=eta, s_noise=s_noise, r=r))
    return _run(plan, _step_dpmpp_sde, _single, denoise_fn, latents, class_labels, key, noise)


def dpmpp_2m(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): x_{i+1} = (σ_{i+1}/σ_i) x_i − expm1(−h_i) D', D' the
    second-order extrapolation of the last two denoised images; D_{S−1} on the last step. NFE S."""
    del key, noise
    plan = _plan_multistep(sigmas, 0.0, 1.0, "2m")
    return _run(plan, _step_multistep, _init_history(2), denoise_fn, latents, class_labels, None, None)


def dpmpp_2m_sde(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, eta=1.0, s_noise=1.0,
                 solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, App. / k-diffusion): exponential integrator of the SDE with
    H = (1 + η) h, second-order correction 'midpoint' or 'heun'. NFE S; S − 1 draws if η ≠ 0."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    plan = _plan_multistep(sigmas, *_floats(eta=eta, s_noise=s_noise), "2m_sde", solver_type)
    return _run(plan, _step_multistep, _init_history(2), denoise_fn, latents, class_labels, key, noise)


def dpmpp_3m_sde(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep in λ with H = (1 + η) h. NFE S; S − 1 draws if η ≠ 0."""
    plan = _plan_multistep(sigmas, *_floats(eta=eta, s_noise=s_noise), "3m_sde")
    return _run(plan, _step_multistep, _init_history(2), denoise_fn, latents, class_labels, key, noise)


def edm(denoise_fn, latents, class_labels=None, *, sigmas, key=None, noise=None, S_churn=0.0, S_min=0.0,
        S_max=math.inf, S_noise=1.0):
    """`sampling.edm_sampler`'s Heun sampler (Algorithm 2) on the given grid, with EDM's argument names."""
    return heun(denoise_fn, latents, class_labels, sigmas=sigmas, key=key, noise=noise, s_churn=S_churn,
                s_tmin=S_min, s_tmax=S_max, s_noise=S_noise)


# -------------------------------------------------------------------------- DPM-Solver (Lu et al. 2022a)
def _dpm_step(eps_fn, x, lam, lam_next, order, eps, r1=None, eps1=None):
    """One DPM-Solver-k step (Lu et al. 2022a, Alg. 1–2, noise-prediction form) from λ to λ_next.

    `eps` = ε(x; λ) is given, and `eps1` (ε at λ + r1 h) may be, so that an embedded pair shares them;
    returns (x', ε at λ + r1 h or None). Works with host (numpy) or traced λ.
    """
    xp = _xp(lam, lam_next)
    h = lam_next - lam
    sig_n = xp.exp(-lam_next)
    x1 = x - sig_n * xp.expm1(h) * eps  # DPM-Solver-1 (DDIM)
    if order == 1:
        return x1, None
    r1 = (0.5 if order == 2 else 1 / 3) if r1 is None else r1
    s1 = lam + r1 * h
    if eps1 is None:
        eps1 = eps_fn(x - xp.exp(-s1) * xp.expm1(r1 * h) * eps, s1)
    if order == 2:
        return x1 - sig_n / (2 * r1) * xp.expm1(h) * (eps1 - eps), eps1
    r2 = 2 / 3
    s2 = lam + r2 * h
    u2 = (x - xp.exp(-s2) * xp.expm1(r2 * h) * eps
          - xp.exp(-s2) * (r2 / r1) * (xp.expm1(r2 * h) / (r2 * h) - 1) * (eps1 - eps))
    eps2 = eps_fn(u2, s2)
    return x1 - sig_n / r2 * (xp.expm1(h) / h - 1) * (eps2 - eps), eps1


def _dpm_eps(den):
    """ε(x; λ) = (x − D(x; σ(λ)))/σ(λ), σ(λ) = e^{−λ}."""
    def eps(x, lam):
        sigma = jnp.exp(-lam) if isinstance(lam, jax.Array) else np.exp(-lam)
        return (x - den(x, sigma)) / sigma
    return eps


def _fast_orders(n):
    """m = ⌊n/3⌋ + 1 steps with orders (3, …, 3, 2, 1) if 3 | n, else (3, …, 3, n mod 3); they sum to n."""
    m = n // 3 + 1
    return [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]


def dpm_fast(denoise_fn, latents, class_labels=None, *, sigmas=None, key=None, noise=None, sigma_min=None,
             sigma_max=None, n=15, eta=0.0, s_noise=1.0):
    """DPM-Solver-fast (Lu et al. 2022a, §3.4): n evaluations in DPM-3 steps on a uniform λ grid, the last one
    or two of order 2 / 1. Ends at σ_min (no final denoising). x_0 = latents·σ_max.

    σ_min / σ_max default to the last positive and the first entry of `sigmas`. noise [m, *latents.shape],
    m = ⌊n/3⌋ + 1 (one draw per step, used if η > 0). NFE n. The order-3 steps are one `lax.scan`.
    """
    sigma_min, sigma_max, eta, s_noise = _floats(**_range(sigmas, sigma_min, sigma_max), eta=eta, s_noise=s_noise)
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (the number of evaluations) must be a positive integer, got {n!r}")
    orders = _fast_orders(n)
    lam_end = _lam(sigma_min)
    grid = np.linspace(_lam(sigma_max), lam_end, len(orders) + 1)
    lam, lam_n = grid[:-1], grid[1:]
    if eta:  # ancestral: step to λ(σ↓) (clipped to λ_end), then noise restoring variance σ(λ_n)²
        down, _ = ancestral_step(_sig(lam), _sig(lam_n), eta)
        lam_t = np.minimum(lam_end, _lam(down))
        std = s_noise * np.sqrt(_sig(lam_n) ** 2 - _sig(lam_t) ** 2)
    else:
        lam_t, std = lam_n, np.zeros_like(lam)
    latents = jnp.asarray(latents)
    dtype = _dtype(latents)
    plan = _Plan({"std": std}, np.zeros(len(lam), bool), _draw_table(np.ones(len(lam), bool)), sigma_max)
    draws = _noise_source(plan, latents, dtype, key, noise, bool(np.any(std > 0)))
    eps_fn = _dpm_eps(_denoiser(denoise_fn, class_labels, latents.shape[0], dtype))

    def step(x, c, order):
        x, _ = _dpm_step(eps_fn, x, c["lam"], c["lam_t"], order, eps_fn(x, c["lam"]))
        return x + c["std"] * draws(c)[0]

    consts = {"lam": jnp.asarray(lam, dtype), "lam_t": jnp.asarray(lam_t, dtype), "std": jnp.asarray(std, dtype),
              "draw": jnp.asarray(plan.draw)}
    threes = orders.count(3)
    x = latents.astype(dtype) * jnp.asarray(sigma_max, dtype)
    x, _ = jax.lax.scan(lambda x, c: (step(x, c, 3), None), x, {k: v[:threes] for k, v in consts.items()})
    for i in range(threes, len(orders)):
        x = step(x, {k: v[i] for k, v in consts.items()}, orders[i])
    return x


def _range(sigmas, sigma_min, sigma_max):
    """σ_min / σ_max given, or taken from a grid (its last positive and its first entry)."""
    if sigma_min is None or sigma_max is None:
        if sigmas is None:
            raise ValueError("pass sigma_min and sigma_max (or a grid `sigmas` to take them from)")
        s = _grid(sigmas)
        sigma_min = s[-2] if sigma_min is None else sigma_min
        sigma_max = s[0] if sigma_max is None else sigma_max
    if not 0 < float(sigma_min) < float(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return dict(sigma_min=sigma_min, sigma_max=sigma_max)


class _Adaptive(NamedTuple):
    """The while_loop state of `dpm_adaptive` (scalars are 0-d arrays)."""

    x: jax.Array
    x_prev: jax.Array
    lam: jax.Array
    h: jax.Array
    inv_errs: jax.Array  # [2]: 1/err of the last two accepted attempts (the PID memory)
    steps: jax.Array
    n_accept: jax.Array


def _adaptive_batch(den, x, noise_at, *, lam_end, order, rtol, atol, h_init, pcoeff, icoeff, dcoeff,
                    accept_safety, eta, s_noise, max_attempts):
    """Lu et al. (2022a, §3.3 / Alg. 4–5): an embedded DPM-Solver pair in λ with a PID step-size controller.

    The error is the RMS of (x_low − x_high)/δ over all of `x`, δ = max(atol, rtol·max(|x_low|, |x_prev|)).
    """
    eps_fn = _dpm_eps(den)
    dtype = x.dtype
    k = 1.5 if eta else order  # the controller's order
    b1, b2, b3 = (pcoeff + icoeff + dcoeff) / k, -(pcoeff + 2 * dcoeff) / k, dcoeff / k
    lam_end = jnp.asarray(lam_end, dtype)

    def attempt(st: _Adaptive):
        lam_t = jnp.minimum(lam_end, st.lam + st.h)
        if eta:  # ancestral: integrate to λ(σ↓) (clipped), then restore the variance σ(λ_t)²
            down, _ = ancestral_step(jnp.exp(-st.lam), jnp.exp(-lam_t), eta)
            lam_t_ = jnp.minimum(lam_end, -jnp.log(down))
            up = jnp.sqrt(jnp.exp(-lam_t) ** 2 - jnp.exp(-lam_t_) ** 2)
        else:
            lam_t_ = lam_t
        eps = eps_fn(st.x, st.lam)
        if order == 2:  # DPM-1 inside DPM-2
            x_low, _ = _dpm_step(eps_fn, st.x, st.lam, lam_t_, 1, eps)
            x_high, _ = _dpm_step(eps_fn, st.x, st.lam, lam_t_, 2, eps)
        else:  # DPM-2 (r1 = 1/3) inside DPM-3, sharing ε and ε1
            x_low, eps1 = _dpm_step(eps_fn, st.x, st.lam, lam_t_, 2, eps, r1=1 / 3)
            x_high, _ = _dpm_step(eps_fn, st.x, st.lam, lam_t_, 3, eps, eps1=eps1)
        delta = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_low), jnp.abs(st.x_prev)))
        err = jnp.sqrt(jnp.mean(((x_low - x_high) / delta) ** 2))
        inv = 1 / (err + 1e-8)
        prev = jnp.where(st.steps == 0, jnp.stack([inv, inv]), st.inv_errs)  # first attempt: E = [e, e, e]
        factor = inv**b1 * prev[0] ** b2 * prev[1] ** b3
        factor = 1 + jnp.arctan(factor - 1)  # limiter: f < 1 + π/2
        accept = factor >= accept_safety
        x_new = x_high
        if eta:
            x_new = x_high + up * s_noise * noise_at(st.n_accept)
        return _Adaptive(
            x=jnp.where(accept, x_new, st.x), x_prev=jnp.where(accept, x_low, st.x_prev),
            lam=jnp.where(accept, lam_t, st.lam), h=st.h * factor,
            inv_errs=jnp.where(accept, jnp.stack([inv, prev[0]]), prev),
            steps=st.steps + 1, n_accept=st.n_accept + accept.astype(jnp.int32))

    def running(st):
        return (st.lam < lam_end - 1e-5) & (st.steps < max_attempts)

    return attempt, running, jnp.zeros((), jnp.int32)


def dpm_adaptive(denoise_fn, latents, class_labels=None, *, sigmas=None, key=None, noise=None, sigma_min=None,
                 sigma_max=None, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                 accept_safety=0.81, eta=0.0, s_noise=1.0, batch_error=False, max_attempts=10_000):
    """Adaptive DPM-Solver (Lu et al. 2022a, §3.3): an embedded order-(k−1)/k pair in λ, PID-controlled.

    Integrates from σ_max to σ_min (no final denoising; x_0 = latents·σ_max) in a `lax.while_loop`, each
    attempt costing `order` (2 or 3) evaluations, accepted or not. The PID controller (exponents (p+i+d)/k,
    −(p+2d)/k, d/k with k = order, or 1.5 if η ≠ 0; limiter 1 + atan(f − 1)) accepts if f ≥ accept_safety and
    rescales h either way. One draw per accepted step, used only if η ≠ 0.

    batch_error: False (default, our convention) controls each image's error on its own, so an image never
    depends on its batch (a vmap over images; the batch runs until its slowest image is done, and info is
    per image [N]). True is k-diffusion's: one RMS over the whole batch, one step sequence for all.
    noise: [≥ n_accept, *latents.shape] draws (indexed by accepted step; NaN samples if it runs out).
    max_attempts bounds the loop (info['steps'] reaching it means the tolerance was not met).

    Returns:
      (samples shaped like `latents`, info) with info = {steps, nfe, n_accept, n_reject} as int32 arrays.
    """
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order!r}")
    rng = _range(sigmas, sigma_min, sigma_max)
    hyper = dict(zip(("sigma_min", "sigma_max", "rtol", "atol", "h_init", "pcoeff", "icoeff", "dcoeff",
                      "accept_safety", "eta", "s_noise"),
                     _floats(**rng, rtol=rtol, atol=atol, h_init=h_init, pcoeff=pcoeff, icoeff=icoeff,
                             dcoeff=dcoeff, accept_safety=accept_safety, eta=eta, s_noise=s_noise)))
    latents = jnp.asarray(latents)
    dtype = _dtype(latents)
    n = latents.shape[0]
    if hyper["eta"] and noise is None:
        if key is None:
            raise ValueError("dpm_adaptive with eta > 0 adds noise: pass `key` or `noise`")
        keys = per_example_keys(key, n)
    if noise is not None:
        noise = jnp.asarray(noise, dtype)
        if noise.ndim != latents.ndim + 1 or noise.shape[1:] != latents.shape:
            raise ValueError(f"noise must have shape [num_draws, *latents.shape] = [k, *{latents.shape}], "
                             f"got {noise.shape}")

    def solve(lat, labels, nz, ks):
        m = lat.shape[0]
        den = _denoiser(denoise_fn, labels, m, dtype)

        def noise_at(j):
            if nz is not None:
                return jnp.where(j < nz.shape[0], nz[jnp.minimum(j, nz.shape[0] - 1)], jnp.nan)
            return _normals(ks, j, lat.shape[1:], dtype)

        attempt, running, zero = _adaptive_batch(
            den, lat, noise_at, lam_end=_lam(hyper["sigma_min"]), order=order, rtol=hyper["rtol"],
            atol=hyper["atol"], h_init=hyper["h_init"], pcoeff=hyper["pcoeff"], icoeff=hyper["icoeff"],
            dcoeff=hyper["dcoeff"], accept_safety=hyper["accept_safety"], eta=hyper["eta"],
            s_noise=hyper["s_noise"], max_attempts=max_attempts)
        x = lat.astype(dtype) * jnp.asarray(hyper["sigma_max"], dtype)
        st = _Adaptive(x, x, jnp.asarray(_lam(hyper["sigma_max"]), dtype), jnp.asarray(abs(hyper["h_init"]), dtype),
                       jnp.ones(2, dtype), zero, zero)
        st = jax.lax.while_loop(running, attempt, st)
        info = dict(steps=st.steps, nfe=st.steps * order, n_accept=st.n_accept, n_reject=st.steps - st.n_accept)
        return st.x, info

    ks = keys if hyper["eta"] and noise is None else None
    if batch_error:
        return solve(latents, class_labels, noise, ks)
    # Per-image control: each image is its own batch of one under vmap.
    one = lambda a: None if a is None else a[None]
    per_image = lambda lat, labels, nz, k: solve(lat[None], one(labels), None if nz is None else nz[:, None],
                                                  one(k))
    x, info = jax.vmap(per_image, in_axes=(0, None if class_labels is None else 0,
                                           None if noise is None else 1, None if ks is None else 0))(
        latents, class_labels, noise, ks)
    return x[:, 0], info


# ----------------------------------------------------------------------------------- registry and counts
KSAMPLERS = {
    "euler": euler, "heun": heun, "dpm_2": dpm_2, "euler_ancestral": euler_ancestral,
    "dpm_2_ancestral": dpm_2_ancestral, "lms": lms, "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpm_fast": dpm_fast, "dpm_adaptive": dpm_adaptive, "edm": edm,
}

_PLANNERS = {
    "euler": lambda s, **k: _plan_churn(s, k["s_churn"], k["s_tmin"], k["s_tmax"], k["s_noise"], "euler"),
    "heun": lambda s, **k: _plan_churn(s, k["s_churn"], k["s_tmin"], k["s_tmax"], k["s_noise"], "heun"),
    "dpm_2": lambda s, **k: _plan_churn(s, k["s_churn"], k["s_tmin"], k["s_tmax"], k["s_noise"], "dpm_2"),
    "edm": lambda s, **k: _plan_churn(s, k["S_churn"], k["S_min"], k["S_max"], k["S_noise"], "heun"),
    "euler_ancestral": lambda s, **k: _plan_ancestral(s, k["eta"], k["s_noise"], "euler"),
    "dpm_2_ancestral": lambda s, **k: _plan_ancestral(s, k["eta"], k["s_noise"], "dpm_2"),
    "dpmpp_2s_ancestral": lambda s, **k: _plan_ancestral(s, k["eta"], k["s_noise"], "dpmpp_2s"),
    "lms": lambda s, **k: _plan_lms(s, k["order"]),
    "dpmpp_sde": lambda s, **k: _plan_dpmpp_sde(s, k["eta"], k["s_noise"], k["r"]),
    "dpmpp_2m": lambda s, **k: _plan_multistep(s, 0.0, 1.0, "2m"),
    "dpmpp_2m_sde": lambda s, **k: _plan_multistep(s, k["eta"], k["s_noise"], "2m_sde", k["solver_type"]),
    "dpmpp_3m_sde": lambda s, **k: _plan_multistep(s, k["eta"], k["s_noise"], "3m_sde"),
}


def _hyper(name, hyper):
    """The sampler's keyword defaults updated with `hyper` (unknown names are an error)."""
    if name not in KSAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(KSAMPLERS)}")
    params = {k: p.default for k, p in inspect.signature(KSAMPLERS[name]).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("sigmas", "key", "noise")}
    unknown = set(hyper) - set(params)
    if unknown:
        raise TypeError(f"{name} takes no argument(s) {sorted(unknown)}; it takes {sorted(params)}")
    return {**params, **hyper}


def nfe(name, sigmas=None, **hyper):
    """Denoiser evaluations `KSAMPLERS[name]` makes on this grid (None for dpm_adaptive: see its info)."""
    hyper = _hyper(name, hyper)
    if name == "dpm_adaptive":
        return None
    if name == "dpm_fast":
        return int(hyper["n"])
    plan = _PLANNERS[name](sigmas, **hyper)
    return int(len(plan.second) + plan.second.sum())


def num_draws(name, sigmas=None, **hyper):
    """The length of the `noise` array `KSAMPLERS[name]` takes (None for dpm_adaptive: n_accept)."""
    hyper = _hyper(name, hyper)
    if name == "dpm_adaptive":
        return None
    if name == "dpm_fast":
        return len(_fast_orders(int(hyper["n"])))
    return int((_PLANNERS[name](sigmas, **hyper).draw >= 0).sum())
