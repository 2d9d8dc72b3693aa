"""--mode=likelihood's driver on the exact Gaussian-mixture denoiser: the sharded, batched bits/dim equal
`sigma_ode_log_likelihood` on the same dequantised images, whatever the batch and device count."""

import jax
import numpy as np
import pytest
from conftest import jit_fast, xla_flags
from PIL import Image

from edm_jax import evaluate
from edm_jax import generate as gen
from edm_jax import likelihood_driver as lik
from edm_jax.diffusion.likelihood import bits_per_dim, sigma_ode_log_likelihood
from edm_jax.diffusion.process import SigmaProcess, make_process
from edm_jax.precond import EDMPrecond
from edm_jax.toy import GaussianMixture

SHAPE = (4, 4, 1)
_rng = np.random.default_rng(3)
MIXTURE = GaussianMixture(_rng.uniform(-0.6, 0.6, (3, *SHAPE)).astype(np.float32),
                          np.array([0.2, 0.3, 0.25], np.float32), np.ones(3, np.float32))
PROCESS = SigmaProcess(precond=EDMPrecond())
KW = dict(sigma_min=0.002, sigma_max=80.0, num_probes=1, divergence="hutchinson", solver="rk45", rtol=1e-4,
          atol=1e-4, num_steps=16)
N = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """N PNGs named like --mode=sample's output, drawn from the mixture and quantised to uint8."""
    path = tmp_path_factory.mktemp("pngs")
    x = np.asarray(MIXTURE.sample(jax.random.key(0), N))
    pixels = np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
    for i, im in enumerate(pixels):
        Image.fromarray(im[..., 0]).save(path / f"{i:06d}.png")
    return path


@pytest.fixture(scope="module")
def meshes():
    if len(jax.devices()) != 8:
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    return gen.make_mesh(jax.devices()[:1]), gen.make_mesh(jax.devices())


@pytest.fixture(scope="module")
def results(folder, meshes):
    images = evaluate.load_images(str(folder))
    out = {}
    for name, mesh, batch in (("one_b2", meshes[0], 2), ("eight_b8", meshes[1], 8)):
        fn = lik.make_likelihood_fn(MIXTURE.denoise, process=PROCESS, mesh=mesh, **KW)
        out[name] = lik.likelihood_of_images(fn, images, batch=batch, mesh=mesh, base_seed=4)
    return images, out


def test_driver_equals_the_library_function_on_the_same_images(results):
    images, out = results
    base = jax.random.key(4)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(N, dtype=np.uint32))
    sub = lambda s: jax.vmap(lambda k: jax.random.fold_in(k, s))(keys)  # noqa: E731
    x = lik.dequantize(images, sub(lik.DEQUANT_STREAM))
    assert float(x.min()) >= -1 and float(x.max()) < 1 + 1 / 127.5
    # The library function compiled as one program (run eagerly, its solver's pieces compile one by one:
    # ~9 s of CPU against ~3 s); the same function, the same float32 arithmetic.
    ref = jit_fast(lambda x, key: sigma_ode_log_likelihood(MIXTURE.denoise, x, key=key, **KW))(x, sub(lik.PROBE_STREAM))
    # Equal up to float32 rounding that differs with the batch shape, which the adaptive steps then follow:
    # differences of ~1e-5 bits/dim at rtol = atol = 1e-4; 1e-4 bits/dim is the bound asserted.
    np.testing.assert_allclose(out["one_b2"]["per_image"], np.asarray(ref["bits_per_dim"]), rtol=0, atol=1e-4)
    # bits/dim is −log p / (d ln 2) after the change of variables to [0, 256) pixels.
    d = int(np.prod(SHAPE))
    np.testing.assert_allclose(np.asarray(bits_per_dim(ref["log_p"], d)),
                               -(np.asarray(ref["log_p"]) - d * np.log(127.5)) / (d * np.log(2)), rtol=1e-5)
    r = out["one_b2"]
    assert r["num_images"] == N and r["bits_per_dim"] == pytest.approx(r["per_image"].mean())
    assert r["std_err"] == pytest.approx(r["per_image"].std(ddof=1) / np.sqrt(N))


def test_bits_per_dim_do_not_depend_on_batch_or_devices(results):
    _, out = results
    np.testing.assert_allclose(out["one_b2"]["per_image"], out["eight_b8"]["per_image"], rtol=0, atol=1e-4)


def test_likelihood_settings_are_the_families_own():
    assert PROCESS.likelihood_settings(sigma_min=None, sigma_max=None) == dict(sigma_min=0.002, sigma_max=80.0)
    clamped = SigmaProcess(precond=EDMPrecond(sigma_min=0.01)).likelihood_settings(sigma_max=50.0)
    assert clamped == dict(sigma_min=0.01, sigma_max=50.0)
    psld = make_process("psld")
    assert psld.likelihood_settings(sigma_min=None, sigma_max=None) == dict(t_min=psld.sde.train_eps)
    assert psld.likelihood_settings(t_min=1e-3) == dict(t_min=1e-3)
    with pytest.raises(ValueError, match=r"the psld process's likelihood has no setting\(s\) \['sigma_min'\]; "
                                         r"it takes \['t_min'\]"):
        psld.likelihood_settings(sigma_min=0.01)


def test_bad_images_are_one_sentence(meshes):
    fn = lik.make_likelihood_fn(MIXTURE.denoise, process=PROCESS, mesh=meshes[0], **KW)
    with pytest.raises(ValueError, match="uint8 images"):
        lik.likelihood_of_images(fn, np.zeros((2, *SHAPE), np.float32), batch=2, mesh=meshes[0])


def test_likelihood_cli_on_a_psld_checkpoint(tmp_path):
    """--mode=likelihood --checkpoint=X.ckpt: PSLD's network and process from --config, through the process's
    log_likelihood (the bound of psld_ode_log_likelihood), a JSON summary that names the process."""
    import json
    import os
    import subprocess
    import sys

    from conftest import load_fixture
    from test_psld_net import CKPT, REPO, _small_config

    fx = load_fixture("psld_net.npz")
    size = fx["config"]["songunet_kwargs"]["img_resolution"]
    pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    for i, im in enumerate(pixels):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    out = tmp_path / "lik.json"
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--mode=likelihood", f"--checkpoint={CKPT}",
           f"--config={_small_config(tmp_path, fx)}", f"--images={tmp_path}", "--batch=2", "--solver=heun",
           "--steps=3", f"--out={out}"]
    # XLA's CPU optimisation off (as jit_fast): 33 s of CPU instead of 53 s for this tiny program.
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert summary["process"] == "psld" and summary["t_min"] == 1e-5 and summary["num_images"] == 2
    assert summary["nfe_mean"] == 4 and np.isfinite(summary["bits_per_dim"]) and summary["bits_per_dim"] > 0
    assert "bits/dim over 2 images" in done.stdout
