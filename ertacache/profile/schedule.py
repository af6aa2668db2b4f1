"""Static reuse masks (true = compute the block stack) and lambda solving.

The mask rule of DESIGN.md 1a: walk the steps with a simulated cache last
refreshed at step j; step i reuses it while the calibration error of using
r_j in place of r_i stays below lambda, otherwise it computes and refreshes.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ertacache.errors import UserError


#: what the mask rule compares with lambda, per step (``CalibrationConfig.schedule_weight``)
SCHEDULE_WEIGHTS: tuple[str, ...] = ("none", "dt", "dt-late")


def step_weights(sigmas, rule: str) -> np.ndarray:
    """(T,) factor on each step's calibration error before the mask rule compares it with lambda.

    Why weigh at all: an error e in the velocity of step i moves the latent by dt_i * e, and a
    flow-matching table with shift > 1 has steps of very different lengths (Wan's shift 3 over 50
    steps: the steps near the end are about 8x the first, 3x the mean). The relative residual error the
    paper's rule uses ignores that, so it spends as much of the budget on the short early steps as
    on the long late ones, whose errors land in the output with nothing after them to absorb them.

    "none": ones (the paper's rule).
    "dt": dt_i / mean dt. Cheap early steps get cached more; measured, that can cost the tail: an
        early error can move where a sample ends up (docs/predictor.md).
    "dt-late": max(1, dt_i / mean dt): the long late steps weigh more, no step weighs less than in
        the paper's rule.
    """
    if rule not in SCHEDULE_WEIGHTS:
        raise UserError(f"unknown schedule weight {rule!r}; choose one of {', '.join(SCHEDULE_WEIGHTS)}")
    sig = np.asarray(sigmas, dtype=np.float64)  # (T + 1,) the nominal table, sigma_T = 0 included
    if rule == "none":
        return np.ones(len(sig) - 1)
    dt = np.abs(np.diff(sig))  # (T,)
    w = dt / dt.mean()
    return np.maximum(w, 1.0) if rule == "dt-late" else w


def forced_full(steps: int, warmup_steps: int, final_steps: int) -> np.ndarray:
    """(T,) bool: the leading and trailing steps that compute whatever lambda says."""
    forced = np.zeros(steps, dtype=bool)
    forced[:warmup_steps] = True
    forced[max(0, steps - final_steps):] = True
    return forced


def mask_from_error_matrix(errors: np.ndarray, lam: float, warmup_steps: int, final_steps: int,
                           forced: np.ndarray | None = None) -> tuple[bool, ...]:
    """Greedy walk over errors[j, i] = error of reusing step j's residual at step i (j < i).

    ``forced``: (T,) steps that compute whatever lambda says, if not just the warm-up and final ones
    (a two-expert model forces each expert's first steps too).
    """
    steps = errors.shape[0]
    forced = forced_full(steps, warmup_steps, final_steps) if forced is None else forced
    mask, last = [], 0
    for i in range(steps):
        full = bool(forced[i]) or not errors[last, i] < lam
        if full:
            last = i
        mask.append(full)
    return tuple(mask)


def solve_lambda(
    full_steps_at: Callable[[float], tuple[int, object]],
    target: int,
    lam_hi: float = 1.0,
    iterations: int = 16,
    rel_tol: float = 1e-3,
):
    """Lambda whose mask comes closest to ``target`` full steps from below, by bisection.

    ``full_steps_at(lam)`` returns (number of full steps, payload). The count
    falls as lambda grows, but only roughly: along a closed-loop trajectory a
    different lambda changes where the trajectory goes. So bisection keeps an
    upper end that meets the budget and a lower end that does not, remembers
    the probe with the most full steps within the budget (smallest lambda on
    ties), and stops early on an exact hit. Returns (lambda, full steps, payload).
    """
    best: tuple[int, float, object] | None = None

    def probe(lam: float) -> int:
        nonlocal best
        n, payload = full_steps_at(lam)
        if n <= target and (best is None or n > best[0] or (n == best[0] and lam < best[1])):
            best = (n, lam, payload)
        return n

    while probe(lam_hi) > target:
        lam_hi *= 2.0
        if lam_hi > 1e6:
            raise UserError(
                f"no lambda reaches {target} full steps: the forced steps alone need more; "
                "lower --speedup or reduce the warm-up count"
            )
    lam_lo = 0.0
    for _ in range(iterations):
        if best[0] == target or lam_hi - lam_lo <= rel_tol * lam_hi:
            break
        mid = 0.5 * (lam_lo + lam_hi)
        if probe(mid) <= target:
            lam_hi = mid
        else:
            lam_lo = mid
    n, lam, payload = best
    return lam, n, payload


def bisection_probes(iterations: int = 16, rel_tol: float = 1e-3) -> int:
    """The most probes :func:`solve_lambda` makes when its first upper end meets the budget.

    One probe of the upper end, then halvings until the bracket is ``rel_tol`` wide (or an exact
    hit ends it sooner). Progress bars use it as their total; too low a first upper end adds a
    probe per doubling.
    """
    return 1 + min(iterations, math.ceil(math.log2(1.0 / rel_tol)))


def fill_budget(mask: tuple[bool, ...], errors, target: int) -> tuple[bool, ...]:
    """Turn the reused steps with the largest errors into full steps until ``target`` are full.

    Lambda moves the full-step count in jumps, so a budget can fall between two
    lambdas; equal-compute comparisons need the exact count.
    """
    mask = list(mask)
    reused = [i for i, m in enumerate(mask) if not m]
    for i in sorted(reused, key=lambda i: -errors[i])[: max(0, target - sum(mask))]:
        mask[i] = True
    return tuple(mask)


def mask_summary(mask) -> str:
    """'F' for a full step, '.' for a reused one: e.g. 'FF.F..F'."""
    return "".join("F" if m else "." for m in mask)
