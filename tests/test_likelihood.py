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
        ll = lambda x, **kw: likelihood.sigma_ode_log_likelihood(MIX.denoise, x, sigma_min=SIGMA_MIN,
                                                                   sigma_max=SIGMA_MAX, **kw)
        probes = ("rademacher", "gaussian")
        # All four integrations in one program (one compile, not four).
        exact, heun, *hutchs = jit_fast(lambda x: [
            ll(x, divergence="exact", rtol=1e-7, atol=1e-7),
            ll(x, divergence="exact", solver="heun", num_steps=200),
            *(ll(x, key=jax.random.key(2), num_probes=48, probe=probe, rtol=1e-6, atol=1e-6) for probe in probes)])(x)
        swapped = _mixture_log_prob(exact["x_sigma_max"], SIGMA_MAX) + exact["delta_log_p"]
        np.testing.assert_allclose(swapped, _mixture_log_prob(x, SIGMA_MIN), atol=1e-4)
        np.testing.assert_allclose(heun["log_p"], exact["log_p"], atol=1e-2)
        for probe, hutch in zip(probes, hutchs):
            z = (hutch["log_p"] - exact["log_p"]) / hutch["log_p_std_err"]
            assert np.all(np.abs(z) < 4), (probe, z)
            assert np.all(hutch["log_p_std_err"] > 0)


def test_bits_per_dim_convention():
    # x = (u + U)/127.5 − 1 maps [0, 256) onto [−1, 1 + 2/255): the uniform density there is 8 bits/dim.
    d = 12
    log_p = -d * np.log(512 / 255)
    np.testing.assert_allclose(likelihood.bits_per_dim(log_p, d), 8.0, rtol=1e-6)
    np.testing.assert_allclose(likelihood.bits_per_dim(-d * np.log(2.0), d, data_range=None), 1.0, rtol=1e-6)


# ---- PSLD / CLD / VP-SDE through the process seam: Gaussian data, the exact score.

PSLD_MU = np.array([0.5, -1.0, 0.3, 0.0]).reshape(1, 2, 2, 1)
PSLD_S2 = 0.25


def _gaussian_data_model(sde):
    """(eps_fn, log_p_t) of data N(PSLD_MU, PSLD_S2·I) under `sde`: ε̂ = −Lᵀ s of the exact score s, and the
    exact log density of the state at time t, [N] (per pixel a 2-D Gaussian for phase space)."""
    from edm_jax.diffusion import psld

    mu = jnp.asarray(PSLD_MU)
    if isinstance(sde, psld.VPSDE):
        def moments(t):
            a = psld._bc(sde.mean_coeff(t), mu)
            return a * mu, a**2 * PSLD_S2 + psld._bc(sde.std(t), mu) ** 2

        def eps_fn(x, t, labels):
            mean, var = moments(t)
            return sde.eps_from_score(-(x - mean) / var, t)

        def log_p(x, t):
            mean, var = moments(t)
            return jnp.sum((-0.5 * (x - mean) ** 2 / var - 0.5 * jnp.log(2 * np.pi * var)).reshape(len(x), -1), -1)

        return eps_fn, log_p

    def moments(t, z):
        mean = psld._apply(sde.mean_matrix(t), jnp.concatenate([mu, jnp.zeros_like(mu)], -1) + 0 * z)
        cov = sde.cov(t, PSLD_S2, sde.kappa * sde.M)
        det = cov.xx * cov.mm - cov.xm**2
        return z - mean, psld.Factor(cov.mm / det, -cov.xm / det, -cov.xm / det, cov.xx / det), det

    def eps_fn(z, t, labels):
        r, inv, _ = moments(t, z)
        return sde.eps_from_score(-psld._apply(inv, r), t)

    def log_p(z, t):
        r, inv, det = moments(jnp.full((len(z),), t, z.dtype), z)
        quad = jnp.sum((r * psld._apply(inv, r)).reshape(len(z), -1), -1)
        return -0.5 * quad - 0.5 * r[0].size / 2 * jnp.log((2 * np.pi) ** 2 * det)

    return eps_fn, log_p


def _psld_log_likelihood(process, eps_fn, x, **kwargs):
    return jit_fast(lambda x: process.log_likelihood(eps_fn, x, key=jax.random.key(3), **kwargs))(x)


# Solvers: rk45 to 1e-8 (ODE error ~1e-6 nats); Heun on 1000 quadratic-grid times (second order; ~4e-4 nats,
# 2e-3 at 200 times). Heun compiles a quarter of rk45's program, so the other families and the Hutchinson
# comparison (the same solver on both sides) use it.
RK45 = dict(rtol=1e-8, atol=1e-8)
HEUN = dict(solver="heun", num_steps=1000)


@pytest.fixture(scope="module")
def psld_exact():
    """(kind, solver) -> (process, x, eps_fn, log_p_t, exact-divergence result), each computed once."""
    from edm_jax.diffusion.process import make_process

    cache = {}

    def get(kind, solver):
        if (kind, solver) not in cache:
            with jax.enable_x64(True):
                process = make_process(kind)
                eps_fn, log_p_t = _gaussian_data_model(process.sde)
                x = jnp.asarray(PSLD_MU) + 0.5 * jax.random.normal(jax.random.key(0), (3, 2, 2, 1), jnp.float64)
                kw = RK45 if solver == "rk45" else HEUN
                out = _psld_log_likelihood(process, eps_fn, x, divergence="exact", **kw)
                cache[kind, solver] = process, x, eps_fn, log_p_t, out
        return cache[kind, solver]

    return get


@pytest.mark.parametrize("kind,solver,tol", [("psld", "rk45", 1e-5), ("cld", "heun", 1e-3), ("vpsde", "heun", 1e-3)])
def test_psld_exact_divergence_matches_the_exact_gaussian_density(kind, solver, tol, psld_exact):
    process, x, _, log_p_t, out = psld_exact(kind, solver)
    with jax.enable_x64(True):
        t_min, sde = process.sde.train_eps, process.sde
        z0 = x if out["m"] is None else jnp.concatenate([x, out["m"]], -1)
        # Swap the model's prior for the exact p_T so that only the integration is tested.
        swapped = log_p_t(out["z_T"], sde.T) + out["delta_log_p"]
        np.testing.assert_allclose(swapped, log_p_t(z0, t_min), atol=tol)
        # Reported: log p_{t_min}(x, m) − log q(m) with the model's prior; its gap is the prior's mismatch.
        want = log_p_t(z0, t_min) - out["log_q_m"]
        np.testing.assert_allclose(out["log_p"] - want, out["prior_log_p"] - log_p_t(out["z_T"], sde.T), atol=tol)
        # By T = 1 the kernel has forgotten x₀ up to its mean factor e^{−λb/2}(1 + (ν − Γ)b/4) ≈ 3e-3 (PSLD).
        assert float(jnp.max(jnp.abs(out["prior_log_p"] - log_p_t(out["z_T"], sde.T)))) < 1e-2
        if out["m"] is not None:  # m ~ N(0, κM I), and log q(m) is its log density
            np.testing.assert_allclose(out["log_q_m"], likelihood.gaussian_log_prob(
                out["m"], 0.0, sde.kappa * sde.M), rtol=1e-12)


def test_psld_hutchinson_is_unbiased(psld_exact):
    """Rademacher probes (the Gaussian ones share the code and are tested on the mixture above), on the
    residual −½G²s only with the linear drift's trace exact: its standard error is ~0.25 nats at K = 48,
    ~3.4 nats if the skew x–m coupling of the drift is probed too."""
    process, x, eps_fn, _, exact = psld_exact("psld", "heun")
    with jax.enable_x64(True):
        hutch = _psld_log_likelihood(process, eps_fn, x, num_probes=48, **HEUN)
        np.testing.assert_array_equal(hutch["m"], exact["m"])  # the same momentum draw: only the probes differ
        z = (hutch["log_p"] - exact["log_p"]) / hutch["log_p_std_err"]
        assert np.all(np.abs(z) < 4), z
        assert np.all(hutch["log_p_std_err"] > 0) and np.all(hutch["log_p_std_err"] < 1)
