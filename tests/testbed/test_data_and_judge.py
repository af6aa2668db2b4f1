import numpy as np
import pytest

from ertacache.testbed import data, judge


def test_prompt_round_trip_and_errors():
    for p in data.all_prompts():
        assert data.make_prompt(*data.parse_prompt(p)) == p
    with pytest.raises(ValueError):
        data.parse_prompt("digit 3 moving sideways")
    with pytest.raises(ValueError):
        data.make_prompt(11, "left")


def test_split_is_disjoint_and_covers_all_digits():
    train, held = data._split_indices()
    assert not set(train) & set(held)
    assert len(train) + len(held) == 1797
    _, labels = data.digit_images("held_out")
    assert set(labels.tolist()) == set(range(10))


def test_prompt_lists_are_deterministic_and_valid():
    assert data.calibration_prompts(12) == data.calibration_prompts(12)
    assert data.calibration_prompts(12) != data.held_out_prompts(12)
    for p in data.held_out_prompts(50):
        data.parse_prompt(p)


def test_videos_stay_on_canvas_and_in_range():
    vids, prompts, labels, dirs = data.DigitVideoSampler("train", seed=1).batch(32)
    assert vids.shape == (32, 8, 32, 32)
    assert vids.min() >= -1 and vids.max() <= 1
    # every frame keeps (almost) all of the digit's ink: nothing slid off the canvas
    ink = (vids + 1).sum(dim=(2, 3))  # (B, F)
    assert (ink.std(dim=1) < 1e-3 * ink.mean(dim=1) + 1e-6).all()


def test_judge_recognises_held_out_real_digit_videos():
    frames, digits, _ = judge.real_video_batch("held_out", 120, seed=7)
    assert judge.frame_digit_accuracy(frames, digits) >= 0.90


def test_judge_reads_motion_direction():
    frames, _, dirs = judge.real_video_batch("held_out", 80, seed=8)
    assert judge.motion_accuracy(frames, dirs) == 1.0
    still = frames[:, :1].expand_as(frames)  # a frozen video has no direction
    assert set(judge.predict_directions(still)) == {"none"}
    assert np.all(judge.motion_correct_per_sample(frames, dirs))
