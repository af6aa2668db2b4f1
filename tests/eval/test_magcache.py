import numpy as np
import pytest

from ertacache.eval.config import MagCacheConfig
from ertacache.eval.magcache import magcache_mask, retention_steps, smallest_max_skip, solve_magcache


def ratios(steps=50, seed=0):
    """Like measured ones: ~1 through the middle, falling at the end."""
    rng = np.random.default_rng(seed)
    r = 1.0 - 0.01 * rng.random(steps)
    r[-10:] = np.linspace(0.97, 0.6, 10)
    r[0] = 1.0
    return r


def test_rule_on_a_hand_made_case():
    r = np.array([1.0, 0.9, 0.9, 0.9, 0.9, 1.0])
    # retention 1; step 1: err 0.1 < 0.25 reuse; step 2: ratio 0.81, err 0.1 + 0.19 = 0.29 -> compute
    mask, err = magcache_mask(r, 0.25, max_skip=5, retention_steps=1)
    assert mask == (True, False, True, False, True, True)
    assert err[1] == pytest.approx(0.1) and err[3] == pytest.approx(0.1)
    # K = 1: never two reused steps in a row even at a huge threshold
    mask, _ = magcache_mask(np.ones(8), 1e9, max_skip=1, retention_steps=2)
    assert mask == (True, True, False, True, False, True, False, True)


@pytest.mark.parametrize("steps", [10, 50])
def test_every_budget_is_hit_exactly(steps):
    r = ratios(steps)
    cfg = MagCacheConfig()
    for budget in range(2, steps + 1):
        sched = solve_magcache(r, budget, cfg)
        mask = np.asarray(sched.mask)
        assert mask.sum() == budget, budget
        assert mask[: sched.retention_steps].all() and mask[-1]
        runs = np.diff(np.flatnonzero(mask)) - 1  # reused steps between full ones
        assert runs.max(initial=0) <= sched.max_skip


def test_k_is_raised_only_as_far_as_the_budget_needs():
    r = ratios(50)
    cfg = MagCacheConfig(max_skip=2)
    assert retention_steps(50, 25, cfg) == 10
    assert smallest_max_skip(r, 25, 10, cfg) == 2  # 10 + ceil(39 / 3) + 1 fits 25
    assert smallest_max_skip(r, 17, 10, cfg) > 2
    assert retention_steps(10, 3, cfg) == 2 and retention_steps(50, 5, cfg) == 4  # shrunk to fit
