"""The old path of `edm_jax.generation` (sampling at scale), importable with every public name it had: the
package splits it along its sections — seeds.py, sample_fn.py, outputs.py, loop.py, models.py."""

from edm_jax.generation import *  # noqa: F401,F403
from edm_jax.generation import SAMPLERS, __all__  # noqa: F401 (re-exported, as before)
from edm_jax.generation.loop import GRID_IMAGES  # noqa: F401
from edm_jax.generation.seeds import MAX_SEED, MAX_SEEDS_PER_RUN  # noqa: F401
