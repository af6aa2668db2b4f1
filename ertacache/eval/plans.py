"""What a method runs on the held-out set: a plan that samples a batch.

Every static built-in method (fewer steps, uniform reuse, ERTACache and its
ablations) is a reuse mask plus step tables (sigmas, correction), run by the
product's own :class:`CachedSampler`: a baseline is ERTACache's sampler with
unit phi (nominal sigmas) and zero correction. The TeaCache-style baseline
decides at run time, per sample, and has its own loop
(:mod:`ertacache.eval.teacache`); the real peers run their libraries' hooks
(:mod:`ertacache.eval.peers`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from ertacache.errors import UserError
from ertacache.models.adapter import ModelAdapter
from ertacache.sampling.sampler import CachedSampler
from ertacache.sampling.sigmas import nominal_sigmas
from ertacache.sampling.steps import StepTables


@dataclass
class PlanOutput:
    latents: torch.Tensor  # (B, C, F, H, W)
    computed: np.ndarray  # (B, T_plan) bool: which steps ran the block stack, per sample
    #: (B,) blocks that ran, in units of the whole stack, where a method runs probe blocks on cached steps
    #: (measured for the peers); None means equal to the full-step count
    block_equivalents: np.ndarray | None = None


class Plan(Protocol):
    def sample(self, adapter: ModelAdapter, noise: torch.Tensor, text: torch.Tensor,
               guidance_scale: float) -> PlanOutput: ...


@dataclass
class StaticPlan:
    """A schedule fixed before sampling: ``mask`` (T,) and the tables the sampler indexes.

    grid_mask: the schedule drawn on the evaluation's T-step grid (plots); for
    a plan with another step count it marks the nearest nominal steps.
    """

    mask: tuple[bool, ...]
    tables: StepTables
    grid_mask: tuple[bool, ...] | None = None

    def __post_init__(self):
        self.mask = tuple(bool(m) for m in self.mask)
        if self.grid_mask is None:
            self.grid_mask = self.mask

    @property
    def full_steps(self) -> int:
        return sum(self.mask)

    def sample(self, adapter, noise, text, guidance_scale) -> PlanOutput:
        sampler = CachedSampler(adapter, self.tables.to(noise.device), self.mask)
        out = sampler(noise, text, guidance_scale)
        return PlanOutput(out.latents, np.tile(np.asarray(self.mask), (noise.shape[0], 1)))


def plain_tables(sigmas, n_branches: int, channels: int) -> StepTables:
    """Step tables with no adjustment and no correction (phi = 1, a = b = 0)."""
    return StepTables(sigmas, n_branches=n_branches, channels=channels)


def reuse_plan(mask, sigmas, n_branches: int, channels: int) -> StaticPlan:
    """Plain residual reuse along ``mask`` over the nominal sigma table."""
    return StaticPlan(tuple(mask), plain_tables(sigmas, n_branches, channels))


def uniform_mask(steps: int, full_steps: int) -> tuple[bool, ...]:
    """Evenly spaced full steps (FORA-style fixed interval), first and last included.

    With T/N_full not an integer the gaps differ by at most one step, which is
    as uniform as an exact budget allows.
    """
    if not 2 <= full_steps <= steps:
        raise UserError(f"a uniform schedule needs 2..{steps} full steps, got {full_steps}")
    idx = np.round(np.linspace(0, steps - 1, full_steps)).astype(int)  # strictly increasing for full_steps <= steps
    mask = np.zeros(steps, dtype=bool)
    mask[idx] = True
    return tuple(bool(m) for m in mask)


def fewer_steps_plan(steps: int, full_steps: int, shift: float, n_branches: int, channels: int,
                     table: Callable[[int], np.ndarray] | None = None) -> StaticPlan:
    """Plain sampling with ``full_steps`` steps (no cache): the baseline every cache must beat.

    Its schedule is drawn on the ``steps`` grid at the nominal steps nearest in sigma. ``table(n)``
    gives the nominal sigma table of n steps (the model family's; default: the static ``shift``).
    """
    table = table or (lambda n: nominal_sigmas(n, shift))
    own = table(full_steps)
    grid = table(steps)[:-1]
    near = np.abs(grid[None, :] - own[:-1, None]).argmin(axis=1)  # (full_steps,) grid index per own step
    grid_mask = np.zeros(steps, dtype=bool)
    grid_mask[near] = True
    return StaticPlan(tuple([True] * full_steps), plain_tables(own, n_branches, channels),
                      grid_mask=tuple(bool(m) for m in grid_mask))

