import numpy as np
import pytest

from ertacache.errors import UserError
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.schedule import fill_budget, mask_from_error_matrix, mask_summary, solve_lambda, step_weights
from ertacache.sampling import nominal_sigmas


def drift_errors(steps, rate=0.05):
    """errors[j, i] = rate * (i - j): error grows with the distance to the last refresh."""
    idx = np.arange(steps)
    return np.maximum(idx[None, :] - idx[:, None], 0) * rate


def test_mask_from_lambda_refreshes_when_error_reaches_lambda():
    mask = mask_from_error_matrix(drift_errors(10), lam=0.12, warmup_steps=1, final_steps=1)
    # reuse at distance 1 and 2 (0.05, 0.10 < 0.12), compute at distance 3
    assert mask_summary(mask) == "F..F..F..F"


def test_lambda_zero_computes_everything_and_forced_steps_always_compute():
    assert all(mask_from_error_matrix(drift_errors(8), 0.0, 1, 1))
    mask = mask_from_error_matrix(drift_errors(8), 1e9, warmup_steps=3, final_steps=2)
    assert mask_summary(mask) == "FFF...FF"


@pytest.mark.parametrize("speedup", [1.5, 2.0, 2.5, 3.0])
def test_lambda_from_speedup_reaches_the_budget(speedup):
    steps = 50
    errors = drift_errors(steps, rate=0.013)
    config = CalibrationConfig(speedup=speedup)
    target = config.target_full_steps(steps)
    assert target == round(steps / speedup)

    def probe(lam):
        m = mask_from_error_matrix(errors, lam, 1, 1)
        return sum(m), m

    lam, n, mask = solve_lambda(probe, target)
    assert n <= target and sum(mask) == n
    filled = fill_budget(mask, np.arange(steps, dtype=float), target)
    assert sum(filled) == target
    assert all(filled[i] for i in range(steps) if mask[i])


def test_fill_budget_picks_the_largest_errors():
    mask = (True, False, False, False, True)
    errors = np.array([0, 0.3, 0.9, 0.1, 0])
    assert fill_budget(mask, errors, 3) == (True, False, True, False, True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(speedup=0.5), "speedup must be >= 1"),
        (dict(lam=-0.1), "lambda must be >= 0"),
        (dict(), "exactly one"),
        (dict(lam=0.1, speedup=2.0), "exactly one"),
        (dict(lam=0.1, warmup_steps=0), "first and last"),
        (dict(lam=0.1, loop="sideways"), "open' or 'closed"),
        (dict(lam=0.1, schedule_weight="sigma"), "schedule-weight must be one of none, dt, dt-late"),
    ],
)
def test_bad_config_names_the_fix(kwargs, match):
    with pytest.raises(UserError, match=match):
        CalibrationConfig(**kwargs)


def test_speedup_above_what_the_steps_allow_is_refused():
    # the budget is round(T / speedup) full steps (the equal-compute rule); refused below the forced steps
    with pytest.raises(UserError, match="above what 10 steps allow"):
        CalibrationConfig(speedup=9.0).target_full_steps(10)
    assert CalibrationConfig(speedup=5.0).target_full_steps(10) == 2
    assert CalibrationConfig(speedup=6.0).target_full_steps(10) == 2  # round(1.67): the nearest budget


def test_the_schedule_weight_defaults_to_the_papers_rule_for_reuse_and_dt_late_for_a_predictor():
    from ertacache.profile.predictor import PredictorConfig

    assert CalibrationConfig(speedup=2.0).schedule_weight == "none"  # the default predictor here is reuse
    assert CalibrationConfig(speedup=2.0, predictor=PredictorConfig("taylor", 2)).schedule_weight == "dt-late"
    assert CalibrationConfig(speedup=2.0, predictor=PredictorConfig("taylor", 2),
                             schedule_weight="none").schedule_weight == "none"


def test_step_weights_follow_the_step_lengths_of_the_table():
    sig = nominal_sigmas(50, 3.0)  # (51,) shift 3: the last steps are the longest
    dt = np.abs(np.diff(sig))
    assert np.array_equal(step_weights(sig, "none"), np.ones(50))
    w = step_weights(sig, "dt")
    assert w.mean() == pytest.approx(1.0) and np.allclose(w, dt / dt.mean())
    assert w[45:49].min() > 2.0 and w[:5].max() < 0.4  # shift 3 over 50 steps: late steps ~8x the first ones
    late = step_weights(sig, "dt-late")
    assert np.all(late >= 1.0) and np.allclose(late[w > 1], w[w > 1]) and np.all(late[w <= 1] == 1.0)
    with pytest.raises(UserError, match="unknown schedule weight"):
        step_weights(sig, "sigma")


def test_weighting_the_error_moves_full_steps_to_the_long_steps_at_the_same_budget():
    steps = 50
    weights = step_weights(nominal_sigmas(steps, 3.0), "dt")
    errors = drift_errors(steps, rate=0.013)

    def masks(errs):
        def probe(lam):
            m = mask_from_error_matrix(errs, lam, 1, 1)
            return sum(m), m

        _, _, m = solve_lambda(probe, 25)
        return m

    plain, weighted = masks(errors), masks(errors * weights[None, :])
    assert sum(weighted) <= 25 and sum(plain) <= 25
    late = slice(35, 50)  # the long steps
    assert sum(weighted[late]) > sum(plain[late]) and sum(weighted[:15]) < sum(plain[:15])
