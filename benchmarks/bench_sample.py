"""Sampling throughput: the EDM sampler around the paper's networks, end to end on random weights.

    python benchmarks/bench_sample.py --arch=ddpmpp --batch=512 --steps=18 --dtypes=float32,bfloat16   # NFE 35
    python benchmarks/bench_sample.py --arch=adm --batch=64 --steps=40 --dtypes=bfloat16                 # NFE 79
    python benchmarks/bench_sample.py --tiny --batch=8 --steps=3 --iters=1                             # CPU smoke test

One JSON line per dtype: img/s (latents to uint8 images, one jitted call), NFE, peak memory. Compare with
the reference's 120 img/s (DDPM++, NFE 35, fp16) and 8.4 img/s (ADM-64, NFE 79, fp16).
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
from bench_network import ARCHS, TINY, arg_parser, parse_args, peak_memory_gb  # noqa: E402

from edm_jax import generate  # noqa: E402
from edm_jax.diffusion.process import SigmaProcess  # noqa: E402
from edm_jax.precond import EDMPrecond  # noqa: E402


def bench(arch, dtype, batch, steps, iters, tiny):
    cls, kwargs = ARCHS[arch]
    kwargs = {**kwargs, **(TINY if tiny else {})}
    module = cls(**kwargs, dtype=jnp.dtype(dtype))
    r, c, label_dim = kwargs["img_resolution"], kwargs["in_channels"], kwargs["label_dim"]
    x = jnp.zeros((1, r, r, c))
    variables = jax.jit(module.init)(jax.random.key(1), x, jnp.zeros((1,)), jnp.zeros((1, label_dim)))
    precond = EDMPrecond()
    denoise = generate.BoundDenoiser(precond.denoiser(module.apply), variables)
    settings = generate.SamplerSettings(num_steps=steps)
    sample_fn = generate.make_sample_fn(denoise, image_shape=(r, r, c), label_dim=label_dim, settings=settings,
                                        mesh=generate.make_mesh(), process=SigmaProcess(precond=precond))
    keys = sample_fn.keys_for(list(range(batch)))
    jax.block_until_ready(sample_fn(keys))  # compile + warm-up
    start = time.perf_counter()
    for i in range(iters):
        out = sample_fn(sample_fn.keys_for(list(range((i + 1) * batch, (i + 2) * batch))))
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / iters
    return {"what": "sample", "impl": "edm-jax", "arch": arch + ("-tiny" if tiny else ""), "batch": batch,
            "nfe": 2 * steps - 1, "dtype": dtype, "img_per_s": round(batch / seconds, 2),
            "s_per_batch": round(seconds, 3), "peak_mem_gb": peak_memory_gb(jax.devices()[0]),
            "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__}


def main():
    parser = arg_parser(__doc__, iters=3)
    parser.add_argument("--steps", type=int, default=18, help="Heun steps N (NFE = 2N - 1)")
    args = parse_args(parser)
    for dtype in args.dtypes.split(","):
        print(json.dumps(bench(args.arch, dtype, args.batch, args.steps, args.iters, args.tiny)), flush=True)


if __name__ == "__main__":
    main()
