"""Compare the loss curves of two training runs, e.g. float32 vs bfloat16 compute on the same data.

    python main.py --config=configs/cifar10_edm.py --mode=train --workdir=/tmp/fp32 \
        --config.data.path=.carry/cifar10-jpeg-train.zip --config.train.total_kimg=1024 \
        --config.train.tick_kimg=25.6 --config.train.snapshot_ticks=1000
    python main.py ... the same ... --workdir=/tmp/bf16 --config.model.dtype=bfloat16
    python benchmarks/compare_runs.py /tmp/fp32 /tmp/bf16 --plot=loss_fp32_vs_bf16.png

Both runs use the config's seed, so they see the same batches, σ draws, noise and augmentations in the
same order (train.py derives every draw from the step and the example index): the tick losses are paired
and their difference is the effect of the change between the runs, not sampling noise between two
independent runs. Reads each workdir's metrics.jsonl (one record per tick, the tick's mean loss); prints
one JSON line per common tick and a summary line:
  rel_diff_mean / rel_diff_max: |loss_b − loss_a| / loss_a over the ticks after the first tenth of the run
    (the first ticks move fast, so a tiny shift in time shows as a large difference there);
  bias: mean of (loss_b − loss_a) / loss_a over the same ticks (systematically higher or lower);
  final_loss_a/b: mean of the last three ticks; img_per_s_a/b: median over ticks after the second.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def read_metrics(workdir: str) -> dict[int, dict]:
    """metrics.jsonl of a run, keyed by step (a resumed run's later record for a step wins)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist; pass the --workdir of a training run (main.py --mode=train)")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {int(r["step"]): r for r in records}


def compare(a: dict[int, dict], b: dict[int, dict]) -> tuple[list[dict], dict]:
    """Per-tick rows and the summary (see the module docstring) of two runs' metrics, keyed by step."""
    steps = sorted(set(a) & set(b))
    if len(steps) < 2:
        raise SystemExit(f"the runs share {len(steps)} tick(s); they need the same batch size and tick_kimg")
    la = np.array([a[s]["loss"] for s in steps], np.float64)
    lb = np.array([b[s]["loss"] for s in steps], np.float64)
    rel = (lb - la) / la
    rows = [{"step": s, "kimg": a[s]["kimg"], "loss_a": a[s]["loss"], "loss_b": b[s]["loss"],
             "rel_diff": float(r)} for s, r in zip(steps, rel)]
    late = rel[len(steps) // 10:]
    speed = lambda run: float(np.median([run[s]["img_per_sec"] for s in sorted(run)[2:]] or [np.nan]))
    summary = {"ticks": len(steps), "last_step": steps[-1], "kimg": a[steps[-1]]["kimg"],
               "rel_diff_mean": float(np.mean(np.abs(late))), "rel_diff_max": float(np.max(np.abs(late))),
               "bias": float(np.mean(late)), "final_loss_a": float(np.mean(la[-3:])),
               "final_loss_b": float(np.mean(lb[-3:])), "img_per_s_a": speed(a), "img_per_s_b": speed(b)}
    return rows, summary


def plot(rows: list[dict], labels: tuple[str, str], path: str):
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib); the table above needs nothing") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    kimg = [r["kimg"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(3, 1))
    top.plot(kimg, [r["loss_a"] for r in rows], label=labels[0])
    top.plot(kimg, [r["loss_b"] for r in rows], label=labels[1], linestyle="--")
    top.set_yscale("log")
    top.set_ylabel("training loss (tick mean)")
    top.legend()
    bottom.plot(kimg, [100 * r["rel_diff"] for r in rows], color="gray")
    bottom.axhline(0, color="black", linewidth=0.5)
    bottom.set_ylabel(f"{labels[1]} − {labels[0]} (%)")
    bottom.set_xlabel("kimg")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--labels", default=None, help="two names for the plot, e.g. float32,bfloat16 "
                                                       "(default: the workdirs' names)")
    parser.add_argument("--plot", default=None, help="write a PNG of both curves and their difference "
                                                     "(needs matplotlib)")
    args = parser.parse_args()
    rows, summary = compare(read_metrics(args.run_a), read_metrics(args.run_b))
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"summary": summary, "run_a": args.run_a, "run_b": args.run_b}), flush=True)
    if args.plot:
        labels = tuple(args.labels.split(",")) if args.labels else tuple(
            os.path.basename(os.path.normpath(p)) for p in (args.run_a, args.run_b))
        plot(rows, labels, args.plot)


if __name__ == "__main__":
    main()
