"""Probe for the residual predictor of issue 14: which predictor, fit and schedule matter (eager, CPU).

    python tools/predictor_probe.py --speedups 2,3 --json probe.json            # about 30 min on 2 busy cores

On the shipped ``wan2.1-tiny`` (50 steps, the recipe's shift and CFG), a cached step predicts the
block-stack residual from the last K full steps' residuals r_{j_1}, ..., r_{j_K} (DESIGN.md s.4):

    r^_i = sum_k w_{i,k} r_{j_k}

and the probe compares, at an equal full-step budget, on held-out prompts and seeds against the
uncached sample (PSNR mean, worst sample, pooled MSE):

* predictors: reuse (K = 1, w = 1: the paper's zeroth order), Lagrange extrapolation of order 1
  and 2 (K = 2, 3) in the step index or in sigma (what TaylorSeer's finite differences amount to),
  and per-step scalar weights fitted closed loop by ridge least squares shrunk toward Lagrange;
* schedules: uniform (evenly spaced full steps, first and last included) and *the predictor's
  own* closed-loop schedule: walk the calibration trajectories, reuse at step i while the
  predictor's relative L1 error of r^_i vs the true r_i is below lambda, bisect lambda to the
  budget, then fill the budget with the worst-error steps (``--warm`` leading steps always full).

This is a study tool, not the product: it runs its own small eager loop so that every variant is a
few lines; the product's predictor (profile tables, step graphs, runtime) is built on its findings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ertacache.profile.predictor import lagrange_weights as lagrange_at  # noqa: E402
from ertacache.models.loading import load_bundle  # noqa: E402
from ertacache.sampling.sampler import initial_latents  # noqa: E402
from ertacache.sampling.settings import SampleSettings  # noqa: E402
from ertacache.sampling.sigmas import nominal_sigmas  # noqa: E402
from ertacache.sampling.steps import cached_velocity, combine_cfg, expand_branches, full_velocity, model_timestep  # noqa: E402,E501
from ertacache.testbed.data import calibration_prompts, held_out_prompts  # noqa: E402

History = list[tuple[int, torch.Tensor]]  # (step index, residual (nb*B, N, D)) of the last full steps
Predictor = Callable[[int, History], torch.Tensor]


class Probe:
    """The testbed, its settings and one eager cached loop with a pluggable residual predictor."""

    def __init__(self, calibration: int, held_out: int):
        self.bundle = load_bundle("wan2.1-tiny")
        self.adapter = self.bundle.adapter
        s = SampleSettings.from_recipe(self.bundle.recipe)
        self.steps, self.guidance, self.nb = s.steps, s.guidance_scale, s.n_branches
        self.sigmas = torch.tensor(nominal_sigmas(s.steps, s.shift), dtype=torch.float32)
        self.shape = self.bundle.latent_shape(s.frames, s.height, s.width)
        self.negative = s.negative_prompt
        self.cal = self.inputs(calibration_prompts(calibration, seed=0), range(calibration))
        self.held = self.inputs(held_out_prompts(held_out, seed=1), range(1000, 1000 + held_out))

    def inputs(self, prompts: Sequence[str], seeds) -> tuple[torch.Tensor, torch.Tensor]:
        return initial_latents(self.shape, list(seeds)), self.bundle.encode(list(prompts), self.negative, self.nb)

    @torch.no_grad()
    def walk(self, x0, text, decide: Callable[[int, History, torch.Tensor | None], bool | torch.Tensor],
             predict: Predictor | None, need_truth: bool) -> torch.Tensor:
        """The cached loop. ``decide(i, history, r_true)`` says full (True) or not for step i."""
        x, hist = x0.clone(), []
        for i in range(self.steps):
            x_in = expand_branches(x, self.nb)  # (nb*B, C, F, H, W)
            t = model_timestep(self.sigmas[i], x_in.shape[0])
            v_true, r_true = full_velocity(self.adapter, x_in, t, text) if need_truth else (None, None)
            if decide(i, hist, r_true):
                v, r = (v_true, r_true) if need_truth else full_velocity(self.adapter, x_in, t, text)
                hist = (hist + [(i, r)])[-3:]
            else:
                v = cached_velocity(self.adapter, x_in, t, predict(i, hist))
            x = x + (self.sigmas[i + 1] - self.sigmas[i]) * combine_cfg(v, self.guidance, self.nb)
        return x

    def sample(self, mask: Sequence[bool], predict: Predictor, x0=None, text=None) -> torch.Tensor:
        x0, text = (self.held if x0 is None else (x0, text))
        return self.walk(x0, text, lambda i, h, r: mask[i], predict, need_truth=False)

    def frames(self, latents: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.bundle.decoder.decode(latents).numpy().astype(np.float64)  # (B, F, H, W, 3) in 0..255


def lagrange_weights(i: int, steps: Sequence[int], coord: Callable[[int], float]) -> np.ndarray:
    """Weights of the polynomial through (coord(j), r_j) evaluated at coord(i) (extrapolation)."""
    return lagrange_at([coord(j) for j in steps], coord(i))


def lagrange(order: int, coord: Callable[[int], float]) -> Predictor:
    def predict(i: int, hist: History) -> torch.Tensor:
        pts = hist[-(order + 1):]
        w = lagrange_weights(i, [j for j, _ in pts], coord)
        return sum(float(wk) * r for wk, (_, r) in zip(w, pts))
    return predict


def rel_l1(approx: torch.Tensor, true: torch.Tensor) -> float:
    return float((approx - true).abs().sum() / true.abs().sum().clamp_min(1e-12))


def uniform_mask(steps: int, full: int) -> list[bool]:
    idx = set(np.linspace(0, steps - 1, full).round().astype(int).tolist())
    return [i in idx for i in range(steps)]


def own_schedule(p: Probe, predict: Predictor, budget: int, warm: int) -> list[bool]:
    """Closed-loop lambda walk with the predictor's own error, bisected to ``budget``, then filled."""
    def walk(lam: float) -> tuple[list[bool], list[float]]:
        mask, errs = [], []

        def decide(i, hist, r_true):
            forced = i < warm or i == p.steps - 1
            e = 0.0 if forced else rel_l1(predict(i, hist), r_true)
            mask.append(forced or e >= lam)
            errs.append(e)
            return mask[-1]
        p.walk(*p.cal, decide, predict, need_truth=True)
        return mask, errs

    lo, hi, best = 0.0, 1.0, None
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        mask, errs = walk(mid)
        if sum(mask) <= budget:
            hi = mid
            if best is None or sum(mask) > sum(best[0]):
                best = (mask, errs)
            if sum(mask) == budget:
                break
        else:
            lo = mid
    mask, errs = best
    for i in sorted((i for i in range(p.steps) if not mask[i]), key=lambda i: -errs[i])[:budget - sum(mask)]:
        mask[i] = True
    return mask


def fitted(p: Probe, mask: Sequence[bool], k: int, ridge: float, coord: Callable[[int], float]) -> Predictor:
    """Per-step scalar weights over the last ``k`` full residuals, ridge least squares toward Lagrange,
    fitted closed loop (each step's fit is used before the next step is measured)."""
    table: dict[int, np.ndarray] = {}

    def predict(i: int, hist: History) -> torch.Tensor:
        pts = hist[-k:]
        return sum(float(wk) * r for wk, (_, r) in zip(table[i], pts))

    def decide(i, hist, r_true):
        if mask[i]:
            return True
        pts = hist[-k:]
        x = torch.stack([r.double().reshape(-1) for _, r in pts], 1)  # (elements, k)
        a, c = (x.T @ x).numpy(), (x.T @ r_true.double().reshape(-1)).numpy()
        prior = lagrange_weights(i, [j for j, _ in pts], coord)
        scale = ridge * np.trace(a) / len(pts)
        table[i] = np.linalg.solve(a + scale * np.eye(len(pts)), c + scale * prior)
        return False

    p.walk(*p.cal, decide, predict, need_truth=True)
    return predict


def score(got: np.ndarray, ref: np.ndarray) -> dict:
    mse = ((got - ref) ** 2).reshape(got.shape[0], -1).mean(1)
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    return {"psnr_mean": float(psnr.mean()), "psnr_worst": float(psnr.min()),
            "psnr_pooled": float(10 * np.log10(255.0 ** 2 / max(mse.mean(), 1e-10)))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speedups", default="2,3")
    ap.add_argument("--calibration", type=int, default=24, help="calibration prompts (seeds 0..)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out prompts (seeds 1000..)")
    ap.add_argument("--fit", action="store_true", help="also the fitted scalar weights (K = 2, 3; 3 ridge values)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    p = Probe(args.calibration, args.held_out)
    index = float
    sigma = lambda j: float(p.sigmas[j])  # noqa: E731
    ref = p.frames(p.sample([True] * p.steps, lagrange(0, index)))
    predictors = {"reuse": lagrange(0, index), "lagrange1": lagrange(1, index), "lagrange2": lagrange(2, index),
                  "lagrange1-sigma": lagrange(1, sigma), "lagrange2-sigma": lagrange(2, sigma)}
    rows = []

    def report(speedup, name, schedule, mask, predict):
        row = {"speedup": speedup, "predictor": name, "schedule": schedule,
               "mask": "".join("F" if m else "." for m in mask), **score(p.frames(p.sample(mask, predict)), ref)}
        rows.append(row)
        print(f"{speedup}x {name:16s} {schedule:18s} PSNR mean {row['psnr_mean']:6.2f} worst {row['psnr_worst']:6.2f} "
              f"pooled {row['psnr_pooled']:6.2f}  {row['mask']}", flush=True)

    for speedup in (float(s) for s in args.speedups.split(",")):
        budget = round(p.steps / speedup)
        uniform = uniform_mask(p.steps, budget)
        for name, predict in predictors.items():
            report(speedup, name, "uniform", uniform, predict)
        for name in ("lagrange1", "lagrange2", "lagrange2-sigma"):
            for warm in (1, 3):
                report(speedup, name, f"own, warm {warm}", own_schedule(p, predictors[name], budget, warm),
                       predictors[name])
        if args.fit:
            for k in (2, 3):
                for ridge in (1e-3, 1e-1, 10.0):
                    report(speedup, f"fit K={k} ridge={ridge:g}", "uniform", uniform,
                           fitted(p, uniform, k, ridge, index))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "wall_s": time.perf_counter() - start,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
