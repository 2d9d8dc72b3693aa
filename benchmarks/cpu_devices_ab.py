"""One CPU device against the host split into N (edm_jax/cpu_devices.py), alternated call by call in one process;
or, with --compiler_options, XLA's default compile against those options, both on the N devices.

    python benchmarks/cpu_devices_ab.py [--devices 2] [--rounds 30] [--only train,forward,sample_nfe35]
    python benchmarks/cpu_devices_ab.py --only train --rounds 24 \
        --compiler_options '{"xla_cpu_enable_concurrency_optimized_scheduler": true}'

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
ap.add_argument("--compiler_options", default=None, help="JSON dict of XLA compile options: A/B them against "
                "the default on all devices instead of 1 device against N")
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


def build(what, devices, options):
    """(call, batch, compile seconds) of bench_cpu.py's program `what` on a mesh of `devices`, compiled with
    `options`; `call()` runs it once."""
    return bench_cpu.build(what, bench_cpu.setup(mesh=train.make_mesh(devices)), options)


def arms():
    """{name: (devices, compile options)}, the baseline first."""
    if ARGS.compiler_options:
        return {"default": (jax.devices(), None), "options": (jax.devices(), json.loads(ARGS.compiler_options))}
    return {"1_device": (jax.devices()[:1], None), f"{ARGS.devices}_devices": (jax.devices(), None)}


def main():
    chosen = arms()
    names = list(chosen)
    for what in ARGS.only.split(","):
        calls = {name: build(what, *arm) for name, arm in chosen.items()}
        first = {name: jax.block_until_ready(call()) for name, (call, _, _) in calls.items()}  # untimed: allocations
        times = {name: [] for name in names}
        for r in range(ARGS.rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                t0 = time.perf_counter()
                jax.block_until_ready(calls[name][0]())
                times[name].append(time.perf_counter() - t0)
        batch = calls[names[0]][1]
        record = {"what": what, "batch": batch, "rounds": ARGS.rounds, "compiler_options": ARGS.compiler_options}
        for name in names:
            record[f"img_per_s_{name}"] = round(batch / float(np.median(times[name])), 1)
            record[f"compile_s_{name}"] = calls[name][2]
            if what == "train":  # the same first loss says the two compile the same arithmetic
                record[f"first_loss_{name}"] = float(first[name]["loss"])
        record["speedup"] = round(float(np.median(np.array(times[names[0]]) / np.array(times[names[1]]))), 3)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
