import numpy as np
import torch

from ertacache.eval.record import magnitude_ratio_per_sample, record_calibration, rel_l1_per_sample
from ertacache.models.adapter import adapter_for
from ertacache.profile.calibrate import CalibrationSet, error_matrix
from ertacache.profile.config import CalibrationConfig
from ertacache.sampling import initial_latents, nominal_sigmas
from tests.conftest import tiny_wan


def test_rel_l1_groups_both_branches_of_a_sample():
    old = torch.ones(4, 3)  # rows: cond s0, cond s1, uncond s0, uncond s1
    new = old.clone()
    new[0] += 1.0  # sample 0, cond branch: |diff| 3 of |old| 6 over both branches
    new[3] -= 0.5  # sample 1, uncond branch: 1.5 of 6
    np.testing.assert_allclose(rel_l1_per_sample(new, old, 2).numpy(), [0.5, 0.25])


def test_magnitude_ratio_of_scaled_residuals():
    old = torch.randn(4, 6, 8)
    new = old * torch.tensor([2.0, 0.5, 2.0, 0.5]).reshape(4, 1, 1)
    np.testing.assert_allclose(magnitude_ratio_per_sample(new, old, 2).numpy(), [2.0, 0.5], rtol=1e-6)


def test_record_is_the_open_loop_matrix_plus_the_baselines_signals():
    torch.manual_seed(0)
    cal = CalibrationSet(adapter_for(tiny_wan(seed=3)), initial_latents((4, 2, 8, 8), range(3)),
                         torch.randn(6, 5, 16), 4.0, nominal_sigmas(6, 3.0))
    rec = record_calibration(cal, batch_size=2, progress=False)
    ref = error_matrix(cal, CalibrationConfig(lam=0.0, loop="open", batch_size=3), progress=False)
    np.testing.assert_allclose(rec.errors, ref, rtol=1e-5)
    for a in (rec.mod_change, rec.out_change, rec.mag_ratio):
        assert a.shape == (3, 6)
    assert np.isnan(rec.mod_change[:, 0]).all() and np.isfinite(rec.mod_change[:, 1:]).all()
    assert (rec.out_change[:, 1:] > 0).all() and (rec.mag_ratio[:, 0] == 1).all()
    np.testing.assert_allclose(rec.residual_change()[1:], np.diagonal(ref, 1), rtol=1e-5)
