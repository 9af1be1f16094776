import numpy as np
import pytest
import scipy.fft
import scipy.ndimage as ndi
import scipy.signal

import microdecon as md
from microdecon import _backend
from microdecon._backend import Backend
from microdecon.operators import Convolution

from .conftest import to_numpy

BOUNDARIES = ["non-circulant", "periodic", "reflect"]
# (image shape, PSF shape): odd, even, anisotropic, and PSFs larger than the image on some axes
CASES = [
    ((37,), (5,)),
    ((37,), (80,)),
    ((20, 23), (4, 7)),
    ((16, 9), (33, 3)),
    ((9, 16, 15), (5, 6, 21)),
    ((12, 13, 14), (3, 3, 3)),
    ((5, 12, 11), (9, 4, 4)),
]


def cpu_backends():
    backends = [Backend("cpu", fft_library="pocketfft")]
    if _backend._pyfftw() is not None:
        backends.append(Backend("cpu", fft_library="fftw"))
    return backends


@pytest.mark.parametrize("backend", cpu_backends(), ids=lambda b: b.fft_library)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("shape,psf_shape", CASES)
def test_adjoint_dot_product(backend, boundary, shape, psf_shape):
    rng = np.random.default_rng(0)
    op = Convolution(rng.random(psf_shape), shape, boundary=boundary, backend=backend)
    x = rng.random(op.object_shape).astype(np.float32)
    y = rng.random(shape).astype(np.float32)
    hx = np.array(op.forward(x), dtype=np.float64)
    hty = np.array(op.adjoint(y), dtype=np.float64)
    lhs, rhs = np.vdot(hx, y), np.vdot(x, hty)
    assert abs(lhs - rhs) <= 1e-6 * abs(lhs)


@pytest.mark.parametrize("backend", cpu_backends(), ids=lambda b: b.fft_library)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("shape,psf_shape", CASES)
def test_adjoint_of_ones_is_the_adjoint_of_an_image_of_ones(backend, boundary, shape, psf_shape):
    # H^T 1 is made from the window's spectrum as an outer product, not by transforming ones
    psf = np.random.default_rng(7).random(psf_shape) + 0.1
    op = Convolution(psf, shape, boundary=boundary, backend=backend)
    visible = np.array(op.adjoint_of_ones())
    transposed = np.array(op.adjoint(np.ones(shape, np.float32)))
    np.testing.assert_allclose(visible, transposed, rtol=0, atol=2e-6)
    # and the operator still works after it
    x = np.random.default_rng(8).random(op.object_shape).astype(np.float32)
    fresh = Convolution(psf, shape, boundary=boundary)
    np.testing.assert_allclose(op.forward(x), fresh.forward(x), atol=1e-5)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_adjoint_of_ones_survives_later_transforms_with_plans_that_make_new_arrays(boundary):
    # the GPU's plans (and scipy.fft's for an odd last axis) return new arrays: H^T 1 is handed
    # over, and the operator's next transforms must not write into it
    from microdecon._backend import _ScipyStylePlan

    psf = np.random.default_rng(7).random((5, 6, 7)) + 0.1
    op = Convolution(psf, (9, 16, 15), boundary=boundary)
    expected = np.array(op.adjoint(np.ones((9, 16, 15), np.float32)))
    op.plan = _ScipyStylePlan(scipy.fft, op.fft_shape, workers=1)
    visible = op.adjoint_of_ones(scratch=boundary != "reflect")  # handed over all the same
    kept = visible.copy()
    np.testing.assert_allclose(visible, expected, atol=2e-6)
    rng = np.random.default_rng(9)
    for _ in range(2):
        op.adjoint(rng.random((9, 16, 15)).astype(np.float32))
        op.forward(rng.random(op.object_shape).astype(np.float32))
        if op.staging_buffer() is not None:
            op.staging_buffer()[...] = 1
            op.forward(None, staged=True)
    np.testing.assert_array_equal(visible, kept)


@pytest.mark.gpu
def test_adjoint_of_ones_on_the_gpu_equals_the_cpus():
    if not _backend.gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    psf = np.random.default_rng(7).random((5, 6, 7)) + 0.1
    gpu = _backend.get_backend(device="gpu")
    for boundary in BOUNDARIES:
        expected = Convolution(psf, (9, 16, 15), boundary=boundary).adjoint_of_ones()
        visible = Convolution(psf, (9, 16, 15), boundary=boundary, backend=gpu).adjoint_of_ones()
        np.testing.assert_allclose(visible.get(), expected, atol=2e-6)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("shape,psf_shape", CASES[:5])
def test_public_convolve_pair_is_exactly_adjoint(device, boundary, shape, psf_shape):
    rng = np.random.default_rng(1)
    psf = rng.random(psf_shape)
    x = rng.random(shape).astype(np.float32)
    y = rng.random(shape).astype(np.float32)
    hx = to_numpy(md.convolve(x, psf, boundary=boundary, device=device)).astype(np.float64)
    hty = to_numpy(md.convolve_transpose(y, psf, boundary=boundary, device=device)).astype(np.float64)
    assert abs(np.vdot(hx, y) - np.vdot(x, hty)) <= 1e-6 * abs(np.vdot(hx, y))


@pytest.mark.parametrize(
    "shape,psf_shape",
    [((41,), (7,)), ((30, 33), (5, 9)), ((11, 20, 17), (5, 7, 3)), ((8, 9, 10), (13, 15, 11))],
)
def test_non_circulant_equals_fftconvolve_same(device, shape, psf_shape):
    rng = np.random.default_rng(2)
    x, psf = rng.random(shape), rng.random(psf_shape)
    expected = scipy.signal.fftconvolve(x, psf / psf.sum(), mode="same")
    got = to_numpy(md.convolve(x, psf, device=device))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("boundary,mode", [("reflect", "reflect"), ("periodic", "wrap")])
@pytest.mark.parametrize("shape,psf_shape", [((41,), (7,)), ((30, 33), (5, 9)), ((11, 20, 17), (5, 7, 3))])
def test_reflect_and_periodic_equal_ndimage(device, boundary, mode, shape, psf_shape):
    rng = np.random.default_rng(3)
    x, psf = rng.random(shape), rng.random(psf_shape)
    expected = ndi.convolve(x, psf / psf.sum(), mode=mode)
    got = to_numpy(md.convolve(x, psf, boundary=boundary, device=device))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_periodic_psf_larger_than_image_wraps_exactly():
    rng = np.random.default_rng(4)
    x, psf = rng.random(9), rng.random(23)
    psf = psf / psf.sum()
    c = len(psf) // 2
    expected = np.array([sum(psf[k] * x[(i + c - k) % 9] for k in range(23)) for i in range(9)])
    np.testing.assert_allclose(md.convolve(x, psf, boundary="periodic", device="cpu"), expected, rtol=1e-5)


@pytest.mark.parametrize("psf_shape", [(4, 4), (5, 6), (7, 7)])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_delta_psf_at_n_over_2_is_identity(psf_shape, boundary):
    delta = np.zeros(psf_shape)
    delta[tuple(n // 2 for n in psf_shape)] = 3.0  # normalized to 1 inside
    x = np.random.default_rng(5).random((13, 10)).astype(np.float32)
    np.testing.assert_allclose(md.convolve(x, delta, boundary=boundary, device="cpu"), x, atol=1e-6)
    np.testing.assert_allclose(md.convolve_transpose(x, delta, boundary=boundary, device="cpu"), x, atol=1e-6)


def test_fft_grid_uses_fast_lengths_and_covers_the_psf():
    op = Convolution(np.ones((31, 31, 31)), (64, 250, 257), backend=Backend("cpu", fft_library="pocketfft"))
    assert all(f >= n + p - 1 for f, n, p in zip(op.fft_shape, (64, 250, 257), (31, 31, 31)))
    for length in op.fft_shape:
        remainder = length
        for factor in (2, 3, 5):
            while remainder % factor == 0:
                remainder //= factor
        assert remainder == 1
    assert Convolution(np.ones(3), (97,), boundary="periodic").fft_shape == (97,)


def test_types_shapes_and_input_untouched(device, xp_for):
    x = xp_for.asarray(np.random.default_rng(6).integers(0, 1000, (6, 20, 21)).astype(np.uint16))
    copy = x.copy()
    out = md.convolve(x, np.ones((3, 3, 3)), device=device)
    assert type(out) is type(x) and out.dtype == np.float32 and out.shape == x.shape
    assert bool((x == copy).all())


@pytest.mark.parametrize(
    "x,psf,error,match",
    [
        (np.ones((4, 4)), np.ones(3), ValueError, "psf has 1 axes but the image has 2"),
        (np.ones((4, 4)), -np.ones((3, 3)), ValueError, "psf has negative values"),
        (np.ones((4, 4)), np.zeros((3, 3)), ValueError, "psf is all zero"),
        (np.ones((4, 4)), np.full((3, 3), np.nan), ValueError, "psf contains NaN"),
        (np.array([1.0, np.inf]), np.ones(3), ValueError, "x contains NaN or infinite"),
        (np.ones((0, 4)), np.ones((3, 3)), ValueError, "x is empty"),
        (np.ones(4, complex), np.ones(3), TypeError, "x has complex dtype"),
        (np.array(["a", "b"]), np.ones(3), TypeError, "x has dtype <U1"),
        (np.ones(4, bool), np.ones(3), TypeError, "x has dtype bool"),
        (np.float32(3.0), np.ones(3), ValueError, "x must have at least one axis"),
    ],
)
def test_bad_input_is_named(x, psf, error, match):
    with pytest.raises(error, match=match):
        md.convolve(x, psf, device="cpu")


def test_bad_boundary_is_named():
    with pytest.raises(ValueError, match="boundary must be one of"):
        md.convolve(np.ones(5), np.ones(3), boundary="zero", device="cpu")


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    data=st.data(),
    ndim=st.integers(1, 3),
    boundary=st.sampled_from(BOUNDARIES),
    library=st.sampled_from([b.fft_library for b in cpu_backends()]),
)
def test_adjointness_holds_for_any_shapes(data, ndim, boundary, library):
    # size-1 axes, prime and even sizes, PSFs longer than the image on some axes
    shape = tuple(data.draw(st.integers(1, 13)) for _ in range(ndim))
    psf_shape = tuple(data.draw(st.integers(1, 17)) for _ in range(ndim))
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    op = Convolution(
        rng.random(psf_shape) + 1e-3, shape, boundary=boundary, backend=Backend("cpu", fft_library=library)
    )
    x = rng.random(op.object_shape).astype(np.float32)
    y = rng.random(shape).astype(np.float32)
    hx = np.array(op.forward(x), dtype=np.float64)
    hty = np.array(op.adjoint(y), dtype=np.float64)
    assert hx.shape == shape and hty.shape == op.object_shape
    lhs, rhs = np.vdot(hx, y), np.vdot(x, hty)
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
