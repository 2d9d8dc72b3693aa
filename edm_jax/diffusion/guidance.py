"""Guidance for the EDM samplers: classifier guidance (Dhariwal & Nichol 2021) and classifier-free guidance.

Both are wrappers that turn a denoiser `D(x, sigma, class_labels)` into another one with the same
signature, so they plug into `edm_jax.sampling.edm_sampler` / `ablation_sampler` (and anything else that
takes a denoiser) unchanged and are traced inside the jitted sampler.

Classifier guidance in EDM form. The EDM score relation (Karras et al. 2022, Eq. 3; Tweedie's formula) is

    ∇ₓ log p(x; σ) = (D(x; σ) − x) / σ².

Bayes' rule for the class-conditional noisy density, p(x | y; σ) ∝ p(x; σ) · p(y | x, σ), gives

    ∇ₓ log p(x | y; σ) = ∇ₓ log p(x; σ) + ∇ₓ log p(y | x, σ).

Guidance adds `scale` times the classifier term to the score, ∇ₓ log p(x; σ) + scale · ∇ₓ log p(y | x, σ),
which — read back through the score relation — is the score of the denoiser

    D̃(x; σ, y) = D(x; σ, y) + scale · σ² · ∇ₓ log p(y | x, σ).

For scale = 1 and the exact p(y | x, σ), D̃ is exactly the conditional posterior mean E[x₀ | x, y]
(tests/test_guidance.py checks this on a Gaussian mixture); scale > 1 sharpens each noise level's
p(x | y; σ) into ∝ p(x; σ) p(y | x, σ)^scale (the samples then follow that only approximately).

This is the EDM form of ADM's Algorithm 1 (Dhariwal & Nichol 2021), which shifts the mean of each reverse
step by s · Σ · ∇ log p_φ(y | x_t): the DDPM mean is μ = (x_t + β_t ∇ log p(x_t)) / √α_t, so a shift by
s β_t ∇ log p(y | x_t) is, to first order in β_t, the score shift s ∇ log p(y | x_t); `scale` here is
ADM's `classifier_scale` s. All gradients are taken with respect to the sampler's unscaled x
(x = x₀ + σ n); a VP-scaled sampler (`scaling='vp'`) divides by s(t) before calling the denoiser, so the
same relation holds.

Classifier-free guidance (Ho & Salimans 2022) replaces the classifier by the difference of a conditional
and an unconditional prediction of one network trained with label dropout:

    D̃ = (1 + w) · D(x; σ, y) − w · D(x; σ, ∅) = D(x; σ, y) + w · (D(x; σ, y) − D(x; σ, ∅)).

Since D(x; σ, y) − D(x; σ, ∅) = σ² ∇ₓ log p(y | x, σ) for exact denoisers (the two relations above),
CFG with weight w equals classifier guidance with the implicit classifier at scale 1 + w.

The noise-aware classifier sees the preconditioned input c_in(σ) · x and the noise label c_noise(σ)
of a preconditioning (Table 1): EDM's by default; `iDDPMPrecond` reproduces guided-diffusion's
classifier inputs (x_t = x / √(1 + σ²) and the integer timestep). The gradient in x_t coordinates is
s(t) times the gradient in x, exactly as the score is, so ADM's scales carry over unchanged.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from edm_jax.diffusion.losses import draw_loss_randomness
from edm_jax.diffusion.precond import EDMPrecond

__all__ = ["classifier_guided", "classifier_log_prob", "classifier_free", "classifier_loss", "noisy_images"]


def _float_dtype(x):
    """float32, or float64 for float64 inputs (samplers keep the latents' dtype when x64 is on)."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _per_example(sigma, x, dtype=jnp.float32):
    """σ as [N] of `dtype` (a scalar is broadcast) and a reshape target that broadcasts it against x."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, dtype), x.shape[:1])
    return sigma, (-1,) + (1,) * (x.ndim - 1)


def _is_zero(w) -> bool:
    """True for a Python/numpy number equal to 0 (a traced value is never short-circuited)."""
    return isinstance(w, numbers.Real) and float(w) == 0.0


def _check_labels(class_labels, n, label_dim=None, what="guidance"):
    if class_labels is None:
        raise ValueError(f"{what} needs class labels: one-hot class_labels [N, num_classes], not None")
    labels = jnp.asarray(class_labels)
    if labels.ndim != 2 or labels.shape[0] != n or (label_dim is not None and labels.shape[1] != label_dim):
        want = f"[{n}, {label_dim if label_dim is not None else 'num_classes'}]"
        raise ValueError(f"{what}: class_labels must be one-hot of shape {want}, got {tuple(labels.shape)}")
    return labels


def classifier_guided(denoise_fn: Callable, log_prob_fn: Callable, scale) -> Callable:
    """D̃(x; σ, y) = D(x; σ, y) + scale · σ² · ∇ₓ log p(y | x, σ) (module docstring; ADM Algorithm 1).

    Args:
      denoise_fn: `D(x, sigma, class_labels)` with sigma [N]; may be conditional or not (ADM guides both).
      log_prob_fn: `(x, sigma, class_labels) -> [N]`, log p(y_i | x_i, σ_i) of each example's labelled class,
        each entry depending on its own example only (true of any network without batch statistics), so
        the gradient of the sum is the per-example gradient. `classifier_log_prob` builds one from a network.
      scale: the guidance scale s (ADM's `classifier_scale`); a Python number or a traced scalar. A Python 0
        returns `denoise_fn` itself, so the guided sampler is bit-for-bit the unguided one.

    Returns:
      `denoise_fn(x, sigma, class_labels)` for the samplers; float32 like the preconditioned denoisers
      (float64 for float64 x).
    """
    if _is_zero(scale):
        return denoise_fn

    def guided(x, sigma, class_labels):
        labels = _check_labels(class_labels, x.shape[0], what="classifier guidance")
        dtype = _float_dtype(x)
        sigma, bcast = _per_example(sigma, x, dtype)

        def total_log_prob(x_):
            logp = jnp.asarray(log_prob_fn(x_, sigma, labels), dtype)
            if logp.shape != x.shape[:1]:
                raise ValueError(f"log_prob_fn must return one log-probability per example, shape "
                                 f"{x.shape[:1]}; got {logp.shape}")
            return jnp.sum(logp)

        grad = jax.grad(total_log_prob)(x)  # ∇ₓ log p(y | x, σ), per example
        denoised = jnp.asarray(denoise_fn(x, sigma, class_labels), dtype)
        return denoised + scale * sigma.reshape(bcast) ** 2 * grad.astype(dtype)

    return guided


def classifier_log_prob(apply_fn: Callable, variables: Any, precond=None) -> Callable:
    """Adapt a noise-aware classifier network into `log_prob_fn(x, sigma, class_labels) -> [N]`.

    `apply_fn(variables, x_in, noise_labels) -> logits [N, num_classes]` (e.g. `EncoderUNet(...).apply`)
    is evaluated at x_in = c_in(σ) · x and noise_labels = c_noise(σ) of `precond` (default
    `EDMPrecond()`: c_in = 1/√(σ² + σ_d²), c_noise = ln(σ)/4; Table 1). The result is
    Σ_k y_k · log_softmax(logits)_k, i.e. log p(y | x, σ) at the one-hot labels y.
    """
    precond = EDMPrecond() if precond is None else precond

    def log_prob(x, sigma, class_labels):
        x = jnp.asarray(x, jnp.float32)
        sigma, bcast = _per_example(sigma, x)
        _, _, c_in, c_noise = precond.coefficients(sigma)
        logits = apply_fn(variables, c_in.reshape(bcast) * x, c_noise)
        logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
        return jnp.sum(jnp.asarray(class_labels, jnp.float32) * logp, axis=-1)

    return log_prob


def classifier_free(denoise_fn: Callable, w, label_dim: int) -> Callable:
    """D̃ = (1 + w) · D(x; σ, y) − w · D(x; σ, ∅), both terms from ONE denoiser call on a 2N batch.

    The batch is [x; x] with labels [y; 0]: all-zero labels are the unconditional input ∅ of the
    reference's networks when trained with `label_dropout` (dropped labels are multiplied by zero).

    Args:
      denoise_fn: a conditional `D(x, sigma, class_labels)`, sigma [N].
      w: guidance weight (0 = the conditional model, unguided). A Python number or a traced scalar. A
        Python 0 returns `denoise_fn` itself (bit-for-bit unguided, and no doubled batch); a traced 0
        gives D(x; σ, y) of the batched call exactly, since 1·a − 0·b = a.
      label_dim: the number of classes; the sampler's class_labels must be [N, label_dim].
    """
    if _is_zero(w):
        return denoise_fn

    def guided(x, sigma, class_labels):
        n = x.shape[0]
        labels = _check_labels(class_labels, n, label_dim, what="classifier-free guidance")
        dtype = _float_dtype(x)
        sigma, _ = _per_example(sigma, x, dtype)
        both = denoise_fn(jnp.concatenate([x, x]), jnp.concatenate([sigma, sigma]),
                          jnp.concatenate([labels, jnp.zeros_like(labels)]))
        both = jnp.asarray(both, dtype)
        cond, uncond = both[:n], both[n:]
        return (1 + w) * cond - w * uncond

    return guided


def classifier_loss(apply_fn: Callable, variables: Any, images, labels, key=None, *, rnd=None, noise=None,
                    P_mean: float = -1.2, P_std: float = 1.2, precond=None, train: bool = False,
                    dropout_key=None):
    """Per-example cross-entropy of a noise-aware classifier on noisy images, [N] float32.

    σ is drawn as in EDM training, ln σ ~ N(P_mean, P_std²) (Section 5), the noisy image is x₀ + σ n with
    n ~ N(0, I), and the classifier sees c_in(σ) · (x₀ + σ n) and c_noise(σ) of `precond` (default
    `EDMPrecond()`), exactly as `classifier_log_prob` feeds it at sampling time. The loss is
    −Σ_k y_k log_softmax(logits)_k with one-hot `labels` y [N, K]. Guidance uses the classifier's gradient
    over the whole sampling range, so a trainer may want a wider P_std than the denoiser's.

    Args:
      apply_fn: `apply_fn(variables, x_in, noise_labels, **kw) -> logits`; with `train=True` it is
        called with `train=True, rngs={'dropout': dropout_key}` (a flax `Module.apply` fits). One dropout
        key serves the batch; for per-example dropout keys (train.py's contract) vmap over examples.
      images: [N, ...] float32 clean images. labels: [N, K] one-hot.
      key: one key or N per-example keys for the draws (as `edm_jax.losses`); or pass `rnd` [N] (unit
        normals) and `noise` (unit normals, images' shape) explicitly.
    """
    precond = EDMPrecond() if precond is None else precond
    labels = _check_labels(labels, images.shape[0], what="classifier_loss")
    x_noisy, sigma = noisy_images(images, key, rnd=rnd, noise=noise, P_mean=P_mean, P_std=P_std)
    _, bcast = _per_example(sigma, x_noisy)
    _, _, c_in, c_noise = precond.coefficients(sigma)
    x_in = c_in.reshape(bcast) * x_noisy
    if train:
        if dropout_key is None:
            raise ValueError("classifier_loss(train=True) needs `dropout_key` for the network's dropout")
        logits = apply_fn(variables, x_in, c_noise, train=True, rngs={"dropout": dropout_key})
    else:
        logits = apply_fn(variables, x_in, c_noise)
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return -jnp.sum(labels.astype(jnp.float32) * logp, axis=-1)


def noisy_images(images, key=None, *, rnd=None, noise=None, P_mean: float = -1.2, P_std: float = 1.2):
    """(x₀ + σ n, σ [N]) with ln σ ~ N(P_mean, P_std²) and n ~ N(0, I): the σ family's noisy training
    input for a noise-aware classifier (Section 5's p_train). `key` is one key or N per-example keys (as
    `edm_jax.losses`); or pass `rnd` [N] (unit normals) and `noise` (unit normals, images' shape)."""
    images = jnp.asarray(images, jnp.float32)
    if rnd is None or noise is None:
        if key is None:
            raise ValueError("classifier_loss: pass either `key` or both `rnd` [N] and `noise` (images' shape)")
        key_rnd, key_noise = draw_loss_randomness(key, images, "normal")
        rnd = key_rnd if rnd is None else rnd
        noise = key_noise if noise is None else noise
    sigma, bcast = _per_example(jnp.exp(jnp.asarray(rnd, jnp.float32) * P_std + P_mean), images)
    return images + sigma.reshape(bcast) * jnp.asarray(noise, jnp.float32), sigma
