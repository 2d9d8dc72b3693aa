"""FID of image sets and of models, the paper's protocol, and reference statistics of datasets.

The pieces (Inception network, float64 statistics, Fréchet distance) live in `edm_jax.fid`; this module
feeds them: a folder or npz of samples, a model sampled on the fly (`edm_jax.generate`, sharded like
`--mode=sample`), or a dataset (`edm_jax.data`) for the reference statistics (the fid-refs npz format,
`mu` [2048] and `sigma` [2048, 2048]).

Paper protocol (Karras et al. 2022, Section 5 / reference fid.py): 50,000 images for each of the seed
ranges 0–49,999, 50,000–99,999 and 100,000–149,999; report each FID and the minimum.

Progress goes to this module's logger (INFO): main.py shows it; from Python,
`logging.basicConfig(level=logging.INFO)` does.
"""

from __future__ import annotations

import logging
import os
import re
import time

import numpy as np

from edm_jax import fid

__all__ = ["load_images", "stats_of_images", "stats_of_model", "fid_against", "paper_seed_ranges",
           "reference_stats_of_dataset"]


# What --mode=sample writes: `000000/000123.png` (or `000123.png` without subfolders), beside grid.png.
_SAMPLE_NAME = re.compile(r"^(\d{6}/)?\d{6,}\.png$")
log = logging.getLogger(__name__)


def _sample_folder_images(path):
    """The seed images of a --mode=sample folder, in seed order, or None if it holds none."""
    names = []
    for root, _, files in os.walk(path):
        rel_root = os.path.relpath(root, path)
        for name in files:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if _SAMPLE_NAME.match(rel):
                names.append(rel)
    if not names:
        return None
    names.sort(key=lambda rel: int(os.path.basename(rel)[:-4]))
    from PIL import Image

    def read(rel):
        with Image.open(os.path.join(path, rel)) as im:
            return np.asarray(im)

    images = [read(rel) for rel in names]
    images = [im[..., None] if im.ndim == 2 else im for im in images]
    if len({im.shape for im in images}) != 1:
        raise ValueError(f"{path}: the sample images differ in size; FID needs one image size")
    return np.stack(images)


def load_images(path, max_images=None) -> np.ndarray:
    """uint8 [N, H, W, C] from a --mode=sample folder (seed images in seed order, grid.png ignored), an
    npz with `images`, or any dataset folder/zip that `edm_jax.data` reads."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
        with np.load(path) as z:
            if "images" not in z:
                raise ValueError(f"{path} has no 'images' array (found {sorted(z.files)}); expected --format=npz output")
            images = z["images"]
    else:
        images = _sample_folder_images(path) if os.path.isdir(path) else None
        if images is None:
            from edm_jax import data

            images = data.load_image_dataset(path, use_labels=False).images
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{path}: expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    return images if max_images is None else images[:max_images]


def stats_of_images(images, inception, batch_size=64, *, mesh=None):
    """(mu float64 [2048], sigma float64 [2048, 2048]) of uint8 images [N, H, W, C]."""
    stats = fid.FeatureStats()
    for features in fid.iter_features(images, inception, batch_size, mesh=mesh):
        stats.update(features)
    return stats.mean_and_cov()


def stats_of_model(sample_fn, seeds, inception, *, batch, base_seed=0, mesh=None, progress=True):
    """Feature statistics of a model's samples for `seeds`, generated batch by batch and never stored.

    `sample_fn`: a `generate.SampleFn` (images depend only on their seeds, so the statistics do not
    depend on `batch` or the device count beyond float summation order). The last batch is padded with
    its last seed and the padding dropped, so there is one compiled shape.
    """
    seeds = list(seeds)
    stats = fid.FeatureStats()
    start = last = time.time()
    for lo in range(0, len(seeds), batch):
        chunk = seeds[lo:lo + batch]
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        images, _ = sample_fn.sample_seeds(padded, base_seed)
        images = np.asarray(images)[: len(chunk)]
        for features in fid.iter_features(images, inception, batch, mesh=mesh):
            stats.update(features)
        done = lo + len(chunk)
        if progress and (time.time() - last > 10 or done == len(seeds)):
            rate = done / max(time.time() - start, 1e-9)
            eta = (len(seeds) - done) / max(rate, 1e-9)
            log.info("fid: %d/%d images, %.1f img/s, ETA %.0f s", done, len(seeds), rate, eta)
            last = time.time()
    return stats.mean_and_cov()


def fid_against(mu, sigma, ref) -> float:
    """Fréchet distance of (mu, sigma) to reference statistics (`(mu, sigma)`, a dict or an npz path)."""
    if isinstance(ref, (str, os.PathLike)):
        mu_ref, sigma_ref = fid.load_reference_stats(ref)
    elif isinstance(ref, dict):
        mu_ref, sigma_ref = ref["mu"], ref["sigma"]
    else:
        mu_ref, sigma_ref = ref
    return float(fid.frechet_distance(mu, sigma, mu_ref, sigma_ref))


def paper_seed_ranges(num=50000, repeats=3):
    """The paper's seed ranges: [0, num), [num, 2·num), [2·num, 3·num)."""
    return [range(k * num, (k + 1) * num) for k in range(repeats)]


def reference_stats_of_dataset(dataset, inception, batch_size=64, *, mesh=None, max_images=None):
    """Reference statistics of an `edm_jax.data.ImageDataset` (all images, or a random subset).

    A subset uses a fixed permutation (seed 0), like the reference's `max_size` option.
    """
    images = dataset.images
    if max_images is not None and max_images < len(images):
        images = images[np.sort(np.random.default_rng(0).permutation(len(images))[:max_images])]
    return stats_of_images(images, inception, batch_size, mesh=mesh)
