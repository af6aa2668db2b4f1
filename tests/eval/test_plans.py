import numpy as np
import pytest
import torch

from ertacache.errors import UserError
from ertacache.eval.plans import StaticPlan, fewer_steps_plan, plain_tables, reuse_plan, uniform_mask
from ertacache.models.adapter import adapter_for
from ertacache.sampling import CachedSampler, initial_latents, nominal_sigmas
from tests.conftest import tiny_wan


@pytest.mark.parametrize("steps", [2, 7, 10, 50])
def test_uniform_mask_hits_every_budget_exactly_and_evenly(steps):
    for n in range(2, steps + 1):
        mask = uniform_mask(steps, n)
        assert sum(mask) == n and mask[0] and mask[-1]
        gaps = np.diff(np.flatnonzero(mask))
        assert gaps.max() - gaps.min() <= 1  # as even as an integer budget allows


def test_uniform_mask_refuses_impossible_budgets():
    with pytest.raises(UserError, match="2..10"):
        uniform_mask(10, 1)


@pytest.mark.parametrize("steps, n", [(50, 25), (50, 17), (10, 3)])
def test_fewer_steps_plan_has_exactly_the_budget(steps, n):
    plan = fewer_steps_plan(steps, n, 3.0, 2, 4)
    assert plan.full_steps == n and len(plan.mask) == n
    np.testing.assert_allclose(plan.tables.sigmas.numpy(), nominal_sigmas(n, 3.0), rtol=1e-6)
    assert len(plan.grid_mask) == steps and sum(plan.grid_mask) == n and plan.grid_mask[0]


def test_static_plans_run_the_product_sampler():
    """A baseline is the CachedSampler with unit phi and zero correction: identical outputs."""
    adapter = adapter_for(tiny_wan(seed=1))
    noise = initial_latents((4, 2, 8, 8), [5, 6])
    text = torch.randn(4, 5, 16)
    sig = nominal_sigmas(6, 3.0)
    mask = (True, False, True, False, False, True)
    out = reuse_plan(mask, sig, 2, 4).sample(adapter, noise, text, 4.0)
    ref = CachedSampler(adapter, plain_tables(sig, 2, 4), mask)(noise, text, 4.0)
    torch.testing.assert_close(out.latents, ref.latents, rtol=0, atol=0)
    assert out.computed.shape == (2, 6) and (out.computed.sum(1) == 3).all()
    full = StaticPlan((True,) * 6, plain_tables(sig, 2, 4)).sample(adapter, noise, text, 4.0)
    assert not torch.equal(full.latents, out.latents)
