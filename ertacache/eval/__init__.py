"""Fidelity harness: ERTACache against caching baselines at an equal budget of full steps.

Data flow (one calibration set, one held-out set, every method at the same
number of full transformer evaluations):

    record      one uncached pass over the calibration prompts: the open-loop
                error matrix plus the baselines' signals (TeaCache's modulated
                input change; MagCache's residual magnitude ratios, reported)
    plans       what a method runs: a static mask + step tables (run by the
                product's own CachedSampler), for TeaCache a per-sample
                run-time rule, for a peer its library's hooks
    baselines   hand-written where no library has the method: fewer steps,
                uniform reuse and TeaCache-style (dynamic), each solved for
                the full-step budget
    peers       the real peer libraries (diffusers TaylorSeer, FirstBlockCache,
                MagCache; cache-dit DBCache), run from the installed packages
                and tuned to the budget by counting block executions
    methods     registry: method name -> plan for a target speedup
    fidelity    PSNR / SSIM against the uncached sample of the same seed,
                the testbed's judge (wan2.1-tiny: digit and motion accuracy;
                wan2.1-small: one accuracy per prompt attribute)
    harness     the (method x speedup) loop; studies and timing build on it
    plots       PSNR vs speedup, per-step errors with every schedule, GIF strip

LPIPS is not measured: it needs pretrained network weights that cannot be
fetched on these machines (see docs/results.md).
"""

from ertacache.eval.config import ALL_METHODS, EvalConfig, PeerConfig, TeaCacheConfig, parse_methods

__all__ = ["ALL_METHODS", "EvalConfig", "PeerConfig", "TeaCacheConfig", "parse_methods"]
