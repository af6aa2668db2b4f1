import math

import numpy as np
import pytest

from ertacache.eval.fidelity import PSNR_CAP_DB, adherence, fidelity, score, judge_targets
from ertacache.testbed.data import make_prompt
from ertacache.testbed.judge import real_video_batch


def videos(offsets):
    """(B, F, H, W, 3) uint8 filled with 100 + offset per video."""
    return np.stack([np.full((3, 16, 16, 3), 100 + o, dtype=np.uint8) for o in offsets])


def test_psnr_and_ssim_on_known_inputs():
    ref = videos([0, 0])
    out = fidelity(ref, videos([10, 20]))
    expected = [20 * math.log10(255 / 10), 20 * math.log10(255 / 20)]  # constant error e: PSNR = 20 log10(255 / e)
    np.testing.assert_allclose(out["psnr_per_sample"], expected, rtol=1e-9)
    assert out["psnr"] == pytest.approx(np.mean(expected))
    assert out["psnr_worst"] == pytest.approx(min(expected)) and out["ssim_worst"] <= out["ssim"]
    # pooled: the PSNR of the mean MSE (10^2 and 20^2 grey levels), below the mean of the per-video PSNRs
    assert out["psnr_pooled"] == pytest.approx(10 * math.log10(255 ** 2 / np.mean([10 ** 2, 20 ** 2])))
    assert out["psnr_pooled"] < out["psnr"]
    same = fidelity(ref, ref)
    assert same["psnr"] == PSNR_CAP_DB and same["psnr_pooled"] == PSNR_CAP_DB and same["ssim"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = np.clip(ref.astype(int) + rng.integers(-40, 41, ref.shape), 0, 255).astype(np.uint8)
    assert fidelity(ref, noisy)["ssim"] < 0.5


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(videos([0]), videos([0, 0]))


def test_judge_scores_real_videos_and_skips_other_prompts():
    frames, digits, dirs = real_video_batch("held_out", 40, seed=7)
    prompts = [make_prompt(int(d), r) for d, r in zip(digits, dirs)]
    got = adherence(frames.numpy(), prompts)
    assert got["digit_acc"] >= 0.85 and got["motion_acc"] == 1.0
    wrong = [make_prompt((int(d) + 1) % 10, r) for d, r in zip(digits, dirs)]
    assert adherence(frames.numpy(), wrong)["digit_acc"] < 0.2
    # prompts no testbed judge reads (a real model's, or a mix of two testbeds') get no adherence columns
    assert adherence(frames.numpy(), ["a cat walks on the grass"] * 40) == {}
    assert adherence(frames.numpy()[:2], ["digit 3 moving left", "red circle moving left on flower"]) == {}
    assert judge_targets(["digit 3 moving left"]) == ([3], ["left"])


def test_small_testbed_prompts_get_one_column_per_attribute_from_the_scene_judge():
    """wan2.1-small prompts are scored by its judge (not the digit one), on rendered held-out clips."""
    from ertacache.testbed import scene_data as sd

    spec = sd.SceneSpec()  # the shipped geometry, which the scene judge's regressions are fitted for
    frames, scenes = sd.real_clip_batch("held_out", 16, seed=3, spec=spec)
    prompts = [sc.prompt for sc in scenes]
    got = adherence(frames.numpy(), prompts)
    assert set(got) == {"colour_acc", "shape_acc", "direction_acc", "background_acc"}
    assert got["colour_acc"] == 1.0 and got["direction_acc"] == 1.0
    assert got["shape_acc"] >= 0.9 and got["background_acc"] >= 0.9
    recoloured = [sd.make_prompt(sd.COLOURS[(sd.COLOURS.index(sc.colour) + 1) % 4], sc.shape, sc.direction,
                                 sc.background) for sc in scenes]
    wrong = adherence(frames.numpy(), recoloured)
    assert wrong["colour_acc"] == 0.0 and wrong["direction_acc"] == 1.0  # only the changed attribute fails


def test_score_is_fidelity_and_adherence():
    frames, digits, dirs = real_video_batch("held_out", 4, seed=1)
    prompts = [make_prompt(int(d), r) for d, r in zip(digits, dirs)]
    s = score(frames.numpy(), frames.numpy(), prompts)
    assert {"psnr", "ssim", "digit_acc", "motion_acc"} <= set(s) and s["ssim"] == pytest.approx(1.0)
