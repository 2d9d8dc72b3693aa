"""Shared test set-up: 8 simulated CPU devices, highest matmul precision, fixture access."""

import os

# Must happen before JAX initialises its backends (DESIGN.md: tests run on 8 simulated CPU devices).
# XLA's CPU backend optimisation off here and in the `main.py` subprocesses that inherit it: compiling is
# half of the suite's CPU time (cold cache 1593 s, warm 758 s, file by file), and the test programs are
# tiny. Measured file by file, cold: 1593 -> 1350 CPU s; compile-bound files gain most (test_process
# 78 -> 40 s, test_train 124 -> 80 s), the Inception-bound ones lose some (test_evaluate 25 -> 36 s).
# Results move by rounding only: every comparison is against a tolerance or between programs built alike.
# Eigen's intra-op threads off: 8 simulated devices on 2 shared cores spent much of the suite spinning in
# them (test_sampling 69 -> 28 CPU s, sys 20 -> 2 s; test_networks + test_fid 106 -> 75 s).


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (in-process and `main.py` subprocesses) with `devices` CPU devices."""
    return (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
            "--xla_cpu_multi_thread_eigen=false")


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# glibc's defaults, not main.py's single never-trimmed heap (edm_jax/host_memory.py): that setting pays off in a
# long run's steady state, but the suite is mostly compiling, whose threads then contend for the one arena.
# Measured on tests/test_main.py, cold cache, alternated: 91 and 94 s off against 100 and 100 s on.
# tests/test_host_memory.py sets it explicitly in its own processes.
os.environ.setdefault("EDM_JAX_HOST_MALLOC", "off")

import json
import pathlib
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache for the whole run, both workers and every `main.py` subprocess: many tests
# build the same small programs (train steps, samplers) from fresh closures, which JAX's in-memory cache
# cannot match but the persistent cache, keyed by the program text, can. A test of the cache uses its own.
os.environ.setdefault("EDM_JAX_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "edm-jax-tests-xla"))
from edm_jax import compile_cache  # noqa: E402  (after the XLA flags above)

compile_cache.enable()

_REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("EDM_JAX_FIXTURES", _REPO.parent / "shared" / "fixtures"))


def jit_fast(fun, **kwargs):
    """`jax.jit` with XLA's CPU backend optimisation off. The test programs are tiny, so LLVM's passes cost
    seconds of compile time and save milliseconds of run time; results move by rounding only, far inside
    every tolerance the tests assert (float64 parity cases sit at 1e-15 against bounds of 1e-10)."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def load_fixture(name):
    """Return the named `../shared/fixtures` npz as a dict; strings decoded, `config` parsed as JSON."""
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"fixture {path} is missing: tests need ../shared/fixtures beside the repo "
                    "(or EDM_JAX_FIXTURES pointing at it)")
    with np.load(path) as z:
        out = {}
        for key in z.files:
            value = z[key]
            out[key] = str(value) if value.dtype.kind == "U" and value.ndim == 0 else value
    for key in list(out):
        if key == "config" or key.endswith("/kwargs"):
            out[key] = json.loads(out[key])
    return out


def rel_err(a, b):
    """Relative L2 error ‖a − b‖ / ‖b‖ in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def nchw_to_nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def nhwc_to_nchw(x):
    return np.transpose(np.asarray(x), (0, 3, 1, 2))


def pytest_configure(config):
    config.addinivalue_line("markers", "packaging: builds and installs the package offline (tests/test_packaging.py)")
