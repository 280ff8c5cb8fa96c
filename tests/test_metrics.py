"""Vector metrics against independent answers: closed forms, exact shifts and monotone degradation."""

import numpy as np
import pytest
import torch

from fmm.groundtruth import BoxMixture
from fmm.evaluation.fid import frechet as frechet_distance
from fmm.metrics import energy_distance, exact_w2, gaussian_w2, histogram_kl, mmd_rbf, sliced_wasserstein

F64 = torch.float64


def test_frechet_distance_hand_computed_case():
    # |0 - 1|^2 * 2 + tr(I + 4I - 2 * 2I) = 2 + 2 = 4
    assert frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)) == pytest.approx(4.0, abs=1e-12)


def test_frechet_distance_is_squared_gaussian_w2():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 3)), rng.normal(size=(3, 3))
    s1, s2 = a @ a.T + np.eye(3), b @ b.T + np.eye(3)
    m1, m2 = rng.normal(size=3), rng.normal(size=3)
    w2 = gaussian_w2(torch.tensor(m1), torch.tensor(s1), torch.tensor(m2), torch.tensor(s2))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(w2**2, rel=1e-8)


def test_exact_w2_of_a_shifted_cloud_is_the_shift():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    shift = torch.tensor([0.3, -0.4], dtype=F64)
    assert exact_w2(x, x + shift) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("metric", [mmd_rbf, energy_distance, sliced_wasserstein])
def test_distances_grow_monotonically_with_added_noise(metric):
    board = BoxMixture.checkerboard()
    g = torch.Generator().manual_seed(2)
    x, y = board.sample(3000, g), board.sample(3000, g)
    noise = torch.randn(y.shape, generator=g, dtype=F64)
    values = [metric(x, y + sigma * noise) for sigma in (0.0, 0.1, 0.3, 1.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def box_log_density(board):
    def log_density(points):
        inside = ((points[:, None] >= board.lows) & (points[:, None] <= board.highs)).all(-1).any(-1)
        return torch.where(inside, torch.log(board.weights[0] / (board.highs[0] - board.lows[0]).prod()),
                           torch.tensor(-float("inf"), dtype=F64))
    return log_density


def test_histogram_kl_is_near_zero_for_exact_samples_and_grows_with_noise():
    board = BoxMixture.checkerboard()
    g = torch.Generator().manual_seed(3)
    x = board.sample(64000, g)
    exact = histogram_kl(x, box_log_density(board), extent=2.0, bins=48)  # 12 bins per square: aligned
    noisy = histogram_kl(x + 0.1 * torch.randn(x.shape, generator=g, dtype=F64), box_log_density(board), 2.0, 48)
    assert exact < 0.03 < noisy
    with pytest.raises(ValueError, match="2-D points"):
        histogram_kl(torch.zeros(10, 3), box_log_density(board), 2.0)
