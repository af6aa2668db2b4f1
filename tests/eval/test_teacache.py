import numpy as np
import pytest
import torch

from ertacache.eval.config import TeaCacheConfig
from ertacache.eval.plans import plain_tables, reuse_plan
from ertacache.eval.record import record_calibration
from ertacache.eval.teacache import Rescaler, TeaCachePlan, decide, fit_rescaler, open_loop_counts, solve_teacache
from ertacache.models.adapter import adapter_for
from ertacache.profile.calibrate import CalibrationSet
from ertacache.sampling import initial_latents, nominal_sigmas
from tests.conftest import tiny_wan

STEPS = 10


@pytest.fixture(scope="module")
def cal():
    torch.manual_seed(0)
    return CalibrationSet(adapter_for(tiny_wan(seed=3)), initial_latents((4, 2, 8, 8), range(4)),
                          torch.randn(8, 5, 16), 4.0, nominal_sigmas(STEPS, 3.0))


@pytest.fixture(scope="module")
def record(cal):
    return record_calibration(cal, batch_size=4, progress=False)


def test_rescaler_never_goes_negative():
    r = Rescaler([1.0, -1.0])  # x - 1
    np.testing.assert_allclose(r(np.array([0.0, 0.5, 3.0])), [0.0, 0.0, 2.0])


def test_decide_accumulates_and_resets():
    r = Rescaler([1.0, 0.0])  # identity
    compute, acc = decide(np.zeros(2), np.array([0.3, 0.6]), False, r, 0.5)
    assert compute.tolist() == [False, True] and acc.tolist() == [0.3, 0.0]
    compute, acc = decide(acc, np.array([0.3, 0.1]), False, r, 0.5)
    assert compute.tolist() == [True, False] and acc.tolist() == pytest.approx([0.0, 0.1])
    compute, acc = decide(acc, np.array([0.0, 0.0]), True, r, 0.5)  # forced steps compute and reset
    assert compute.all() and not acc.any()


def test_rescaler_fit_tracks_the_output_change(record):
    fit = fit_rescaler(record, 4)
    x, y = record.mod_change[:, 1:].ravel(), record.out_change[:, 1:].ravel()
    assert np.abs(fit(x) - y).mean() < np.abs(y - y.mean()).mean()  # better than a constant


def test_open_loop_count_falls_with_the_threshold(record):
    fit, forced = fit_rescaler(record, 4), np.zeros(STEPS, dtype=bool)
    forced[[0, -1]] = True
    counts = [open_loop_counts(record, fit, t, forced).mean() for t in (0.0, 0.05, 0.2, 1.0, 100.0)]
    assert counts[0] == STEPS and counts[-1] == 2 and counts == sorted(counts, reverse=True)


def test_plan_extremes_and_per_sample_decisions(cal):
    tables = plain_tables(cal.nominal_sigmas, 2, 4)
    noise, text = cal.latents[:3], cal.text_rows(slice(0, 3))
    every = TeaCachePlan(tables, Rescaler([1.0, 0.0]), threshold=0.0).sample(cal.adapter, noise, text, 4.0)
    plain = reuse_plan((True,) * STEPS, cal.nominal_sigmas, 2, 4).sample(cal.adapter, noise, text, 4.0)
    assert every.computed.all()
    torch.testing.assert_close(every.latents, plain.latents, rtol=1e-5, atol=1e-5)
    none = TeaCachePlan(tables, Rescaler([1.0, 0.0]), threshold=1e9).sample(cal.adapter, noise, text, 4.0)
    assert (none.computed.sum(1) == 2).all()
    # a sample's decisions and result do not depend on its batch-mates
    plan = TeaCachePlan(tables, Rescaler([1.0, 0.0]), threshold=0.15)
    batch = plan.sample(cal.adapter, noise, text, 4.0)
    alone = plan.sample(cal.adapter, noise[1:2], cal.text_rows(slice(1, 2)), 4.0)
    assert (batch.computed[1] == alone.computed[0]).all()
    torch.testing.assert_close(batch.latents[1:2], alone.latents, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", [5, 3])
def test_threshold_is_solved_for_the_budget(cal, record, target):
    cfg = TeaCacheConfig(max_probes=6, tolerance=0.25)
    plan = solve_teacache(cal, record, target, cfg, batch_size=4)
    got = plan.info()["calibration_full_steps"]
    assert abs(got - target) <= cfg.tolerance or plan.info()["probes"] == cfg.max_probes
    assert abs(got - target) <= 1.0
    counts = plan.sample(cal.adapter, cal.latents, cal.text_embeds, 4.0).computed.sum(1)
    assert counts.mean() == pytest.approx(got)  # the reported count is what the rule does on calibration
