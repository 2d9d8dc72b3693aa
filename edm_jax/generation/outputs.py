"""Output files: one PNG per seed (atomic writes), npz parts and their merge, the image grid."""

from __future__ import annotations

import hashlib
import math
import os
from typing import Optional

import numpy as np

from edm_jax.generation.seeds import parse_seeds

__all__ = ["image_path", "merge_npz", "save_grid", "NPZ_FILE", "GRID_FILE", "PARTS_DIR"]

NPZ_FILE, GRID_FILE, PARTS_DIR = "samples.npz", "grid.png", "parts"


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


def save_grid(images, path, min_tile: int = 64):
    """Tile uint8 images [n, H, W, C] into one near-square PNG (ceil(√n) per row, rows filled in order), each
    tile upscaled (nearest neighbour, a whole factor) to at least `min_tile` px: 64 CIFAR images make 512 px;
    written atomically. The one grid writer: training's snapshot grids (`train.save_image_grid`) and
    `--mode=sample`'s grid.png look alike whatever the resolution."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = -(-n // cols)
    zoom = max(1, math.ceil(min_tile / max(h, w)))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = image
    _write_png(path, grid.repeat(zoom, 0).repeat(zoom, 1))


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
