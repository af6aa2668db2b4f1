"""What a sampling run is: shape, steps, shift and guidance, validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ertacache.errors import UserError
from ertacache.models.family import CFG, VP, check_guidance, family_named, guidance_branches
from ertacache.models.recipes import Recipe


@dataclass(frozen=True)
class SampleSettings:
    """One request's sampling settings.

    guidance: the guidance mode (:mod:`ertacache.models.family`): the family's, or the recipe's narrower
    one (``"none"`` for FLUX.1-schnell and flux-tiny). With ``"cfg"``
    (Wan), guidance_scale > 1 turns on classifier-free guidance (both branches in one batch); at
    1 or below there is a single, conditional branch. ``"embedded"`` feeds the scale to the model's
    guidance embedding (one branch); ``"none"`` refuses a scale above 1.
    frames: None for an image family (the layout refuses frames there, and demands them for video).
    """

    height: int
    width: int
    frames: int | None
    steps: int
    shift: float
    guidance_scale: float
    negative_prompt: str = ""
    guidance: str = CFG
    #: a two-expert model's CFG scale for the second (low-noise) expert; None: ``guidance_scale``
    guidance_scale_2: float | None = None

    def __post_init__(self):
        if self.steps < 2:
            raise UserError(f"--steps must be >= 2, got {self.steps}")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise UserError(f"shift must be a positive number, got {self.shift}")
        check_guidance(self.guidance, self.guidance_scale)
        if self.guidance_scale_2 is not None:
            if self.guidance != CFG or not (math.isfinite(self.guidance_scale_2) and self.guidance_scale_2 >= 0):
                raise UserError(f"guidance_scale_2 must be a number >= 0 for a CFG model, got {self.guidance_scale_2}")
            if (self.guidance_scale_2 > 1) != (self.guidance_scale > 1):
                raise UserError(f"guidance scales {self.guidance_scale:g} and {self.guidance_scale_2:g} must both be "
                                "above 1 (CFG for both experts) or both at most 1 (no CFG): one batch layout serves "
                                "both experts")

    @property
    def size(self) -> str:
        """The request's size for messages: frames x height x width (video) or height x width (image)."""
        return f"{self.height}x{self.width}" if self.frames is None else f"{self.frames}x{self.height}x{self.width}"

    @property
    def video_size(self) -> tuple[int | None, int, int]:
        """(frames, height, width): the size an image-to-video model's condition latents are made for."""
        return self.frames, self.height, self.width

    @property
    def n_branches(self) -> int:
        """Rows per sample the transformer sees (2: cond and uncond with CFG)."""
        return guidance_branches(self.guidance, self.guidance_scale)

    @classmethod
    def from_recipe(cls, recipe: Recipe, **overrides) -> "SampleSettings":
        """Recipe defaults, with every override that is not None applied; the guidance mode is the family's
        (or the recipe's narrower one: ``"none"`` for FLUX.1-schnell).

        ``frames`` given for an image family is refused here, before any model loads.
        """
        family = check_frames_flag(recipe, overrides.get("frames"))
        d = recipe.defaults
        values = dict(height=d.height, width=d.width, frames=d.frames if family.is_video else None, steps=d.steps,
                      shift=d.shift, guidance_scale=d.guidance_scale, negative_prompt=d.negative_prompt,
                      guidance=recipe.guidance or family.guidance, guidance_scale_2=d.guidance_scale_2)
        if not family.accepts_guidance(values["guidance"]):
            raise UserError(f"recipe {recipe.model} asks for {values['guidance']!r} guidance, which the "
                            f"{family.name} family ({family.guidance} guidance) does not run")
        if overrides.get("guidance_scale_2") is not None and recipe.boundary_ratio is None:
            raise UserError(f"--guidance-scale-2 is the second expert's CFG scale; {recipe.model} has one transformer")
        if overrides.get("guidance_scale") is not None:
            check_guidance(values["guidance"], float(overrides["guidance_scale"]), recipe.model)  # names the model
        if family.sigma_schedule.kind == VP and overrides.get("shift") not in (None, d.shift):
            raise UserError(f"{recipe.model}'s shift is its checkpoint scheduler's snr_shift_scale ({d.shift:g}), "
                            "which the model was trained with; drop --shift")
        values.update({k: v for k, v in overrides.items() if v is not None})
        family.sigma_schedule.check_steps(values["steps"])  # before any model loads
        return cls(**values)  # validated once, with the overrides in place


def check_frames_flag(recipe: Recipe, frames: int | None):
    """Refuse ``--frames`` for a model whose family makes images, before any model loads; returns the family."""
    family = family_named(recipe.family)
    if not family.is_video and frames is not None:
        raise UserError(f"{recipe.model} generates images: --frames applies to video models only; drop it")
    return family
