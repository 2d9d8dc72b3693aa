"""The sharded sample function: per-image keys in, uint8 images out, one jit over the mesh."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from edm_jax.diffusion.precond import EDMPrecond
from edm_jax.distributed import replicate, replicated
from edm_jax.diffusion.process import SigmaProcess
from edm_jax.diffusion.sampler_settings import SamplerSettings
from edm_jax.generation.seeds import LABEL_STREAM, LATENT_STREAM, NOISE_STREAM, seed_keys

__all__ = ["make_sample_fn", "SampleFn", "BoundDenoiser", "to_uint8"]

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
        params = None if denoise_fn.params is None else replicate(denoise_fn.params, mesh)
        jitted = jax.jit(sample, in_shardings=(batch, replicated(mesh)), out_shardings=(batch, batch))
    else:
        params = None
        jitted = jax.jit(sample, in_shardings=(batch,), out_shardings=(batch, batch))
    return SampleFn(jitted, mesh, params, image_shape, label_dim, settings, class_idx, bound=bound)
