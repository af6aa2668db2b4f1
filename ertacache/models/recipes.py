"""Per-model recipes (the JSON files of the top-level export/ folder, installed as ertacache.recipes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ertacache.errors import UserError
from ertacache.models.family import GUIDANCE_MODES, SCHEDULE_KINDS, is_known_family, known_families

#: the embedded default every CLI uses when --model is not given
DEFAULT_MODEL = "wan2.1-tiny"

_DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Defaults:
    height: int
    width: int
    frames: int | None  # None (or absent from the JSON) for an image family
    steps: int
    shift: float
    guidance_scale: float
    speedup: float
    dtype: str = "fp32"
    negative_prompt: str = ""
    calibration_batch_size: int = 1
    #: the predictor's ``--predictor-curvature`` default (the scale on its terms above the line). Measured per
    #: testbed, and set on the recipe it stands in for: wan2.1-tiny gained with 0.5, flux-tiny lost with it
    #: (docs/predictor.md, "Halving the curvature term"); 1, the exact polynomial, where nothing was measured
    predictor_curvature: float = 1.0
    #: a two-expert model's CFG scale for its second (low-noise) expert; None: ``guidance_scale``
    guidance_scale_2: float | None = None

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"recipe dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if not 0.0 <= self.predictor_curvature <= 1.0:
            raise ValueError(f"recipe predictor_curvature must be in [0, 1], got {self.predictor_curvature}")


@dataclass(frozen=True)
class Recipe:
    """Where a model comes from and the settings it is normally run with.

    Exactly one of ``hub_id`` (a diffusers-format repository, loaded from a
    local folder or the hub cache) and ``package_path`` (a folder shipped
    inside this package, relative to it) is set. ``train_command`` says how a
    package folder is made (run from a source checkout); the loader quotes it
    when the folder is missing, e.g. before a testbed's weights are trained.
    """

    model: str
    family: str  # a ModelFamily name (ertacache.models.family): what every stage asks about the model
    defaults: Defaults
    description: str = ""
    hub_id: str | None = None
    package_path: str | None = None
    train_command: str | None = None
    calibration_prompts: tuple[str, ...] = field(default_factory=tuple)
    #: the guidance mode when it is not the family's: ``"none"`` for a guidance-free checkpoint of a
    #: guidance-distilled family (FLUX.1-schnell); checked against the family when settings are made
    guidance: str | None = None
    #: the sigma schedule kind when it is not the family's (``"ramp"`` for FLUX.1-schnell, whose
    #: scheduler has no dynamic shift); :func:`ertacache.sampling.sigmas.request_sigmas` applies it
    sigma_schedule: str | None = None
    #: a two-expert model (Wan2.2 A14B): ``transformer`` runs while sigma >= this, ``transformer_2`` below
    #: (the pipeline's ``boundary_ratio``, from its model_index.json); None: one transformer
    boundary_ratio: float | None = None

    def __post_init__(self):
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            raise ValueError(f"recipe {self.model!r}: boundary_ratio must be in (0, 1), got {self.boundary_ratio}")
        if self.defaults.guidance_scale_2 is not None and self.boundary_ratio is None:
            raise ValueError(f"recipe {self.model!r}: guidance_scale_2 is the second expert's; it needs a boundary_ratio")
        if (self.hub_id is None) == (self.package_path is None):
            raise ValueError(f"recipe {self.model!r}: set exactly one of hub_id and package_path")
        if self.train_command is not None and self.package_path is None:
            raise ValueError(f"recipe {self.model!r}: train_command only applies to a package_path model")
        if self.guidance is not None and self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"recipe {self.model!r}: guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if self.sigma_schedule is not None and self.sigma_schedule not in SCHEDULE_KINDS:
            raise ValueError(f"recipe {self.model!r}: sigma_schedule must be one of {SCHEDULE_KINDS}, got "
                             f"{self.sigma_schedule!r}")
        if not is_known_family(self.family):
            raise UserError(f"recipe {self.model!r} names an unknown model family {self.family!r}; set \"family\" "
                            f"to one of {known_families()} (a new family is added as in docs/families.md)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        d["defaults"] = Defaults(**{"frames": None, **d["defaults"]})
        d["calibration_prompts"] = tuple(d.get("calibration_prompts", ()))
        return cls(**d)


def _recipe_files() -> dict[str, Any]:
    return {p.name[: -len(".json")]: p for p in resources.files("ertacache.recipes").iterdir() if p.name.endswith(".json")}


def available_models() -> list[str]:
    return sorted(_recipe_files())


def load_recipe(model: str) -> Recipe:
    files = _recipe_files()
    if model not in files:
        raise UserError(f"unknown model id {model!r}; choose one of {sorted(files)} (recipes live in export/)")
    return Recipe.from_dict(json.loads(files[model].read_text()))


def refuse_two_experts(recipe: Recipe, stage: str) -> None:
    """Refuse a two-expert model (Wan2.2 A14B) in a stage that runs one transformer, before it loads."""
    if recipe.boundary_ratio is not None:
        raise UserError(f"{recipe.model} has two experts (transformer and transformer_2, switched at boundary_ratio "
                        f"{recipe.boundary_ratio:g}); {stage} does not take two-expert models yet. ertacache-profile, "
                        "ertacache-generate, ertacache-export / -run / -verify and the diffusers integration "
                        "(enable_ertacache) do")


def takes_images(model: str) -> bool:
    """Whether model id ``model`` is image-conditioned (its recipe's family has an image encoder): a prompt for it
    needs a conditioning image too. False for an id without a recipe (a model built in code)."""
    from ertacache.models.family import family_named

    try:
        return family_named(load_recipe(model).family).takes_images
    except UserError:
        return False
