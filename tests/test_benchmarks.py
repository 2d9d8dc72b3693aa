"""The benchmark scripts run (tiny network, CPU) and report sane numbers; compare_runs' arithmetic.

Speed is never asserted here (benchmarks/README.md holds the accelerator numbers); what is checked is that
a device session will not spend its limited time on a broken script, and that the FLOP counts relate as
they must: a train step (forward + backward) costs three or more forward passes.
"""

import importlib.util
import json
import math
import os

import numpy as np
import PIL.Image
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"xla_backend_optimization_level": 0}  # XLA:CPU builds ~3x faster; the FLOP count is unaffected


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_folder(root, n=20, resolution=8, label_dim=10):
    """A reference-format folder dataset of random images with dataset.json labels 0..label_dim-1."""
    rng = np.random.default_rng(0)
    labels = []
    for i in range(n):
        PIL.Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(root / f"{i}.png")
        labels.append([f"{i}.png", i % label_dim])
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return str(root)


def test_benchmarks_run_on_a_tiny_network(tmp_path):
    # Batch 8: the tests run on 8 simulated devices (conftest), and the benchmarks shard over all of them.
    forward = _script("bench_network").bench("ddpmpp", "float32", 8, 1, True)
    sample = _script("bench_sample").bench("ddpmpp", "float32", 8, 2, 1, True)
    train = _script("bench_train").bench("ddpmpp", "bfloat16", 8, 1, True, 0.12, _tiny_folder(tmp_path), FAST)
    for record in (forward, sample, train):
        assert record["img_per_s"] > 0 and record["arch"] == "ddpmpp-tiny", record
    assert train["data"] == str(tmp_path) and train["img_per_s_device_batch"] > 0 and train["input_wait_ms"] >= 0
    assert math.isfinite(train["loss"])
    # Forward + backward ≈ 3 forwards (measured 3.03 at full size on one device). The tiny net on 8 devices
    # lands higher (~4.4): Adam, EMA and the gradient all-reduce run on every device and weigh more next to
    # a 16-channel net. Below 2.5 would mean the count covers only some devices' share.
    ratio = train["gflop_per_img"] / forward["gflop_per_img"]
    assert 2.5 < ratio < 5.0, (train["gflop_per_img"], forward["gflop_per_img"])


def test_bench_train_refuses_data_of_another_shape(tmp_path):
    with pytest.raises(SystemExit, match="does not fit the network"):
        _script("bench_train").bench("ddpmpp", "float32", 8, 1, True, 0.12, _tiny_folder(tmp_path, resolution=16))


def _write_run(root, losses, steps_per_tick=50, batch=512):
    root.mkdir()
    with open(root / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses):
            step = 1 if i == 0 else i * steps_per_tick
            f.write(json.dumps({"step": step, "kimg": step * batch / 1000, "loss": loss, "img_per_sec": 1000.0 + i})
                    + "\n")
    return str(root)


def test_compare_runs_pairs_ticks_and_measures_the_difference(tmp_path):
    compare_runs = _script("compare_runs")
    losses = list(np.geomspace(1.0, 0.1, 30))
    a = compare_runs.read_metrics(_write_run(tmp_path / "a", losses))
    b = compare_runs.read_metrics(_write_run(tmp_path / "b", [1.02 * x for x in losses]))
    rows, summary = compare_runs.compare(a, b)
    assert len(rows) == summary["ticks"] == 30 and summary["last_step"] == 29 * 50
    assert summary["rel_diff_mean"] == pytest.approx(0.02) and summary["rel_diff_max"] == pytest.approx(0.02)
    assert summary["bias"] == pytest.approx(0.02)
    assert summary["final_loss_b"] == pytest.approx(1.02 * summary["final_loss_a"])
    assert summary["img_per_s_a"] == pytest.approx(1000.0 + np.median(np.arange(2, 30)))
    _, same = compare_runs.compare(a, a)
    assert same["rel_diff_max"] == 0.0 and same["bias"] == 0.0
    # Runs with different ticks share none to compare: a clear error, not an empty table.
    c = compare_runs.read_metrics(_write_run(tmp_path / "c", losses, steps_per_tick=7))
    with pytest.raises(SystemExit, match="share 1 tick"):
        compare_runs.compare(a, c)
