"""tools/margin_table.py: the pooled margin of one method over another across several eval runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import margin_table  # noqa: E402


def _row(method, speedup, psnrs):
    return {"method": method, "speedup_target": speedup, "psnr_per_sample": list(psnrs)}


def _write(path: Path, ours, peer, speedup=2.0):
    path.write_text(json.dumps({"rows": [_row("ours", speedup, ours), _row("peer", speedup, peer)]}))
    return path


def test_the_table_pools_the_samples_of_every_file(tmp_path):
    a = _write(tmp_path / "a.json", [50.0, 40.0, 60.0], [48.0, 41.0, 55.0])  # margins +2, -1, +5
    b = _write(tmp_path / "b.json", [30.0, 50.0], [50.0, 49.0])  # margins -20, +1
    out = margin_table.table([a, b], "ours", "peer")
    lines = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("|")}
    assert "+2.00" in lines["a.json"] and "2/3" in lines["a.json"]  # mean margin (2 - 1 + 5) / 3, 2 wins
    assert "-9.50" in lines["b.json"] and "1/2" in lines["b.json"]
    allrow = lines["**all**"]
    assert "-2.60" in allrow and "3/5" in allrow and "+1.00" in allrow  # mean and median of (2, -1, 5, -20, 1)
    assert "30.00" in allrow  # the worst sample of all five


def test_pooled_psnr_is_the_psnr_of_the_mean_mse():
    psnrs = np.array([20.0, 40.0])
    mse = (10 ** -2 + 10 ** -4) / 2
    assert margin_table.pooled(psnrs) == pytest.approx(-10 * np.log10(mse))


def test_the_bootstrap_interval_brackets_the_margin_and_pairs_the_samples():
    rng = np.random.default_rng(0)
    b = rng.normal(50, 5, 40)
    lo, hi = margin_table.margin_interval(b + 1.0, b)  # the same samples, 1 dB better each: no spread at all
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    lo, hi = margin_table.margin_interval(b + rng.normal(1.0, 2.0, 40), b)
    assert lo < 1.0 < hi


def test_a_file_without_a_method_is_refused_with_what_to_run(tmp_path):
    a = _write(tmp_path / "a.json", [50.0], [48.0])
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "margin_table.py"), str(a), "--method", "ours",
                          "--against", "other"], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "no per-sample PSNR for other" in out.stderr and "--methods including other" in out.stderr
    missing = subprocess.run([sys.executable, str(ROOT / "tools" / "margin_table.py"), str(tmp_path / "x.json")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "does not exist" in missing.stderr
