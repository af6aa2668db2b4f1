"""The wan2.1-small data generator: prompts, splits, geometry of rendered clips."""

import dataclasses

import numpy as np
import pytest

from ertacache.testbed import scene_data as sd

# A small spec keeps these tests fast: 4 frames of 32x32 and 8 px objects.
SMALL = sd.SceneSpec(frames=4, height=32, width=32, object_size=8, speed=2, grid=4)


def test_prompt_round_trip_covers_every_attribute_value():
    prompts = sd.all_prompts()
    assert len(prompts) == len(set(prompts)) == 4 * 4 * 4 * 2
    for p in prompts:
        assert sd.make_prompt(*sd.parse_prompt(p)) == p
    for values, k in ((sd.COLOURS, 0), (sd.SHAPES, 1), (sd.DIRECTIONS, 2), (sd.BACKGROUNDS, 3)):
        assert {sd.parse_prompt(p)[k] for p in prompts} == set(values)


@pytest.mark.parametrize("bad", ["purple circle moving left on flower", "red circle moving left",
                                 "red circle going left on flower", "red blob moving left on flower"])
def test_bad_prompts_name_the_template_or_the_allowed_values(bad):
    with pytest.raises(sd.UnknownPromptError) as err:
        sd.parse_prompt(bad)
    msg = str(err.value)
    assert "red circle moving left on flower" in msg or any(v in msg for v in ("green", "square"))


def test_prompt_lists_are_deterministic_balanced_and_disjoint_streams():
    cal = sd.calibration_prompts(128)
    assert cal == sd.calibration_prompts(128) and sorted(cal) == sorted(sd.all_prompts())
    assert sd.held_out_prompts(16) != sd.calibration_prompts(16)
    assert not set(sd.CALIBRATION_SEEDS) & set(sd.HELD_OUT_SEEDS)


def test_photo_regions_are_disjoint_parts_of_each_photo():
    spec = sd.SceneSpec()
    for bg in sd.BACKGROUNDS:
        train, held = sd.photo_region(bg, "train", spec), sd.photo_region(bg, "held_out", spec)
        full_width = sd._photos(spec.photo_scale)[bg].shape[1]
        assert train.shape[1] + held.shape[1] == full_width  # a split of columns, no overlap
        assert train.shape[0] == held.shape[0] >= spec.height
        # desaturated: background chroma stays below the judge's object threshold
        for region in (train, held):
            assert (region.max(-1) - region.min(-1)).max() < 0.45
    with pytest.raises(ValueError, match="split"):
        sd.photo_region("temple", "validation", spec)


def test_spec_rejects_geometry_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        sd.SceneSpec(frames=20, speed=4)
    with pytest.raises(ValueError, match="photo_scale"):
        sd.SceneSpec(height=128, width=128, photo_scale=0.25)
    with pytest.raises(ValueError):
        sd.SceneSpec(distractors=-1)
    with pytest.raises(ValueError, match="a distractor of size 60"):
        sd.SceneSpec(distractor_size=60, distractor_speed=1)


def test_distractor_digits_have_their_own_size():
    """The prompted object and the white digit are sized separately (32 px vs 16 px by default)."""
    spec = dataclasses.replace(SMALL, distractor_size=12)
    sampler = sd.SceneSampler("train", spec=spec, seed=4)
    assert sampler.digits.shape[1:] == (12, 12)
    scene = sampler.draw_scene()
    for _, y0, x0, ddy, ddx in scene.distractors:  # the whole track stays on the canvas
        for f in (0, spec.frames - 1):
            y, x = y0 + ddy * spec.distractor_speed * f, x0 + ddx * spec.distractor_speed * f
            assert 0 <= y <= spec.height - 12 and 0 <= x <= spec.width - 12
    assert sampler.render(scene).shape == (spec.frames, spec.height, spec.width, 3)
    assert sd.SceneSpec().object_size == 32 and sd.SceneSpec().distractor_size == 16


def test_batch_layout_range_and_prompts():
    clips, prompts, scenes = sd.SceneSampler("train", spec=SMALL, seed=1).batch(6)
    assert clips.shape == (6, 3, SMALL.frames, SMALL.height, SMALL.width)  # (B, 3, F, H, W)
    assert clips.min() >= -1 and clips.max() <= 1
    assert prompts == [sc.prompt for sc in scenes]
    again, _, _ = sd.SceneSampler("train", spec=SMALL, seed=1).batch(6)
    assert (again == clips).all()  # seeded


def test_object_is_drawn_where_the_scene_says_in_its_colour():
    sampler = sd.SceneSampler("train", spec=SMALL, seed=2)
    for direction in sd.DIRECTIONS:
        scene = sampler.draw_scene(colour="blue", shape="square", direction=direction)
        clip = sampler.render(scene)  # (F, H, W, 3) in [0, 1]
        dy, dx = sd._DIRECTION_STEP[direction]
        s = SMALL.object_size
        for f in range(SMALL.frames):
            y, x = scene.start[0] + dy * SMALL.speed * f, scene.start[1] + dx * SMALL.speed * f
            assert 0 <= y <= SMALL.height - s and 0 <= x <= SMALL.width - s  # on the canvas all the way
            centre = clip[f, y + s // 2, x + s // 2]
            np.testing.assert_allclose(centre, sd.COLOUR_RGB["blue"], atol=1e-6)


def test_camera_pans_the_background():
    sampler = sd.SceneSampler("train", spec=dataclasses.replace(SMALL, distractors=0), seed=3)
    scene = dataclasses.replace(sampler.draw_scene(background="temple"), pan=(1, -1), window=(10, 30), start=(0, 0),
                                direction="right")
    clip = sampler.render(scene)
    region = sampler.regions["temple"]
    # bottom-right corner (never covered by the object moving right along the top) follows the window
    for f in range(SMALL.frames):
        np.testing.assert_allclose(clip[f, -1, -1], region[10 + f + SMALL.height - 1, 30 - f + SMALL.width - 1])


def test_training_and_held_out_use_different_digits_and_regions():
    train, held = sd.SceneSampler("train", spec=SMALL), sd.SceneSampler("held_out", spec=SMALL)
    assert train.regions["flower"].shape[1] != held.regions["flower"].shape[1]
    assert len(train.digits) + len(held.digits) == 1797


@pytest.mark.parametrize("make", [sd.calibration_prompts, sd.held_out_prompts])
def test_every_16_prompts_are_balanced_in_each_attribute(make):
    prompts = make(48)
    for start in (0, 16, 32):
        parsed = [sd.parse_prompt(p) for p in prompts[start:start + 16]]
        for k, values in enumerate((sd.COLOURS, sd.SHAPES, sd.DIRECTIONS, sd.BACKGROUNDS)):
            counts = {v: sum(p[k] == v for p in parsed) for v in values}
            assert set(counts.values()) == {16 // len(values)}, counts
