"""Losses (Section 5, Eq. 8): parity with the reference, the EDM weighting identity, randomness contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture, nchw_to_nhwc, rel_err

from edm_jax import losses
from edm_jax.precond import EDMPrecond


@pytest.mark.parametrize("kind", ["vp", "ve", "edm"])
def test_parity_with_reference(kind):
    z = load_fixture("losses.npz")
    seen = {}

    def stand_in_denoiser(x, sigma, labels, augment_labels):
        seen["x"], seen["sigma"] = x, sigma
        return jnp.asarray(nchw_to_nhwc(z[f"{kind}/D"]))

    out = losses.LOSSES[kind](stand_in_denoiser, nchw_to_nhwc(z[f"{kind}/y"]), rnd=z[f"{kind}/rnd"],
                              noise=nchw_to_nhwc(z[f"{kind}/unit_noise"]))
    assert out.shape == (9, 4, 4, 3) and out.dtype == jnp.float32
    assert seen["sigma"].shape == (9,)
    assert rel_err(seen["sigma"], z[f"{kind}/sigma"]) < 1e-6
    assert rel_err(seen["x"], nchw_to_nhwc(z[f"{kind}/noisy"])) < 1e-6
    assert rel_err(out, nchw_to_nhwc(z[f"{kind}/loss"])) < 1e-6


def test_edm_weight_makes_the_network_target_unit_weighted():
    """λ(σ) c_out(σ)² = 1, so λ‖D − y‖² = ‖F − (y − c_skip x)/c_out‖² with x = y + n (notes §1.4)."""
    p = EDMPrecond()
    net = lambda v, x, c_noise, cl, al: jnp.tanh(x) * c_noise.reshape(-1, 1, 1, 1)
    denoise = lambda x, s, l, a: p.denoiser(net)(None, x, s, l)
    key = jax.random.key(0)
    y = jax.random.normal(key, (16, 4, 4, 3)) * 0.5
    rnd, noise = losses.draw_loss_randomness(jax.random.key(1), y, "normal")
    out = jax.jit(lambda y, r, n: losses.edm_loss(denoise, y, rnd=r, noise=n))(y, rnd, noise)
    sigma = jnp.exp(rnd * 1.2 - 1.2).reshape(-1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in p.coefficients(sigma.ravel()))
    x = y + sigma * noise
    f = net(None, c_in * x, c_noise.ravel(), None, None)
    np.testing.assert_allclose(out, (f - (y - c_skip * x) / c_out) ** 2, rtol=2e-4, atol=1e-5)


def _sigmas_drawn(loss_fn, key, n=20000):
    """The σ a loss draws for n examples: the stand-in denoiser hands σ back through the loss value."""
    images = jnp.zeros((n, 1))
    # With D = y + 1 and y = 0 the loss is λ(σ); every loss here has λ = f(σ) invertible on its range.
    return jax.jit(lambda k: loss_fn(lambda x, s, l, a: jnp.broadcast_to(s[:, None], x.shape), images, key=k)[:, 0])(key)


def test_sigma_distributions_follow_p_train():
    # With D(x; σ) = σ and y = 0, the loss is λ(σ)·σ²: 1 for VP/VE and (σ² + σ_d²)/σ_d² for EDM.
    edm = np.asarray(_sigmas_drawn(losses.edm_loss, jax.random.key(3)))
    log_s = 0.5 * np.log((edm - 1) * 0.25)
    assert abs(log_s.mean() + 1.2) < 0.03 and abs(log_s.std() - 1.2) < 0.03  # ln σ ~ N(−1.2, 1.2²)
    np.testing.assert_allclose(np.asarray(_sigmas_drawn(losses.ve_loss, jax.random.key(4))), 1, rtol=1e-5)


def test_sigma_draws_cover_the_reference_ranges():
    rec = []
    def record(x, s, l, a):
        jax.debug.callback(rec.append, s)
        return x
    images = jnp.zeros((20000, 1))
    jax.jit(lambda k: losses.ve_loss(record, images, key=k))(jax.random.key(4)).block_until_ready()
    jax.jit(lambda k: losses.vp_loss(record, images, key=k))(jax.random.key(5)).block_until_ready()
    jax.effects_barrier()
    u = np.log(np.asarray(rec[0]) / 0.02) / np.log(100 / 0.02)  # VE: log-uniform ⇒ u ~ U[0, 1)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    s = np.asarray(rec[1])  # VP: σ(t), t ~ U(ε_t, 1]
    assert s.min() >= 0.0009765625 and s.max() <= 152.17 and np.median(s) > 1


def test_per_example_keys_make_draws_independent_of_batching():
    y = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(9), i))(jnp.arange(8))
    loss = jax.jit(lambda y, k: losses.edm_loss(lambda x, s, l, a: 0.5 * x, y, key=k))
    whole = loss(y, keys)
    parts = jnp.concatenate([loss(y[:3], keys[:3]), loss(y[3:], keys[3:])])
    np.testing.assert_array_equal(whole, parts)
    # One key means example i uses fold_in(key, i).
    np.testing.assert_array_equal(loss(y, jax.random.key(9)), whole)
    assert not np.array_equal(whole, loss(y, jax.random.key(10)))


def test_loss_jits_and_differentiates():
    y = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    def total(w):
        return losses.edm_loss(lambda x, s, l, a: w * x, y, key=jax.random.key(1)).sum()
    g = jax.jit(jax.grad(total))(0.3)
    eps = 1e-3
    total = jax.jit(total)
    fd = (total(0.3 + eps) - total(0.3 - eps)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-3)


def test_missing_randomness_is_a_clear_error():
    with pytest.raises(ValueError, match="pass either `key` or both explicit draws"):
        losses.edm_loss(lambda x, s, l, a: x, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"`rnd` must be \[N\]"):
        losses.ve_loss(lambda x, s, l, a: x, jnp.zeros((2, 3)), rnd=jnp.zeros(3), noise=jnp.zeros((2, 3)))
