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

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edm_jax.diffusion.process import SigmaProcess
from edm_jax.diffusion.sampler_settings import SAMPLERS, SamplerSettings, settings_for  # noqa: F401 (re-exported)
from edm_jax.distributed import make_mesh  # noqa: F401 (the one mesh, devices in process order; re-exported)
from edm_jax.diffusion.precond import EDMPrecond
from edm_jax.interop.rundir import load_training_checkpoint  # noqa: F401 (re-exported; the run-directory reader)

__all__ = [
    "parse_seeds", "seed_keys", "LATENT_STREAM", "LABEL_STREAM", "NOISE_STREAM", "SamplerSettings",
    "settings_for", "make_mesh", "make_sample_fn", "SampleFn", "BoundDenoiser", "generate",
    "GenerateSummary", "image_path", "merge_npz", "save_grid", "load_model", "LoadedModel", "load_training_checkpoint",
    "sampler_settings_of",
    "to_uint8", "NPZ_FILE", "GRID_FILE", "PARTS_DIR",
]

LATENT_STREAM, LABEL_STREAM, NOISE_STREAM = 0, 1, 2  # fold_in constants of the per-seed sub-keys
MAX_SEED = 2**32 - 1  # seeds are folded into keys as uint32
MAX_SEEDS_PER_RUN = 10_000_000  # a seed list is materialised; beyond this it would exhaust host memory first
NPZ_FILE, GRID_FILE, PARTS_DIR = "samples.npz", "grid.png", "parts"
GRID_IMAGES = 64

# ---------------------------------------------------------------------------------------------------
# Seeds and keys.

_RANGE = re.compile(r"^(\d+)\s*-\s*(\d+)$")


def parse_seeds(spec) -> list[int]:
    """'0-63,100' -> [0, 1, …, 63, 100]: comma-separated integers and inclusive ranges a-b (a ≤ b).

    Also accepts an int or a sequence of ints. Seeds must be distinct integers in [0, 2³² − 1] (one
    output file per seed); anything else is a ValueError that quotes the offending item.
    """
    if isinstance(spec, (int, np.integer)):
        items = [int(spec)]
    elif isinstance(spec, str):
        if not spec.strip():
            raise ValueError("empty seed list; give seeds like '0-63' or '0-9,20,30-31'")
        items = []
        for part in spec.split(","):
            part = part.strip()
            match = _RANGE.match(part)
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if lo > hi:
                    raise ValueError(f"seed range {part!r} runs backwards; write it as '{hi}-{lo}'")
                if hi - lo + 1 + len(items) > MAX_SEEDS_PER_RUN:
                    raise ValueError(f"seed range {part!r} holds {hi - lo + 1:,} seeds; one run takes at most "
                                     f"{MAX_SEEDS_PER_RUN:,}: split it into several runs into the same --outdir")
                items.extend(range(lo, hi + 1))
            elif part.isdigit():
                items.append(int(part))
            else:
                raise ValueError(f"bad seed item {part!r} in {spec!r}; expected non-negative integers and "
                                 "ranges like '0-9,20,30-31'")
    else:
        try:
            items = [int(s) for s in spec]
        except (TypeError, ValueError):
            raise ValueError(f"seeds must be a string like '0-63', an int or a list of ints, got {spec!r}") from None
        if any(int(s) != s for s in spec):
            raise ValueError(f"seeds must be integers, got {list(spec)!r}")
    if not items:
        raise ValueError("empty seed list; give seeds like '0-63' or '0-9,20,30-31'")
    bad = [s for s in items if not 0 <= s <= MAX_SEED]
    if bad:
        raise ValueError(f"seed {bad[0]} is outside [0, {MAX_SEED}] (seeds are folded into keys as uint32)")
    if len(set(items)) != len(items):
        seen, dup = set(), None
        for s in items:
            if s in seen:
                dup = s
                break
            seen.add(s)
        raise ValueError(f"seed {dup} appears more than once; each seed names one output image")
    return items


def seed_keys(seeds, base_seed: int = 0):
    """Per-seed typed keys [len(seeds)]: `fold_in(jax.random.key(base_seed), seed)`.

    Pure and jit-able; `seeds` may be a list, a numpy array or a (sharded) uint32 jax array. The three
    sub-keys of a seed key are `fold_in(k, LATENT_STREAM / LABEL_STREAM / NOISE_STREAM)`.
    """
    seeds = jnp.asarray(np.asarray(seeds, np.uint32) if not isinstance(seeds, jax.Array) else seeds, jnp.uint32)
    base = jax.random.key(base_seed)
    return jax.vmap(lambda s: jax.random.fold_in(base, s))(seeds)


# ---------------------------------------------------------------------------------------------------
# The sharded sample function.

@dataclasses.dataclass(frozen=True, eq=False)
class BoundDenoiser:
    """`D(x, sigma, class_labels)` = `apply(params, x, sigma, class_labels)`.

    Calls like a plain denoiser, but lets `make_sample_fn` pass `params` to the jitted function as a
    (replicated) argument instead of baking them into the program as constants.
    """

    apply: Callable
    params: Any

    def __call__(self, x, sigma, class_labels=None):
        return self.apply(self.params, x, sigma, class_labels)


def to_uint8(x):
    """[-1, 1] floats -> uint8 exactly as the reference: (x·127.5 + 128).clip(0, 255) truncated."""
    return jnp.floor(jnp.clip(x * 127.5 + 128, 0, 255)).astype(jnp.uint8)


class SampleFn:
    """`sample_fn(keys) -> (images uint8 [B, H, W, C], class indices int32 [B], −1 if unconditional)`.

    One `jax.jit` with the batch sharded along the mesh axis 'data' (in and out); compiled once per
    batch size B, which must be a multiple of `data_size`. Build it with `make_sample_fn`.
    """

    def __init__(self, jitted, mesh, params, image_shape, label_dim, settings, class_idx, bound=None):
        self.jitted = jitted
        self.mesh = mesh
        self.params = params
        self.bound = params is not None if bound is None else bound  # the jitted function takes params
        self.image_shape = tuple(image_shape)
        self.label_dim = label_dim
        self.settings = settings
        self.class_idx = class_idx
        self.batch_sharding = NamedSharding(mesh, P("data"))
        self._key_fns = {}

    @property
    def data_size(self) -> int:
        """Number of shards of the batch (size of the mesh's 'data' axis)."""
        return int(self.mesh.shape["data"])

    def __call__(self, keys, params=None):
        """`params`: the denoiser's variables for this call instead of the bound ones (replicated over the
        mesh; the training loop passes each snapshot's EMA variables)."""
        n = keys.shape[0]
        if n % self.data_size:
            raise ValueError(f"batch of {n} keys is not a multiple of the mesh's {self.data_size} data shards; "
                             "pad it (generate() does)")
        if not self.bound:
            return self.jitted(keys)
        params = self.params if params is None else params
        if params is None:
            raise ValueError("this sample function was built over a BoundDenoiser without params; pass params=")
        return self.jitted(keys, params)

    def keys_for(self, seeds, base_seed: int = 0):
        """Global per-seed keys [len(seeds)], sharded along 'data'. Every host passes the same seeds and
        builds only its own shards (works on one host and on many)."""
        seeds = np.asarray(seeds, np.uint32)
        arr = jax.make_array_from_callback(seeds.shape, self.batch_sharding, lambda idx: seeds[idx])
        fn = self._key_fns.get(base_seed)
        if fn is None:
            fn = jax.jit(lambda s: seed_keys(s, base_seed), in_shardings=self.batch_sharding,
                         out_shardings=self.batch_sharding)
            self._key_fns[base_seed] = fn
        return fn(arr)

    def sample_seeds(self, seeds, base_seed: int = 0, params=None):
        """`self(self.keys_for(seeds, base_seed), params)`."""
        return self(self.keys_for(seeds, base_seed), params)


def _replicate(tree, mesh):
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def make_sample_fn(denoise_fn, *, image_shape, label_dim, settings: SamplerSettings, mesh: Mesh,
                   class_idx=None, process=None) -> SampleFn:
    """One jitted, sharded function from per-image keys to uint8 images.

    Args:
      denoise_fn: `D(x, sigma, class_labels)` (x NHWC float32 [B, H, W, C], sigma [B], class_labels
        one-hot [B, label_dim] or None). A `BoundDenoiser` (what `load_model` returns) has its params
        passed to the jitted function replicated over the mesh rather than embedded as constants; with
        params None they are given per call (`sample_fn(keys, params)`).
      image_shape: (H, W, C). label_dim: number of classes, 0 for an unconditional model.
      settings: the process's sampler settings (`process.sampler_settings(...)`, which clamps the σ range).
      mesh: a Mesh with a 'data' axis; the batch is sharded along it.
      class_idx: None draws each image's class from its seed; an int fixes it (conditional models only).
      process: the forward process (`edm_jax.diffusion.process`; `load_model` gives the model's). None = the
        σ family with no σ range or rounding of its own (a plain denoiser such as `toy.GaussianMixture`);
        a bare preconditioner p is `SigmaProcess(precond=p)` (its σ range clamps `settings`).

    Per image (key k of its seed): start state = process.prior(fold_in(k, LATENT_STREAM)) (σ family: unit
    normals of image_shape); class = randint(fold_in(k, LABEL_STREAM), 0, label_dim); the sampler's noise at
    step i = normal(fold_in(fold_in(k, NOISE_STREAM), i)). Output: `to_uint8(process.to_data(sample))`.
    """
    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis, it has {mesh.axis_names}")
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")
    label_dim = int(label_dim or 0)
    if class_idx is not None:
        if label_dim == 0:
            raise ValueError(f"class_idx={class_idx} given, but the model is unconditional (label_dim = 0)")
        if not 0 <= int(class_idx) < label_dim:
            raise ValueError(f"class_idx={class_idx} is outside [0, {label_dim - 1}]")
        class_idx = int(class_idx)
    if process is None:
        process = SigmaProcess(precond=EDMPrecond())
    settings = process.sampler_settings(base=settings)
    run = process.sampler(settings)

    def sample(keys, params=None):
        den = denoise_fn if params is None else (lambda x, s, c: denoise_fn.apply(params, x, s, c))
        n = keys.shape[0]
        sub = lambda stream: jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)  # noqa: E731
        latents = process.prior(sub(LATENT_STREAM), image_shape)
        if label_dim == 0:
            index, labels = jnp.full((n,), -1, jnp.int32), None
        else:
            if class_idx is None:
                index = jax.vmap(lambda k: jax.random.randint(k, (), 0, label_dim, jnp.int32))(sub(LABEL_STREAM))
            else:
                index = jnp.full((n,), class_idx, jnp.int32)
            labels = jax.nn.one_hot(index, label_dim, dtype=jnp.float32)
        x = run(den, latents, labels, key=sub(NOISE_STREAM))
        return to_uint8(process.to_data(x)), index

    batch = NamedSharding(mesh, P("data"))
    bound = isinstance(denoise_fn, BoundDenoiser)
    if bound:
        params = None if denoise_fn.params is None else _replicate(denoise_fn.params, mesh)
        jitted = jax.jit(sample, in_shardings=(batch, NamedSharding(mesh, P())), out_shardings=(batch, batch))
    else:
        params = None
        jitted = jax.jit(sample, in_shardings=(batch,), out_shardings=(batch, batch))
    return SampleFn(jitted, mesh, params, image_shape, label_dim, settings, class_idx, bound=bound)


# ---------------------------------------------------------------------------------------------------
# Files.

def image_path(outdir, seed: int, subdirs: bool = True) -> str:
    """`outdir/{seed − seed % 1000:06d}/{seed:06d}.png` (or `outdir/{seed:06d}.png` without subdirs)."""
    name = f"{seed:06d}.png"
    return os.path.join(outdir, f"{seed - seed % 1000:06d}", name) if subdirs else os.path.join(outdir, name)


def _atomic_write(path, write):
    """Write through `write(file)` into a hidden temporary beside `path`, then rename onto it."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _pil(image):
    from PIL import Image

    image = np.asarray(image)
    channels = image.shape[-1]
    if channels == 1:
        return Image.fromarray(image[..., 0], "L")
    if channels in (3, 4):
        return Image.fromarray(image, "RGB" if channels == 3 else "RGBA")
    raise ValueError(f"cannot write {channels}-channel images as PNG; use fmt='npz'")


def _write_png(path, image):
    _atomic_write(path, lambda f: _pil(image).save(f, format="PNG"))


def _read_png(path):
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def save_grid(images, path, columns: int = 8, zoom: int = 1):
    """Tile uint8 images [n, H, W, C] into one PNG, `min(columns, n)` per row, rows filled in order, each
    tile repeated `zoom` times along both axes (nearest neighbour); written atomically. The one grid writer
    (the training snapshots' `train.save_image_grid` picks its columns and zoom)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    _write_png(path, grid.repeat(zoom, 0).repeat(zoom, 1) if zoom > 1 else grid)


def _part_seeds(outdir) -> dict[int, str]:
    """seed -> part file, over every npz part in `outdir/parts`."""
    folder = os.path.join(outdir, PARTS_DIR)
    found = {}
    if not os.path.isdir(folder):
        return found
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".npz") or name.startswith("."):
            continue
        path = os.path.join(folder, name)
        try:
            with np.load(path) as z:
                seeds = z["seeds"]
        except Exception as e:  # noqa: BLE001 — name the file, whatever went wrong
            raise ValueError(f"npz part {path} is unreadable ({e}); delete it and rerun to regenerate its "
                             "seeds") from None
        for s in seeds.tolist():
            found[int(s)] = path
    return found


def _write_part(outdir, images, seeds, labels):
    seeds = np.asarray(seeds, np.int64)
    digest = hashlib.sha1(seeds.tobytes()).hexdigest()[:12]
    path = os.path.join(outdir, PARTS_DIR, f"part-{int(seeds[0]):06d}-{digest}.npz")
    _atomic_write(path, lambda f: np.savez(f, images=np.asarray(images, np.uint8), seeds=seeds,
                                           labels=np.asarray(labels, np.int32)))


def _read_from_parts(index: dict[int, str], seeds):
    """(images, labels) of `seeds` from the part files in `index` (seed -> path)."""
    by_file: dict[str, list[int]] = {}
    for s in seeds:
        by_file.setdefault(index[s], []).append(s)
    images, labels = {}, {}
    for path, wanted in by_file.items():
        with np.load(path) as z:
            row = {int(s): i for i, s in enumerate(z["seeds"].tolist())}
            imgs, labs = z["images"], z["labels"]
            for s in wanted:
                images[s], labels[s] = imgs[row[s]], labs[row[s]]
    return [images[s] for s in seeds], [labels[s] for s in seeds]


def merge_npz(outdir, seeds) -> Optional[str]:
    """Gather `seeds` (in order) from `outdir/parts/*.npz` into `outdir/samples.npz` with `images` uint8
    [N, H, W, C], `seeds` int64 [N], `labels` int32 [N] (−1 when unconditional). Returns its path, or
    None (writing nothing) if some seed has no part here yet."""
    seeds = parse_seeds(seeds) if isinstance(seeds, str) else [int(s) for s in seeds]
    index = _part_seeds(outdir)
    if any(s not in index for s in seeds):
        return None
    images, labels = _read_from_parts(index, seeds)
    path = os.path.join(outdir, NPZ_FILE)
    _atomic_write(path, lambda f: np.savez(f, images=np.stack(images), seeds=np.asarray(seeds, np.int64),
                                           labels=np.asarray(labels, np.int32)))
    return path


# ---------------------------------------------------------------------------------------------------
# The generation loop.

@dataclasses.dataclass(frozen=True)
class GenerateSummary:
    """What one host did: files (or npz rows) written and skipped among the seeds it owns, wall time,
    batches computed out of all, the global batch used, and where the merged npz / grid went."""

    written: int
    skipped: int
    seconds: float
    batches_computed: int
    batches_total: int
    global_batch: int
    npz: Optional[str] = None
    grid: Optional[str] = None


def _host_rows(arr, lo, hi):
    """Rows [lo, hi) of a global array, read from this process's shards only."""
    out = np.empty((hi - lo,) + tuple(arr.shape[1:]), arr.dtype)
    covered = np.zeros(hi - lo, bool)
    for shard in arr.addressable_shards:
        start, stop, _ = shard.index[0].indices(arr.shape[0])
        a, b = max(start, lo), min(stop, hi)
        if a >= b or covered[a - lo:b - lo].all():
            continue
        out[a - lo:b - lo] = np.asarray(shard.data)[a - start:b - start]
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise RuntimeError(f"rows {lo}-{hi} of the batch are not on this host's devices; build the mesh with "
                           "generate.make_mesh() (devices in process order)")
    return out


def _format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Progress:
    """Prints 'generate: done/total seeds (x%), r img/s, elapsed, ETA' lines, at most every `every` s."""

    def __init__(self, enabled, compute_batches, global_batch, n_seeds, every=10.0):
        self.enabled, self.every = enabled, every
        self.compute, self.batch, self.n_seeds = compute_batches, global_batch, n_seeds
        self.start = self.last = time.perf_counter()
        self.first_done = None  # end of the first computed batch (includes compilation)
        self.done_batches = 0

    def update(self, position, force=False):
        now = time.perf_counter()
        self.done_batches += 1
        if self.first_done is None:
            self.first_done = now
        if not self.enabled or not (force or self.done_batches == 1 or now - self.last >= self.every):
            return
        self.last = now
        steady = self.done_batches - 1
        if steady > 0:
            per_batch = (now - self.first_done) / steady
        else:
            per_batch = now - self.start
        rate = self.batch / per_batch if per_batch > 0 else float("inf")
        eta = per_batch * (self.compute - self.done_batches)
        note = " (first batch: includes compilation)" if steady == 0 and self.compute > 1 else ""
        print(f"generate: {min(position, self.n_seeds)}/{self.n_seeds} seeds ({100 * position / self.n_seeds:.1f}%), "
              f"{rate:.1f} img/s, batch {self.done_batches}/{self.compute} computed, "
              f"elapsed {_format_seconds(now - self.start)}, ETA {_format_seconds(eta)}{note}", flush=True)


def generate(sample_fn: SampleFn, seeds, *, batch: int, outdir: str, fmt: str = "png", process_index=None,
             process_count=None, subdirs: bool = True, progress: bool = True, base_seed: int = 0,
             grid: bool = True) -> GenerateSummary:
    """Sample `seeds` and write them to `outdir`; resumable, multi-host, one compiled batch shape.

    Args:
      sample_fn: from `make_sample_fn`.
      seeds: list of ints or a string for `parse_seeds`.
      batch: GLOBAL batch size; rounded up to a multiple of lcm(mesh data size, process_count).
      outdir: output folder (created).
      fmt: 'png' (one file per seed, `image_path`) or 'npz' (part files per batch, merged into
        `samples.npz` by process 0).
      process_index / process_count: this host and the host count; default `jax.process_index()` /
        `jax.process_count()`. Giving them in a single-process run simulates one host of many (tests).
      subdirs: a folder per 1000 seeds (PNG only).
      progress: print progress lines (process 0 only).
      base_seed: root of the per-seed keys.
      grid: process 0 writes `grid.png` of the first 64 seeds (in the order given).

    Host p writes rows [p·B/P, (p+1)·B/P) of every global batch. See the module docstring for
    padding, skipping and the npz layout. Returns a `GenerateSummary` for this host.
    """
    t0 = time.perf_counter()
    seeds = parse_seeds(seeds)
    if fmt not in ("png", "npz"):
        raise ValueError(f"unknown format {fmt!r}; choose 'png' or 'npz'")
    if fmt == "png" and sample_fn.image_shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot write {sample_fn.image_shape[-1]}-channel images as PNG; use fmt='npz'")
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    real_count = jax.process_count()
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = real_count if process_count is None else int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    if real_count > 1 and (process_count, process_index) != (real_count, jax.process_index()):
        raise ValueError(f"this is process {jax.process_index()} of {real_count}; process_index/process_count "
                         "may only be overridden in a single-process run")
    multiple = math.lcm(sample_fn.data_size, process_count)
    # A batch larger than the run only pads: compute the seeds' count rounded up to the device multiple.
    global_batch = -(-min(int(batch), len(seeds)) // multiple) * multiple
    if global_batch != batch and progress and process_index == 0:
        print(f"generate: batch {batch} rounded up to {global_batch} (a multiple of {sample_fn.data_size} data "
              f"shard(s) and {process_count} host(s))", flush=True)
    per_host = global_batch // process_count
    lead = process_index == 0
    os.makedirs(outdir, exist_ok=True)
    if fmt == "npz":
        os.makedirs(os.path.join(outdir, PARTS_DIR), exist_ok=True)

    n = len(seeds)
    num_batches = -(-n // global_batch)
    padded = np.asarray(seeds + [seeds[-1]] * (num_batches * global_batch - n), np.int64)
    batches = padded.reshape(num_batches, global_batch)

    # Which outputs exist, and which batches somebody needs.
    part_index = _part_seeds(outdir) if fmt == "npz" else {}
    if fmt == "png":
        exists = lambda s: os.path.exists(image_path(outdir, s, subdirs))  # noqa: E731
    else:
        exists = lambda s: s in part_index  # noqa: E731
    lo, hi = process_index * per_host, (process_index + 1) * per_host
    missing = np.zeros((num_batches, per_host), bool)  # this host's rows still to write (real seeds only)
    for b in range(num_batches):
        for j in range(lo, hi):
            if b * global_batch + j < n:
                missing[b, j - lo] = not exists(int(batches[b, j]))
    need = missing.any(axis=1)
    if real_count > 1:
        from jax.experimental import multihost_utils

        need = np.asarray(multihost_utils.process_allgather(need)).reshape(real_count, -1).any(axis=0)
    owned = int(sum(np.clip(n - b * global_batch - lo, 0, per_host) for b in range(num_batches)))
    skipped = owned - int(missing.sum())
    grid_count = min(GRID_IMAGES, n) if grid else 0
    grid_batches = -(-grid_count // global_batch)
    grid_cache: dict[int, tuple[np.ndarray, int]] = {}

    todo = [b for b in range(num_batches) if need[b]]
    prog = _Progress(progress and lead, len(todo), global_batch, n)
    written = 0
    subdir_made: set[str] = set()

    def finish(b, images, labels):
        nonlocal written
        if b < grid_batches and lead:
            if real_count > 1:
                from jax.experimental import multihost_utils

                full_i = np.asarray(multihost_utils.process_allgather(images, tiled=True))
                full_l = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
            else:
                full_i, full_l = _host_rows(images, 0, global_batch), _host_rows(labels, 0, global_batch)
            for j in range(global_batch):
                if b * global_batch + j < grid_count:
                    grid_cache[int(batches[b, j])] = (full_i[j], int(full_l[j]))
        elif b < grid_batches and real_count > 1:
            from jax.experimental import multihost_utils  # every host takes part in the gather

            multihost_utils.process_allgather(images, tiled=True)
            multihost_utils.process_allgather(labels, tiled=True)
        rows = np.flatnonzero(missing[b])
        if rows.size:
            my_images, my_labels = _host_rows(images, lo, hi), _host_rows(labels, lo, hi)
            my_seeds = batches[b, lo:hi]
            if fmt == "png":
                for r in rows:
                    path = image_path(outdir, int(my_seeds[r]), subdirs)
                    folder = os.path.dirname(path)
                    if folder not in subdir_made:
                        os.makedirs(folder, exist_ok=True)
                        subdir_made.add(folder)
                    _write_png(path, my_images[r])
            else:
                _write_part(outdir, my_images[rows], my_seeds[rows], my_labels[rows])
            written += int(rows.size)
        prog.update(min((b + 1) * global_batch, n), force=(b == todo[-1]))

    pending = None
    for b in todo:
        out = sample_fn(sample_fn.keys_for(batches[b], base_seed))  # dispatched asynchronously
        if pending is not None:
            finish(*pending)  # write the previous batch while this one runs
        pending = (b, *out)
    if pending is not None:
        finish(*pending)

    if real_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("edm_jax.generate: all batches written")

    npz_path = grid_path = None
    if fmt == "npz" and lead:
        target = os.path.join(outdir, NPZ_FILE)
        unchanged = False
        if written == 0 and os.path.exists(target):
            with np.load(target) as z:
                unchanged = np.array_equal(z["seeds"], np.asarray(seeds, np.int64))
        npz_path = target if unchanged else merge_npz(outdir, seeds)
        if npz_path is None and progress:
            print(f"generate: {NPZ_FILE} not written yet: some seeds have no part in {outdir}/{PARTS_DIR} "
                  "(other hosts still to run, or parts on their local disks); call merge_npz once they are here",
                  flush=True)
    if grid_count and lead:
        grid_path = os.path.join(outdir, GRID_FILE)
        first = seeds[:grid_count]
        if grid_cache or not os.path.exists(grid_path):
            images = _grid_images(first, grid_cache, outdir, fmt, subdirs)
            if images is None:
                grid_path = None
                if progress:
                    print(f"generate: {GRID_FILE} not written: some of the first {grid_count} images are not "
                          "readable on this host", flush=True)
            else:
                save_grid(images, grid_path)
    seconds = time.perf_counter() - t0
    if progress and lead:
        print(f"generate: done, {written} written, {skipped} skipped by host {process_index}, "
              f"{len(todo)}/{num_batches} batches of {global_batch} computed in {_format_seconds(seconds)}",
              flush=True)
    return GenerateSummary(written=written, skipped=skipped, seconds=seconds, batches_computed=len(todo),
                           batches_total=num_batches, global_batch=global_batch, npz=npz_path, grid=grid_path)


def _grid_images(seeds, cache, outdir, fmt, subdirs):
    """uint8 [len(seeds), H, W, C] from this run's cache, else from the files on disk; None if unavailable."""
    rest = [s for s in seeds if s not in cache]
    from_disk = {}
    if rest:
        if fmt == "png":
            for s in rest:
                path = image_path(outdir, s, subdirs)
                if not os.path.exists(path):
                    return None
                from_disk[s] = _read_png(path)
        else:
            index = _part_seeds(outdir)
            if any(s not in index for s in rest):
                return None
            from_disk = dict(zip(rest, _read_from_parts(index, rest)[0]))
    return np.stack([cache[s][0] if s in cache else from_disk[s] for s in seeds])


# ---------------------------------------------------------------------------------------------------
# Models.

def sampler_settings_of(model: "LoadedModel", **overrides):
    """(settings, note) for sampling `model`: the paper's settings for its resolution (ImageNet-64 has its
    own stochastic ones, recognised by the dataset's name), with `overrides` (None = not given; the process
    refuses what its family lacks). A resolution without a preset gets the CIFAR-10 settings and a note
    saying so (the caller shows it); note is None otherwise."""
    from edm_jax.diffusion.sampler_settings import NoPresetError

    dataset = (model.config.get("dataset") or {}).get("path") if isinstance(model.config.get("dataset"), dict) else None
    hint = dataset if dataset and "imagenet" in str(dataset).lower() else None
    try:
        return model.process.sampler_settings(resolution=model.image_shape[0], dataset=hint, **overrides), None
    except NoPresetError:
        res = model.image_shape[0]
        return model.process.sampler_settings(**overrides), (
            f"no paper sampler preset for {res}x{res} images; using the CIFAR-10 settings (18 Heun steps) unless "
            "flags say otherwise")


class LoadedModel(NamedTuple):
    """What `load_model` returns: the pieces `make_sample_fn` needs, plus the model's plain-data config."""

    denoise: "BoundDenoiser"
    image_shape: tuple
    label_dim: int
    process: Any
    config: dict


def load_model(workdir=None, checkpoint=None, *, dtype=jnp.float32, network_kwargs=None,
               process=None) -> LoadedModel:
    """(denoise_fn, image_shape, label_dim, process, config) of a model for `make_sample_fn`.

    `checkpoint`: a reference snapshot pickle (`convert.load_snapshot`), a PSLD Lightning `.ckpt`
    (`psld_checkpoint.load_psld_snapshot`, which needs the SongUNet `network_kwargs` and the `process`: the
    file holds neither), or a directory of training checkpoints (`load_training_checkpoint`). Otherwise
    `workdir`: a folder made by `--mode=convert` (`convert.load_converted`), else its training checkpoints.
    `denoise_fn` is a `BoundDenoiser` over the EMA network's variables (the process's model, e.g. D of Eq. 7;
    NHWC); image_shape is the data's (H, W, C).
    """
    from edm_jax import convert
    from edm_jax.interop import psld_checkpoint

    if checkpoint is not None:
        if os.path.isdir(checkpoint):
            snap = load_training_checkpoint(checkpoint, dtype)
        elif os.path.isfile(checkpoint) and psld_checkpoint.is_lightning_checkpoint(checkpoint):
            if network_kwargs is None or process is None:
                raise ValueError(f"{checkpoint} is a PSLD Lightning checkpoint, which holds no network or process "
                                 "settings; load_model needs network_kwargs= and process= for it")
            snap = psld_checkpoint.load_psld_snapshot(checkpoint, network_kwargs, process, dtype=dtype)
        elif os.path.isfile(checkpoint):
            snap = convert.load_snapshot(checkpoint, dtype=dtype)
        else:
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    elif workdir is not None:
        if os.path.isfile(os.path.join(workdir, convert.CONFIG_FILE)):
            snap = convert.load_converted(workdir, dtype=dtype)
        elif os.path.isdir(workdir):
            snap = load_training_checkpoint(workdir, dtype)
        else:
            raise FileNotFoundError(f"workdir {workdir} does not exist")
    else:
        raise ValueError("load_model needs checkpoint= (a reference .pkl) or workdir= (a converted or training run)")
    config = snap.config
    channels = snap.process.data_channels(int(snap.module.in_channels))  # PSLD's network sees 2·C channels
    image_shape = (int(config["img_resolution"]), int(config["img_resolution"]), channels)
    denoise = BoundDenoiser(snap.process.model(snap.module.apply), snap.params)
    return LoadedModel(denoise, image_shape, int(config.get("label_dim") or 0), snap.process, config)
