"""Error vs NFE of every k-diffusion sampler on the exact Gaussian-mixture denoiser (CPU, ~2 min).

    python benchmarks/sampler_nfe.py --n=2048 --out=benchmarks/sampler_nfe.json --plot=docs/sampler_nfe.png

The mixture is the one of ../shared/fixtures/kdiff_samplers.npz (K = 4, 8×8×3). Two errors per run:
* `rms` (ODE samplers): RMS distance to a 1000-step Heun solution of the probability-flow ODE from the
  same latents: how well the sampler solves the ODE. Stochastic samplers have no such target (blank).
  `rms_median`: the median over images of each image's RMS distance; unlike `rms` it is blind to the few
  latents near a basin boundary that a coarse solve sends to another mixture component.
* `w2`: the 2-Wasserstein distance between the Gaussian with the samples' mean/covariance and the one with
  the mixture's exact mean/covariance: how well the sample *distribution* matches. It has a floor from the
  finite sample (`w2_floor`, the same statistic for exact draws of the mixture).
Grid: Karras ρ = 7 on [0.002, 80] with the step count that meets the NFE budget. dpm_fast and dpm_adaptive
stop at σ_min, so one extra D(x; σ_min) call (counted in their NFE) denoises their output; dpm_adaptive's
budget is set by its tolerance (rtol = atol/0.156 swept), and the measured mean NFE is reported.
Writes a markdown table to stdout, JSON, and a plot (matplotlib, a benchmark-only dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from edm_jax.diffusion import ksamplers, ksigmas  # noqa: E402
from edm_jax.toy import GaussianMixture  # noqa: E402

ODE = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "dpm_fast", "dpm_adaptive"]
SDE = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]
TWO_EVALS = {"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde"}
BUDGETS = [10, 20, 35, 50, 100]
RTOLS = [0.2, 0.1, 0.05, 0.02, 0.01, 0.003, 0.001, 0.0003]


def w2_gaussian(x, mean, cov):
    """W2 between N(mean(x), cov(x)) and N(mean, cov); x [n, d]."""
    m, c = x.mean(0), np.cov(x, rowvar=False)
    root = scipy.linalg.sqrtm(c)
    cross = scipy.linalg.sqrtm(root @ cov @ root).real
    return float(np.sqrt(max(np.sum((m - mean) ** 2) + np.trace(c + cov - 2 * cross), 0.0)))


def run_one(name, budget, mixture, latents, key):
    den = mixture.denoise
    if name == "dpm_adaptive":
        fn = lambda lat: ksamplers.dpm_adaptive(den, lat, sigma_min=0.002, sigma_max=80.0, rtol=budget,
                                                atol=budget * 0.156)
        x, info = jax.jit(fn)(latents)
        return den(x, jnp.full((x.shape[0],), 0.002)), float(jnp.mean(info["nfe"])) + 1
    if name == "dpm_fast":
        x = jax.jit(lambda lat: ksamplers.dpm_fast(den, lat, sigma_min=0.002, sigma_max=80.0, n=budget - 1))(latents)
        return den(x, jnp.full((x.shape[0],), 0.002)), budget
    steps = (budget + 1) // 2 if name in TWO_EVALS else budget
    grid = ksigmas.karras_sigmas(steps, 0.002, 80.0)
    stochastic = name in SDE
    fn = lambda lat: ksamplers.KSAMPLERS[name](den, lat, sigmas=grid, **({"key": key} if stochastic else {}))
    return jax.jit(fn)(latents), ksamplers.nfe(name, grid)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="samples per run")
    parser.add_argument("--out", default="benchmarks/sampler_nfe.json")
    parser.add_argument("--plot", default="docs/sampler_nfe.png")
    args = parser.parse_args()
    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures",
                           "kdiff_samplers.npz")
    with np.load(fixture) as z:
        mixture = GaussianMixture(z["means"], z["stds"], z["weights"])
    shape = mixture.means.shape[1:]
    latents = jax.random.normal(jax.random.key(0), (args.n, *shape))
    reference = jax.jit(lambda lat: ksamplers.heun(mixture.denoise, lat,
                                                   sigmas=ksigmas.karras_sigmas(1000, 0.002, 80.0)))(latents)
    mean, cov = mixture.mean_and_cov()
    floor = w2_gaussian(np.asarray(mixture.sample(jax.random.key(1), args.n), np.float64).reshape(args.n, -1), mean, cov)
    rows = []
    for name in ODE + SDE:
        for budget in (RTOLS if name == "dpm_adaptive" else BUDGETS):
            x, nfe = run_one(name, budget, mixture, latents, jax.random.key(2))
            flat = np.asarray(x, np.float64).reshape(args.n, -1)
            per_image = np.sqrt(np.mean((flat - np.asarray(reference, np.float64).reshape(args.n, -1)) ** 2, axis=1))
            rms, med = (None, None)
            if name in ODE:
                rms, med = float(np.sqrt(np.mean(per_image**2))), float(np.median(per_image))
            rows.append(dict(sampler=name, nfe=nfe, rms=rms, rms_median=med, w2=w2_gaussian(flat, mean, cov),
                             **({"rtol": budget} if name == "dpm_adaptive" else {})))
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = dict(n=args.n, w2_floor=floor, rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"| sampler | NFE | RMS to ODE solution | median per-image RMS | W2 to mixture moments (floor {floor:.3f}) |"
          "\n|---|---|---|---|---|")
    for r in rows:
        rms, med = ("", "") if r["rms"] is None else (f"{r['rms']:.2e}", f"{r['rms_median']:.2e}")
        print(f"| {r['sampler']} | {r['nfe']:.0f} | {rms} | {med} | {r['w2']:.3f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ODE + SDE:
        rs = [r for r in rows if r["sampler"] == name]
        style = "-o" if name in ODE else "--s"
        if name in ODE:
            a.loglog([r["nfe"] for r in rs], [r["rms"] for r in rs], style, label=name, ms=3)
        b.semilogx([r["nfe"] for r in rs], [r["w2"] for r in rs], style, label=name, ms=3)
    b.axhline(floor, color="k", lw=0.8, label="sampling floor")
    a.set(xlabel="NFE", ylabel="RMS to 1000-step Heun", title="ODE samplers: solution error")
    b.set(xlabel="NFE", ylabel="W2 (Gaussian fit) to exact moments", title="all samplers: distribution error")
    a.legend(fontsize=7)
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
