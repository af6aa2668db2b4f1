"""Which judge reads which prompts: one entry per testbed, so callers ask instead of branching on models.

Each testbed has a prompt grammar and a judge that checks generated frames against it:

    wan2.1-tiny   "digit 3 moving left"               digit per frame, motion per video
    wan2.1-small  "red circle moving left on flower"  one verdict per attribute
    flux-tiny     "red digit 3"                       digit and colour per image

A :class:`PromptJudge` holds the grammar (``parse``), the accuracy columns the judge reports,
the scoring function and the testbed's default prompt lists. :func:`judge_for` returns the judge
whose grammar reads every prompt of a list. The grammars are disjoint (no prompt parses under
two; tests check), so the prompts alone decide which judge applies: an evaluation of either
testbed, or of a copy of one under another model id, finds its judge without a model-name table,
and prompts of a real model (free text) find none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class PromptJudge:
    """One testbed's prompt grammar, judge and default prompts.

    ``score(frames, prompts)`` takes uint8 frames (B, F, H, W, 3) and one prompt per video and
    returns ``{column: accuracy in [0, 1]}`` for exactly ``columns``.
    """

    name: str
    columns: tuple[str, ...]
    parse: Callable[[str], tuple]  # raises ValueError on a prompt outside the grammar
    score: Callable[[np.ndarray, list[str]], dict[str, float]]
    calibration_prompts: Callable[[int], list[str]]
    held_out_prompts: Callable[[int], list[str]]

    def reads(self, prompts: Sequence[str]) -> bool:
        """True if ``prompts`` is non-empty and every prompt is in this judge's grammar."""
        if not prompts:
            return False
        try:
            for p in prompts:
                self.parse(p)
        except ValueError:
            return False
        return True


def _score_digits(frames: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """wan2.1-tiny: fraction of frames showing the prompted digit; fraction of videos moving the prompted way."""
    from ertacache.testbed.data import parse_prompt
    from ertacache.testbed.judge import frame_digit_accuracy, motion_accuracy

    parsed = [parse_prompt(p) for p in prompts]
    return {"digit_acc": frame_digit_accuracy(frames, [d for d, _ in parsed]),
            "motion_acc": motion_accuracy(frames, [r for _, r in parsed])}


def _score_scenes(frames: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """wan2.1-small: fraction of videos showing each prompted attribute (colour, shape, direction, background)."""
    from ertacache.testbed.scene_judge import attribute_accuracy

    return {f"{attribute}_acc": acc for attribute, acc in attribute_accuracy(frames, list(prompts)).items()}


def _digits_judge() -> PromptJudge:
    from ertacache.testbed import data

    return PromptJudge(name="digits", columns=("digit_acc", "motion_acc"), parse=data.parse_prompt,
                       score=_score_digits, calibration_prompts=data.calibration_prompts,
                       held_out_prompts=data.held_out_prompts)


def _scenes_judge() -> PromptJudge:
    from ertacache.testbed import scene_data
    from ertacache.testbed.scene_judge import ATTRIBUTES

    return PromptJudge(name="scenes", columns=tuple(f"{a}_acc" for a in ATTRIBUTES), parse=scene_data.parse_prompt,
                       score=_score_scenes, calibration_prompts=scene_data.calibration_prompts,
                       held_out_prompts=scene_data.held_out_prompts)


def _score_images(frames: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """flux-tiny: fraction of images showing the prompted digit, and the prompted colour."""
    from ertacache.testbed.image_judge import attribute_accuracy

    return {f"{attribute}_acc": acc for attribute, acc in attribute_accuracy(frames, list(prompts)).items()}


def _images_judge() -> PromptJudge:
    from ertacache.testbed import image_data
    from ertacache.testbed.image_judge import ATTRIBUTES

    return PromptJudge(name="digit-images", columns=tuple(f"{a}_acc" for a in ATTRIBUTES),
                       parse=image_data.parse_prompt, score=_score_images,
                       calibration_prompts=image_data.calibration_prompts,
                       held_out_prompts=image_data.held_out_prompts)


#: every testbed judge, by name (wan2.1-tiny: digits, wan2.1-small: scenes, flux-tiny: digit-images)
JUDGES: dict[str, PromptJudge] = {j.name: j for j in (_digits_judge(), _scenes_judge(), _images_judge())}


def judge_for(prompts: Sequence[str]) -> PromptJudge | None:
    """The judge whose grammar reads every prompt, or None (free-text prompts of a real model, or a mix)."""
    for judge in JUDGES.values():
        if judge.reads(prompts):
            return judge
    return None


def adherence_columns() -> tuple[str, ...]:
    """Every judge's columns, in a fixed order (for tables that show whichever a row has)."""
    return tuple(dict.fromkeys(c for j in JUDGES.values() for c in j.columns))  # digit_acc is two judges' column
