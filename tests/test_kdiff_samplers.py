"""k-diffusion's sampler menu: parity with k-diffusion 0.1.1 on the exact Gaussian-mixture denoiser, and contracts.

The fixture (../shared/fixtures/kdiff_samplers.npz, KDIFF_README.md) holds k-diffusion's float64 outputs with
every draw explicit. Every case it holds is checked: float64 to 1e-10 (relative to max|out|), float32 to 2e-4
for the fixed-step samplers, σ of every denoiser call, and NFE.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import jit_fast, load_fixture

from edm_jax import sampling
from edm_jax.diffusion import ksamplers, ksigmas
from edm_jax.toy import GaussianMixture

FIXTURE = load_fixture("kdiff_samplers.npz")
MIXTURE = GaussianMixture(FIXTURE["means"], FIXTURE["stds"], FIXTURE["weights"])
LATENTS = FIXTURE["latents"]
CASES = [c for c in __import__("json").loads(FIXTURE["cases"])]
SAMPLER_CASES = [c for c in CASES if FIXTURE[f"{c}/kwargs"]["kind"] == "sampler"]
FLOAT32_CASES = [c for c in SAMPLER_CASES if FIXTURE[f"{c}/kwargs"]["sampler"] != "sample_dpm_adaptive"]
SCHEDULE_CASES = [c for c in CASES if FIXTURE[f"{c}/kwargs"]["kind"] == "schedule"]


def _name(kw):
    return kw["sampler"].removeprefix("sample_")


def _case_fn(case, dtype, calls):
    """One fixture case as a function of (latents, noise), recording σ of every denoiser call into `calls`."""
    kw = FIXTURE[f"{case}/kwargs"]
    name, args = _name(kw), dict(kw["args"])
    if name == "dpm_adaptive":
        args["batch_error"] = True  # k-diffusion's batch-wide error norm
    sigmas = FIXTURE[f"{case}/sigmas"]
    grid = {} if kw["sigmas"] is None else {"sigmas": sigmas}

    def recording(x, sigma, class_labels):
        # The callback thread does not see the enable_x64 context, so ship σ's bits, not σ.
        bits = jax.lax.bitcast_convert_type(sigma[0], jnp.uint32)  # [2] for float64, [] for float32
        jax.debug.callback(lambda b: calls.append(np.asarray(b).view(np.dtype(dtype)).item()), bits, ordered=True)
        return MIXTURE.denoise(x, sigma)

    return lambda lat, nz: ksamplers.KSAMPLERS[name](recording, lat, noise=nz, **grid, **args)


@functools.lru_cache(maxsize=None)
def _run_cases(cases, dtype):
    """Run fixture cases through our samplers under one jit; {case: (out, σ of every call, info or None)}.

    One program holds every case (each its own sampler on the same latents, recording into its own list):
    XLA compiles it in well under half the time of one program per case, and each case's ops are its own.
    """
    calls = {case: [] for case in cases}
    fns = [_case_fn(case, dtype, calls[case]) for case in cases]
    noises = []
    for case in cases:
        noise = FIXTURE[f"{case}/noise"]
        noises.append(np.asarray(noise, dtype) if noise.shape[0] else None)
    fn = jit_fast(lambda lat, nzs: [f(lat, nz) for f, nz in zip(fns, nzs)])
    results = fn(np.asarray(LATENTS, dtype), noises)
    jax.effects_barrier()
    out = {}
    for case, result in zip(cases, results):
        res, info = result if _name(FIXTURE[f"{case}/kwargs"]) == "dpm_adaptive" else (result, None)
        out[case] = np.asarray(res, np.float64), np.asarray(calls[case]), info
    return out


def _run_case(case, dtype):
    """One case's (out, σ of every call, info or None), from the one program of all cases of its test."""
    if dtype == jnp.float64:
        with jax.enable_x64(True):
            return _run_cases(tuple(SAMPLER_CASES), jnp.float64)[case]
    return _run_cases(tuple(FLOAT32_CASES), jnp.float32)[case]


def _rel_max(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", SAMPLER_CASES)
def test_parity_float64(case):
    kw = FIXTURE[f"{case}/kwargs"]
    out, calls, info = _run_case(case, jnp.float64)
    want = FIXTURE[f"{case}/denoiser_sigmas"]
    assert len(calls) == kw["nfe"] == len(want)
    adaptive = _name(kw) == "dpm_adaptive"
    np.testing.assert_allclose(calls, want, rtol=1e-7 if adaptive else 1e-12)
    assert _rel_max(out, FIXTURE[f"{case}/out"]) <= 1e-10
    if adaptive:
        assert {k: int(v) for k, v in info.items()} == kw["info"]
        assert kw["info"]["n_accept"] == kw["noise"]["num_draws"] or not kw["args"]["eta"]
    else:
        grid = FIXTURE[f"{case}/sigmas"] if kw["sigmas"] is not None else None
        assert ksamplers.nfe(_name(kw), grid, **kw["args"]) == kw["nfe"]
        assert ksamplers.num_draws(_name(kw), grid, **kw["args"]) == kw["noise"]["num_draws"]


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_parity_float32(case):
    out, calls, _ = _run_case(case, jnp.float32)
    assert len(calls) == FIXTURE[f"{case}/kwargs"]["nfe"]
    assert _rel_max(out, FIXTURE[f"{case}/out"]) <= 2e-4


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_schedules(case):
    kw = FIXTURE[f"{case}/kwargs"]
    grid = ksigmas.KSIGMAS[kw["fn"].removeprefix("get_sigmas_")](**kw["args"])
    np.testing.assert_allclose(grid, FIXTURE[f"{case}/out"], rtol=1e-13, atol=0)


def test_fixture_grids_are_our_grids():
    """Every grid recipe in the sampler cases regenerates the grid the case ran on."""
    for case in SAMPLER_CASES:
        recipe = FIXTURE[f"{case}/kwargs"]["sigmas"]
        if recipe is None:
            continue
        recipe = dict(recipe)
        grid = ksigmas.KSIGMAS[recipe.pop("fn").removeprefix("get_sigmas_")](**recipe)
        np.testing.assert_allclose(grid, FIXTURE[f"{case}/sigmas"], rtol=1e-13, err_msg=case)


# ------------------------------------------------------------------------------------------- contracts
GRID = ksigmas.karras_sigmas(6, 0.002, 80.0)
LAT8 = jax.random.normal(jax.random.key(3), (8, *LATENTS.shape[1:]))
STOCHASTIC = {"euler": dict(s_churn=10.0), "euler_ancestral": {}, "dpm_2_ancestral": {}, "dpmpp_2s_ancestral": {},
              "dpmpp_sde": {}, "dpmpp_2m_sde": {}, "dpmpp_3m_sde": {}, "dpm_fast": dict(eta=0.5, n=8),
              "dpm_adaptive": dict(eta=0.5, rtol=0.1, atol=0.05)}


KEYS8 = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(8))


@functools.lru_cache(maxsize=None)
def _jitted():
    """All stochastic samplers in one program, {name: output}: one compile per (batch, key kind) for all nine."""
    def run(lat, keys):
        return {name: ksamplers.KSAMPLERS[name](MIXTURE.denoise, lat, sigmas=GRID, key=keys, **hyper)
                for name, hyper in STOCHASTIC.items()}
    return jit_fast(run)


@functools.lru_cache(maxsize=None)
def _batch_runs():
    """Every sampler on the batch of 8 (per-image keys, and one key 7 or 8) and on its two halves of 4."""
    run, lat = _jitted(), np.asarray(LAT8)
    # Two halves of one shape: one compile serves both, and 4 ≠ 8 still changes the batch.
    return dict(whole=run(lat, KEYS8), half1=run(lat[:4], KEYS8[:4]), half2=run(lat[4:], KEYS8[4:]),
                key7=run(lat, jax.random.key(7)), key8=run(lat, jax.random.key(8)))


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_per_image_keys_make_images_independent_of_the_batch(name):
    runs = {k: v[name] for k, v in _batch_runs().items()}
    first = lambda r: np.asarray(r[0] if name == "dpm_adaptive" else r)
    whole = first(runs["whole"])
    parts = np.concatenate([first(runs["half1"]), first(runs["half2"])])
    if name == "dpm_adaptive":  # per-image error control: each image takes its own steps
        nfe = np.asarray(runs["whole"][1]["nfe"])
        np.testing.assert_array_equal(nfe[:4], runs["half1"][1]["nfe"])
        assert len(set(nfe.tolist())) > 1  # and they differ between images
    # Bitwise equality is not promised: XLA may block a batch-4 matmul differently from a batch-8 one.
    np.testing.assert_allclose(whole, parts, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(first(runs["key7"]), whole)  # one key = fold_in(key, i)
    assert float(np.max(np.abs(first(runs["key8"]) - whole))) > 1e-3  # the noise is used


def test_one_scan_whatever_the_grid_length():
    """Each grid sampler is one scan; the denoiser is traced a fixed number of times for any S."""
    for name in ("dpm_2_ancestral", "lms", "dpmpp_sde", "dpmpp_3m_sde"):
        counts = []
        for n in (5, 40):
            traced = []

            def counting(x, sigma, class_labels):
                traced.append(1)
                return MIXTURE.denoise(x, sigma)

            jaxpr = jax.make_jaxpr(lambda lat: ksamplers.KSAMPLERS[name](
                counting, lat, sigmas=ksigmas.karras_sigmas(n, 0.002, 80.0), key=jax.random.key(0)))(LATENTS)
            assert sum(e.primitive.name == "scan" for e in jaxpr.jaxpr.eqns) == 1, name
            counts.append(len(traced))
        assert counts[0] == counts[1], (name, counts)


def test_capped_eta_skips_the_second_evaluation_inside_the_scan():
    """dpm_2_ancestral with η = 1.15 caps σ↑ mid-grid: a lax.cond in the scan keeps NFE exact."""
    grid = ksigmas.karras_sigmas(10, 0.002, 80.0)
    assert ksamplers.nfe("dpm_2_ancestral", grid, eta=1.15) < 2 * 10 - 1 == ksamplers.nfe("dpm_2_ancestral", grid)


def test_vmap_over_an_extra_axis_equals_a_loop():
    run = functools.partial(ksamplers.dpmpp_2m, MIXTURE.denoise, sigmas=GRID)
    stacked = jnp.stack([LAT8[:4], LAT8[4:]])
    vmapped, looped = jit_fast(lambda s, x: (jax.vmap(run)(s), run(x)))(stacked, LAT8[4:])  # one compile
    np.testing.assert_allclose(vmapped[1], looped, rtol=1e-5, atol=1e-5)


def test_heun_on_the_karras_grid_is_edm_sampler():
    with jax.enable_x64(True):
        lat = jnp.asarray(LATENTS, jnp.float64)
        ours, ref = jit_fast(lambda x: (  # one program, one compile
            ksamplers.KSAMPLERS["edm"](MIXTURE.denoise, x, sigmas=ksigmas.karras_sigmas(9, 0.002, 80.0)),
            sampling.edm_sampler(MIXTURE.denoise, x, num_steps=9)))(lat)
        assert float(jnp.max(jnp.abs(ours - ref))) < 1e-12


def test_deterministic_samplers_agree_with_a_fine_solution():
    """At 40 steps the higher-order ODE samplers sit ≥ 5× closer than Euler to a 400-step Heun solution.

    Measured RMS: euler 2.1e-2, heun 3.1e-3, dpm_2 1.8e-3, lms 1.4e-3, dpmpp_2m 3.4e-3.
    """
    grid = ksigmas.karras_sigmas(40, 0.002, 80.0)
    names = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")
    fine, runs = jit_fast(lambda x: (  # the fine solution and the five samplers in one compile
        ksamplers.heun(MIXTURE.denoise, x, sigmas=ksigmas.karras_sigmas(400, 0.002, 80.0)),
        {name: ksamplers.KSAMPLERS[name](MIXTURE.denoise, x, sigmas=grid) for name in names}))(LATENTS)
    rms = {name: float(jnp.sqrt(jnp.mean((runs[name] - fine) ** 2))) for name in names}
    assert rms["euler"] < 0.05, rms
    assert all(rms[name] < rms["euler"] / 5 for name in rms if name != "euler"), rms


def test_errors_are_clear():
    with pytest.raises(ValueError, match="pass `key` or `noise`"):
        ksamplers.euler_ancestral(MIXTURE.denoise, LATENTS, sigmas=GRID)
    with pytest.raises(ValueError, match="strictly decreasing 1-D grid"):
        ksamplers.dpmpp_2m(MIXTURE.denoise, LATENTS, sigmas=GRID[::-1])
    with pytest.raises(ValueError, match=r"noise must have shape \[num_draws, \*latents.shape\]"):
        ksamplers.euler_ancestral(MIXTURE.denoise, LATENTS, sigmas=GRID, noise=jnp.zeros((2, *LATENTS.shape)))
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        ksamplers.nfe("ddim", GRID)
    with pytest.raises(TypeError, match="takes no argument"):
        ksamplers.nfe("lms", GRID, eta=1.0)
    with pytest.raises(TypeError, match="static under jax.jit"):
        jax.jit(lambda g: ksamplers.dpmpp_2m(MIXTURE.denoise, LATENTS, sigmas=g))(GRID)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        ksamplers.dpm_adaptive(MIXTURE.denoise, LATENTS, sigma_min=0.01, sigma_max=10.0, order=4)
