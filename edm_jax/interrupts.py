"""Graceful stops for training: the first SIGINT/SIGTERM asks the loop to save and exit; a second stops at once.

Python runs signal handlers only between bytecodes of the main thread, which can sit for minutes inside
an XLA compilation or a sampler call, and a KeyboardInterrupt raised inside a garbage-collection callback
is printed and dropped. So the handlers do nothing themselves: `signal.set_wakeup_fd` makes the C-level
handler write each signal's number to a socket the moment it arrives, and a watcher thread reads it. The
first signal sets a flag the loop polls after every step and prints one line; a second one ends the process
on the spot (exit status 130) without saving.

Multi-process runs must stop at the same step on every process, or the next collective hangs: JAX's
preemption sync point (`multihost_utils.reached_preemption_sync_point`, driven by the coordination service,
which catches SIGTERM itself) covers SIGTERM, and `agree` all-gathers the local flags at tick boundaries.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from typing import Optional

import jax

__all__ = ["GracefulStop"]

log = logging.getLogger(__name__)
EXIT_AT_ONCE = 130  # the shell's status for a process ended by SIGINT


class GracefulStop:
    """`with GracefulStop() as stop:` ... `if stop.requested(step, at_tick): save; exit`.

    Outside the main thread (where signals cannot be handled) it installs nothing and never requests.
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.multi = jax.process_count() > 1
        # Under the coordination service SIGTERM is JAX's preemption notice: leave its handler in place.
        self.signals = tuple(s for s in signals if not (self.multi and s == signal.SIGTERM))
        self.signal_name: Optional[str] = None
        self._event = threading.Event()
        self._old = {}
        self._old_fd = None
        self._sockets = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        read, write = socket.socketpair()
        write.setblocking(False)
        self._sockets = (read, write)
        for s in self.signals:
            self._old[s] = signal.signal(s, lambda *_: None)  # the work is done by the watcher thread
        self._old_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), daemon=True, name="edm_jax-signals").start()
        return self

    def _watch(self, read):
        while True:
            try:
                data = read.recv(16)
            except OSError:
                return
            if not data:
                return
            for number in data:
                if number not in [int(s) for s in self.signals]:
                    continue
                name = signal.Signals(number).name
                if self._event.is_set():
                    log.warning("second %s: stopping now, without saving (the newest checkpoint stays)", name)
                    for handler in logging.getLogger("edm_jax").handlers:  # whoever shows the line (main.py)
                        handler.flush()
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(EXIT_AT_ONCE)
                self.signal_name = name
                self._event.set()
                log.warning("%s received: finishing this step, then saving a checkpoint and exiting (press "
                            "Ctrl-C again to stop at once, without saving)", name)

    def requested(self, step: int, at_tick: bool) -> bool:
        """Whether to stop after `step`, the same answer on every process. Call after every step."""
        if not self.multi:
            return self._event.is_set()
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            self.signal_name = self.signal_name or "SIGTERM"
            return True
        if at_tick:  # every process reaches tick boundaries at the same step
            flags = multihost_utils.process_allgather(jax.numpy.asarray(self._event.is_set()))
            if bool(jax.numpy.any(flags)):
                self.signal_name = self.signal_name or "SIGINT (on another process)"
                return True
        return False

    def __exit__(self, *exc):
        if self._sockets is None:
            return
        signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        for sock in self._sockets:
            sock.close()
        self._sockets = None
