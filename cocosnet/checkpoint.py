"""Crash-safe checkpoint files: atomic writes, checksums in the name, the newest K kept.

A training state is written as `state_<step>.<sha256>.pt`: serialised in memory, written to a
hidden temporary file in the same folder, flushed and fsynced, read back and compared with the
checksum, then renamed into place with os.replace (atomic on POSIX) and the folder fsynced. A
crash at any point leaves either the previous files only or the complete new one; the checksum
in the name catches a file damaged later. `latest()` returns the newest file whose checksum
matches, skipping (and naming) damaged ones, and temporary files left by a crash are removed
at the next save.

Every file is read with `load` (torch.load with weights_only=True): tensors and plain Python data
only, so a file from elsewhere cannot run code; anything else is refused with a ValueError.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_STATE_RE = re.compile(r"^state_(\d+)\.([0-9a-f]{64})\.pt$")
_TMP_PREFIX = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that `path` is never seen partially written.

    After writing, the temporary file is read back and compared byte-for-byte (through its
    SHA-256) before it replaces `path`.
    """
    path = Path(path)
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if hashlib.sha256(tmp.read_bytes()).digest() != hashlib.sha256(data).digest():
        tmp.unlink()
        raise OSError(f"checkpoint {path}: the bytes read back differ from the bytes written")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(source: str | os.PathLike | io.BytesIO, what: str, map_location="cpu"):
    """torch.load(source) of tensors and plain data only; ValueError naming `what` for anything else.

    Never unpickles arbitrary objects: a pickle that would construct other classes or call
    functions is refused before any of its code runs.
    """
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what} holds objects other than tensors and plain Python data; refusing to unpickle "
                         f"it, since that could run code from the file ({first})") from None


def serialize(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save(obj, path), atomically (for the reference-style `<epoch>_net_G.pth` files)."""
    write_atomic(path, serialize(obj))


class CheckpointManager:
    """The training-state files of one run folder: `save(state, step)`, `latest()`, `paths()`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep

    def paths(self) -> list[Path]:
        """The state files, oldest first (by step)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STATE_RE.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict, step: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        for p in self.directory.glob(f"{_TMP_PREFIX}state_*"):  # left by a run killed mid-save
            p.unlink(missing_ok=True)
        data = serialize(state)
        path = self.directory / f"state_{step:09d}.{hashlib.sha256(data).hexdigest()}.pt"
        write_atomic(path, data)
        for old in [p for p in self.paths() if p != path][: max(0, len(self.paths()) - self.keep)]:
            old.unlink(missing_ok=True)
        return path

    def latest(self, map_location="cpu") -> tuple[dict, Path] | None:
        """The newest intact state and its path, or None where there is none."""
        for path in reversed(self.paths()):
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != _STATE_RE.match(path.name).group(2):
                log.warning("checkpoint %s is damaged (checksum mismatch); trying an older one", path)
                continue
            return load(io.BytesIO(data), f"training state {path}", map_location), path
        return None
