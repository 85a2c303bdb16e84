"""One writer per run folder: an exclusive lock held for the life of a training run.

Two runs on the same ``--out`` would interleave their log lines and overwrite
each other's checkpoints. The lock is ``flock`` on ``<out>/.lock``, which the
kernel releases when the holder exits in any way (crash and SIGKILL included),
so a lock left by a dead process is never mistaken for a live one: the file
stays, and the next run simply takes it. The holder writes its PID into the file
so that a refused run can name it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import OutputError

LOCK_NAME = ".lock"


class RunLock:
    """``with RunLock(out):`` holds the run folder's lock, or raises OutputError naming the holder."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the run lock {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"{self.path.parent} is in use by another training run (PID {holder}); "
                f"wait for it to finish or choose another --out"
            ) from None
        except OSError as e:
            os.close(fd)
            raise OutputError(f"cannot lock {self.path}: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:  # the PID goes first, so a reader never sees a finished run named as the holder
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
