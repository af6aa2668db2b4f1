"""Measure how the block-stack residual changes between sampling steps.

Feature caching only pays off if ``r_i = blocks(x0_i) - x0_i`` changes slowly from
step to step; this module measures ||r_i - r_{i-1}||_1 / ||r_i||_1 on an uncached run
using forward hooks on the first and last block (the model classes stay untouched).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ResidualProbe:
    """Forward hooks capturing the block-stack input and output of every transformer call."""

    def __init__(self, transformer):
        self.residuals: list[torch.Tensor] = []
        self._input: torch.Tensor | None = None
        blocks = transformer.blocks
        self._handles = [
            blocks[0].register_forward_pre_hook(self._pre, with_kwargs=True),
            blocks[-1].register_forward_hook(self._post),
        ]

    def _pre(self, module, args, kwargs):
        """First block's ``hidden_states`` (B, N, D), positional or keyword."""
        self._input = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def _post(self, module, args, output):
        """Last block's output minus the stored input: the residual (B, N, D)."""
        out = output[0] if isinstance(output, tuple) else output
        self.residuals.append((out.detach() - self._input).float().cpu())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def relative_l1_changes(residuals: list[torch.Tensor]) -> np.ndarray:
    """(S, ...) residuals -> (S - 1,) values ||r_i - r_{i-1}||_1 / ||r_i||_1."""
    return np.array([float((b - a).abs().sum() / b.abs().sum().clamp_min(1e-12))
                     for a, b in zip(residuals[:-1], residuals[1:])])


def residual_change_curve(testbed, prompts: list[str], seeds: list[int], steps: int = 50,
                          guidance_scale: float | None = None) -> dict[str, np.ndarray]:
    """Per-step relative L1 change of the cond and uncond residuals over an uncached run.

    The reference sampler batches [uncond, cond] in one call, so each captured
    residual is split in halves. Returns {"cond": (steps-1,), "uncond": (steps-1,)}.
    """
    from ertacache.testbed.model import sample_latents

    f = testbed.facts
    g = f["guidance_scale"] if guidance_scale is None else guidance_scale
    with ResidualProbe(testbed.transformer) as probe:
        sample_latents(testbed.transformer, testbed.text_encoder, prompts, seeds, testbed.latent_shape,
                       steps=steps, shift=f["shift"], guidance_scale=g)
    if len(probe.residuals) != steps:
        raise RuntimeError(f"expected {steps} transformer calls, captured {len(probe.residuals)}")
    if g == 1.0:
        return {"cond": relative_l1_changes(probe.residuals)}
    halves = [r.chunk(2) for r in probe.residuals]  # each (B, N, D) x 2: uncond, cond
    return {"uncond": relative_l1_changes([h[0] for h in halves]),
            "cond": relative_l1_changes([h[1] for h in halves])}


def plot_residual_change(curves: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Write the per-step change curves as a PNG (step index i on x, change r_i vs r_{i-1} on y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for name, c in curves.items():
        ax.plot(np.arange(1, len(c) + 1), c, marker=".", label=name)
    ax.set_xlabel("sampling step i (of %d)" % (len(next(iter(curves.values()))) + 1))
    ax.set_ylabel("||r_i - r_{i-1}||_1 / ||r_i||_1")
    ax.set_title(title or "wan2.1-tiny: block-stack residual change per step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
