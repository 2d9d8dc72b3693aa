"""edm-jax: EDM (Karras et al. 2022) in JAX/Flax.

The library is a set of small pure modules; import what you need:
`edm_jax.precond`, `edm_jax.losses`, `edm_jax.schedules`, `edm_jax.sampling`,
`edm_jax.networks`, `edm_jax.augment`, `edm_jax.convert`.

The package reports through standard logging (the `edm_jax` logger and its children) and never writes to
the console itself: `logging.basicConfig(level=logging.INFO)` shows its progress lines.
"""

__version__ = "0.1.0"
