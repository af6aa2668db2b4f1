"""tools/gpu_check.py: the dry run (CPU, tiny shape) writes every section and key a GPU run writes.

The GPU run itself needs a CUDA device (the device tool); here the same code runs end to end on
the CPU, so a borrowed GPU window is never spent on a script error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "model", "eager", "calibration", "export", "runtime eager", "runtime torch.compile",
            "runtime aoti", "precision", "families")
RUNTIME_KEYS = {"full_ms", "cached_ms", "c", "uncached_s", "cached_s", "speedup", "ideal", "measured_over_ideal",
                "host_syncs_per_step", "torch_allocs_per_step", "torch_bytes_per_step", "peak_gib", "open_s",
                "cuda_graphs", "final_finite"}


def _run(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = _run("--dry-run", "--out", str(out), cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_dry_run_writes_every_section(dry_run):
    out, report = dry_run
    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    assert all(s["status"] == "ok" for s in sections.values()), {k: v.get("error") for k, v in sections.items()}
    env = sections["env"]
    assert env["dry_run"] is True and env["device"] == "cpu" and env["torch"] and "versions" in env
    assert "--dry-run" in report["command"]
    for backend in ("eager", "torch.compile", "aoti"):
        row = sections[f"runtime {backend}"]
        assert RUNTIME_KEYS <= set(row), RUNTIME_KEYS - set(row)
        # c is a timing: only that it was measured (a busy CI machine can put one run's c above 1)
        assert row["final_finite"] and row["c"] > 0 and row["host_syncs_per_step"] is None  # no syncs on a CPU
    assert sections["runtime aoti"]["rel_l2_vs_eager"] < 0.1  # bf16 graphs vs bf16 eager, same schedule
    cal = sections["calibration"]
    assert set(cal["prompts"]) == {"1", "2"} and cal["mask"].count("F") == 6  # 2x of 12 steps
    # per-prompt state is in the host store: the working set does not grow from 1 to 2 prompts
    assert cal["peak_ratio_last_over_first"] <= 1.05
    prec = sections["precision"]
    assert prec["bf16_finite"] and prec["fp32_finite"] and 0 < prec["rel_l2_bf16_vs_fp32"] < 0.1
    families = {k: v for k, v in sections["families"].items() if isinstance(v, dict)}
    assert set(families) == {"hunyuanvideo", "wan-i2v", "flux", "cogvideox"}
    assert all(r["eager_graphs_rel_l2"] < 1e-3 for r in families.values())  # the dry run compiles no AOTI
    assert families["wan-i2v"]["inputs"] == ["text_embeds", "image_embeds", "image_latents"]
    md = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| aoti |" in md and "Not measured" not in md


@pytest.mark.slow
def test_fill_docs_takes_gpu_runs_only(dry_run, tmp_path):
    out, report = dry_run
    docs = tmp_path / "engines.md"
    docs.write_text("# x\n<!-- gpu-check:begin -->\nold\n<!-- gpu-check:end -->\ntail\n")
    refused = _run("--fill-docs", str(out / "gpu_check.json"), "--docs", str(docs))
    assert refused.returncode != 0 and "dry run" in (refused.stderr + refused.stdout)
    gpu_like = json.loads(json.dumps(report))
    gpu_like["sections"]["env"]["dry_run"] = False
    (tmp_path / "gpu.json").write_text(json.dumps(gpu_like))
    filled = _run("--fill-docs", str(tmp_path / "gpu.json"), "--docs", str(docs))
    assert filled.returncode == 0, filled.stderr
    text = docs.read_text()
    assert "old" not in text and "| torch.compile |" in text and text.endswith("<!-- gpu-check:end -->\ntail\n")


def test_a_failing_section_is_recorded_not_fatal(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "tools"))
    check = gpu_check.Check(tmp_path, budget_s=1e9, argv=["gpu_check.py"])
    assert check.section("env", lambda: {"device": "cpu"}) is not None
    assert check.section("boom", lambda: 1 / 0) is None
    assert check.section("after", lambda: {}, needs=("boom",)) is None
    saved = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert saved["boom"]["status"] == "error" and "ZeroDivisionError" in saved["boom"]["error"]
    assert saved["after"]["status"] == "skipped" and "boom" in saved["after"]["reason"]
    over = gpu_check.Check(tmp_path, budget_s=-1, argv=["gpu_check.py"])
    assert over.section("late", lambda: {}) is None
    assert "time budget" in json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["late"]["reason"]
    assert "Not measured: late: skipped" in (tmp_path / "gpu_check.md").read_text()
