"""Runs that lose nothing: workdir lock, graceful signals, progress lines, damaged checkpoints, bad zips,
console filtering. Signals and locks are exercised on real training processes (a tiny quickstart)."""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import time
import zipfile

import jax
import numpy as np
import pytest
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TINY = ["--config=configs/quickstart.py", "--config.data.synthetic.n=256", "--config.data.synthetic.resolution=8",
        "--config.model.model_channels=8", "--config.model.channel_mult=(1,)", "--config.model.channel_mult_emb=1",
        "--config.model.attn_resolutions=()", "--config.train.batch_size=16", "--config.train.total_kimg=64",
        "--config.train.tick_kimg=64", "--config.train.snapshot_ticks=1", "--config.train.progress_sec=1",
        "--config.sample.num_images=0"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS=xla_flags(2))


def _start(workdir, *extra):
    return subprocess.Popen([sys.executable, "main.py", "--mode=train", f"--workdir={workdir}", *TINY, *extra],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, text, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and text in path.read_text():
            return
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"{text!r} never appeared in {path}")


def _last_line(out):
    return [l for l in out.splitlines() if l.strip()][-1]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """A training run, a second one refused by its lock, then SIGTERM to the first."""
    work = tmp_path_factory.mktemp("run")
    proc = _start(work)
    try:
        _wait_for(work / "log.txt", "loss", proc)  # a progress line after the first step
        second = subprocess.run([sys.executable, "main.py", "--mode=train", f"--workdir={work}", *TINY],
                                cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return work, proc.returncode, out, second


def test_second_run_in_a_workdir_is_refused_in_one_sentence(sigterm_run):
    work, _, _, second = sigterm_run
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "is in use by another run (process" in _last_line(second.stderr) and str(work) in second.stderr


def test_sigterm_saves_and_exits_zero(sigterm_run):
    work, rc, out, _ = sigterm_run
    assert rc == 0, out[-3000:]
    last = _last_line(out)
    assert "stopped by SIGTERM at step" in last and "rerun the same command to resume" in last
    step = int(last.split("at step ")[1].split("/")[0])
    assert (work / "checkpoints" / str(step)).is_dir()
    log = (work / "log.txt").read_text()
    assert "SIGTERM received" in log and "stopped by SIGTERM" in log  # interrupts are in log.txt too
    # Progress: the compile phase is announced; lines with step/total, percent, elapsed and ETA between ticks.
    assert "compiling the train step" in log and "first step done (compiled)" in log
    assert any("/4000 (" in l and "%) elapsed " in l and " ETA " in l and "ETA ?" not in l for l in log.splitlines())


def test_second_sigint_stops_at_once(sigterm_run):
    work = sigterm_run[0]
    proc = _start(work)  # resumes; two Ctrl-C during the compilation: the second ends it on the spot
    try:
        _wait_for(work / "log.txt", "resumed from", proc)
        proc.send_signal(signal.SIGINT)
        _wait_for(work / "log.txt", "SIGINT received", proc, timeout=30)
        t0 = time.time()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and time.time() - t0 < 10, out[-3000:]
    assert "second SIGINT: stopping now" in out


def test_refused_rerun_keeps_config_and_names_the_change(sigterm_run, tmp_path):
    work = sigterm_run[0]
    before = (work / "config.json").read_text()
    done = subprocess.run([sys.executable, "main.py", "--mode=train", f"--workdir={work}", *TINY,
                           "--config.model.model_channels=32"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = _last_line(done.stderr)
    assert "they are intact" in last and "model.model_channels 8 -> 32" in last
    assert "damaged" not in last and "delete" not in last
    assert (work / "config.json").read_text() == before  # validated before anything was written
    assert last in (work / "log.txt").read_text()  # the fatal sentence is in log.txt as well


def test_resume_with_another_dataset_or_lr_warns_naming_both_values(sigterm_run, tmp_path):
    import shutil

    work = tmp_path / "copy"
    shutil.copytree(sigterm_run[0], work)
    done = subprocess.run([sys.executable, "main.py", "--mode=train", f"--workdir={work}", *TINY,
                           "--config.train.lr=0.001", "--config.data.synthetic.seed=3",
                           "--config.train.total_kimg=0.016"],  # 1 step: resume, warn, nothing left to do
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    warning = [l for l in (work / "log.txt").read_text().splitlines() if "WARNING resuming step" in l]
    assert len(warning) == 1, (work / "log.txt").read_text()[-3000:]
    assert "data.synthetic.seed 0 -> 3, train.lr 0.002 -> 0.001;" in warning[0]
    assert "train.total_kimg" not in warning[0]  # extending or shortening a run is not a change of recipe


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    from edm_jax.interop.runlock import WorkdirLock

    holder = subprocess.run([sys.executable, "-c", "import os, signal, sys; from edm_jax.interop.runlock import "
                             "WorkdirLock; WorkdirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)",
                             str(tmp_path)], cwd=REPO, env=ENV, timeout=60)
    assert holder.returncode == -signal.SIGKILL and (tmp_path / "run.lock").read_text()
    with caplog.at_level("INFO", logger="edm_jax"), WorkdirLock(str(tmp_path)):
        assert "taking over the lock" in caplog.text
        assert str(os.getpid()) in (tmp_path / "run.lock").read_text()


# --- checkpoints: checksums, damaged newest moved aside and saved again -----------------------------------

def _state():
    return {"params": {"w": jax.numpy.arange(12.0).reshape(3, 4)}, "step": jax.numpy.int32(5)}


def test_checksums_catch_one_bit_flip():
    from edm_jax.checkpoint import _Damaged, checksums, verify_checksums

    state = _state()
    sums = checksums(state)
    verify_checksums(state, sums)
    w = np.asarray(state["params"]["w"]).copy()
    w.reshape(-1).view(np.uint32)[1] ^= 1 << 30  # one bit of the exponent: 1.0 -> inf
    with pytest.raises(_Damaged, match="checksum mismatch in params/w"):
        verify_checksums({**state, "params": {"w": w}}, sums)
    with pytest.raises(_Damaged, match="params/w holds non-finite or absurd"):  # older checkpoints: no sums
        verify_checksums({**state, "params": {"w": w}}, None)


def test_damaged_newest_is_moved_aside_and_saved_again(tmp_path, caplog):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from edm_jax import train
    from edm_jax.checkpoint import Checkpointer

    rep = NamedSharding(train.make_mesh(), P())
    state = jax.device_put(_state(), rep)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ckpt.save(1, state, {"step": 1})
    ckpt.save(2, state, {"step": 2})
    ckpt.close()
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"\0garbage")
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    with caplog.at_level("WARNING", logger="edm_jax"):
        _, meta = ckpt.restore_latest(abstract, move_damaged=True)
    assert meta["step"] == 1 and "checkpoint 2 is damaged" in caplog.text
    assert ckpt.steps() == [1] and len(list((tmp_path / "checkpoints.damaged").iterdir())) == 1
    assert ckpt.save(2, state, {"step": 2})  # the damaged step is written again, not skipped
    ckpt.close()


def test_sampling_falls_back_past_a_damaged_checkpoint(sigterm_run, tmp_path, caplog):
    """--mode=sample's loader skips a damaged newest checkpoint with a warning, as training does."""
    import shutil

    from edm_jax import generate

    work = tmp_path / "copy"
    shutil.copytree(sigterm_run[0], work)
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    newest = work / "checkpoints" / str(steps[-1])
    shutil.copytree(newest, work / "checkpoints" / str(steps[-1] + 1))  # a copy, then damaged
    for path in (work / "checkpoints" / str(steps[-1] + 1) / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(b"\0garbage")
    with caplog.at_level("WARNING", logger="edm_jax"):
        model = generate.load_model(workdir=str(work))
    assert "is damaged; trying the previous one" in caplog.text and model.image_shape == (8, 8, 3)


# --- data and console -------------------------------------------------------------------------------------

def test_zip_member_with_bad_crc_is_one_sentence(tmp_path):
    from PIL import Image

    from edm_jax import data

    path = tmp_path / "ds.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(2):
            png = tmp_path / f"{i}.png"
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(png)
            z.write(png, f"img{i:02d}.png")
    raw = bytearray(path.read_bytes())
    raw[raw.rfind(b"IEND") - 6] ^= 0xFF  # one byte of member img01.png's data (inside its zlib stream)
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"member img01.png is damaged"):
        data.load_image_dataset(str(path))


def test_console_filter_goes_by_logger_not_path():
    import main

    keep = main._OwnInfoOnly().filter
    venv_lib = str(REPO / ".venv" / "lib" / "python3.12" / "site-packages" / "orbax" / "checkpoint.py")
    record = lambda name, path, level=logging.INFO: logging.LogRecord(name, level, path, 1, "m", None, None)
    assert not keep(record("absl", venv_lib))  # a library's INFO, though its file is inside the repository
    assert keep(record("edm_jax", "/anywhere/else.py")) and keep(record("absl", venv_lib, logging.WARNING))
