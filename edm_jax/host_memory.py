"""Keep freed host memory for reuse, so that XLA:CPU's scratch buffers cost no page faults on every call.

On a CPU, each execution of a compiled program allocates its scratch space (69 MB for the quickstart's train
step) and frees it at the end. glibc serves blocks that large with a fresh `mmap` and returns them with
`munmap`, and the worker threads' arenas cannot hold them at all, so every step faulted in ~17,000 new zeroed
pages: a fifth of the step's CPU time was the kernel's (measured: 2.1 s of system time in 40 steps; 0.2 s
after). `keep_freed_memory()` tells glibc to serve every block from one heap that it never trims, so the
second step reuses the first step's pages. The process's memory then stays at its peak instead of shrinking
between calls, which is what a training run's steady state looks like anyway.

Only for runs on the CPU: on a GPU or TPU host the device holds the big buffers and the host's many data
threads are better served by glibc's per-thread arenas. `$EDM_JAX_HOST_MALLOC=off` turns it off.
main.py calls it first thing, before any thread is started (a thread keeps the arena it first used).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

ENV = "EDM_JAX_HOST_MALLOC"
OFF = ("off", "none", "false", "0")
# glibc's <malloc.h> parameter numbers, and the values: one arena, no mmap'd blocks, trim only above 2 GiB free.
_SETTINGS = ((-8, 1), (-4, 0), (-1, 2**31 - 1))  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU: $JAX_PLATFORMS says so, or no GPU/TPU plugin is installed.

    Decided from the environment and the installed packages only, because JAX must not be started yet.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return not any(n.lower().startswith(_ACCELERATOR_PLUGINS) for n in names)


def keep_freed_memory(force: bool = False) -> bool:
    """Set glibc's allocator to reuse freed blocks (see the module docstring); True when it did.

    Does nothing (False) off Linux/glibc, when $EDM_JAX_HOST_MALLOC is off, or, unless `force`, when JAX will
    run on an accelerator. Call before JAX or any other library starts its threads.
    """
    if os.environ.get(ENV, "").strip().lower() in OFF or not sys.platform.startswith("linux"):
        return False
    if not (force or runs_on_cpu()):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
