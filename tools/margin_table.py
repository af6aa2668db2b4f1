#!/usr/bin/env python
"""Margin of one method over another, pooled over several `ertacache-eval --json` runs (one per seed set).

    python tools/margin_table.py s1000.json s2000.json s3000.json \
        --method erta-t2-closed-full --against cachedit-dbcache-taylorseer

Why: on a near-lossless testbed one held-out video that drifts scores 20-30 dB below the rest, so
a 16-sample mean moves by a dB or more from one seed set to the next. A claim such as "+1 dB over
the best peer" needs the margin over every sample measured, and how sure that figure is. The table
gives, per file and for all samples together: each method's mean / worst / pooled PSNR, the
margin of the means, the median per-sample margin (what a typical video gains), how many samples
the method wins, and a 95 % paired bootstrap interval of the mean margin (scipy.stats.bootstrap,
resampling held-out samples; both methods are scored on the same samples, so the pairs resample
together).

Both methods must come from the same run of each file (same reference, calibration and samples);
a file without both rows at a speedup is refused with the row it lacks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def pooled(psnrs: np.ndarray) -> float:
    """PSNR of the mean MSE: every video has the same size, so MSE_k = 10^(-PSNR_k / 10)."""
    return float(-10 * math.log10(np.mean(10 ** (-psnrs / 10))))


def per_sample(doc: dict, method: str, speedup: float, name: str) -> np.ndarray:
    for r in doc["rows"]:
        if r["method"] == method and math.isclose(r["speedup_target"], speedup) and r.get("psnr_per_sample"):
            return np.asarray(r["psnr_per_sample"], dtype=np.float64)
    raise SystemExit(f"error: {name} has no per-sample PSNR for {method} at {speedup:g}x; "
                     f"run ertacache-eval with --methods including {method} and --speedups including {speedup:g}")


def speedups_of(doc: dict, method: str) -> list[float]:
    return sorted({r["speedup_target"] for r in doc["rows"] if r["method"] == method})


def margin_interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % paired percentile-bootstrap interval of mean(a) - mean(b), resampling the samples."""
    from scipy.stats import bootstrap

    if len(a) < 2:
        return float("nan"), float("nan")
    res = bootstrap((a, b), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis), paired=True,
                    vectorized=True, n_resamples=9999, confidence_level=0.95, random_state=seed, method="percentile")
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def row(label: str, a: np.ndarray, b: np.ndarray) -> list[str]:
    lo, hi = margin_interval(a, b)
    d = a - b
    return [label, str(len(a)), f"{a.mean():.2f} / {a.min():.2f} / {pooled(a):.2f}",
            f"{b.mean():.2f} / {b.min():.2f} / {pooled(b):.2f}", f"{d.mean():+.2f}", f"[{lo:+.2f}, {hi:+.2f}]",
            f"{np.median(d):+.2f}", f"{int((d > 0).sum())}/{len(d)}"]


def table(files: list[Path], method: str, against: str) -> str:
    docs = [(f.name, json.loads(f.read_text())) for f in files]
    common = set.intersection(*(set(speedups_of(doc, method)) for _, doc in docs))
    speedups = sorted(common)  # the speedups every file measured
    if not speedups:
        raise SystemExit(f"error: no speedup has a {method} row in every file")
    head = ["seed set", "samples", f"{method} mean / worst / pooled", f"{against} mean / worst / pooled",
            "margin of means", "95 % interval", "median margin", "wins"]
    out = []
    for s in speedups:
        out += [f"### {s:g}x", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        all_a, all_b = [], []
        for name, doc in docs:
            a, b = per_sample(doc, method, s, name), per_sample(doc, against, s, name)
            if a.shape != b.shape:
                raise SystemExit(f"error: {name}: {method} and {against} scored different sample counts at {s:g}x")
            all_a.append(a)
            all_b.append(b)
            out.append("| " + " | ".join(row(name, a, b)) + " |")
        if len(docs) > 1:
            out.append("| " + " | ".join(row("**all**", np.concatenate(all_a), np.concatenate(all_b))) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path, help="ertacache-eval --json outputs, one per held-out seed set")
    p.add_argument("--method", default="erta-t2-closed-full")
    p.add_argument("--against", default="cachedit-dbcache-taylorseer")
    args = p.parse_args(argv)
    for f in args.files:
        if not f.is_file():
            raise SystemExit(f"error: {f} does not exist; pass the --json file of an ertacache-eval run")
    print(table(args.files, args.method, args.against))
    return 0


if __name__ == "__main__":
    sys.exit(main())
