"""The real peer libraries in the harness: budget counting, equality with uncached at full budget, the extra."""

import importlib.util
import sys

import numpy as np
import pytest
import torch

from ertacache.errors import UserError
from ertacache.eval.config import PEER_METHODS, PEERS, EvalConfig, method_label
from ertacache.eval.harness import evaluate
from ertacache.eval.peers import BlockCounter, PeerPlan, bisect_threshold, solve_peer, taylorseer_peer
from tests.eval.conftest import STEPS, make_ctx

HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None
STATIC = ("diffusers-taylorseer-o1", "diffusers-taylorseer-o2", "diffusers-taylorseer-lite")
PROBED = ("diffusers-fbcache", "cachedit-dbcache", "cachedit-dbcache-taylorseer")  # block 0 runs every step


def needs_library(method):
    if PEERS[method][0] == "cache_dit" and not HAS_CACHE_DIT:
        pytest.skip("cache-dit is not installed (pip install 'ertacache[peers]')")


@pytest.fixture(scope="module")
def ctx():
    return make_ctx(methods=("uniform",), speedups=(2.0, 3.0))


@pytest.fixture(scope="module")
def uncached(ctx):
    """The held-out samples without any hook, taken before any peer touched the transformer."""
    return ctx.reference.latents.clone()


def test_block_counter_counts_real_executions(ctx):
    model = ctx.bundle.transformer
    plan = PeerPlan(taylorseer_peer([f"blocks.{k}" for k in range(len(model.blocks))], 1, interval=2, before=1,
                                    after=None),
                    ctx.calibration.nominal_sigmas, ctx.settings.n_branches)
    out = plan.sample(ctx.bundle.adapter, ctx.held_out.noise[:1], ctx.held_out.chunk(slice(0, 1))[1], 4.0)
    # warm-up step 0, then every 2nd step from step 2: 0, 2, 4, 6 ran the blocks, the rest were predicted
    assert out.computed[0].tolist() == [True, False, True, False, True, False, True, False]
    assert out.block_equivalents.tolist() == [4.0]
    with BlockCounter(model) as counter:  # no hook attached: every call runs every block
        with torch.no_grad():
            ctx.bundle.adapter.forward(ctx.held_out.noise[:1], torch.tensor([500.0]), ctx.held_out.text[:1])
    assert counter.counts.tolist() == [1] * len(model.blocks) and counter.stack_runs == 1
    assert not any(b.ffn._forward_hooks for b in model.blocks)  # the counter removed its hooks


@pytest.mark.slow  # each peer: its tuning runs (calibration probes) and the held-out set at two speedups
@pytest.mark.parametrize("method", PEER_METHODS)
def test_each_peer_is_tuned_to_the_budget_by_counting(ctx, uncached, method):
    needs_library(method)
    for speedup, budget in ((2.0, 4), (3.0, 3)):
        row, run = evaluate(ctx, method, speedup)
        counts = run.computed.sum(axis=1)
        assert row["budget"] == budget and row["implementation"] == method_label(method)
        assert row["implementation"].split()[0] in ("diffusers", "cache-dit")
        assert row["full_steps"] == counts.mean() and row["full_steps_range"] == [counts.min(), counts.max()]
        assert run.computed[:, 0].all()  # the first step always computes
        be = run.block_equivalents
        if method in STATIC:  # a static schedule: exactly the budget on every sample, nothing runs in between
            assert row["info"]["exact_budget"] and (counts == budget).all(), (method, speedup, counts)
            np.testing.assert_array_equal(be, counts)
        elif method == "diffusers-magcache":  # static given its calibrated ratios: the same on every sample
            assert (counts == counts[0]).all() and abs(counts[0] - budget) <= 1
            assert len(row["info"]["mag_ratios"]) == STEPS
            np.testing.assert_array_equal(be, counts)
        else:  # dynamic: solved on calibration; the probe block runs on every step, cached or not
            assert abs(row["info"]["calibration_full_steps"] - budget) <= 1.0
            n_blocks = len(ctx.bundle.transformer.blocks)
            np.testing.assert_allclose(be, counts + (STEPS - counts) / n_blocks)
            assert row["block_equivalents"] > row["full_steps"]
        assert counts.max() < STEPS  # it really cached
        assert 0 < row["psnr_worst"] <= row["psnr"] and row["psnr_pooled"] > 0
    # the shared transformer is left without hooks: the uncached samples are unchanged
    torch.testing.assert_close(ctx.run(ctx.uncached_plan(), ctx.held_out).latents, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("method", PEER_METHODS)
def test_a_peer_at_a_budget_of_all_steps_is_the_uncached_sampler(ctx, uncached, method):
    needs_library(method)
    cand = solve_peer(ctx, method, STEPS)
    out = ctx.run(cand.plan, ctx.held_out)
    assert out.computed.all()
    # the model's own forward vs the adapter's split: the same operations, summed in another order (1e-6
    # held with 2 threads; with 1 thread, as after a CLI test set it, one element in a thousand differs by 1.07e-6)
    torch.testing.assert_close(out.latents, uncached, rtol=0, atol=1e-5)


def test_threshold_bisection_brackets_and_converges():
    def mean_full(t):  # a count that falls with the threshold, like every dynamic peer's
        return 50.0 / (1.0 + 30.0 * t)

    t, n, used = bisect_threshold(mean_full, 25.0, 0.01, 1.0, probes=30, tolerance=0.25)
    assert abs(n - 25.0) <= 0.25 and used <= 30 and t == pytest.approx(1 / 30, rel=0.05)
    t, n, used = bisect_threshold(mean_full, 49.9, 0.01, 0.02, probes=30, tolerance=0.05)  # widens lo
    assert abs(n - 49.9) <= 0.05 and t < 0.01


def test_missing_peers_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # what an environment without the extra sees
    cfg = dict(speedups=(2.0,), calibration_prompts=["a"], held_out_prompts=["b"], held_out_seeds=[1000])
    with pytest.raises(UserError, match=r"pip install 'ertacache\[peers\]'"):
        EvalConfig(methods=("uniform", "cachedit-dbcache"), **cfg)
    EvalConfig(methods=("builtin", "diffusers-taylorseer-o1"), **cfg)  # diffusers' peers need no extra


def test_cache_dit_leaves_no_patched_forward_behind_on_flux():
    """cache-dit replaces FluxTransformer2DModel.forward on the instance and its disable_cache keeps it; the
    peer puts the model's own forward back, so a diffusers hook attached next sees the model it expects."""
    if not HAS_CACHE_DIT:
        pytest.skip("cache-dit is not installed (pip install 'ertacache[peers]')")
    from ertacache.eval.peers import CacheDitPeer
    from tests.models.test_flux_adapter import tiny_flux

    model = tiny_flux(False)
    peer = CacheDitPeer(threshold=0.1)
    peer.attach(model, 8)
    assert "forward" in model.__dict__, "cache-dit no longer patches FLUX's forward: this test checks nothing now"
    peer.detach(model)
    assert "forward" not in model.__dict__ and "_is_patched" not in model.__dict__


def test_diffusers_peers_hook_hunyuanvideos_two_block_stacks():
    """The family's block_stacks name HunyuanVideo's double- then single-stream blocks: TaylorSeer computes on
    its schedule, FirstBlockCache's probe block counts as half a stack (two blocks), and nothing is left attached."""
    from ertacache.eval.peers import PeerPlan, fbcache_peer, stack_blocks
    from ertacache.models.adapter import adapter_for
    from tests.models.test_hunyuan_video import hunyuan_cond, tiny_hunyuan

    model = tiny_hunyuan()
    adapter = adapter_for(model)
    names = [n for n, _ in stack_blocks(model)]
    assert names == ["transformer_blocks.0", "single_transformer_blocks.0"]
    sigmas = adapter.family.sigmas(8, shift=7.0)
    noise = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = hunyuan_cond(1)
    out = PeerPlan(taylorseer_peer(names, 1, interval=2, before=1, after=None), sigmas, 1).sample(adapter, noise, cond, 6.0)
    assert out.computed[0].tolist() == [True, False] * 4 and out.block_equivalents.tolist() == [4.0]
    out = PeerPlan(fbcache_peer(1e9), sigmas, 1).sample(adapter, noise, cond, 6.0)  # threshold never met: reuse
    assert out.computed[0].tolist() == [True] + [False] * 7 and out.block_equivalents.tolist() == [1 + 7 / 2]
    with torch.no_grad():
        plain = PeerPlan(fbcache_peer(0.0), sigmas, 1).sample(adapter, noise, cond, 6.0)  # threshold 0: never reuse
    assert plain.computed.all()


def test_diffusers_peers_hook_cogvideox_through_its_own_forward():
    """CogVideoX's peers run the model's own (DDPM) forward, seen in flow-matching coordinates like the split:
    with every step computed the peer's sample is the project's uncached sampler's; TaylorSeer computes on its
    schedule over the joint text + video blocks."""
    from ertacache.eval.peers import PeerPlan, fbcache_peer, stack_blocks
    from ertacache.models.adapter import adapter_for
    from ertacache.sampling import CachedSampler
    from ertacache.sampling.steps import StepTables
    from tests.models.test_cogvideox_adapter import LATENT, TEXT_DIM, TEXT_LEN, tiny_cogvideox

    model = tiny_cogvideox(True)
    adapter = adapter_for(model)
    names = [n for n, _ in stack_blocks(model)]
    assert names == ["transformer_blocks.0", "transformer_blocks.1"]
    sigmas = adapter.own_sigmas(10)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, *LATENT, generator=g)
    text = torch.randn(2, TEXT_LEN, TEXT_DIM, generator=g)  # cond, uncond
    out = PeerPlan(taylorseer_peer(names, 1, interval=2, before=1, after=None), sigmas, 2).sample(adapter, noise, text, 6.0)
    assert out.computed[0].tolist() == [True, False] * 5
    with torch.no_grad():
        plain = PeerPlan(fbcache_peer(0.0), sigmas, 2).sample(adapter, noise, text, 6.0)  # threshold 0: never reuse
        ours = CachedSampler(adapter, StepTables(sigmas, n_branches=2, channels=LATENT[0]), [True] * 10)(
            noise, text, 6.0).latents
    assert plain.computed.all()
    torch.testing.assert_close(plain.latents, ours, rtol=1e-4, atol=1e-4)
