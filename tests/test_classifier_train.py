"""Classifier training for guidance: end to end on a tiny synthetic set, resume, reload, and the per-σ
accuracy report checked against a classifier whose answers are known exactly."""

import json
import logging
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from edm_jax import classifier_train, guided_models  # noqa: E402
from edm_jax.guidance import classifier_log_prob  # noqa: E402
from edm_jax.precond import EDMPrecond  # noqa: E402


def tiny_config():
    from configs.quickstart_classifier import get_config

    c = get_config()
    c.data.synthetic = ml_collections.ConfigDict(dict(n=128, resolution=8, channels=3, num_classes=4, seed=0))
    c.classifier.model_channels = 8
    c.classifier.channel_mult = (1, 2)
    c.classifier.channel_mult_emb = 2
    c.classifier.attn_resolutions = (4,)
    c.classifier.channels_per_head = 8
    c.train.batch_size = 16
    c.train.total_steps = 3
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.async_checkpointing = False
    c.train.compiler_options = ml_collections.ConfigDict({"xla_backend_optimization_level": 0})  # fast CPU compile
    c.eval.sigmas = (0.05, 80.0)
    c.eval.num_images = 32
    c.eval.batch = 16
    return c


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny classifier run, trained once for the module (training compiles the step and the evaluation):
    its folder, config, accuracy rows and what it logged to the `edm_jax` loggers."""
    workdir = tmp_path_factory.mktemp("clf")
    config = tiny_config()
    logger, handler = logging.getLogger("edm_jax"), _Lines()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # the library logs; main.py owns the console
    try:
        rows = classifier_train.train_classifier(config, str(workdir))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return workdir, config, rows, "\n".join(handler.lines)


def test_train_classifier_end_to_end_resume_and_reload(trained, caplog):
    tmp_path, config, rows, out = trained
    assert "step      3/3" in out and "held-out accuracy per sigma" in out
    assert [r["sigma"] for r in rows] == [0.05, 80.0]
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["cross_entropy"]) for r in rows)

    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2, 3]
    saved = json.loads((tmp_path / "accuracy.json").read_text())
    assert saved["step"] == 3 and saved["rows"] == rows and saved["chance"] == 0.25
    meta = json.loads((tmp_path / "classifier_config.json").read_text())
    assert meta["precond"]["kind"] == "edm"
    assert meta["network"]["num_classes"] == 4 and meta["network"]["img_resolution"] == 8
    assert meta["network"]["channel_mult"] == [1, 2]

    # Reload: the same network and parameters give the same table.
    module, variables, precond = classifier_train.load_classifier(str(tmp_path))
    from edm_jax import data as data_lib

    held = data_lib.synthetic_dataset(n=32, resolution=8, channels=3, num_classes=4, seed=int(config.eval.seed))
    images = held.images.astype(np.float32) / 127.5 - 1
    labels = np.eye(4, dtype=np.float32)[held.labels]
    again = classifier_train.accuracy_per_sigma(module.apply, variables, images, labels, [0.05, 80.0],
                                                jax.random.key(int(config.eval.seed)), precond, batch=32)
    for a, b in zip(again, rows):
        assert a["accuracy"] == b["accuracy"]
        np.testing.assert_allclose(a["cross_entropy"], b["cross_entropy"], rtol=1e-5)
    logp = classifier_log_prob(module.apply, variables, precond)(jnp.asarray(images[:4]), 0.5, labels[:4])
    assert logp.shape == (4,) and bool(jnp.all(logp <= 0))

    # Rerun: resumes at the final step and does nothing more.
    mtime = os.path.getmtime(tmp_path / "accuracy.json")
    with caplog.at_level("INFO", logger="edm_jax"):
        assert classifier_train.train_classifier(config, str(tmp_path)) == rows
    out = caplog.text
    assert "nothing to do" in out and "training the classifier" not in out
    assert os.path.getmtime(tmp_path / "accuracy.json") == mtime
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2, 3]


@pytest.mark.parametrize("steps", [0, -5])
def test_zero_steps_writes_no_accuracy_table(tmp_path, steps):
    config = tiny_config()
    config.train.total_steps = steps
    with pytest.raises(ValueError, match=rf"^train.total_steps={steps} trains nothing, and the accuracy table of "
                                         "an untrained classifier would mislead; set train.total_steps >= 1$"):
        classifier_train.train_classifier(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unlabelled_data_is_an_error(tmp_path):
    config = tiny_config()
    config.data.synthetic.num_classes = 1  # labels all 0: label_dim 1 works; drop labels instead
    config.data.use_labels = False
    # train_classifier forces labels on; an unlabelled source (a folder without dataset.json) must fail:
    folder = tmp_path / "imgs"
    folder.mkdir()
    import PIL.Image

    for i in range(4):
        PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    config.data.source = "folder"
    config.data.path = str(folder)
    with pytest.raises(ValueError, match="no class labels"):
        classifier_train.train_classifier(config, str(tmp_path / "run"))


def test_accuracy_per_sigma_with_a_known_classifier():
    """A stand-in classifier: class 0 for σ < 1 (c_noise = ln σ / 4 < 0), class 1 otherwise, with logits
    (2, 0, 0, 0) resp. (0, 2, 0, 0) whatever the image. Labels 0, 0, 0, 1 give accuracy 3/4 below σ = 1
    and 1/4 above; the cross-entropy is log(e² + 3) − 2 for the favoured class and log(e² + 3) otherwise."""
    seen = []

    def apply_fn(variables, x_in, c_noise):
        seen.append(x_in.shape)
        low = (c_noise < 0)[:, None]
        fav0 = jnp.array([2.0, 0, 0, 0])
        fav1 = jnp.array([0, 2.0, 0, 0])
        return jnp.where(low, fav0, fav1) * variables["scale"]

    images = np.zeros((4, 2, 2, 1), np.float32)
    labels = np.eye(4, dtype=np.float32)[[0, 0, 0, 1]]
    rows = classifier_train.accuracy_per_sigma(apply_fn, {"scale": 1.0}, images, labels, [0.1, 0.5, 2.0, 80.0],
                                               jax.random.key(0), EDMPrecond(), batch=3)
    z = np.log(np.exp(2.0) + 3)
    low_ce = (3 * (z - 2) + z) / 4
    high_ce = (3 * z + (z - 2)) / 4
    assert [r["sigma"] for r in rows] == [0.1, 0.5, 2.0, 80.0]
    assert [r["accuracy"] for r in rows] == [0.75, 0.75, 0.25, 0.25]
    np.testing.assert_allclose([r["cross_entropy"] for r in rows], [low_ce, low_ce, high_ce, high_ce], rtol=1e-6)
    assert set(seen) == {(3, 2, 2, 1), (1, 2, 2, 1)}  # batched in chunks of 3


def test_accuracy_per_sigma_feeds_the_preconditioned_noisy_image():
    """With an identity-like classifier reading x_in, the input must be c_in(σ) · (x₀ + σ n): at tiny σ a
    classifier that picks the brightest channel is exact, at huge σ c_in · x ≈ n and the images do not matter."""
    def apply_fn(variables, x_in, c_noise):
        return jnp.mean(x_in, axis=(1, 2)) * 100.0  # channel means as logits, 3 classes

    rng = np.random.default_rng(0)
    cls = rng.integers(0, 3, 60)
    images = np.full((60, 4, 4, 3), -1.0, np.float32)
    images[np.arange(60), :, :, cls] = 1.0
    labels = np.eye(3, dtype=np.float32)[cls]
    rows = classifier_train.accuracy_per_sigma(apply_fn, None, images, labels, [1e-3, 1e4], jax.random.key(1))
    assert rows[0]["accuracy"] == 1.0
    assert rows[1]["accuracy"] < 0.7  # pure noise: about chance


def test_classifier_guidance_flag_wiring(trained):
    """main.py's --classifier path: a trained classifier steers the sampler; scale 0 is the plain sampler."""
    import main
    from edm_jax import generate

    clf = str(trained[0])  # the module's 3-step classifier (read only here)
    # A 4-class stand-in model over 8×8×3 images: the exact denoiser of unit-Gaussian data (labels unused).
    model = generate.BoundDenoiser(lambda p, x, s, y: p * x / (1 + s[:, None, None, None] ** 2), jnp.float32(1))
    mesh = generate.make_mesh(jax.devices()[:1])

    def images(denoise):
        fn = generate.make_sample_fn(denoise, image_shape=(8, 8, 3), label_dim=4, mesh=mesh, class_idx=3,
                                     settings=generate.SamplerSettings(num_steps=3))
        return np.asarray(fn.sample_seeds([0, 1])[0])

    plain = images(model)
    guided = lambda scale: guided_models.with_classifier_guidance(model, 4, clf, scale)  # noqa: E731
    np.testing.assert_array_equal(images(guided(0.0)), plain)
    assert np.abs(images(guided(200.0)).astype(int) - plain).max() > 0
    with pytest.raises(ValueError, match="has 4 classes but the model samples 10"):
        guided_models.with_classifier_guidance(model, 10, clf, 1.0)
