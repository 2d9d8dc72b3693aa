"""Alternate the PyTorch reference and edm-jax on the same CPU work and print medians and ratios.

    python benchmarks/cpu_side_by_side.py --ref-python /path/to/venv-with-torch/bin/python \
        --edm-src /path/to/NVlabs-edm [--rounds 3] [--threads 2] [--iters 12]

Each round runs `../shared/reference/ref_cpu_bench.py` (the reference, in its own interpreter: it needs
torch) and then `benchmarks/bench_cpu.py` (edm-jax), one process each, so the two never share the cores
and a load change on a shared machine hits both alike. Prints every JSON line as it comes, then a
markdown table: per measurement the median over rounds of each implementation's img/s, the range, and
the ratio edm-jax / reference of the medians (> 1: edm-jax is faster).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WHATS = ("train", "forward", "sample_nfe35")
LABELS = {"train": "train step (EDM loss + backward + Adam), batch 32", "forward": "network forward, batch 64",
          "sample_nfe35": "Heun sampler, NFE 35, batch 64"}


def run_lines(cmd):
    """The JSON records a benchmark command prints (its other output passes through to stderr)."""
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for r in records:
        print(json.dumps(r), flush=True)
    return records


def table(results):
    """Markdown table of medians, ranges and ratios; `results[impl][what]` is a list of img/s."""
    ref, ours = results["pytorch-reference"], results["edm-jax"]
    rows = ["| work | PyTorch reference, img/s (median; range) | edm-jax, img/s (median; range) | ratio |",
            "|---|---|---|---|"]
    for what in WHATS:
        if not ref.get(what) or not ours.get(what):
            continue
        mr, mo = statistics.median(ref[what]), statistics.median(ours[what])
        rows.append(f"| {LABELS[what]} | {mr:.0f} ({min(ref[what]):.0f}–{max(ref[what]):.0f}) | "
                    f"{mo:.0f} ({min(ours[what]):.0f}–{max(ours[what]):.0f}) | {mo / mr:.2f}× |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", required=True, help="a Python interpreter that has torch and numpy")
    ap.add_argument("--edm-src", required=True, help="a checkout of NVlabs/edm")
    ap.add_argument("--ref-script", default=os.path.join(REPO, "..", "shared", "reference", "ref_cpu_bench.py"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=12)
    a = ap.parse_args()
    if not os.path.isfile(a.ref_script):
        raise SystemExit(f"the reference benchmark {a.ref_script} does not exist; pass --ref-script")
    common = ["--threads", str(a.threads), "--iters", str(a.iters)]
    commands = {"pytorch-reference": [a.ref_python, a.ref_script, "--edm-src", a.edm_src, *common],
                "edm-jax": [sys.executable, os.path.join(HERE, "bench_cpu.py"), *common]}
    results = {impl: {w: [] for w in WHATS} for impl in commands}
    started = datetime.datetime.now(datetime.timezone.utc)
    for _ in range(a.rounds):
        for impl, cmd in commands.items():
            for r in run_lines(cmd):
                results[impl][r["what"]].append(r["img_per_s"])
    load = os.getloadavg()
    print(f"\n{a.rounds} rounds, {a.threads} threads, started {started:%Y-%m-%d %H:%M} UTC; "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}\n")
    print(table(results))


if __name__ == "__main__":
    main()
