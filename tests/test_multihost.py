"""Two real JAX processes on 127.0.0.1 (4 simulated CPU devices each) against one process of 8.

Every process is a `main.py` subprocess running the commands docs/multihost.md gives (device count
changed), bounded by a timeout; `_finish` kills a call's processes when anything goes wrong and the
module's finalizer kills whatever is left. One training run (the module fixture `trained`: 4 steps of a
tiny quickstart on a 256-image zip, on 2 processes and on 1) is shared by the tests after it.
"""

import io
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGES, BATCH = 256, 16  # the zip's size and the global batch: 4 steps read 64 images, all of epoch 0
SEEDS = 256  # sampled with --batch=16: 16 batches, the first 4 (the grid's) gathered to process 0


def _tiny(data_zip, steps):
    """The quickstart at toy size on `data_zip`; snapshots (checkpoints) after steps 1, 2, 4, 6, ..."""
    return ["--config=configs/quickstart.py", "--config.data.source=zip", f"--config.data.path={data_zip}",
            "--config.model.model_channels=8", "--config.model.channel_mult=(1,)", "--config.model.channel_mult_emb=1",
            "--config.model.attn_resolutions=()", f"--config.train.batch_size={BATCH}",
            f"--config.train.total_kimg={steps * BATCH / 1000}", f"--config.train.tick_kimg={2 * BATCH / 1000}",
            "--config.train.snapshot_ticks=1", "--config.sample.num_images=0",
            "--config.train.async_checkpointing=False"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """launch(args, processes, devices, env, ids) -> list of Popen; any still running are killed at the end."""
    procs = []
    cache = tmp_path_factory.getbasetemp() / "xla_cache"  # the same program compiles once per module

    def start(args, processes=2, devices=4, env=None, ids=None):
        port = _free_port()
        started = []
        for i in (range(processes) if ids is None else ids):
            e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                     XLA_FLAGS=xla_flags(devices),
                     JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                     EDM_JAX_INIT_TIMEOUT="60", EDM_JAX_PEER_TIMEOUT="8")
            if processes > 1:
                e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                         JAX_PROCESS_ID=str(i))
            e.update(env or {})
            p = subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, env=e, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            procs.append(p)
            started.append(p)
        return started

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _finish(procs, timeout=600):
    """[(returncode, output)] of `procs`, all within `timeout` s in total (generous: a loaded 2-core machine
    is slow); on a timeout all are killed and the test fails with their output."""
    deadline, outs = time.time() + timeout, []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            outs.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [(p.communicate()[0] or "")[-1500:] for p in procs if p.stdout and not p.stdout.closed]
        pytest.fail(f"processes still running after {timeout} s: " + " | ".join(tails))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def _wait_until(condition, procs, what, timeout=240):
    """Poll `condition()` until true; if a process exits first or time runs out, fail with its output."""
    deadline = time.time() + timeout
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        if ended or time.time() > deadline:
            for p in procs:
                p.kill()
            outs = _finish(procs, timeout=60)
            pytest.fail(f"{what} did not happen: " + " | ".join(f"status {rc}: {out[-1500:]}" for rc, out in outs))
        time.sleep(0.02)


def _ok(outs):
    for rc, out in outs:
        assert rc == 0, out[-3000:]
    return [out for _, out in outs]


def _make_zip(path):
    """A reference-format zip (dataset_tool layout, labels in dataset.json) of 256 8x8 synthetic shapes."""
    import PIL.Image

    from edm_jax import data

    ds = data.synthetic_dataset(n=IMAGES, resolution=8, num_classes=4)
    names = [f"00000/img{i:08d}.png" for i in range(IMAGES)]
    with zipfile.ZipFile(path, "w") as z:
        for name, image in zip(names, ds.images):
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format="PNG")
            z.writestr(name, buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[n, int(l)] for n, l in zip(names, ds.labels)]}))
    return path


def _state(workdir, step):
    import orbax.checkpoint as ocp

    import jax

    path = str(workdir / "checkpoints" / str(step) / "state")
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path).item_metadata.tree  # read as host numpy: the saving topology may differ
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    tree = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _worst(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a if a[k].size)


def _steps(workdir):
    """The complete checkpoints' steps (orbax writes into a temporary name and renames when done)."""
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


@pytest.fixture(scope="module")
def trained(launch, tmp_path_factory):
    """4 steps on 2 processes x 4 devices (`two`) and on 1 process x 8 devices (`one`), side by side."""
    root = tmp_path_factory.mktemp("multihost")
    data_zip = _make_zip(root / "shapes.zip")
    two, one = root / "two", root / "one"
    outs = _finish(launch(_tiny(data_zip, 4) + [f"--workdir={two}"]) +
                   launch(_tiny(data_zip, 4) + [f"--workdir={one}"], processes=1, devices=8))
    model = root / "model" / "checkpoints" / "4"  # kept for sampling: continuing `two` rotates it out
    if (two / "checkpoints" / "4").is_dir():
        shutil.copytree(two / "checkpoints" / "4", model)
    return dict(root=root, zip=data_zip, two=two, one=one, outs=outs, model=model)


def test_two_processes_train_like_one(trained):
    _ok(trained["outs"])
    worst = _worst(_state(trained["two"], 4), _state(trained["one"], 4))
    assert worst <= 1e-5, worst  # the 1-vs-8 device test's tolerance (measured 1.9e-6)


def test_each_process_decodes_only_its_share_of_the_images(trained):
    p0, p1, single = _ok(trained["outs"])

    def count(out, p, n):
        return int(re.search(rf"data: process {p} of {n} decoded (\d+) of {IMAGES} images", out)[1])

    # 4 steps x 16 read 64 distinct images (epoch 0's first 64 positions): one process decodes all 64, two
    # processes 32 each. A batch refuses an image its process did not decode, so the 2-process run having
    # trained at all means the two sets cover the 64: with 32 + 32 they are disjoint halves.
    assert count(single, 0, 1) == 4 * BATCH
    assert count(p0, 0, 2) == count(p1, 1, 2) == 2 * BATCH


def test_checkpoints_cross_over_and_a_killed_peer_resumes(trained, launch):
    """The 2-process checkpoint continues in 1 process; the 1-process one continues in 2, which lose
    process 1 to SIGKILL mid-run: process 0 stops with one sentence, and the rerun of both resumes from
    the newest complete checkpoint and ends where the 1-process continuation does."""
    two, one, data_zip = trained["two"], trained["one"], trained["zip"]
    _ok(trained["outs"])
    alone = launch(_tiny(data_zip, 10) + [f"--workdir={two}"], processes=1, devices=8)
    p0, p1 = launch(_tiny(data_zip, 1000) + [f"--workdir={one}"])  # long enough to be killed mid-run
    try:
        _wait_until(lambda: 6 in _steps(one), [p0, p1], "checkpoint 6")  # the first after the one resumed from
        p1.send_signal(signal.SIGKILL)
        t_kill = time.time()
        ((rc, out),) = _finish([p0], timeout=90)
    finally:
        _finish([p1], timeout=10)
    assert rc == 3 and "error: process 0 stops because process 1 of 2 sent no heartbeat" in out, out[-3000:]
    assert time.time() - t_kill < 60
    newest = _steps(one)[-1]
    assert 6 <= newest < 10, newest
    out0, _ = _ok(_finish(launch(_tiny(data_zip, 10) + [f"--workdir={one}"])))
    assert f"resumed from {one}/checkpoints/{newest}: step {newest}" in out0, out0[-3000:]
    _ok(_finish(alone))
    worst = _worst(_state(one, 10), _state(two, 10))
    assert worst <= 1e-5, worst


def test_sigterm_to_one_process_stops_both_at_one_step(trained, launch):
    """A scheduler's SIGTERM reaches one host: both processes stop after the same step (JAX's preemption
    sync point), save that step's checkpoint together and exit 0; the rerun resumes from it."""
    workdir = trained["root"] / "stopped"
    p0, p1 = launch(_tiny(trained["zip"], 1000) + [f"--workdir={workdir}"])
    try:
        _wait_until(lambda: (workdir / "checkpoints").is_dir() and 2 in _steps(workdir), [p0, p1], "checkpoint 2")
        p1.send_signal(signal.SIGTERM)
        (rc0, out0), (rc1, out1) = _finish([p0, p1], timeout=120)
    finally:
        _finish([p0, p1], timeout=10)
    assert rc0 == 0 and rc1 == 0, (out0[-2000:], out1[-2000:])
    m = re.search(r"stopped by (\S+) at step (\d+)/1000", out0)
    assert m, out0[-3000:]
    stopped = int(m.group(2))
    assert 2 <= stopped < 1000 and _steps(workdir)[-1] == stopped  # saved by both, complete, nothing after it
    (p,) = launch(_tiny(trained["zip"], stopped + 2) + [f"--workdir={workdir}"], processes=1, devices=8)
    (out,) = _ok(_finish([p]))
    assert f"resumed from {workdir}/checkpoints/{stopped}: step {stopped}" in out, out[-3000:]


def _files(folder):
    """{relative path: bytes} of every file under `folder`, but the hidden temporaries a SIGKILL can leave."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def _sample_args(trained, outdir, *extra):
    return ["--mode=sample", f"--checkpoint={trained['model']}", f"--seeds=0-{SEEDS - 1}",
            f"--batch={BATCH}", "--steps=6", f"--outdir={outdir}", *extra]


def _sampled(out, p, n):
    """(rows computed, images written, skipped) that process p of n reports."""
    m = re.search(rf"process {p} of {n}: computed (\d+) rows of \d+ batches, wrote (\d+) images, skipped (\d+)", out)
    assert m, out[-3000:]
    return tuple(int(g) for g in m.groups())


def test_sampling_over_two_processes_writes_what_one_writes(trained, launch):
    """PNGs (1 process) vs npz + grid (2 processes, each computing its half), then 2 processes writing
    PNGs lose process 1 to SIGKILL mid-run, and the rerun completes the set: identical files."""
    root = trained["root"]
    one_dir, npz_dir, png_dir = root / "s1", root / "s2npz", root / "s2png"
    single, n0, n1 = _ok(_finish(launch(_sample_args(trained, one_dir), processes=1, devices=8) +
                                 launch(_sample_args(trained, npz_dir, "--format=npz"))))
    reference = _files(one_dir)
    assert len(reference) == SEEDS + 2 and _sampled(single, 0, 1) == (SEEDS, SEEDS, 0)  # PNGs, grid, manifest
    assert _sampled(n0, 0, 2) == _sampled(n1, 1, 2) == (SEEDS // 2, SEEDS // 2, 0)  # each computed its half
    import PIL.Image

    with np.load(npz_dir / "samples.npz") as z:
        assert z["seeds"].tolist() == list(range(SEEDS))
        pngs = np.stack([np.asarray(PIL.Image.open(one_dir / f"000000/{s:06d}.png")) for s in range(SEEDS)])
        np.testing.assert_array_equal(z["images"], pngs)
    assert (npz_dir / "grid.png").read_bytes() == reference["grid.png"]
    assert [p.name for p in npz_dir.iterdir() if p.suffix == ".npz"] == ["samples.npz"]

    p0, p1 = launch(_sample_args(trained, png_dir))
    try:
        _wait_until(lambda: (png_dir / "000000").is_dir() and any((png_dir / "000000").iterdir()), [p0, p1],
                    "a first image")
        p1.send_signal(signal.SIGKILL)
        ((rc, out),) = _finish([p0], timeout=90)
    finally:
        _finish([p1], timeout=10)
    assert rc == 3 and "error: process 0 stops because process 1 of 2 sent no heartbeat" in out, out[-3000:]
    before = sum(name.startswith("000000/") for name in _files(png_dir))  # the seed PNGs written before the kill
    assert 0 < before < SEEDS, f"{before} images before the rerun: the kill came too late to test a resume"
    r0, r1 = _ok(_finish(launch(_sample_args(trained, png_dir))))
    (_, w0, s0), (_, w1, s1) = _sampled(r0, 0, 2), _sampled(r1, 1, 2)
    assert w0 + w1 == SEEDS - before and s0 + s1 == before  # only the missing ones were written
    assert _files(png_dir) == reference


def test_wrong_process_id_is_one_sentence(launch):
    (p,) = launch(_tiny("/nonexistent.zip", 4) + ["--workdir=/nonexistent"], env={"JAX_PROCESS_ID": "2"}, ids=[0])
    rc, out = _finish([p], timeout=60)[0]
    assert rc == 2 and "error: JAX_PROCESS_ID=2 is not in 0..1 for JAX_NUM_PROCESSES=2" in out, out[-2000:]


def test_unreachable_coordinator_is_one_sentence(launch):
    # Process 1 alone: nobody serves the coordinator port; bounded by EDM_JAX_INIT_TIMEOUT.
    t0 = time.time()
    (p,) = launch(_tiny("/nonexistent.zip", 4) + ["--workdir=/nonexistent"], ids=[1], env={"EDM_JAX_INIT_TIMEOUT": "2"})
    rc, out = _finish([p], timeout=90)[0]
    assert rc == 2 and "error: the coordinator JAX_COORDINATOR_ADDRESS=127.0.0.1:" in out, out[-2000:]
    assert time.time() - t0 < 60
