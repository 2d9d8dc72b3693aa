"""PSLD's ε-prediction score-matching loss (Pandey & Mandt 2023, Eq. 10) and the VP-SDE baseline's loss.

Draw order of the reference (for seed-exact use): t ~ U(0, 1) [N], then the m₀ noise (always drawn, also
for HSM, where it is discarded), then ε. With a key, every example's draws come from `fold_in(key, i)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from edm_jax.diffusion.psld import PhaseSpaceSDE, VPSDE, _bc, _split
from edm_jax.diffusion.rng import per_example_keys

__all__ = ["psld_loss", "vpsde_loss", "draw_psld_loss_randomness", "train_times"]


def draw_psld_loss_randomness(key, images, phase_space: bool = True):
    """(t_uniform [N], m0_noise [N, H, W, C], eps [N, H, W, 2C or C]) from per-example keys."""
    n, shape = images.shape[0], images.shape[1:]
    eps_shape = shape[:-1] + (shape[-1] * (2 if phase_space else 1),)

    def one(k):
        ku, km, ke = jax.random.split(k, 3)
        return (jax.random.uniform(ku, (), images.dtype), jax.random.normal(km, shape, images.dtype),
                jax.random.normal(ke, eps_shape, images.dtype))

    return jax.vmap(one)(per_example_keys(key, n))


def train_times(sde, t_uniform, lognormal=None):
    """Forward times t [N] from u ~ U(0, 1) [N].

    The paper's t = u(T − ε_train) + ε_train (Eq. 10's expectation over t), or, with lognormal = (P_mean,
    P_std), EDM's log-normal proposal (Karras et al. 2022, Table 1: ln σ ~ N(P_mean, P_std²)) put on t:
    ln t = P_mean + P_std·Φ⁻¹(u), clipped into [ε_train, T]. The same u either way, so a run's draws differ
    only by this map. Not in the reference: a short run spends most uniform draws at large t, where the
    images are already noise, and too few where their shapes are decided.
    """
    if lognormal is None:
        return t_uniform * (sde.T - sde.train_eps) + sde.train_eps
    p_mean, p_std = lognormal
    t = jnp.exp(p_mean + p_std * jax.scipy.special.ndtri(t_uniform))
    return jnp.clip(t, sde.train_eps, sde.T)


def _reduce(loss, reduce):
    if reduce == "none":
        return loss
    if reduce in ("mean", "sum"):
        return getattr(jnp, reduce)(loss)
    raise ValueError(f"reduce must be 'none', 'mean' or 'sum', got {reduce!r}.")


def psld_loss(eps_fn, images, labels=None, *, sde: PhaseSpaceSDE, key=None, t_uniform=None, m0_noise=None,
              eps=None, hsm=True, t_lognormal=None, reduce="none"):
    """(target − ε_θ(z_t, t))², per element [N, H, W, C_out] (or its mean/sum, the reference's reductions).

    eps_fn(z [N, H, W, 2C], t [N], labels) → ε̂ with the channels of `sde.network_channels`. images
    [N, H, W, C]. t = u(T − ε_train) + ε_train, or log-normal (`train_times`). HSM: m₀ integrated out
    (kernel Σ₀ = diag(0, κM)); DSM: m₀ = √(κM) n. The target is ε, or its m (x) block for the reduced modes.
    """
    if key is not None:
        t_uniform, m0_noise, eps = draw_psld_loss_randomness(key, images)
    if t_uniform is None or m0_noise is None or eps is None:
        raise ValueError("psld_loss needs either key or all of t_uniform, m0_noise and eps.")
    t = train_times(sde, t_uniform, t_lognormal)
    m0 = None if hsm else (sde.kappa * sde.M) ** 0.5 * m0_noise
    z, _ = sde.perturb(images, t, eps, m0)
    target = {"xm": eps, "x": _split(eps)[0], "m": _split(eps)[1]}[sde.predicts]
    return _reduce((target - eps_fn(z, t, labels)) ** 2, reduce)


def vpsde_loss(eps_fn, images, labels=None, *, sde: VPSDE, key=None, t_uniform=None, eps=None,
               weighting="fid", t_lognormal=None, reduce="none"):
    """VP-SDE baseline: (ε − ε̂)² ('fid') or β(t)(s_θ − s)² = β(ε − ε̂)²/σ² ('nll'), per element."""
    if key is not None:
        t_uniform, _, eps = draw_psld_loss_randomness(key, images, phase_space=False)
    if t_uniform is None or eps is None:
        raise ValueError("vpsde_loss needs either key or both t_uniform and eps.")
    t = train_times(sde, t_uniform, t_lognormal)
    x, _ = sde.perturb(images, t, eps)
    loss = (eps - eps_fn(x, t, labels)) ** 2
    if weighting == "nll":
        loss = loss * _bc(sde.beta(t) / sde.std(t) ** 2, loss)
    elif weighting != "fid":
        raise ValueError(f"weighting must be 'fid' or 'nll', got {weighting!r}.")
    return _reduce(loss, reduce)
