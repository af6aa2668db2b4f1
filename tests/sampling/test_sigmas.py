import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from ertacache.errors import UserError
from ertacache.sampling.sigmas import nominal_sigmas, validate_sigma_table


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 8.0])
@pytest.mark.parametrize("steps", [2, 10, 50])
def test_same_sigmas_as_diffusers_flow_match_euler(shift, steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = nominal_sigmas(steps, shift)
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=0, atol=1e-6)
    assert ours[0] == pytest.approx(1.0) and ours[-1] == 0.0


def test_validate_sigma_table_names_the_defect():
    good = nominal_sigmas(4, 3.0)
    validate_sigma_table(good, 4)
    with pytest.raises(UserError, match="end exactly at 0"):
        validate_sigma_table(np.append(good[:-1], 1e-3), 4)
    with pytest.raises(UserError, match="decreasing"):
        validate_sigma_table([1.0, 0.5, 0.7, 0.2, 0.0], 4)
    with pytest.raises(UserError, match="steps \\+ 1"):
        validate_sigma_table(good, 5)
    with pytest.raises(UserError, match="NaN"):
        validate_sigma_table([1.0, float("nan"), 0.0], 2)
