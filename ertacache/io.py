"""Atomic folder output and file hashing, shared by every stage that writes artifacts.

A killed run must never leave a half-written profile or export folder behind,
so artifacts are assembled in a hidden temporary sibling folder and renamed
into place only once complete (a rename within one file system is atomic).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ertacache.errors import UserError


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False, what: str = "output folder") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target``, on any error it is deleted.

    An existing ``target`` is refused unless ``force``; with ``force`` it is
    swapped out only after the new folder is complete.
    """
    target = Path(target).absolute()
    if target.exists() and not force:
        raise UserError(f"{what} {target} already exists; pass --force to replace it or choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "replaced")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a single file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
