"""Preconditioning (Table 1, Eq. 7): ranges, iDDPM levels, coefficients and the D(x; σ) wrapper."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture

from edm_jax import precond as pc

FIXTURE_CLASSES = {"vp": pc.VPPrecond, "ve": pc.VEPrecond, "edm": pc.EDMPrecond}


@pytest.mark.parametrize("kind", sorted(FIXTURE_CLASSES))
def test_sigma_range_matches_reference_exactly(kind):
    z = load_fixture(f"precond_{kind}.npz")
    hyper = {k: v for k, v in z["config"].items() if k in {f.name for f in pc.dataclasses.fields(FIXTURE_CLASSES[kind])}}
    p = FIXTURE_CLASSES[kind](**hyper)
    assert p.sigma_min == float(z["sigma_min"])  # VP: 0.0009765625, the reference's float32 value
    assert p.sigma_max == float(z["sigma_max"])


# torch's float32 sin is not correctly rounded (see precond.iddpm_u_table); the u recursion carries the
# resulting one-ulp differences of ᾱ(j) to at most 1.31e-5 relative (measured). Indices are exact.
U_REL_TOL = 2e-5


def test_iddpm_levels_and_range_match_reference():
    z = load_fixture("precond_iddpm.npz")
    p = pc.iDDPMPrecond(**{k: z["config"][k] for k in ("M", "C_1", "C_2")})
    u, u_ref = p.u, z["u"]
    assert u.shape == (1001,) and u.dtype == np.float32 and u[-1] == 0 and np.all(np.diff(u) < 0)
    np.testing.assert_allclose(u, u_ref, rtol=U_REL_TOL, atol=0)
    np.testing.assert_allclose([p.sigma_min, p.sigma_max], [z["sigma_min"], z["sigma_max"]], rtol=U_REL_TOL)


def test_iddpm_round_sigma_picks_the_reference_level():
    z = load_fixture("precond_iddpm.npz")
    p = pc.iDDPMPrecond()
    out = np.asarray(p.round_sigma(z["round_sigma_in"]))
    np.testing.assert_allclose(out, z["round_sigma_out"], rtol=U_REL_TOL, atol=0)
    # The index (what c_noise uses) agrees with the reference's table on a dense σ grid, not only at 7 points.
    sig = np.geomspace(1e-3, 3e4, 5000).astype(np.float32)
    ref_index = np.argmin(np.abs(sig[:, None] - z["u"][None, :]), axis=1)
    ours = np.asarray(p.round_sigma_index(sig))
    assert np.mean(ours == ref_index) > 0.999  # ties at exact midpoints may fall either way
    np.testing.assert_array_equal(np.asarray(p.round_sigma(z["u"])), p.u)  # levels are fixed points


def test_edm_coefficients_analytic_identities():
    p = pc.EDMPrecond(sigma_data=0.5)
    sigma = jnp.asarray([0.002, 0.1, 0.5, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = map(np.asarray, p.coefficients(sigma))
    s, sd = np.asarray(sigma, np.float64), 0.5
    np.testing.assert_allclose(c_in**2 * (s**2 + sd**2), 1, rtol=1e-6)  # unit-variance input
    # Unit-variance training target: Var[(y − c_skip(y + n)) / c_out] = 1 (Appendix B.6).
    np.testing.assert_allclose(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2, 1, rtol=1e-5)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)


def test_vp_c_noise_inverts_the_schedule():
    p = pc.VPPrecond()
    # From t = 0.01 up: below that, float32 exp(·) − 1 quantises σ(t) (the reference's own behaviour).
    t = jnp.asarray([0.01, 0.1, 0.5, 1.0])
    *_, c_noise = p.coefficients(p.sigma(t))
    np.testing.assert_allclose(np.asarray(c_noise), 999 * np.asarray(t), rtol=1e-4)


def _stand_in_network(variables, x, c_noise, class_labels, augment_labels, out_channels=None):
    """A small fixed nonlinear F: enough to check the wrapper's algebra against a hand computation."""
    w = variables["w"]
    y = jnp.tanh(x * w) + c_noise.reshape(-1, 1, 1, 1)
    if class_labels is not None:
        y = y + class_labels.sum(-1).reshape(-1, 1, 1, 1)
    if out_channels is not None:  # iDDPM-style: extra (variance) channels after the first C
        y = jnp.concatenate([y, 100 + y], axis=-1)
    return y.astype(jnp.bfloat16)  # any compute dtype: D must come out float32


@pytest.mark.parametrize("kind", ["vp", "ve", "iddpm", "edm"])
def test_denoiser_wrapper_is_eq7(kind):
    p = pc.make_precond(kind)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 5, 5, 3)).astype(np.float32) * 3
    sigma = np.asarray([0.01, 0.3, 2.0, 40.0], np.float32)
    labels = np.eye(10, dtype=np.float32)[[1, 2, 3, 4]]
    variables = {"w": jnp.float32(0.7)}
    net = lambda v, xi, cn, cl, al: _stand_in_network(v, xi, cn, cl, al, out_channels=6 if kind == "iddpm" else None)
    out = p.denoiser(net)(variables, x, sigma, labels)
    assert out.shape == x.shape and out.dtype == jnp.float32
    c_skip, c_out, c_in, c_noise = (np.asarray(c).reshape(-1, 1, 1, 1) for c in p.coefficients(sigma))
    f = np.asarray(_stand_in_network(variables, c_in * x, c_noise.ravel(), labels, None), np.float32)
    np.testing.assert_allclose(np.asarray(out), c_skip * x + c_out * f, rtol=1e-5, atol=1e-5)


def test_denoiser_broadcasts_a_scalar_sigma():
    p = pc.EDMPrecond()
    net = lambda v, xi, cn, cl, al: jnp.sin(xi) * cn.reshape(-1, 1, 1, 1)
    x = jnp.ones((3, 2, 2, 1))
    np.testing.assert_array_equal(p.denoiser(net)(None, x, 0.7), p.denoiser(net)(None, x, jnp.full((3,), 0.7)))


def test_make_precond_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown preconditioning 'vpp'"):
        pc.make_precond("vpp")
    with pytest.raises(ValueError, match=r"EDMPrecond has no hyperparameter\(s\) \['beta_d'\]"):
        pc.make_precond("edm", beta_d=1.0)
    assert pc.make_precond("ve", sigma_max=50).sigma_max == 50
    assert math.isinf(pc.make_precond("edm").sigma_max)
