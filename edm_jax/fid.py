"""Fréchet Inception Distance (Heusel et al. 2017) as NVlabs/edm's `fid.py` computes it.

  features   pool3 of the FID Inception-v3 (`edm_jax.inception`, pytorch-fid's network and weights) on
             uint8 images: x/255 in [0, 1], grayscale repeated to 3 channels, resized to 299 inside.
  statistics mu = Σf/n, sigma = (Σ f fᵀ − n·mu muᵀ)/(n − 1), accumulated in float64 (`FeatureStats`).
  distance   FID = ‖mu1 − mu2‖² + tr(Σ1 + Σ2 − 2·sqrtm(Σ1 Σ2)), real part (`scipy.linalg.sqrtm`).
Reference statistics use the published fid-refs npz format (keys `mu`, `sigma`), e.g.
https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz; nothing here downloads them.

Usage:
    params = fid.load_inception_weights("pt_inception-2015-12-05-6726825d.pth")
    score = fid.fid_of_images(images_uint8_nhwc, fid.load_reference_stats("cifar10-32x32.npz"), params)

Comparability: the weights are those of the TF graph `inception-2015-12-05` that EDM's detector (the
StyleGAN3 TorchScript port) also uses, but the resize to 299 is pytorch-fid's `F.interpolate`; pytorch-fid
documents that its scores "still differ slightly" from the TF implementation for that reason (e.g. 0.08
absolute on LSUN). Compare against EDM's published numbers with that in mind.
Cost: `frechet_distance` on 2048x2048 matrices (`scipy.linalg.sqrtm`) takes ~1 minute on 2 CPU cores.
"""

import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from edm_jax.inception import (FEATURE_DIM, InceptionV3FID, deterministic_weights, load_inception_weights,
                               state_dict_shapes, variables_from_state_dict)

__all__ = ["FeatureStats", "feature_statistics", "frechet_distance", "load_reference_stats",
           "save_reference_stats", "compute_features", "iter_features", "fid_of_images",
           "load_inception_weights", "deterministic_weights", "variables_from_state_dict",
           "state_dict_shapes", "InceptionV3FID", "FEATURE_DIM"]


# ---------------------------------------------------------------------------------------------------
# Statistics.

class FeatureStats:
    """Streaming mean and unbiased covariance: n, Σf and Σ f fᵀ in float64.

    `update(features [B, D])` adds a batch (any number of times, any batch sizes); `merge(other)` adds
    another accumulator (e.g. another host's); `mean_and_cov()` -> (mu [D], sigma [D, D]) float64.
    """

    def __init__(self, dim=FEATURE_DIM):
        self.dim = int(dim)
        self.n = 0
        self.sum = np.zeros(self.dim, np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, features):
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update takes features of shape [batch, {self.dim}]; got {f.shape}.")
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other):
        if other.dim != self.dim:
            raise ValueError(f"cannot merge feature statistics of dimension {other.dim} into {self.dim}.")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def mean_and_cov(self):
        if self.n < 2:
            raise ValueError(f"feature statistics need at least 2 images for a covariance; have {self.n}.")
        mu = self.sum / self.n
        sigma = (self.sum_outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def feature_statistics(features):
    """(mu float64 [D], sigma float64 [D, D] unbiased) of features [N, D], as EDM's fid.py computes them."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"feature_statistics takes features of shape [N, D]; got {features.shape}.")
    return FeatureStats(features.shape[1]).update(features).mean_and_cov()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """‖mu1 − mu2‖² + tr(Σ1 + Σ2 − 2·sqrtm(Σ1·Σ2)), real part; EDM's `calculate_fid_from_inception_stats`.

    Float64 throughout; `scipy.linalg.sqrtm` as the reference calls it (its deprecated `disp` left out).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != mu1.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance needs mu [D] and sigma [D, D] twice with one D; got mu "
                         f"{mu1.shape}, {mu2.shape} and sigma {sigma1.shape}, {sigma2.shape}.")
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(m + np.trace(sigma1 + sigma2 - 2 * s)))


# ---------------------------------------------------------------------------------------------------
# Reference statistics (fid-refs npz: `mu`, `sigma`).

def load_reference_stats(path):
    """(mu, sigma) float64 from a fid-refs npz (`fid.py ref` output, or the published files)."""
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"reference statistics {path} is a URL; edm_jax never downloads: fetch the npz on a "
                         "machine with internet access and pass its local path.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics {path} not found: pass a fid-refs npz (keys mu, sigma), "
                                "e.g. https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz "
                                "downloaded beforehand, or make one with save_reference_stats.")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array")
        with z:
            arrays = {k: np.asarray(z[k]) for k in z.files if k in ("mu", "sigma")}
            files = sorted(z.files)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"reference statistics {path} is not a readable npz file with mu and sigma ({e}).") from e
    if len(arrays) != 2:
        raise ValueError(f"reference statistics {path} lacks the keys mu and sigma (it has {files}).")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference statistics {path} has mu {mu.shape} and sigma {sigma.shape}; "
                         "expected [D] and [D, D].")
    return mu, sigma


def save_reference_stats(path, mu, sigma):
    """Write (mu, sigma) as a fid-refs npz at exactly `path` (parent folders created), like `fid.py ref`."""
    path = os.fspath(path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"save_reference_stats needs mu [D] and sigma [D, D]; got {mu.shape} and {sigma.shape}.")
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    return path


# ---------------------------------------------------------------------------------------------------
# Features of uint8 images.

@jax.jit
def _pool_features(params, images_uint8):
    """uint8 [B, H, W, 3] -> pool3 [B, 2048]; one compilation per batch shape."""
    x = images_uint8.astype(jnp.float32) / 255
    return InceptionV3FID().apply(params, x)["pool"]


def _as_rgb_uint8(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"FID features take uint8 images in [0, 255]; got dtype {images.dtype} "
                         "(convert with np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)).")
    if images.ndim == 3:  # [N, H, W] grayscale
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"FID features take images of shape [N, H, W, 3] or [N, H, W, 1]; got {images.shape}.")
    return images


def iter_features(images, params, batch_size=64, *, mesh=None, axis="data") -> Iterator[np.ndarray]:
    """Yield pool3 features (float32 [b, 2048] numpy) batch by batch; see `compute_features`."""
    images = _as_rgb_uint8(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec
        if batch_size % mesh.shape[axis]:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the mesh's {axis!r} axis "
                             f"({mesh.shape[axis]} devices).")
        data_sharding = NamedSharding(mesh, PartitionSpec(axis))
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        n = len(chunk)
        if chunk.shape[-1] == 1:
            chunk = np.repeat(chunk, 3, axis=-1)
        if n < batch_size:  # pad the last batch: one compiled shape for the whole run
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), np.uint8)])
        x = jax.device_put(chunk, data_sharding) if mesh is not None else chunk
        yield np.asarray(_pool_features(params, x))[:n]


def compute_features(images, params, batch_size=64, *, mesh=None, axis="data"):
    """Pool3 features float32 [N, 2048] of uint8 images [N, H, W, 3] (or [N, H, W, 1] / [N, H, W] grayscale).

    `params`: the Inception variables `{'params', 'batch_stats'}` (`load_inception_weights`). Images
    go through the jitted network `batch_size` at a time (the last batch zero-padded, so one
    compilation per image size); with `mesh`, each batch is sharded along `axis` over its devices.
    """
    feats = list(iter_features(images, params, batch_size, mesh=mesh, axis=axis))
    return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM), np.float32)


def fid_of_images(images, ref_stats: Any, params, batch_size=64, *, mesh=None, axis="data"):
    """FID of uint8 images [N, H, W, C] against reference statistics.

    `ref_stats`: `(mu, sigma)`, a dict with `mu` and `sigma`, or the path of a fid-refs npz.
    Features are accumulated batch by batch in float64 (`FeatureStats`), never all held at once.
    """
    if isinstance(ref_stats, (str, os.PathLike)):
        mu_ref, sigma_ref = load_reference_stats(ref_stats)
    elif isinstance(ref_stats, dict):
        mu_ref, sigma_ref = ref_stats["mu"], ref_stats["sigma"]
    else:
        mu_ref, sigma_ref = ref_stats
    stats = FeatureStats()
    for feats in iter_features(images, params, batch_size, mesh=mesh, axis=axis):
        stats.update(feats)
    mu, sigma = stats.mean_and_cov()
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
