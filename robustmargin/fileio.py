"""Atomic file writes: a temp file in the same folder, flushed to disk, then a rename, so a kill or a power
loss never leaves half a file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_path(path: str | Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to fill a temp file beside `path`, flush it, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are ordinary files
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_csv(path: str | Path, frame) -> Path:
    """Write a pandas DataFrame as CSV without the index; floats keep full precision."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.17g"))
