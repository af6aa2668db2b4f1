"""The residual predictor: Lagrange weights, the ridge fit, and the calibration passes that use them."""

import numpy as np
import pytest
import torch

from ertacache.errors import UserError
from ertacache.models.experts import filled_slots
from ertacache.profile.calibrate import cached_pass, calibrate, residual_bank
from ertacache.profile.config import CalibrationConfig
from ertacache.profile.predictor import (PredictorConfig, RidgeAccumulator, extrapolation_weights, lagrange_weights,
                                         last_full_steps, lower_order_candidates, taylor_weights)
from ertacache.sampling import CachedSampler, StepTables, nominal_sigmas
from ertacache.sampling.steps import predict_residual
from tests.profile.conftest import STEPS


def test_lagrange_weights_match_a_hand_computation():
    # full steps 4, 2, 0 (newest first), predict step 5: the quadratic through them, half a gap ahead
    # w0 = (5-2)(5-0)/((4-2)(4-0)) = 15/8, w1 = (5-4)(5-0)/((2-4)(2-0)) = -5/4, w2 = (5-4)(5-2)/((0-4)(0-2)) = 3/8
    np.testing.assert_allclose(lagrange_weights([4, 2, 0], 5), [1.875, -1.25, 0.375])
    np.testing.assert_allclose(lagrange_weights([3, 2], 4), [2.0, -1.0])  # linear, one step ahead
    np.testing.assert_allclose(lagrange_weights([7], 9), [1.0])  # order 0 is reuse
    # the weights reproduce any quadratic exactly
    f = lambda t: 0.3 * t * t - 2.0 * t + 1.5  # noqa: E731
    pos = [9, 6, 5]
    assert np.dot(lagrange_weights(pos, 11), [f(p) for p in pos]) == pytest.approx(f(11))


def test_curvature_scales_the_quadratic_term_only():
    # full steps 4, 2, 0, predict step 5. The line through steps 4 and 2: w = [(5-2)/(4-2), (5-4)/(2-4)] = [1.5, -0.5];
    # the quadratic [1.875, -1.25, 0.375]. Halving the term above the line: [1.6875, -0.875, 0.1875].
    np.testing.assert_allclose(extrapolation_weights([4, 2, 0], 5, 0.5), [1.6875, -0.875, 0.1875])
    np.testing.assert_allclose(extrapolation_weights([4, 2, 0], 5, 0.0), [1.5, -0.5, 0.0])
    np.testing.assert_allclose(extrapolation_weights([4, 2, 0], 5, 1.0), lagrange_weights([4, 2, 0], 5))
    np.testing.assert_allclose(extrapolation_weights([3, 2], 4, 0.5), [2.0, -1.0])  # no term above the line to scale
    # any curvature reproduces a line exactly; on a quadratic it predicts line + curvature * (quadratic - line)
    pos, t = [9, 6, 5], 11
    line = lambda x: -2.0 * x + 1.5  # noqa: E731
    quad = lambda x: 0.3 * x * x + line(x)  # noqa: E731
    for c in (0.0, 0.25, 0.5, 1.0):
        w = extrapolation_weights(pos, t, c)
        assert np.dot(w, [line(p) for p in pos]) == pytest.approx(line(t))
        lin_pred = np.dot(lagrange_weights(pos[:2], t), [quad(p) for p in pos[:2]])
        assert np.dot(w, [quad(p) for p in pos]) == pytest.approx(lin_pred + c * (quad(t) - lin_pred))
    with pytest.raises(UserError, match="predictor-curvature must be a number in \\[0, 1\\]"):
        PredictorConfig("taylor", 2, curvature=1.5)
    assert PredictorConfig("taylor", 2).describe()["curvature"] == 1.0  # the exact polynomial unless asked
    assert PredictorConfig("taylor", 2, curvature=0.5).describe()["curvature"] == 0.5
    assert "curvature" not in PredictorConfig("taylor", 1).describe()  # order 1 has nothing for it to scale


def test_taylor_tables_follow_the_mask():
    mask = [True, True, True, False, True, False, False, True]
    w = taylor_weights(mask, 3)  # (T, K, 1)
    assert w.shape == (8, 3, 1)
    assert last_full_steps(mask, 5, 3) == [4, 2, 1]
    np.testing.assert_allclose(w[5, :, 0], lagrange_weights([4, 2, 1], 5))
    np.testing.assert_allclose(w[3, :, 0], lagrange_weights([2, 1, 0], 3))
    np.testing.assert_array_equal(w[4, :, 0], [1, 0, 0])  # full steps: the newest slot (never read)
    # before K full steps the order grows with the slots: reuse after one, linear after two, 0 on the empty slots
    early = taylor_weights([True, False, True, False, True, False], 3)
    np.testing.assert_allclose(early[1, :, 0], [1, 0, 0])
    np.testing.assert_allclose(early[3, :, 0], [1.5, -0.5, 0])  # the line through steps 2 and 0, at step 3
    np.testing.assert_allclose(early[5, :, 0], lagrange_weights([4, 2, 0], 5))
    damped = taylor_weights([True, False, True, False, True, False], 3, curvature=0.5)
    np.testing.assert_allclose(damped[:5], early[:5])  # up to two full steps there is no curvature term
    np.testing.assert_allclose(damped[5, :, 0], [1.6875, -0.875, 0.1875])
    with pytest.raises(UserError, match="no full step of its expert precedes it"):
        taylor_weights([True, True, True, False], 2, starts=(0, 3))


def test_k1_reuse_predicts_the_last_residual_bit_for_bit():
    r = torch.randn(4, 6, 8, dtype=torch.bfloat16)
    out = predict_residual([r], torch.ones(1, 1), torch.zeros(1))
    assert out.dtype == r.dtype and torch.equal(out, r)
    assert StepTables(nominal_sigmas(4, 3.0), n_branches=2, channels=4).plain_reuse()


@pytest.mark.parametrize("per_channel, bias", [(True, True), (False, True), (True, False)])
def test_ridge_fit_equals_numpy_lstsq_without_ridge(per_channel, bias):
    gen = torch.Generator().manual_seed(0)
    acc = RidgeAccumulator(history=3, channels=5, per_channel=per_channel, bias=bias)
    xs, ys = [], []
    for _ in range(3):  # three micro-batches: the sums must add up to one fit
        slots = [torch.randn(2, 7, 5, generator=gen) for _ in range(3)]
        y = 1.7 * slots[0] - 0.6 * slots[1] + 0.1 * slots[2] + 0.3 + 0.05 * torch.randn(2, 7, 5, generator=gen)
        acc.update(slots, y)
        xs.append(torch.stack([s.reshape(-1, 5) for s in slots]))  # (K, M, D)
        ys.append(y.reshape(-1, 5))
    x = torch.cat(xs, 1).double().numpy()  # (K, M, D)
    y = torch.cat(ys, 0).double().numpy()  # (M, D)
    w, b = acc.solve(prior=[1.0, 0.0, 0.0], ridge=0.0)
    cols = lambda d: [x[k, :, d] for k in range(3)] + ([np.ones(x.shape[1])] if bias else [])  # noqa: E731
    if per_channel:
        for d in range(5):
            sol = np.linalg.lstsq(np.stack(cols(d), 1), y[:, d], rcond=None)[0]
            np.testing.assert_allclose(w[:, d].numpy(), sol[:3], rtol=1e-4, atol=1e-5)
            if bias:
                assert b[d].item() == pytest.approx(sol[3], abs=1e-5)
    else:
        design = np.concatenate([np.stack(cols(d), 1) for d in range(5)], 0)
        sol = np.linalg.lstsq(design, y.T.reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(w[:, 0].numpy(), sol[:3], rtol=1e-4, atol=1e-5)


def test_a_strong_ridge_returns_the_prior():
    acc = RidgeAccumulator(history=2, channels=3)
    acc.update([torch.randn(2, 4, 3), torch.randn(2, 4, 3)], torch.randn(2, 4, 3))
    w, b = acc.solve(prior=[2.0, -1.0], ridge=1e9)
    np.testing.assert_allclose(w.numpy(), [[2.0] * 3, [-1.0] * 3], atol=1e-5)
    np.testing.assert_allclose(b.numpy(), 0.0, atol=1e-5)


def test_predictor_settings_are_checked():
    with pytest.raises(UserError, match="unknown predictor"):
        PredictorConfig(kind="magic")
    with pytest.raises(UserError, match="predictor-order"):
        PredictorConfig(kind="taylor", order=7)
    # one leading full step whatever K: the schedule rule decides the next ones (the order grows as slots fill)
    assert CalibrationConfig(speedup=2.0, predictor=PredictorConfig("taylor", 2)).warmup_steps == 1
    assert CalibrationConfig(speedup=2.0, warmup_steps=3, predictor=PredictorConfig("taylor", 2)).warmup_steps == 3
    assert PredictorConfig(kind="reuse", order=2).history == 1


MASK = (True, True, True, False, True, False, False, True, False, True, False, True)


@pytest.mark.parametrize("curvature", [1.0, 0.5])
def test_a_taylor_pass_bakes_the_lagrange_weights_of_its_mask(cal, curvature):
    config = CalibrationConfig(lam=0.1, predictor=PredictorConfig("taylor", 2, curvature=curvature), rectify=False,
                               time_adjust=False)
    res = cached_pass(cal, config, mask=MASK, progress=False)
    assert res.pred_w.shape == (STEPS, 3, 1) and res.mask == MASK
    np.testing.assert_allclose(res.pred_w.numpy(), taylor_weights(MASK, 3, curvature=curvature), rtol=1e-6)
    assert (curvature == 1.0) == np.allclose(res.pred_w.numpy(), taylor_weights(MASK, 3), rtol=1e-6)


def test_the_reuse_predictor_pass_is_todays_pass(cal):
    """K = 1 with weight 1 through the generalised pass gives exactly the reuse tables."""
    mask = (True, False, False, True, False, True, False, False, True, False, True, True)
    res = cached_pass(cal, CalibrationConfig(lam=0.1), mask=mask, progress=False)
    assert res.pred_w.shape == (STEPS, 1, 1) and torch.all(res.pred_w == 1) and torch.all(res.pred_b == 0)
    assert res.tables().plain_reuse()


def test_the_closed_pass_and_the_open_bank_agree_where_the_trajectories_coincide(cal):
    """Up to the first cached step the cached trajectory is the uncached one: both ways of computing
    the prediction error (the closed pass, the open-loop residual bank) must give the same number."""
    config = CalibrationConfig(lam=0.1, rectify=False, time_adjust=False,
                               predictor=PredictorConfig("taylor", 2, curvature=0.5), batch_size=2)
    closed = cached_pass(cal, config, mask=MASK, progress=False)
    bank = residual_bank(cal, config, progress=False)
    assert closed.residual_error[3] == pytest.approx(bank.error((2, 1, 0), 3, curvature=0.5), rel=1e-5)
    assert closed.residual_error[3] > 0
    assert bank.error((2, 1, 0), 3, curvature=1.0) != pytest.approx(closed.residual_error[3], rel=1e-3)  # memo per curvature


def test_a_cached_step_before_k_full_steps_predicts_from_those_there_are(cal):
    """Closed pass and bank agree on the lower-order prediction of step 1 (from step 0 alone: reuse)."""
    config = CalibrationConfig(lam=0.1, rectify=False, time_adjust=False, predictor=PredictorConfig("taylor", 2),
                               batch_size=2)
    early = (True, False, True, False) + MASK[4:]
    closed = cached_pass(cal, config, mask=early, progress=False)
    np.testing.assert_allclose(closed.pred_w[1, :, 0].numpy(), [1, 0, 0])
    np.testing.assert_allclose(closed.pred_w[3, :, 0].numpy(), [1.5, -0.5, 0])  # the line through steps 2 and 0
    bank = residual_bank(cal, config, progress=False)
    assert closed.residual_error[1] == pytest.approx(bank.error((0,), 1), rel=1e-5) and closed.residual_error[1] > 0


def test_over_budget_the_bank_caches_the_full_step_that_costs_least(cal):
    """drop_full_steps caches, one at a time, the full step whose caching adds least to the bank's summed
    error over the whole mask; mask_error is that sum over the cached steps."""
    config = CalibrationConfig(speedup=2.0, predictor=PredictorConfig("taylor", 1), batch_size=2)
    bank = residual_bank(cal, config, progress=False)
    forced, w = cal.forced(config), cal.schedule_weights(config)
    mask = MASK
    want = sum(bank.error(tuple([j for j in range(i) if mask[j]][::-1][:2]), i) * w[i]
               for i in range(STEPS) if not mask[i])
    assert bank.mask_error(mask, 2, w) == pytest.approx(want)
    assert bank.mask_error((False,) + MASK[1:], 2, w) == float("inf")  # a cached step with no full step before it
    out = bank.drop_full_steps(mask, 2, 2, forced, w)
    assert sum(out) == sum(mask) - 2 and all(out[j] for j in range(STEPS) if forced[j])
    costs = {j: bank.mask_error([m and k != j for k, m in enumerate(mask)], 2, w)
             for j in range(STEPS) if mask[j] and not forced[j]}
    first = min(costs, key=costs.get)
    assert not out[first] and len(set(costs.values())) > 1  # the choice was not a tie


def test_fitted_weights_drive_the_sampler_and_stay_near_the_prior(cal):
    config = CalibrationConfig(lam=0.1, predictor=PredictorConfig("fitted", 2, ridge=1.0), rectify=True)
    res = cached_pass(cal, config, mask=MASK, progress=False)
    assert res.pred_w.shape[:2] == (STEPS, 3) and res.pred_b.shape[0] == STEPS
    tables = res.tables()
    text = torch.cat([cal.text_embeds[0:1], cal.text_embeds[3:4]])
    out = CachedSampler(cal.adapter, tables, res.mask)(cal.latents[:1], text, cal.guidance_scale)
    assert torch.isfinite(out.latents).all() and out.full_steps == sum(MASK)


@pytest.mark.parametrize("loop", ["open", "closed"])
def test_a_predictor_profile_meets_the_budget_and_reports_its_cost(cal, loop):
    config = CalibrationConfig(speedup=2.0, loop=loop, predictor=PredictorConfig("taylor", 1), batch_size=2)
    out = calibrate(cal, config, progress=False, log=lambda s: None)
    assert out.result.full_steps == STEPS // 2 and out.result.mask[0]
    w = out.result.pred_w[:, :, 0]  # (T, K): no cached step reads a slot before a full step has filled it
    filled = filled_slots(out.result.mask, 2)
    assert all(not w[i, filled[i]:].any() for i in range(STEPS) if not out.result.mask[i])
    if loop == "open":  # one uncached pass for the residual bank, one closed pass along the mask
        assert out.uncached_passes == pytest.approx(2.0)
    else:  # the bank, one greedy closed pass, one closed pass along the budget's mask: no bisection
        assert out.uncached_passes == pytest.approx(3.0)
    again = calibrate(cal, config, progress=False, log=lambda s: None)  # the bank is shared, still counted
    assert again.uncached_passes == pytest.approx(out.uncached_passes) and again.result.mask == out.result.mask


@pytest.mark.parametrize("loop, kind, order", [("open", "taylor", 1), ("closed", "taylor", 1), ("open", "reuse", 0),
                                               ("closed", "reuse", 0)])
def test_a_weighted_schedule_meets_the_budget_at_the_same_cost_and_is_recorded(cal, loop, kind, order):
    base = dict(speedup=2.0, loop=loop, predictor=PredictorConfig(kind, order), batch_size=2)
    plain = calibrate(cal, CalibrationConfig(**base, schedule_weight="none"), progress=False, log=lambda s: None)
    config = CalibrationConfig(**base, schedule_weight="dt")
    out = calibrate(cal, config, progress=False, log=lambda s: None)
    assert out.result.full_steps == STEPS // 2
    if not (kind == "reuse" and loop == "closed"):  # the paper's closed loop bisects: its probe count varies
        assert out.uncached_passes == pytest.approx(plain.uncached_passes)
    assert out.result.mask != plain.result.mask  # the 12-step shift-3 table's last step is ~4x its first
    assert config.to_dict()["schedule_weight"] == "dt"


def test_fit_to_budget_trims_the_least_erring_full_steps_and_fills_the_worst_cached_ones():
    from ertacache.profile.calibrate import fit_to_budget
    from ertacache.profile.schedule import forced_full

    forced = forced_full(8, 2, 1)
    mask = (True, True, True, True, False, True, False, True)
    errors = np.array([0, 0, 0.5, 0.1, 0.3, 0.2, 0.9, 0])
    assert fit_to_budget(mask, errors, 4, forced) == (True, True, True, False, False, False, False, True)
    assert fit_to_budget(mask, errors, 7, forced) == (True, True, True, True, False, True, True, True)
    assert sum(fit_to_budget(mask, errors, 6, forced)) == 6


def test_lower_order_candidates_are_the_lagrange_weights_of_each_prefix():
    cands = lower_order_candidates([6, 4, 3], 7)
    assert len(cands) == 3
    np.testing.assert_array_equal(cands[0], [1, 0, 0])  # reuse
    np.testing.assert_allclose(cands[1], [1.5, -0.5, 0])  # the line through steps 6 and 4, at 7
    np.testing.assert_allclose(cands[2], lagrange_weights([6, 4, 3], 7))


def test_the_adaptive_predictor_picks_the_least_erring_order_at_each_step(cal):
    """Each cached step bakes one candidate's weights; where the trajectories still coincide with
    the Taylor pass (the first cached step) its error is the least over the orders, as in the bank."""
    base = dict(lam=0.1, rectify=False, time_adjust=False, batch_size=2)
    adaptive = cached_pass(cal, CalibrationConfig(predictor=PredictorConfig("adaptive", 2), **base), mask=MASK,
                           progress=False)
    taylor = cached_pass(cal, CalibrationConfig(predictor=PredictorConfig("taylor", 2), **base), mask=MASK,
                         progress=False)
    for i, full in enumerate(MASK):
        if not full:
            newest = last_full_steps(MASK, i, 3)
            assert any(np.allclose(adaptive.pred_w[i, :, 0].numpy(), c) for c in lower_order_candidates(newest, i))
    bank = residual_bank(cal, CalibrationConfig(predictor=PredictorConfig("taylor", 2), **base), progress=False)
    first = MASK.index(False)
    orders = [bank.error(tuple(last_full_steps(MASK, first, j + 1)), first) for j in range(3)]
    assert adaptive.residual_error[first] == pytest.approx(min(orders), rel=1e-5)
    assert bank.error(tuple(last_full_steps(MASK, first, 3)), first, adaptive=True) == pytest.approx(min(orders))
    assert adaptive.residual_error[first] <= taylor.residual_error[first] * (1 + 1e-6)
