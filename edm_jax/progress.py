"""Progress text for long runs: step, total, percent, elapsed and ETA, and a line when a long phase starts.

The training loop prints a tick line every `tick_kimg` (the reference's schedule, which fixes metrics and
snapshots) and, between ticks, a progress line whenever `every_sec` seconds have passed, so that a CPU-sized
batch whose kimg tick takes hours still reports within a minute. Plain lines: they go to log.txt as well.
"""

from __future__ import annotations

import contextlib
import logging
import time

__all__ = ["hms", "Progress", "phase"]

log = logging.getLogger(__name__)


def hms(seconds: float) -> str:
    """1h 02m 03s / 4m 05s / 6s."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Rate and ETA over the steps this process runs (start_step -> total), timed from `begin()`."""

    def __init__(self, start_step: int, total: int, every_sec: float = 30.0):
        self.start_step, self.total, self.every_sec = start_step, total, every_sec
        self.t0 = self._last = time.time()
        self._rate_from = None  # (step, time) after the first step: its compilation is not the rate

    def begin(self, step: int):
        """Call after the first step finished (compiled): the rate is measured from here."""
        self._rate_from = (step, time.time())
        self._last = time.time()

    def text(self, step: int) -> str:
        """'step 120/1000 (12.0%) elapsed 1m 30s ETA 19m 27s'."""
        now = time.time()
        eta = "?"
        if self._rate_from is not None and step > self._rate_from[0]:
            rate = (step - self._rate_from[0]) / max(now - self._rate_from[1], 1e-9)
            eta = hms((self.total - step) / rate)
        return (f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.1f}%) elapsed {hms(now - self.t0)} "
                f"ETA {eta}")

    def due(self) -> bool:
        """True once every `every_sec` seconds (then the caller prints a line)."""
        if time.time() - self._last < self.every_sec:
            return False
        self._last = time.time()
        return True

    def ticked(self):
        """A tick line was printed: the next progress line is `every_sec` from now."""
        self._last = time.time()


@contextlib.contextmanager
def phase(what: str):
    """Log '<what>...' when a long phase starts and '<what>: done in X' when it ends."""
    log.info("%s...", what)
    t0 = time.time()
    yield
    log.info("%s: done in %s", what, hms(time.time() - t0))
