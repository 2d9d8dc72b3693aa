"""Training throughput: the full sharded train step (EDM loss, augmentation, Adam, EMA) on the paper's nets.

    python benchmarks/bench_train.py --arch=ddpmpp --batch=512 --dtypes=float32,bfloat16
    python benchmarks/bench_train.py --arch=ddpmpp --batch=512 --dtypes=float32 --precision=highest   # true fp32
    python benchmarks/bench_train.py --tiny --batch=8 --iters=2                                        # CPU smoke test

One JSON line per dtype: img/s, ms/step, XLA FLOPs per image (forward + backward), TFLOP/s, MFU against
the ~800 TFLOP/s bf16 ceiling, peak memory. Random images in [-1, 1] are fed from the host every step
(shard_batch), so host-to-device transfer is included; the data pipeline itself is measured separately.
Compare with the reference's 353 img/s (fp32), 945 (TF32) and 1588 img/s (fp16) at batch 512 on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_network import ARCHS, BF16_PEAK_TFLOPS, TINY, peak_memory_gb, xla_flops  # noqa: E402

from edm_jax import train  # noqa: E402
from edm_jax.precond import EDMPrecond  # noqa: E402


def bench(arch, dtype, batch, iters, tiny, augment_p):
    cls, kwargs = ARCHS[arch]
    kwargs = {**kwargs, **(TINY if tiny else {})}
    if augment_p == 0:
        kwargs["augment_dim"] = 0
    module = cls(**kwargs, dtype=jnp.dtype(dtype))
    r, c, label_dim = kwargs["img_resolution"], kwargs["in_channels"], kwargs["label_dim"]
    mesh = train.make_mesh()
    tx = train.make_optimizer()
    state = train.create_train_state(jax.random.key(0), module, (r, r, c), label_dim, kwargs["augment_dim"], tx,
                                     mesh=mesh)
    step = train.make_train_step(apply_fn=module.apply, precond=EDMPrecond(), loss_kind="edm", tx=tx,
                                 global_batch=batch, augment_p=augment_p, mesh=mesh,
                                 lr_rampup_img=1.0)  # ramp done: every step updates the weights
    step = train.compile_train_step(step, mesh)
    rng = np.random.default_rng(0)
    local = batch // jax.process_count()

    def host_batch():
        images = rng.uniform(-1, 1, (local, r, r, c)).astype(np.float32)
        labels = np.eye(label_dim, dtype=np.float32)[rng.integers(0, label_dim, local)]
        return train.shard_batch({"images": images, "labels": labels}, mesh)

    key = jax.random.key(1)
    first = host_batch()
    flops = xla_flops(step.lower(state, first, key).compile())
    state, metrics = step(state, first, key)  # compile + warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(iters):
        state, metrics = step(state, host_batch(), key)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / iters
    tflops = flops / seconds / 1e12
    return {"what": "train", "impl": "edm-jax", "arch": arch + ("-tiny" if tiny else ""), "batch": batch,
            "dtype": dtype, "augment_p": augment_p, "img_per_s": round(batch / seconds, 1),
            "ms_per_step": round(seconds * 1e3, 2), "gflop_per_img": round(flops / batch / 1e9, 2),
            "tflop_per_s": round(tflops, 2), "mfu_vs_bf16_peak": round(tflops / BF16_PEAK_TFLOPS, 4),
            "loss": float(metrics["loss"]), "peak_mem_gb": peak_memory_gb(jax.devices()[0]),
            "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ddpmpp", choices=sorted(ARCHS))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--augment_p", type=float, default=0.12, help="CIFAR-10 preset: 0.12; ImageNet: 0")
    parser.add_argument("--tiny", action="store_true", help="a tiny network: checks the script, not the speed")
    parser.add_argument("--precision", default="default", choices=["default", "high", "highest"])
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", args.precision)
    for dtype in args.dtypes.split(","):
        print(json.dumps(bench(args.arch, dtype, args.batch, args.iters, args.tiny, args.augment_p)), flush=True)


if __name__ == "__main__":
    main()
