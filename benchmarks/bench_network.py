"""Forward-pass throughput of the paper's networks: img/s, XLA FLOPs per image, TFLOP/s, peak memory.

    python benchmarks/bench_network.py --arch=ddpmpp --batch=512 --dtypes=float32,bfloat16
    python benchmarks/bench_network.py --arch=adm --batch=64
    python benchmarks/bench_network.py --tiny --batch=8 --iters=2     # CPU smoke test of the script

Prints one JSON line per (arch, dtype). Run on the accelerator (see benchmarks/README.md); the
reference figures to compare with are in ../shared/reference/pytorch_reference_h100.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from edm_jax.networks import DhariwalUNet, SongUNet  # noqa: E402

# The paper's networks (reference train.py presets; notes §4.1), conditional as in the benchmarks.
ARCHS = {
    "ddpmpp": (SongUNet, dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9,
                              model_channels=128, channel_mult=(2, 2, 2), embedding_type="positional",
                              encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
                              resample_filter=(1, 1), dropout=0.13)),
    "ncsnpp": (SongUNet, dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9,
                              model_channels=128, channel_mult=(2, 2, 2), embedding_type="fourier",
                              encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
                              resample_filter=(1, 3, 3, 1), dropout=0.13)),
    "adm": (DhariwalUNet, dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, augment_dim=0,
                               model_channels=192, channel_mult=(1, 2, 3, 4), dropout=0.1)),
}
TINY = dict(img_resolution=8, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))
BF16_PEAK_TFLOPS = 800.0  # measured H100 bf16 matmul ceiling (DESIGN.md)


def peak_memory_gb(device):
    stats = device.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def xla_flops(compiled):
    """XLA's FLOP count of a compiled executable (`jit(...).lower(...).compile()`), NaN if it has none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def bench(arch, dtype, batch, iters, tiny):
    cls, kwargs = ARCHS[arch]
    kwargs = {**kwargs, **(TINY if tiny else {})}
    module = cls(**kwargs, dtype=jnp.dtype(dtype))
    r, c = kwargs["img_resolution"], kwargs["in_channels"]
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, r, r, c))
    noise_labels = jax.random.normal(key, (batch,))
    labels = jax.nn.one_hot(jnp.arange(batch) % kwargs["label_dim"], kwargs["label_dim"])
    variables = jax.jit(module.init)(jax.random.key(1), x[:1], noise_labels[:1], labels[:1])

    forward = jax.jit(lambda v, x, n, l: module.apply(v, x, n, l))
    compiled = forward.lower(variables, x, noise_labels, labels).compile()
    flops = xla_flops(compiled)

    compiled(variables, x, noise_labels, labels).block_until_ready()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        out = compiled(variables, x, noise_labels, labels)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / iters
    tflops = flops / seconds / 1e12
    return {
        "what": "forward", "impl": "edm-jax", "arch": arch + ("-tiny" if tiny else ""), "batch": batch,
        "dtype": dtype, "img_per_s": round(batch / seconds, 1), "ms_per_batch": round(seconds * 1e3, 3),
        "gflop_per_img": round(flops / batch / 1e9, 4), "tflop_per_s": round(tflops, 2),
        "mfu_vs_bf16_peak": round(tflops / BF16_PEAK_TFLOPS, 4),
        "peak_mem_gb": peak_memory_gb(jax.devices()[0]), "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }


def arg_parser(doc, iters):
    """The options every benchmark script takes (add its own, then call `parse_args`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ddpmpp", choices=sorted(ARCHS))
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, one JSON line each")
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--tiny", action="store_true", help="a tiny network: checks the script, not the speed")
    parser.add_argument("--precision", default="default", choices=["default", "high", "highest"],
                        help="jax_default_matmul_precision for float32 (default = TF32 on Hopper)")
    return parser


def parse_args(parser):
    """Parsed options, with --precision applied."""
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", args.precision)
    return args


def main():
    args = parse_args(arg_parser(__doc__, iters=20))
    for dtype in args.dtypes.split(","):
        print(json.dumps(bench(args.arch, dtype, args.batch, args.iters, args.tiny)), flush=True)


if __name__ == "__main__":
    main()
