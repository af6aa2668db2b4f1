"""Which transformer runs each step: one expert, or Wan2.2 A14B's high-noise and low-noise experts.

Wan2.2 A14B denoises with two transformers of the same class and shape: ``transformer`` while
the timestep is at or above ``boundary_ratio * 1000`` (the high-noise expert: layout and motion),
``transformer_2`` below it (the low-noise expert: detail), each with its own CFG scale
(``guidance_scale``, ``guidance_scale_2``), as diffusers' ``WanPipeline`` does. For caching this
splits the schedule into *segments*, one per expert, with three rules:

* the expert of a step is decided once, from the **nominal** sigma table, and kept by step
  index everywhere (the samplers, the exported runtime), so a time-adjusted sigma can never
  move a step to the other expert;
* the residual history never crosses the switch: a residual of one expert's block stack says
  nothing about the other's, so each segment starts with an empty history;
* hence each segment opens with as many full steps as the predictor reads (``history``): its
  first step always computes.

One expert is the same object with a single segment starting at step 0, so every caller goes
through the same code.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ertacache.errors import UserError


def segments(starts: Sequence[int], steps: int) -> list[tuple[int, int]]:
    """[(first, end)) step ranges of the experts whose first steps are ``starts``, over ``steps`` steps."""
    return list(zip(starts, [*starts[1:], steps]))


def filled_slots(mask: Sequence[bool], history: int, starts: Sequence[int] = (0,)) -> list[int]:
    """(T,) how many of the K residual slots hold a residual of this expert when step i runs.

    min(K, the full steps before i in i's segment): the history starts empty at each expert's first
    step and fills one slot per full step. A cached step with fewer than K filled slots predicts from
    those alone (a lower-order extrapolation, weight 0 on the empty slots), the way TaylorSeer starts
    with fewer derivatives; it needs at least one, which is why each segment's first step computes.
    """
    out = [0] * len(mask)
    for start, end in segments(starts, len(mask)):
        full = 0
        for i in range(start, end):
            out[i] = min(history, full)
            full += bool(mask[i])
    return out


@dataclass(frozen=True)
class Experts:
    """The segment each step belongs to, and each segment's CFG scale.

    starts: the first step of each expert, ascending, ``starts[0] == 0``.
    guidance_scales: one CFG scale per expert (same length as ``starts``).
    boundary_ratio: the model's switch (sigma at or above it: expert 0); None for one expert.
    """

    starts: tuple[int, ...]
    guidance_scales: tuple[float, ...]
    boundary_ratio: float | None = None

    def __post_init__(self) -> None:
        if not self.starts or self.starts[0] != 0 or list(self.starts) != sorted(set(self.starts)):
            raise ValueError(f"expert starts must begin at step 0 and strictly increase, got {self.starts}")
        if len(self.guidance_scales) != len(self.starts):
            raise ValueError(f"one guidance scale per expert: {len(self.starts)} experts, "
                             f"{len(self.guidance_scales)} scales")
        if self.boundary_ratio is not None and not 0.0 < self.boundary_ratio < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {self.boundary_ratio}")

    @classmethod
    def single(cls, guidance_scale: float) -> "Experts":
        """One transformer for every step (every family but Wan2.2 A14B)."""
        return cls((0,), (float(guidance_scale),))

    @classmethod
    def from_boundary(cls, nominal_sigmas: Sequence[float], boundary_ratio: float,
                      guidance_scales: Sequence[float]) -> "Experts":
        """Two experts switched where the nominal sigma drops below ``boundary_ratio``.

        ``WanPipeline`` compares the timestep ``t = sigma * 1000`` with ``boundary_ratio * 1000``;
        a step whose t is at or above it runs ``transformer``. Refused when either expert would
        get no step (the step count or shift leaves the whole schedule on one side).
        """
        sig = np.asarray(nominal_sigmas, dtype=np.float64)[:-1]  # (T,) each step's sigma
        below = np.flatnonzero(sig * 1000.0 < boundary_ratio * 1000.0)
        if len(below) == 0 or below[0] == 0:
            side = "below" if len(below) else "at or above"
            raise UserError(f"every step's sigma is {side} the expert boundary {boundary_ratio:g}, so one of the "
                            "two transformers would never run; use the model's recipe steps and shift")
        return cls((0, int(below[0])), tuple(float(g) for g in guidance_scales), float(boundary_ratio))

    @property
    def count(self) -> int:
        return len(self.starts)

    def expert(self, step: int) -> int:
        """Index of the expert that runs ``step``."""
        return bisect.bisect_right(self.starts, step) - 1

    def segment_start(self, step: int) -> int:
        """The first step of ``step``'s expert: where its residual history began."""
        return self.starts[self.expert(step)]

    def guidance_at(self, step: int) -> float:
        return self.guidance_scales[self.expert(step)]

    def forced_full(self, steps: int, warmup: int) -> np.ndarray:
        """(T,) bool: the first ``warmup`` steps of every segment (each starts with an empty history)."""
        forced = np.zeros(steps, dtype=bool)
        for s, e in segments(self.starts, steps):
            forced[s:min(e, s + warmup)] = True
        return forced

    def to_json(self) -> dict:
        return {"starts": list(self.starts), "guidance_scales": list(self.guidance_scales),
                "boundary_ratio": self.boundary_ratio}

    @classmethod
    def from_json(cls, d: dict) -> "Experts":
        return cls(tuple(int(s) for s in d["starts"]), tuple(float(g) for g in d["guidance_scales"]),
                   None if d.get("boundary_ratio") is None else float(d["boundary_ratio"]))
