"""The forward-process seam's contract, checked for every preset the trainer and the sampler driver can be
given: channels, a finite loss, a short sample, images independent of the batch and of the device count,
and configs (new `process` section and old precond + loss run directories) that round-trip."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edm_jax import generate
from edm_jax.diffusion.process import PROCESSES, make_process
from edm_jax.interop.rundir import process_from_config

SHAPE = (4, 4, 2)  # data [H, W, C]
# Every preset; iDDPM has no training loss of its own (the reference trains none), so name one.
PRESETS = {kind: ({"loss": "edm"} if kind == "iddpm" else {}) for kind in sorted(PROCESSES)}
# A few network calls per sample, whatever the family's sampler.
FAST = {"psld": dict(num_steps=3), "cld": dict(num_steps=3), "vpsde": dict(num_steps=3)}


def _net(variables, x, noise_label, class_labels, augment_labels, **kwargs):
    """A stand-in network F: a per-pixel linear map of its input plus a bounded function of its noise label (iDDPM's runs to 999), out channels = weights'."""
    out = jnp.einsum("nhwc,cd->nhwd", x, variables["w"]) + jnp.sin(noise_label).reshape(-1, 1, 1, 1) * variables["b"]
    return out


@functools.lru_cache(maxsize=None)
def _setup(kind):
    process = make_process(kind, **PRESETS[kind])
    c_in, c_out = process.network_channels(SHAPE[-1])
    rng = np.random.default_rng(0)
    variables = {"w": jnp.asarray(rng.normal(size=(c_in, c_out)) * 0.1, jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(c_out,)) * 0.01, jnp.float32)}
    return process, variables, c_in, c_out


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_channels_prior_and_data_map(kind):
    process, _, c_in, c_out = _setup(kind)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
    z = process.prior(keys, SHAPE)
    assert z.shape == (3, *SHAPE[:2], c_in)  # the sampler's state is the network's input
    assert process.data_channels(c_in) == SHAPE[-1]
    assert process.to_data(z).shape == (3, *SHAPE)
    assert c_out in (SHAPE[-1], 2 * SHAPE[-1])


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_loss_is_finite_per_element_and_differentiable(kind):
    process, variables, _, _ = _setup(kind)
    model = process.model(_net)
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, *SHAPE)), jnp.float32)

    def total(variables):
        fn = lambda x, level, labels, aug: model(variables, x, level, labels, aug)  # noqa: E731
        return jnp.sum(process.loss(fn, images, None, key=jax.random.key(2)))

    value, grads = jax.value_and_grad(total)(variables)
    assert np.isfinite(value) and value > 0
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))


@functools.lru_cache(maxsize=None)
def _sample_fn(kind, num_devices):
    process, variables, _, _ = _setup(kind)
    settings = process.sampler_settings(**FAST.get(kind, dict(num_steps=3)))
    bound = generate.BoundDenoiser(process.model(_net), variables)
    mesh = generate.make_mesh(jax.devices()[:num_devices])
    return generate.make_sample_fn(bound, image_shape=SHAPE, label_dim=0, settings=settings, mesh=mesh,
                                   process=process)


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_samples_depend_only_on_their_seed(kind):
    """Image s is the same in a batch of 8 on 8 devices, a batch of 8 on 1 device and alone (batch 1)."""
    seeds = list(range(8))
    images8, index = _sample_fn(kind, 8).sample_seeds(seeds)
    images8 = np.asarray(images8)
    assert images8.shape == (8, *SHAPE) and images8.dtype == np.uint8 and np.all(np.asarray(index) == -1)
    assert len(np.unique(images8.reshape(8, -1), axis=0)) == 8  # distinct seeds, distinct images
    np.testing.assert_array_equal(np.asarray(_sample_fn(kind, 1).sample_seeds(seeds)[0]), images8)
    one = _sample_fn(kind, 1)
    for s in (0, 5):
        np.testing.assert_array_equal(np.asarray(one.sample_seeds([s])[0])[0], images8[s])


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_describe_round_trips_through_a_config(kind):
    process = make_process(kind, **PRESETS[kind])
    assert process_from_config({"process": process.describe()}) == process


def test_old_run_directories_still_load():
    """config.json written before the process section (precond + loss, as training runs and converted
    snapshots recorded them) gives the same process as the new section."""
    old_train = {"precond": {"kind": "vp", "kwargs": {"beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}},
                 "loss": {"kind": "vp", "kwargs": {"beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5}}}
    old_snapshot = {"precond": {"kind": "vp", "beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5},
                    "loss": {"kind": "vp", "beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5}}
    new = {"process": {"kind": "vp", "beta_d": 19.9, "beta_min": 0.1, "M": 1000, "epsilon_t": 1e-5}}
    assert process_from_config(old_train) == process_from_config(old_snapshot) == process_from_config(new)
    edm = process_from_config({"precond": {"kind": "edm", "sigma_data": 0.5}, "loss": None})
    # A snapshot that recorded no loss gets its Table 1 column's own, with the shared hyperparameters.
    assert edm.loss_kind == "edm" and edm.precond.sigma_data == dict(edm.loss_kwargs)["sigma_data"] == 0.5


def test_errors_name_the_field():
    with pytest.raises(ValueError, match=r"process.kind='bogus' is not a diffusion process; choose one of"):
        make_process("bogus")
    with pytest.raises(ValueError, match=r"the 'edm' process has no hyperparameter\(s\) \['beta_d'\]"):
        make_process("edm", beta_d=19.9)
    with pytest.raises(ValueError, match=r"has no sampler setting\(s\) \['sigma_min'\]"):
        make_process("psld").sampler_settings(sigma_min=0.1)
    with pytest.raises(ValueError, match="no training loss"):
        make_process("iddpm").loss(None, jnp.zeros((1, *SHAPE)), key=jax.random.key(0))


@pytest.mark.parametrize("kind", ["psld", "cld", "vpsde"])
def test_phase_space_loss_reports_the_reference_mean(kind):
    """What the trainer reports (Σ loss / image elements) is the reference's reduce_mean loss (psld_loss)."""
    from edm_jax.diffusion.psld_loss import psld_loss, vpsde_loss

    process, variables, _, _ = _setup(kind)
    model = process.model(_net)
    images = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (3, *SHAPE)), jnp.float32)
    key = jax.random.key(4)
    reported = jnp.sum(process.loss(lambda z, t, y, a: model(variables, z, t, y, a), images, key=key)) / images.size
    eps = lambda z, t, y: model(variables, z, t, y)  # noqa: E731
    reference = (vpsde_loss(eps, images, sde=process.sde, key=key, reduce="mean") if kind == "vpsde" else
                 psld_loss(eps, images, sde=process.sde, key=key, reduce="mean"))
    np.testing.assert_allclose(float(reported), float(reference), rtol=1e-6)
