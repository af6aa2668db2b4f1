"""Atomic output, output-path checks and file hashing, shared by every stage that writes artifacts.

A killed run must never leave a half-written profile or export folder behind,
so artifacts are assembled in a hidden temporary sibling folder and renamed
into place only once complete (a rename within one file system is atomic).

What else holds for every output of the tools:

* **One writer per output.** :func:`atomic_directory` holds an advisory lock
  (``fcntl.flock`` on ``.NAME.lock`` next to the target) from before its
  existence check until after the rename, so two runs writing the same new
  ``--out`` cannot both succeed: the second is refused while the first writes,
  and finds the folder existing afterwards. The kernel drops the lock when a
  process dies, so a SIGKILL never leaves a stale lock.
* **Leftovers of killed runs are removed.** Under the lock, temporary siblings
  ``.NAME.tmp-*`` / ``.NAME.old-*`` can only belong to runs that died; they
  are deleted (and reported through ``log``).
* **--force replaces only what the tool wrote.** An existing target is replaced
  only when it is a folder that ``recognise`` accepts (a profile folder with its
  profile.json, an export folder with its manifest.json...), never a plain file
  or an unrelated folder.
* **Permissions follow the umask**, as a plain ``mkdir``/``open`` would make them
  (``mkdtemp``/``mkstemp`` create 0700/0600).
* Single files are written with :func:`atomic_write_bytes`; ``overwrite=False``
  makes the final step an exclusive ``link`` that fails when the file appeared
  meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from ertacache.errors import UserError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def match_umask(root: str | os.PathLike) -> None:
    """Give ``root`` (a file or a folder tree) the permissions a plain mkdir/open would, links untouched."""
    mask = current_umask()
    root = Path(root)
    if root.is_symlink():
        return
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames:
            if not os.path.islink(os.path.join(dirpath, name)):
                os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                keep_x = os.stat(full).st_mode & 0o100
                os.chmod(full, (0o777 if keep_x else 0o666) & ~mask)


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Hold the advisory lock of ``target`` (``.NAME.lock`` beside it); refuse when another run holds it."""
    target = Path(target).absolute()
    lock = target.parent / f".{target.name}.lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"another run is writing the {what} {target} right now (it holds {lock}); wait for "
                                "it to finish or choose another --out") from None
            raise
        try:  # the holder before us may have unlinked the lock file; then lock the new one
            same = os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


def remove_stale_siblings(target: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[Path]:
    """Delete ``.NAME.tmp-*`` / ``.NAME.old-*`` beside ``target`` (call it holding :func:`output_lock`)."""
    target = Path(target).absolute()
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for stale in target.parent.glob(f".{target.name}.{kind}-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            removed.append(stale)
            if log is not None:
                log(f"removed {stale}, left behind by a run that was killed")
    return removed


def check_replaceable(target: Path, force: bool, what: str, recognise: Callable[[Path], bool] | None = None,
                      kind: str = "folder") -> None:
    """An existing ``target`` may be replaced only with ``force`` and only when it is what this tool writes."""
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise UserError(f"{what} {target} already exists; pass --force to replace it or choose another --out")
    if target.is_symlink():
        raise UserError(f"{what} {target} is a symbolic link; --force does not replace links: remove it yourself "
                        "or choose another --out")
    if kind == "folder":
        a = "an" if what[:1].lower() in "aeiou" else "a"
        if not target.is_dir():
            raise UserError(f"{target} is a file, not {a} {what}; --force replaces only {a} {what} this tool wrote: "
                            "remove it yourself or choose another --out")
        if recognise is not None and not recognise(target):
            raise UserError(f"{target} is a folder but not {a} {what} (--force replaces only {a} {what} this tool "
                            "wrote, never other folders); choose another --out or remove it yourself")
    elif target.is_dir():
        raise UserError(f"{target} is a folder; --out here names a file: choose a file name")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, force: bool = False, what: str = "output folder",
                     recognise: Callable[[Path], bool] | None = None,
                     log: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target``, on any error it is deleted.

    An existing ``target`` is refused unless ``force`` and ``recognise(target)`` (see the module
    docstring); with ``force`` it is swapped out only after the new folder is complete.
    """
    target = Path(target).absolute()
    check_replaceable(target, force, what, recognise)  # cheap refusal before taking the lock
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {target.parent} for the {what} ({e.strerror}); choose another "
                        "--out") from None
    with output_lock(target, what):
        check_replaceable(target, force, what, recognise)  # again: another run may have finished meanwhile
        remove_stale_siblings(target, log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            match_umask(tmp)
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "replaced")
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _raise_disk_error(e, target, what)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


#: errors of the disk, not of the program: reported as a UserError naming the output and the fix
_DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied"}


def _raise_disk_error(e: OSError, target: Path, what: str) -> None:
    """Raise a UserError for a disk error (full, read-only, no permission); return for anything else."""
    if e.errno in _DISK_ERRNOS:
        raise UserError(f"cannot write the {what} {target}: {_DISK_ERRNOS[e.errno]} ({e.strerror}); nothing was "
                        "left half-written. Free space or choose another --out") from e


#: a single-file write takes milliseconds (the bytes are ready before the temporary file is made), so a
#: temporary sibling older than this belongs to a killed run, never to a writer still at work
STALE_FILE_TEMP_S = 60.0


def _remove_stale_file_temps(path: Path) -> None:
    now = time.time()
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if stale.is_file() and not stale.is_symlink() and now - stale.lstat().st_mtime > STALE_FILE_TEMP_S:
                stale.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> None:
    """Write a single file atomically (temporary file in the same folder, then rename).

    ``overwrite=False``: the final step is ``os.link``, which fails if ``path`` exists by then,
    so two writers of one new file cannot both succeed. The file gets the umask's permissions.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_file_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        _raise_disk_error(e, path, "file")
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise UserError(f"{path} already exists; pass --force to replace it or choose another --out") from None
            os.unlink(tmp)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_disk_error(e, path, "file")
        raise
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


def copy_tree_no_links(src: str | os.PathLike, dest: str | os.PathLike, ignore_hidden: bool = False) -> None:
    """Copy a folder of plain files; a symbolic link anywhere in it is refused, never followed or copied.

    Used where a folder's contents are put under another artifact's hash (the profile copied
    into an export folder, the export folder copied into a Triton repository): following a link
    would copy whatever it points at, anywhere on the machine.
    """
    src, dest = Path(src), Path(dest)
    if src.is_symlink():
        raise UserError(f"{src} is a symbolic link; give the folder itself")
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for name in [*dirnames, *filenames]:
            full = Path(dirpath) / name
            if full.is_symlink():
                raise UserError(f"{full} is a symbolic link; the folder {src} must hold plain files only (copy the "
                                "target in, or remove the link)")

    def ignore(_dir, names):
        return [n for n in names if n.startswith(".")] if ignore_hidden else []

    shutil.copytree(src, dest, symlinks=True, ignore=ignore)


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a ``.safetensors`` file (missing, truncated, not safetensors), or None if it looks whole.

    Reads only the header. A safetensors file is an 8-byte little-endian header length N, N bytes
    of JSON naming every tensor's byte range, then the data, which the format requires to end at
    the largest range end: so a file cut short (an interrupted copy or download, a disk that filled
    up) has a size below 8 + N + end and is caught here, before a loader fails somewhere inside.
    """
    import json
    import struct

    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size < 8:
        return f"{path} is truncated ({size} bytes, not even a safetensors header)"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            return f"{path} is truncated ({size} bytes; its header alone says {8 + n}) or not a safetensors file"
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return f"{path} is not a readable safetensors file (its header is not valid JSON with data_offsets)"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"{path} is truncated ({size} bytes where its header describes {expected})"
    if size > expected:
        return f"{path} is corrupt ({size} bytes where its header describes {expected})"
    return None
