"""An isotropic Gaussian mixture whose denoiser is exact: the analytic test bed for samplers and guidance.

For data p(y) = Σ_k w_k N(y; μ_k, s_k² I), the noisy marginal at level σ is Σ_k w_k N(x; μ_k, (s_k² + σ²) I)
and the ideal denoiser (the posterior mean, Karras et al. 2022, Eq. 3) is

    D(x; σ) = Σ_k r_k(x) · (s_k² x + σ² μ_k) / (s_k² + σ²),   r_k ∝ w_k N(x; μ_k, (s_k² + σ²) I).

This is the denoiser the reference sampler fixtures were made with (fixtures/README.md, samplers.npz).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GaussianMixture"]


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Mixture of K isotropic Gaussians over arrays of shape `means.shape[1:]` (any layout).

    means [K, *event], stds [K], weights [K] (normalised here).
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    def _params(self, dtype):
        w = jnp.asarray(self.weights, dtype)
        return jnp.asarray(self.means, dtype), jnp.asarray(self.stds, dtype), w / jnp.sum(w)

    def log_responsibilities(self, x, sigma):
        """log r_k(x) = log p(component k | x, σ), [N, K]; x [N, *event], σ scalar or [N]."""
        mu, s, w = self._params(x.dtype)
        d = int(np.prod(mu.shape[1:]))
        var = s**2 + jnp.reshape(jnp.asarray(sigma, x.dtype), (-1, 1)) ** 2  # [N or 1, K]
        flat_x, flat_mu = x.reshape(x.shape[0], -1), mu.reshape(mu.shape[0], -1)
        # −½‖x − μ_k‖²/v_k − ½ d log v_k, less the k-independent −½‖x‖²/v_0 − ½ d log v_0 (softmax ignores
        # it). Written this way ‖x‖² ≈ d σ² never meets a cancellation at large σ, which in float32 would
        # cost ~1e-5 in the responsibilities (v_k − v_0 = s_k² − s_0² is formed exactly, not as a difference).
        x2 = jnp.sum(flat_x**2, axis=-1, keepdims=True)  # [N, 1]
        cross = flat_x @ flat_mu.T - 0.5 * jnp.sum(flat_mu**2, axis=-1)  # x·μ_k − ½‖μ_k‖², [N, K]
        ds2 = s**2 - s[0] ** 2
        logits = (jnp.log(w) + 0.5 * x2 * ds2 / (var * var[:, :1]) + cross / var
                  - 0.5 * d * jnp.log1p(ds2 / var[:, :1]))
        return jax.nn.log_softmax(logits, axis=-1)

    def denoise(self, x, sigma, class_labels=None):
        """The exact posterior mean D(x; σ), shape of x. `class_labels` is ignored (an unconditional model)."""
        del class_labels
        mu, s, _ = self._params(x.dtype)
        r = jnp.exp(self.log_responsibilities(x, sigma))  # [N, K]
        sig2 = jnp.reshape(jnp.asarray(sigma, x.dtype), (-1, 1)) ** 2
        a = s**2 / (s**2 + sig2)  # [N or 1, K]
        flat_x = x.reshape(x.shape[0], -1)
        flat_mu = mu.reshape(mu.shape[0], -1)
        out = (jnp.sum(r * a, axis=1, keepdims=True) * flat_x) + (r * (1 - a)) @ flat_mu
        return out.reshape(x.shape)

    def sample(self, key, n):
        """n exact draws of the clean data, [n, *event]."""
        mu, s, w = self._params(jnp.float32)
        k1, k2 = jax.random.split(key)
        comp = jax.random.choice(k1, mu.shape[0], (n,), p=w)
        z = jax.random.normal(k2, (n, *mu.shape[1:]))
        return mu[comp] + s[comp].reshape((n,) + (1,) * (mu.ndim - 1)) * z

    def mean_and_cov(self):
        """Exact mean [d] and covariance [d, d] of the flattened data (float64)."""
        mu = np.asarray(self.means, np.float64).reshape(len(self.stds), -1)
        w = np.asarray(self.weights, np.float64) / np.sum(self.weights)
        s2 = np.asarray(self.stds, np.float64) ** 2
        mean = w @ mu
        centred = mu - mean
        cov = (centred.T * w) @ centred + np.eye(mu.shape[1]) * (w @ s2)
        return mean, cov
