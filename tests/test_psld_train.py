"""PSLD's training recipe in the shared trainer (notes §3): the warm-up, gradient-norm clipping and the
per-step EMA, against their closed forms; and the CIFAR-10 preset starting from the command line."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from edm_jax import train
from edm_jax.diffusion.psld_process import psld_process

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ZIP = REPO.parent / "shared" / "data" / "cifar10-jpeg-train.zip"
FAST = {"xla_backend_optimization_level": 0}


def _config(name):
    sys.path.insert(0, str(REPO))  # presets import configs.cifar10_edm
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _flat(tree):
    return np.asarray(ravel_pytree(jax.device_get(tree))[0], np.float64)


def _adam_mu(opt_state):
    """Adam's first moment, wherever the optimizer chain keeps it."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return _flat(adam.mu)


def test_preset_uses_the_reference_recipe():
    t = _config("cifar10_psld").train
    assert (t.batch_size, t.lr, t.adam_b1, t.adam_b2, t.adam_eps) == (128, 2e-4, 0.9, 0.999, 1e-8)
    assert (t.ema_decay, t.grad_clip_norm, t.loss_scaling) == (0.9999, 1.0, 1 / 3072)
    # EDM's presets keep both options off.
    e = _config("cifar10_edm").train
    assert e.ema_decay is None and e.grad_clip_norm is None


def test_warmup_is_linear_over_5000_steps():
    """lr = 2e-4 · min(step / 5000, 1) per optimizer step, lr 0 at step 0 (the reference's LambdaLR)."""
    t = _config("cifar10_psld").train
    for step in (0, 1, 2500, 4999, 5000, 5001, 10 ** 6):
        lr = float(train.learning_rate(step * t.batch_size, t.lr, t.lr_rampup_kimg * 1000))
        assert lr == pytest.approx(2e-4 * min(step / 5000, 1), rel=1e-6, abs=0)


def test_clipping_bounds_the_gradient_adam_sees():
    """Adam's first moment after one step is (1 − β₁)·g_clipped: norm ≤ 1 and direction kept when clipped,
    the gradient unchanged below the bound, and no clipping without the option (EDM)."""
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    direction = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.3, 0.0], [-1.0, 2.0]])}
    unit = np.sqrt(np.sum(_flat(direction) ** 2))
    for scale, clip, want_norm in ((5.0, 1.0, 1.0), (0.5, 1.0, 0.5), (5.0, None, 5.0)):
        g = jax.tree.map(lambda d: d * scale / unit, direction)
        tx = train.make_optimizer(1e-3, grad_clip_norm=clip)
        _, state = tx.update(g, tx.init(params), params)
        mu = _adam_mu(state) / (1 - 0.9)
        np.testing.assert_allclose(np.linalg.norm(mu), want_norm, rtol=1e-6)
        np.testing.assert_allclose(mu / np.linalg.norm(mu), _flat(direction) / unit, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="grad_clip_norm must be > 0"):
        train.make_optimizer(1e-3, grad_clip_norm=0.0)


class TinyNet(nn.Module):
    """Two convolutions with the network call signature; output channels = input channels (PSLD's 2C)."""

    @nn.compact
    def __call__(self, x, noise_labels, class_labels=None, augment_labels=None, train=False):
        h = nn.silu(nn.Conv(8, (3, 3))(x) + nn.Dense(8)(noise_labels[:, None])[:, None, None, :])
        return nn.Conv(x.shape[-1], (3, 3))(h)


def test_per_step_ema_and_clipping_in_the_train_step():
    """Three PSLD train steps with ema_decay d = 0.9: EMA = d³p₀ + (1 − d)(d²p₁ + d p₂ + p₃) (the EMA starts
    as the network, updated after every step), β reported as d; the first step's gradient (large: loss
    scaled by 1e3) reaches Adam clipped to norm 1."""
    d, batch, module = 0.9, 4, TinyNet()
    tx = train.make_optimizer(1e-2, grad_clip_norm=1.0)
    state = train.create_train_state(jax.random.key(0), module, (8, 8, 6), tx=tx, compiler_options=FAST)
    step = jax.jit(train.make_train_step(apply_fn=module.apply, process=psld_process("psld"), tx=tx, global_batch=batch,
                                         base_lr=1e-2, lr_rampup_img=2 * batch, ema_decay=d, loss_scaling=1e3),
                   compiler_options=FAST)
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 8, 8, 3)), jnp.float32)
    params = [_flat(state.params)]
    for i in range(3):
        state, metrics = step(state, {"images": images}, jax.random.key(1))
        params.append(_flat(state.params))
        assert float(metrics["ema_beta"]) == np.float32(d)
        if i == 0:
            mu = _adam_mu(state.opt_state) / (1 - 0.9)
            np.testing.assert_allclose(np.linalg.norm(mu), 1.0, rtol=1e-5)  # clipped (the raw norm is ≫ 1)
    p0, p1, p2, p3 = params
    assert np.max(np.abs(p2 - p1)) > 1e-4  # the parameters move (lr > 0 from step 1), so the test can fail
    want = d ** 3 * p0 + (1 - d) * (d ** 2 * p1 + d * p2 + p3)
    np.testing.assert_allclose(_flat(state.ema), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        train.make_train_step(apply_fn=module.apply, process=psld_process("psld"), tx=tx, global_batch=batch,
                              ema_decay=1.0)


@pytest.mark.skipif(not CIFAR_ZIP.exists(), reason="needs ../shared/data/cifar10-jpeg-train.zip")
def test_cifar10_preset_trains_from_the_zip(tmp_path):
    """`main.py --config=configs/cifar10_psld.py --mode=train` on the CIFAR-10 zip: a tiny network, one
    step of 8 images (the tests run on 8 devices); it reads the zip, trains the 6-channel network and
    writes the step-1 checkpoint."""
    small = ["--config.model.model_channels=8", "--config.model.channel_mult=(1,)", "--config.model.num_blocks=1",
             "--config.model.attn_resolutions=()", "--config.data.max_size=16", "--config.train.batch_size=8",
             "--config.train.total_kimg=0.008", "--config.train.tick_kimg=0.008", "--config.sample.num_images=0",
             "--config.train.async_checkpointing=False"]
    done = subprocess.run([sys.executable, "main.py", "--config=configs/cifar10_psld.py", "--mode=train",
                           f"--workdir={tmp_path}", f"--config.data.path={CIFAR_ZIP}", *small],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "data: 'cifar10-jpeg-train', 16 images of 32x32x3" in log
    assert "done: step 1" in log and os.path.isdir(tmp_path / "checkpoints" / "1")


@pytest.mark.parametrize("kind", ["psld", "cld", "vpsde"])
def test_gaussian_data_eps_is_the_linear_regression_of_eps(kind):
    """The skip ε_G (eps_skip): for Gaussian data it is E[ε | z_t], linear in z, so the residual ε − ε_G(z)
    is uncorrelated with every channel of z at every t (Monte Carlo, 3·SE) and smaller than ε itself; and
    the process adds it to the network's output."""
    from edm_jax.diffusion.psld_process import gaussian_data_eps

    process, s, n = psld_process(kind, eps_skip=0.5), 0.5, 8192
    sde = process.sde
    t = jnp.asarray([1e-3, 0.05, 0.3, 1.0]).repeat(n // 4)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = s * jax.random.normal(k1, (n, 1, 1, 1))
    width = 2 if kind != "vpsde" else 1
    eps = jax.random.normal(k2, (n, 1, 1, width))
    z, _ = sde.perturb(x0, t, eps)
    g = gaussian_data_eps(sde, z, t, s)
    resid = np.asarray(eps[..., -g.shape[-1]:] - g, np.float64).reshape(4, n // 4, -1)  # CLD: the m block
    zz = np.asarray(z, np.float64).reshape(4, n // 4, -1)
    zz = zz / zz.std(1, keepdims=True)
    corr = np.einsum("tni,tnj->tij", resid, zz) / (n // 4)
    assert np.max(np.abs(corr)) < 3 / np.sqrt(n // 4), corr
    assert np.mean(resid ** 2) < 0.9
    zero_net = lambda variables, z, label, *a, **k: jnp.zeros((*z.shape[:-1], resid.shape[-1]))  # noqa: E731
    np.testing.assert_allclose(process.model(zero_net)(None, z, t), g, rtol=1e-6)
