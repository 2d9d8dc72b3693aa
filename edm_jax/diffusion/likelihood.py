"""Probability-flow ODE log-likelihood for the σ family (Song et al. 2021, Appendix D; Karras et al. 2022, Eq. 4).

With dx/dσ = f(x, σ) = (x − D(x; σ))/σ, the instantaneous change of variables gives

    log p_{σ_min}(x) = log p_{σ_max}(x(σ_max)) + ∫_{σ_min}^{σ_max} ∇·f(x(σ), σ) dσ,   x(σ_min) = x,

with the prior p_{σ_max} ≈ N(0, σ_max² I). What is measured is the density of the data smoothed by
N(0, σ_min² I), evaluated at x. The divergence is exact (forward-mode Jacobian trace, for small dims) or
Hutchinson's estimate E[vᵀ J v] with K fixed probes per image (Rademacher or Gaussian), each probe giving
its own log p; we report their mean and its standard error. Integration: adaptive Dormand–Prince 5(4)
(`ode.dopri5`) or fixed-step Heun on a Karras grid. Each image is integrated (and error-controlled) on its
own, by vmap, so its result never depends on its batch.

Dequantisation (for bits/dim of 8-bit images): images x ∈ [−1, 1] come from pixels u ∈ {0 … 255} as
x = (u + U)·(data_range/255) − 1 with U ~ Uniform[0, 1) (uniform dequantisation, one draw per pixel, done
by the caller). The density of u + U on [0, 256)^d is then p_x · (data_range/255)^d, i.e. log p −
d·log(127.5) for data_range = 2, and `bits_per_dim` reports −log p_pixels / (d ln 2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from edm_jax.diffusion import ksigmas
from edm_jax.diffusion.ode import dopri5
from edm_jax.diffusion.rng import per_example_keys

__all__ = ["sigma_ode_log_likelihood", "bits_per_dim", "gaussian_log_prob"]


def gaussian_log_prob(x, mean, var):
    """log N(x; mean, var·I) summed over all but the leading axis, [N]. var scalar or [N]."""
    d = int(np.prod(x.shape[1:]))
    sq = jnp.sum(((x - mean) ** 2).reshape(x.shape[0], -1), axis=-1)
    return -0.5 * sq / var - 0.5 * d * jnp.log(2 * math.pi * var)


def bits_per_dim(log_p, num_dims, data_range=2.0):
    """−log p / (d ln 2), after the change of variables to [0, 256) pixels (data_range = 2: [−1, 1] images).

    `data_range=None` reports the continuous density's bits/dim with no change of variables.
    """
    log_p = jnp.asarray(log_p)
    if data_range is not None:
        log_p = log_p + num_dims * math.log(data_range / 255)
    return -log_p / (num_dims * math.log(2))


def sigma_ode_log_likelihood(denoise_fn, x, class_labels=None, *, sigma_min=0.002, sigma_max=80.0, key=None,
                             num_probes=1, divergence="hutchinson", probe="rademacher", solver="rk45", rtol=1e-5,
                             atol=1e-5, num_steps=64, data_range=2.0):
    """log p_{σ_min}(x) in nats per image by the probability-flow ODE (module docstring).

    Args:
      denoise_fn: D(x, sigma[N], class_labels). x: [N, ...] data (e.g. dequantised [−1, 1] images).
      key: one key (image i uses fold_in(key, i)) or N keys; needed for 'hutchinson'.
      divergence: 'exact' | 'hutchinson'; probe: 'rademacher' | 'gaussian'; num_probes K ≥ 1.
      solver: 'rk45' (rtol, atol) | 'heun' (num_steps grid points, NFE 2(num_steps − 1) per probe batch).
    Returns:
      dict: log_p [N] (mean over probes), log_p_std_err [N] (0 for 'exact' or K = 1), bits_per_dim [N],
      nfe [N], prior_log_p [N], delta_log_p [N] (the divergence integral), x_sigma_max [N, ...].
    """
    if divergence not in ("exact", "hutchinson") or probe not in ("rademacher", "gaussian"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson' and probe 'rademacher' or 'gaussian', got "
                         f"{divergence!r}, {probe!r}")
    if solver not in ("rk45", "heun"):
        raise ValueError(f"solver must be 'rk45' or 'heun', got {solver!r}")
    x = jnp.asarray(x)
    n, shape, dtype = x.shape[0], x.shape[1:], x.dtype
    k = 1 if divergence == "exact" else int(num_probes)
    if divergence == "hutchinson" and key is None:
        raise ValueError("the Hutchinson estimator draws probes: pass `key`")
    keys = per_example_keys(key if key is not None else jax.random.key(0), n)

    def one(xi, label, ki):
        f = lambda y, s: (y - denoise_fn(y[None], s[None], None if label is None else label[None])[0]) / s
        if divergence == "exact":
            def div(y, s):
                jac = jax.jacfwd(lambda z: f(z.reshape(shape), s).reshape(-1))(y.reshape(-1))
                return jnp.trace(jac)[None]
        else:
            draw = jax.random.rademacher if probe == "rademacher" else jax.random.normal
            v = draw(ki, (k, *shape), dtype)

            def div(y, s):
                jv = jax.vmap(lambda vi: jax.jvp(lambda z: f(z, s), (y,), (vi,))[1])(v)
                return jnp.sum((jv * v).reshape(k, -1), axis=-1)

        rhs = lambda s, state: (f(state[0], s), div(state[0], s))
        state0 = (xi, jnp.zeros((k,), dtype))
        if solver == "rk45":
            (x_t, delta), info = dopri5(rhs, state0, sigma_min, sigma_max, rtol=rtol, atol=atol)
            nfe = info["nfe"]
        else:
            (x_t, delta), nfe = _heun(rhs, state0, sigma_min, sigma_max, num_steps, dtype)
        return x_t, delta, nfe

    labels_axis = None if class_labels is None else 0
    x_t, delta, nfe = jax.vmap(one, in_axes=(0, labels_axis, 0))(x, class_labels, keys)
    prior = gaussian_log_prob(x_t, 0.0, jnp.asarray(sigma_max, dtype) ** 2)
    log_p_probes = prior[:, None] + delta  # [N, K]
    log_p = jnp.mean(log_p_probes, axis=1)
    std_err = jnp.std(log_p_probes, axis=1, ddof=1) / math.sqrt(k) if k > 1 else jnp.zeros_like(log_p)
    return dict(log_p=log_p, log_p_std_err=std_err, bits_per_dim=bits_per_dim(log_p, int(np.prod(shape)), data_range),
                nfe=nfe, prior_log_p=prior, delta_log_p=jnp.mean(delta, axis=1), x_sigma_max=x_t)


def _heun(rhs, state, sigma_min, sigma_max, num_steps, dtype):
    """Fixed-step Heun from σ_min up to σ_max on the Karras grid (dense at small σ). NFE 2(num_steps − 1)."""
    grid = ksigmas.karras_sigmas(num_steps, sigma_min, sigma_max)[:-1][::-1].copy()
    add = lambda a, b, c: jax.tree.map(lambda p, q: p + c * q, a, b)

    def step(st, s):
        h = s[1] - s[0]
        d0 = rhs(s[0], st)
        d1 = rhs(s[1], add(st, d0, h))
        return add(st, jax.tree.map(lambda p, q: (p + q) / 2, d0, d1), h), None

    pairs = jnp.asarray(np.stack([grid[:-1], grid[1:]], axis=1), dtype)
    state, _ = jax.lax.scan(step, state, pairs)
    return state, jnp.asarray(2 * (num_steps - 1), jnp.int32)
