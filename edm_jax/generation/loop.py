"""The multi-host generation loop: batches of seeds, padding, resume, the rows each host writes.

Progress and notes go to this module's logger (`edm_jax.generation.loop`, INFO): main.py shows them on its
console; from Python, `logging.basicConfig(level=logging.INFO)` does.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Optional

import jax
import numpy as np

from edm_jax.generation.outputs import (GRID_FILE, NPZ_FILE, PARTS_DIR, _part_seeds, _read_from_parts, _read_png,
                                        _write_part, _write_png, image_path, merge_npz, save_grid)
from edm_jax.generation.sample_fn import SampleFn
from edm_jax.generation.seeds import parse_seeds

__all__ = ["generate", "GenerateSummary"]

GRID_IMAGES = 64
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerateSummary:
    """What one host did: files (or npz rows) written and skipped among the seeds it owns, wall time,
    batches computed out of all, the global batch used, where the merged npz / grid went, and
    `rows_computed`: the batch rows this process's own devices computed (padding included), counted from
    the output's addressable shards — per_host × batches_computed when the work is split as it should be."""

    written: int
    skipped: int
    seconds: float
    batches_computed: int
    batches_total: int
    global_batch: int
    npz: Optional[str] = None
    grid: Optional[str] = None
    rows_computed: int = 0


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


def _local_row_count(arr) -> int:
    """How many distinct rows of a batch-sharded global array this process's devices hold (computed)."""
    spans = {shard.index[0].indices(arr.shape[0])[:2] for shard in arr.addressable_shards}
    return sum(stop - start for start, stop in spans)


def _format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Progress:
    """Logs 'generate: done/total seeds (x%), r img/s, elapsed, ETA' lines, at most every `every` s."""

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
        log.info("generate: %d/%d seeds (%.1f%%), %.1f img/s, batch %d/%d computed, elapsed %s, ETA %s%s",
                 min(position, self.n_seeds), self.n_seeds, 100 * position / self.n_seeds, rate, self.done_batches,
                 self.compute, _format_seconds(now - self.start), _format_seconds(eta), note)


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
      progress: log progress lines (process 0 only; module docstring).
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
        log.info("generate: batch %d rounded up to %d (a multiple of %d data shard(s) and %d host(s))", batch,
                 global_batch, sample_fn.data_size, process_count)
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
    written = rows_computed = 0
    subdir_made: set[str] = set()

    def finish(b, images, labels):
        nonlocal written, rows_computed
        rows_computed += _local_row_count(images)
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
            log.info("generate: %s not written yet: some seeds have no part in %s/%s (other hosts still to run, "
                     "or parts on their local disks); call merge_npz once they are here", NPZ_FILE, outdir, PARTS_DIR)
    if grid_count and lead:
        grid_path = os.path.join(outdir, GRID_FILE)
        first = seeds[:grid_count]
        if grid_cache or not os.path.exists(grid_path):
            images = _grid_images(first, grid_cache, outdir, fmt, subdirs)
            if images is None:
                grid_path = None
                if progress:
                    log.info("generate: %s not written: some of the first %d images are not readable on this "
                             "host", GRID_FILE, grid_count)
            else:
                save_grid(images, grid_path)
    seconds = time.perf_counter() - t0
    if progress and lead:
        log.info("generate: done, %d written, %d skipped by host %d, %d/%d batches of %d computed in %s", written,
                 skipped, process_index, len(todo), num_batches, global_batch, _format_seconds(seconds))
    return GenerateSummary(written=written, skipped=skipped, seconds=seconds, batches_computed=len(todo),
                           batches_total=num_batches, global_batch=global_batch, npz=npz_path, grid=grid_path,
                           rows_computed=rows_computed)


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
