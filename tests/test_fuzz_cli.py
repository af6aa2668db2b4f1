"""tools/fuzz_cli.py on a reduced set: bad input to every console script, no traceback, nothing outside its folder."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _fuzz():
    path = Path(__file__).resolve().parents[1] / "tools" / "fuzz_cli.py"
    spec = importlib.util.spec_from_file_location("fuzz_cli", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_cli"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_reduced_sweep_has_no_traceback(onnx_export, tmp_path):
    fuzz = _fuzz()
    quick = [c for c in fuzz.cases() if c.quick]
    assert len(fuzz.cases()) >= 100 and len(quick) >= 15
    assert {c.script for c in quick} >= {"ertacache-profile", "ertacache-generate", "ertacache-run",
                                         "ertacache-verify", "ertacache-triton"}
    results = fuzz.sweep(onnx_export.out, quick, tmp_path / "cases", log=lambda s: None)
    report = fuzz.summary(results)
    assert report["tried"] == len(quick)
    assert report["failed"] == [], report["failed"]
    assert report["tracebacks"] == 0 and report["zero_exit"] == 0 and report["changed_files"] == []


def test_the_sweep_notices_a_traceback_and_a_change_outside(onnx_export, tmp_path, monkeypatch):
    """The checks of the sweep can fail: a CLI that crashes, and one that writes into the source folder."""
    fuzz = _fuzz()
    from ertacache.cli import build as build_cli

    def crash(argv=None):
        raise KeyError("boom")

    monkeypatch.setattr(build_cli, "main", crash)
    copy = tmp_path / "src"
    import shutil

    shutil.copytree(onnx_export.out, copy)

    def writes_source(ctx):
        (ctx.engines / "manifest.json").write_text("{}")
        return ["--engines", str(ctx.engines)]

    cases = [fuzz.Case("crash", "ertacache-build", lambda c: ["--engines", "x"]),
             fuzz.Case("writes", "ertacache-run", writes_source)]
    report = fuzz.summary(fuzz.sweep(copy, cases, tmp_path / "cases", log=lambda s: None))
    assert report["tracebacks"] == 1 and "KeyError: 'boom'" in report["failed"][0]["traceback"]
    assert any(f.endswith("manifest.json") for f in report["changed_files"])


@pytest.mark.slow
def test_console_scripts_as_processes(onnx_export, tmp_path):
    fuzz = _fuzz()
    chosen = [c for c in fuzz.cases() if c.name in ("ertacache-profile --lambda inf", "run --engines graph path ..",
                                                     "ertacache-run --no-such-flag")]
    assert len(chosen) == 3
    report = fuzz.summary(fuzz.sweep(onnx_export.out, chosen, tmp_path / "cases", use_subprocess=True,
                                     log=lambda s: None))
    assert report["tried"] == 3 and report["failed"] == [], report["failed"]
