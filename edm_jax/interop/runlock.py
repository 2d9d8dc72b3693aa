"""One run per workdir: an exclusive lock file `<workdir>/run.lock` held for the whole run.

The lock is an `fcntl.flock` on the file, so the kernel releases it when the holding process dies for any
reason (SIGKILL, OOM, power loss of a client): a lock left behind by a dead process is simply taken over.
The file records who holds it ({'pid', 'host', 'time'}) so that a refused run can say which process to
wait for. Where the filesystem has no flock (some network mounts), the recorded pid decides instead: a
lock of a pid that is not alive on this host is stale and taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

__all__ = ["WorkdirLock", "WorkdirLockedError"]

log = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds `<workdir>/run.lock`; raises WorkdirLockedError naming the holder."""

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
        self._fd = None

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.loads(f.read() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        previous = self._holder()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise WorkdirLockedError(self._refusal(previous)) from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            # No flock here: trust the recorded pid, if it is ours to check.
            pid, host = previous.get("pid"), previous.get("host")
            if pid and host == socket.gethostname() and _pid_alive(int(pid)) and int(pid) != os.getpid():
                os.close(fd)
                raise WorkdirLockedError(self._refusal(previous)) from None
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.info("taking over the lock of %s (pid %s on %s, no longer running)", self.path,
                     previous.get("pid"), previous.get("host"))
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _refusal(self, holder: dict) -> str:
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(holder["time"])) if holder.get("time") else ""
        return (f"{os.path.dirname(self.path)} is in use by another run ({who}{since}); wait for it to finish or "
                f"stop it, or give this run a new --workdir.")

    def release(self):
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
