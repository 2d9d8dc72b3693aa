"""PF-ODE log-likelihood and the Dormand–Prince integrator: analytic checks (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from conftest import jit_fast
from edm_jax.diffusion import likelihood, ode
from edm_jax.toy import GaussianMixture

MIX = GaussianMixture(np.array([[1.0, -0.5, 0.3], [-1.2, 0.4, 0.8], [0.2, 1.1, -1.0]]),
                      np.array([0.3, 0.5, 0.2]), np.array([0.5, 0.3, 0.2]))
SIGMA_MIN, SIGMA_MAX = 0.01, 20.0


def _log_likelihood(denoise_fn, x, **kwargs):
    """sigma_ode_log_likelihood as one compiled program (eagerly each small float64 op compiles alone)."""
    return jit_fast(lambda x: likelihood.sigma_ode_log_likelihood(denoise_fn, x, sigma_min=SIGMA_MIN,
                                                                  sigma_max=SIGMA_MAX, **kwargs))(x)


def _mixture_log_prob(x, sigma):
    """Exact log p_σ(x) of the σ-smoothed mixture, [N]."""
    comps = jnp.stack([jnp.log(w) + likelihood.gaussian_log_prob(x, jnp.asarray(m), s**2 + sigma**2)
                       for m, s, w in zip(MIX.means, MIX.stds, MIX.weights)], axis=-1)
    return jax.scipy.special.logsumexp(comps, axis=-1)


@pytest.mark.parametrize("t0,t1", [(0.0, 1.5), (1.5, 0.0)])
def test_dopri5_linear_ode_matches_expm(t0, t1):
    with jax.enable_x64(True):
        a = np.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 0.3], [0.0, 0.1, -1.0]])
        y0 = np.array([1.0, 0.5, -0.2])
        y, info = jit_fast(lambda y: ode.dopri5(lambda t, y: jnp.asarray(a) @ y, y, t0, t1, rtol=1e-9, atol=1e-12))(
            jnp.asarray(y0))
        np.testing.assert_allclose(y, scipy.linalg.expm(a * (t1 - t0)) @ y0, rtol=1e-7, atol=1e-9)
        assert int(info["nfe"]) == 2 + 6 * (int(info["steps"]) + int(info["rejected"]))


def test_gaussian_data_has_its_closed_form_density():
    """N(μ, s²I) data: D(x; σ) = (s²x + σ²μ)/(s² + σ²); log p_{σmin}(x) = log N(x; μ, (s² + σ_min²) I)."""
    with jax.enable_x64(True):
        mu, s2 = jnp.asarray([0.5, -1.0, 2.0, 0.0]), 0.25
        den = lambda x, sigma, c: (s2 * x + sigma[:, None] ** 2 * mu) / (s2 + sigma[:, None] ** 2)
        x = jax.random.normal(jax.random.key(0), (5, 4), jnp.float64) * 0.5 + mu
        out = _log_likelihood(den, x, divergence="exact", rtol=1e-8, atol=1e-8)
        # Swap the N(0, σ_max²) prior for the exact p_{σmax} so only the integration is tested.
        exact_prior = likelihood.gaussian_log_prob(out["x_sigma_max"], mu, s2 + SIGMA_MAX**2)
        want = likelihood.gaussian_log_prob(x, mu, s2 + SIGMA_MIN**2)
        np.testing.assert_allclose(exact_prior + out["delta_log_p"], want, atol=1e-5)
        # The reported log_p uses the N(0, σ_max²) prior: its gap to the truth is exactly the prior's mismatch.
        np.testing.assert_allclose(out["log_p"] - want, out["prior_log_p"] - exact_prior, atol=1e-5)


def test_mixture_exact_divergence_matches_exact_density_and_hutchinson_is_unbiased():
    with jax.enable_x64(True):
        x = MIX.sample(jax.random.key(1), 3).astype(jnp.float64)
        exact = _log_likelihood(MIX.denoise, x, divergence="exact", rtol=1e-7, atol=1e-7)
        swapped = _mixture_log_prob(exact["x_sigma_max"], SIGMA_MAX) + exact["delta_log_p"]
        np.testing.assert_allclose(swapped, _mixture_log_prob(x, SIGMA_MIN), atol=1e-4)
        heun = _log_likelihood(MIX.denoise, x, divergence="exact", solver="heun", num_steps=200)
        np.testing.assert_allclose(heun["log_p"], exact["log_p"], atol=1e-2)
        for probe in ("rademacher", "gaussian"):
            hutch = _log_likelihood(MIX.denoise, x, key=jax.random.key(2), num_probes=48, probe=probe, rtol=1e-6,
                                    atol=1e-6)
            z = (hutch["log_p"] - exact["log_p"]) / hutch["log_p_std_err"]
            assert np.all(np.abs(z) < 4), (probe, z)
            assert np.all(hutch["log_p_std_err"] > 0)


def test_bits_per_dim_convention():
    # x = (u + U)/127.5 − 1 maps [0, 256) onto [−1, 1 + 2/255): the uniform density there is 8 bits/dim.
    d = 12
    log_p = -d * np.log(512 / 255)
    np.testing.assert_allclose(likelihood.bits_per_dim(log_p, d), 8.0, rtol=1e-6)
    np.testing.assert_allclose(likelihood.bits_per_dim(-d * np.log(2.0), d, data_range=None), 1.0, rtol=1e-6)
