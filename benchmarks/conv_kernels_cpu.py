"""The quickstart network's convolutions one by one, XLA:CPU against PyTorch, forward and both gradients.

    python benchmarks/conv_kernels_cpu.py [--ref-python /work/venv-ref/bin/python] [--threads 2] [--rounds 3]

Which convolutions: every `conv_general_dilated` in the jaxpr of the quickstart's SongUNet (bench_cpu.py's
network) at the train step's batch 32, grouped by shape. For each shape, three programs: the forward, the
input gradient and the weight gradient (each one `jax.jit` of `lax.conv_general_dilated` or of its
`jax.vjp`, NHWC/HWIO as the network runs them). With `--ref-python` (an interpreter with torch), the same
three in PyTorch (`F.conv2d` and `aten.convolution_backward`, NCHW as the reference runs them), in a
subprocess, alternated with ours `--rounds` times. Each time is the median of `--iters` calls after two
untimed ones; both sides pay one call's dispatch per op (printed as `dispatch_ms`: an empty op of each).

Prints a table per shape (ms, the shape's count in one forward) and the totals weighted by count: what one
forward and one backward of the network spend in convolutions, per implementation. JSON lines with
`--json`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

KINDS = ("fwd", "dx", "dw")


def _median_ms(fn, iters):
    fn(), fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def network_convs(batch):
    """[(x_shape NHWC, w_shape HWIO, padding, count)] of the quickstart SongUNet's forward at `batch`."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    import jax.numpy as jnp
    from jax.extend.core import jaxprs_in_params

    from bench_cpu import CHANNELS, CLASSES, NET, RES
    from edm_jax.networks import SongUNet

    module = SongUNet(**NET)
    x, sigma, labels = jnp.zeros((batch, RES, RES, CHANNELS)), jnp.ones((batch,)), jnp.zeros((batch, CLASSES))
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, sigma, labels))
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                # the network's convolutions are all stride 1, undilated, ungrouped; anything else would need
                # its own PyTorch call below, so refuse rather than time the wrong op
                assert p["window_strides"] == (1, 1) and p["lhs_dilation"] == (1, 1), p
                assert p["rhs_dilation"] == (1, 1) and p["feature_group_count"] == 1, p
                pad = tuple(tuple(int(v) for v in lo_hi) for lo_hi in p["padding"])
                counts[(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape), pad)] += 1
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(lambda v, x: module.apply(v, x, sigma, labels))(variables, x).jaxpr)
    return [(list(xs), list(ws), [list(p) for p in pad], n) for (xs, ws, pad), n in counts.items()]


def time_jax(shapes, iters):
    import jax
    import jax.numpy as jnp
    from jax import lax

    def conv(x, w, pad):
        return lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    noop = jax.jit(lambda x: x)
    out = {"dispatch_ms": _median_ms(lambda: noop(jnp.zeros(())).block_until_ready(), 4 * iters), "convs": []}
    for xs, ws, pad, _ in shapes:
        pad = [tuple(p) for p in pad]
        kx, kw = jax.random.split(jax.random.key(0))
        x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
        g = jnp.ones(jax.eval_shape(lambda: conv(x, w, pad)).shape)
        programs = {
            "fwd": jax.jit(lambda x, w, g: conv(x, w, pad)),
            "dx": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w, pad), x)[1](g)[0]),
            "dw": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w, pad), w)[1](g)[0]),
        }
        out["convs"].append({k: _median_ms(lambda f=f: f(x, w, g).block_until_ready(), iters)
                             for k, f in programs.items()})
    return out


def time_torch(shapes, iters, threads):
    import torch

    torch.set_num_threads(threads)
    out = {"dispatch_ms": _median_ms(lambda: torch.zeros(()).add_(0), 4 * iters), "convs": [],
           "torch": torch.__version__}
    with torch.no_grad():
        for xs, ws, pad, _ in shapes:
            n, h, wd, cin = xs
            kh, kw, _, cout = ws
            x = torch.randn(n, cin, h, wd)
            w = torch.randn(cout, cin, kh, kw)
            padding = [pad[0][0], pad[1][0]]  # symmetric in this network (asserted on our side)
            g = torch.ones_like(torch.nn.functional.conv2d(x, w, padding=padding))

            def backward(mask):
                return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], padding, [1, 1], False, [0, 0],
                                                           1, mask)

            programs = {"fwd": lambda: torch.nn.functional.conv2d(x, w, padding=padding),
                        "dx": lambda: backward([True, False, False]),
                        "dw": lambda: backward([False, True, False])}
            out["convs"].append({k: _median_ms(f, iters) for k, f in programs.items()})
    return out


def _report(shapes, rounds, as_json):
    """Per shape and kind, the median over rounds of each implementation's time; totals weighted by count."""
    impls = sorted(rounds)
    med = {impl: [{k: statistics.median(r["convs"][i][k] for r in rounds[impl]) for k in KINDS}
                  for i in range(len(shapes))] for impl in impls}
    disp = {impl: statistics.median(r["dispatch_ms"] for r in rounds[impl]) for impl in impls}
    if as_json:
        for i, (xs, ws, pad, n) in enumerate(shapes):
            print(json.dumps({"x": xs, "w": ws, "count": n, **{impl: med[impl][i] for impl in impls}}))
        print(json.dumps({"dispatch_ms": disp}))
        return
    head = "".join(f" | {impl} {k}" for impl in impls for k in KINDS)
    print(f"| x (NHWC) | w (HWIO) | count{head} |")
    print("|---|---|---" + "|---" * (3 * len(impls)) + "|")
    for i, (xs, ws, pad, n) in enumerate(shapes):
        cells = "".join(f" | {med[impl][i][k]:.3f}" for impl in impls for k in KINDS)
        print(f"| {'x'.join(map(str, xs))} | {'x'.join(map(str, ws))} | {n}{cells} |")
    for impl in impls:
        tot = {k: sum(n * med[impl][i][k] for i, (*_, n) in enumerate(shapes)) for k in KINDS}
        calls = sum(n for *_, n in shapes)
        print(f"{impl}: one forward's convolutions {tot['fwd']:.1f} ms, one backward's {tot['dx'] + tot['dw']:.1f} ms "
              f"(input grads {tot['dx']:.1f}, weight grads {tot['dw']:.1f}); {calls} convs, dispatch "
              f"{disp[impl] * 1e3:.0f} us per call")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-python", help="a Python with torch: time PyTorch's kernels too, alternated with ours")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (XLA:CPU uses every core)")
    ap.add_argument("--batch", type=int, default=32, help="the train step's batch")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--torch-worker", help=argparse.SUPPRESS)  # the subprocess side: shapes as JSON
    args = ap.parse_args()
    if args.torch_worker:
        print(json.dumps(time_torch(json.loads(args.torch_worker), args.iters, args.threads)))
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    shapes = network_convs(args.batch)
    rounds = collections.defaultdict(list)
    for r in range(args.rounds):
        rounds["xla"].append(time_jax(shapes, args.iters))
        if args.ref_python:
            done = subprocess.run([args.ref_python, os.path.abspath(__file__), "--torch-worker", json.dumps(shapes),
                                   "--threads", str(args.threads), "--iters", str(args.iters)],
                                  check=True, capture_output=True, text=True)
            rounds["torch"].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    _report(shapes, rounds, args.json)


if __name__ == "__main__":
    main()
