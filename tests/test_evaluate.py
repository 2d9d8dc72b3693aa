"""FID plumbing: images from folders/npz, a model sampled on the fly, reference statistics of a dataset.

Uses the deterministic Inception weights of the fixture recipe (the real 95 MB file is not available here);
the network itself is checked against the reference in test_fid.py.
"""

import jax
import numpy as np
import pytest
from conftest import load_fixture, nchw_to_nhwc

from edm_jax import data, evaluate, generate, inception
from edm_jax.toy import GaussianMixture

SAMPLERS = load_fixture("samplers.npz")


@pytest.fixture(scope="module")
def weights():
    return inception.variables_from_state_dict(inception.deterministic_weights())


@pytest.fixture(scope="module")
def sample_fn():
    # 4×4×3 images from the analytic mixture: cheap, deterministic, and image s depends only on seed s.
    mixture = GaussianMixture(nchw_to_nhwc(SAMPLERS["means"]), SAMPLERS["stds"], SAMPLERS["weights"])
    settings = generate.SamplerSettings(num_steps=4)
    return generate.make_sample_fn(mixture.denoise, image_shape=(4, 4, 3), label_dim=0, settings=settings,
                                   mesh=generate.make_mesh(jax.devices()[:1]))


def test_model_statistics_equal_those_of_its_written_samples(tmp_path, weights, sample_fn):
    seeds = list(range(6))  # two batches of 4, the last one padded
    generate.generate(sample_fn, seeds, batch=4, outdir=str(tmp_path / "png"), progress=False)
    generate.generate(sample_fn, seeds, batch=4, outdir=str(tmp_path / "npz"), fmt="npz", progress=False)
    from_png = evaluate.load_images(tmp_path / "png")
    from_npz = evaluate.load_images(tmp_path / "npz" / "samples.npz")
    np.testing.assert_array_equal(from_png, from_npz)
    mu_files, sigma_files = evaluate.stats_of_images(from_png, weights, batch_size=4)
    mu_model, sigma_model = evaluate.stats_of_model(sample_fn, seeds, weights, batch=4, progress=False)
    np.testing.assert_allclose(mu_model, mu_files, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma_model, sigma_files, rtol=1e-4, atol=1e-7)
    # (The Fréchet distance itself is tested on small Gaussians in test_fid.py: a 2048² sqrtm takes a
    # minute on 2 cores.)


def test_reference_stats_of_a_dataset_subset_is_a_fixed_subset(weights):
    # 4x4 images, batch 4: the Inception program compiled for the model samples above (one compile, not
    # two), and the whole dataset one batch (each Inception batch costs seconds on a CPU).
    dataset = data.synthetic_dataset(n=4, resolution=4, num_classes=2, seed=0)
    a = evaluate.reference_stats_of_dataset(dataset, weights, batch_size=4, max_images=3)
    b = evaluate.reference_stats_of_dataset(dataset, weights, batch_size=4, max_images=3)
    whole = evaluate.reference_stats_of_dataset(dataset, weights, batch_size=4)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(a[0], whole[0])


def test_paper_protocol_seed_ranges():
    ranges = evaluate.paper_seed_ranges(50000)
    assert [(r[0], r[-1], len(r)) for r in ranges] == [(0, 49999, 50000), (50000, 99999, 50000),
                                                        (100000, 149999, 50000)]


def test_bad_inputs_are_clear(tmp_path):
    np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="has no 'images' array"):
        evaluate.load_images(tmp_path / "x.npz")
    with pytest.raises(FileNotFoundError):
        evaluate.load_images(tmp_path / "missing.npz")
