"""The cached step's residual predictor: weights over the K most recent full-step residuals.

At a cached step i the block-stack residual is predicted as

    r^_i = sum_k w[i, k] * r_(p_k) + b[i]          p_0 > p_1 > ... the last K full steps before i

(:func:`ertacache.sampling.steps.predict_residual`). Three ways to choose ``w`` and ``b``:

* ``reuse``: K = 1, w = 1, b = 0, the paper's zeroth order (ERTACache as published).
* ``taylor``: the polynomial of degree K - 1 through the last K full residuals, evaluated at step
  i (Lagrange weights in the step index). With evenly spaced full steps these are the weights of
  a finite-difference Taylor expansion of order K - 1 (what TaylorSeer extrapolates with); with
  the uneven spacing of a fitted schedule they are the exact polynomial extrapolation for it.
  They depend only on the mask, so they are a table known before sampling. ``curvature`` scales
  the polynomial's terms of order 2 and above (its Newton form over the newest first): 1 is the
  exact polynomial, 0 the line through the newest two, 0.5 (the Wan2.1 recipes' default) halves
  the curvature term. Why halve it: the second difference of three residuals a gap or two apart is
  a noisy estimate of the curvature, and shrinking a noisy estimate toward 0 trades a little bias
  for less variance. On 160 held-out samples of wan2.1-tiny it gained 0.8 dB at 1.5x and 0.3 dB at
  2x and changed nothing at 2.5x and 3x; on flux-tiny it lost 3.5 dB at 2x, so FLUX keeps 1
  (``docs/predictor.md``, "Halving the curvature term").
* ``adaptive``: at each cached step, the Lagrange extrapolation of the order <= ``order`` (through
  the newest order + 1 full residuals, the older slots weighted 0) whose prediction erred least
  on the calibration trajectories, measured closed loop where the cached sampler goes. A long
  gap after a curved stretch is where a quadratic overshoots and a line or plain reuse does
  better; the choice is a table like the others, so the cached step does not change.
* ``fitted``: ridge least squares on the calibration trajectories, per step, per residual
  channel (or one weight per slot), with a bias: minimise
  ``sum (sum_k w_k x_k + b - y)^2 + alpha * s * ||w - w_taylor||^2`` over every calibration
  token, where ``y`` is the true residual at the step, ``x_k`` the slots, and ``s`` the mean
  diagonal of the Gram matrix (so ``alpha`` is relative). Shrinking toward the Taylor weights,
  not toward zero, keeps a weakly determined fit at the extrapolation instead of at nothing.
  The sufficient statistics are running sums (:class:`RidgeAccumulator`), so memory does not
  grow with the number of calibration prompts.

Why Lagrange weights in the step index and not in sigma: on the testbed the step-index
extrapolation scored higher with the schedules the calibration picks (``docs/predictor_probe.md``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from ertacache.errors import UserError
from ertacache.limits import MAX_HISTORY  # the most full-step residuals a predictor reads (one buffer each)

PredictorKind = Literal["reuse", "taylor", "adaptive", "fitted"]
PREDICTOR_KINDS: tuple[str, ...] = ("reuse", "taylor", "adaptive", "fitted")


@dataclass(frozen=True)
class PredictorConfig:
    """Which predictor a profile fits.

    kind: see the module docstring.
    order: polynomial order of ``taylor`` (0 = reuse, 1 = linear, 2 = quadratic), the highest
        order ``adaptive`` may pick, and the prior of ``fitted``; the cached step then reads
        K = order + 1 residuals.
    ridge: ``fitted`` only, the relative shrinkage toward the Taylor weights.
    per_channel: ``fitted`` only, one weight per slot and residual channel (else one per slot).
    bias: ``fitted`` only, fit a per-channel bias too.
    curvature: the scale on the extrapolation's terms of order >= 2 (:func:`extrapolation_weights`),
        in [0, 1]; it acts from order 2 up, so on ``taylor``/``adaptive``/``fitted``'s prior only. 1 here;
        the CLIs take the model recipe's (``Defaults.predictor_curvature``: 0.5 for Wan2.1 t2v).
    """

    kind: PredictorKind = "taylor"
    order: int = 2
    ridge: float = 0.1
    per_channel: bool = True
    bias: bool = True
    curvature: float = 1.0

    def __post_init__(self):
        if self.kind not in PREDICTOR_KINDS:
            raise UserError(f"unknown predictor {self.kind!r}; choose one of {', '.join(PREDICTOR_KINDS)}")
        if isinstance(self.order, bool) or not isinstance(self.order, int) or not 0 <= self.order < MAX_HISTORY:
            raise UserError(f"--predictor-order must be an integer in [0, {MAX_HISTORY - 1}], got {self.order}")
        if self.kind == "reuse" and self.order != 0:
            object.__setattr__(self, "order", 0)  # reuse is order 0 whatever the default says
        if not (self.ridge >= 0 and np.isfinite(self.ridge)):
            raise UserError(f"--predictor-ridge must be a finite number >= 0, got {self.ridge}")
        if isinstance(self.curvature, bool) or not isinstance(self.curvature, numbers.Real) \
                or not 0.0 <= self.curvature <= 1.0:
            raise UserError(f"--predictor-curvature must be a number in [0, 1] (1 = the exact polynomial, 0 = the "
                            f"line through the newest two full steps), got {self.curvature}")
        object.__setattr__(self, "curvature", float(self.curvature))

    @property
    def history(self) -> int:
        """K: the full-step residuals the cached step reads."""
        return self.order + 1

    def describe(self) -> dict:
        d = {"kind": self.kind, "order": self.order, "history": self.history}
        if self.order >= 2:
            d["curvature"] = self.curvature
        if self.kind == "fitted":
            d.update(ridge=self.ridge, per_channel=self.per_channel, bias=self.bias)
        return d


def lagrange_weights(positions: Sequence[float], target: float) -> np.ndarray:
    """(K,) weights w with sum_k w_k f(p_k) = P(target), P the polynomial through (p_k, f(p_k)).

    positions: K distinct abscissae (the steps of the last K full steps, newest first).
    K = 1 gives [1] (reuse); K = 2 at unit spacing one step ahead gives [2, -1].
    """
    p = np.asarray(positions, dtype=np.float64)
    if len(set(p.tolist())) != len(p):
        raise ValueError(f"positions must be distinct, got {positions}")
    w = np.ones(len(p))
    for k in range(len(p)):
        for j in range(len(p)):
            if j != k:
                w[k] *= (target - p[j]) / (p[k] - p[j])
    return w


def extrapolation_weights(positions: Sequence[float], target: float, curvature: float = 1.0) -> np.ndarray:
    """(K,) Lagrange weights of ``positions`` (newest first) at ``target``, with the polynomial's terms of
    order >= 2 scaled by ``curvature``.

    In Newton form over the newest first, P(t) = L(t) + Q(t): L the line through the newest two, Q the
    terms of order 2 and above. The weights returned are those of L + curvature * Q, i.e.
    ``w_line + curvature * (w_lagrange - w_line)``. Both sum to 1 and reproduce a line exactly, so a
    constant or linearly changing residual is still predicted without error for any ``curvature``.
    With K <= 2 there is no such term and these are the Lagrange weights.
    """
    w = lagrange_weights(positions, target)
    if len(w) <= 2 or curvature == 1.0:
        return w
    line = np.zeros(len(w))
    line[:2] = lagrange_weights(positions[:2], target)
    return line + curvature * (w - line)


def lower_order_candidates(newest_first: Sequence[int], step: int, curvature: float = 1.0) -> list[np.ndarray]:
    """(K,) extrapolation weights of every order 0 .. K-1 at ``step``: order j uses the newest j + 1 full
    steps and gives the older slots weight 0 (what ``adaptive`` chooses among); ``curvature`` as in
    :func:`extrapolation_weights`."""
    k = len(newest_first)
    out = []
    for j in range(k):
        w = np.zeros(k)
        w[: j + 1] = extrapolation_weights(newest_first[: j + 1], step, curvature)
        out.append(w)
    return out


def last_full_steps(mask: Sequence[bool], step: int, history: int, start: int = 0) -> list[int]:
    """The (up to ``history``) full steps in ``[start, step)``, newest first (``start``: the expert's first step)."""
    out = [j for j in range(step - 1, start - 1, -1) if mask[j]]
    return out[:history]


def taylor_weights(mask: Sequence[bool], history: int, starts: Sequence[int] = (0,),
                   curvature: float = 1.0) -> np.ndarray:
    """(T, K, 1) Lagrange weights for every cached step of ``mask``; [1, 0, ...] on full steps
    (``curvature``: :func:`extrapolation_weights`).

    A cached step with m < K full steps before it (in its expert's segment, ``starts``: the residual
    history restarts at each expert's first step) gets the order m - 1 weights over those m and 0 on
    the K - m empty slots: the order grows as the slots fill. None at all is refused, as the samplers
    refuse a segment that opens with a cached step.
    """
    steps = len(mask)
    w = np.zeros((steps, history, 1))
    w[:, 0, 0] = 1.0
    for i, full in enumerate(mask):
        if full:
            continue
        pos = last_full_steps(mask, i, history, max(s for s in starts if s <= i))
        if not pos:
            raise UserError(f"step {i} is cached but no full step of its expert precedes it: the first step of "
                            "each expert must compute")
        w[i, : len(pos), 0] = extrapolation_weights(pos, i, curvature)
    return w


class RidgeAccumulator:
    """Running sums for y ~ sum_k w_k x_k (+ b) per residual channel, one step's worth.

    update(slots, target): slots K tensors (rows, N, D), target (rows, N, D).
    solve(prior): (w (K, Dw), b (Db,)) with Dw = D if per_channel else 1, Db = D if bias else 1.
    """

    def __init__(self, history: int, channels: int, per_channel: bool = True, bias: bool = True):
        self.history, self.channels = history, channels
        self.per_channel, self.bias = per_channel, bias
        f = history + int(bias)
        d = channels if per_channel else 1
        self.gram = torch.zeros(d, f, f, dtype=torch.float64)  # (Dw, F, F) sum of x x^T
        self.cross = torch.zeros(d, f, dtype=torch.float64)  # (Dw, F) sum of x y
        self.count = 0

    def _features(self, slots: Sequence[torch.Tensor]) -> torch.Tensor:
        feats = [s.double().reshape(-1, s.shape[-1]) for s in slots]  # K x (rows*N, D)
        if self.bias:
            feats.append(torch.ones_like(feats[0]))
        return torch.stack(feats)  # (F, M, D)

    def update(self, slots: Sequence[torch.Tensor], target: torch.Tensor) -> None:
        if len(slots) != self.history:
            raise ValueError(f"expected {self.history} slots, got {len(slots)}")
        x = self._features([s.cpu() for s in slots])  # (F, M, D)
        y = target.cpu().double().reshape(-1, target.shape[-1])  # (M, D)
        if self.per_channel:
            self.gram += torch.einsum("fmd,gmd->dfg", x, x)
            self.cross += torch.einsum("fmd,md->df", x, y)
        else:
            self.gram[0] += torch.einsum("fmd,gmd->fg", x, x)
            self.cross[0] += torch.einsum("fmd,md->f", x, y)
        self.count += y.shape[0]

    def solve(self, prior: Sequence[float], ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Ridge solution shrunk toward ``prior`` (K,) weights (and a zero bias)."""
        if self.count == 0:
            raise ValueError("no data accumulated")
        f = self.gram.shape[-1]
        w0 = torch.zeros(f, dtype=torch.float64)
        w0[: self.history] = torch.as_tensor(np.asarray(prior, dtype=np.float64))
        scale = torch.diagonal(self.gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)  # (Dw,)
        reg = ridge * scale[:, None, None] * torch.eye(f, dtype=torch.float64)  # (Dw, F, F)
        rhs = self.cross + (reg @ w0)  # (Dw, F)
        sol = torch.linalg.lstsq(self.gram + reg, rhs.unsqueeze(-1)).solution.squeeze(-1)  # (Dw, F)
        w = sol[:, : self.history].T.contiguous().float()  # (K, Dw)
        b = sol[:, self.history].float() if self.bias else torch.zeros(1)  # (Db,)
        return w, b
