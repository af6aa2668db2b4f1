import numpy as np
import pytest

from ertacache.profile.timeadjust import adjusted_sigmas, phi_value
from ertacache.sampling.sigmas import nominal_sigmas, validate_sigma_table


def test_phi_one_keeps_the_nominal_table():
    nominal = nominal_sigmas(20, 3.0)
    np.testing.assert_allclose(adjusted_sigmas(nominal, np.ones(20)), nominal, atol=1e-12)


def test_adjusted_table_starts_at_nominal_ends_at_zero_and_decreases():
    nominal = nominal_sigmas(20, 3.0)
    phi = np.ones(20)
    phi[[3, 4, 9, 12]] = [0.6, 0.8, 0.5, 0.9]
    adj = adjusted_sigmas(nominal, phi)
    assert adj[0] == nominal[0] and adj[-1] == 0.0
    validate_sigma_table(adj, 20, "adjusted")
    # a shrunk step integrates less: the clock runs behind nominal right after it
    assert adj[4] > nominal[4]
    # and the deficit is spread proportionally: same stretch for all later full steps
    i = 14
    assert (adj[i] - adj[i + 1]) / (nominal[i] - nominal[i + 1]) == pytest.approx(adj[i] / nominal[i])


def test_phi_clips_and_guards_the_near_zero_denominator():
    assert phi_value(err=0.1, change=1.0, scale=1.0, phi_min=0.5, phi_eps=1e-3) == pytest.approx(1 - 0.1 / 1.001)
    assert phi_value(err=5.0, change=1.0, scale=1.0, phi_min=0.5, phi_eps=1e-3) == 0.5
    # velocity did not change between steps: no information, no adjustment
    assert phi_value(err=0.1, change=1e-9, scale=1.0, phi_min=0.5, phi_eps=1e-3) == 1.0
    assert phi_value(err=0.0, change=0.2, scale=1.0, phi_min=0.5, phi_eps=1e-3) == 1.0
