"""Denoising score-matching losses (Karras et al. 2022, Section 5, Eq. 8, Table 1 "Training").

    L = E_{σ, y, n} [ λ(σ) ‖D(y + n; σ) − y‖² ],   n ~ N(0, σ² I)                                  (Eq. 8)

Each loss differs only in how σ is drawn (p_train) and in the weight λ(σ):
  VP:  t ~ U(ε_t, 1), σ = σ_VP(t),             λ = 1/σ²
  VE:  ln σ ~ U(ln σ_min, ln σ_max),           λ = 1/σ²
  EDM: ln σ ~ N(P_mean, P_std²),               λ = (σ² + σ_d²) / (σ σ_d)²   (so λ(σ) c_out(σ)² = 1)

The functions return the unreduced per-element loss, shaped like the images; summing over pixels and
averaging over the global batch is the training loop's job (as in the reference's training_loop.py).
They are pure: the randomness is either a key or the explicit draws `rnd` [N] and `noise` (unit normals).
`denoise_fn(x, sigma, labels, augment_labels)` receives `sigma` of shape [N] and computes in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from edm_jax.diffusion.rng import per_example_keys

__all__ = ["vp_loss", "ve_loss", "edm_loss", "LOSSES", "draw_loss_randomness"]


def draw_loss_randomness(key, images, distribution: str):
    """The draws a loss needs: `rnd` [N] (uniform on [0, 1) or standard normal) and unit `noise`.

    `key` is one key or N per-example keys (see `rng.per_example_keys`); example i's draws depend
    only on its own key, so a batch split into micro-batches draws the same numbers.
    """
    n = images.shape[0]
    keys = per_example_keys(key, n)

    def one(k):
        k_rnd, k_noise = jax.random.split(k)
        if distribution == "uniform":
            r = jax.random.uniform(k_rnd, (), jnp.float32)
        else:
            r = jax.random.normal(k_rnd, (), jnp.float32)
        return r, jax.random.normal(k_noise, images.shape[1:], jnp.float32)

    return jax.vmap(one)(keys)


def _weighted_loss(denoise_fn, images, labels, sigma, weight, noise, augment_labels):
    """λ(σ)·(D(y + σn; σ) − y)², element-wise (σ and λ are per example, [N])."""
    y = jnp.asarray(images, jnp.float32)
    bcast = (-1,) + (1,) * (y.ndim - 1)
    denoised = denoise_fn(y + sigma.reshape(bcast) * noise, sigma, labels, augment_labels)
    return weight.reshape(bcast) * (jnp.asarray(denoised, jnp.float32) - y) ** 2


def _draws(key, rnd, noise, images, distribution):
    if rnd is None or noise is None:
        if key is None:
            raise ValueError("pass either `key` or both explicit draws `rnd` [N] and `noise` (images' shape)")
        key_rnd, key_noise = draw_loss_randomness(key, images, distribution)
        rnd = key_rnd if rnd is None else rnd
        noise = key_noise if noise is None else noise
    rnd = jnp.asarray(rnd, jnp.float32).reshape(-1)
    noise = jnp.asarray(noise, jnp.float32)
    if rnd.shape[0] != images.shape[0] or noise.shape != images.shape:
        raise ValueError(f"`rnd` must be [N] and `noise` the images' shape {tuple(images.shape)}; got "
                         f"{tuple(rnd.shape)} and {tuple(noise.shape)}")
    return rnd, noise


def vp_loss(denoise_fn, images, labels=None, *, key=None, rnd=None, noise=None, augment_labels=None,
            beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
    """VP loss (score_sde's DDPM++ training): t = 1 + u(ε_t − 1), u ~ U[0, 1); σ = σ_VP(t); λ = 1/σ².

    images [N, ...] float32 (clean, augmented); labels [N, label_dim] or None; returns [N, ...] float32.
    """
    u, noise = _draws(key, rnd, noise, images, "uniform")
    t = 1 + u * (epsilon_t - 1)
    # exp(·) − 1 rather than expm1, as the reference: near t = ε_t float32 quantises σ (σ(ε_t) becomes
    # 0.0009765625), and the published VP models were trained on exactly those σ.
    sigma = jnp.sqrt(jnp.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)
    return _weighted_loss(denoise_fn, images, labels, sigma, 1 / sigma**2, noise, augment_labels)


def ve_loss(denoise_fn, images, labels=None, *, key=None, rnd=None, noise=None, augment_labels=None,
            sigma_min=0.02, sigma_max=100.0):
    """VE loss (score_sde's NCSN++ training): σ = σ_min (σ_max/σ_min)^u, u ~ U[0, 1); λ = 1/σ²."""
    u, noise = _draws(key, rnd, noise, images, "uniform")
    sigma = sigma_min * (sigma_max / sigma_min) ** u
    return _weighted_loss(denoise_fn, images, labels, sigma, 1 / sigma**2, noise, augment_labels)


def edm_loss(denoise_fn, images, labels=None, *, key=None, rnd=None, noise=None, augment_labels=None,
             P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """The paper's loss: ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_d²)/(σ σ_d)² (Table 1, Section 5)."""
    r, noise = _draws(key, rnd, noise, images, "normal")
    sigma = jnp.exp(r * P_std + P_mean)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return _weighted_loss(denoise_fn, images, labels, sigma, weight, noise, augment_labels)


LOSSES = {"vp": vp_loss, "ve": ve_loss, "edm": edm_loss}

# Reference defaults, for configs and documentation (training/loss.py).
DEFAULTS = {
    "vp": dict(beta_d=19.9, beta_min=0.1, epsilon_t=1e-5),
    "ve": dict(sigma_min=0.02, sigma_max=100.0),
    "edm": dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
}
