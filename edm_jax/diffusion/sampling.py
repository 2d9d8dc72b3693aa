"""Deterministic and stochastic samplers (Karras et al. 2022, Algorithms 1 and 2) as one `lax.scan`.

Both samplers integrate the probability-flow ODE (Eq. 4)

    dx/dt = (σ'(t)/σ(t) + s'(t)/s(t)) · x − σ'(t) s(t)/σ(t) · D(x/s(t); σ(t))

from t_0 down to t_N = 0 with Euler or Heun steps, optionally adding "churn" noise before each step
(Algorithm 2: σ is raised from t_i to t̂_i = t_i (1 + γ_i) and fresh noise of variance t̂² − t_i² is added).
Comments "Alg. 2 line k" below point at the line of the paper's Algorithm 2 that a constant or an
array operation implements; with σ(t) = t and s(t) = 1 (edm_sampler) the generalised forms here reduce
to exactly that line (p = q = 1/t̂, scale = 1, inv_s = 1), and other σ(t), s(t) are Algorithm 1's forms.

Every scalar of every step (t̂, σ(t̂), s(t̂), σ'/σ, …) depends only on hyperparameters, so it is computed
once on the host in float64 (as the reference does) and fed to the scan as per-step constants; the scan
body is then a handful of fused array ops around the denoiser calls. The last step, which lands on σ = 0,
is always Euler (so Heun costs NFE = 2N − 1), and lives outside the scan so that no step pays for a
branch it does not take.

`denoise_fn(x, sigma, class_labels)` receives `x` with the latents' shape and `sigma` of shape [N]; the
samplers never look at any other axis, so any layout works. Hyperparameters must be Python numbers (they
are static under `jax.jit`); the latents, class labels, key and noise may be traced.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion import schedules
from edm_jax.diffusion.rng import per_example_keys

__all__ = ["edm_sampler", "ablation_sampler", "SOLVERS"]

SOLVERS = ("euler", "heun")


class _Plan(NamedTuple):
    """Per-step constants, each float64 [N] (N = num_steps), plus the initial scale of the latents.

    Step i: x̂ = scale_i·x + noise_std_i·ε_i; d = p·x̂ − q·D(x̂·inv_s; σ) at t̂ (the "hat" entries) and at
    t' = t̂ + αh (the "prime" entries); x_{i+1} = x̂ + h·(w1·d + w2·d').
    """

    scale: np.ndarray        # s(t̂_i)/s(t_i); 1 in Alg. 2 line 6 (x̂_i starts from x_i itself)
    noise_std: np.ndarray    # √(t̂_i² − t_i²)·S_noise (times s(t̂_i)): Alg. 2 lines 4 and 6's noise scale
    sigma_hat: np.ndarray    # t̂_i = t_i + γ_i t_i, the σ the first D call sees: Alg. 2 line 5
    inv_s_hat: np.ndarray    # 1/s(t̂_i); 1 in Alg. 2 (D is evaluated at x̂_i itself, line 7)
    p_hat: np.ndarray        # p, q of d_i = p·x̂_i − q·D(x̂_i; t̂_i); both 1/t̂_i in Alg. 2 line 7
    q_hat: np.ndarray
    h: np.ndarray            # t_{i+1} − t̂_i, the step of Alg. 2 lines 8 and 11
    sigma_prime: np.ndarray  # t_{i+1} (α = 1), the σ of the second D call: Alg. 2 line 10
    inv_s_prime: np.ndarray  # as the "hat" entries, at t_{i+1}: d'_i of Alg. 2 line 10
    p_prime: np.ndarray
    q_prime: np.ndarray
    x0_scale: float          # t_0 (times s(t_0)): x_0 = t_0 · unit normals, Alg. 2 line 2
    alpha: float


def _make_plan(num_steps, sigma_min, sigma_max, rho, solver, discretization, schedule, scaling, epsilon_s,
               C_1, C_2, M, alpha, S_churn, S_min, S_max, S_noise, round_sigma) -> _Plan:
    """All step scalars of the generalised sampler (reference `ablation_sampler`), float64 on the host."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer ≥ 2 (it is static under jit), got {num_steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {list(SOLVERS)}")
    try:
        hyper = [float(v) for v in (sigma_min, sigma_max, rho, epsilon_s, alpha, S_churn, S_min, S_max, S_noise)]
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError("sampler hyperparameters (σ range, ρ, α, S_churn, S_min, S_max, S_noise) must be "
                        "Python numbers: they are static under jax.jit") from None
    sigma_min, sigma_max, rho, epsilon_s, alpha, S_churn, S_min, S_max, S_noise = hyper
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    rnd = _host_round_sigma(round_sigma)

    sched = schedules.make_schedule(schedule, sigma_min, sigma_max, epsilon_s)
    scal = schedules.make_scaling(scaling, sched)
    sig_steps = schedules.sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho=rho,
                                      epsilon_s=epsilon_s, C_1=C_1, C_2=C_2, M=M)
    t_cur = sched.sigma_inv(rnd(sig_steps))
    t_next = np.append(t_cur[1:], 0.0)

    sig_cur = sched.sigma(t_cur)
    gamma = np.where((S_min <= sig_cur) & (sig_cur <= S_max), min(S_churn / num_steps, math.sqrt(2) - 1), 0.0)
    t_hat = sched.sigma_inv(rnd(sig_cur * (1 + gamma)))
    sig_hat = sched.sigma(t_hat)
    noise_std = np.sqrt(np.maximum(sig_hat**2 - sig_cur**2, 0.0)) * scal.s(t_hat) * S_noise
    h = t_next - t_hat
    t_prime = t_hat + alpha * h

    def slope_coefficients(t):  # d = p·x − q·D(x/s; σ) (Eq. 4's right-hand side)
        sig, dsig, s, ds = sched.sigma(t), sched.sigma_deriv(t), scal.s(t), scal.s_deriv(t)
        return 1 / s, dsig / sig + ds / s, dsig * s / sig

    inv_s_hat, p_hat, q_hat = slope_coefficients(t_hat)
    # t' reaches 0 only on the last step, which is Euler and never evaluates there.
    safe_t_prime = np.where(t_prime > 0, t_prime, t_hat)
    inv_s_prime, p_prime, q_prime = slope_coefficients(safe_t_prime)
    x0_scale = float(sched.sigma(t_cur[:1])[0] * scal.s(t_cur[:1])[0])
    return _Plan(scal.s(t_hat) / scal.s(t_cur), noise_std, sig_hat, inv_s_hat, p_hat, q_hat, h,
                 sched.sigma(safe_t_prime), inv_s_prime, p_prime, q_prime, x0_scale, alpha)


def _host_round_sigma(round_sigma):
    """Evaluate a (possibly jnp-based) round_sigma eagerly on host float64 arrays."""
    if round_sigma is None:
        return lambda s: s

    def rnd(sig):
        with jax.ensure_compile_time_eval():
            out = round_sigma(np.asarray(sig))
        return np.asarray(out, np.float64)

    return rnd


def _run(denoise_fn: Callable, latents, class_labels, plan: _Plan, heun: bool, key, noise):
    """Integrate with a scan over steps 0 … N−2 (Heun or Euler) and a final Euler step to σ = 0."""
    latents = jnp.asarray(latents)
    dtype = latents.dtype if jnp.issubdtype(latents.dtype, jnp.floating) else jnp.float32
    n = latents.shape[0]
    num_steps = len(plan.h)
    stochastic = bool(np.any(plan.noise_std > 0))
    consts = {k: jnp.asarray(v, dtype) for k, v in plan._asdict().items() if isinstance(v, np.ndarray)}
    consts["step"] = jnp.arange(num_steps)

    if noise is not None:
        noise = jnp.asarray(noise, dtype)
        if noise.shape != (num_steps, *latents.shape):
            raise ValueError(f"noise must have shape [num_steps, *latents.shape] = "
                             f"{(num_steps, *latents.shape)}, got {noise.shape}")
        consts["noise"] = noise
    elif stochastic:
        if key is None:
            raise ValueError("churn is active (S_churn > 0 in [S_min, S_max]): pass `key` or `noise`")
        keys = per_example_keys(key, n)

    def step_noise(c):
        if noise is not None:
            return c["noise"]
        if not stochastic:
            return None
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, c["step"]), latents.shape[1:], dtype))(keys)

    def evaluate(x, sigma, inv_s, p, q):
        denoised = denoise_fn(x * inv_s, jnp.full((n,), sigma, dtype), class_labels)
        return p * x - q * jnp.asarray(denoised, dtype)

    def step(x, c, second_order):
        eps = step_noise(c)                                                      # Alg. 2 line 4
        x_hat = c["scale"] * x if eps is None else c["scale"] * x + c["noise_std"] * eps  # line 6 (t̂: line 5)
        d = evaluate(x_hat, c["sigma_hat"], c["inv_s_hat"], c["p_hat"], c["q_hat"])      # line 7
        if not second_order:  # the last step (t_{i+1} = 0, line 9 false) or the Euler solver
            return x_hat + c["h"] * d                                            # line 8
        x_prime = x_hat + plan.alpha * c["h"] * d                                # line 8 (α = 1)
        d_prime = evaluate(x_prime, c["sigma_prime"], c["inv_s_prime"], c["p_prime"], c["q_prime"])  # line 10
        w = 1 / (2 * plan.alpha)
        return x_hat + c["h"] * ((1 - w) * d + w * d_prime)                      # line 11 (½, ½ at α = 1)

    x = latents.astype(dtype) * jnp.asarray(plan.x0_scale, dtype)                # Alg. 2 line 2
    body = {k: v[:-1] for k, v in consts.items()}
    # Alg. 2 line 3's loop: steps 0 … N−2 in the scan, where t_{i+1} ≠ 0 (line 9 true) ...
    x, _ = jax.lax.scan(lambda x, c: (step(x, c, heun), None), x, body)
    # ... and step N−1, which lands on t_N = 0 (line 9 false), outside it; its result is x_N (line 12).
    return step(x, {k: v[-1] for k, v in consts.items()}, False)


def ablation_sampler(denoise_fn, latents, class_labels=None, *, key=None, noise=None, num_steps=18,
                     sigma_min=None, sigma_max=None, rho=7, solver="heun", discretization="edm",
                     schedule="linear", scaling="none", epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000,
                     alpha=1, S_churn=0, S_min=0, S_max=math.inf, S_noise=1, round_sigma=None):
    """The generalised sampler of the paper's ablations (Algorithm 1 for any σ(t), s(t), with churn).

    Args:
      denoise_fn: `D(x, sigma, class_labels)`, `x` shaped like `latents`, `sigma` [N]; returns x's shape.
      latents: [N, ...] unit normals (float32, or float64 when x64 is on); scaled by σ(t_0)·s(t_0) here.
      class_labels: passed to `denoise_fn` untouched (e.g. [N, label_dim] one-hot, or None).
      key: one key (image i uses `fold_in(key, i)`) or N keys, one per image; step j's noise for image i
        is `normal(fold_in(key_i, j))`, so an image never depends on the rest of its batch.
      noise: [num_steps, *latents.shape] unit normals, step i uses noise[i]; overrides `key`.
      num_steps: N ≥ 2 (static). sigma_min / sigma_max: None takes the discretisation's default range
        (`schedules.default_sigma_range`); clamp them to your network's range before calling.
      solver: 'euler' | 'heun' (Heun's second evaluation at t̂ + αh, weights 1 − 1/2α and 1/2α).
      discretization: 'vp' | 've' | 'iddpm' | 'edm'. schedule: 'vp' | 've' | 'linear'. scaling: 'vp' | 'none'.
      epsilon_s, C_1, C_2, M, rho: parameters of the vp / iddpm / edm discretisations.
      S_churn, S_min, S_max, S_noise: Algorithm 2's stochasticity (γ = min(S_churn/N, √2 − 1) where
        S_min ≤ σ(t_i) ≤ S_max).
      round_sigma: the network's σ rounding (iDDPM), applied to every σ the denoiser sees; None = identity.

    Returns:
      Samples with the shape of `latents`, in the latents' floating dtype.
    """
    if sigma_min is None or sigma_max is None:
        default_min, default_max = schedules.default_sigma_range(discretization, epsilon_s)
        sigma_min = default_min if sigma_min is None else sigma_min
        sigma_max = default_max if sigma_max is None else sigma_max
    plan = _make_plan(num_steps, sigma_min, sigma_max, rho, solver, discretization, schedule, scaling,
                      epsilon_s, C_1, C_2, M, alpha, S_churn, S_min, S_max, S_noise, round_sigma)
    return _run(denoise_fn, latents, class_labels, plan, solver == "heun", key, noise)


def edm_sampler(denoise_fn, latents, class_labels=None, *, key=None, noise=None, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=math.inf, S_noise=1, round_sigma=None):
    """The paper's sampler: Heun steps on the σ(t) = t, s(t) = 1 ODE over the Eq. 5 grid (Algorithm 2).

    With S_churn = 0 this is Algorithm 1 (deterministic, NFE = 2·num_steps − 1). Arguments as in
    `ablation_sampler`; defaults are the paper's CIFAR-10 settings (18 steps, σ ∈ [0.002, 80], ρ = 7).
    """
    return ablation_sampler(denoise_fn, latents, class_labels, key=key, noise=noise, num_steps=num_steps,
                            sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, solver="heun",
                            discretization="edm", schedule="linear", scaling="none", alpha=1, S_churn=S_churn,
                            S_min=S_min, S_max=S_max, S_noise=S_noise, round_sigma=round_sigma)
