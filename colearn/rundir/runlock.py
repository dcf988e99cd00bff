"""One process at a time in a run directory: an OS file lock on RUN/.lock holding the owner's pid.

The lock is `flock` on an open file, so the kernel drops it when the process ends however it ends (a killed
run never leaves a stale lock behind); the pid in the file only names the holder in the refusal.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from colearn.errors import ColearnError

LOCK_FILE = ".lock"


class RunLock:
    """Holds `run_dir` for the block; entering raises ColearnError naming the holder when another process has it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a program this run starts must not inherit the lock and keep it after the run ends
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise ColearnError(in_use_message(self.run_dir, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # a forked child (rollout.vectorization=async workers) would share the lock and keep it after the run dies
        os.register_at_fork(after_in_child=self._drop_in_child)
        return self

    def _drop_in_child(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the child's copy only: the parent still holds the lock
            self._fd = None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = None


def holder(run_dir: Path) -> int | None:
    """Returns the pid holding `run_dir` (0 when it is held but the pid is not written yet), None when it is free."""
    path = Path(run_dir) / LOCK_FILE
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    finally:
        os.close(fd)
    return None


def in_use_message(run_dir: Path, pid: int | None) -> str:
    who = f"process {pid}" if pid else "another process"
    return (
        f"run directory {str(run_dir)!r} is in use by {who}; wait for it to end (or stop it) "
        "before running or resuming in it"
    )


def _read_pid(fd: int) -> int:
    # the holder writes its pid right after locking: until then the file is empty or names the previous holder,
    # which has ended, so wait a moment for a live one
    for _ in range(50):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit() and _alive(int(text)):
            return int(text)
        time.sleep(0.02)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True
