"""PSLD HSM/DSM and VP-SDE losses vs psld_loss.npz (every case), with the reference's draws."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_fast, load_fixture, nchw_to_nhwc
from edm_jax.diffusion.psld import VPSDE, PhaseSpaceSDE
from edm_jax.diffusion.psld_loss import psld_loss, vpsde_loss

FIX = load_fixture("psld_loss.npz")
CASES = sorted({k.split("/")[0] for k in FIX})
HP = ("beta_min", "beta_max", "gamma", "nu", "kappa", "numerical_eps", "decomp_mode", "train_eps")


def recording_net(net_out, seen):
    def eps_fn(z, t, labels):
        seen.update(z=z, t=t)
        return net_out
    return eps_fn


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("x64", [True, False])
def test_parity_with_reference(case, x64):
    cfg = json.loads(FIX[f"{case}/config"])
    f = lambda k: nchw_to_nhwc(FIX[f"{case}/{k}"])
    tol, dt = (1e-10, jnp.float64) if x64 else (1e-5, jnp.float32)
    seen = {}
    with jax.enable_x64(x64):
        a = lambda k: jnp.asarray(f(k), dt)
        u = jnp.asarray(FIX[f"{case}/t_uniform"], dt)
        net = recording_net(a("net_out"), seen)
        if cfg["kind"] == "vp":
            sde = VPSDE(cfg["beta_min"], cfg["beta_max"], train_eps=cfg["train_eps"])
            run = lambda **kw: vpsde_loss(net, a("x0"), sde=sde, t_uniform=u, eps=a("eps"), **kw)
            nll = run(weighting="nll", reduce="mean")
            assert abs(float(nll) - FIX[f"{case}/loss_nll_mean"]) <= tol * abs(FIX[f"{case}/loss_nll_mean"])
        else:
            sde = PhaseSpaceSDE(**{k: cfg[k] for k in HP})
            run = lambda **kw: psld_loss(net, a("x0"), sde=sde, t_uniform=u, m0_noise=a("m0_noise"), eps=a("eps"),
                                         hsm=cfg["mode"] == "hsm", **kw)
        elem, mean, total = run(), run(reduce="mean"), run(reduce="sum")
    ref = f("loss_elem")
    assert np.max(np.abs(np.asarray(elem, np.float64) - ref)) <= tol * ref.max()
    assert abs(float(mean) - FIX[f"{case}/loss_mean"]) <= tol * FIX[f"{case}/loss_mean"]
    assert abs(float(total) - FIX[f"{case}/loss_sum"]) <= tol * FIX[f"{case}/loss_sum"]
    z_ref = f("net_in_z")
    assert np.max(np.abs(np.asarray(seen["z"], np.float64) - z_ref)) <= tol * np.abs(z_ref).max()
    np.testing.assert_allclose(np.asarray(seen["t"], np.float64), FIX[f"{case}/net_in_t"], rtol=tol)


def test_key_draws_are_per_example():
    """With a key, example i's loss is the same whether it is trained alone or in a batch."""
    sde = PhaseSpaceSDE()
    net = lambda z, t, labels: jnp.tanh(z) * t[:, None, None, None]
    images = jax.random.normal(jax.random.key(1), (4, 4, 4, 3))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(4))
    loss = jit_fast(lambda im, k: psld_loss(net, im, sde=sde, key=k))  # one program, not op-by-op draws
    full = loss(images, keys)
    part = loss(images[2:], keys[2:])
    np.testing.assert_allclose(full[2:], part, rtol=1e-6)
    assert full.shape == (4, 4, 4, 6)
    with pytest.raises(ValueError, match="reduce must be"):
        psld_loss(net, images, sde=sde, key=keys, reduce="avg")
