"""The paper's presets: each loads, builds its preconditioner and loss, and rebuilds the paper's network
with exactly the reference's parameter count (NVlabs/edm, computed from the real modules; notes §1.5)."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # presets import configs.cifar10_edm, as they do under main.py

from edm_jax import losses, train  # noqa: E402
from edm_jax.interop.rundir import process_from_config  # noqa: E402


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def parameter_count(config, resolution, label_dim):
    augment_dim = 9 if config.augment.p > 0 else 0
    module = train.build_network(config.model.to_dict(), resolution=resolution, channels=3, label_dim=label_dim,
                                 augment_dim=augment_dim, out_channels=3)
    x = jnp.zeros((1, resolution, resolution, 3))
    labels = jnp.zeros((1, label_dim)) if label_dim else None
    aug = jnp.zeros((1, augment_dim)) if augment_dim else None
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, jnp.zeros((1,)), labels, aug))
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name, arg, resolution, label_dim, count, kinds", [
    ("cifar10_vp", None, 32, 0, 55_733_891, ("vp", "vp")),
    ("cifar10_ve", None, 32, 0, 56_397_827, ("ve", "ve")),
    ("cifar10_ve", "cond", 32, 10, 56_400_643, ("ve", "ve")),
    ("cifar10_edm", "cond,ncsnpp", 32, 10, 56_400_643, ("edm", "edm")),
    ("ffhq64", None, 64, 0, 61_805_571, ("edm", "edm")),
    ("ffhq64", "ncsnpp", 64, 0, 62_761_091, ("edm", "edm")),
    ("afhqv2_64", None, 64, 0, 61_805_571, ("edm", "edm")),
    ("imagenet64_adm", None, 64, 1000, 295_899_267, ("edm", "edm")),
])
def test_preset_rebuilds_the_paper_network(name, arg, resolution, label_dim, count, kinds):
    config = load(name, arg)
    process = process_from_config(config)  # hyperparameter names are the library's (unknown ones raise)
    assert (process.name, process.loss_kind) == kinds
    assert set(dict(process.loss_kwargs)) <= set(losses.DEFAULTS[process.loss_kind])
    assert config.data.use_labels == bool(label_dim)
    assert parameter_count(config, resolution, label_dim) == count


def test_preset_values_follow_the_reference_readme():
    ffhq, afhq, imagenet = load("ffhq64"), load("afhqv2_64"), load("imagenet64_adm")
    assert (ffhq.train.batch_size, ffhq.train.lr, ffhq.model.dropout, ffhq.augment.p) == (256, 2e-4, 0.05, 0.15)
    assert afhq.model.dropout == 0.25 and afhq.train.batch_size == 256
    t = imagenet.train
    assert (t.batch_size, t.lr, t.ema_halflife_kimg, t.loss_scaling, t.total_kimg, t.tick_kimg) == (
        4096, 1e-4, 50000, 100, 2500000, 200)
    assert imagenet.augment.p == 0 and imagenet.model.dtype == "bfloat16" and imagenet.model.dropout == 0.10
    with pytest.raises(ValueError, match="the config argument takes cond|uncond"):
        load("cifar10_vp", "vp")


def test_quickstart_refuses_a_config_argument():
    from configs import quickstart
    with pytest.raises(ValueError, match="takes no argument"):
        quickstart.get_config("bogus")


def test_psld_preset_is_the_papers_97m_network():
    """configs/cifar10_psld.py's model section is psld_checkpoint's SOTA preset, with PSLD's exact count:
    97,627,910 = 97,627,782 trainable + the 128 frozen Fourier frequencies (a buffer here)."""
    from edm_jax.interop import psld_checkpoint

    config = load("cifar10_psld")
    preset = psld_checkpoint.psld_network_kwargs("cifar10_sota")
    io = config.network_io.to_dict()
    model = {k: v for k, v in config.model.to_dict().items() if k not in ("name", "dtype")}
    assert model.pop("label_dropout") == 0.0  # unconditional: no labels to drop
    assert {**model, **io, "label_dim": 0, "augment_dim": 0} == preset
    module = train.build_network(config.model.to_dict(), resolution=io["img_resolution"], channels=io["in_channels"],
                                 label_dim=0, augment_dim=0, out_channels=io["out_channels"])
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 6)), jnp.zeros((1,))))
    count = lambda tree: sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tree))
    assert (count(shapes["params"]), count(shapes["buffers"])) == (97_627_782, 128)
    assert (config.train.batch_size, config.train.lr, config.model.dropout) == (128, 2e-4, 0.15)
    assert config.data.use_labels is False and config.data.tfds_name == "cifar10"
