"""Adaptive Dormand–Prince 5(4) (Dormand & Prince 1980) in one `lax.while_loop`, for any pytree state.

`dopri5(fn, y0, t0, t1, rtol, atol)` integrates dy/dt = fn(t, y) from t0 to t1 (either direction) with
scipy's RK45 conventions: error norm RMS(err / (atol + rtol·max(|y|, |y_new|))) over all leaves, accept if
≤ 1, new step h·clip(0.9·norm^{−1/5}, 0.2, 10), Hairer's initial-step heuristic, FSAL. One error norm per
call: vmap it for per-example error control.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["dopri5"]

_C = np.array([0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1])
_A = [[], [1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
      [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
      [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656]]
_B = [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]
_E = [-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40]  # b5 − b4 (7 stages, FSAL)


def _axpy(y, h, ks, coeffs):
    """y + h Σ c_j k_j over pytrees (zero coefficients skipped)."""
    return jax.tree.map(lambda y, *k: y + h * sum(c * kj for c, kj in zip(coeffs, k) if c), y, *ks)


def _rms(tree):
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(x**2) for x in leaves) / sum(x.size for x in leaves))


def dopri5(fn, y0, t0, t1, *, rtol=1e-5, atol=1e-5, max_steps=10_000):
    """Integrate dy/dt = fn(t, y) from t0 to t1 (float scalars, t1 < t0 allowed).

    Args:
      fn: (t, y) -> dy, pytree of y's structure. y0: pytree of float arrays.
    Returns:
      (y(t1), info) with info = {nfe, steps (accepted), rejected} int32 scalars.
    """
    leaves = jax.tree.leaves(y0)
    dtype = leaves[0].dtype
    t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
    direction = jnp.sign(t1 - t0)
    scale = lambda y, y2=None: jax.tree.map(
        lambda a, b: atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)), y, y if y2 is None else y2)
    div = lambda a, s: jax.tree.map(lambda x, y: x / y, a, s)

    # Hairer, Nørsett & Wanner (1993), II.4: the initial step from the first two slopes.
    f0 = fn(t0, y0)
    d0, d1 = _rms(div(y0, scale(y0))), _rms(div(f0, scale(y0)))
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-30))
    f1 = fn(t0 + direction * h0, _axpy(y0, direction * h0, [f0], [1.0]))
    d2 = _rms(div(jax.tree.map(lambda a, b: a - b, f1, f0), scale(y0))) / h0
    h1 = jnp.where(jnp.maximum(d1, d2) <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                   (0.01 / jnp.maximum(jnp.maximum(d1, d2), 1e-30)) ** (1 / 5))
    h_init = jnp.minimum(100 * h0, h1)

    def attempt(st):
        t, y, f, h, nfe, steps, rej = st
        h = jnp.minimum(h, jnp.abs(t1 - t))
        dt = direction * h
        ks = [f]
        for i in range(1, 6):
            ks.append(fn(t + _C[i] * dt, _axpy(y, dt, ks, _A[i])))
        y_new = _axpy(y, dt, ks, _B)
        f_new = fn(t + dt, y_new)
        err = _rms(div(_axpy(jax.tree.map(jnp.zeros_like, y), dt, ks + [f_new], _E), scale(y, y_new)))
        accept = err <= 1
        factor = jnp.clip(0.9 * jnp.maximum(err, 1e-10) ** -0.2, 0.2, 10.0)
        keep = lambda a, b: jax.tree.map(lambda p, q: jnp.where(accept, p, q), a, b)
        return (jnp.where(accept, t + dt, t), keep(y_new, y), keep(f_new, f), h * factor, nfe + 6,
                steps + accept.astype(jnp.int32), rej + (~accept).astype(jnp.int32))

    def running(st):
        return (jnp.abs(t1 - st[0]) > 1e-12 * jnp.maximum(1.0, jnp.abs(t1))) & (st[5] + st[6] < max_steps)

    zero = jnp.zeros((), jnp.int32)
    t, y, _, _, nfe, steps, rej = jax.lax.while_loop(running, attempt, (t0, y0, f0, h_init, zero + 2, zero, zero))
    return y, dict(nfe=nfe, steps=steps, rejected=rej)
