"""One CPU device against the host split into N (edm_jax/cpu_devices.py), alternated call by call in one process.

    python benchmarks/cpu_devices_ab.py [--devices 2] [--rounds 30] [--only train,forward,sample_nfe35]

The work is bench_cpu.py's (the quickstart's network: train step at batch 32, forward and NFE-35 Heun sampler at
batch 64, float32). The process makes N CPU devices and builds each program twice, on a mesh of the first
device alone and on all N; then it calls the two in turn, `rounds` times each, so that the machine's drift
(±30 % over minutes on a shared 2-core VM) falls on both alike. Prints one JSON line per program: the median
img/s of each and the median of the per-round time ratios. Read them as an upper bound: the one device
idles N-1 others in the same process, which seemed to slow it (benchmarks/README.md, 2026-12-03 13:02);
cpu_side_by_side.py, one process per count, is the measure of the split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--devices", type=int, default=2)
ap.add_argument("--rounds", type=int, default=30)
ap.add_argument("--only", default="train,forward,sample_nfe35")
ARGS = ap.parse_args()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from edm_jax import cpu_devices, host_memory  # noqa: E402

host_memory.keep_freed_memory()  # as main.py and bench_cpu.py, before JAX starts
cpu_devices.split_host(ARGS.devices)
import bench_cpu  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from edm_jax import train  # noqa: E402


def build(what, devices):
    """(call, batch) of bench_cpu.py's program `what` on a mesh of `devices`; `call()` runs it once."""
    call, batch, _ = bench_cpu.build(what, bench_cpu.setup(mesh=train.make_mesh(devices)))
    return call, batch


def main():
    for what in ARGS.only.split(","):
        calls = {1: build(what, jax.devices()[:1]), ARGS.devices: build(what, jax.devices())}
        for call, _ in calls.values():
            jax.block_until_ready(call())  # untimed: first-call allocations
        times = {n: [] for n in calls}
        for r in range(ARGS.rounds):
            for n in (sorted(calls) if r % 2 == 0 else sorted(calls, reverse=True)):
                t0 = time.perf_counter()
                jax.block_until_ready(calls[n][0]())
                times[n].append(time.perf_counter() - t0)
        batch = calls[1][1]
        rate = {n: round(batch / float(np.median(t)), 1) for n, t in times.items()}
        ratio = float(np.median(np.array(times[1]) / np.array(times[ARGS.devices])))
        print(json.dumps({"what": what, "batch": batch, "rounds": ARGS.rounds, "img_per_s_1_device": rate[1],
                          f"img_per_s_{ARGS.devices}_devices": rate[ARGS.devices], "speedup": round(ratio, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
