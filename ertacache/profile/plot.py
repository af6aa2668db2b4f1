"""The picture of a profile: per-step errors with the reuse schedule marked."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_profile(profile, path: str | os.PathLike) -> None:
    """Two panels: residual errors vs lambda (top), phi and sigma tables (bottom)."""
    steps = np.arange(profile.steps)
    mask = np.asarray(profile.mask, dtype=bool)
    stats = profile.stats
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, constrained_layout=True)

    for i in np.flatnonzero(mask):
        ax1.axvspan(i - 0.5, i + 0.5, color="tab:blue", alpha=0.12, lw=0)
    if "residual_change" in stats:
        ax1.plot(steps, stats["residual_change"], "-", color="gray", label="residual change r_i vs r_(i-1)")
    if "residual_error" in stats:
        err = np.asarray(stats["residual_error"])
        ax1.plot(steps[~mask], err[~mask], "o", color="tab:red", ms=4, label="cached residual error (reused steps)")
    ax1.axhline(profile.lam, color="tab:red", ls="--", lw=1, label=f"lambda = {profile.lam:.4g}")
    experts = getattr(profile, "experts", None)
    for b in (experts.starts[1:] if experts is not None else ()):  # a two-expert model's switch
        for ax in (ax1, ax2):
            ax.axvline(b - 0.5, color="tab:purple", lw=1.5, label="expert switch" if ax is ax1 else None)
    ax1.set_ylabel("relative L1")
    ax1.set_title(
        f"{profile.model}: {profile.full_steps}/{profile.steps} full steps (shaded), "
        f"T/N_full = {profile.speedup_steps:.2f}"
    )
    ax1.legend(fontsize=8, loc="upper left")

    ax2.plot(steps, profile.phi, "o-", ms=3, color="tab:green", label="phi (interval scale)")
    ax2.set_ylabel("phi")
    ax2.set_xlabel("step")
    ax3 = ax2.twinx()
    ax3.plot(np.arange(profile.steps + 1), profile.nominal_sigmas, color="gray", lw=1, label="nominal sigma")
    ax3.plot(np.arange(profile.steps + 1), profile.sigmas, color="black", lw=1, ls="--", label="adjusted sigma")
    ax3.set_ylabel("sigma")
    lines = ax2.get_legend_handles_labels()
    lines3 = ax3.get_legend_handles_labels()
    ax2.legend(lines[0] + lines3[0], lines[1] + lines3[1], fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    plt.close(fig)
