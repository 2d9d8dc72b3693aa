"""edm_jax.augment: parity with the reference AugmentPipe (fixtures/augment.npz) and the parameter distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_fixture, nchw_to_nhwc, rel_err

from edm_jax import augment

NAMES = ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle")


@pytest.fixture(scope="module")
def fixture():
    z = load_fixture("augment.npz")
    params = {k[len("param/"):]: v for k, v in z.items() if k.startswith("param/")}
    params["translate"] = params["translate"].T  # The file stores [2, N]; the API takes [N, 2].
    return dict(images=nchw_to_nhwc(z["images"]), out=nchw_to_nhwc(z["out"]), labels=z["labels"],
                params=params, config=z["config"])


def identity_params(n, **overrides):
    params = {name: np.zeros([n], np.float32) for name in NAMES}
    params["translate"] = np.zeros([n, 2], np.float32)
    params.update({k: np.asarray(v, np.float32) for k, v in overrides.items()})
    return params


def test_sym6_is_an_orthonormal_lowpass():
    h = augment.SYM6
    assert np.isclose(h.sum(), np.sqrt(2), atol=1e-12)
    for shift in range(0, len(h), 2):
        assert np.isclose(np.dot(h[: len(h) - shift], h[shift:]), float(shift == 0), atol=1e-12)


@pytest.mark.parametrize("margin", ["batch", "image"])
def test_parity_with_reference(fixture, margin):
    out, labels = augment.apply_augment(fixture["images"], fixture["params"], **fixture["config"], margin=margin)
    assert out.shape == fixture["out"].shape and out.dtype == jnp.float32
    assert labels.shape == (6, 9) and labels.dtype == jnp.float32
    assert rel_err(out, fixture["out"]) < 1e-5
    assert rel_err(labels, fixture["labels"]) < 1e-5


def test_image_margin_is_the_reference_on_each_image_alone(fixture):
    out, _ = augment.apply_augment(fixture["images"], fixture["params"], margin="image")
    for i in range(6):
        one = {k: v[i:i + 1] for k, v in fixture["params"].items()}
        alone, _ = augment.apply_augment(fixture["images"][i:i + 1], one, margin="batch")
        np.testing.assert_array_equal(alone[0], out[i])


def test_identity_and_flips():
    x = np.asarray(jax.random.uniform(jax.random.key(0), (3, 16, 12, 3), minval=-1, maxval=1))
    out, labels = augment.apply_augment(x, identity_params(3))
    np.testing.assert_allclose(out, x, atol=2e-6)
    np.testing.assert_array_equal(labels, 0)
    out, labels = augment.apply_augment(x, identity_params(3, xflip=[1, 0, 1]))
    np.testing.assert_allclose(out, np.where(np.array([1, 0, 1])[:, None, None, None], x[:, :, ::-1], x), atol=2e-6)
    np.testing.assert_array_equal(labels[:, 0], [1, 0, 1])
    np.testing.assert_array_equal(labels[:, 1:], 0)
    out, labels = augment.apply_augment(x, identity_params(3, yflip=[1, 1, 1]))
    np.testing.assert_allclose(out, x[:, ::-1], atol=2e-6)


def test_geometry_conventions():
    """A quarter turn is np.rot90; a shift by whole pixels moves content right/down with reflected edges."""
    # The 2x sampling grid is offset by a quarter 2x-pixel (the reference's convention), so a quarter turn
    # interpolates: compare on a smooth, asymmetric image, where interpolation is nearly exact.
    yy, xx = np.meshgrid(np.arange(16) / 16, np.arange(16) / 16, indexing="ij")
    smooth = np.stack([np.sin(2 * xx + yy), np.cos(3 * yy - xx), xx * yy], -1)[None].astype(np.float32)
    out, labels = augment.apply_augment(smooth, identity_params(1, rotate=[np.pi / 2]))
    assert rel_err(out, np.rot90(smooth, k=1, axes=(1, 2))) < 2e-2
    assert rel_err(out, np.rot90(smooth, k=3, axes=(1, 2))) > 0.3
    np.testing.assert_allclose(labels[:, 3:5], [[-1, 1]], atol=1e-6)
    x = np.asarray(jax.random.uniform(jax.random.key(1), (1, 16, 16, 3), minval=-1, maxval=1))
    # w = 0.5 -> 0.5 * 0.125 * 16 = 1 px right, w = -1 -> 2 px up.
    out, _ = augment.apply_augment(x, identity_params(1, translate=[[0.5, -1.0]]))
    want = np.pad(x, [(0, 0), (0, 2), (1, 0), (0, 0)], mode="reflect")[:, 2:, :16]
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_bad_inputs_get_a_clear_error(fixture):
    wrong = dict(fixture["params"], translate=fixture["params"]["translate"].T)  # The fixture file's [2, N].
    with pytest.raises(ValueError, match="translate"):
        augment.apply_augment(fixture["images"], wrong)
    with pytest.raises(ValueError, match="NHWC"):
        augment.apply_augment(fixture["images"][0], fixture["params"])


def test_apply_jits_inside_other_code(fixture):
    fn = jax.jit(lambda x, p: augment.apply_augment(x * 1.0, p, scale_std=0.2))
    out, labels = fn(fixture["images"], fixture["params"])
    eager, _ = augment.apply_augment(fixture["images"], fixture["params"])
    np.testing.assert_allclose(out, eager, atol=1e-5)
    assert rel_err(out, fixture["out"]) < 1e-5


def test_params_shapes_keys_and_batch_size_independence():
    key = jax.random.key(42)
    a = augment.sample_augment_params(key, 8, p=0.5)
    assert set(a) == set(NAMES) | {"translate"}
    assert all(a[k].shape == (8,) and a[k].dtype == jnp.float32 for k in NAMES)
    assert a["translate"].shape == (8, 2) and a["translate"].dtype == jnp.float32
    b = augment.sample_augment_params(key, 8, p=jnp.float32(0.5))  # p is traced (it is not static) anyway
    c = augment.sample_augment_params(key, 4, p=0.5)
    d = augment.sample_augment_params(jax.random.key(43), 8, p=0.5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k][:4], c[k])  # Image i's draws do not depend on n.
    assert not np.array_equal(a["scale"], d["scale"])
    own = augment.sample_augment_params(jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(8)), 8, p=0.5)
    for k in a:
        np.testing.assert_array_equal(a[k], own[k])  # One key == the per-image keys fold_in(key, i).


def test_label_statistics_match_the_reference():
    """Non-zero fraction per label column at p = 0.12 (20k draws) vs the analytic and the reference's measured."""
    n, p = 20000, 0.12
    params = augment.sample_augment_params(jax.random.key(7), n, p=p)
    labels = np.asarray(augment.augment_labels(params))
    frac = (labels != 0).mean(axis=0)
    analytic = np.array([0.5, p / 2, p, p, p, p, p / 2, p, p])
    measured_ref = np.array([0.49, 0.064, 0.118, 0.117, 0.117, 0.111, 0.056, 0.119, 0.119])
    sigma = np.sqrt(analytic * (1 - analytic) / n)
    assert np.all(np.abs(frac - analytic) < 5 * sigma), frac
    assert np.all(np.abs(frac - measured_ref) < 0.015), frac  # The reference's own estimate has ~0.007 noise.
    # The gated draws have the reference's marginals.
    w = np.asarray(params["scale"])[labels[:, 2] != 0]
    assert abs(w.mean()) < 0.1 and abs(w.std() - 1) < 0.05
    theta = np.asarray(params["rotate"])
    assert np.all(np.abs(theta) <= np.pi) and abs(np.abs(theta[theta != 0]).mean() - np.pi / 2) < 0.1
    r = np.asarray(params["aniso_angle"])
    assert abs((r != 0).mean() - 0.5) < 5 * np.sqrt(0.25 / n)  # Independent of p.
    # p = 0 disables everything, xflip included (1e8 * 0 = 0), as in the reference.
    zero = augment.augment_labels(augment.sample_augment_params(jax.random.key(7), n, p=0.0))
    np.testing.assert_array_equal(zero, 0)
