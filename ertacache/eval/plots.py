"""Pictures of an evaluation: PSNR vs speedup, schedules over the error profile, a sample strip."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ertacache.video import save_video  # noqa: E402


def _style(method: str) -> dict:
    """ERTACache solid (closed loop) or dashed (open loop); baselines dotted with markers."""
    if method.startswith("erta-"):
        return {"ls": "-" if "-closed-" in method else "--", "marker": "o"}
    return {"ls": ":", "marker": "s"}


def plot_psnr_vs_speedup(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    """PSNR against T / N_full (the achieved step speedup), one line per method."""
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "uncached"]
    for m in methods:
        pts = sorted((r["steps"] / r["full_steps"], r["psnr"]) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), label=m, **_style(m))
    ax.set_xlabel("T / N_full (full transformer evaluations saved)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Fidelity at equal full-step budgets (held-out prompts and seeds)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_schedules(residual_change: np.ndarray, rows: Sequence[dict], speedup: float,
                   path: str | os.PathLike) -> Path:
    """Top: the per-step residual change on calibration; bottom: every method's schedule at ``speedup``.

    Dark cells compute the block stack; for TeaCache the shade is the fraction
    of held-out samples computing at that step.
    """
    sel = [r for r in rows if r["speedup_target"] == speedup and r["method"] != "uncached"]
    steps = len(residual_change)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 2.4 + 0.3 * len(sel)), sharex=True, constrained_layout=True,
                                   gridspec_kw={"height_ratios": [2, max(1, 0.25 * len(sel))]})
    ax1.plot(np.arange(1, steps), residual_change[1:], ".-", color="tab:red")
    ax1.set_ylabel("||r_i - r_(i-1)||_1 / ||r_i||_1")
    ax1.set_yscale("log")
    ax1.grid(alpha=0.3)
    ax1.set_title(f"Per-step residual change (uncached calibration) and schedules at {speedup:g}x")
    grid = np.array([r["schedule"] for r in sel], dtype=float)  # (methods, T)
    ax2.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
               extent=(-0.5, steps - 0.5, len(sel) - 0.5, -0.5))
    ax2.set_yticks(range(len(sel)))
    ax2.set_yticklabels([f"{r['method']} ({r['full_steps']:.4g})" for r in sel], fontsize=8)
    ax2.set_xlabel("step (dark: full step)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def sample_strip(frames: dict[str, np.ndarray], gif_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """One held-out video per method: a GIF (side by side, in ``frames`` order) and a labelled PNG grid."""
    names = list(frames)
    stack = np.stack([frames[n] for n in names])  # (M, F, H, W, 3)
    save_video(stack, gif_path)
    m, f = stack.shape[:2]
    fig, axes = plt.subplots(m, f, figsize=(0.8 * f + 2.2, 0.8 * m), squeeze=False)
    for i, name in enumerate(names):
        for j in range(f):
            ax = axes[i, j]
            ax.imshow(stack[i, j], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.22, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
