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


@pytest.mark.parametrize("kind", ["psld", "vp"])
def test_lognormal_times_map_the_same_uniform_draws(kind):
    """t_lognormal=(P_mean, P_std): ln t = P_mean + P_std·Φ⁻¹(u) from the same u, clipped into [ε_train, T];
    the loss sees exactly those times, and off it is the paper's t = u(T − ε_train) + ε_train."""
    from jax.scipy.stats import norm

    from edm_jax.diffusion.psld_loss import train_times

    sde = PhaseSpaceSDE() if kind == "psld" else VPSDE(0.1, 20.0)
    p_mean, p_std = -2.5, 1.0
    k = np.array([-2.0, -1.0, 0.0, 0.5, 1.5])
    inside = np.asarray(train_times(sde, norm.cdf(jnp.asarray(k)), (p_mean, p_std)))
    np.testing.assert_allclose(inside, np.exp(p_mean + p_std * k), rtol=1e-5)
    ends = np.asarray(train_times(sde, jnp.array([0.0, 1e-9, 1 - 1e-7]), (p_mean, 3.0)))
    np.testing.assert_allclose(ends, [sde.train_eps, sde.train_eps, sde.T], rtol=1e-6)
    u = jax.random.uniform(jax.random.key(0), (4,))
    images = jax.random.normal(jax.random.key(1), (4, 2, 2, 3))
    eps = jax.random.normal(jax.random.key(2), (4, 2, 2, 6 if kind == "psld" else 3))
    for lognormal, want in (((p_mean, p_std), train_times(sde, u, (p_mean, p_std))),
                            (None, u * (sde.T - sde.train_eps) + sde.train_eps)):
        seen = {}
        net = recording_net(jnp.zeros_like(eps), seen)
        if kind == "psld":
            psld_loss(net, images, sde=sde, t_uniform=u, m0_noise=jnp.zeros_like(images), eps=eps,
                      t_lognormal=lognormal)
        else:
            vpsde_loss(net, images, sde=sde, t_uniform=u, eps=eps, t_lognormal=lognormal)
        np.testing.assert_allclose(seen["t"], want, rtol=1e-6)
    # The proposal moves draws towards small t: of a fine grid of u, the share landing in t ∈ [0.02, 0.2]
    # (where the quickstart's shapes are decided) grows from under a fifth to over a half.
    grid = jnp.linspace(0.0005, 0.9995, 1000)
    share = lambda t: float(jnp.mean((t >= 0.02) & (t <= 0.2)))  # noqa: E731
    assert share(train_times(sde, grid)) < 0.2 < 0.5 < share(train_times(sde, grid, (p_mean, p_std)))


def test_lognormal_is_checked_and_kept_in_the_run_description():
    from edm_jax.diffusion.psld_process import psld_process

    proc = psld_process("psld", t_lognormal=[-2.5, 1.0])
    assert proc.t_lognormal == (-2.5, 1.0)
    assert psld_process(**proc.describe()) == proc  # what a run directory stores rebuilds the same process
    assert "t_lognormal" not in psld_process("psld").describe()
    with pytest.raises(ValueError, match=r"t_lognormal must be \(P_mean, P_std\) with P_std > 0"):
        psld_process("psld", t_lognormal=(-2.5, 0.0))
