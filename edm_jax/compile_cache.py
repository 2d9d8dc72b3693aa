"""JAX's persistent compilation cache, on by default for every command.

Compiling the train step, the samplers and the grid sampler is most of a short run's start-up on a CPU (about a
minute for the quickstart). XLA's executables depend only on the program, the compile options and the devices,
so a second run of the same command can load them from disk instead of compiling them again. The cache lives in
a user cache folder, shared by all runs of all checkouts (JAX keys every entry by a hash of all of that and of
its own version, so entries never mix); `--compilation_cache=off` turns it off and a path moves it.
"""

from __future__ import annotations

import logging
import os
import pathlib

import jax

log = logging.getLogger(__name__)

ENV = "EDM_JAX_COMPILATION_CACHE"
OFF = ("off", "none", "false", "0")
MAX_BYTES = 4 << 30  # the quickstart needs ~50 MB; a week of varied runs stays far below this


def default_dir() -> str:
    """$EDM_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/edm-jax/xla, else ~/.cache/edm-jax/xla."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(pathlib.Path.home(), ".cache")
    return os.path.join(base, "edm-jax", "xla")


def enable(where: str | None = None) -> str | None:
    """Point JAX's persistent compilation cache at `where` (default: `default_dir()`); "off" turns it off.

    Every program is cached, however short its compile: on a CPU the many small ones (the EMA update, the
    metrics reduction, the sampler's plan) add up to seconds. Returns the folder in use, or None when off.
    Call before the first compilation; later calls only move the cache.
    """
    where = default_dir() if where in (None, "") else where
    if str(where).lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(where, exist_ok=True)
    except OSError as e:  # a read-only home must not stop a run: it only compiles everything again
        log.warning("compilation cache off: cannot create %s (%s)", where, e)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)  # least recently used entries go first
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(where)


def write_from_every_cpu_process() -> None:
    """Let every process of a multi-process CPU run write its own persistent-cache entries.

    JAX writes entries only from process 0, so that hosts sharing a bucket do not contend. On CPU the cache
    key holds the process's own part of the topology, so process 0's entries never match process 1's
    programs: process 1 recompiled everything on every launch and reached the first collective tens of
    seconds after process 0 (seen as gloo rendezvous timeouts on a loaded machine). Each process's keys are
    its own, so their writes cannot collide. Accelerator runs keep JAX's rule. Relies on JAX 0.10's private
    `compiler._cache_write` (pinned in requirements.txt); without it this does nothing.
    """
    from jax._src import compilation_cache, compiler, config, distributed

    original = getattr(compiler, "_cache_write", None)
    if original is None or getattr(original, "_edm_jax_every_process", False):
        return

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if distributed.global_state.process_id == 0 or backend.platform != "cpu":
            return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        if host_callbacks or compile_time_secs < config.persistent_cache_min_compile_time_secs.value:
            return None  # JAX's own rules for what is worth keeping
        try:
            compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                      int(compile_time_secs))
        except Exception as e:  # noqa: BLE001 (a cache that cannot be written only costs a recompile)
            log.warning("compilation cache: could not write %s (%s)", module_name, e)
        return None

    cache_write._edm_jax_every_process = True
    compiler._cache_write = cache_write
