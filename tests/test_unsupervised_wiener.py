"""microdecon.restore.unsupervised_wiener: restoration quality, the sampler's estimates, seeds, errors."""

import sys

import numpy as np
import pytest

import microdecon as md
from microdecon.restore import METHODS
from microdecon.restore.unsupervised_wiener import (
    GibbsInfo,
    laplacian_kernel,
    laplacian_power,
    unsupervised_wiener,
)

from .conftest import psnr, to_numpy

uw_module = sys.modules["microdecon.restore.unsupervised_wiener"]  # the function shadows it


def noisy_phantom(shape, scale, seed, sigma=1.5):
    rng = np.random.default_rng(seed)
    truth = md.data.phantom(shape, seed=seed) * scale
    psf = md.psf.gaussian((9,) * len(shape), sigma)
    noisy = rng.poisson(md.convolve(truth, psf, device="cpu").clip(0)).astype(np.float32)
    return truth, psf, noisy


@pytest.mark.parametrize(
    "shape,scale,seed,margin",
    [((96, 96), 1.0, 2, 1.5), ((96, 96), 10.0, 2, 3.0), ((16, 48, 48), 3.0, 3, 1.5)],
    ids=["2d-100-photons", "2d-1000-photons", "3d-300-photons"],
)
def test_restores_noisy_blurred_phantoms(device, shape, scale, seed, margin):
    # measured: +2.1, +3.8 and +1.9 dB over the noisy input
    truth, psf, noisy = noisy_phantom(shape, scale, seed=seed, sigma=(1.5, 1.2, 1.2)[-len(shape) :])
    out = unsupervised_wiener(noisy, psf, rng=0, device=device)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert type(out) is np.ndarray  # NumPy in, NumPy out, wherever it ran
    assert psnr(truth, out) > psnr(truth, noisy) + margin
    assert float(out.min()) >= 0


def test_matches_the_best_hand_tuned_wiener_balance():
    # the point of the method: no balance to choose, and none does much better (measured: 0.1 dB)
    truth, psf, noisy = noisy_phantom((96, 96), 1.0, seed=2)
    best = max(psnr(truth, md.wiener(noisy, psf, balance=b, device="cpu")) for b in np.logspace(-4, 0, 33))
    assert psnr(truth, unsupervised_wiener(noisy, psf, rng=0, device="cpu")) > best - 0.3


def test_default_run_is_as_good_as_a_long_one():
    truth, psf, noisy = noisy_phantom((96, 96), 10.0, seed=5)
    iterations = []
    short = unsupervised_wiener(noisy, psf, rng=1, device="cpu", callback=lambda i, e: iterations.append(i))
    long = unsupervised_wiener(noisy, psf, rng=1, device="cpu", num_iter=200, tol=0)
    assert iterations[-1] < 60
    assert abs(psnr(truth, short) - psnr(truth, long)) < 0.05


def test_recovers_the_precisions_of_data_drawn_from_its_model():
    """Object from the Laplacian prior with known precision, blurred, plus white noise of known sigma."""
    rng = np.random.default_rng(3)
    shape, prior_precision, sigma = (128, 128), 0.5, 0.2
    laplacian2 = laplacian_power(shape, np, np.float64)
    white = np.fft.rfftn(rng.standard_normal(shape), norm="ortho")
    spectrum = np.where(laplacian2 > 0, white / np.sqrt(prior_precision * np.maximum(laplacian2, 1e-30)), 0)
    x = np.fft.irfftn(spectrum, s=shape, axes=(0, 1), norm="ortho") + 50
    psf = md.psf.gaussian((9, 9), 1.2)
    y = md.convolve(x, psf, boundary="periodic", device="cpu") + rng.normal(0, sigma, shape)
    chains = []
    unsupervised_wiener(
        y,
        psf,
        reg=laplacian_kernel(2),  # the prior the data were drawn from
        boundary="periodic",
        clip=False,
        rng=1,
        device="cpu",
        num_iter=60,
        tol=0,
        callback=lambda i, e, info: chains.append((info.noise_precision, info.prior_precision)),
    )
    noise, prior = np.array(chains).T
    assert len(noise) == 60
    assert abs(noise.mean() * sigma**2 - 1) < 0.05  # measured: 0.009
    assert abs(prior.mean() / prior_precision - 1) < 0.1  # measured: 0.024
    # started at equilibrium: no drift between the first and the last iterations
    assert abs(prior[:10].mean() / prior[-10:].mean() - 1) < 0.05


def test_same_seed_same_result_other_seed_close(device):
    truth, psf, noisy = noisy_phantom((64, 64), 1.0, seed=4)
    a = to_numpy(unsupervised_wiener(noisy, psf, rng=7, device=device))
    b = to_numpy(unsupervised_wiener(noisy, psf, rng=np.random.default_rng(7), device=device))
    c = to_numpy(unsupervised_wiener(noisy, psf, rng=8, device=device))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # the Rao-Blackwellized mean carries little sampling noise: seeds agree closely (measured: 6e-4)
    assert np.abs(a - c).max() < 0.005 * np.abs(a).max()


def test_callback_sees_the_chains_and_can_stop():
    truth, psf, noisy = noisy_phantom((48, 48), 1.0, seed=6)
    seen = []

    def callback(iteration, estimate, info):
        assert isinstance(info, GibbsInfo) and info.iteration == iteration
        assert estimate.shape == noisy.shape and estimate.dtype == np.float32
        seen.append((info.noise_precision, info.prior_precision, info.samples, info.relative_change))
        return iteration == 12

    unsupervised_wiener(noisy, psf, rng=0, burn_in=5, device="cpu", callback=callback)
    assert len(seen) == 12
    assert all(n > 0 and p > 0 for n, p, _, _ in seen)
    assert [s for _, _, s, _ in seen] == [0] * 5 + list(range(1, 8))
    assert seen[5][3] is None and seen[6][3] > 0  # a change once the mean holds two iterations


@pytest.mark.parametrize("boundary", ["periodic", "reflect", "non-circulant"])
def test_boundaries_and_a_custom_regularizer(boundary, monkeypatch):
    truth, psf, noisy = noisy_phantom((64, 64), 3.0, seed=8)
    for reg in (None, np.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]]), np.ones((1, 1))):
        out = unsupervised_wiener(noisy, psf, reg=reg, boundary=boundary, rng=0, device="cpu")
        assert psnr(truth, out) > psnr(truth, noisy) + 1.0, (boundary, reg)
    # the Laplacian given explicitly is the Laplacian of the default (its OTF term aside)
    lap = np.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])
    monkeypatch.setattr(uw_module, "DEFAULT_PRIOR_OTF_WEIGHT", 0.0)
    np.testing.assert_allclose(
        unsupervised_wiener(noisy, psf, reg=lap, boundary=boundary, rng=0, device="cpu"),
        unsupervised_wiener(noisy, psf, boundary=boundary, rng=0, device="cpu"),
        atol=1e-3 * truth.max(),
    )


def test_background_is_subtracted_and_clip_off_keeps_negatives():
    truth, psf, noisy = noisy_phantom((48, 48), 1.0, seed=9)
    a = unsupervised_wiener(noisy + 100, psf, background=100.0, rng=0, device="cpu")
    b = unsupervised_wiener(noisy, psf, rng=0, device="cpu")
    np.testing.assert_allclose(a, b, atol=1e-3 * truth.max())
    assert float(unsupervised_wiener(noisy, psf, clip=False, rng=0, device="cpu").min()) < 0


def test_integer_images_and_1d():
    truth, psf, noisy = noisy_phantom((48, 48), 3.0, seed=10)
    np.testing.assert_allclose(
        unsupervised_wiener(noisy.astype(np.uint16), psf, rng=0, device="cpu"),
        unsupervised_wiener(noisy, psf, rng=0, device="cpu"),
    )
    line = np.repeat([0.0, 50.0, 5.0, 80.0, 0.0], 40)
    noisy_line = (
        np.random.default_rng(0).poisson(np.convolve(line, np.ones(5) / 5, "same")).astype(np.float32)
    )
    out = unsupervised_wiener(noisy_line, np.ones(5), rng=0, device="cpu")
    assert out.shape == line.shape and psnr(line, out) > psnr(line, noisy_line) + 1  # measured: +1.7 dB


@pytest.mark.parametrize(
    "params,error,match",
    [
        ({"num_iter": 1}, ValueError, "num_iter must be >= 2"),
        ({"num_iter": 10.0}, TypeError, "num_iter must be an integer"),
        ({"burn_in": 10, "num_iter": 10}, ValueError, "burn_in"),
        ({"min_iter": -1}, ValueError, "min_iter must be >= 0"),
        ({"burn_in": -1}, ValueError, "burn_in must be >= 0"),
        ({"tol": -1e-3}, ValueError, "tol must be >= 0"),
        ({"tol": float("nan")}, ValueError, "tol must be finite"),
        ({"rng": "seed"}, TypeError, "rng must be None, an integer seed"),
        ({"rng": -3}, ValueError, "rng must be a non-negative"),
        ({"reg": np.ones(3)}, ValueError, "reg has 1 axes but the image has 2"),
        ({"reg": np.array([[np.inf]])}, ValueError, "reg contains NaN"),
        ({"boundary": "zero"}, ValueError, "boundary must be one of"),
        ({"background": -1.0}, ValueError, "background must be >= 0"),
        ({"callback": 3}, TypeError, "callback must be callable"),
        ({"device": "tpu"}, ValueError, "device must be"),
    ],
)
def test_bad_parameters_are_named(params, error, match):
    with pytest.raises(error, match=match):
        unsupervised_wiener(np.ones((16, 16)), np.ones((3, 3)), **{"device": "cpu", **params})


def test_bad_images_and_psfs_are_named():
    with pytest.raises(ValueError, match="image contains NaN"):
        unsupervised_wiener(np.array([[1.0, np.nan]]), np.ones((1, 1)), device="cpu")
    with pytest.raises(ValueError, match="psf has negative values"):
        unsupervised_wiener(np.ones((8, 8)), -np.ones((3, 3)), device="cpu")
    with pytest.raises(TypeError, match="image has complex dtype"):
        unsupervised_wiener(np.ones((8, 8), complex), np.ones((3, 3)), device="cpu")


def test_deconvolve_dispatches_when_wired():
    if "unsupervised-wiener" not in METHODS:
        pytest.skip("microdecon.restore.METHODS has no 'unsupervised-wiener' entry yet")
    truth, psf, noisy = noisy_phantom((32, 32), 1.0, seed=11)
    np.testing.assert_array_equal(
        md.deconvolve(noisy, psf, "unsupervised-wiener", rng=3, device="cpu"),
        unsupervised_wiener(noisy, psf, rng=3, device="cpu"),
    )


def test_default_prior_restores_bright_widefield_data_above_the_data():
    # measured: the Laplacian alone 26.6 dB, 4.2 below the data (missing cone); the default 33.8
    truth = md.data.phantom((32, 128, 128), seed=5, cells=0, beads=0, filaments=20)
    psf = md.psf.widefield((31, 31, 31), (0.2, 0.1, 0.1), wavelength=0.52, na=1.2, n_immersion=1.33)
    blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    scale = 1000.0 / float(blurred.max())
    counts = np.random.default_rng(1).poisson(blurred * scale + 10)
    image = (counts + np.random.default_rng(2).normal(0, 2, blurred.shape)).astype(np.float32)
    truth = truth * scale
    data = psnr(truth, image - 10)
    default = psnr(truth, unsupervised_wiener(image, psf, background=10.0, rng=0, device="cpu"))
    laplacian = psnr(
        truth, unsupervised_wiener(image, psf, reg=laplacian_kernel(3), background=10.0, rng=0, device="cpu")
    )
    assert default > data + 1.0 and default > laplacian + 3.0, (data, default, laplacian)


def test_all_zero_data_with_an_asymmetric_psf():
    # found by Hypothesis: the sampler's equilibrium start divided by a zero residual
    out = unsupervised_wiener(
        np.zeros((1, 3), np.uint8), np.array([[5, 2], [6, 10]], np.uint8), rng=0, device="cpu"
    )
    np.testing.assert_array_equal(out, np.zeros((1, 3), np.float32))
