"""Per-example randomness: every draw for example i comes from example i's own key.

This is what makes results independent of batch size, micro-batching and device count (DESIGN.md:
randomness): image i of a sampling run depends only on its seed, and a training example's σ and noise
depend only on (step, global example index).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["per_example_keys"]


def per_example_keys(key, n: int):
    """Per-example keys [n]: `fold_in(key, i)` for one key, or the given array of n keys as is.

    Accepts typed keys (`jax.random.key`) or raw uint32 keys (`jax.random.PRNGKey`).
    """
    key = key if isinstance(key, jax.Array) else jnp.asarray(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.shape == ():
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))
    if key.shape == (n,):
        return key
    raise ValueError(f"key must be one key or an array of {n} keys (one per example), got shape {key.shape}")
