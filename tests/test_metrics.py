import numpy as np
from scipy.special import kl_div
from skimage.metrics import structural_similarity

import microdecon as md


def test_i_divergence_matches_scipy_kl_div():
    rng = np.random.default_rng(0)
    data = rng.poisson(5, (20, 30)).astype(np.float64)  # with zeros
    model = rng.random((20, 30)) * 10 + 0.1
    assert (
        abs(md.metrics.i_divergence(data, model) - kl_div(data, model).sum())
        < 1e-9 * kl_div(data, model).sum()
    )
    assert md.metrics.i_divergence(data, data) == 0.0


def test_ssim_matches_scikit_image_and_falls_with_noise():
    rng = np.random.default_rng(1)
    truth = md.data.phantom((16, 48, 48), seed=0)
    noisy = truth + rng.normal(0, 0.1 * truth.max(), truth.shape)
    span = float(truth.max() - truth.min())
    expected = structural_similarity(truth, noisy, data_range=span, win_size=7)
    assert abs(md.metrics.ssim(truth, noisy) - expected) < 1e-6  # ours compares in float64
    assert md.metrics.ssim(truth, truth) == 1.0 > md.metrics.ssim(truth, noisy)
