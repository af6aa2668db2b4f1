"""Calibration passes: run the calibration prompts and fit mask, phi and correction.

Every calibration trajectory advances in lockstep (micro-batched through the
model), because each decision at step i (reuse or not, phi_i, a_i/b_i) is a
mean over all prompts and changes where every trajectory goes next.

Two kinds of pass:

* :func:`error_matrix` (open loop) runs plain uncached sampling and records
  errors[j, i] = mean over prompts of ||r_j - r_i||_1 / ||r_i||_1, from which
  a mask for any lambda is a cheap greedy walk.
* :func:`cached_pass` (closed loop) follows the cached sampler's own
  trajectory. At every step it computes the true velocity and residual anyway
  (calibration can afford it), and at a reused step also the cached velocity,
  which gives the error statistics where the cached sampler actually goes.
  With ``lam`` it decides the mask greedily as it goes; with ``mask`` it only
  fits phi and the correction along a given mask.

Memory: every per-prompt tensor that outlives one model call (residual
histories, cached residuals, latents, velocities) is parked in the
calibration set's :class:`~ertacache.profile.offload.HostStore` (host memory,
pinned on CUDA) and brought back one micro-batch at a time, and the fits are
running sums (:class:`~ertacache.profile.correction.OLSAccumulator`). Device
memory is therefore the model plus one micro-batch's working set, flat in the
number of prompts and steps (``docs/engines.md`` gives the formula).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ertacache.errors import NumericalError
from ertacache.models.adapter import ModelAdapter
from ertacache.models.experts import Experts
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.correction import OLSAccumulator
from ertacache.profile.offload import HostStore
from ertacache.profile.predictor import (PredictorConfig, RidgeAccumulator, extrapolation_weights, last_full_steps,
                                        lower_order_candidates)
from ertacache.profile.schedule import (
    bisection_probes,
    fill_budget,
    forced_full,
    mask_from_error_matrix,
    solve_lambda,
    step_weights,
)
from ertacache.profile.timeadjust import adjusted_sigmas, phi_value
from ertacache.sampling.steps import (
    Conditioning,
    StepTables,
    cached_velocity,
    combine_cfg,
    conditioning_dtype,
    conditioning_rows,
    expand_branches,
    full_velocity,
    model_timestep,
    move_conditioning,
    predict_residual,
    rectify,
    step_conditioning,
    timestep_scale,
)


@dataclass
class CalibrationSet:
    """The calibration trajectories' inputs.

    latents: (P, C, F, H, W) (video) or (P, C, H, W) (image) float32 initial noise, one row per prompt.
    text_embeds: the conditioning: one tensor (nb*P, L, D), the cond rows then (with CFG) the uncond
        rows (Wan), or a mapping by the family's conditioning names, each laid out by its row rule
        (FLUX: ``prompt_embeds`` (P, L, D_t5), ``pooled_prompt_embeds`` (P, D_clip)).
    Both may live on the host: each pass moves one micro-batch at a time to the model's device.
    store: where the passes park per-prompt state between steps (see :mod:`ertacache.profile.offload`).
    """

    adapter: ModelAdapter
    latents: torch.Tensor
    text_embeds: Conditioning
    guidance_scale: float
    nominal_sigmas: np.ndarray
    n_branches: int = 2
    #: a two-expert model (Wan2.2 A14B): the step -> expert table and each expert's CFG scale, and the
    #: adapters of the experts after the first (``adapter`` is expert 0's); None for one transformer
    experts: Experts | None = None
    more_adapters: tuple[ModelAdapter, ...] = ()
    store: HostStore = field(init=False, repr=False)

    #: block-stack evaluations (prompt-steps) the passes over this set have made: the calibration cost
    block_evals: int = field(default=0, init=False)
    #: the uncached trajectories' residuals, kept by :func:`residual_bank` for open-loop predictor schedules
    bank: "ResidualBank | None" = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.store = HostStore(self.device)
        if self.experts is None:
            self.experts = Experts.single(self.guidance_scale)
        if self.experts.count != 1 + len(self.more_adapters):
            raise ValueError(f"{self.experts.count} expert(s) but {1 + len(self.more_adapters)} adapter(s)")

    def adapter_at(self, step: int) -> ModelAdapter:
        """The transformer that runs ``step`` (expert 0's adapter for a one-transformer model)."""
        return (self.adapter, *self.more_adapters)[self.experts.expert(step)]

    def guidance_at(self, step: int) -> float:
        """The CFG scale of ``step``'s expert."""
        return self.experts.guidance_at(step)

    def forced(self, config: CalibrationConfig) -> np.ndarray:
        """(T,) steps that always compute: the warm-up and final steps, and each expert's own warm-up."""
        return forced_full(self.steps, config.warmup_steps, config.final_steps) | self.experts.forced_full(
            self.steps, config.warmup_steps)

    def schedule_weights(self, config: CalibrationConfig) -> np.ndarray:
        """(T,) factor on each step's error before the mask rule compares it with lambda (:func:`step_weights`)."""
        return step_weights(self.nominal_sigmas, config.schedule_weight)

    @property
    def device(self) -> torch.device:
        return next(self.adapter.model.parameters()).device

    @property
    def prompts(self) -> int:
        return self.latents.shape[0]

    @property
    def steps(self) -> int:
        return len(self.nominal_sigmas) - 1

    def micro_batches(self, size: int) -> list[slice]:
        return [slice(s, min(s + size, self.prompts)) for s in range(0, self.prompts, size)]

    def latent_rows(self, sl: slice) -> torch.Tensor:
        """(b, C, F, H, W) float32 initial noise of prompts ``sl`` on the model's device."""
        return self.latents[sl].to(self.device, torch.float32)

    def text_rows(self, sl: slice) -> Conditioning:
        """The conditioning rows of prompts ``sl`` on the model's device: (nb*b, L, D) cond and uncond
        rows, branch-major, for one tensor; for a mapping, each input sliced by its row rule."""
        rows = conditioning_rows(self.adapter.family, self.text_embeds, sl, self.n_branches, self.prompts)
        return move_conditioning(rows, self.device)

    def step_cond(self, sl: slice, rows: int, cached: bool):
        """What ``pre`` reads on a full or cached step of prompts ``sl`` (:func:`step_conditioning`).

        A one-tensor family's cached step reads no text (it feeds only the skipped blocks), so its
        rows are not sliced and moved to the device for nothing.
        """
        if cached and not isinstance(self.text_embeds, Mapping):
            return None
        return step_conditioning(self.adapter.family, self.text_rows(sl), self.guidance_scale, rows, cached)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the passes run the transformer in (the conditioning's)."""
        return conditioning_dtype(self.text_embeds)


@dataclass
class PassResult:
    """Everything a cached pass measured and fitted, per step (T entries each)."""

    mask: tuple[bool, ...]
    phi: np.ndarray
    sigmas: np.ndarray  # (T+1,)
    corr_a: torch.Tensor  # (T, nb, C)
    corr_b: torch.Tensor  # (T, nb, C)
    residual_error: np.ndarray  # rel. L1 of the cached residual vs the true one (0 on full steps)
    residual_change: np.ndarray  # rel. L1 of r_i vs r_{i-1}, true residuals (0 at step 0)
    velocity_error: np.ndarray  # mean |v_used - v_true| of the guided velocity
    velocity_change: np.ndarray  # mean |v_true_i - v_true_{i-1}|
    pred_w: torch.Tensor | None = None  # (T, K, Dw) the predictor's weights (reuse when None)
    pred_b: torch.Tensor | None = None  # (T, Db)
    phi_at_bound: int = 0  # reused steps whose raw phi hit phi_min or phi_max
    #: (T,) the prediction's rel. L1 error at every step that could have been cached (full ones too; 0 if forced)
    prediction_error: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def full_steps(self) -> int:
        return int(sum(self.mask))

    def tables(self) -> StepTables:
        """The step tables this pass fitted (sigmas, correction, predictor), as the samplers take them."""
        return StepTables(self.sigmas, self.corr_a, self.corr_b, pred_w=self.pred_w, pred_b=self.pred_b)


def _check_finite(v: torch.Tensor, step: int, sl: slice) -> None:
    # Calibration is allowed a host sync per step; the samplers are not.
    if not torch.isfinite(v).all():
        raise NumericalError(
            f"NaN/Inf in the model output at step {step} for calibration prompts {sl.start}..{sl.stop - 1}; "
            "check the weights and dtype (try --dtype fp32) before profiling"
        )


def rel_l1_per_sample(approx: torch.Tensor, true: torch.Tensor, n_branches: int) -> torch.Tensor:
    """(nb*b, ...) pairs -> (b,) ||approx - true||_1 / ||true||_1 over both branches of each sample.

    The calibration error of a reused residual, and (with ``true`` the previous step's value)
    the step-to-step change TeaCache- and MagCache-style rules accumulate.
    """
    diff = (approx.float() - true.float()).abs().unflatten(0, (n_branches, -1)).transpose(0, 1).flatten(1)
    ref = true.float().abs().unflatten(0, (n_branches, -1)).transpose(0, 1).flatten(1)
    # (nb*b, N, D) -> (nb, b, N, D) -> (b, nb, N, D) -> (b, nb*N*D)
    return diff.sum(1) / ref.sum(1).clamp_min(1e-12)


#: ``observe(step, prompts, x_in, timestep, text, v, residual)``: sees every model call of an uncached pass
StepObserver = Callable[[int, slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def error_matrix(
    cal: CalibrationSet, config: CalibrationConfig, progress: bool = True, observe: StepObserver | None = None
) -> np.ndarray:
    """(T, T) errors[j, i] of reusing step j's residual at step i, on uncached trajectories.

    ``observe``, if given, is called after every model call with the step, the
    prompts' slice and that call's inputs and outputs (branch rows), so other
    statistics of the same uncached pass (the evaluation baselines' signals)
    cost no second pass.
    """
    steps = cal.steps
    sig = torch.as_tensor(cal.nominal_sigmas, dtype=torch.float32, device=cal.device)
    sums = np.zeros((steps, steps))
    for sl in tqdm(cal.micro_batches(config.batch_size), desc="open-loop residuals", disable=not progress):
        _open_loop_batch(cal, sl, sig, sums, observe)
    return sums / cal.prompts


def _uncached_steps(cal: CalibrationSet, sl: slice, sig: torch.Tensor):
    """Yield (i, x_in, timestep, text, v, r) along the uncached trajectory of prompts ``sl``.

    The one loop both open-loop passes (the error matrix, the residual bank) run: the model call,
    its count in ``cal.block_evals``, the NaN check and the Euler step. Call under ``torch.no_grad``.
    """
    x = cal.latent_rows(sl)
    rows = (sl.stop - sl.start) * cal.n_branches
    text = cal.step_cond(sl, rows, cached=False)  # what a full step's pre reads
    scale = timestep_scale(cal.adapter)  # the family's: the model embeds sigma * scale
    for i in range(cal.steps):
        x_in = expand_branches(x, cal.n_branches).to(cal.dtype)
        t = model_timestep(sig[i], x_in.shape[0], scale)
        v, r = full_velocity(cal.adapter_at(i), x_in, t, text)
        cal.block_evals += sl.stop - sl.start
        _check_finite(v, i, sl)
        yield i, x_in, t, text, v, r
        x = x + (sig[i + 1] - sig[i]) * combine_cfg(v, cal.guidance_at(i), cal.n_branches)


def _open_loop_batch(cal: CalibrationSet, sl: slice, sig: torch.Tensor, sums: np.ndarray,
                     observe: StepObserver | None) -> None:
    """One micro-batch's uncached trajectory, adding its pairwise residual errors into ``sums``.

    A function of its own so that every tensor of the micro-batch is freed before the next starts.
    The history of earlier residuals lives in the host store, one comes back to the device at a time.
    """
    store = cal.store
    store.clear()
    with torch.no_grad():
        for i, x_in, t, text, v, r in _uncached_steps(cal, sl, sig):
            if observe is not None:
                observe(i, sl, x_in, t, text, v, r)
            for j in range(i):
                sums[j, i] += rel_l1_per_sample(store.get(("r", j)), r, cal.n_branches).sum().item()
            store.put(("r", i), r)
    store.clear()


class ResidualBank:
    """Every block-stack residual of the uncached trajectories, on the host: (slice, step) -> (nb*b, N, D).

    What an open-loop schedule for a predictor needs: the error of predicting step i from any set
    of earlier full steps is arithmetic on these, with no model call. Host memory is
    P * T * (nb * N * D) elements (the testbeds: tens of MB; Wan2.1-1.3B at 480p with 20 prompts
    and 50 steps: about 28 GB in bf16, so keep the prompt count modest there). Errors are memoised
    per (full steps, step), so a bisection's probes share what they have in common.
    """

    def __init__(self, slices: list[slice], n_branches: int, steps: int, device: torch.device,
                 starts: tuple[int, ...] = (0,)):
        self.slices, self.n_branches, self.steps, self.device = slices, n_branches, steps, device
        self.starts = starts  # each expert's first step
        self.residuals: dict[tuple[int, int], torch.Tensor] = {}
        self._memo: dict[tuple[tuple[int, ...], int, float], float] = {}
        self.prompts = sum(sl.stop - sl.start for sl in slices)

    def error(self, newest_first: tuple[int, ...], step: int, adaptive: bool = False, curvature: float = 1.0) -> float:
        """Mean over prompts of the rel. L1 error of the extrapolation of ``step`` from those full steps
        (``curvature``: :func:`~ertacache.profile.predictor.extrapolation_weights`).

        ``adaptive``: the least such error over the orders below (prefixes of ``newest_first``), as
        the adaptive predictor picks.
        """
        if adaptive:
            return min(self.error(newest_first[: j + 1], step, curvature=curvature) for j in range(len(newest_first)))
        key = (newest_first, step, curvature)  # one bank serves every config of a calibration set
        if key not in self._memo:
            w = torch.as_tensor(extrapolation_weights(newest_first, step, curvature), dtype=torch.float32)
            total = 0.0
            for k in range(len(self.slices)):
                slots = [self.residuals[k, j].to(self.device) for j in newest_first]
                r_hat = predict_residual(slots, w.reshape(-1, 1).to(self.device), None)
                total += rel_l1_per_sample(r_hat, self.residuals[k, step].to(self.device),
                                           self.n_branches).sum().item()
            self._memo[key] = total / self.prompts
        return self._memo[key]

    def solve_lambda(self, target: int, history: int, forced: np.ndarray, adaptive: bool = False,
                     weights: np.ndarray | None = None, curvature: float = 1.0) -> float:
        """Lambda whose greedy mask comes closest to ``target`` full steps from below (no model call)."""
        return solve_lambda(lambda lam: (sum(self.walk(lam, history, forced, adaptive, weights, curvature)[0]), lam),
                            target)[0]

    def walk(self, lam: float, history: int, forced: np.ndarray, adaptive: bool = False,
             weights: np.ndarray | None = None, curvature: float = 1.0) -> tuple[tuple[bool, ...], np.ndarray]:
        """The greedy mask for ``lam`` (cache while the prediction error, times the step's weight, is below
        it) and each step's weighted error (``weights``: :func:`~ertacache.profile.schedule.step_weights`)."""
        weights = np.ones(self.steps) if weights is None else weights
        mask, positions, errs = [], [], np.zeros(self.steps)
        for i in range(self.steps):
            if i in self.starts:
                positions = []  # a residual never crosses the expert switch
            full = bool(forced[i]) or not positions  # before K full steps: a lower order (error() takes the tuple)
            if not full:
                errs[i] = self.error(tuple(positions[::-1][:history]), i, adaptive, curvature) * weights[i]
                full = not errs[i] < lam
            mask.append(full)
            if full:
                positions.append(i)
        return tuple(mask), errs

    def mask_error(self, mask: Sequence[bool], history: int, weights: np.ndarray, curvature: float = 1.0) -> float:
        """The sum over ``mask``'s cached steps of their weighted prediction error (inf if one has no full step
        of its expert before it)."""
        total = 0.0
        for i in (i for i, full in enumerate(mask) if not full):
            newest_first = last_full_steps(mask, i, history, max(s for s in self.starts if s <= i))
            if not newest_first:
                return float("inf")
            total += self.error(tuple(newest_first), i, curvature=curvature) * weights[i]
        return total

    def drop_full_steps(self, mask: Sequence[bool], count: int, history: int, forced: np.ndarray,
                        weights: np.ndarray, curvature: float = 1.0) -> tuple[bool, ...]:
        """Cache ``count`` optional full steps of ``mask``, one at a time: each time the one whose caching adds
        least to :meth:`mask_error` (no model call).

        Why not the full steps whose own prediction erred least: caching one also lengthens the gap the
        cached steps after it are predicted across, which their measured errors do not know. Cutting a
        full step out of ``F..F..F`` that way left five cached steps in a row at 2.5x, and 6 dB less.
        """
        mask = list(mask)
        for _ in range(count):
            optional = [j for j, m in enumerate(mask) if m and not forced[j]]
            if not optional:
                break
            costs = [self.mask_error([m and j != k for k, m in enumerate(mask)], history, weights, curvature)
                     for j in optional]
            mask[optional[int(np.argmin(costs))]] = False
        return tuple(mask)


def fit_to_budget(mask: Sequence[bool], errors: np.ndarray, target: int, forced: np.ndarray) -> tuple[bool, ...]:
    """Exactly ``target`` full steps: cache the full steps whose prediction erred least, or compute the
    cached steps that erred most (forced steps stay full)."""
    mask = list(mask)
    if sum(mask) < target:
        return fill_budget(tuple(mask), errors, target)
    optional = [i for i, m in enumerate(mask) if m and not forced[i]]
    for i in sorted(optional, key=lambda i: errors[i])[: max(0, sum(mask) - target)]:
        mask[i] = False
    return tuple(mask)


def residual_bank(cal: CalibrationSet, config: CalibrationConfig, progress: bool = True) -> ResidualBank:
    """The uncached trajectories' residuals of ``cal`` (one uncached pass, made once per set)."""
    if cal.bank is not None:
        return cal.bank
    slices = cal.micro_batches(config.batch_size)
    bank = ResidualBank(slices, cal.n_branches, cal.steps, cal.device, cal.experts.starts)
    cal.bank = bank  # attached while it fills, so memory accounting sees it as the set's host state
    sig = torch.as_tensor(cal.nominal_sigmas, dtype=torch.float32, device=cal.device)
    try:
        with torch.no_grad():
            for k, sl in enumerate(tqdm(slices, desc="open-loop residuals", disable=not progress)):
                for i, _, _, _, _, r in _uncached_steps(cal, sl, sig):
                    bank.residuals[k, i] = r.to("cpu")
    except BaseException:
        cal.bank = None  # a half-filled bank must not be reused
        raise
    return bank


class _Trajectories:
    """Per micro-batch trajectory state of a cached pass, parked in the calibration set's store.

    Names per micro-batch k: "x" latents (b, C, F, H, W); "residual" the cache from the last full
    step (nb*b, N, D); "prev_r" last step's true residual; "v_prev" last step's true guided
    velocity (b, C, F, H, W); and within a step "r", "v_true", "v_cached", "g_used", "g_true".
    """

    def __init__(self, cal: CalibrationSet, batch_size: int):
        self.store = cal.store
        self.store.clear()
        self.slices = cal.micro_batches(batch_size)
        for k, sl in enumerate(self.slices):
            self.store.put((k, "x"), cal.latent_rows(sl))

    def __iter__(self):
        return iter(enumerate(self.slices))

    def get(self, k: int, name: str) -> torch.Tensor | None:
        return self.store.get((k, name))

    def put(self, k: int, name: str, t: torch.Tensor | None) -> None:
        self.store.put((k, name), t)


def _step_weights(pred: PredictorConfig, positions: list[int], step: int,
                  ridge: RidgeAccumulator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(w (K, Dw), b (Db,)) of the predictor at ``step``, given the full steps so far (oldest first).

    Before K full steps (of this expert): the Lagrange weights over those there are, 0 on the empty
    slots (the order grows as the slots fill; ``fitted`` fits only once all K are there).
    """
    newest_first = positions[::-1][: pred.history]
    prior = extrapolation_weights(newest_first, step, pred.curvature) if pred.kind != "reuse" else np.ones(1)
    if pred.kind == "fitted" and ridge is not None and ridge.count:
        return ridge.solve(prior, pred.ridge)
    return _pad_slots(torch.as_tensor(prior, dtype=torch.float32).reshape(-1, 1), pred.history), torch.zeros(1)


def _pad_slots(w: torch.Tensor, history: int) -> torch.Tensor:
    """(m, Dw) weights of the m filled slots -> (K, Dw), 0 on the K - m slots no full step has filled yet."""
    return torch.cat([w, w.new_zeros(history - w.shape[0], w.shape[1])]) if w.shape[0] < history else w


def _least_error_weights(traj: "_Trajectories", newest_first: list[int], step: int, nb: int, prompts: int,
                         device, curvature: float = 1.0) -> torch.Tensor:
    """(K, 1) weights of the order (<= K - 1) whose Lagrange prediction of this step's true residual
    ("r" in ``traj``) has the least mean rel. L1 error over the calibration prompts."""
    candidates = [torch.as_tensor(w, dtype=torch.float32).reshape(-1, 1)
                  for w in lower_order_candidates(newest_first, step, curvature)]
    errs = [0.0] * len(candidates)
    with torch.no_grad():
        for k, _ in traj:
            slots = [traj.get(k, ("h", j)) for j in range(len(newest_first))]
            truth = traj.get(k, "r")
            for c, w in enumerate(candidates):
                r_hat = predict_residual(slots, w.to(device), None)
                errs[c] += rel_l1_per_sample(r_hat, truth, nb).sum().item() / prompts
            del slots, truth
    return candidates[int(np.argmin(errs))]


def _put_table(table: torch.Tensor | None, step: int, value: torch.Tensor, steps: int, tail: tuple[int, ...]):
    """Write ``value`` into row ``step`` of a (T, *tail) table, widening a 1-wide last axis to the value's."""
    if table is None or table.shape[-1] < value.shape[-1]:
        wider = torch.zeros(steps, *tail[:-1], value.shape[-1])
        if table is not None:
            wider[:] = table  # broadcast the narrow rows written so far
        table = wider
    table[step] = value
    return table


def cached_pass(
    cal: CalibrationSet,
    config: CalibrationConfig,
    lam: float | None = None,
    mask: Sequence[bool] | None = None,
    progress: bool = True,
    max_full: int | None = None,
) -> PassResult | None:
    """Follow the cached trajectory, deciding (``lam``) or following (``mask``) the schedule.

    At a step that may be cached, the predictor's weights come from the full steps so far
    (:func:`_step_weights`; a ``fitted`` predictor is solved from this step's running sums over
    every prompt, i.e. where the cached sampler actually is), the predicted residual is compared
    with the true one (the schedule's error), and, if the step is cached, the cached velocity
    from the prediction feeds the rectification fit and the trajectory.

    With ``max_full``, the pass gives up (returns None) as soon as the mask is
    sure to exceed that many full steps: a bisection probe only needs to know
    it is over budget, and small lambdas would otherwise cost a whole pass.
    """
    if (lam is None) == (mask is None):
        raise ValueError("give exactly one of lam and mask")
    steps, nb = cal.steps, cal.n_branches
    pred = config.predictor
    history = pred.history
    if mask is not None:
        from ertacache.sampling.sampler import validate_mask

        mask = validate_mask(mask, steps, cal.experts.starts)
    forced = cal.forced(config)
    nominal = np.asarray(cal.nominal_sigmas, dtype=np.float64)
    weights = cal.schedule_weights(config)  # (T,) on the error the rule compares with lambda
    device = cal.device
    scale = timestep_scale(cal.adapter)  # the family's: the model embeds sigma * scale
    traj = _Trajectories(cal, config.batch_size)
    channels = cal.latents.shape[1]

    phi = np.ones(steps)
    sigmas = nominal.copy()
    corr_a = torch.zeros(steps, nb, channels)
    corr_b = torch.zeros(steps, nb, channels)
    pred_w: torch.Tensor | None = None  # (T, K, Dw), filled per cached step
    pred_b: torch.Tensor | None = None  # (T, Db)
    positions: list[int] = []  # the full steps so far, oldest first
    out_mask: list[bool] = []
    stats = {k: np.zeros(steps) for k in ("residual_error", "residual_change", "velocity_error", "velocity_change")}
    prediction_error = np.zeros(steps)  # the predictor's error at every step that could be cached, full or not
    phi_bound = 0

    for i in tqdm(range(steps), desc="closed-loop calibration", disable=not progress, leave=False):
        sig_i = torch.tensor(sigmas[i], dtype=torch.float32, device=device)
        adapter, g = cal.adapter_at(i), torch.tensor(cal.guidance_at(i), device=device)
        if i > 0 and i in cal.experts.starts:  # a new expert: no residual of the last one is read again
            positions = []
            for k, _ in traj:
                for j in range(history):
                    traj.put(k, ("h", j), None)
        # a step may be cached unless it is forced (or the given mask computes it)
        # (before K full steps of this expert the predictor reads the filled slots only: a lower order)
        may_cache = not forced[i] and (mask is None or not mask[i]) and bool(positions)
        filled = min(len(positions), history)
        res_change_sum = 0.0
        ridge = None
        # (1) the true step for every micro-batch; the fitted predictor's sums where it may be cached
        with torch.no_grad():
            for k, sl in traj:
                x_in = expand_branches(traj.get(k, "x"), nb).to(cal.dtype)  # (nb*b, C, F, H, W)
                text = cal.step_cond(sl, x_in.shape[0], cached=False)
                v_true, r_true = full_velocity(adapter, x_in, model_timestep(sig_i, x_in.shape[0], scale), text)
                cal.block_evals += sl.stop - sl.start
                _check_finite(v_true, i, sl)
                if may_cache and pred.kind == "fitted" and filled == history:
                    if ridge is None:
                        ridge = RidgeAccumulator(history, r_true.shape[-1], pred.per_channel, pred.bias)
                    ridge.update([traj.get(k, ("h", j)) for j in range(history)], r_true)
                prev_r = traj.get(k, "prev_r")
                if prev_r is not None:
                    res_change_sum += rel_l1_per_sample(prev_r, r_true, nb).sum().item()
                traj.put(k, "r", r_true)
                traj.put(k, "v_true", v_true)
                del x_in, v_true, r_true, prev_r
        stats["residual_change"][i] = res_change_sum / cal.prompts

        # (2) the predictor's weights for this step and the error of its prediction, over every prompt
        res_err = float("inf")
        if may_cache:
            if pred.kind == "adaptive":  # the order whose prediction errs least over every prompt, no bias
                w_i = _pad_slots(_least_error_weights(traj, positions[::-1][:history], i, nb, cal.prompts, device,
                                                      pred.curvature), history)
                b_i = torch.zeros(1)
            else:
                w_i, b_i = _step_weights(pred, positions, i, ridge)
            res_err_sum = 0.0
            with torch.no_grad():
                for k, _ in traj:
                    slots = [traj.get(k, ("h", j)) for j in range(filled)]  # the filled slots, newest first
                    r_hat = predict_residual(slots, w_i.to(device), b_i.to(device))
                    res_err_sum += rel_l1_per_sample(r_hat, traj.get(k, "r"), nb).sum().item()
                    traj.put(k, "r_hat", r_hat)
                    del slots, r_hat
            res_err = res_err_sum / cal.prompts
            prediction_error[i] = res_err

        # (3) the decision, a mean over every prompt
        if mask is not None:
            full = bool(mask[i]) or bool(forced[i])
        else:
            full = not may_cache or not res_err * weights[i] < lam
        out_mask.append(full)
        if max_full is not None and sum(out_mask) + int(forced[i + 1:].sum()) > max_full:
            traj.store.clear()
            return None

        # (4) a cached step: the table rows, the cached velocity and the rectification fit
        acc = OLSAccumulator(nb, channels) if config.rectify and not full else None
        if not full:
            stats["residual_error"][i] = res_err
            pred_w = _put_table(pred_w, i, w_i, steps, (history, 1))
            pred_b = _put_table(pred_b, i, b_i, steps, (1,))
            with torch.no_grad():
                for k, sl in traj:
                    x_in = expand_branches(traj.get(k, "x"), nb).to(cal.dtype)
                    cond = cal.step_cond(sl, x_in.shape[0], cached=True)  # None for Wan
                    v_cached = cached_velocity(adapter, x_in, model_timestep(sig_i, x_in.shape[0], scale),
                                               traj.get(k, "r_hat"), cond)
                    if acc is not None:
                        acc.update(v_cached, v_cached - traj.get(k, "v_true"))
                    traj.put(k, "v_cached", v_cached)
                    del x_in, v_cached
            if acc is not None:
                corr_a[i], corr_b[i] = acc.solve()

        # (5) the velocity each trajectory uses, and the statistics phi needs
        err_sum, change_sum, scale_sum, count = 0.0, 0.0, 0.0, 0
        dot_sum, sq_sum = 0.0, 0.0
        for k, _ in traj:
            g_true = combine_cfg(traj.get(k, "v_true"), g, nb)  # (b, C, F, H, W)
            if full:
                g_used = g_true
            else:
                v_fixed = rectify(traj.get(k, "v_cached"), corr_a[i].to(device), corr_b[i].to(device))
                g_used = combine_cfg(v_fixed, g, nb)
            dims = tuple(range(1, g_true.ndim))
            err_sum += (g_used - g_true).abs().mean(dim=dims).sum().item()
            scale_sum += g_true.abs().mean(dim=dims).sum().item()
            dot_sum += (g_used * g_true).sum().item()
            sq_sum += (g_used * g_used).sum().item()
            v_prev = traj.get(k, "v_prev")
            if v_prev is not None:
                change_sum += (g_true - v_prev).abs().mean(dim=dims).sum().item()
            count += g_true.shape[0]
            traj.put(k, "g_used", g_used)
            traj.put(k, "g_true", g_true)
        stats["velocity_error"][i] = err_sum / count
        stats["velocity_change"][i] = change_sum / count if i > 0 else 0.0

        if not full and config.time_adjust:
            if config.phi_rule == "lsq":
                raw = dot_sum / max(sq_sum, 1e-30)  # the scale of the used update that best matches the true one
            else:
                raw = phi_value(stats["velocity_error"][i], stats["velocity_change"][i], scale_sum / count,
                                0.0, config.phi_eps)
            phi[i] = float(np.clip(raw, config.phi_min, config.phi_max))
            phi_bound += int(not config.phi_min < raw < config.phi_max)
            sigmas = adjusted_sigmas(nominal, phi, cal.experts.starts, _segment_floors(cal.experts))

        # (6) the Euler update along the (possibly adjusted) sigma table; state moves one step on
        sig_next = torch.tensor(sigmas[i + 1], dtype=torch.float32, device=device)
        for k, _ in traj:
            traj.put(k, "x", traj.get(k, "x") + (sig_next - sig_i) * traj.get(k, "g_used"))
            traj.store.alias((k, "v_prev"), (k, "g_true"))
            traj.store.alias((k, "prev_r"), (k, "r"))
            if full:  # the history moves one slot older; the new residual is the newest
                for j in range(history - 1, 0, -1):
                    if (k, ("h", j - 1)) in traj.store:
                        traj.store.alias((k, ("h", j)), (k, ("h", j - 1)))
                traj.store.alias((k, ("h", 0)), (k, "r"))
            for name in ("r", "r_hat", "v_true", "v_cached", "g_used", "g_true"):
                traj.put(k, name, None)
        if full:
            positions.append(i)

    traj.store.clear()
    pred_w = torch.zeros(steps, history, 1) if pred_w is None else pred_w
    for i, full in enumerate(out_mask):  # full rows: "newest slot" (never read by a cached step)
        if full:
            pred_w[i] = 0.0
            pred_w[i, 0] = 1.0
    return PassResult(
        mask=tuple(out_mask),
        phi=phi,
        sigmas=sigmas,
        corr_a=corr_a,
        corr_b=corr_b,
        pred_w=pred_w,
        pred_b=torch.zeros(steps, 1) if pred_b is None else pred_b,
        phi_at_bound=phi_bound,
        prediction_error=prediction_error,
        **stats,
    )


def _segment_floors(experts: Experts) -> tuple[float, ...]:
    """The lowest adjusted sigma each expert's steps may reach: the boundary for all but the last.

    ``WanPipeline`` picks the expert from the timestep it feeds (``t >= boundary_ratio * 1000``), so
    in the diffusers integration a time-adjusted sigma below the boundary would run the other expert.
    A hair above the boundary keeps float32 rounding on the right side of that comparison.
    """
    if experts.boundary_ratio is None:
        return (0.0,) * experts.count
    return (*(experts.boundary_ratio * (1 + 1e-6),) * (experts.count - 1), 0.0)


def _closed_predictor_budget(cal: CalibrationSet, config: CalibrationConfig, progress: bool,
                             log: Callable[[str], None], target: int) -> "CalibrationOutcome":
    """A predictor profile for a full-step budget in three passes' worth of model calls, no bisection.

    1. the open-loop residual bank (one uncached pass) gives lambda for the budget for free;
    2. one closed-loop pass decides greedily with that lambda along the cached trajectory and
       measures the prediction error at every step (full steps included);
    3. the mask is brought to the budget: over it, the full steps to cache are those whose caching adds
       least error on the bank (:meth:`ResidualBank.drop_full_steps`); under it, the cached steps that
       erred most along the cached trajectory compute (:func:`fit_to_budget`). One last closed-loop
       pass fits phi, the correction (and fitted weights) along the mask.
    """
    bank = residual_bank(cal, config, progress)
    forced = cal.forced(config)
    weights = cal.schedule_weights(config)
    pred = config.predictor
    lam = bank.solve_lambda(target, pred.history, forced, pred.kind == "adaptive", weights, pred.curvature)
    probe = cached_pass(cal, config, lam=lam, progress=progress)
    if probe.full_steps > target:  # which full steps to cache: by what caching each does to the steps after it
        mask = bank.drop_full_steps(probe.mask, probe.full_steps - target, pred.history, forced, weights,
                                    pred.curvature)
    else:  # compute the cached steps that erred most along the cached trajectory
        mask = fit_to_budget(probe.mask, probe.prediction_error * weights, target, forced)
    log(f"closed-loop predictor mask: lambda={lam:.5g} gave {probe.full_steps} full steps, set to {sum(mask)}")
    result = cached_pass(cal, config, mask=mask, progress=progress)
    return CalibrationOutcome(lam=lam, result=result, error_matrix=None)


@dataclass
class CalibrationOutcome:
    lam: float
    result: PassResult
    error_matrix: np.ndarray | None
    #: block-stack evaluations of this calibration, in uncached passes over the set (set by calibrate)
    uncached_passes: float = float("nan")


def calibrate(
    cal: CalibrationSet,
    config: CalibrationConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
    errors: np.ndarray | None = None,
    lam_hi: float = 1.0,
) -> CalibrationOutcome:
    """Fit the whole profile: mask (from lambda or a target speedup), phi, sigmas, correction.

    ``errors``: an open-loop error matrix already measured on ``cal`` (from
    :func:`error_matrix`); open-loop calibration then skips its uncached pass,
    which lets several profiles of one calibration set share it.
    ``lam_hi``: first upper end of the closed-loop lambda bisection. Every probe
    within the budget costs a whole calibration pass, so a good guess (e.g.
    twice the open-loop lambda) saves the halvings down from 1; too small a
    guess is doubled until it meets the budget, so it is always safe.
    """
    steps = cal.steps
    target = config.target_full_steps(steps) if config.speedup is not None else None
    evals_before = cal.block_evals
    # an open-loop pass shared with an earlier profile of the same set (the residual bank, or a given
    # error matrix) is still part of this profile's cost: it counts as one uncached pass
    if config.predictor.kind != "reuse" and (config.loop == "open" or target is not None):
        shared = cal.bank is not None  # both predictor schedules start from the residual bank
    elif config.loop != "open":
        shared = False
    else:
        shared = errors is not None
    outcome = _calibrate(cal, config, progress, log, errors, lam_hi, steps, target)
    outcome.uncached_passes = (cal.block_evals - evals_before) / (cal.prompts * steps) + (1.0 if shared else 0.0)
    return outcome


def _calibrate(cal, config, progress, log, errors, lam_hi, steps, target) -> "CalibrationOutcome":

    if config.loop == "closed" and config.predictor.kind != "reuse" and target is not None:
        return _closed_predictor_budget(cal, config, progress, log, target)

    if config.loop == "open" and config.predictor.kind != "reuse":
        bank = residual_bank(cal, config, progress)
        forced = cal.forced(config)
        adaptive = config.predictor.kind == "adaptive"
        weights = cal.schedule_weights(config)
        lam = (config.lam if target is None
               else bank.solve_lambda(target, config.predictor.history, forced, adaptive, weights,
                                      config.predictor.curvature))
        mask, step_err = bank.walk(lam, config.predictor.history, forced, adaptive, weights, config.predictor.curvature)
        if target is not None:
            mask = fill_budget(mask, step_err, target)
        log(f"open-loop predictor mask: lambda={lam:.5g}, {sum(mask)}/{steps} full steps")
        result = cached_pass(cal, config, mask=mask, progress=progress)
        return CalibrationOutcome(lam=lam, result=result, error_matrix=None)

    if config.loop == "open":
        if errors is None:
            errors = error_matrix(cal, config, progress)
        elif errors.shape != (steps, steps):
            raise ValueError(f"errors must be ({steps}, {steps}) for {steps} steps, got {errors.shape}")

        # (T, T) errors[j, i] times step i's weight: the rule weighs the step that would be cached
        weighted = errors * cal.schedule_weights(config)[None, :]

        def open_probe(lam):
            m = mask_from_error_matrix(weighted, lam, config.warmup_steps, config.final_steps, cal.forced(config))
            return sum(m), m

        if target is None:
            lam = config.lam
            mask = open_probe(lam)[1]
        else:
            lam, _, mask = solve_lambda(open_probe, target)
            # the open-loop error of step i is its error against its last refresh
            last, step_err = 0, np.zeros(steps)
            for i, full in enumerate(mask):
                last = i if full else last
                step_err[i] = weighted[last, i]
            mask = fill_budget(mask, step_err, target)
        log(f"open-loop mask: lambda={lam:.5g}, {sum(mask)}/{steps} full steps")
        result = cached_pass(cal, config, mask=mask, progress=progress)
        return CalibrationOutcome(lam=lam, result=result, error_matrix=errors)

    if target is None:
        return CalibrationOutcome(lam=config.lam, result=cached_pass(cal, config, lam=config.lam, progress=progress),
                                  error_matrix=None)

    # total: the usual number of probes (each a whole calibration pass, or less when it is over budget early)
    bar = tqdm(desc=f"closed-loop bisection (target {target} full steps)", total=bisection_probes(),
               disable=not progress, unit="probe")

    def closed_probe(lam):
        res = cached_pass(cal, config, lam=lam, progress=False, max_full=target)
        bar.update()
        n = target + 1 if res is None else res.full_steps
        bar.set_postfix(lam=f"{lam:.4g}", full=n if res is not None else f">{target}")
        return n, res

    lam, n_full, result = solve_lambda(closed_probe, target, lam_hi=lam_hi)
    bar.close()
    if n_full < target:  # lambda jumped past the budget: refit along the filled mask
        weights = cal.schedule_weights(config)
        mask = fill_budget(result.mask, result.residual_error * weights, target)
        result = cached_pass(cal, config, mask=mask, progress=progress)
    log(f"closed-loop mask: lambda={lam:.5g}, {result.full_steps}/{steps} full steps")
    return CalibrationOutcome(lam=lam, result=result, error_matrix=None)
