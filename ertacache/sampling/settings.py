"""What a sampling run is: shape, steps, shift and guidance, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ertacache.errors import UserError
from ertacache.models.recipes import Recipe


@dataclass(frozen=True)
class SampleSettings:
    """One video's sampling settings.

    guidance_scale > 1 turns on classifier-free guidance (both branches in one
    batch); at 1 or below there is a single, conditional branch.
    """

    height: int
    width: int
    frames: int
    steps: int
    shift: float
    guidance_scale: float
    negative_prompt: str = ""

    def __post_init__(self):
        if self.steps < 2:
            raise UserError(f"--steps must be >= 2, got {self.steps}")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise UserError(f"shift must be a positive number, got {self.shift}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise UserError(f"--guidance-scale must be a finite number >= 0, got {self.guidance_scale}")

    @property
    def n_branches(self) -> int:
        return 2 if self.guidance_scale > 1.0 else 1

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides) -> "SampleSettings":
        """Recipe defaults, with every override that is not None applied."""
        d = recipe.defaults
        base = cls(d.height, d.width, d.frames, d.steps, d.shift, d.guidance_scale, d.negative_prompt)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})
