"""Small helpers shared by the library and the recipes: atomic files and folders, strict JSON,
file hashes, moving a batch to a device. One helper per concern."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch


class DiskFullError(OSError):
    """A write failed because the file system is full (or the user's quota is spent)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, says the disk is full. torch.save reports it
    as its own RuntimeError with the OSError as context; safetensors as text with "os error 28"."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "os error 28" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error, the temporary file
    or folder replaces `path` in one rename (a reader sees the old one or the new one, never half of
    either). On an error the temporary is removed and `path` is left as it was; a full disk is
    raised as DiskFullError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    remove_stale_temporaries(path.parent, f".{path.name}.tmp*")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():  # os.replace cannot replace a non-empty folder
            _remove(path)
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err) and not isinstance(err, DiskFullError):  # `finally` removes the temporary
            raise DiskFullError(f"no space left on device while writing {path} (the partial file "
                                "was removed, what was there before is kept): free space on that disk, or "
                                "choose another --output-dir, then run again with --resume") from err
        raise
    finally:
        _remove(tmp)


def remove_stale_temporaries(folder: Path, pattern: str) -> None:
    """Remove the temporaries of `atomic_path` matching `pattern` in `folder` whose writer is dead
    (killed mid-write); never one a live process is writing."""
    for stale in folder.glob(pattern):
        pid = stale.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def strict_json(obj):
    """`obj` with every NaN / infinity replaced by None (null): what json.dumps writes stays valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """`obj` as strict JSON (non-finite numbers become null), atomically."""
    write_text_atomic(path, json.dumps(strict_json(obj), indent=2, default=str, allow_nan=False) + "\n")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def to_device(batch: Mapping, device: torch.device | str) -> dict:
    """The batch with every tensor on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
