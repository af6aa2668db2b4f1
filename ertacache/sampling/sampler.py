"""The eager cached sampler: a plain loop over the two step modules.

The reuse mask is a tuple of Python bools fixed before the loop, so the loop
has no data-dependent branching and no ``.item()``: what it does at step i is
known before step 0 runs, exactly as in the exported runtime.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Sequence

import torch

from ertacache.errors import NumericalError, UserError
from ertacache.models.adapter import ModelAdapter, adapter_list
from ertacache.models.experts import Experts, filled_slots, segments
from ertacache.sampling.steps import CachedStep, Conditioning, FullStep, StepTables


def initial_latents(
    latent_shape: Sequence[int], seeds: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gaussian noise (B, C, F, H, W) with one CPU generator per seed.

    One generator per sample makes sample k of a batch identical to sampling
    seed k alone, whatever the batch size or device.
    """
    noise = [torch.randn(tuple(latent_shape), generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)  # (B, C, F, H, W)


def validate_mask(mask: Sequence[bool], steps: int, starts: Sequence[int] = (0,)) -> tuple[bool, ...]:
    """The mask as bools; refuses a length that is not ``steps`` and a segment that does not open with a full step.

    Whatever the predictor's K: a cached step that comes before K full steps predicts from the slots
    filled so far (:func:`~ertacache.models.experts.filled_slots`), which :func:`check_empty_slots`
    checks against the weights.
    starts: the first step of each expert (:class:`~ertacache.models.experts.Experts`); the history
    starts empty at each, so the rule holds per expert.
    """
    mask = tuple(bool(m) for m in mask)
    if len(mask) != steps:
        raise UserError(f"reuse mask has {len(mask)} entries but the sigma table has {steps} steps")
    if not mask[0]:
        raise UserError("the first step must compute (mask[0] must be true): there is no residual to reuse yet")
    for e, (s, end) in enumerate(segments(starts, steps)):
        seg = mask[s:end]
        where = ""
        if len(starts) > 1:
            where = f" of expert {e} (steps {s}..{end - 1}; residuals never cross the expert switch)"
        if not seg[0]:
            raise UserError(f"step {s}, the first step{where}, must compute: there is no residual of that expert yet")
    return mask


def check_empty_slots(pred_w: torch.Tensor, mask: Sequence[bool], starts: Sequence[int] = (0,)) -> None:
    """Refuse weights that read a residual slot no full step of the step's expert has filled yet.

    pred_w: (T, K, Dw). Before K full steps a cached step predicts from the slots filled so far; the
    others hold zeros or another request's (or expert's) residual, so their weight must be exactly 0.
    """
    k = pred_w.shape[1]
    for i, (full, filled) in enumerate(zip(mask, filled_slots(mask, k, starts))):
        read = [j for j in range(filled, k) if bool(pred_w[i, j].any())] if not full else []
        if read:
            raise UserError(f"step {i} is cached after {filled} full step(s) but its predictor weights read residual "
                            f"slot {read[0] + 1} of {k}, which holds no residual yet; recalibrate the profile "
                            "(ertacache-profile) instead of editing its tables")


def fill_slots(history: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """(K,) the cached step's residual inputs, newest first, from the m <= K full-step residuals so far.

    Before K full steps the K - m empty slots repeat the newest residual: their weights are 0
    (:func:`check_empty_slots`), so any finite tensor of the right shape serves, and no new one is made.
    """
    return [*history, *history[:1] * (k - len(history))]


def check_conditioning_rows(family, text: Conditioning, batch: int, n_branches: int) -> None:
    """Refuse conditioning whose rows do not match the batch, naming the input and the rule."""
    order = "cond then uncond" if n_branches == 2 else "cond only"
    if not isinstance(text, Mapping):
        if text.shape[0] != n_branches * batch:
            raise UserError(f"text_embeds has {text.shape[0]} rows; expected {n_branches} x batch {batch} ({order})")
        return
    missing = [c.name for c in family.conditioning if c.name not in text]
    unknown = sorted(set(text) - set(family.input_names))
    if missing or unknown:
        raise UserError(f"the {family.name} family takes the conditioning inputs {list(family.input_names)}; "
                        f"missing {missing}, unknown {unknown}")
    for c in family.conditioning:
        want = c.expected_rows(batch, n_branches)
        if want is not None and text[c.name].shape[0] != want:
            raise UserError(f"{c.name} has {text[c.name].shape[0]} rows; expected {want} "
                            f"({c.rows} rows: batch {batch}, {order})")


@dataclass
class SampleResult:
    latents: torch.Tensor  # (B, C, F, H, W)
    full_steps: int


class CachedSampler:
    """Runs ``full if mask[i] else cached`` for i in range(T) in eager PyTorch.

    With an all-true mask and the nominal sigma table this is plain
    flow-matching Euler sampling with CFG. A two-expert model (Wan2.2 A14B) passes one adapter
    per expert and their :class:`Experts`: step i runs expert ``experts.expert(i)`` with its CFG
    scale, and the residual history is emptied at each expert's first step.
    """

    def __init__(self, adapter: ModelAdapter | Sequence[ModelAdapter], tables: StepTables, mask: Sequence[bool],
                 experts: Experts | None = None):
        adapters = adapter_list(adapter)
        self.experts = experts or Experts((0,), (0.0,))  # one expert: the call's guidance scale is used
        if len(adapters) != self.experts.count:
            raise UserError(f"{self.experts.count} expert(s) in the schedule but {len(adapters)} transformer(s) given")
        self.tables = tables
        self.mask = validate_mask(mask, tables.steps, self.experts.starts)
        check_empty_slots(tables.pred_w, self.mask, self.experts.starts)
        self.family = adapters[0].family
        self.full_steps = [FullStep(a, tables) for a in adapters]
        self.cached_steps = [CachedStep(a, tables) for a in adapters]
        self.full_step, self.cached_step = self.full_steps[0], self.cached_steps[0]

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, text_embeds: Conditioning, guidance_scale: float,
                 check_finite: bool = True) -> SampleResult:
        """latents: (B, C, F, H, W) float32 noise; text_embeds: (nb*B, L, D), cond rows first
        (or, for a family with several conditioning inputs, a mapping of them: see ``steps``).
        ``guidance_scale`` is the CFG scale of one expert; with two experts, theirs (``Experts``) are used.

        With ``check_finite`` a NaN/Inf in the result raises :class:`NumericalError` naming the
        first step that produced it (one isfinite check after the loop; a replay only on failure).
        """
        result = self._run(latents, text_embeds, guidance_scale)
        if check_finite and not torch.isfinite(result.latents).all():
            self._run(latents, text_embeds, guidance_scale, name_bad_step=True)
            raise NumericalError("the final latents contain NaN/Inf but a replay did not reproduce it")
        return result

    def _run(self, latents: torch.Tensor, text_embeds: Conditioning, guidance_scale: float,
             name_bad_step: bool = False) -> SampleResult:
        n_branches = self.tables.n_branches
        check_conditioning_rows(self.family, text_embeds, latents.shape[0], n_branches)
        device = latents.device
        self.tables.to(device)
        steps = torch.arange(self.tables.steps, device=device)  # int64 step indices, made once
        scales = self.experts.guidance_scales if self.experts.count > 1 else (guidance_scale,)
        gs = [torch.tensor(float(g), dtype=torch.float32, device=device) for g in scales]  # one per expert, made once
        x = latents.float()
        history: list[torch.Tensor] = []  # the last K full-step residuals of this expert, newest first
        for i, full in enumerate(self.mask):
            e = self.experts.expert(i)
            if i == self.experts.starts[e]:
                history = []  # a residual never crosses the expert switch
            if full:
                x, residual = self.full_steps[e](x, steps[i], text_embeds, gs[e])
                history = [residual, *history[: self.tables.history - 1]]
            else:
                x = self.cached_steps[e](x, steps[i], text_embeds, gs[e], *fill_slots(history, self.tables.history))
            if name_bad_step and not torch.isfinite(x).all():
                raise NumericalError(
                    f"NaN/Inf in the latents after step {i} of {len(self.mask)} ({'full' if full else 'cached'} "
                    f"step, sigma {float(self.tables.sigmas[i]):.4g} -> {float(self.tables.sigmas[i + 1]):.4g}, "
                    f"guidance {float(scales[e]):g}); check that step's tables in the profile (sigmas, "
                    "correction a/b) and the model's precision")
        return SampleResult(latents=x, full_steps=sum(self.mask))
