"""The quickstart's work on the CPU, timed exactly as `../shared/reference/ref_cpu_bench.py` times the
PyTorch reference (NVlabs/edm), so that the two can be compared side by side (`cpu_side_by_side.py`).

    python benchmarks/bench_cpu.py [--threads 2] [--iters 12]

The network is the quickstart's SongUNet: 16x16x3, 4 classes (one-hot), model_channels 16, channel_mult
1,2,2, one block, attention at 8, dropout 0, positional embedding, no augmentation; float32, the EDM
process (preconditioning of Eq. 7, loss of Eq. 8). One JSON line per measurement, each the median over
`iters` calls after one untimed call (the reference's protocol):
  train         the jitted train step at batch 32 (EDM loss + backward + Adam, and our EMA), img/s
  forward       D(x; σ) at batch 64, img/s (2·iters calls)
  sample_nfe35  edm_sampler, 18 Heun steps (NFE 35), batch 64, img/s (max(3, iters/4) calls)
plus `devices`, the JAX CPU devices the host was split into (`--cpu_devices`, default auto as in main.py:
edm_jax/cpu_devices.py; every batch is sharded over them), `compile_s`, the seconds XLA took to compile that
program, and `keep_freed_memory` (edm_jax/host_memory.py,
which main.py applies too; `EDM_JAX_HOST_MALLOC=off` for the comparison without it). `--threads` is passed to
XLA as `intra_op_parallelism_threads` (the reference sets `torch.set_num_threads`), but jax 0.10's XLA:CPU
ignores it: 1, 2 and 3 gave the same train step (195-201 ms, 2026-12-02); XLA uses every core of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="XLA CPU intra-op threads (as torch.set_num_threads)")
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--only", default="train,forward,sample_nfe35", help="comma-separated subset to time")
    ap.add_argument("--cpu_devices", default="auto", help="JAX CPU devices to split the host into, the batches "
                    "sharded over them (edm_jax/cpu_devices.py, as main.py does); 1 for one device")
    return ap.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:  # before JAX reads its flags
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={ARGS.threads}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from edm_jax import cpu_devices, host_memory  # noqa: E402

HOST_MALLOC = host_memory.keep_freed_memory() if ARGS is not None else None  # as main.py does, before JAX starts
if ARGS is not None:  # as main.py does, before JAX starts; `devices` in the output says what it made
    cpu_devices.split_host(cpu_devices.choose(ARGS.cpu_devices, cpu_devices.usable_cores(), 32))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from edm_jax import train  # noqa: E402
from edm_jax.diffusion import sampling  # noqa: E402
from edm_jax.diffusion.process import sigma_process  # noqa: E402
from edm_jax.networks import SongUNet  # noqa: E402

RES, CHANNELS, CLASSES = 16, 3, 4
NET = dict(img_resolution=RES, in_channels=CHANNELS, out_channels=CHANNELS, label_dim=CLASSES, augment_dim=0,
           model_channels=16, channel_mult=(1, 2, 2), channel_mult_emb=4, num_blocks=1, attn_resolutions=(8,),
           dropout=0.0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
           decoder_type="standard", resample_filter=(1, 1))


def median_rate(fn, batch, n):
    """Images per second of the median of `n` timed calls of `fn` (each blocks on its result) after one."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    return round(batch / times[len(times) // 2], 2)


def compiled(fn, *args, options=None):
    """(executable, compile seconds) of `jax.jit`-ed `fn` for `args`; `options`: XLA compile options or None."""
    t0 = time.perf_counter()
    exe = fn.lower(*args).compile(options)
    return exe, round(time.perf_counter() - t0, 2)


def setup(batch_train=32, batch_sample=64, mesh=None):
    """The network, its EDM process, a train state, and the batches both benchmarks use (fixed keys), on `mesh`
    (default: all devices)."""
    module = SongUNet(**NET)
    process = sigma_process("edm")
    mesh = train.make_mesh() if mesh is None else mesh
    tx = train.make_optimizer(1e-3)
    state = train.create_train_state(jax.random.key(0), module, (RES, RES, CHANNELS), CLASSES, 0, tx, mesh=mesh,
                                     compiler_options={"xla_backend_optimization_level": 0})
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    batch = train.shard_batch({
        "images": jax.random.uniform(k1, (batch_train, RES, RES, CHANNELS), minval=-1, maxval=1),
        "labels": jax.nn.one_hot(jax.random.randint(k2, (batch_train,), 0, CLASSES), CLASSES)}, mesh)
    sampled = train.shard_batch({  # sharded over the devices as generate() shards its batches
        "latents": jax.random.normal(k3, (batch_sample, RES, RES, CHANNELS)),
        "labels": jax.nn.one_hot(jax.random.randint(k4, (batch_sample,), 0, CLASSES), CLASSES)}, mesh)
    latents, labels = sampled["latents"], sampled["labels"]
    return module, process, mesh, tx, state, batch, latents, labels


def build(what, parts, options=None):
    """(call, batch, compile seconds) of one program on the mesh of `parts` (what `setup()` returns), compiled
    with XLA compile `options` (None: XLA's defaults); `call()` runs it once. The train step runs on a copy of
    the state (it donates its state), so `parts` stay usable."""
    module, process, mesh, tx, state, batch, latents, labels = parts
    if what == "train":
        step = train.compile_train_step(train.make_train_step(
            apply_fn=module.apply, process=process, tx=tx, global_batch=32, base_lr=1e-3, lr_rampup_img=1.0,
            mesh=mesh), mesh)
        key, holder = jax.random.key(2), [jax.tree.map(jnp.copy, state)]
        exe, compile_s = compiled(step, holder[0], batch, key, options=options)

        def one_step():
            holder[0], metrics = exe(holder[0], batch, key)
            return metrics
        return one_step, 32, compile_s
    denoise, variables = process.model(module.apply), state.variables()
    if what == "forward":
        sigma = train.shard_batch({"sigma": jnp.ones((64,), jnp.float32)}, mesh)["sigma"]
        exe, compile_s = compiled(jax.jit(denoise), variables, latents, sigma, labels, options=options)
        return (lambda: exe(variables, latents, sigma, labels)), 64, compile_s
    if what == "sample_nfe35":
        run = jax.jit(lambda v, z, c: sampling.edm_sampler(lambda x, s, cl: denoise(v, x, s, cl), z, c, num_steps=18))
        exe, compile_s = compiled(run, variables, latents, labels, options=options)
        return (lambda: exe(variables, latents, labels)), 64, compile_s
    raise ValueError(f"unknown program {what!r}; choose from {', '.join(PROGRAMS)}")


PROGRAMS = ("train", "forward", "sample_nfe35")


def main(args):
    parts = setup()
    base = {"impl": "edm-jax", "threads": args.threads, "jax": jax.__version__, "keep_freed_memory": HOST_MALLOC,
            "devices": jax.device_count()}
    calls = {"train": args.iters, "forward": 2 * args.iters, "sample_nfe35": max(3, args.iters // 4)}
    only = args.only.split(",")
    if set(only) - set(PROGRAMS):
        raise SystemExit(f"--only={args.only}: choose from {', '.join(PROGRAMS)}")
    for what in PROGRAMS:
        if what in only:
            call, batch, compile_s = build(what, parts)
            rate = median_rate(call, batch, calls[what])
            print(json.dumps({**base, "what": what, "batch": batch, "img_per_s": rate, "compile_s": compile_s}),
                  flush=True)


if __name__ == "__main__":
    main(ARGS)
