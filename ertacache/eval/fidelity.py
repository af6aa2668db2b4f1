"""Scores of a batch of generated videos against the uncached samples of the same seeds.

PSNR and SSIM come from scikit-image (:mod:`ertacache.metrics`), averaged per
video as the paper does. Prompt adherence comes from the judge of the testbed
whose prompts these are (:func:`ertacache.testbed.judges.judge_for`): digit per
frame and motion per video for ``wan2.1-tiny`` ("digit 3 moving left"), one
column per attribute for ``wan2.1-small`` ("red circle moving left on flower").
Prompts no testbed judge reads (a real model's) get no adherence columns.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ertacache.metrics import psnr, ssim

#: identical videos have infinite PSNR; averaging needs a finite stand-in
PSNR_CAP_DB = 100.0

LPIPS_NOTE = ("LPIPS not measured: it needs pretrained AlexNet/VGG weights (the lpips package downloads them), "
              "and these machines cannot reach a model hub; PSNR and SSIM are reported instead")


def judge_targets(prompts: Sequence[str]) -> tuple[list[int], list[str]] | None:
    """(digits, directions) if every prompt is a ``wan2.1-tiny`` prompt, else None."""
    from ertacache.testbed.data import parse_prompt

    try:
        parsed = [parse_prompt(p) for p in prompts]
    except ValueError:
        return None
    return [d for d, _ in parsed], [r for _, r in parsed]


def prompt_judge(prompts: Sequence[str]):
    """The testbed judge (:class:`ertacache.testbed.judges.PromptJudge`) that reads ``prompts``, or None."""
    from ertacache.testbed.judges import judge_for

    return judge_for(list(prompts))


def adherence(frames: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """The applicable judge's accuracy columns (e.g. digit_acc, motion_acc; colour_acc, shape_acc, ...), or {}."""
    judge = prompt_judge(prompts)
    return {} if judge is None else judge.score(frames, list(prompts))


def pooled_psnr(reference: np.ndarray, frames: np.ndarray) -> float:
    """PSNR of the MSE pooled over every sample (capped): the tail weighs in, unlike the mean of per-video PSNRs.

    A mean of per-video PSNRs averages logarithms, so a few very good samples hide a bad one; pooling the
    squared error first is what the average error energy says.
    """
    ref = reference.astype(np.float64) / 255.0
    out = frames.astype(np.float64) / 255.0
    mse = float(np.mean((ref - out) ** 2))
    return PSNR_CAP_DB if mse == 0 else min(float(10.0 * np.log10(1.0 / mse)), PSNR_CAP_DB)


def fidelity(reference: np.ndarray, frames: np.ndarray) -> dict[str, float | list[float]]:
    """Per-video PSNR (capped at PSNR_CAP_DB) and SSIM of (B, F, H, W, 3) uint8 against the reference.

    Beside the per-video means: the worst sample of each (the tail a mean hides) and the PSNR of the
    pooled MSE.
    """
    if reference.shape != frames.shape:
        raise ValueError(f"reference {reference.shape} and frames {frames.shape} differ in shape")
    p = [min(psnr(r, f), PSNR_CAP_DB) for r, f in zip(reference, frames)]
    s = [ssim(r, f) for r, f in zip(reference, frames)]
    return {"psnr": float(np.mean(p)), "psnr_std": float(np.std(p)), "ssim": float(np.mean(s)),
            "psnr_worst": float(np.min(p)), "ssim_worst": float(np.min(s)),
            "psnr_pooled": pooled_psnr(reference, frames),
            "psnr_per_sample": [float(x) for x in p], "ssim_per_sample": [float(x) for x in s]}


def score(reference: np.ndarray, frames: np.ndarray, prompts: Sequence[str]) -> dict:
    """fidelity() and adherence() together: the metric columns of one result row."""
    return {**fidelity(reference, frames), **adherence(frames, prompts)}
