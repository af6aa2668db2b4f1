"""manifest.json: writing the self-description of an export folder.

The reading side (typed, validated: :class:`ertacache.contract.ExportManifest`) is the
contract module, shared with engines, runtime and serving; this module holds what only the
exporter (and ``ertacache-build``, which adds engines) needs to write one: the version table,
the file list with sha256 of every file, and the atomic write.
"""

from __future__ import annotations

import json
import platform
import stat
from importlib import metadata
from pathlib import Path
from typing import Any

from ertacache.contract import (FORMAT, MANIFEST, SCHEMA_VERSION, ExportManifest, ManifestError, folder_digest,
                                iter_folder, load_manifest)
from ertacache.errors import UserError
from ertacache.io import atomic_write_bytes, sha256_file

#: top-level fields every manifest has (checked on load by ExportManifest)
REQUIRED_FIELDS = ("schema_version", "format", "model", "text_encoder", "profile", "shapes", "dtype", "opset",
                   "targets", "graphs", "files", "versions", "runtime")

__all__ = ["FORMAT", "MANIFEST", "SCHEMA_VERSION", "REQUIRED_FIELDS", "ExportManifest", "ManifestError",
           "folder_digest", "load_manifest", "package_versions", "file_entries", "write_manifest"]


def package_versions() -> dict[str, str | None]:
    """Versions of everything that shaped the graphs (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("ertacache", "torch", "onnx", "onnxruntime", "onnxscript", "diffusers", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def file_entries(root: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` (posix relative path) with its sha256 and size, sorted.

    Links are refused, not followed: a link in the folder would put a file from elsewhere under
    the folder's hash (and a later copy would follow it).
    """
    entries = {}
    for rel, st in iter_folder(root):
        if stat.S_ISLNK(st.st_mode):
            raise UserError(f"{root / rel} is a symbolic link; an export folder holds plain files only")
        if stat.S_ISREG(st.st_mode) and rel != MANIFEST:
            entries[rel] = {"sha256": sha256_file(root / rel), "bytes": st.st_size}
    return dict(sorted(entries.items()))


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write ``root/manifest.json`` atomically; non-finite numbers are refused (they are not JSON)."""
    path = root / MANIFEST
    atomic_write_bytes(path, json.dumps(manifest, indent=1, sort_keys=False, allow_nan=False).encode())
    return path
