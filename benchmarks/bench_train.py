"""Training throughput: the full sharded train step (EDM loss, augmentation, Adam, EMA) on the paper's nets.

    python benchmarks/bench_train.py --arch=ddpmpp --batch=512 --dtypes=float32,bfloat16 \
        --data=.carry/cifar10-jpeg-train.zip
    python benchmarks/bench_train.py --arch=ddpmpp --batch=512 --dtypes=float32 --precision=highest   # true fp32
    python benchmarks/bench_train.py --tiny --batch=8 --iters=2                                        # CPU smoke test

One JSON line per dtype. Each dtype is timed twice with the same compiled step:
  - `img_per_s`: with the input pipeline on, as `train_and_evaluate` runs it: `data.batches` (the
    step-deterministic batches, built on a background thread and prefetched) → `shard_batch` → step.
    `--data` names a reference-format zip/folder (e.g. the CIFAR-10 zip); without it, random uint8 images
    of the network's shape stand in (same pipeline, same cost per image).
  - `img_per_s_device_batch`: one batch already on the device, fed again every step: the step alone.
The ratio of the two (`pipeline_efficiency`) is how much the input side costs the accelerator;
`input_wait_ms` is the mean time the loop blocked waiting for the prefetch queue.
Also: XLA FLOPs per image (forward + backward), TFLOP/s and MFU against the ~800 TFLOP/s bf16 ceiling per device
(from the pipeline timing), peak device memory. Compare with the reference's 353 img/s (fp32),
945 (TF32) and 1588 img/s (fp16) at batch 512 on one H100 (random data, no input pipeline).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_network import (ARCHS, BF16_PEAK_TFLOPS, TINY, arg_parser, parse_args, peak_memory_gb,  # noqa: E402
                           xla_flops)

from edm_jax import data, train  # noqa: E402
from edm_jax.diffusion.process import sigma_process  # noqa: E402


def _dataset(path, shape, label_dim):
    """The zip/folder at `path` (checked against the network's shape), or random uint8 images standing in."""
    if path:
        ds = data.load_dataset(source="auto", path=path)
        if (ds.resolution, ds.resolution, ds.channels) != shape or (label_dim and ds.label_dim > label_dim):
            raise SystemExit(f"--data {path}: {ds!r} does not fit the network ({shape}, label_dim {label_dim}); "
                             "pick the matching --arch")
        return ds
    rng = np.random.default_rng(0)
    n = 8192
    labels = rng.integers(0, label_dim, n) if label_dim else None
    return data.ImageDataset(rng.integers(0, 256, (n, *shape), dtype=np.uint8), labels, label_dim or None,
                             name="random")


def _timed(step, state, key, iters, next_batch):
    """Mean seconds per step over `iters` steps after one untimed step, and the mean seconds spent in
    `next_batch` (the host side, overlapping the device's work thanks to asynchronous dispatch)."""
    state, metrics = step(state, next_batch(), key)
    jax.block_until_ready(metrics)
    waited = 0.0
    start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        batch = next_batch()
        waited += time.perf_counter() - t0
        state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    return state, metrics, (time.perf_counter() - start) / iters, waited / iters


def bench(arch, dtype, batch, iters, tiny, augment_p, data_path, compiler_options=None):
    """One JSON-ready record (see the module docstring); `compiler_options` go to XLA (tests: fast CPU builds)."""
    cls, kwargs = ARCHS[arch]
    kwargs = {**kwargs, **(TINY if tiny else {})}
    if augment_p == 0:
        kwargs["augment_dim"] = 0
    module = cls(**kwargs, dtype=jnp.dtype(dtype))
    r, c, label_dim = kwargs["img_resolution"], kwargs["in_channels"], kwargs["label_dim"]
    dataset = _dataset(data_path, (r, r, c), label_dim)
    mesh = train.make_mesh()
    tx = train.make_optimizer()
    state = train.create_train_state(jax.random.key(0), module, (r, r, c), label_dim, kwargs["augment_dim"], tx,
                                     mesh=mesh, compiler_options=compiler_options)
    step = train.make_train_step(apply_fn=module.apply, process=sigma_process("edm"), tx=tx,
                                 global_batch=batch, augment_p=augment_p, mesh=mesh,
                                 lr_rampup_img=1.0)  # ramp done: every step updates the weights
    step = train.compile_train_step(step, mesh, compiler_options)
    key = jax.random.key(1)
    with data.batches(dataset, global_batch=batch, seed=0, process_index=jax.process_index(),
                      process_count=jax.process_count()) as stream:
        def pipeline_batch():
            host = next(stream)
            host["labels"] = np.pad(host["labels"], ((0, 0), (0, label_dim - host["labels"].shape[1])))
            return train.shard_batch(host, mesh)

        resident = pipeline_batch()
        step = step.lower(state, resident, key).compile()  # run this executable: jit's call would compile again
        # An SPMD executable's cost analysis counts one device's share; every device runs the same program.
        flops = xla_flops(step) * mesh.size
        state, _, device_s, _ = _timed(step, state, key, iters, lambda: resident)
        state, metrics, seconds, waited = _timed(step, state, key, iters, pipeline_batch)
    tflops = flops / seconds / 1e12
    return {"what": "train", "impl": "edm-jax", "arch": arch + ("-tiny" if tiny else ""), "batch": batch,
            "dtype": dtype, "augment_p": augment_p, "data": data_path or "random uint8",
            "img_per_s": round(batch / seconds, 1), "ms_per_step": round(seconds * 1e3, 2),
            "img_per_s_device_batch": round(batch / device_s, 1),
            "pipeline_efficiency": round(device_s / seconds, 3), "input_wait_ms": round(waited * 1e3, 2),
            "gflop_per_img": round(flops / batch / 1e9, 4), "tflop_per_s": round(tflops, 2),
            "mfu_vs_bf16_peak": round(tflops / (BF16_PEAK_TFLOPS * mesh.size), 4), "loss": float(metrics["loss"]),
            "peak_mem_gb": peak_memory_gb(jax.devices()[0]), "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "jax": jax.__version__}


def main():
    parser = arg_parser(__doc__, iters=20)
    parser.add_argument("--augment_p", type=float, default=0.12, help="CIFAR-10 preset: 0.12; ImageNet: 0")
    parser.add_argument("--data", default=None, help="reference-format zip/folder (default: random uint8 images)")
    args = parse_args(parser)
    for dtype in args.dtypes.split(","):
        record = bench(args.arch, dtype, args.batch, args.iters, args.tiny, args.augment_p, args.data)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
