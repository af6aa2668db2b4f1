"""The whole harness on a tiny random model: every method at the budget, studies, timing, reports."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from ertacache.eval import report
from ertacache.eval.config import BASELINES, ERTA_METHODS
from ertacache.eval.harness import run_eval
from ertacache.eval.studies import run_studies
from ertacache.eval.timing import ideal_speedup, wallclock_table
from ertacache.timing import median_seconds
from tests.eval.conftest import STEPS, make_ctx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evaluated():
    # the peers: tests/eval/test_peers.py; of the predictors the one whose K = 2 warm-up fits 3x of 8 steps
    ctx = make_ctx(methods=("baselines", "erta", "erta-t1-closed-full"), speedups=(2.0, 3.0))
    return ctx, run_eval(ctx)


def test_every_method_runs_at_the_full_step_budget(evaluated):
    ctx, result = evaluated
    rows = {(r["method"], r["speedup_target"]): r for r in result.rows}
    assert rows[("uncached", 1.0)]["full_steps"] == STEPS
    assert set(ctx.config.methods) == {*BASELINES, *ERTA_METHODS, "erta-t1-closed-full"}
    for s, budget in ((2.0, 4), (3.0, 3)):
        for m in ctx.config.methods:
            r = rows[(m, s)]
            assert r["budget"] == budget
            if m == "teacache":  # per-sample rule: solved on calibration, reported as the held-out mean
                assert abs(r["info"]["calibration_full_steps"] - budget) <= 1.0
            else:
                assert r["full_steps"] == budget and r["full_steps_range"] == [budget, budget], (m, s)
            assert len(r["schedule"]) == STEPS and r["psnr"] > 0 and 0 < r["ssim"] <= 1
            assert r["psnr_worst"] == min(r["psnr_per_sample"]) and r["psnr_worst"] <= r["psnr"]
            assert r["ssim_worst"] <= r["ssim"] and r["psnr_pooled"] > 0 and r["implementation"].startswith("ertacache")
            assert r["digit_acc"] is not None and r["lpips"] is None
    assert rows[("erta-closed-full", 2.0)]["info"]["lambda"] > 0
    assert rows[("erta-t1-closed-full", 3.0)]["info"]["uncached_passes"] == pytest.approx(3.0)


def test_ablation_flags_reach_the_tables(evaluated):
    ctx, _ = evaluated
    policy = ctx.candidates[("erta-open-policy", 2.0)].plan.tables
    full = ctx.candidates[("erta-open-full", 2.0)].plan.tables
    assert not policy.corr_a.any() and np.allclose(policy.sigmas.numpy(), ctx.calibration.nominal_sigmas)
    assert full.corr_a.any()


def test_report_json_figures_and_markdown(evaluated, tmp_path):
    ctx, result = evaluated
    studies = run_studies(ctx, ["cal-size", "lambda", "transfer", "batch"], "erta-closed-full", 2.0, cal_sizes=(1, 2))
    assert [r["calibration_prompts"] for r in studies["cal-size"]] == [1, 2]
    assert len(studies["lambda"]) == 6 and len(studies["transfer"]) == 3
    assert studies["transfer"][2]["unseen_prompts"] == 2
    assert studies["batch"][0]["max_abs_diff_vs_batch1"] == 0.0 and studies["batch"][-1]["batch"] == 2
    wc = {"method": "erta-closed-full",
          **wallclock_table(ctx, {2.0: ctx.candidates[("erta-closed-full", 2.0)].plan}, repeats=1)}
    assert 0 < wc["c"] < 1 and wc["rows"][0]["speedup_ideal"] == pytest.approx(ideal_speedup(STEPS, 4, wc["c"]))

    paths = report.write_figures(result, (2.0, 3.0), tmp_path)
    assert all(p.stat().st_size > 1000 for p in paths)
    doc = report.document(ctx, result, studies, wc, "ertacache-eval --test", {"cpu": "x", "cores": 2,
                          "platform": "p", "python": "3", "torch": "t", "threads": 2, "device": "cpu"}, 1.0)
    report.write_json(doc, tmp_path / "eval.json")
    loaded = json.loads((tmp_path / "eval.json").read_text())
    keys = {"method", "speedup_target", "full_steps", "psnr", "ssim", "digit_acc", "motion_acc", "wall_s"}
    assert all(keys <= set(r) for r in loaded["rows"]) and "LPIPS not measured" in loaded["lpips"]

    spec = importlib.util.spec_from_file_location("make_results", ROOT / "tools" / "make_results.py")
    make_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_results)
    make_results.PRODUCT = "erta-t1-closed-full"  # the rows this quick eval ran (it has no order-2 method)
    md = make_results.render(loaded, tmp_path, tmp_path / "results.md")
    for needle in ("## The 2x table", "erta-closed-full", "## Goals", "Wall clock", "Calibration-set size",
                   "LPIPS not measured", "psnr_vs_speedup.png", "| PSNR mean | PSNR worst | PSNR pooled |",
                   "PSNR (dB) of the worst held-out video", "ertacache (hand-written) TeaCache-style",
                   "Its worst sample no worse"):
        assert needle in md
    # an eval.json from before the tail was recorded gets it from its per-sample PSNRs
    old = {"rows": [{"psnr_per_sample": [20.0, 30.0]}, {"psnr_per_sample": None}]}
    filled = make_results.fill_tail(old)["rows"]
    assert filled[0]["psnr_worst"] == 20.0 and filled[1].get("psnr_worst") is None
    assert filled[0]["psnr_pooled"] == pytest.approx(-10 * np.log10((1e-2 + 1e-3) / 2))


def test_timing_helpers():
    calls = []
    assert median_seconds(lambda: calls.append(1), repeats=3, warmup=1) >= 0 and len(calls) == 4
    assert ideal_speedup(50, 25, 0.0) == 2.0 and ideal_speedup(50, 25, 1.0) == 1.0
