import numpy as np
import pytest
import torch

from ertacache.errors import NumericalError
from ertacache.models.adapter import adapter_for
from ertacache.profile.calibrate import CalibrationSet, cached_pass, calibrate, error_matrix
from ertacache.profile.config import CalibrationConfig
from ertacache.sampling import CachedSampler
from tests.conftest import tiny_wan
from tests.profile.conftest import STEPS


@pytest.mark.parametrize("loop", ["open", "closed"])
def test_speedup_two_gives_exactly_half_the_full_steps(cal, loop):
    out = calibrate(cal, CalibrationConfig(speedup=2.0, loop=loop, batch_size=2), progress=False, log=lambda s: None)
    res = out.result
    assert res.full_steps == STEPS // 2
    assert res.mask[0] and res.mask[-1]
    assert res.sigmas[0] == cal.nominal_sigmas[0] and res.sigmas[-1] == 0.0
    reused = ~np.asarray(res.mask)
    assert np.all(res.phi[~reused] == 1.0) and np.all(res.phi[reused] <= 1.0)
    assert torch.all(res.corr_a[torch.tensor(~reused)] == 0)  # full steps carry the identity correction
    assert torch.any(res.corr_a[torch.tensor(reused)] != 0)


def test_components_switch_off_for_ablations(cal):
    mask = (True, False, False, True, False, True, False, False, True, False, True, True)
    res = cached_pass(cal, CalibrationConfig(lam=0.1, time_adjust=False, rectify=False), mask=mask, progress=False)
    np.testing.assert_array_equal(res.sigmas, cal.nominal_sigmas)
    assert np.all(res.phi == 1.0) and torch.all(res.corr_a == 0) and torch.all(res.corr_b == 0)
    assert res.mask == mask


def test_rectification_shrinks_the_velocity_error_it_was_fitted_on(cal):
    mask = (True, False, False, True, False, True, False, False, True, False, True, True)
    base = cached_pass(cal, CalibrationConfig(lam=0.1, time_adjust=False, rectify=False), mask=mask, progress=False)
    fixed = cached_pass(cal, CalibrationConfig(lam=0.1, time_adjust=False, rectify=True), mask=mask, progress=False)
    # at the first reused step both passes stand on the same latents: least squares cannot do worse
    assert fixed.velocity_error[1] <= base.velocity_error[1] + 1e-7


def test_batch_size_does_not_change_the_fit(cal):
    a = cached_pass(cal, CalibrationConfig(lam=0.08, batch_size=1), lam=0.08, progress=False)
    b = cached_pass(cal, CalibrationConfig(lam=0.08, batch_size=3), lam=0.08, progress=False)
    assert a.mask == b.mask
    np.testing.assert_allclose(a.sigmas, b.sigmas, atol=1e-6)
    torch.testing.assert_close(a.corr_a, b.corr_a, atol=1e-4, rtol=1e-3)


def test_calibrated_tables_drive_the_sampler_like_the_calibration_pass(cal):
    """The sampler with the fitted tables retraces the calibration trajectory of prompt 0."""
    res = cached_pass(cal, CalibrationConfig(lam=0.1), lam=0.1, progress=False)
    tables = res.tables()
    text = torch.cat([cal.text_embeds[0:1], cal.text_embeds[3:4]])
    out = CachedSampler(cal.adapter, tables, res.mask)(cal.latents[:1], text, cal.guidance_scale)
    assert torch.isfinite(out.latents).all()
    assert out.full_steps == res.full_steps


def test_nan_during_calibration_names_the_step(cal):
    model = tiny_wan(seed=3)
    with torch.no_grad():
        model.proj_out.bias.fill_(float("nan"))
    bad = CalibrationSet(adapter_for(model), cal.latents, cal.text_embeds, 4.0, cal.nominal_sigmas)
    with pytest.raises(NumericalError, match="at step 0"):
        calibrate(bad, CalibrationConfig(speedup=2.0), progress=False, log=lambda s: None)


def test_open_loop_can_reuse_a_measured_error_matrix(cal):
    """Several open-loop profiles of one calibration set share its single uncached pass."""
    config = CalibrationConfig(speedup=2.0, loop="open", batch_size=2)
    seen = []
    errors = error_matrix(cal, config, progress=False, observe=lambda i, sl, *rest: seen.append((i, sl.start)))
    assert len(seen) == STEPS * 2  # every step of both micro-batches
    fresh = calibrate(cal, config, progress=False, log=lambda s: None)
    shared = calibrate(cal, config, progress=False, log=lambda s: None, errors=errors)
    np.testing.assert_allclose(shared.error_matrix, fresh.error_matrix)
    assert shared.result.mask == fresh.result.mask
    with pytest.raises(ValueError, match="errors must be"):
        calibrate(cal, config, progress=False, log=lambda s: None, errors=errors[:3])


def test_closed_loop_bisection_start_is_only_a_hint(cal):
    """A start below the answer is doubled until it meets the budget: same exact full-step count."""
    out = calibrate(cal, CalibrationConfig(speedup=2.0, batch_size=3), progress=False, log=lambda s: None,
                    lam_hi=1e-3)
    assert out.result.full_steps == STEPS // 2 and out.lam > 1e-3
