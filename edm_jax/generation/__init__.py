"""Sampling at scale: seed lists in, PNG files (or one npz) out, sharded over every device of every host.

This is the reference's `generate.py` (notes §5.3) rebuilt around one jitted, sharded function:

    denoise_fn, image_shape, label_dim, process, config = load_model(checkpoint="edm-cifar10-32x32-cond-vp.pkl")
    settings = process.sampler_settings(resolution=32, dataset="cifar10")  # 18 Heun steps, σ ∈ [0.002, 80]
    sample_fn = make_sample_fn(denoise_fn, image_shape=image_shape, label_dim=label_dim,
                               settings=settings, mesh=make_mesh(), process=process)
    generate(sample_fn, parse_seeds("0-49999"), batch=512, outdir="out")

Randomness (DESIGN.md). Image s depends only on its seed: its key is `fold_in(key(base_seed), s)` and
three independent streams are folded off it with fixed constants — the latents (`LATENT_STREAM`), the
class label (`LABEL_STREAM`) and the churn noise of Algorithm 2 (`NOISE_STREAM`, step i of the sampler
folds in i again). Every draw is made per image under `vmap`, so the random bits are the same whatever
the batch size, device count or host count. The arithmetic is per image as well; whether the backend's
kernels round identically at every batch shape is the backend's business (they do on CPU for the toy
model, see tests/test_generate.py; GPU convolution autotuning may pick different algorithms per shape,
in which case images agree to float rounding, not bit for bit). The bits do not match the reference's
per-seed torch generators, only the structure does.

Batches, hosts and padding. `batch` is the GLOBAL batch (all devices of all hosts). It is rounded up to
a multiple of the mesh's 'data' axis size and of the host count, so one batch shape serves the whole
run; the seed list (in the order given) is cut into consecutive batches of that size and the last one is
padded by repeating its last seed (padding rows are computed and thrown away). Hence exactly one
compilation per run. Host p writes rows [p·B/P, (p+1)·B/P) of every global batch — the rows its own
devices computed when the mesh lists devices in process order (`make_mesh` does) — so the split is a
pure function of (seeds, batch, host count).

Resuming. A seed whose output exists is skipped: a global batch is computed only if some host lacks
one of its rows, and then only the missing files are written. Every file is written to a temporary
name and renamed, so a killed run never leaves a truncated PNG that a rerun would take as done.
With `fmt='npz'`, each host writes one part file per computed batch (`parts/*.npz`: the rows it
owns), the parts are the resume state, and process 0 merges the requested seeds, in order, into
`samples.npz` at the end (multi-host npz needs `outdir` on a filesystem all hosts share; otherwise
call `merge_npz` once the parts are gathered).
"""

from edm_jax.diffusion.sampler_settings import SAMPLERS, SamplerSettings, settings_for  # noqa: F401 (re-exported)
from edm_jax.distributed import make_mesh  # noqa: F401 (the one mesh, devices in process order; re-exported)
from edm_jax.interop.rundir import load_training_checkpoint  # noqa: F401 (re-exported; the run-directory reader)
from edm_jax.generation.seeds import parse_seeds, seed_keys, LATENT_STREAM, LABEL_STREAM, NOISE_STREAM  # noqa: F401
from edm_jax.generation.sample_fn import make_sample_fn, SampleFn, BoundDenoiser, to_uint8  # noqa: F401
from edm_jax.generation.outputs import image_path, merge_npz, save_grid, NPZ_FILE, GRID_FILE, PARTS_DIR  # noqa: F401
from edm_jax.generation.loop import generate, GenerateSummary  # noqa: F401
from edm_jax.generation.models import load_model, LoadedModel, sampler_settings_of  # noqa: F401

__all__ = [

    "parse_seeds", "seed_keys", "LATENT_STREAM", "LABEL_STREAM", "NOISE_STREAM", "SamplerSettings",
    "settings_for", "make_mesh", "make_sample_fn", "SampleFn", "BoundDenoiser", "generate",
    "GenerateSummary", "image_path", "merge_npz", "save_grid", "load_model", "LoadedModel", "load_training_checkpoint",
    "sampler_settings_of",
    "to_uint8", "NPZ_FILE", "GRID_FILE", "PARTS_DIR",
]
