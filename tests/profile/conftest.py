"""The calibration set the profile tests share: 3 prompts, 12 steps, a tiny random Wan model."""

import pytest
import torch

from ertacache.models.adapter import adapter_for
from ertacache.profile.calibrate import CalibrationSet
from ertacache.sampling import initial_latents, nominal_sigmas
from tests.conftest import tiny_wan

STEPS = 12
SHAPE = (4, 2, 8, 8)


@pytest.fixture(scope="module")
def cal():
    """One per test module (a module may cache state on it, e.g. the residual bank)."""
    adapter = adapter_for(tiny_wan(seed=3))
    torch.manual_seed(0)
    return CalibrationSet(adapter, initial_latents(SHAPE, range(3)), torch.randn(6, 5, 16), 4.0,
                          nominal_sigmas(STEPS, 3.0))
