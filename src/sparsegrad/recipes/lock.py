"""An exclusive lock on an output folder, held while a command writes there.

Two commands pointed at one folder would overwrite each other's checkpoints; the second is refused
at once, naming the holder. The lock is an advisory `flock` on `<folder>/.lock`: the operating
system releases it when its process ends, however it ends (kill -9 included), so a lock left by a
dead process is simply taken over. The file keeps the holder's pid, host and start time for the
message; the holder removes it on release, so a finished run leaves no lock file. (POSIX only: where
`fcntl` is missing the lock is not taken.)

Removing a lock file is safe because a taker checks, once it holds the lock, that the file it locked
is still the one at the path (a file removed meanwhile is let go, and the path opened again).

`waiting_lock(path)` is the other kind: work that several processes may reach at once but only one
should do (the bases that a benchmark's parallel runs share): the others wait, then find it done.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

LOCK_FILE = ".lock"


class FolderInUseError(ValueError):
    """Another live process holds the output folder."""


class FolderLock:
    """`with FolderLock(folder):` — the folder is this process's until the block ends."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._file = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open as long as the lock)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = _describe(f.read())
                f.close()
                raise FolderInUseError(f"--output-dir {self.folder} is in use by another sparsegrad run ({holder}): "
                                       "wait for it to end, or choose another --output-dir") from None
            if _still_at(f, self.path):
                break
            f.close()  # its holder removed it as we took it: take the path's new file
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv}))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            import fcntl

            self.path.unlink(missing_ok=True)  # while held: whoever takes the path next makes a new file
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _still_at(f, path: Path) -> bool:
    """Is the open file `f` the file at `path` (not one removed since it was opened)?"""
    try:
        return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "its details are not recorded yet"


@contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[None]:
    """`with waiting_lock(path):` — wait until no other process (or thread) holds `path`'s lock, then hold it.
    The lock file is `path` itself, created if missing; released however the holder ends."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(path, "a", encoding="utf-8")  # noqa: SIM115 (its own open file: flock excludes other threads too)
        fcntl.flock(f, fcntl.LOCK_EX)
        if _still_at(f, path):
            break
        f.close()  # removed by the holder we waited for: lock the path's new file
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while held, as FolderLock.release
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
