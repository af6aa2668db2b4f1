"""The shipped testbed must load through from_pretrained and still draw the prompted digits."""

import math

import numpy as np
import pytest
import torch

from ertacache.testbed import ASSET_DIR, data, judge, load_testbed, residual_change_curve, sample_frames

pytestmark = pytest.mark.skipif(not (ASSET_DIR / "testbed.json").exists(),
                                reason="testbed weights not built (run tools/train_testbed.py)")

SLACK = 0.15  # 16 samples instead of the shipped evaluation's 80: allow for sampling noise


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def test_folder_is_small_and_facts_complete(testbed):
    size = sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file())
    assert size <= 20 * 2**20
    for key in ("frames", "height", "width", "shift", "guidance_scale", "recommended_steps", "eval", "training"):
        assert key in testbed.facts
    assert list((ASSET_DIR / "transformer").glob("*.safetensors"))


@pytest.mark.slow
def test_50_step_samples_show_prompted_digits(testbed):
    n = 16
    prompts = data.held_out_prompts(n)
    seeds = list(data.HELD_OUT_SEEDS[:n])
    frames = sample_frames(testbed, prompts, seeds)
    assert frames.shape == (n, testbed.facts["frames"], testbed.facts["height"], testbed.facts["width"], 3)
    digits, dirs = zip(*(data.parse_prompt(p) for p in prompts))
    acc = judge.frame_digit_accuracy(frames, digits)
    shipped = testbed.facts["eval"]["held_out"]["digit_accuracy"]
    assert acc >= shipped - SLACK, f"digit accuracy {acc:.3f} < shipped {shipped:.3f} - {SLACK}"
    assert judge.motion_accuracy(frames, dirs) >= testbed.facts["eval"]["held_out"]["motion_accuracy"] - SLACK


@pytest.mark.slow
def test_residual_changes_smoothly(testbed):
    curves = residual_change_curve(testbed, data.held_out_prompts(2), list(data.HELD_OUT_SEEDS[:2]), steps=50)
    c = curves["cond"]
    assert c.shape == (49,) and np.all(np.isfinite(c))
    assert c.max() < 1.0  # no step rewrites the residual wholesale
    mid = np.median(c[10:40])
    assert max(c[:3].max(), c[-3:].max()) > mid  # the ends move more than the middle
