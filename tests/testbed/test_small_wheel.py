"""A wheel carries the wan2.1-small folder when it exists, and the model loads from the installed package.

Builds a real wheel (setuptools' PEP 517 hook) from a copy of the source tree into which a
random-weights wan2.1-small folder is written, as the trained one will be, then imports
``ertacache`` from the unpacked wheel in a fresh interpreter (not from this checkout) and
loads the testbeds (and flux-tiny, when the checkout has it) by id alone.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ertacache.testbed.model import TransformerSpec

from conftest import ROOT, write_small_folder

#: one block: only the packaging is under test
ONE_BLOCK = TransformerSpec(num_layers=1, num_attention_heads=2, attention_head_dim=16, ffn_dim=32, freq_dim=16,
                            in_channels=48, text_dim=16)


def _source_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    common = shutil.ignore_patterns("__pycache__", "*.egg-info")

    def ignore(folder, names):  # and the checkout's own wan2.1-small weights, if it has them
        return common(folder, names) | ({"wan2.1-small"} if Path(folder).name == "assets" else set())

    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    for name in ("ertacache", "export"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    return dest


@pytest.mark.slow
def test_wheel_ships_the_small_testbed_and_it_loads_from_the_install(tmp_path):
    src = _source_copy(tmp_path / "src")
    write_small_folder(src / "ertacache" / "assets" / "wan2.1-small", spec=ONE_BLOCK)
    dist = tmp_path / "dist"
    dist.mkdir()
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_wheel(sys.argv[1]))", str(dist)],
                           cwd=src, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = dist / build.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    for component in ("transformer", "text_encoder", "vae"):
        assert f"ertacache/assets/wan2.1-small/{component}/config.json" in names
        assert f"ertacache/assets/wan2.1-small/{component}/diffusion_pytorch_model.safetensors" in names
    assert {"ertacache/assets/wan2.1-small/testbed.json", "ertacache/recipes/wan2.1-small.json"} <= names
    shipped = ["wan2.1-small", "wan2.1-tiny"]
    if (ROOT / "ertacache" / "assets" / "flux-tiny" / "testbed.json").exists():  # the FLUX image testbed too
        assert {"ertacache/assets/flux-tiny/transformer/diffusion_pytorch_model.safetensors",
                "ertacache/recipes/flux-tiny.json"} <= names
        shipped.append("flux-tiny")

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    check = ("import ertacache, sys; from ertacache.models.loading import load_bundle\n"
             "assert ertacache.__file__.startswith(sys.argv[1]), ertacache.__file__\n"
             "for m in sys.argv[2:]:\n"
             "    b = load_bundle(m); assert str(b.path).startswith(sys.argv[1]), b.path; print(m, b.fingerprint)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", check, str(site), *shipped], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert all(m in run.stdout for m in shipped)
