"""PSLD's samplers vs EDM's Heun on the same network at equal NFE: what the phase space costs.

    python benchmarks/bench_psld_sample.py --batch=64 --nfe=35                # CPU: the quickstarts' network
    python benchmarks/bench_psld_sample.py --tiny --batch=8 --nfe=5 --iters=1 # smoke test

Both go through the path the snapshot grids and --mode=sample take: `process.prior`, `process.model`
around the raw SongUNet, `process.sampler(settings)`, one jitted call from per-image keys to uint8 images.
The networks differ only in their in/out channels: C for EDM, 2·C for PSLD (z = (x, m)). Equal NFE n
(odd): EDM Heun with (n + 1)/2 steps; PSLD EM and SSCS with n network calls (n − 1 steps + the denoising
step), ODE Euler with n − 1 steps and ODE Heun with (n − 1)/2 steps (+ the denoising step). Random
weights, so ode_rk45 (adaptive NFE) is not timed. One JSON line per sampler: img/s, s per batch, NFE,
and the slowdown against EDM's Heun.
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
from bench_network import arg_parser, parse_args  # noqa: E402

from edm_jax.diffusion.process import sigma_process  # noqa: E402
from edm_jax.diffusion.psld_process import psld_process  # noqa: E402
from edm_jax.networks import SongUNet  # noqa: E402

# The two quickstarts' SongUNet (configs/quickstart.py: 16x16, 16 channels, ~0.32M parameters); --tiny: 8x8.
NET = dict(img_resolution=16, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,),
           embedding_type="positional", channel_mult_noise=1, resample_filter=(1, 1), dropout=0.0)
TINY = dict(img_resolution=8, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


def cases(nfe):
    """(name, process, sampler-setting overrides) at `nfe` network calls per image."""
    if nfe < 5 or nfe % 2 == 0:
        raise SystemExit(f"--nfe must be odd and ≥ 5 (EDM Heun's 2N − 1), got {nfe}")
    edm, psld = sigma_process("edm"), psld_process("psld")
    return [("edm_heun", edm, dict(num_steps=(nfe + 1) // 2)),
            ("psld_em", psld, dict(sampler="em", num_steps=nfe, stride="quadratic")),
            ("psld_sscs", psld, dict(sampler="sscs", num_steps=nfe, stride="quadratic")),
            ("psld_ode_euler", psld, dict(sampler="ode_euler", num_steps=nfe - 1)),
            ("psld_ode_heun", psld, dict(sampler="ode_heun", num_steps=(nfe - 1) // 2))]


def bench(process, overrides, net, dtype, batch, iters):
    in_ch, out_ch = process.network_channels(3)
    module = SongUNet(**net, in_channels=in_ch, out_channels=out_ch, label_dim=0, augment_dim=0,
                      dtype=jnp.dtype(dtype))
    r = net["img_resolution"]
    # XLA:CPU spends minutes optimising the initialisers' random draws (train.py): not what is timed.
    init = jax.jit(module.init, compiler_options={"xla_backend_optimization_level": 0})
    variables = init(jax.random.key(1), jnp.zeros((1, r, r, in_ch)), jnp.zeros((1,)))
    model = process.model(module.apply)
    run = process.sampler(process.sampler_settings(**overrides))

    @jax.jit
    def sample(first):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(first + jnp.arange(batch))
        z = process.prior(keys, (r, r, 3))
        noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        x = run(lambda z, level, labels: model(variables, z, level, labels), z, None, key=noise_keys)
        return jnp.clip(process.to_data(x) * 127.5 + 128, 0, 255).astype(jnp.uint8)

    jax.block_until_ready(sample(0))  # compile + warm-up
    start = time.perf_counter()
    for i in range(iters):
        out = sample((i + 1) * batch)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / iters
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    return seconds, params


def main():
    parser = arg_parser(__doc__, iters=3)
    parser.set_defaults(batch=64, dtypes="float32")
    parser.add_argument("--nfe", type=int, default=35, help="network calls per image (odd; EDM Heun: 2N − 1)")
    args = parse_args(parser)
    net = {**NET, **(TINY if args.tiny else {})}
    for dtype in args.dtypes.split(","):
        base = None
        for name, process, overrides in cases(args.nfe):
            seconds, params = bench(process, overrides, net, dtype, args.batch, args.iters)
            base = seconds if base is None else base
            print(json.dumps({"what": "sample", "sampler": name, "nfe": args.nfe, "batch": args.batch,
                              "resolution": net["img_resolution"], "params": params, "dtype": dtype,
                              "img_per_s": round(args.batch / seconds, 2), "s_per_batch": round(seconds, 3),
                              "time_vs_edm_heun": round(seconds / base, 3), "device": jax.devices()[0].device_kind,
                              "devices": jax.device_count(), "jax": jax.__version__}), flush=True)


if __name__ == "__main__":
    main()
