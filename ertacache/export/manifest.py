"""manifest.json: the self-description of an export folder, and its verification on load.

A runtime reads only this file to know what the folder holds: which model and
weights (fingerprint), which schedule (mask, sigma table, phi), which shapes and
dtype, which graph files (each with its sha256) and their I/O contract, and
where the text embeddings come from. :func:`load_manifest` refuses a folder
whose files do not match their hashes.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from ertacache.errors import UserError
from ertacache.io import sha256_file

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT = "ertacache-export"

#: top-level fields every manifest has (checked on load)
REQUIRED_FIELDS = ("schema_version", "format", "model", "text_encoder", "profile", "shapes", "dtype", "opset",
                   "targets", "graphs", "files", "versions", "runtime")


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
    """Every file under ``root`` (posix relative path) with its sha256 and size, sorted."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        entries[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return entries


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=1, sort_keys=False))
    return path


def _fail(root: Path, problem: str) -> UserError:
    return UserError(f"export folder {root}: {problem}; re-export it with ertacache-export --out {root} --force")


def load_manifest(root: str | os.PathLike, verify_files: bool = True) -> dict[str, Any]:
    """Read ``root/manifest.json``; with ``verify_files`` check every listed file's size and sha256."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"{root} is not an export folder (no {MANIFEST}); create one with ertacache-export")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(root, f"{MANIFEST} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(root, f"{MANIFEST} is not an {FORMAT} manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise _fail(root, f"schema_version {manifest.get('schema_version')!r} is not {SCHEMA_VERSION}")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise _fail(root, f"{MANIFEST} lacks {', '.join(missing)}")
    if verify_files:
        for rel, entry in manifest["files"].items():
            file = root / rel
            if not file.is_file():
                raise _fail(root, f"{rel} is missing")
            if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
                raise _fail(root, f"{rel} does not match its sha256 in {MANIFEST} (modified or truncated)")
    return manifest
