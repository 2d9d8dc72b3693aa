"""Split a CPU host into several JAX devices, so that all its cores compute.

XLA:CPU runs a program on one device as a sequence of kernels, each spread over the cores by its own thread
pool. This network's kernels are small (16-256 channels, 8x8-32x32 images), so one device keeps a 2-core machine
only ~1.2 cores busy (`/usr/bin/time` of the quickstart: 120 % CPU). Given N CPU devices, the drivers shard
the batch over them exactly as over N GPUs (jit + NamedSharding), and N programs run side by side. Measured on 2
cores, alternated call by call (2026-12-03, benchmarks/cpu_devices_ab.py): the denoiser's forward at batch 64
662 -> 927 img/s, the NFE-35 sampler 14.3 -> 23.4, the train step at batch 32 184 -> 204. Results do not depend on the device count (the drivers' invariance, tested).

`choose()` picks the count, `split_host()` applies it before JAX starts its backend. main.py does both on CPU runs
(`--cpu_devices`, default auto); an explicit `--xla_force_host_platform_device_count` in $XLA_FLAGS or
$JAX_NUM_CPU_DEVICES wins over both.
"""

from __future__ import annotations

import os
import re

# Auto never goes past this: the split was measured on 2 cores only, and each device holds a full replica of
# the parameters and optimizer state.
MAX_AUTO = 8
_XLA_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or `taskset`'s limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def preset_count() -> int | None:
    """The CPU device count the environment already fixes ($JAX_NUM_CPU_DEVICES, or the XLA flag), else None."""
    if os.environ.get("JAX_NUM_CPU_DEVICES", "").strip():
        return int(os.environ["JAX_NUM_CPU_DEVICES"])
    found = _XLA_COUNT.findall(os.environ.get("XLA_FLAGS", ""))
    return int(found[-1]) if found else None  # XLA reads the last occurrence


def choose(requested: str | int, cores: int, batch: int | None = None) -> int:
    """How many CPU devices to make.

    Args:
      requested: 'auto', or a positive count (an int or its string).
      cores: usable cores (`usable_cores()`).
      batch: the global batch the run shards over the devices, when one is fixed (training); auto then picks
        a count that divides it.
    Returns:
      The count; for 'auto' the largest power of two <= min(cores, MAX_AUTO) that divides `batch` (1 at least).
    Raises:
      ValueError: `requested` is neither 'auto' nor a positive integer.
    """
    if str(requested).strip().lower() != "auto":
        try:
            count = int(requested)
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"--cpu_devices={requested!r}: give a positive number of devices, or auto")
        return count
    count = 1
    while 2 * count <= min(cores, MAX_AUTO) and (batch is None or batch % (2 * count) == 0):
        count *= 2
    return count


def split_host(count: int) -> int:
    """Make JAX's CPU backend `count` devices, unless the environment fixes the count (`preset_count()`).

    Call before anything starts a JAX backend. Returns the count the backend will have.
    Raises:
      RuntimeError: a JAX backend already started (the count can no longer change).
    """
    preset = preset_count()
    if preset is not None:
        return preset
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError as e:
        raise RuntimeError(f"cannot split the CPU into {count} devices: a JAX backend already started ({e})") from e
    return int(count)
