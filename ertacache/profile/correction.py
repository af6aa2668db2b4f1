"""Closed-form residual linearization (ERTACache component c).

The paper models the cached-output error as eps = sigmoid(K v~ + B) and
linearises the sigmoid at 0, which reduces the fit to ordinary least squares.
We fit the equivalent linear model directly, per reused step i, CFG branch and
output channel c, over every calibration element:

    eps ~ a * v~ + b,   a = cov(v~, eps) / var(v~),   b = mean(eps) - a * mean(v~)

and correct at inference with v^ = v~ - (a * v~ + b). (Secondary summaries
print the intercept as 4(eps_bar - 1/2) - 4 K v_bar; the OLS algebra gives
K v_bar, which is what this implements.)

The fit keeps sufficient statistics only (count, sums, sums of squares and
products), so calibration prompts can stream through in micro-batches.
"""

from __future__ import annotations

import torch


class OLSAccumulator:
    """Per (branch, channel) running sums for the fit y ~ a * x + b (float64)."""

    def __init__(self, n_branches: int, channels: int):
        shape = (n_branches, channels)
        self.n = torch.zeros(shape, dtype=torch.float64)
        self.sx = torch.zeros(shape, dtype=torch.float64)
        self.sy = torch.zeros(shape, dtype=torch.float64)
        self.sxx = torch.zeros(shape, dtype=torch.float64)
        self.sxy = torch.zeros(shape, dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """x, y: (nb*B, C, ...) with the branch-major row order of the step modules."""
        nb, c = self.n.shape
        x = x.detach().to("cpu", torch.float64).unflatten(0, (nb, -1)).transpose(1, 2).reshape(nb, c, -1)
        y = y.detach().to("cpu", torch.float64).unflatten(0, (nb, -1)).transpose(1, 2).reshape(nb, c, -1)
        # (nb*B, C, F, H, W) -> (nb, B, C, ...) -> (nb, C, B, ...) -> (nb, C, B*F*H*W)
        self.n += x.shape[-1]
        self.sx += x.sum(-1)
        self.sy += y.sum(-1)
        self.sxx += (x * x).sum(-1)
        self.sxy += (x * y).sum(-1)

    def solve(self, min_var: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b), each (nb, C) float32. A channel with no spread in x gets a = 0, b = mean(y)."""
        if not torch.all(self.n > 0):
            raise ValueError("OLSAccumulator.solve() called before any update()")
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        cov = self.sxy / self.n - mx * my
        a = torch.where(var > min_var, cov / var.clamp_min(min_var), torch.zeros_like(var))
        b = my - a * mx
        return a.float(), b.float()
