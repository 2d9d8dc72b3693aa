"""One CPU device against the host split into N (edm_jax/cpu_devices.py), alternated call by call in one process.

    python benchmarks/cpu_devices_ab.py [--devices 2] [--rounds 30] [--only train,forward,sample_nfe35]

The work is bench_cpu.py's (the quickstart's network: train step at batch 32, forward and NFE-35 Heun sampler at
batch 64, float32). The process makes N CPU devices and builds each program twice, on a mesh of the first
device alone and on all N; then it calls the two in turn, `rounds` times each, so that the machine's drift
(±30 % over minutes on a shared 2-core VM) falls on both alike. Prints one JSON line per program: the median
img/s of each and the median of the per-round time ratios.
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from edm_jax import train  # noqa: E402
from edm_jax.diffusion import sampling  # noqa: E402


def build(what, devices):
    """(call, batch) of `what` on a mesh of `devices`; `call()` runs the compiled program once."""
    module, process, mesh, tx, state, batch, latents, labels = bench_cpu.setup(
        mesh=Mesh(np.array(devices), ("data",)))
    if what == "train":
        step = train.compile_train_step(train.make_train_step(
            apply_fn=module.apply, process=process, tx=tx, global_batch=32, base_lr=1e-3, lr_rampup_img=1.0,
            mesh=mesh), mesh)
        key = jax.random.key(2)
        exe, holder = step.lower(state, batch, key).compile(), [state]

        def call():
            holder[0], metrics = exe(holder[0], batch, key)
            return metrics
        return call, 32
    denoise, variables = process.model(module.apply), state.variables()
    if what == "forward":
        sigma = train.shard_batch({"sigma": jnp.ones((64,), jnp.float32)}, mesh)["sigma"]
        exe = jax.jit(denoise).lower(variables, latents, sigma, labels).compile()
        return (lambda: exe(variables, latents, sigma, labels)), 64
    run = jax.jit(lambda v, z, c: sampling.edm_sampler(lambda x, s, cl: denoise(v, x, s, cl), z, c, num_steps=18))
    exe = run.lower(variables, latents, labels).compile()
    return (lambda: exe(variables, latents, labels)), 64


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
