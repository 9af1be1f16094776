"""Reliability: property-based and numerical edge-case tests of every restoration method.

Each public method is called on the CPU with few iterations over a wide range of shapes, dtypes
and PSF sizes. Whatever the input, a call either returns a finite float32 array of the input's
shape (non-negative wherever the docstring promises it: every method with its defaults), or
raises ``ValueError`` / ``TypeError`` naming the offending argument. Inputs are never modified.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microdecon as md
from microdecon import _backend
from microdecon._backend import gpu_available
from microdecon.restore import METHODS

# name -> (function, keyword arguments kept small for speed)
CALLS = {
    "richardson_lucy": (md.richardson_lucy, dict(num_iter=3)),
    "richardson_lucy_auto": (md.richardson_lucy, {}),  # stops by itself (up to 100 iterations)
    "richardson_lucy_cg": (md.richardson_lucy, dict(num_iter=3, accelerate="conjugate-gradient")),
    "richardson_lucy_cg_auto": (md.richardson_lucy, dict(accelerate="conjugate-gradient")),
    "richardson_lucy_tv": (md.restore.richardson_lucy_tv, dict(num_iter=3)),
    "blind_richardson_lucy": (md.restore.blind_richardson_lucy, dict(num_iter=2)),
    "wiener": (md.wiener, dict(balance=1e-2)),
    "wiener_auto": (md.wiener, {}),
    "tikhonov": (md.tikhonov, dict(balance=1e-2)),
    "tikhonov_auto": (md.tikhonov, {}),
    "inverse": (md.inverse, {}),
    "landweber": (md.landweber, dict(num_iter=3)),
    "fista": (md.fista, dict(num_iter=3)),
    "unsupervised_wiener": (md.unsupervised_wiener, dict(rng=0, num_iter=20, min_iter=5, burn_in=2)),
}

# Keyword arguments for md.deconvolve, by method name.
DECONVOLVE_OPTIONS = {
    "rl": dict(num_iter=3),
    "rl-tv": dict(num_iter=3),
    "wiener": dict(balance=1e-2),
    "tikhonov": dict(balance=1e-2),
    "inverse": {},
    "landweber": dict(num_iter=3),
    "fista": dict(num_iter=3),
    "unsupervised-wiener": dict(rng=0, num_iter=20, min_iter=5, burn_in=2),
    "blind-rl": dict(num_iter=2),
}

DTYPES = [np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64]
SIZES = [1, 2, 3, 4, 5, 7, 8, 11, 13]
NAMES_IN_ERRORS = ("image", "psf", "num_iter", "balance", "epsilon", "background", "method")

FEW = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _call(name, image, psf, **extra):
    function, options = CALLS[name]
    return function(image, psf, **options, **extra, device="cpu")


def _check_result(out, shape):
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float32
    assert out.shape == tuple(shape)
    assert np.isfinite(out).all(), "NaN or Inf left the algorithm"
    assert (out >= 0).all(), f"negative values (min {out.min()})"


def _error_names_argument(error):
    message = str(error)
    assert any(word in message for word in NAMES_IN_ERRORS), message


@st.composite
def problems(draw, max_ndim=3):
    ndim = draw(st.integers(1, max_ndim))
    shape = tuple(draw(st.sampled_from(SIZES)) for _ in range(ndim))
    # keep volumes small: at most ~2000 voxels
    while int(np.prod(shape)) > 2000:
        shape = tuple(max(1, s // 2) for s in shape)
    psf_shape = tuple(draw(st.sampled_from([1, 2, 3, 4, 5, 9, 16])) for _ in range(ndim))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if dtype.kind in "iu" else np.finfo(dtype)
    # Floats span their dtype's whole range: beyond 1e37 the argument checks refuse them (a
    # ValueError naming the image), below it every method must give a finite result.
    high = float(info.max)
    low = float(info.min) if dtype.kind in "iu" else -high
    mode = draw(st.sampled_from(["random", "full-range", "zeros", "maximum", "signed", "sparse"]))
    if mode == "random":
        image = rng.random(shape) * min(high, 1000.0)
    elif mode == "full-range":  # every value the dtype holds (negative ones are treated as zero)
        image = rng.uniform(low / 2, high / 2, shape) * 2
    elif mode == "zeros":
        image = np.zeros(shape)
    elif mode == "maximum":  # saturated everywhere
        image = np.full(shape, high)
    elif mode == "signed":
        image = rng.normal(0, 50, shape)
    else:  # a few bright voxels on black
        image = (rng.random(shape) > 0.95) * min(high, 5000.0)
    image = np.clip(image, low, high).astype(dtype)
    psf_dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    psf = rng.random(psf_shape) * 10 + 1
    psf = psf.astype(psf_dtype)
    return image, psf


def _run_property(name, image, psf):
    image_before, psf_before = image.copy(), psf.copy()
    try:
        out = _call(name, image, psf)
    except (ValueError, TypeError) as error:
        _error_names_argument(error)
    else:
        _check_result(out, image.shape)
    np.testing.assert_array_equal(image, image_before)
    np.testing.assert_array_equal(psf, psf_before)


@pytest.mark.parametrize("name", sorted(CALLS))
@FEW
@given(problem=problems())
def test_any_shape_dtype_and_psf_size_gives_finite_float32(name, problem):
    _run_property(name, *problem)


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem=problems(max_ndim=2), frames=st.integers(0, 2))
def test_deconvolve_any_method_shape_and_frames(method, problem, frames):
    image, psf = problem
    if frames:
        image = np.stack([image] * frames)  # leading frame axis, PSF has fewer axes
    before = image.copy()
    try:
        out = md.deconvolve(image, psf, method, device="cpu", **DECONVOLVE_OPTIONS[method])
    except (ValueError, TypeError) as error:
        _error_names_argument(error)
    else:
        _check_result(out, image.shape)
    np.testing.assert_array_equal(image, before)


def test_deconvolve_restores_frames_independently():
    rng = np.random.default_rng(1)
    frame = rng.random((12, 12)).astype(np.float32) * 100
    psf = md.psf.gaussian((5, 5), 1.0)
    stack = np.stack([frame, 2 * frame, frame])
    out = md.deconvolve(stack, psf, "wiener", balance=1e-2, device="cpu")
    single = md.wiener(frame, psf, balance=1e-2, device="cpu")
    np.testing.assert_allclose(out[0], single, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out[2], single, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(out[1], 2 * single, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_four_dimensional_input(name):
    rng = np.random.default_rng(2)
    image = (rng.random((2, 3, 6, 6)) * 50).astype(np.float32)
    psf = md.psf.gaussian((1, 3, 3, 3), 0.8)
    _check_result(_call(name, image, psf), image.shape)


# --- invalid arguments: clear errors naming the argument -----------------------------------


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize(
    "image, psf, word, kind",
    [
        (np.zeros((0, 4)), np.ones((3, 3)), "image", ValueError),
        (np.ones((4, 4)), np.ones((3,)), "psf", ValueError),
        (np.ones((4, 4)), np.zeros((3, 3)), "psf", ValueError),
        (np.ones((4, 4)), -np.ones((3, 3)), "psf", ValueError),
        (np.full((4, 4), np.nan), np.ones((3, 3)), "image", ValueError),
        (np.full((4, 4), np.inf), np.ones((3, 3)), "image", ValueError),
        (np.ones((4, 4)), np.full((3, 3), np.nan), "psf", ValueError),
        (np.ones((4, 4), bool), np.ones((3, 3)), "image", TypeError),
        (np.ones((4, 4), complex), np.ones((3, 3)), "image", TypeError),
        (None, np.ones((3, 3)), "image", TypeError),
        (np.float32(1.0), np.ones((3, 3)), "image", ValueError),
        (np.full((4, 4), 1e300), np.ones((3, 3)), "image", ValueError),
    ],
)
def test_invalid_input_is_refused_by_name(name, image, psf, word, kind):
    with pytest.raises(kind, match=word):
        _call(name, image, psf)


# --- numerical edge cases ------------------------------------------------------------------

PSF3 = md.psf.gaussian((5, 5, 5), 1.0)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_all_zero_image_gives_zeros(name):
    out = _call(name, np.zeros((6, 10, 10), np.uint16), PSF3)
    _check_result(out, (6, 10, 10))
    np.testing.assert_array_equal(out, 0)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_single_bright_voxel(name):
    image = np.zeros((9, 15, 15), np.float32)
    image[4, 7, 7] = 1000.0
    out = _call(name, image, PSF3)
    _check_result(out, image.shape)
    # the brightest voxel stays where it was and the total light is of the same order (the
    # one-pass filters clip their negative ringing at zero, which adds light: hence the wide band)
    assert np.unravel_index(np.argmax(out), out.shape) == (4, 7, 7)
    assert 0.1 * 1000 < out.sum() < 50 * 1000


@pytest.mark.parametrize("name", sorted(CALLS))
def test_saturated_uint16(name):
    image = np.full((6, 12, 12), 65535, np.uint16)
    out = _call(name, image, PSF3)
    _check_result(out, image.shape)
    centre = out[2:4, 4:8, 4:8]
    assert out.max() < 65535 * 10
    np.testing.assert_allclose(centre, 65535, rtol=0.05)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_large_flat_regions(name):
    image = np.zeros((24, 24), np.uint16)
    image[:, 12:] = 65535
    out = _call(name, image, md.psf.gaussian((5, 5), 1.0))
    _check_result(out, image.shape)
    assert 0.5 * 65535 < out[8:16, 18:22].mean() < 1.5 * 65535
    assert out[8:16, 2:6].mean() < 0.1 * 65535


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_very_large_values_keep_their_scale(name, dtype):
    rng = np.random.default_rng(3)
    base = (rng.random((16, 16)) + 0.5).astype(np.float32)
    psf = md.psf.gaussian((5, 5), 1.0)
    scale = 1e30
    small = _call(name, base.astype(dtype), psf)
    large = _call(name, (base * scale).astype(dtype), psf)
    _check_result(large, base.shape)
    # every method is scale-covariant: ten orders of magnitude up, the same result scaled
    np.testing.assert_allclose(large.mean() / scale, small.mean(), rtol=0.05)


@pytest.mark.parametrize("name", ["richardson_lucy", "richardson_lucy_cg", "richardson_lucy_tv"])
def test_rl_constant_background_gives_zero(name):
    image = np.full((8, 16, 16), 37.0, np.float32)
    out = _call(name, image, PSF3, background=37.0)
    _check_result(out, image.shape)
    assert out.max() < 1e-3 * 37


def test_wiener_of_a_constant_is_the_constant_periodic():
    image = np.full((32, 32), 12.5, np.float32)
    balance = 1e-3
    psf = md.psf.gaussian((7, 7), 1.5)
    out = md.wiener(image, psf, balance=balance, boundary="periodic", device="cpu")
    _check_result(out, image.shape)
    # The identity regularizer is 1 at zero frequency too, so the gain there is 1 / (1 + balance):
    # a constant comes back as c / (1 + balance), within float32 FFT rounding.
    np.testing.assert_allclose(out[4:-4, 4:-4], 12.5 / (1 + balance), rtol=1e-5)
    tiny = md.wiener(image, psf, balance=1e-7, boundary="periodic", device="cpu")
    np.testing.assert_allclose(tiny[4:-4, 4:-4], 12.5, rtol=1e-5)


def _delta_psfs(ndim):
    centred = np.zeros((3,) * ndim, np.float32)
    centred[(1,) * ndim] = 1.0
    return [np.ones((1,) * ndim, np.float32), centred]


# A delta PSF, where the exact answer is the input itself. Tolerance: 1e-5 of the image's
# maximum, per voxel (float32 FFT rounding is relative to the largest value, not to each voxel:
# a 3-D Tikhonov result differs by 1.7e-5 relative on its dimmest voxels). Why each is exact:
#  - RL: the update ratio is exactly 1, so the estimate never moves;
#  - inverse: |H| = 1 everywhere, so the filter is the identity;
#  - Wiener/Tikhonov with balance 1e-8: gain 1 / (1 + 1e-8 * R) with R <= 144, 1 to 1.5e-6;
#  - Landweber / FISTA with sparsity 0: the step 1 / |H|^2 = 1 reaches the minimizer at once;
#  - conjugate-gradient RL climbs to it: 1.6e-4 of the maximum after 3 iterations, 3e-7 after 20
#    (its weight restarts once the gradient vanishes: it overflowed before).
# RL-TV, blind RL and unsupervised Wiener are left out: they regularize (or re-estimate the
# PSF) by design, so the identity is not their answer.
DELTA_OPTIONS = {
    "richardson_lucy": dict(),
    "richardson_lucy_cg": dict(num_iter=20),
    "wiener": dict(balance=1e-8),
    "tikhonov": dict(balance=1e-8),
    "inverse": dict(),
    "landweber": dict(),
    "fista": dict(sparsity=0.0),
}


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("name", sorted(DELTA_OPTIONS))
def test_delta_psf_returns_the_input(name, which, ndim):
    rng = np.random.default_rng(4)
    shape = (9, 10, 7)[:ndim]
    image = (rng.random(shape) * 100 + 1).astype(np.float32)
    psf = _delta_psfs(ndim)[which]
    function, options = CALLS[name]
    out = function(image, psf, **{**options, **DELTA_OPTIONS[name]}, device="cpu")
    np.testing.assert_allclose(out, image, rtol=1e-5, atol=1e-5 * image.max())


# --- inputs are never modified ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
def test_inputs_are_not_modified_and_read_only_works(name, dtype):
    rng = np.random.default_rng(5)
    image = (rng.random((5, 12, 12)) * 200).astype(dtype)
    psf = md.psf.gaussian((3, 5, 5), 1.0).astype(dtype if dtype != np.uint16 else np.float32)
    image_before, psf_before = image.copy(), psf.copy()
    _call(name, image, psf)
    assert image.tobytes() == image_before.tobytes()
    assert psf.tobytes() == psf_before.tobytes()
    image.flags.writeable = False
    psf.flags.writeable = False
    out = _call(name, image, psf, background=1.0)
    _check_result(out, image.shape)
    assert image.tobytes() == image_before.tobytes()
    assert psf.tobytes() == psf_before.tobytes()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deconvolve_does_not_modify_read_only_inputs(method):
    rng = np.random.default_rng(6)
    image = (rng.random((2, 10, 10)) * 200).astype(np.float32)
    psf = md.psf.gaussian((3, 3), 1.0)
    image.flags.writeable = False
    psf.flags.writeable = False
    image_before, psf_before = image.copy(), psf.copy()
    out = md.deconvolve(image, psf, method, device="cpu", **DECONVOLVE_OPTIONS[method])
    _check_result(out, image.shape)
    assert image.tobytes() == image_before.tobytes()
    assert psf.tobytes() == psf_before.tobytes()


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cupy_inputs_are_not_modified(method):
    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    xp = _backend.get_backend(device="gpu").xp
    rng = np.random.default_rng(7)
    image = xp.asarray((rng.random((4, 16, 16)) * 200).astype(np.float32))
    psf = xp.asarray(md.psf.gaussian((3, 5, 5), 1.0))
    image_before, psf_before = image.copy(), psf.copy()
    out = md.deconvolve(image, psf, method, device="gpu", **DECONVOLVE_OPTIONS[method])
    assert _backend.is_device_array(out)
    _check_result(out.get(), image.shape)
    assert bool((image == image_before).all()) and bool((psf == psf_before).all())


@pytest.mark.parametrize("method", ["rl", "rl-tv", "fista", "landweber"])
@FEW
@given(problem=problems())
def test_the_automatic_stop_is_safe_on_any_input(method, problem):
    # num_iter="auto" measures the noise and the misfit on the data: constant, all-zero, one-voxel
    # and extreme-range images must still give a finite result within the cap
    image, psf = problem
    done = []
    try:
        out = md.deconvolve(
            image, psf, method, num_iter="auto", device="cpu", callback=lambda i, e: done.append(i)
        )
    except (ValueError, TypeError) as error:
        _error_names_argument(error)
    else:
        _check_result(out, image.shape)
        assert len(done) <= 100
