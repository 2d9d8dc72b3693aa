"""Reference checkpoints in JAX: preconditioned denoisers and training snapshots, end to end."""

import os
import pickle
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, jit_fast, load_fixture, nchw_to_nhwc, rel_err

from edm_jax import convert, precond, torch_pickle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_APPLY = {}


def _network_apply(module):
    """F compiled as one program, once per network: vp, ve and edm share one SongUNet (equal modules, equal
    shapes), iddpm has its ADM. Run op by op instead, the network's many ops each compile on their own
    (~10 s of CPU for vp, as much for iddpm, against ~4 s jitted); the preconditioning around it stays eager."""
    return _APPLY.setdefault(module, jit_fast(module.apply))


@pytest.mark.parametrize("kind", ["vp", "ve", "iddpm", "edm"])
def test_preconditioned_denoiser_parity(kind):
    """D(x; σ) = c_skip x + c_out F(c_in x; c_noise) with the converted reference network (rel < 1e-4)."""
    z = load_fixture(f"precond_{kind}.npz")
    cfg = z["config"]
    hyper = {k: cfg[k] for k in cfg if k in {f.name for f in precond.dataclasses.fields(precond.PRECONDS[kind])}}
    p = precond.make_precond(kind, **hyper)
    weights = {k[len("param/"):]: v for k, v in z.items() if k.startswith("param/")}
    module, variables = convert.network_from_state_dict(cfg["model"], weights)
    labels = z.get("class_labels")
    out = p.denoiser(_network_apply(module))(variables, nchw_to_nhwc(z["x"]), z["sigma"], labels)
    assert rel_err(out, nchw_to_nhwc(z["out"])) < 1e-4


def test_snapshot_loads_without_torch_and_matches_reference():
    snap = convert.load_snapshot(FIXTURES / "snapshot_small.pkl")
    z = load_fixture("snapshot_small_io.npz")
    out = snap.denoise(nchw_to_nhwc(z["x"]), z["sigma"], z["class_labels"])
    assert rel_err(out, nchw_to_nhwc(z["out"])) < 1e-5
    cfg = snap.config
    assert cfg["precond"] == {"kind": "edm", "sigma_min": 0, "sigma_max": float("inf"), "sigma_data": 0.5}
    assert cfg["network"]["model_type"] == "SongUNet" and cfg["label_dim"] == 10
    assert cfg["loss"] == {"kind": "edm", "P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}
    assert cfg["augment"]["p"] == 0.12 and cfg["augment"]["xflip"] == 1e8
    assert cfg["dataset"]["use_labels"] is True
    assert "torch" not in sys.modules  # the reader decodes storages itself


def test_snapshot_with_a_command_in_it_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    bad = tmp_path / "network-snapshot-000000.pkl"
    bad.write_bytes(pickle.dumps({"ema": Exploit()}))
    with pytest.raises(torch_pickle.UnsafePickleError, match="refusing to load"):
        convert.load_snapshot(bad)
    assert not marker.exists()


def test_a_pickle_that_is_not_a_snapshot_gets_a_clear_error(tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(convert.SnapshotError, match="has no 'ema' network"):
        convert.load_snapshot(path)


def test_convert_cli_round_trip(tmp_path):
    """`main.py --mode=convert` writes an orbax checkpoint + config that load back to the same denoiser."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--mode=convert",
           f"--checkpoint={FIXTURES / 'snapshot_small.pkl'}", f"--workdir={workdir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "converted" in done.stdout and "SongUNet" in done.stdout
    # Orbax's per-save INFO chatter (and JAX's backend probing) stays out of the console.
    assert not re.findall(r"^I\d{4} .*", done.stderr, re.M), done.stderr[:2000]
    snap = convert.load_converted(workdir)
    z = load_fixture("snapshot_small_io.npz")
    out = snap.denoise(nchw_to_nhwc(z["x"]), z["sigma"], z["class_labels"])
    assert rel_err(out, nchw_to_nhwc(z["out"])) < 1e-5
    # Converting into the same workdir again refuses instead of overwriting.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_convert_cli_errors_are_one_sentence(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "--mode=convert", f"--workdir={tmp_path}",
           f"--checkpoint={tmp_path / 'missing.pkl'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "missing.pkl" in done.stderr
