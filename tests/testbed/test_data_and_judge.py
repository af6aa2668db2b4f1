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
    spec = data.VideoSpec()
    vids, prompts, labels, dirs = data.DigitVideoSampler("train", seed=1).batch(32)
    assert vids.shape == (32, spec.frames, spec.height, spec.width)
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


def test_start_corners_snap_to_the_grid_and_keep_the_track_on_canvas():
    spec = data.VideoSpec(grid=8)
    rng = np.random.default_rng(0)
    dirs = [data.DIRECTIONS[k % 4] for k in range(400)]
    starts = data.start_positions(dirs, spec, rng)  # (B, 2)
    free = spec.height - spec.digit_size
    for (y0, x0), d in zip(starts, dirs):
        dy, dx = data._DIRECTION_STEP[d]
        ends = (y0 + dy * spec.travel, x0 + dx * spec.travel)
        assert 0 <= min(y0, ends[0]) and max(y0, ends[0]) <= free
        assert 0 <= min(x0, ends[1]) and max(x0, ends[1]) <= free
        # off the motion axis the corner is on the grid
        assert (x0 if dy else y0) % spec.grid == 0
    assert len({tuple(s) for s in starts}) > 2  # still random


def test_images_per_class_limits_training_styles_only():
    spec = data.VideoSpec(images_per_class=3)
    train = data.DigitVideoSampler("train", spec=spec)
    assert len(train.labels) == 30 and np.bincount(train.labels).tolist() == [3] * 10
    held = data.DigitVideoSampler("held_out", spec=spec)
    assert len(held.labels) == len(data.digit_images("held_out")[1])
    with pytest.raises(ValueError, match="images_per_class"):
        data.VideoSpec(images_per_class=-1)
