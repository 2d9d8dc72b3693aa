"""Multi-process JAX: starting the distributed runtime, the one device mesh, and a peer watchdog.

Every mode of main.py calls `initialize()` first. It does nothing for a single-process run; otherwise it
starts `jax.distributed` from the environment (docs/multihost.md gives the launch recipes):

  JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i   explicit (any cluster, localhost)
  EDM_JAX_DISTRIBUTED=1                                                   JAX's auto-detection (SLURM, TPU
                                                                           VM pod slices, Open MPI)
  EDM_JAX_INIT_TIMEOUT=s (default 300)      how long to wait for all processes to reach the coordinator
  EDM_JAX_PEER_TIMEOUT=s (default 60)       how long a silent peer is tolerated before this process exits

Errors (a wrong id or count, an unreachable coordinator) are `DistributedError`s of one sentence; main.py
prints them. Once running, a daemon thread beats a counter in the coordinator's key-value store and watches
the peers' counters: a peer that died (SIGKILL, OOM, node loss) would otherwise leave this process blocked
in a collective forever, so the watchdog says why in one sentence (to `initialize(on_peer_lost=)`, which main.py
prints as its `error:` line; else to this module's logger, CRITICAL) and exits with status 3. XLA runs
collectives without the GIL, so the thread keeps running while the main thread waits.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from edm_jax import compile_cache

__all__ = ["DistributedError", "initialize", "make_mesh", "replicated", "replicate", "PEER_EXIT_STATUS"]

PEER_EXIT_STATUS = 3  # the exit status of a process whose peer stopped responding
_KEY = "edm_jax/watchdog"
log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """The multi-process environment is wrong or the coordinator cannot be reached."""


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The 1-D mesh, axis 'data', over `devices` (default: every device of every process).

    Ordered by (process, id), so each process's devices hold a contiguous slice of every batch: process p
    of P owns rows [p·B/P, (p+1)·B/P), which is what the data pipeline feeds it and what generate writes.
    On one process this is `jax.devices()`'s own order.
    """
    devices = jax.devices() if devices is None else list(devices)
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of `mesh` (parameters, train states)."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree, mesh: Mesh):
    """`tree` (arrays that every process holds whole, e.g. loaded parameters) placed on every device of `mesh`.

    On one process a `device_put`; across processes each builds the global array from its own host copy
    (`make_array_from_callback`), since `device_put` cannot address another process's devices.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree)


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"{name}={value!r} is not an integer; set it to a whole number") from None


def requested() -> bool:
    """Whether the environment asks for a multi-process run."""
    return os.environ.get("EDM_JAX_DISTRIBUTED", "") not in ("", "0") or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(on_peer_lost: Optional[Callable[[str], None]] = None) -> bool:
    """Start `jax.distributed` when the environment asks for it (module docstring); True if it did.

    Must run before anything touches a JAX backend. A no-op for single-process runs and when already
    initialised. Raises DistributedError with one sentence for a bad count/id or an unreachable coordinator.
    `on_peer_lost(sentence)`: told why, just before the watchdog ends the process (status 3); by default
    the sentence is logged (CRITICAL).
    """
    if not requested() or jax.distributed.is_initialized():
        return False
    address = os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    init_timeout = _env_int("EDM_JAX_INIT_TIMEOUT") or 300
    peer_timeout = _env_int("EDM_JAX_PEER_TIMEOUT") or 60
    if address is not None:  # explicit: all three or none, and a consistent pair
        if count is None or index is None:
            raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address} is set but JAX_NUM_PROCESSES and "
                                   "JAX_PROCESS_ID are not both set; set all three (or EDM_JAX_DISTRIBUTED=1 "
                                   "alone on SLURM/TPU)")
        if count < 1 or not 0 <= index < count:
            raise DistributedError(f"JAX_PROCESS_ID={index} is not in 0..{count - 1} for JAX_NUM_PROCESSES={count}; "
                                   "give each process a distinct id below the count")
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        # CPU collectives across processes need gloo (the default has none across processes).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        compile_cache.write_from_every_cpu_process()
    if address is not None and index != 0:
        _wait_for_coordinator(address, init_timeout)
    try:
        # JAX's own heartbeat outlives ours, so that our watchdog's sentence is what a user sees.
        jax.distributed.initialize(address, count, index, initialization_timeout=init_timeout,
                                   heartbeat_timeout_seconds=peer_timeout + 60)
    except Exception as e:  # noqa: BLE001 (whatever the runtime raises, the user needs the same sentence)
        where = address or "the auto-detected coordinator"
        raise DistributedError(
            f"could not start the distributed runtime with coordinator {where}, {count} process(es), this id "
            f"{index} ({type(e).__name__}: {_first_line(e)}); check that process 0 runs and is reachable at that "
            f"address, that every process has the same JAX_NUM_PROCESSES and a distinct JAX_PROCESS_ID") from None
    if jax.process_count() > 1:
        global _WATCHDOG
        _WATCHDOG = _Watchdog(peer_timeout, on_peer_lost)
        _WATCHDOG.start()
        previous_hook = sys.excepthook

        def hook(kind, value, tb):  # an uncaught error (a collective that lost its peer) waits for the watchdog
            wait_for_peers_on_error()
            previous_hook(kind, value, tb)

        sys.excepthook = hook
    return True


_WATCHDOG: Optional["_Watchdog"] = None


def wait_for_peers_on_error():
    """Before a multi-process run reports a fatal error: when a peer dies, the collective waiting for it
    usually fails first (gloo/NCCL: connection reset), seconds before the watchdog's timeout, and its error
    says nothing of the dead peer. Give the watchdog one timeout and a beat to name it — it exits the process
    itself, status 3 — and return if every peer is alive. A no-op on one process."""
    if _WATCHDOG is not None and not _WATCHDOG.stopped.is_set():
        time.sleep(_WATCHDOG.timeout * 1.25 + 1)


def _wait_for_coordinator(address: str, timeout: float):
    """Poll the coordinator's TCP port until it accepts, or raise DistributedError after `timeout` s.
    JAX's client aborts the whole process (no exception) when it cannot connect in time, so this
    check comes first to turn that case into a sentence."""
    import socket

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.monotonic() > deadline:
                raise DistributedError(f"the coordinator JAX_COORDINATOR_ADDRESS={address} did not answer within "
                                       f"{timeout:.0f} s ({e}); start process 0 there (or fix the address), or "
                                       "raise EDM_JAX_INIT_TIMEOUT") from None
            time.sleep(0.5)


class _Watchdog:
    """Beats `edm_jax/watchdog/<id>` about 4 times per timeout and exits the process when a peer's beat
    has not changed for `timeout` seconds, or the coordinator stopped answering. A peer that exits
    normally first marks itself done (atexit), which ends the watch on it."""

    def __init__(self, timeout: float, on_peer_lost: Optional[Callable[[str], None]] = None):
        from jax._src import distributed as jax_distributed

        self.on_peer_lost = on_peer_lost or log.critical  # main.py's prints the error line; else logged
        self.client = jax_distributed.global_state.client
        self.timeout = float(timeout)
        self.me, self.count = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()

    def start(self):
        atexit.register(self.finish)
        threading.Thread(target=self.run, name="edm-jax-watchdog", daemon=True).start()

    def finish(self):
        self.stopped.set()
        try:
            self.client.key_value_set(f"{_KEY}/{self.me}", "done", allow_overwrite=True)
        except Exception:  # noqa: BLE001 (the coordinator may be gone already; nothing to tell)
            pass

    def run(self):
        seen = {p: (None, time.monotonic()) for p in range(self.count) if p != self.me}
        beat = 0
        while seen and not self.stopped.wait(self.timeout / 4):
            beat += 1
            try:
                self.client.key_value_set(f"{_KEY}/{self.me}", str(beat), allow_overwrite=True)
            except Exception as e:  # noqa: BLE001 (the coordinator's process is gone)
                self._exit(f"the coordinator (process 0) stopped answering ({_first_line(e)})")
            now = time.monotonic()
            for p in list(seen):
                try:
                    value = self.client.key_value_try_get(f"{_KEY}/{p}")
                except Exception:  # noqa: BLE001 (NOT_FOUND until the peer's first beat)
                    value = None
                if value == "done":
                    seen.pop(p)
                elif value != seen[p][0]:
                    seen[p] = (value, now)
                elif now - seen[p][1] > self.timeout:
                    self._exit(f"process {p} of {self.count} sent no heartbeat for {self.timeout:.0f} s (it died "
                               "or hangs)")

    def _exit(self, why: str):
        if self.stopped.is_set():
            return
        self.on_peer_lost(f"process {self.me} stops because {why}; rerun all processes with the same command "
                          "to resume from the last complete checkpoint")
        os._exit(PEER_EXIT_STATUS)


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
