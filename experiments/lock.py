"""An advisory lock on an experiment's results in a directory.

``DIR/.<name>.lock`` is held with ``fcntl.flock`` for the whole run. The kernel
drops the lock when its process ends in any way (return, exception, ``kill -9``),
so a lock file left behind by a dead run is *stale*: the next run takes the lock
and says which process (pid, host) had left it. A live holder is named in the
refusal. The file holds ``pid host`` of its holder; it is removed on a normal
release.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

__all__ = ["ResultsLockedError", "ResultsLock"]


class ResultsLockedError(RuntimeError):
    """Another live run holds the lock on these results."""


def _read_holder(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class ResultsLock:
    """Exclusive, non-blocking lock on ``directory/.<name>.lock`` (module docstring).

    Use as a context manager; :attr:`stale` is the ``pid host`` text of a dead
    holder whose lock file was taken over (empty when none).
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.path = Path(directory) / f".{name}.lock"
        self.stale = ""
        self._fd: int | None = None

    def acquire(self) -> ResultsLock:
        """Take the lock or raise :class:`ResultsLockedError` naming its holder."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_holder(self.path) or "unknown"
                raise ResultsLockedError(
                    f"{self.path.parent} is in use by another run of this experiment "
                    f"(pid host: {holder}; lock file {self.path}); wait for it to finish, "
                    "or choose another --out") from None
            # the previous holder may have unlinked the file between our open and flock
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        # a file we could lock but that names a holder: that holder died without releasing
        self.stale = os.read(fd, 4096).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResultsLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
