"""Real peer caching libraries, run from the installed packages at the harness's full-step budget.

Peers (the optional extra ``pip install 'ertacache[peers]'``; diffusers itself is a core dependency):

    diffusers-taylorseer-o1/o2   diffusers ``TaylorSeerCacheConfig``, Taylor order 1 or 2, pointed at the
                                 block stack: the last block is predicted (Taylor series of its output over the
                                 steps), the others are skipped. Its default module patterns match nothing on
                                 Wan (``^blocks.*attn`` must fullmatch, Wan's are ``blocks.0.attn1``), so left
                                 alone it silently runs uncached.
    diffusers-taylorseer-lite    the same hook in its lite mode (blocks skipped, ``proj_out`` predicted), order 1
    diffusers-fbcache            diffusers ``FirstBlockCacheConfig`` (dynamic; block 0 always runs)
    diffusers-magcache           diffusers ``MagCacheConfig`` after its calibration run on the calibration prompts
    cachedit-dbcache             cache-dit ``DBCacheConfig`` (F1B0, dynamic; block 0 always runs)
    cachedit-dbcache-taylorseer  the same with cache-dit's ``TaylorSeerCalibratorConfig`` (order 1)

Every peer runs the transformer's own forward with the library's hooks attached, inside the same
flow-matching Euler loop with batched CFG (both branches in one call, as every method here) over the
nominal sigmas. The hooks are attached for one plan call and removed afterwards, so the shared
transformer stays uncached for the other methods, and each sample starts from a reset cache.

**Budget by counting.** What a peer computes is measured, not inferred from its settings: a forward
hook on each block's feed-forward sub-layer counts the blocks that actually ran (a hook that skips a
block never calls its sub-layers). A step ran the block stack when the last block ran; the counts of
all blocks, divided by the number of blocks, give the block-equivalent compute, which exceeds the
full-step count for methods that always run probe blocks (FirstBlockCache, DBCache). Each peer's knob
is then solved for the budget round(T / speedup): TaylorSeer's static schedule exactly (its interval
and warm-up are searched by counting; where several settings hit the budget the one with the lowest
error on calibration prompts is kept), MagCache's threshold (static given its calibrated ratios) to
the nearest reachable count, and the dynamic thresholds (FirstBlockCache, DBCache) by closed-loop
bisection on the calibration prompts; their held-out mean and range are reported.

Dynamic peers decide per model call over the whole batch, so they sample one prompt per call (its two
CFG rows together): a sample's decisions never depend on another's. The static ones (TaylorSeer,
calibrated MagCache) sample a micro-batch per call, as the built-in methods do.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ertacache.errors import UserError
from ertacache.eval.config import PEER_METHODS, PEERS
from ertacache.eval.plans import PlanOutput
from ertacache.models.family import family_for_model
from ertacache.sampling.steps import (
    combine_cfg, conditioning_dtype, conditioning_rows, euler, expand_branches, model_timestep, step_conditioning,
    timestep_scale,
)

EXTRA_HINT = "pip install 'ertacache[peers]'"
#: the versions the [peers] extra pins; others run but are labelled with what is installed
PINNED = {"diffusers": "0.42.1", "cache_dit": "1.5.3"}
_DIFFUSERS_NEEDS = ("TaylorSeerCacheConfig", "FirstBlockCacheConfig", "MagCacheConfig")
_CONTEXT = "ertacache-eval"  # the diffusers cache-context name every peer call runs under


def _library(module: str):
    """Import a peer library or raise a UserError naming the extra (no traceback reaches the user)."""
    try:
        lib = importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"the peer methods need the optional dependencies of the 'peers' extra ({module} "
                        f"{PINNED[module]} is not importable: {err}); install them with {EXTRA_HINT}, or leave "
                        f"the peers out (--methods builtin)") from None
    if module == "diffusers" and not all(hasattr(lib, n) for n in _DIFFUSERS_NEEDS):
        raise UserError(f"diffusers {lib.__version__} lacks {', '.join(_DIFFUSERS_NEEDS)}; the peers need diffusers "
                        f"{PINNED['diffusers']}: {EXTRA_HINT}")
    return lib


def require_peers(methods) -> None:
    """Refuse, before any compute, peer methods whose library is missing."""
    for module in dict.fromkeys(PEERS[m][0] for m in methods if m in PEERS):
        _library(module)


def peer_label(method: str) -> str:
    """'diffusers 0.42.1 TaylorSeer o1': library, installed version, method."""
    module, what = PEERS[method]
    lib = _library(module)
    name = "cache-dit" if module == "cache_dit" else module
    return f"{name} {getattr(lib, '__version__', '?')} {what}"


@contextlib.contextmanager
def quiet_libraries():
    """Keep the peers' chatter (cache-dit logs every attach at INFO; diffusers' MagCache prints) off the console."""
    # cache-dit gives every module its own non-propagating logger (named after the module), so each is quietened
    names = [n for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    loggers = [logging.getLogger(n) for n in ("CACHE_DIT", "diffusers.hooks", *names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # cache-dit warns on every attach/detach about what this harness does on purpose
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---- counting what ran -------------------------------------------------------------------------------------


def stack_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer's blocks in execution order, with their module names (the family's ``block_stacks``:
    Wan ``blocks.k``; FLUX ``transformer_blocks.k`` then ``single_transformer_blocks.k``)."""
    family = family_for_model(model)
    out = []
    for attr in family.block_stacks:
        stack = getattr(model, attr, None)
        if not isinstance(stack, nn.ModuleList):
            raise UserError(f"{type(model).__name__} has no block list {attr!r} (the {family.name} family's "
                            f"block_stacks {list(family.block_stacks)}); the peer harness counts block executions there")
        out.extend((f"{attr}.{k}", block) for k, block in enumerate(stack))
    if not out:
        raise UserError(f"{type(model).__name__} has no blocks in {list(family.block_stacks)}")
    return out


def _probe_layer(block: nn.Module) -> nn.Module:
    """The sub-layer whose call proves the block ran: its feed-forward (every DiT block has one, called once;
    FLUX's single-stream blocks run theirs in parallel with attention, as ``proj_mlp``)."""
    for name in ("ffn", "ff", "proj_mlp"):
        sub = getattr(block, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise UserError(f"block {type(block).__name__} has no feed-forward sub-layer 'ffn', 'ff' or 'proj_mlp' to count "
                    "calls of")


class BlockCounter:
    """Counts, per block of the stack, how often it really computed (a forward hook on its feed-forward).

    A block's own forward hook would not do: the caching hooks replace a block's forward, and
    ``nn.Module.__call__`` fires forward hooks even when the replacement returned a cached value.
    Use as a context manager: the hooks are removed on exit.
    """

    def __init__(self, model: nn.Module):
        self.blocks = [block for _, block in stack_blocks(model)]
        self.counts = np.zeros(len(self.blocks), dtype=np.int64)
        self._handles: list = []

    def __enter__(self) -> "BlockCounter":
        for k, block in enumerate(self.blocks):
            self._handles.append(_probe_layer(block).register_forward_hook(self._hook(k)))
        return self

    def _hook(self, k: int):
        def count(module, args, output):
            self.counts[k] += 1

        return count

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def stack_runs(self) -> int:
        """Executions of the whole stack: the last block runs only when the stack is computed."""
        return int(self.counts[-1])

    @property
    def block_equivalents(self) -> float:
        """Blocks that ran, in units of the whole stack."""
        return float(self.counts.sum()) / len(self.counts)


# ---- the peers: attach, reset, detach -----------------------------------------------------------------------


class Peer:
    """One library configuration: how to attach it, reset it between samples and remove it.

    per_sample: run one prompt per model call. Needed where the library decides at run time from the
    whole call's tensors (FirstBlockCache, DBCache): batched, one sample's decision would depend on the
    others. A static schedule (TaylorSeer, calibrated MagCache) decides from the step index alone and
    predicts element-wise, so it samples a whole micro-batch per call like the built-in methods.
    """

    per_sample: bool = True

    def attach(self, model: nn.Module, steps: int) -> None:
        raise NotImplementedError

    def before_sample(self, model: nn.Module, steps: int) -> None:
        pass

    def after_sample(self, model: nn.Module) -> None:
        pass

    def detach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError


@dataclass
class DiffusersPeer(Peer):
    """A diffusers cache config, attached with ``enable_cache`` (the public ModelMixin API)."""

    make_config: Callable[[int], object]  # steps -> the config object
    knobs: dict = field(default_factory=dict)
    per_sample: bool = True

    def attach(self, model, steps):
        model.enable_cache(self.make_config(steps))

    def after_sample(self, model):
        # What DiffusionPipeline.maybe_free_model_hooks does after every call: reset stateful hooks.
        model._reset_stateful_cache()

    def detach(self, model):
        model.disable_cache()

    def settings(self) -> dict:
        return dict(self.knobs)


_UNSET = object()  # "this module had no instance attribute of that name"


@dataclass
class CacheDitPeer(Peer):
    """A cache-dit DBCache config on the transformer alone."""

    threshold: float
    taylorseer: bool = False
    fn_blocks: int = 1
    warmup_steps: int = 1

    def _configs(self, steps: int):
        cache_dit = _library("cache_dit")
        cache = cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.fn_blocks, Bn_compute_blocks=0, residual_diff_threshold=float(self.threshold),
            max_warmup_steps=self.warmup_steps,
            enable_separate_cfg=False,  # both CFG branches come in one batched call (cache-dit assumes two on Wan)
            num_inference_steps=steps)
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if self.taylorseer else None
        return cache, calibrator

    def attach(self, model, steps):
        # cache-dit patches some models' forward methods (FLUX: the transformer's, as an instance attribute)
        # and disable_cache leaves them in place; keep what was there to put it back in detach
        self._forwards = {name: (m, m.__dict__.get("forward", _UNSET)) for name, m in model.named_modules()}
        self._was_patched = model.__dict__.get("_is_patched", _UNSET)
        cache, calibrator = self._configs(steps)
        _library("cache_dit").enable_cache(model, cache_config=cache, calibrator_config=calibrator)

    def before_sample(self, model, steps):
        # Used on the transformer alone, cache-dit's automatic reset fires one call late (the first step of a
        # sample would reuse the previous sample's cache): rebuild the context before each sample.
        _library("cache_dit").refresh_context(model, num_inference_steps=steps)

    def detach(self, model):
        _library("cache_dit").disable_cache(model)
        for module, forward in getattr(self, "_forwards", {}).values():  # undo the forward patches
            if forward is _UNSET:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        if getattr(self, "_was_patched", _UNSET) is _UNSET:
            model.__dict__.pop("_is_patched", None)
        self._forwards = {}

    def settings(self) -> dict:
        return {"residual_diff_threshold": self.threshold, "Fn_compute_blocks": self.fn_blocks,
                "Bn_compute_blocks": 0, "max_warmup_steps": self.warmup_steps, "enable_separate_cfg": False,
                "taylorseer_order": 1 if self.taylorseer else None}


def taylorseer_peer(block_names: Sequence[str], order: int, interval: int, before: int, after: int | None,
                    lite: bool = False) -> DiffusersPeer:
    """TaylorSeer on the block stack: predict the last block, skip the others (or the library's lite mode).

    block_names: the stack's module names in execution order (:func:`stack_blocks`).
    """
    diffusers = _library("diffusers")
    knobs = {"cache_interval": interval, "disable_cache_before_step": before, "disable_cache_after_step": after,
             "max_order": order, "taylor_factors_dtype": "float32", "use_lite_mode": lite}
    if not lite:
        knobs["cache_identifiers"] = [re.escape(block_names[-1])]
        knobs["skip_predict_identifiers"] = [re.escape(n) for n in block_names[:-1]]

    def make(steps: int):
        kw = {k: v for k, v in knobs.items() if k != "taylor_factors_dtype"}
        return diffusers.TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **kw)

    return DiffusersPeer(make, knobs, per_sample=False)


def fbcache_peer(threshold: float) -> DiffusersPeer:
    diffusers = _library("diffusers")
    return DiffusersPeer(lambda steps: diffusers.FirstBlockCacheConfig(threshold=float(threshold)),
                         {"threshold": float(threshold)})


def magcache_peer(ratios, threshold: float, max_skip: int, retention: float) -> DiffusersPeer:
    diffusers = _library("diffusers")
    knobs = {"threshold": float(threshold), "max_skip_steps": int(max_skip), "retention_ratio": float(retention)}

    def make(steps: int):
        return diffusers.MagCacheConfig(num_inference_steps=steps, mag_ratios=list(map(float, ratios)), **knobs)

    return DiffusersPeer(make, knobs, per_sample=False)


def magcache_calibrator() -> DiffusersPeer:
    diffusers = _library("diffusers")
    return DiffusersPeer(lambda steps: diffusers.MagCacheConfig(num_inference_steps=steps, calibrate=True),
                         {"calibrate": True})


# ---- sampling ------------------------------------------------------------------------------------------------


def model_velocity(adapter, x_in: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
    """The transformer's own forward as its pipeline calls it (``ModelAdapter.model_forward``), so the peers'
    hooks see a normal call."""
    return adapter.model_forward(x_in, timestep, cond)


@dataclass
class PeerPlan:
    """A peer with fixed settings over the nominal sigma table (one prompt per call where it must be)."""

    peer: Peer
    sigmas: np.ndarray  # (T+1,)
    n_branches: int
    info_extra: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def info(self) -> dict:
        return {**self.peer.settings(), **self.info_extra}

    @torch.no_grad()
    def sample(self, adapter, noise, text, guidance_scale) -> PlanOutput:
        model, nb, steps, batch = adapter.model, self.n_branches, self.steps, noise.shape[0]
        sig = torch.as_tensor(np.asarray(self.sigmas, dtype=np.float64), dtype=torch.float32, device=noise.device)
        g = torch.tensor(float(guidance_scale), device=noise.device)
        computed = np.zeros((batch, steps), dtype=bool)
        blocks = np.zeros(batch)
        outs = []
        scale = timestep_scale(adapter)  # the family's: the model embeds sigma * scale
        with quiet_libraries(), BlockCounter(model) as counter:
            self.peer.attach(model, steps)
            try:
                groups = [slice(k, k + 1) for k in range(batch)] if self.peer.per_sample else [slice(0, batch)]
                for sl in groups:
                    self.peer.before_sample(model, steps)
                    start_blocks = counter.block_equivalents
                    x = noise[sl].float()  # (b, C, [F,] H, W)
                    txt = conditioning_rows(adapter.family, text, sl, nb, batch)  # Wan: (nb*b, L, D)
                    for i in range(steps):
                        x_in = expand_branches(x, nb).to(conditioning_dtype(txt))  # (nb*b, C, [F,] H, W)
                        cond = step_conditioning(adapter.family, txt, g, x_in.shape[0], cached=False)
                        before = counter.stack_runs
                        with model.cache_context(_CONTEXT):
                            v = model_velocity(adapter, x_in, model_timestep(sig[i], x_in.shape[0], scale), cond).float()
                        computed[sl, i] = counter.stack_runs > before  # one call serves every sample of the group
                        x = euler(x, combine_cfg(v, g, nb), sig[i], sig[i + 1])
                    blocks[sl] = counter.block_equivalents - start_blocks
                    self.peer.after_sample(model)
                    outs.append(x)
            finally:
                self.peer.detach(model)
        return PlanOutput(torch.cat(outs), computed, block_equivalents=blocks)


# ---- solving each peer for the budget ---------------------------------------------------------------------------


def _first_sample(cal):
    return cal.latent_rows(slice(0, 1)), cal.text_rows(slice(0, 1))


def count_once(ctx, peer: Peer) -> int:
    """Full steps the peer computes on one calibration sample (static schedules: the same on every sample)."""
    plan = PeerPlan(peer, ctx.calibration.nominal_sigmas, ctx.settings.n_branches)
    noise, text = _first_sample(ctx.calibration)
    return int(plan.sample(ctx.bundle.adapter, noise, text, ctx.settings.guidance_scale).computed.sum())


def calibration_error(ctx, plan: PeerPlan, prompts: int) -> float:
    """Mean squared latent error against the uncached samples of the first ``prompts`` calibration prompts."""
    cal = ctx.calibration
    n = min(prompts, cal.prompts)
    ref = ctx.calibration_reference(n)
    out = plan.sample(ctx.bundle.adapter, cal.latent_rows(slice(0, n)), cal.text_rows(slice(0, n)),
                      ctx.settings.guidance_scale)
    return float(((out.latents - ref) ** 2).mean())


def calibration_counts(ctx, plan: PeerPlan) -> np.ndarray:
    """(P,) full steps per calibration prompt (closed loop: the real hook on the calibration prompts)."""
    cal = ctx.calibration
    everyone = slice(0, cal.prompts)  # inputs live on the host; the model's device gets them here
    return plan.sample(ctx.bundle.adapter, cal.latent_rows(everyone), cal.text_rows(everyone),
                       cal.guidance_scale).computed.sum(axis=1)


def bisect_threshold(mean_full: Callable[[float], float], target: float, lo: float, hi: float, probes: int,
                     tolerance: float) -> tuple[float, float, int]:
    """Log-space bisection of a threshold whose full-step count falls as it grows; (threshold, count, probes).

    ``lo`` and ``hi`` are widened (x10) until they bracket ``target``; the probe closest to it is kept.
    """
    best, used = None, 0

    def probe(t: float) -> float:
        nonlocal best, used
        n = mean_full(t)
        used += 1
        if best is None or abs(n - target) < abs(best[1] - target) or (
                abs(n - target) == abs(best[1] - target) and n < best[1]):
            best = (t, n)
        return n

    while probe(hi) > target and used < probes and hi < 1e6:
        hi *= 10.0
    while used < probes and probe(lo) < target and lo > 1e-9:
        lo /= 10.0
    while used < probes and abs(best[1] - target) > tolerance:
        mid = math.sqrt(lo * hi)
        if probe(mid) > target:
            lo = mid
        else:
            hi = mid
    return best[0], best[1], used


@dataclass
class PeerCandidate:
    plan: PeerPlan
    info: dict


def solve_taylorseer(ctx, budget: int, order: int, lite: bool = False) -> PeerCandidate:
    """The static schedule (interval, warm-up, cool-down) that computes exactly ``budget`` steps, by counting.

    For each interval k the warm-up length b with the right count is found by bisection (the count never
    falls as b grows); cool-down is either none (the library's default) or the last step, as for the other
    methods here. Among the settings that hit the budget, the lowest latent error on calibration prompts wins.
    """
    steps, names = ctx.steps, [n for n, _ in stack_blocks(ctx.bundle.transformer)]
    tcfg = ctx.config.peers
    sig, nb = ctx.calibration.nominal_sigmas, ctx.settings.n_branches

    def make(k, b, a):
        return taylorseer_peer(names, order, k, b, a, lite)

    exact, nearest, counted = [], None, 0
    for after in (None, steps - 1):
        for k in range(2, steps):
            lo, hi = max(1, order), steps - 1  # warm-up >= order: the first prediction needs its factors
            if lo > hi:
                continue
            memo = {}

            def count(b, k=k, after=after, memo=memo):
                nonlocal counted
                if b not in memo:
                    memo[b] = count_once(ctx, make(k, b, after))
                    counted += 1
                return memo[b]

            if count(lo) > budget:  # this interval computes too often even with the shortest warm-up
                if nearest is None or count(lo) - budget < abs(nearest[3] - budget):
                    nearest = (k, lo, after, count(lo))
                continue
            while lo < hi:  # smallest b with count(b) >= budget
                mid = (lo + hi) // 2
                if count(mid) >= budget:
                    hi = mid
                else:
                    lo = mid + 1
            n = count(lo)
            if n == budget:
                exact.append((k, lo, after))
            elif nearest is None or abs(n - budget) < abs(nearest[3] - budget):
                nearest = (k, lo, after, n)
            if len([e for e in exact if e[2] == after]) >= tcfg.taylorseer_candidates:
                break
    candidates = exact or [nearest[:3]]
    scored = []
    for k, b, a in candidates:
        plan = PeerPlan(make(k, b, a), sig, nb)
        scored.append((calibration_error(ctx, plan, tcfg.tune_prompts), plan))
    err, plan = min(scored, key=lambda s: s[0])
    plan.info_extra = {"exact_budget": bool(exact), "schedules_compared": len(candidates),
                       "calibration_latent_mse": err, "count_probes": counted}
    return PeerCandidate(plan, plan.info())


def magcache_ratios(ctx) -> np.ndarray:
    """diffusers' MagCache calibration run on the calibration prompts: (T,) the mean of its per-prompt ratios.

    The library reports the ratios at the end of each calibration run through its logger (and stdout); the
    log record is read here, which is the output the library documents for this step.
    """
    records: list[list[float]] = []

    class Grab(logging.Handler):
        def emit(self, record):
            m = re.search(r"MagCache Calibration Results: (\[.*\])", record.getMessage())
            if m:
                records.append([float(x) for x in m.group(1).strip("[]").split(",") if x.strip()])

    logger = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level, propagate = Grab(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # to this handler only, not the console
    try:
        plan = PeerPlan(magcache_calibrator(), ctx.calibration.nominal_sigmas, ctx.settings.n_branches)
        calibration_counts(ctx, plan)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
    if len(records) != ctx.calibration.prompts or any(len(r) != ctx.steps for r in records):
        raise RuntimeError(f"MagCache calibration reported {len(records)} runs for {ctx.calibration.prompts} prompts")
    return np.mean(np.asarray(records), axis=0)


def solve_magcache(ctx, budget: int) -> PeerCandidate:
    """Threshold for the budget, K (max_skip_steps) raised from the library default only as far as needed."""
    steps, tcfg = ctx.steps, ctx.config.peers
    if ("magcache-ratios",) not in ctx.candidates:
        ctx.candidates[("magcache-ratios",)] = magcache_ratios(ctx)
    ratios = ctx.candidates[("magcache-ratios",)]
    retention = tcfg.magcache_retention
    while retention > 0 and int(retention * steps + 0.5) >= budget:  # the always-computed window must fit
        retention /= 2
    probes = 0

    def count(threshold, k):
        nonlocal probes
        probes += 1
        return count_once(ctx, magcache_peer(ratios, threshold, k, retention))

    k = tcfg.magcache_max_skip
    while count(1e9, k) > budget and k < steps:
        k += 1
    threshold, n, used = bisect_threshold(lambda t: count(t, k), budget, 1e-4, 1.0, tcfg.max_probes * 3, 0.0)
    plan = PeerPlan(magcache_peer(ratios, threshold, k, retention), ctx.calibration.nominal_sigmas,
                    ctx.settings.n_branches)
    plan.info_extra = {"calibration_full_steps": n, "count_probes": probes, "mag_ratios": [float(r) for r in ratios]}
    return PeerCandidate(plan, plan.info())


def solve_dynamic(ctx, budget: int, make: Callable[[float], Peer]) -> PeerCandidate:
    """Threshold whose closed-loop mean full-step count on the calibration prompts is nearest the budget."""
    tcfg = ctx.config.peers
    sig, nb = ctx.calibration.nominal_sigmas, ctx.settings.n_branches

    def mean_full(t: float) -> float:
        return float(calibration_counts(ctx, PeerPlan(make(t), sig, nb)).mean())

    threshold, n, used = bisect_threshold(mean_full, budget, 0.01, 1.0, tcfg.max_probes, tcfg.tolerance)
    plan = PeerPlan(make(threshold), sig, nb)
    plan.info_extra = {"calibration_full_steps": n, "probes": used}
    return PeerCandidate(plan, plan.info())


def solve_peer(ctx, method: str, budget: int) -> PeerCandidate:
    """The peer ``method`` tuned to ``budget`` full steps (see the module docstring)."""
    require_peers([method])
    warm = ctx.config.warmup_steps
    if method == "diffusers-taylorseer-o1":
        cand = solve_taylorseer(ctx, budget, 1)
    elif method == "diffusers-taylorseer-o2":
        cand = solve_taylorseer(ctx, budget, 2)
    elif method == "diffusers-taylorseer-lite":
        cand = solve_taylorseer(ctx, budget, 1, lite=True)
    elif method == "diffusers-fbcache":
        cand = solve_dynamic(ctx, budget, fbcache_peer)
    elif method == "diffusers-magcache":
        cand = solve_magcache(ctx, budget)
    elif method == "cachedit-dbcache":
        cand = solve_dynamic(ctx, budget, lambda t: CacheDitPeer(t, taylorseer=False, warmup_steps=warm))
    elif method == "cachedit-dbcache-taylorseer":
        cand = solve_dynamic(ctx, budget, lambda t: CacheDitPeer(t, taylorseer=True, warmup_steps=warm))
    else:
        raise ValueError(f"unknown peer {method!r}; choose from {', '.join(PEER_METHODS)}")
    cand.info["implementation"] = peer_label(method)
    return cand
