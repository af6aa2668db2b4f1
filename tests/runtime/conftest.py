"""Inputs, folder copies and tampering helpers for the runtime tests (the exports come from tests/export/fixtures.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ertacache.io import sha256_file
from ertacache.sampling import CachedSampler
from tests.export.conftest import LATENT, TEXT


@pytest.fixture(scope="session")
def request_inputs():
    gen = torch.Generator().manual_seed(11)
    return torch.randn(1, *LATENT, generator=gen), torch.randn(2, *TEXT, generator=gen)  # (B,C,F',H',W'), (nb*B,L,D)


@pytest.fixture(scope="session")
def eager_latents(tiny, request_inputs):
    noise, text = request_inputs
    return CachedSampler(tiny.adapter, tiny.profile.tables(), tiny.profile.mask)(noise, text, 4.0).latents


def copy_folder(src, dest):
    shutil.copytree(src, dest)
    return dest


def edit_manifest(folder, edit, rehash: tuple[str, ...] = ()):
    """Apply ``edit(manifest)`` and, for the files in ``rehash``, record their new sha256 (a 'legitimate' change)."""
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    for rel in rehash:
        m["files"][rel] = {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
    path.write_text(json.dumps(m, indent=1))
    return m


def poison_cached_table(folder, dims: tuple[int, ...], step: int) -> int:
    """NaN in row ``step`` of the first baked table of shape ``dims`` in onnx/cached_step.onnx, re-hashed
    (as a broken export would be, not a tampered one). Returns how many tables had that shape."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = folder / "onnx" / "cached_step.onnx"
    model = onnx.load(str(path))
    tables = [t for t in model.graph.initializer if tuple(t.dims) == tuple(dims)]
    assert tables, f"no baked {dims} table in cached_step.onnx"
    arr = numpy_helper.to_array(tables[0]).copy()
    arr[step] = np.nan
    tables[0].CopyFrom(numpy_helper.from_array(arr, tables[0].name))
    onnx.save(model, str(path))
    edit_manifest(folder, lambda m: None, rehash=("onnx/cached_step.onnx",))
    return len(tables)
