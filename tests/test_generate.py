"""Large-scale sampling: per-seed determinism across batch sizes and device counts, host split, resume,
padding without recompilation, npz output, the grid, seed parsing, settings and class labels.

Everything runs the exact Gaussian-mixture denoiser on 4×4×3 images with 4 Heun steps; the cost of this
file is XLA compilation (a few seconds per distinct batch shape), so sample functions are shared.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from edm_jax import generate as gen
from edm_jax import precond as precond_lib
from edm_jax import schedules
from edm_jax.toy import GaussianMixture

SHAPE = (4, 4, 3)
_rng = np.random.default_rng(0)
MIXTURE = GaussianMixture(_rng.uniform(-0.8, 0.8, (5, *SHAPE)).astype(np.float32),
                          np.array([0.1, 0.2, 0.15, 0.3, 0.05], np.float32), np.ones(5, np.float32))
DET = gen.SamplerSettings(num_steps=4)
STOCH = gen.SamplerSettings(num_steps=4, S_churn=5.0, S_min=0.05, S_max=50.0, S_noise=1.003)
SEEDS = "0-10,1000-1002"  # 14 seeds over two 1000-folders: every batch size below leaves a partial batch

# Class-conditional toy: class c's data is N(μ_c, 0.05² I) with μ_c a flat grey level; its denoiser is
# exact, D(x; σ) = (s² x + σ² μ_c) / (s² + σ²), with μ_c picked by the one-hot label.
CLASS_LEVELS = np.array([-0.6, 0.0, 0.6], np.float32)
CLASS_STD = 0.05


def class_denoiser(x, sigma, class_labels):
    mu = (class_labels @ jnp.asarray(CLASS_LEVELS)).reshape(-1, 1, 1, 1)
    s2, sig2 = CLASS_STD**2, sigma.reshape(-1, 1, 1, 1) ** 2
    return (s2 * x + sig2 * mu) / (s2 + sig2)


@pytest.fixture(scope="module")
def meshes():
    if len(jax.devices()) != 8:
        pytest.skip("needs the 8 simulated CPU devices of conftest.py")
    return gen.make_mesh(jax.devices()[:1]), gen.make_mesh(jax.devices())


DET8_TRACES = []  # batch sizes the shared 8-device sampler was traced with (its denoiser runs at trace time)


def counting_denoiser(x, sigma, class_labels):
    DET8_TRACES.append(x.shape[0])
    return MIXTURE.denoise(x, sigma, class_labels)


@pytest.fixture(scope="module")
def fns(meshes):
    """Sample functions shared by the tests (each compiles once per batch shape it sees)."""
    one, eight = meshes

    def make(settings, mesh, denoise=MIXTURE.denoise, label_dim=0, class_idx=None):
        return gen.make_sample_fn(denoise, image_shape=SHAPE, label_dim=label_dim, settings=settings, mesh=mesh,
                                  class_idx=class_idx)

    return {
        "det1": make(DET, one), "det8": make(DET, eight, counting_denoiser), "stoch1": make(STOCH, one),
        "stoch8": make(STOCH, eight), "cond8": make(DET, eight, class_denoiser, 3),
        "fixed8": make(DET, eight, class_denoiser, 3, class_idx=2),
    }


def run(fn, outdir, batch, seeds=SEEDS, **kw):
    kw.setdefault("progress", False)
    return gen.generate(fn, seeds, batch=batch, outdir=str(outdir), **kw)


def pngs(outdir):
    """{relative path: bytes} of every seed PNG under outdir (grid.png excluded)."""
    out = {}
    for root, _, files in os.walk(outdir):
        for f in files:
            if f.endswith(".png") and f != gen.GRID_FILE:
                path = os.path.join(root, f)
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, outdir)] = fh.read()
    return out


def decode(path):
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def reference_det(fns, tmp_path_factory):
    """Single-host, one-device, batch-1 output of SEEDS: the ground truth the other runs must reproduce."""
    outdir = tmp_path_factory.mktemp("reference_det")
    summary = run(fns["det1"], outdir, batch=1)
    assert summary.written == 14 and summary.skipped == 0
    return outdir, pngs(outdir)


# ---------------------------------------------------------------------------------------------------
# Seeds, keys, settings.

def test_parse_seeds():
    assert gen.parse_seeds("0-9,20,30-31") == list(range(10)) + [20, 30, 31]
    assert gen.parse_seeds(" 5 , 7-8 ") == [5, 7, 8]
    assert gen.parse_seeds(3) == [3] and gen.parse_seeds([4, 2]) == [4, 2]
    assert gen.parse_seeds("4294967295") == [2**32 - 1]
    for bad, message in [("", "empty"), ("5-3", "runs backwards"), ("1,,2", "bad seed item ''"),
                         ("a", "bad seed item 'a'"), ("1-2-3", "bad seed item"), ("-1", "bad seed item"),
                         ("1.5", "bad seed item"), ("1,1", "appears more than once"),
                         ("0-3,2", "seed 2 appears more than once"), ("4294967296", "outside"), ([], "empty"),
                         ([1.5], "integers")]:
        with pytest.raises(ValueError, match=message):
            gen.parse_seeds(bad)


def test_seed_keys_fold_the_seed_into_the_base_key():
    keys = gen.seed_keys([5, 7], base_seed=3)
    assert jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) and keys.shape == (2,)
    expected = jax.random.fold_in(jax.random.key(3), 7)
    np.testing.assert_array_equal(jax.random.key_data(keys[1]), jax.random.key_data(expected))
    assert not np.array_equal(jax.random.key_data(gen.seed_keys([7])[0]), jax.random.key_data(keys[1]))
    streams = {gen.LATENT_STREAM, gen.LABEL_STREAM, gen.NOISE_STREAM}
    assert len(streams) == 3


def test_settings_defaults_and_paper_presets():
    s = gen.SamplerSettings()
    assert (s.sampler, s.num_steps, s.sigma_range(), s.rho, s.S_churn) == ("edm", 18, (0.002, 80.0), 7.0, 0.0)
    assert gen.settings_for(32).num_steps == 18 and gen.settings_for(32, "cifar10").num_steps == 18
    assert gen.settings_for(64).num_steps == 40 and gen.settings_for(64, "ffhq").num_steps == 40
    assert gen.settings_for(64, "afhqv2").num_steps == 40
    imagenet = gen.settings_for(64, "datasets/imagenet-64x64.zip")
    assert (imagenet.num_steps, imagenet.S_churn, imagenet.S_min, imagenet.S_max, imagenet.S_noise) == (
        256, 40.0, 0.05, 50.0, 1.003)
    assert imagenet.stochastic and not s.stochastic
    with pytest.raises(ValueError, match="48×48"):
        gen.settings_for(48)
    with pytest.raises(ValueError, match="lsun"):
        gen.settings_for(64, "lsun")


def test_settings_clamp_to_the_network_and_switch_to_ablation():
    ve = gen.settings_for(32, precond=precond_lib.VEPrecond())
    assert ve.sigma_range() == (0.02, 80.0)  # the reference clamps σ_min = max(0.002, net.sigma_min)
    vp = precond_lib.VPPrecond()
    wide = gen.SamplerSettings(sigma_max=1000.0).clamp_to(vp)
    assert wide.sigma_range() == (0.002, vp.sigma_max)
    assert gen.settings_for(32, precond=precond_lib.EDMPrecond()).sigma_range() == (0.002, 80.0)
    ablation = gen.SamplerSettings().override(solver="euler", num_steps=None, S_churn=None)
    assert ablation.sampler == "ablation" and ablation.solver == "euler" and ablation.num_steps == 18
    vp_disc = gen.SamplerSettings(sampler="ablation", discretization="vp")
    assert vp_disc.sigma_range() == schedules.default_sigma_range("vp")
    lo, hi = schedules.default_sigma_range("vp")
    assert vp_disc.clamp_to(vp).sigma_range() == (max(lo, vp.sigma_min), min(hi, vp.sigma_max))
    with pytest.raises(ValueError, match="needs sampler='ablation'"):
        gen.SamplerSettings(solver="euler")
    with pytest.raises(ValueError, match="unknown discretization 'edm2'"):
        gen.SamplerSettings(sampler="ablation", discretization="edm2")
    with pytest.raises(ValueError, match="no field"):
        gen.SamplerSettings().override(steps=3)
    with pytest.raises(ValueError, match="empty"):
        gen.SamplerSettings(sigma_min=50.0, sigma_max=60.0).clamp_to(precond_lib.VEPrecond(sigma_max=40.0))


def test_uint8_conversion_is_the_reference_one():
    x = jnp.asarray([-1.5, -1.0, -0.004, 0.0, 0.5, 0.9999, 1.0, 2.0])
    expected = np.clip(np.asarray(x) * 127.5 + 128, 0, 255).astype(np.uint8)  # torch's .to(uint8) truncates
    np.testing.assert_array_equal(gen.to_uint8(x), expected)


# ---------------------------------------------------------------------------------------------------
# Determinism.

@pytest.mark.parametrize("name, batch", [("det1", 3), ("det8", 1), ("det8", 3), ("det8", 8)])
def test_image_depends_only_on_its_seed(fns, reference_det, tmp_path, name, batch):
    """Same bytes for every seed whatever the batch (1, 3, 8) and device count (1 or 8); on 8 devices a
    batch of 1 or 3 is rounded up to 8."""
    summary = run(fns[name], tmp_path, batch)
    assert summary.global_batch == (-(-batch // 8) * 8 if name == "det8" else batch)
    assert pngs(tmp_path) == reference_det[1]
    assert set(reference_det[1]) == {f"000000/{s:06d}.png" for s in range(11)} | {
        f"001000/{s:06d}.png" for s in range(1000, 1003)}


def test_stochastic_sampler_is_deterministic_per_seed(fns, reference_det, tmp_path):
    """Churn noise comes from each seed's noise stream: 1 device at batch 3 = 8 devices at batch 8."""
    assert run(fns["stoch1"], tmp_path / "one", batch=3).written == 14
    assert run(fns["stoch8"], tmp_path / "eight", batch=8).written == 14
    assert pngs(tmp_path / "one") == pngs(tmp_path / "eight")
    assert pngs(tmp_path / "one") != reference_det[1]  # the churn noise is really there


def test_keys_and_sample_fn_direct(fns):
    """The sample function itself: uint8 NHWC, sharded over 'data', −1 labels when unconditional."""
    fn = fns["det8"]
    images, labels = fn.sample_seeds(np.arange(8))
    assert images.shape == (8, *SHAPE) and images.dtype == jnp.uint8
    assert images.sharding.spec == jax.sharding.PartitionSpec("data") and len(images.sharding.device_set) == 8
    np.testing.assert_array_equal(labels, -np.ones(8))
    with pytest.raises(ValueError, match="multiple of the mesh's 8"):
        fn(gen.seed_keys(np.arange(3)))


# ---------------------------------------------------------------------------------------------------
# Hosts, resume, padding.

def test_two_hosts_write_disjoint_halves(fns, reference_det, tmp_path):
    """process_count=2 on one sample function: host p writes rows [4p, 4p+4) of every global batch of 8."""
    first = run(fns["det8"], tmp_path, batch=8, process_index=1, process_count=2)
    from_1 = pngs(tmp_path)
    second = run(fns["det8"], tmp_path, batch=8, process_index=0, process_count=2)
    from_0 = {k: v for k, v in pngs(tmp_path).items() if k not in from_1}
    order = gen.parse_seeds(SEEDS)
    expect_0 = {gen.image_path("", s) for i, s in enumerate(order) if i % 8 < 4}
    assert set(from_0) == expect_0 and len(from_1) == len(order) - len(expect_0)
    assert (first.written, second.written) == (len(from_1), len(from_0))
    assert first.skipped == second.skipped == 0
    assert {**from_0, **from_1} == reference_det[1]
    assert second.grid is not None and first.grid is None  # only process 0 writes the grid


def test_resume_skips_existing_and_rewrites_a_deleted_file(fns, reference_det, tmp_path, caplog):
    with caplog.at_level("INFO", logger="edm_jax"):  # progress is logged; main.py owns the console
        first = run(fns["det8"], tmp_path, batch=8, progress=True)
    out = caplog.text
    assert "img/s" in out and "ETA" in out and "14 written" in out
    assert (first.written, first.skipped, first.batches_computed, first.batches_total) == (14, 0, 2, 2)
    files = pngs(tmp_path)
    mtimes = {p: os.stat(tmp_path / p).st_mtime_ns for p in files}
    again = run(fns["det8"], tmp_path, batch=8)
    assert (again.written, again.skipped, again.batches_computed) == (0, 14, 0)
    assert {p: os.stat(tmp_path / p).st_mtime_ns for p in files} == mtimes
    victim = "001000/001001.png"
    os.remove(tmp_path / victim)
    third = run(fns["det8"], tmp_path, batch=8)
    assert (third.written, third.skipped, third.batches_computed) == (1, 13, 1)
    assert pngs(tmp_path) == files == reference_det[1]
    assert {p: os.stat(tmp_path / p).st_mtime_ns for p in files if p != victim} == {
        p: t for p, t in mtimes.items() if p != victim}
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]


def test_padding_writes_no_extra_files_and_compiles_once(fns, tmp_path):
    """The shared 8-device function only ever sees batches of 8 (user batches 1, 3, 5, 8, partial last
    batches padded), so it is traced exactly once in this whole module: 3 denoiser calls (the Heun scan
    body's two and the final Euler step's one)."""
    summary = run(fns["det8"], tmp_path, batch=8, seeds="0-19")  # batches of 8, 8 and 4 + 4 padding rows
    assert summary.batches_computed == 3 and summary.written == 20
    assert summary.rows_computed == 24  # one process holds all 8 devices: every row, the 4 padding ones too
    assert sorted(pngs(tmp_path)) == [f"000000/{s:06d}.png" for s in range(20)]
    summary = run(fns["det8"], tmp_path / "more", batch=5, seeds="100-130")  # batch 5 -> 8, 4 batches
    assert summary.global_batch == 8 and summary.written == 31 and len(pngs(tmp_path / "more")) == 31
    flat = run(fns["det8"], tmp_path / "flat", batch=8, seeds="998-1001", subdirs=False)
    assert flat.written == 4 and sorted(pngs(tmp_path / "flat")) == [f"{s:06d}.png" for s in range(998, 1002)]
    assert DET8_TRACES == [8, 8, 8]


# ---------------------------------------------------------------------------------------------------
# Output formats and labels.

def test_npz_output_matches_the_pngs_and_resumes(fns, reference_det, tmp_path):
    summary = run(fns["det8"], tmp_path, batch=8, fmt="npz")
    assert summary.npz == str(tmp_path / gen.NPZ_FILE) and summary.written == 14
    with np.load(summary.npz) as z:
        images, seeds, labels = z["images"], z["seeds"], z["labels"]
    assert seeds.tolist() == gen.parse_seeds(SEEDS) and images.dtype == np.uint8 and images.shape == (14, *SHAPE)
    np.testing.assert_array_equal(labels, -1)
    for image, seed in zip(images, seeds):
        np.testing.assert_array_equal(image, decode(reference_det[0] / gen.image_path("", int(seed))))
    again = run(fns["det8"], tmp_path, batch=8, fmt="npz")
    assert (again.written, again.batches_computed, again.npz) == (0, 0, summary.npz)
    # Two simulated hosts: host 1 first (no merge: it is not process 0), then host 0 merges everything.
    split = tmp_path / "split"
    h1 = run(fns["det8"], split, batch=8, fmt="npz", process_index=1, process_count=2)
    assert h1.npz is None and not (split / gen.NPZ_FILE).exists()
    h0 = run(fns["det8"], split, batch=8, fmt="npz", process_index=0, process_count=2)
    assert h0.written + h1.written == 14
    with np.load(h0.npz) as z:
        np.testing.assert_array_equal(z["images"], images)
        np.testing.assert_array_equal(z["seeds"], seeds)


def test_grid_png(fns, tmp_path):
    summary = run(fns["det8"], tmp_path, batch=8, seeds="0-69")
    grid = decode(summary.grid)
    assert grid.shape == (512, 512, 3)  # the first 64 images, 8 × 8, 4 px tiles zoomed 16x (as training's grids)
    tiles = [decode(tmp_path / f"000000/{s:06d}.png") for s in range(64)]
    np.testing.assert_array_equal(grid[::16, ::16],
                                  np.concatenate([np.concatenate(tiles[r * 8:r * 8 + 8], 1) for r in range(8)]))
    small = run(fns["det8"], tmp_path / "small", batch=8)  # 14 images: near-square, 4 per row, 4 rows
    assert decode(small.grid).shape == (4 * 64, 4 * 64, 3)
    os.remove(summary.grid)
    resumed = run(fns["det8"], tmp_path, batch=8, seeds="0-69")  # nothing to compute: grid from the files
    assert resumed.batches_computed == 0
    np.testing.assert_array_equal(decode(resumed.grid), grid)


def test_class_labels(fns, tmp_path):
    """Random classes come from each seed's label stream; a fixed class is that class; the one-hot label
    reaches the denoiser (each image sits at its class's grey level)."""
    seeds = np.arange(16)
    images, labels = (np.asarray(a) for a in fns["cond8"].sample_seeds(seeds))
    expected = [int(jax.random.randint(jax.random.fold_in(k, gen.LABEL_STREAM), (), 0, 3, jnp.int32))
                for k in gen.seed_keys(seeds)]  # one seed at a time
    assert labels.tolist() == expected and set(expected) == {0, 1, 2}
    level = (images.astype(np.float64) - 127.5).mean(axis=(1, 2, 3)) / 127.5
    np.testing.assert_array_equal(np.abs(level[:, None] - CLASS_LEVELS).argmin(axis=1), labels)  # ±0.1 at 4 steps
    summary = run(fns["fixed8"], tmp_path, batch=8, fmt="npz", seeds="0-7")
    with np.load(summary.npz) as z:
        np.testing.assert_array_equal(z["labels"], 2)
        level = (z["images"].astype(np.float64) - 127.5).mean(axis=(1, 2, 3)) / 127.5
        np.testing.assert_array_equal(np.abs(level[:, None] - CLASS_LEVELS).argmin(axis=1), 2)


def test_bound_denoiser_params_are_a_jit_argument(meshes, reference_det):
    """A BoundDenoiser's params reach the jitted function as a replicated argument (not constants) and
    give the images of the equivalent closure."""
    params = {"means": MIXTURE.means, "stds": MIXTURE.stds, "weights": MIXTURE.weights}
    bound = gen.BoundDenoiser(lambda p, x, s, c: GaussianMixture(**p).denoise(x, s, c), params)
    fn = gen.make_sample_fn(bound, image_shape=SHAPE, label_dim=0, settings=DET, mesh=meshes[1])
    assert fn.params["means"].sharding.is_fully_replicated
    seeds = gen.parse_seeds(SEEDS)[:8]
    images = np.asarray(fn.sample_seeds(seeds)[0])
    for image, seed in zip(images, seeds):
        np.testing.assert_array_equal(image, decode(reference_det[0] / gen.image_path("", seed)))
    hlo = fn.jitted.lower(gen.seed_keys(seeds), fn.params).as_text()
    assert len(hlo) < 200_000  # no weights baked in


def test_bad_arguments_are_clear(fns, meshes, tmp_path):
    with pytest.raises(ValueError, match="unconditional"):
        gen.make_sample_fn(MIXTURE.denoise, image_shape=SHAPE, label_dim=0, settings=DET, mesh=meshes[0], class_idx=1)
    with pytest.raises(ValueError, match=r"outside \[0, 2\]"):
        gen.make_sample_fn(class_denoiser, image_shape=SHAPE, label_dim=3, settings=DET, mesh=meshes[0], class_idx=3)
    with pytest.raises(ValueError, match="format"):
        run(fns["det8"], tmp_path, batch=8, fmt="jpg")
    with pytest.raises(ValueError, match="process_index 2"):
        run(fns["det8"], tmp_path, batch=8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="checkpoint= .* or workdir="):
        gen.load_model()
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        gen.load_model(checkpoint=str(tmp_path / "missing.pkl"))
    with pytest.raises(FileNotFoundError, match="holds no training checkpoint .* and no converted_config.json"):
        gen.load_model(workdir=str(tmp_path))  # neither a converted run nor a training run


def test_load_model_from_a_reference_snapshot():
    """load_model(checkpoint=.pkl) binds the snapshot's EMA variables to its preconditioned network."""
    from edm_jax import convert

    denoise, image_shape, label_dim, process, config = gen.load_model(checkpoint=str(FIXTURES / "snapshot_small.pkl"))
    assert config["network"]["model_type"] == "SongUNet"
    snap = convert.load_snapshot(FIXTURES / "snapshot_small.pkl")
    assert isinstance(denoise, gen.BoundDenoiser) and process == snap.process
    assert image_shape == (snap.config["img_resolution"],) * 2 + (snap.config["img_channels"],)
    assert label_dim == snap.config["label_dim"] == 10
    jax.tree.map(np.testing.assert_array_equal, denoise.params, snap.params)
    assert gen.settings_for(image_shape[0] if image_shape[0] in (32, 64) else 32, precond=process.precond).sigma_range() == (
        0.002, 80.0)


@pytest.mark.parametrize("changes, words", [(dict(rho=0.0), "rho must be > 0"),
                                            (dict(sigma_min=-1.0), "sigma_min must be a noise level > 0"),
                                            (dict(sigma_max=0.0), "sigma_max must be a noise level > 0")])
def test_bad_sampler_numbers_are_one_sentence(changes, words):
    with pytest.raises(ValueError, match=words):
        gen.SamplerSettings().override(**changes)


def test_a_huge_seed_range_is_refused_before_it_is_built():
    with pytest.raises(ValueError, match="at most 10,000,000"):
        gen.parse_seeds("0-999999999")
    assert len(gen.parse_seeds("0-99999")) == 100000


def test_a_small_run_computes_only_a_device_multiple(fns, tmp_path):
    """16 seeds with --batch=64 on 8 devices compute one batch of 16, not 64."""
    summary = gen.generate(fns["stoch8"], "0-15", batch=64, outdir=str(tmp_path), progress=False, grid=False)
    assert summary.global_batch == 16 and summary.written == 16
