"""Fidelity harness: ERTACache against caching baselines at an equal budget of full steps.

Data flow (one calibration set, one held-out set, every method at the same
number of full transformer evaluations):

    record      one uncached pass over the calibration prompts: the open-loop
                error matrix plus the baselines' signals (TeaCache's modulated
                input change, MagCache's residual magnitude ratios)
    plans       what a method runs: a static mask + step tables (run by the
                product's own CachedSampler) or, for TeaCache, a per-sample
                run-time rule
    baselines   fewer steps, uniform reuse, MagCache-style (static) and
                TeaCache-style (dynamic), each solved for the full-step budget
    methods     registry: method name -> plan for a target speedup
    fidelity    PSNR / SSIM against the uncached sample of the same seed,
                testbed judge (digit and motion accuracy)
    harness     the (method x speedup) loop; studies and timing build on it
    plots       PSNR vs speedup, per-step errors with every schedule, GIF strip

LPIPS is not measured: it needs pretrained network weights that cannot be
fetched on these machines (see docs/results.md).
"""

from ertacache.eval.config import ALL_METHODS, EvalConfig, MagCacheConfig, TeaCacheConfig, parse_methods

__all__ = ["ALL_METHODS", "EvalConfig", "MagCacheConfig", "TeaCacheConfig", "parse_methods"]
