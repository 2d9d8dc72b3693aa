"""Seeds and keys: seed lists, and image s's key fold_in(key(base_seed), s) with its three sub-streams."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np


__all__ = ["parse_seeds", "seed_keys", "LATENT_STREAM", "LABEL_STREAM", "NOISE_STREAM"]

LATENT_STREAM, LABEL_STREAM, NOISE_STREAM = 0, 1, 2  # fold_in constants of the per-seed sub-keys


MAX_SEED = 2**32 - 1  # seeds are folded into keys as uint32


MAX_SEEDS_PER_RUN = 10_000_000  # a seed list is materialised; beyond this it would exhaust host memory first


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
