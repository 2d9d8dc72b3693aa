"""Bits/dim of a model over a set of 8-bit images, sharded over devices (`--mode=likelihood`).

Each image i (its index in the set) gets the key k_i = fold_in(key(base_seed), i); its uniform
dequantisation noise is drawn from fold_in(k_i, DEQUANT_STREAM) and the likelihood's own draws (Hutchinson
probes; PSLD's momentum m) from fold_in(k_i, PROBE_STREAM), and the process's `log_likelihood` integrates
each image on its own, so an image's result never depends on the batch or the device count; the driver
never names the family. Dequantisation (`edm_jax.diffusion.likelihood`):
x = (u + U)/127.5 − 1 with u the uint8 pixel and U ~ Uniform[0, 1) per pixel; bits/dim are of u + U on
[0, 256)^d.

Progress (`progress=True`) goes to this module's logger (INFO): main.py shows it; from Python,
`logging.basicConfig(level=logging.INFO)` does.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from edm_jax.distributed import replicate, replicated
from edm_jax.generate import BoundDenoiser

__all__ = ["DEQUANT_STREAM", "PROBE_STREAM", "dequantize", "make_likelihood_fn", "likelihood_of_images"]

DEQUANT_STREAM, PROBE_STREAM = 0, 1
log = logging.getLogger(__name__)


def dequantize(images, keys):
    """uint8 [N, H, W, C] -> float32 (u + U)/127.5 − 1, U ~ Uniform[0, 1) from each image's key [N]."""
    u = jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:], jnp.float32))(keys)
    return (images.astype(jnp.float32) + u) / 127.5 - 1


def make_likelihood_fn(model_fn, *, process, mesh: Mesh, label_dim: int = 0, **likelihood_kwargs):
    """One jitted function (images uint8 [B, H, W, C], keys [B], labels int32 [B]) -> dict of [B] arrays.

    model_fn: the process's model (D(x; σ) for the σ family, ε_θ(z, t) for PSLD). The batch is sharded
    along the mesh axis 'data' (B a multiple of its size). `likelihood_kwargs` go to
    `process.log_likelihood` (its `likelihood_settings()`, plus num_probes, divergence, solver, rtol, atol,
    num_steps). A `BoundDenoiser`'s params are passed replicated rather than baked in as constants.
    Returns bits_per_dim, log_p, log_p_std_err (over probes), nfe, each [B].
    """

    def fn(images, keys, labels, params=None):
        den = model_fn if params is None else (lambda x, s, c: model_fn.apply(params, x, s, c))
        sub = lambda stream: jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)  # noqa: E731
        x = dequantize(images, sub(DEQUANT_STREAM))
        onehot = jax.nn.one_hot(labels, label_dim, dtype=jnp.float32) if label_dim else None
        out = process.log_likelihood(den, x, onehot, key=sub(PROBE_STREAM), data_range=2.0, **likelihood_kwargs)
        return {k: out[k] for k in ("bits_per_dim", "log_p", "log_p_std_err", "nfe")}

    batch, rep = NamedSharding(mesh, P("data")), replicated(mesh)
    if isinstance(model_fn, BoundDenoiser):
        params = replicate(model_fn.params, mesh)
        jitted = jax.jit(fn, in_shardings=(batch, batch, batch, rep), out_shardings=batch)
        return lambda images, keys, labels: jitted(images, keys, labels, params)
    return jax.jit(fn, in_shardings=(batch, batch, batch), out_shardings=batch)


def likelihood_of_images(likelihood_fn, images, labels=None, *, batch: int, mesh: Mesh, base_seed: int = 0,
                         progress: bool = False) -> dict:
    """Bits/dim of uint8 images [N, H, W, C] (labels int [N] or None) in batches of `batch` images.

    The last batch is padded (to a multiple of the 'data' axis too), so the run compiles one shape.
    Returns a dict: bits_per_dim (mean over images), std_err (the images' standard error, std/√N; it
    includes the probes' noise), num_images, nfe_mean, and per_image (bits/dim [N], numpy float64).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"likelihood needs uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
    n = len(images)
    if n == 0:
        raise ValueError("no images to evaluate the likelihood of")
    shards = int(mesh.shape["data"])
    batch = -(-min(int(batch), n) // shards) * shards
    labels = np.zeros(n, np.int32) if labels is None else np.asarray(labels, np.int32)
    base = jax.random.key(base_seed)
    key_fn = jax.jit(lambda idx: jax.vmap(lambda i: jax.random.fold_in(base, i))(idx),
                     out_shardings=NamedSharding(mesh, P("data")))
    bpd, nfe = [], []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        pad = batch - (stop - start)
        chunk = np.concatenate([images[start:stop], np.zeros((pad, *images.shape[1:]), np.uint8)])
        lab = np.concatenate([labels[start:stop], np.zeros(pad, np.int32)])
        keys = key_fn(np.arange(start, start + batch, dtype=np.uint32))
        out = likelihood_fn(chunk, keys, lab)
        bpd.append(np.asarray(out["bits_per_dim"], np.float64)[:stop - start])
        nfe.append(np.asarray(out["nfe"], np.float64)[:stop - start])
        if progress:
            done = np.concatenate(bpd)
            log.info("likelihood: %d/%d images, %.4f bits/dim so far", stop, n, done.mean())
    per_image, nfe = np.concatenate(bpd), np.concatenate(nfe)
    std_err = float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return dict(bits_per_dim=float(per_image.mean()), std_err=std_err, num_images=n,
                nfe_mean=float(nfe.mean()), per_image=per_image)


def summary_json(result: dict, **context) -> dict:
    """The JSON summary: the result without per-image values, plus the run's context (plain values)."""
    out = {k: v for k, v in result.items() if k != "per_image"}
    out.update({k: v for k, v in context.items()})
    return out
