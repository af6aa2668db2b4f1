import numpy as np
import pytest
import torch

from ertacache.profile.correction import OLSAccumulator


def test_ols_matches_numpy_lstsq_per_branch_and_channel():
    rng = np.random.default_rng(0)
    nb, b, c = 2, 3, 4
    x = torch.tensor(rng.normal(size=(nb * b, c, 2, 3, 5)), dtype=torch.float32)
    true_a = torch.tensor(rng.normal(size=(nb, c)), dtype=torch.float32)
    true_b = torch.tensor(rng.normal(size=(nb, c)), dtype=torch.float32)
    y = x.unflatten(0, (nb, b)) * true_a[:, None, :, None, None, None] + true_b[:, None, :, None, None, None]
    y = (y + 0.1 * torch.randn_like(y)).flatten(0, 1)  # (nb*b, C, F, H, W)

    acc = OLSAccumulator(nb, c)
    acc.update(x[:, :, :1], y[:, :, :1])  # two micro-batches of elements give the same fit as one
    acc.update(x[:, :, 1:], y[:, :, 1:])
    a, b_ = acc.solve()

    xs = x.unflatten(0, (nb, b)).transpose(1, 2).reshape(nb, c, -1).double().numpy()  # (nb, C, n)
    ys = y.unflatten(0, (nb, b)).transpose(1, 2).reshape(nb, c, -1).double().numpy()
    for k in range(nb):
        for ch in range(c):
            design = np.stack([xs[k, ch], np.ones_like(xs[k, ch])], axis=1)
            (ref_a, ref_b), *_ = np.linalg.lstsq(design, ys[k, ch], rcond=None)
            assert a[k, ch].item() == pytest.approx(ref_a, abs=1e-5)
            assert b_[k, ch].item() == pytest.approx(ref_b, abs=1e-5)


def test_constant_input_gives_zero_slope_and_mean_intercept():
    acc = OLSAccumulator(1, 1)
    x = torch.ones(2, 1, 4)
    y = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[1.0, 2.0, 3.0, 4.0]]])
    acc.update(x, y)
    a, b = acc.solve()
    assert a.item() == 0.0 and b.item() == pytest.approx(2.5)


def test_solve_before_update_is_an_error():
    with pytest.raises(ValueError, match="before any update"):
        OLSAccumulator(1, 2).solve()
