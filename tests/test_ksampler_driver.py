"""k-diffusion samplers through the sampler driver: settings validation, the Karras grid with iDDPM's σ
rounding, and per-seed images independent of batch size and device count (bitwise on CPU)."""

import jax
import numpy as np
import pytest

from edm_jax import generate as gen
from edm_jax import precond as precond_lib
from edm_jax.diffusion import ksamplers, ksigmas
from edm_jax.diffusion.process import SigmaProcess
from edm_jax.diffusion.sampler_settings import SAMPLERS, SamplerSettings
from edm_jax.toy import GaussianMixture

SHAPE = (4, 4, 1)
_rng = np.random.default_rng(1)
MIXTURE = GaussianMixture(_rng.uniform(-0.8, 0.8, (3, *SHAPE)).astype(np.float32),
                          np.array([0.1, 0.2, 0.05], np.float32), np.ones(3, np.float32))
SEEDS = [0, 1, 2, 7, 1000]
# One of each kind of plan: ancestral draws, Brownian pairs, a multistep SDE, the per-image while_loop.
NAMES = ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpm_adaptive"]


def test_every_ksampler_is_a_setting_and_bad_names_list_the_choices():
    assert set(ksamplers.KSAMPLERS) | {"ablation"} == set(SAMPLERS)
    with pytest.raises(ValueError, match=r"unknown sampler 'dpmpp_9m'; choose one of \[.*'dpmpp_2m'.*\]"):
        SamplerSettings(sampler="dpmpp_9m")
    with pytest.raises(ValueError, match=r"sampler 'dpmpp_2m' takes no eta; samplers that do: \[.*'euler_ancestral'"):
        SamplerSettings(sampler="dpmpp_2m", eta=0.5)
    with pytest.raises(ValueError, match=r"sampler 'lms' takes no S_churn; samplers that do: \['dpm_2', 'euler', 'heun'\]"):
        SamplerSettings(sampler="lms", S_churn=1.0)
    with pytest.raises(ValueError, match=r"takes no rtol; samplers that do: \['dpm_adaptive'\]"):
        SamplerSettings(sampler="edm", rtol=0.01)
    with pytest.raises(ValueError, match="needs sampler='ablation'"):
        SamplerSettings(sampler="euler", discretization="vp")


def test_fields_map_onto_the_ksampler_keywords():
    s = SamplerSettings(sampler="euler", S_churn=2.0, S_min=0.1, S_max=10.0, S_noise=1.01)
    assert s.ksampler_kwargs() == dict(s_churn=2.0, s_tmin=0.1, s_tmax=10.0, s_noise=1.01) and s.stochastic
    assert SamplerSettings(sampler="dpm_adaptive", rtol=0.01, atol=0.002, order=2).ksampler_kwargs() == dict(
        s_noise=1.0, rtol=0.01, atol=0.002, order=2)
    assert SamplerSettings(sampler="dpm_fast", num_steps=12).ksampler_kwargs()["n"] == 12
    assert SamplerSettings(sampler="euler_ancestral").stochastic  # η defaults to 1
    assert not SamplerSettings(sampler="euler_ancestral", eta=0.0).stochastic
    assert not SamplerSettings(sampler="dpmpp_2m").stochastic
    np.testing.assert_array_equal(SamplerSettings(sampler="lms", num_steps=7).ksampler_grid(),
                                  ksigmas.karras_sigmas(7, 0.002, 80.0))


def test_iddpm_grid_is_rounded_and_clamped_to_the_networks_levels():
    pre = precond_lib.iDDPMPrecond()
    settings = SigmaProcess(precond=pre, name="iddpm").sampler_settings(base=SamplerSettings(sampler="dpmpp_2m",
                                                                                              num_steps=10))
    grid = settings.ksampler_grid(pre.round_sigma)
    levels = np.asarray(pre.round_sigma(grid[:-1]))
    np.testing.assert_allclose(grid[:-1], levels, rtol=1e-6)  # every level is one of the network's
    assert grid[0] <= pre.sigma_max * (1 + 1e-6) and grid[-2] >= pre.sigma_min * (1 - 1e-6) and grid[-1] == 0
    assert not np.allclose(grid[:-1], ksigmas.karras_sigmas(10, settings.sigma_min, settings.sigma_max)[:-1])
    with pytest.raises(ValueError, match="repeat a noise level"):
        SamplerSettings(sampler="euler", num_steps=900).clamp_to(pre).ksampler_grid(pre.round_sigma)


@pytest.fixture(scope="module")
def meshes():
    if len(jax.devices()) != 8:
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    return gen.make_mesh(jax.devices()[:1]), gen.make_mesh(jax.devices())


@pytest.mark.parametrize("name", NAMES)
def test_ksampler_image_depends_only_on_its_seed(meshes, name):
    """1 device in batches of 1 and 8 devices in one padded batch of 8 give the same bytes per seed."""
    settings = SamplerSettings(sampler=name, num_steps=4, **({"rtol": 0.1} if name == "dpm_adaptive" else {}))
    one, eight = (gen.make_sample_fn(MIXTURE.denoise, image_shape=SHAPE, label_dim=0, settings=settings, mesh=m)
                  for m in meshes)
    singles = np.concatenate([np.asarray(one.sample_seeds([s])[0]) for s in SEEDS])
    padded = SEEDS + [5000, 5001, 5002]
    together = np.asarray(eight.sample_seeds(padded)[0])[:len(SEEDS)]
    np.testing.assert_array_equal(singles, together)
    assert len({im.tobytes() for im in singles}) == len(SEEDS)  # seeds give different images
