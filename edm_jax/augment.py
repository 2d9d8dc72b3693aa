"""`edm_jax.augment` is `edm_jax.diffusion.augment` (the papers' math moved into edm_jax/diffusion/; this public path
stays importable, DESIGN.md). The module object is the same, so private names and patches agree."""

import sys

from edm_jax.diffusion import augment as _module

sys.modules[__name__] = _module
