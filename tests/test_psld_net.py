"""PSLD's NCSN++ as SongUNet: the name/layout map, forward parity with the original network
(../shared/fixtures/psld_net.npz), the released checkpoint format (psld_ckpt_small.ckpt, read without torch),
every full-size preset's names, shapes and parameter counts, refusal of code payloads, and the CLI converter."""

import functools
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, load_fixture, rel_err, xla_flags
from test_torch_pickle import _Reduce

from edm_jax import convert, generate, torch_pickle
from edm_jax.interop import psld_checkpoint as pc
from edm_jax.networks import SongUNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = FIXTURES / "psld_ckpt_small.ckpt"
TOL = 1e-4  # PSLD_README "Tolerances for a port test": float32 against eps or eps_f32, relative L2


@pytest.fixture(scope="module")
def fx():
    return load_fixture("psld_net.npz")


@pytest.fixture(scope="module")
def kwargs(fx):
    return pc.songunet_kwargs_from_score_fn(fx["config"]["score_fn"], fx["config"]["image_size"])


@pytest.fixture(scope="module")
def module(kwargs):
    return SongUNet(**kwargs)


def _prefixed(fx, prefix):
    return {k[len(prefix):]: fx[k] for k in fx if k.startswith(prefix)}


@pytest.fixture(scope="module")
def specs():
    with open(FIXTURES / "psld_full_size_specs.json") as f:
        return json.load(f)


_FORWARD = {}


def _eps(module, variables, fx):
    """ε̂ of every input the fixture holds, NCHW like the fixture (one jit per module)."""
    fn = _FORWARD.setdefault(module, jax.jit(lambda v, z, t: pc.apply_psld_network(module, v, z, t)))
    z = jnp.asarray(fx["z"].transpose(0, 2, 3, 1), jnp.float32)
    return np.asarray(fn(variables, z, jnp.asarray(fx["t"], jnp.float32))).transpose(0, 3, 1, 2)


def _assert_parity(out, fx):
    """Every sample (each t of the fixture) within TOL of both reference outputs."""
    for i, t in enumerate(fx["t"]):
        for ref in ("eps", "eps_f32"):
            err = rel_err(out[i], fx[ref][i])
            print(f"t={t:.0e} vs {ref}: rel L2 {err:.2e}")
            assert err < TOL, (t, ref, err)


# ---------------------------------------------------------------------------------------------------
# The map, against the fixture's own.

def test_constructor_settings_from_the_score_fn_config(fx, kwargs):
    expected = {k: tuple(v) if isinstance(v, list) else v for k, v in fx["config"]["songunet_kwargs"].items()}
    assert kwargs == expected


def test_name_map_is_the_fixtures_entry_for_entry(fx, module):
    assert [list(e) for e in pc.songunet_map(module)] == fx["config"]["songunet_map"]


def test_psld_shapes_are_the_state_dicts(fx, module):
    params = _prefixed(fx, "param/")
    assert pc.psld_shapes(module) == {k: v.shape for k, v in params.items()}


def test_renamed_weights_equal_the_fixtures_songunet_dict_bitwise(fx, module):
    ours, ref = pc.songunet_state_dict(_prefixed(fx, "param/"), module), _prefixed(fx, "songunet/")
    assert set(ours) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_qkv_interleave_not_concatenation(fx, module):
    """Row 3o + s of qkv is column o of NIN_s: check one attention block element by element."""
    params = _prefixed(fx, "param/")
    name, sources, op = next(e for e in pc.songunet_map(module) if e[0].endswith("qkv.weight"))
    qkv = pc.songunet_state_dict(params, module)[name]
    c = params[sources[0]].shape[0]
    for s in range(3):
        np.testing.assert_array_equal(qkv[s::3, :, 0, 0], params[sources[s]].T)
    assert not np.array_equal(qkv[:c, :, 0, 0], params[sources[0]].T)  # the concatenated layout differs


# ---------------------------------------------------------------------------------------------------
# Forward parity and the checkpoint.

@pytest.fixture(scope="module")
def npz_network(fx, kwargs, module):
    sd = pc.songunet_state_dict(_prefixed(fx, "param/"), module)
    return convert.network_from_state_dict({"model_type": "SongUNet", **kwargs}, sd)


def test_forward_parity_with_the_original_network(fx, npz_network):
    net, variables = npz_network
    out = _eps(net, variables, fx)
    _assert_parity(out, fx)
    assert sum(v.size for v in jax.tree.leaves(variables)) == fx["config"]["checks"]["songunet"]["n_params_psld"]


@pytest.fixture(scope="module")
def ckpt_network(kwargs):
    return pc.load_psld_checkpoint(CKPT, kwargs)


def test_checkpoint_loads_the_ema_weights_without_torch(fx, npz_network, ckpt_network):
    ema = pc.read_psld_state_dict(CKPT)
    online = pc.read_psld_state_dict(CKPT, ema=False)
    params = _prefixed(fx, "param/")
    assert list(ema) == list(params)
    for name in params:  # the npz's param/* is bit-identical to ema_score_fn.* of the file
        np.testing.assert_array_equal(ema[name], params[name], err_msg=name)
    # The frozen Fourier W comes from the EMA copy, where it drifted from the online one.
    freqs = np.asarray(ckpt_network[1]["buffers"]["map_noise"]["freqs"])
    np.testing.assert_array_equal(freqs, params["all_modules.0.W"])
    drift = np.max(np.abs(freqs - online["all_modules.0.W"]) / np.abs(online["all_modules.0.W"]))
    assert drift == pytest.approx(fx["config"]["checks"]["checkpoint"]["fourier_W_ema_vs_online_max_rel"], rel=1e-3)
    jax.tree.map(np.testing.assert_array_equal, ckpt_network[1], npz_network[1])
    assert "torch" not in sys.modules


def test_checkpoint_forward_parity_and_the_online_copy(fx, kwargs, ckpt_network):
    _assert_parity(_eps(*ckpt_network, fx), fx)
    online = _eps(*pc.load_psld_checkpoint(CKPT, kwargs, ema=False), fx)
    assert rel_err(online, fx["eps_online"]) < TOL
    assert rel_err(online, fx["eps"]) > 0.1  # the prefix matters: a wrong one is caught by the parity above


def test_noise_label_is_log_of_float32_t(fx):
    t = fx["t"]
    label = np.asarray(pc.psld_noise_label(t, "fourier"))
    assert label.dtype == np.float32
    np.testing.assert_array_equal(label, np.log(t.astype(np.float32)))
    np.testing.assert_allclose(label, fx["log_t"], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pc.psld_noise_label(t, "positional")), t.astype(np.float32))
    with pytest.raises(ValueError, match="'fourier' or 'positional'"):
        pc.psld_noise_label(t, "learned")


# ---------------------------------------------------------------------------------------------------
# Full-size presets (shapes only: jax.eval_shape, nothing runs).

# The notes' table (§2.2): preset -> (psld_network_kwargs arguments, parameters incl. the frozen Fourier W).
COUNTS = {
    "cifar10_sota": ({}, 97_627_910),
    "cifar10_ablation": ({}, 39_397_254),
    "cifar10_ablation, out 3": ({"out_channels": 3}, 39_393_795),
    "celeba64_sota": ({}, 62_769_286),
    "yaml_default": ({}, 61_811_334),
}
# psld_full_size_specs.json's name for each preset.
SPEC_NAMES = {"cifar10_psld_sota_97M": "cifar10_sota", "cifar10_psld_ablation_39M": "cifar10_ablation",
              "cifar10_psld_yaml_default": "yaml_default", "celeba64_psld_sota": "celeba64_sota"}


@functools.lru_cache(maxsize=None)  # the spec test and the preset counts build equal modules: trace each once
def _counts(module):
    shapes = convert.variable_shapes(module)
    total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    return total, total - sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes.get("buffers", {})))


def test_every_full_size_spec_maps_onto_songunet(specs):
    assert set(specs) == set(SPEC_NAMES)
    for name, spec in specs.items():
        kwargs = pc.songunet_kwargs_from_score_fn(spec["score_fn_kwargs"], spec["image_size"])
        assert kwargs == pc.psld_network_kwargs(SPEC_NAMES[name]), name
        module = SongUNet(**kwargs)
        assert pc.psld_shapes(module) == {k: tuple(v) for k, v in spec["state_dict"].items()}, name
        assert _counts(module) == (spec["num_parameters"], spec["num_trainable"]), name


@pytest.mark.parametrize("case", sorted(COUNTS))
def test_preset_parameter_counts(case):
    args, count = COUNTS[case]
    module = SongUNet(**pc.psld_network_kwargs(case.split(",")[0], **args))
    total, trainable = _counts(module)
    assert total == count
    assert total - trainable == (128 if module.embedding_type == "fourier" else 0)  # W: nf frequencies


def test_unsupported_psld_settings_are_refused(fx):
    score_fn, size = fx["config"]["score_fn"], fx["config"]["image_size"]
    for key, value, match in [("resblock_type", "ddpm", "resblock_type='ddpm' has no SongUNet counterpart"),
                              ("progressive", "output_skip", "progressive='output_skip'"),
                              ("progressive_input", "input_skip", "progressive_input='input_skip' is not supported"),
                              ("skip_rescale", False, "skip_rescale=False"),
                              ("centered", True, r"\['centered'\] are unknown")]:
        with pytest.raises(ValueError, match=match):
            pc.songunet_kwargs_from_score_fn(dict(score_fn, **{key: value}), size)
    with pytest.raises(ValueError, match="unknown PSLD preset 'cifar100'"):
        pc.psld_network_kwargs("cifar100")


# ---------------------------------------------------------------------------------------------------
# Errors: one sentence each.

def _zip_pickle(path, obj):
    """A torch.save-style zip archive whose data.pkl is `pickle.dumps(obj)` (no storages)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    return path


def test_not_a_lightning_checkpoint(tmp_path, kwargs):
    with pytest.raises(pc.PSLDCheckpointError, match="snapshot_small.pkl is not a PyTorch Lightning checkpoint"):
        pc.load_psld_checkpoint(FIXTURES / "snapshot_small.pkl", kwargs)  # an EDM pickle
    plain = _zip_pickle(tmp_path / "weights.pt", {"all_modules.0.W": [1.0]})
    with pytest.raises(pc.PSLDCheckpointError, match=r"not a PyTorch Lightning checkpoint .*found \['all_modules"):
        pc.load_psld_checkpoint(plain, kwargs)
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        pc.load_psld_checkpoint(tmp_path / "missing.ckpt", kwargs)


def test_missing_ema_weights(tmp_path, kwargs):
    path = _zip_pickle(tmp_path / "online-only.ckpt", {"pytorch-lightning_version": "1.9.0",
                                                       "state_dict": {"score_fn.all_modules.0.W": [1.0]}})
    with pytest.raises(pc.PSLDCheckpointError, match=r"has no ema_score_fn\.\* weights .*\['score_fn'\]"):
        pc.load_psld_checkpoint(path, kwargs)


def test_shape_mismatch_names_the_first_parameter_and_both_shapes(kwargs):
    with pytest.raises(pc.PSLDCheckpointError, match=r"all_modules\.0\.W of shape \[8\] where the configured network "
                                                     r"has \[16\]; the file has 26 modules, fourier embedding, nf 8"):
        pc.load_psld_checkpoint(CKPT, dict(kwargs, model_channels=16))
    with pytest.raises(pc.PSLDCheckpointError, match=r"all_modules\.25\.weight of shape \[6, 8, 3, 3\] where .* "
                                                     r"\[3, 8, 3, 3\]"):
        pc.load_psld_checkpoint(CKPT, dict(kwargs, out_channels=3))
    with pytest.raises(pc.PSLDCheckpointError, match=r"configs/cifar10_psld\.py"):
        pc.load_psld_checkpoint(CKPT, pc.psld_network_kwargs("cifar10_ablation"))


def test_code_payload_is_refused_and_never_runs(tmp_path, kwargs):
    marker = tmp_path / "pwned"
    payload = {"pytorch-lightning_version": "1.9.0",
               "state_dict": {"ema_score_fn.all_modules.0.W": _Reduce(os.system, (f"touch {marker}",))}}
    path = _zip_pickle(tmp_path / "evil.ckpt", payload)
    with pytest.raises(torch_pickle.UnsafePickleError, match="refusing to load (os|posix).system from evil.ckpt"):
        pc.load_psld_checkpoint(path, kwargs)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# The CLI converter.

def _small_config(tmp_path, fx):
    """The released CIFAR-10 config with the small checkpoint's sizes (psld_net.npz's songunet_kwargs)."""
    small = {k: v for k, v in fx["config"]["songunet_kwargs"].items() if k not in ("label_dim", "augment_dim")}
    io_keys = ("img_resolution", "in_channels", "out_channels")
    config = tmp_path / "psld_small.py"
    config.write_text("from configs.cifar10_psld import get_config as base\n\n\n"
                      "def get_config(arg=None):\n"
                      "    c = base()\n"
                      f"    c.model.update({ {k: v for k, v in small.items() if k not in io_keys}!r})\n"
                      f"    c.network_io.update({ {k: small[k] for k in io_keys}!r})\n"
                      "    return c\n")
    return config


def test_convert_cli_on_the_small_checkpoint(tmp_path, fx):
    config = _small_config(tmp_path, fx)
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--mode=convert", f"--checkpoint={CKPT}",
           f"--config={config}", f"--workdir={workdir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "83,006 parameters" in done.stdout  # + 8 frozen frequencies = PSLD's 83,014
    snap = convert.load_converted(workdir)
    assert snap.precond is None and snap.config["noise_label"] == "log_t"
    assert snap.config["weights"] == "ema_score_fn" and snap.config["process"]["kind"] == "psld"
    _assert_parity(_eps(snap.module, snap.params, fx), fx)
    # The config's process comes with the converted network, so --mode=sample's loader runs it as PSLD.
    model = generate.load_model(workdir=str(workdir))
    assert model.process == snap.process and model.process.name == "psld"
    assert model.image_shape == (snap.config["img_resolution"],) * 2 + (snap.config["in_channels"] // 2,)

    # Without --config, and with the full-size config: one sentence, no traceback.
    for extra, match in [([], "holds no network settings; pass the config"),
                         ([f"--config={os.path.join(REPO, 'configs', 'cifar10_psld.py')}"],
                          r"all_modules\.0\.W of shape \[8\] where the configured network has \[128\]")]:
        args = [a for a in cmd if not a.startswith("--config")] + extra
        args = [a if not a.startswith("--workdir") else f"--workdir={tmp_path / 'other'}" for a in args]
        bad = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        assert re.search(match, bad.stderr), bad.stderr[-2000:]


def test_sample_cli_straight_from_the_small_checkpoint(tmp_path, fx):
    """--mode=sample --checkpoint=X.ckpt: the network and the PSLD process from --config, the flags' sampler."""
    outdir = tmp_path / "samples"
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--mode=sample", f"--checkpoint={CKPT}",
           f"--config={_small_config(tmp_path, fx)}", "--seeds=0-1", "--batch=2", "--sampler=em", "--steps=3",
           "--stride=quadratic", f"--outdir={outdir}", "--nosubdirs"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sampler='em', num_steps=3, stride='quadratic'" in done.stdout, done.stdout[-2000:]
    size = fx["config"]["songunet_kwargs"]["img_resolution"]
    pngs = sorted(outdir.glob("0*.png"))  # the seeds (grid.png: their overview)
    assert [p.name for p in pngs] == ["000000.png", "000001.png"]
    from PIL import Image
    images = [np.asarray(Image.open(p)) for p in pngs]
    assert all(im.shape == (size, size, 3) for im in images) and not np.array_equal(*images)  # seeds differ

    # The library's loader: the same network as load_psld_checkpoint, the config's process.
    from edm_jax.interop.rundir import process_from_config
    from configs.cifar10_psld import get_config

    process = process_from_config(get_config())
    model = generate.load_model(checkpoint=str(CKPT), network_kwargs=fx["config"]["songunet_kwargs"], process=process)
    assert model.process == process and model.image_shape == (size, size, 3) and model.label_dim == 0
    with pytest.raises(ValueError, match="holds no network or process settings"):
        generate.load_model(checkpoint=str(CKPT))

    # Without --config: one sentence, no traceback.
    bad = subprocess.run([a for a in cmd if not a.startswith("--config")], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "holds no network settings; pass the config" in bad.stderr.strip().splitlines()[-1]
