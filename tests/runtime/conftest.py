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
