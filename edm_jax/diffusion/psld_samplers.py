"""Samplers for PSLD / CLD / VP-SDE (Pandey & Mandt 2023, §4 and Eq. 11), and classifier guidance for them.

Contract: `sampler(eps_fn, z_T, class_labels=None, *, sde, num_steps, key=None, noise=None, ...)`,
`eps_fn(z, t [N], class_labels)` the network's noise prediction at forward time t; the score conversion is
the process's. Samplers run in reverse time τ = T − t over [0, T − ε_eval], then one denoising step to
t = 0 (the reference's `denoise: true`). `noise` [draws, *z_T.shape] gives the unit normals explicitly
(parity); otherwise draw i of image n is `normal(fold_in(fold_in(key, n), i))`, so an image never
depends on its batch. Each returns `(z_0, aux)` with aux['states'] (state before every step and after each)
and aux['nfe'] (network calls per image).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion.psld import _apply, _bc
from edm_jax.diffusion.rng import per_example_keys

__all__ = ["time_grid", "em_sampler", "sscs_sampler", "ode_sampler", "ode_adaptive_sampler",
           "psld_classifier_guided"]


def time_grid(sde, num_steps: int, stride: str = "uniform"):
    """Reverse times τ_i, i = 0..K = num_steps − 1, on [0, T − ε_eval] (host float64, [num_steps])."""
    u = np.arange(num_steps, dtype=np.float64) / (num_steps - 1)
    end = sde.T - sde.eval_eps
    if stride == "uniform":
        return end * u
    if stride == "quadratic":
        return end * (1.0 - (1.0 - u) ** 2)  # dense near the data end
    raise ValueError(f"stride must be 'uniform' or 'quadratic', got {stride!r}.")


def _noise_source(key, noise, z):
    """draw(i) → unit normals of z's shape: from `noise[i]`, or per-image keys folded with i."""
    if noise is not None:
        noise = jnp.asarray(noise, z.dtype)
        return lambda i: noise[i]
    if key is None:
        raise ValueError("this sampler draws noise: pass key or noise.")
    keys = per_example_keys(key, z.shape[0])
    return lambda i: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), z.shape[1:], z.dtype))(keys)


def _eps_at(eps_fn, z, tau, sde, labels):
    return eps_fn(z, jnp.full((z.shape[0],), sde.T - tau, z.dtype), labels)


def _denoise(eps_fn, z, sde, labels, ode):
    """z + f̄(z, T − ε_eval)·ε_eval: the reference's final mean step (no noise)."""
    tau = sde.T - sde.eval_eps
    return z + sde.reverse_drift(z, tau, _eps_at(eps_fn, z, tau, sde, labels), ode=ode) * sde.eval_eps


def _scan_steps(step, z, taus, n_extra=0):
    """Run `step(z, (i, τ_i, Δτ_i)) → z` over the grid with one lax.scan; states [K+1, *z.shape]."""
    taus = np.asarray(taus, np.float64)
    xs = (jnp.arange(len(taus) - 1), jnp.asarray(taus[:-1], z.dtype), jnp.asarray(np.diff(taus), z.dtype))
    z_end, states = jax.lax.scan(lambda c, x: (step(c, x),) * 2, z, xs)
    return z_end, jnp.concatenate([z[None], states], axis=0)


def em_sampler(eps_fn: Callable, z_T, class_labels=None, *, sde, num_steps: int, stride="uniform", key=None,
               noise=None):
    """Euler–Maruyama on the reverse SDE: z ← z + f̄ Δτ + G √Δτ ξ_i (K = num_steps − 1 steps, one draw each),
    then the denoising step; num_steps network calls."""
    draw = _noise_source(key, noise, z_T)

    def step(z, x):
        i, tau, dtau = x
        drift = sde.reverse_drift(z, tau, _eps_at(eps_fn, z, tau, sde, class_labels))
        return z + drift * dtau + sde.diffusion_like(z, sde.T - tau) * jnp.sqrt(dtau) * draw(i)

    z, states = _scan_steps(step, z_T, time_grid(sde, num_steps, stride))
    return _denoise(eps_fn, z, sde, class_labels, ode=False), {"states": states, "nfe": num_steps}


def _sscs_linear(sde, z, tau, h, xi):
    """Exact solution of SSCS's linear part dz = (β/2) Ã z dτ + G dW over reverse interval [τ, τ + h]:
    mean Ẽ(δ) z, covariance K̃(δ) + ε_num I, δ = b(T − τ) − b(T − τ − h), Ã = A with off-diagonals negated."""
    t = sde.T - tau
    delta = sde.b(t) - sde.b(t - h)
    mean = _apply(sde._expm(delta, sign=-1.0), z)
    return mean + _apply(sde.factor(sde._cov_b(delta, sign=-1.0)), xi)


def _sscs_score_step(sde, z, tau, h, eps_net):
    """SSCS's S part (Euler): x += hβΓ(s_x + x), m += hβMν(s_m + M⁻¹ m), β and s at t = T − τ."""
    t = sde.T - tau
    s = sde.score_from_eps(eps_net, t, z)
    beta = sde.beta(t)
    c = z.shape[-1] // 2
    gx, gm = beta * sde.gamma, beta * sde.M * sde.nu
    x = z[..., :c] + _bc(h * gx, z) * (s[..., :c] + z[..., :c])
    m = z[..., c:] + _bc(h * gm, z) * (s[..., c:] + sde.m_inv * z[..., c:])
    return jnp.concatenate([x, m], axis=-1)


def sscs_sampler(eps_fn: Callable, z_T, class_labels=None, *, sde, num_steps: int, stride="uniform", key=None,
                 noise=None):
    """Symmetric splitting CLD sampler (Dockhorn et al. 2022, adapted by PSLD): per step A(h/2), S(h), A(h/2).

    Reference-exact: both A halves use the interval starting at τ and S uses β, s at τ (the same as the
    textbook splitting for constant β); draws 2i, 2i+1 per step and one discarded by the denoising step.
    """
    draw = _noise_source(key, noise, z_T)

    def step(z, x):
        i, tau, h = x
        z = _sscs_linear(sde, z, tau, h / 2, draw(2 * i))
        z = _sscs_score_step(sde, z, tau, h, _eps_at(eps_fn, z, tau, sde, class_labels))
        return _sscs_linear(sde, z, tau, h / 2, draw(2 * i + 1))

    z, states = _scan_steps(step, z_T, time_grid(sde, num_steps, stride))
    return _denoise(eps_fn, z, sde, class_labels, ode=False), {"states": states, "nfe": num_steps}


def ode_sampler(eps_fn: Callable, z_T, class_labels=None, *, sde, num_steps: int, solver="euler"):
    """Probability-flow ODE dz/dτ = f̄_ODE with fixed uniform steps (Euler: order 1, Heun: order 2) on
    [0, T − ε_eval], then the ODE denoising step. NFE = num_steps (Euler) or 2·num_steps (Heun), + 1."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}.")
    f = lambda z, tau: sde.reverse_drift(z, tau, _eps_at(eps_fn, z, tau, sde, class_labels), ode=True)

    def step(z, x):
        _, tau, h = x
        d = f(z, tau)
        if solver == "euler":
            return z + h * d
        return z + 0.5 * h * (d + f(z + h * d, tau + h))

    taus = (sde.T - sde.eval_eps) * np.arange(num_steps + 1) / num_steps
    z, states = _scan_steps(step, z_T, taus)
    nfe = num_steps * (1 if solver == "euler" else 2) + 1
    return _denoise(eps_fn, z, sde, class_labels, ode=True), {"states": states, "nfe": nfe}


def ode_adaptive_sampler(eps_fn: Callable, z_T, class_labels=None, *, sde, rtol=1e-5, atol=1e-5,
                         per_image=True, max_steps=4096):
    """Probability-flow ODE with Dormand–Prince 5(4) (diffrax `Dopri5`) under scipy RK45's step-size
    control (`rk45_control.ScipyRK45Controller`: RMS error norm, safety 0.9, factors in [0.2, 10], scipy's
    initial step), then the ODE denoising step.

    per_image=True (default): each image its own step-size control, so image n does not depend on the
    rest of the batch. per_image=False: the batch is one ODE system, as the reference's RK45 solves it.
    aux['nfe'] [N] = 6·attempted steps + 3 (Dopri5's FSAL stages, the initial f twice and the initial-step
    probe) + 1; the reference counts scipy's 6·steps + 2, + 1.
    """
    import diffrax  # only this sampler needs it
    from edm_jax.diffusion.rk45_control import ScipyRK45Controller

    def solve(z0, labels):
        def vf(tau, z, _):
            return sde.reverse_drift(z, tau, _eps_at(eps_fn, z, tau, sde, labels), ode=True)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf), diffrax.Dopri5(), t0=0.0, t1=sde.T - sde.eval_eps, dt0=None, y0=z0,
            stepsize_controller=ScipyRK45Controller(rtol=rtol, atol=atol), max_steps=max_steps,
            saveat=diffrax.SaveAt(t1=True))
        return sol.ys[-1], 6 * sol.stats["num_steps"] + 3

    if per_image:
        z, nfe = jax.vmap(lambda z0, y: solve(z0[None], None if y is None else y[None]),
                          in_axes=(0, None if class_labels is None else 0))(z_T, class_labels)
        z = z[:, 0]
    else:
        z, nfe = solve(z_T, class_labels)
        nfe = jnp.full((z_T.shape[0],), nfe)
    return _denoise(eps_fn, z, sde, class_labels, ode=True), {"nfe": nfe + 1}


def psld_classifier_guided(eps_fn: Callable, log_prob_fn: Callable, scale, *, sde) -> Callable:
    """ε̂ of the guided score s + scale·∇_z log p(y | z, t): the reverse SDE drift gains scale·G²∇ log p
    (the reference's `cc_em_sde`), the PF-ODE drift half of it. Returns an eps_fn of the same signature,
    so every sampler above takes it unchanged.

    log_prob_fn(z, t [N], class_labels) → log p(y | z_t) [N]. The classifier is given forward time
    t = T − τ, the time of the noisy state z_t it was trained on; the reference passes it reverse time τ,
    which is a bug we do not reproduce.
    """
    def guided(z, t, class_labels):
        grad = jax.grad(lambda zz: jnp.sum(log_prob_fn(zz, t, class_labels)))(z)
        # ε = −Lᵀ s, so adding scale·∇log p to s subtracts scale·Lᵀ∇log p from ε (HSM factor, as the score).
        shift = sde.eps_from_score(-scale * grad, t)
        return eps_fn(z, t, class_labels) - shift
    return guided
