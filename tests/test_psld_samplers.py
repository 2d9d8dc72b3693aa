"""PSLD samplers vs psld_samplers.npz (every run, every state, NFE) and analytic checks with an exact score."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import jit_fast, load_fixture, nchw_to_nhwc, rel_err
from edm_jax.diffusion.psld import Factor, PhaseSpaceSDE, _apply, _bc
from edm_jax.diffusion import psld_samplers as S

FIX = load_fixture("psld_samplers.npz")
META = json.loads(FIX["meta"])
SAMPLERS = {"em": S.em_sampler, "sscs": S.sscs_sampler}
STRIDES = {"uniform": "uniform", "quadratic": "quadratic"}


def sde_of(name):
    return PhaseSpaceSDE(**META["configs"][name], eval_eps=META["eval_eps"])


def gaussian_score(sde, mu, s):
    """Exact score of z_t for data x₀ ~ N(μ, s² I) per pixel (notes §9): −(s² a aᵀ + Σ_t)^{-1}(z − a μ)."""
    def score(z, t):
        m = sde.mean_matrix(t)
        cov = sde.cov_hsm(t)
        ax, am = _bc(m.c11, z), _bc(m.c21, z)
        pxx, pxm, pmm = (_bc(v, z) for v in cov)
        pxx, pxm, pmm = s**2 * ax**2 + pxx, s**2 * ax * am + pxm, s**2 * am**2 + pmm
        det = pxx * pmm - pxm**2
        c = z.shape[-1] // 2
        dx, dm = z[..., :c] - ax * mu, z[..., c:] - am * mu
        return jnp.concatenate([-(pmm * dx - pxm * dm) / det, -(pxx * dm - pxm * dx) / det], -1)
    return score


def gaussian_eps_fn(sde, mu, s):
    score = gaussian_score(sde, mu, s)

    def eps_fn(z, t, labels):
        return sde.eps_from_score(score(z, t), t)
    return eps_fn


MU = np.transpose(FIX["data_mu"], (1, 2, 0))  # NumPy float64: a jnp array made here would be float32
DATA_S = float(FIX["data_s"])
RUNS = sorted(META["runs"])


@pytest.mark.parametrize("run", RUNS)
def test_sampler_parity(run):
    """Every state, the final denoised sample, the grid and the NFE, float64 ≤ 1e-10 relative L2."""
    spec = META["runs"][run]
    f = lambda k: FIX[f"{run}{k}"]
    sde = sde_of(spec["config"])
    with jax.enable_x64(True):
        eps_fn = gaussian_eps_fn(sde, jnp.asarray(MU, jnp.float64), DATA_S)
        noise = np.transpose(f("noise"), (0, 1, 3, 4, 2))
        z_T = sde.prior(jnp.asarray(np.transpose(f("prior_noise"), (0, 1, 3, 4, 2))), nchw_to_nhwc(f("z_init")[:, :2]).shape,
                        jnp.float64)
        np.testing.assert_allclose(z_T, nchw_to_nhwc(f("z_init")), rtol=1e-15)
        fn = SAMPLERS[spec["sampler"]]
        z0, aux = jit_fast(lambda z, n: fn(eps_fn, z, sde=sde, num_steps=META["n_discrete_steps"],
                                          stride=STRIDES[spec["stride"]], noise=n))(z_T, jnp.asarray(noise))
        np.testing.assert_allclose(S.time_grid(sde, META["n_discrete_steps"], spec["stride"]), f("ts"), rtol=1e-14)
    tol = 1e-10
    states = np.transpose(np.asarray(aux["states"]), (0, 1, 4, 2, 3))
    errs = [rel_err(states[k], f("states")[k]) for k in range(states.shape[0])]
    final = rel_err(np.transpose(np.asarray(z0), (0, 3, 1, 2)), f("final"))
    print(run, np.array2string(np.array(errs), precision=1), f"final {final:.1e}")
    assert max(errs) <= tol and final <= tol
    assert aux["nfe"] == int(f("nfe_calls")) == int(f("nfe_attr")) + 1


@pytest.mark.parametrize("run", RUNS)
def test_sampler_float32(run):
    """float32 run vs the float64 fixture: ≤ 1e-4 relative L2 (the fixture README's bound)."""
    spec = META["runs"][run]
    sde = sde_of(spec["config"])
    z_T = jnp.asarray(nchw_to_nhwc(FIX[f"{run}z_init"]), jnp.float32)
    noise = jnp.asarray(np.transpose(FIX[f"{run}noise"], (0, 1, 3, 4, 2)), jnp.float32)
    eps_fn = gaussian_eps_fn(sde, jnp.asarray(MU, jnp.float32), DATA_S)
    z0, _ = jit_fast(lambda z, n: SAMPLERS[spec["sampler"]](eps_fn, z, sde=sde, num_steps=META["n_discrete_steps"],
                                                            stride=spec["stride"], noise=n))(z_T, noise)
    assert rel_err(nchw_to_nhwc(FIX[f"{run}final"]), np.asarray(z0)) <= 1e-4


def _ode_setup():
    sde = sde_of(META["ode_config"])
    return sde, gaussian_eps_fn(sde, jnp.asarray(MU, jnp.float64), DATA_S), jnp.asarray(
        nchw_to_nhwc(FIX["psld/ode/z_init"]), jnp.float64)


def test_ode_euler_parity():
    """100 Euler steps on the PF-ODE vs the fixture, every 10th state and the final one, ≤ 1e-10."""
    with jax.enable_x64(True):
        sde, eps_fn, z_T = _ode_setup()
        z0, aux = jit_fast(lambda z: S.ode_sampler(eps_fn, z, sde=sde, num_steps=100, solver="euler"))(z_T)
    states = np.transpose(np.asarray(aux["states"][::10]), (0, 1, 4, 2, 3))
    assert rel_err(states, FIX["psld/ode/euler_states_every10"]) <= 1e-10
    assert rel_err(np.transpose(np.asarray(z0), (0, 3, 1, 2)), FIX["psld/ode/euler_final"]) <= 1e-10


def test_ode_fixed_step_orders():
    """Euler ≈ order 1, Heun ≈ order 2 against the fixture's DOP853 1e-12 solution."""
    with jax.enable_x64(True):
        sde, eps_fn, z_T = _ode_setup()
        ref = FIX["psld/ode/exact_final"]
        for solver, order in (("euler", 1), ("heun", 2)):
            run = lambda n: jit_fast(lambda z: S.ode_sampler(eps_fn, z, sde=sde, num_steps=n, solver=solver)[0])(z_T)
            errs = [rel_err(np.transpose(np.asarray(run(n)), (0, 3, 1, 2)), ref) for n in (200, 400)]
            assert abs(np.log2(errs[0] / errs[1]) - order) < 0.25, (solver, errs)


RK45_TOLS = sorted(int(k.split("tol")[1].split("_")[0]) for k in FIX if k.startswith("psld/ode/rk45_")
                   and k.endswith("_nfe"))


@pytest.mark.parametrize("tol", RK45_TOLS)
def test_ode_adaptive_whole_batch_parity(tol):
    """Whole-batch Dopri5 (as the reference's RK45), every tolerance the fixture holds: NFE within 20 % of
    the reference's (in fact its step sequence), final within the tolerance of the 1e-12 solution and equal
    to the reference's RK45 result to 1e-10."""
    with jax.enable_x64(True):
        sde, eps_fn, z_T = _ode_setup()
        z0, aux = jit_fast(lambda z: S.ode_adaptive_sampler(eps_fn, z, sde=sde, rtol=10.0**-tol, atol=10.0**-tol,
                                                         per_image=False))(z_T)
    z0 = np.transpose(np.asarray(z0), (0, 3, 1, 2))
    ref_nfe = int(FIX[f"psld/ode/rk45_tol{tol}_nfe"])
    nfe = int(aux["nfe"][0])
    print(f"tol 1e-{tol}: NFE {nfe} (reference {ref_nfe}), err vs exact {rel_err(z0, FIX['psld/ode/exact_final']):.2e}, "
          f"vs rk45 {rel_err(z0, FIX[f'psld/ode/rk45_tol{tol}_final']):.2e}")
    # scipy's controller (rk45_control): the same steps as the reference, so the same NFE but for the one
    # extra evaluation of f(z_T) in diffrax's FSAL init; the brief's bound is ±20 %.
    assert abs(nfe - ref_nfe) <= 0.2 * ref_nfe
    assert nfe == ref_nfe + 1
    assert rel_err(z0, FIX["psld/ode/exact_final"]) <= {5: 1e-4, 3: 2e-2}[tol]
    assert rel_err(z0, FIX[f"psld/ode/rk45_tol{tol}_final"]) <= 1e-10


def test_ode_adaptive_per_image_is_batch_independent():
    with jax.enable_x64(True):
        sde, eps_fn, z_T = _ode_setup()
        run = jit_fast(lambda z: S.ode_adaptive_sampler(eps_fn, z, sde=sde, rtol=1e-5, atol=1e-5))
        full, aux = run(z_T)
        part, aux2 = run(z_T[2:4])
    np.testing.assert_array_equal(np.asarray(full[2:4]), np.asarray(part))
    np.testing.assert_array_equal(np.asarray(aux["nfe"][2:4]), np.asarray(aux2["nfe"]))
    assert rel_err(np.transpose(np.asarray(full), (0, 3, 1, 2)), FIX["psld/ode/exact_final"]) <= 1e-4
    print("per-image NFE", np.asarray(aux["nfe"]))


def test_ode_transports_gaussian_moments():
    """The PF-ODE with the exact score is affine, so it maps the exact t = 1 marginal onto the t = ε_eval one:
    push mean and an affine basis through Dopri5 (rtol 1e-10), compare with the kernel's moments ≤ 1e-6."""
    with jax.enable_x64(True):
        sde = PhaseSpaceSDE(eval_eps=1e-3)
        mu, s = jnp.asarray([[[0.3]]]), 0.35
        eps_fn = gaussian_eps_fn(sde, mu, s)
        t1, t0 = 1.0, sde.eval_eps

        def marg(t):
            m, c = sde.mean_matrix(t), sde.cov_hsm(t)
            a = np.array([m.c11, m.c21]) * 0.3
            P = s**2 * np.outer([m.c11, m.c21], [m.c11, m.c21]) + np.array([[c.xx, c.xm], [c.xm, c.mm]])
            return a, P
        a1, P1 = marg(t1)
        a0, P0 = marg(t0)
        L1 = np.linalg.cholesky(P1)
        # Three states (mean, mean ± basis) per pixel: z = a + L e_k.
        zs = np.stack([a1, a1 + L1[:, 0], a1 + L1[:, 1]]).reshape(3, 1, 1, 2)
        sde_nodenoise = sde
        f = lambda z: S.ode_adaptive_sampler(eps_fn, z, sde=sde_nodenoise, rtol=1e-10, atol=1e-10)
        # stop before the denoising step: integrate to τ = 1 − ε_eval by removing it (ε_eval·f̄ added last)
        import diffrax
        vf = lambda tau, z, _: sde.reverse_drift(z, tau, eps_fn(z, jnp.full((3,), 1.0 - tau), None), ode=True)
        solve = jit_fast(lambda z: diffrax.diffeqsolve(
            diffrax.ODETerm(vf), diffrax.Dopri5(), 0.0, 1.0 - t0, None, z,
            stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11), max_steps=100000).ys)
        ys = solve(jnp.asarray(zs))
    out = np.asarray(ys[-1]).reshape(3, 2)
    mean, B = out[0], (out[1:] - out[0]).T
    np.testing.assert_allclose(mean, a0, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(B @ B.T, P0, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sampler,steps,stride,std_tol", [("em", 100, "uniform", 0.06), ("sscs", 100, "uniform", 0.06),
                                                           ("em", 50, "quadratic", 0.06)])
def test_samplers_reproduce_the_data_law(sampler, steps, stride, std_tol):
    """Exact score, 4096 samples of 8 dims (the notes' check): |mean − μ| < 5 s/√n, |std/s − 1| < tol."""
    sde = PhaseSpaceSDE()
    mu = jnp.linspace(-0.5, 0.5, 8).reshape(2, 2, 2)
    n, s = 4096, 0.35
    z_T = sde.prior(jax.random.key(0), (n, 2, 2, 2))
    z0, _ = jit_fast(lambda z: SAMPLERS[sampler](gaussian_eps_fn(sde, mu, s), z, sde=sde, num_steps=steps, stride=stride,
                                                key=jax.random.key(1)))(z_T)
    x = np.asarray(sde.to_data(z0))
    assert np.max(np.abs(x.mean(0) - np.asarray(mu))) < 5 * s / np.sqrt(n)
    assert abs(np.mean(x.std(0)) / s - 1) < std_tol


def test_classifier_guidance_is_the_conditional_score():
    """Exact two-component Gaussian mixture under the PSLD kernel: guided ε (scale 1) with the exact
    log p(y | z, t) equals the class-conditional ε; the classifier must see forward time t."""
    with jax.enable_x64(True):
        sde = PhaseSpaceSDE()
        mus = [jnp.full((2, 2, 1), -0.6), jnp.full((2, 2, 1), 0.6)]
        s = 0.3
        scores = [gaussian_score(sde, m, s) for m in mus]

        def log_comp(z, t, m):
            a = sde.mean_matrix(t); c = sde.cov_hsm(t)
            ax, am = _bc(a.c11, z), _bc(a.c21, z)
            pxx, pxm, pmm = (_bc(v, z) for v in c)
            pxx, pxm, pmm = s**2 * ax**2 + pxx, s**2 * ax * am + pxm, s**2 * am**2 + pmm
            det = pxx * pmm - pxm**2
            dx, dm = z[..., :1] - ax * m, z[..., 1:] - am * m
            q = (pmm * dx**2 - 2 * pxm * dx * dm + pxx * dm**2) / det
            return jnp.sum(-0.5 * q - 0.5 * jnp.log(det), axis=(1, 2, 3))

        def log_prob(z, t, y):
            lp = jnp.stack([log_comp(z, t, m) for m in mus], -1)
            return jnp.take_along_axis(jax.nn.log_softmax(lp, -1), y[:, None], 1)[:, 0]

        def uncond_eps(z, t, labels):
            w = jax.nn.softmax(jnp.stack([log_comp(z, t, m) for m in mus], -1), -1)
            sc = sum(_bc(w[:, k], z) * scores[k](z, t) for k in range(2))
            return sde.eps_from_score(sc, t)

        guided = S.psld_classifier_guided(uncond_eps, log_prob, 1.0, sde=sde)
        z = jax.random.normal(jax.random.key(3), (4, 2, 2, 2))
        t = jnp.asarray([0.01, 0.2, 0.5, 0.9])
        y = jnp.asarray([0, 1, 1, 0])
        # One program per function (eagerly, each of the many small float64 ops would compile on its own).
        want = jit_fast(lambda z, t: jnp.stack([sde.eps_from_score(scores[int(k)](z, t), t)[i]
                                               for i, k in enumerate(np.asarray(y))]))(z, t)
        np.testing.assert_allclose(jit_fast(guided)(z, t, y), want, rtol=1e-9, atol=1e-10)
        # A classifier fed reverse time τ = 1 − t (the reference's bug) gives a different answer.
        wrong = S.psld_classifier_guided(uncond_eps, lambda zz, tt, yy: log_prob(zz, 1.0 - tt, yy), 1.0, sde=sde)
        assert np.max(np.abs(np.asarray(jit_fast(wrong)(z, t, y) - want))) > 1e-3
        # And the guided ε drives the EM sampler (jit, lax.scan) end to end.
        z0, _ = jit_fast(lambda zz: S.em_sampler(guided, zz, y, sde=sde, num_steps=20, key=jax.random.key(5)))(
            sde.prior(jax.random.key(4), (4, 2, 2, 1), jnp.float64))
        assert np.all(np.isfinite(np.asarray(z0)))
