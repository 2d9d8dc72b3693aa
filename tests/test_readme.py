"""The README's Python snippet runs as written and says what it claims."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_sampler_snippet_runs_and_samples_the_gaussian():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    snippet = next(b for b in blocks if "edm_sampler" in b)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    x = np.asarray(namespace["x"])
    assert x.shape == (10000, 3)
    np.testing.assert_allclose(x.mean(0), [-1, 0, 1], atol=0.03)
    np.testing.assert_allclose(x.std(0), 0.53, atol=0.01)  # the value the README quotes for 18 steps
