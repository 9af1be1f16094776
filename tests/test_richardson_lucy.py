import sys

import numpy as np
import pytest

import microdecon as md
from microdecon._backend import gpu_available
from microdecon.restore._stopping import AUTO_MAX_ITER

from .conftest import psnr, to_numpy

rl_module = sys.modules["microdecon.restore.richardson_lucy"]


@pytest.fixture(scope="module")
def problem_3d():
    rng = np.random.default_rng(0)
    truth = md.data.phantom((16, 48, 48), seed=3)
    psf = md.psf.gaussian((9, 11, 11), (2.0, 1.3, 1.3))
    blurred = md.convolve(truth, psf, device="cpu")
    noisy = rng.poisson(np.maximum(blurred, 0) * 20).astype(np.float32) / 20
    return truth, psf, noisy


@pytest.fixture(scope="module")
def problem_2d():
    rng = np.random.default_rng(1)
    truth = md.data.phantom((64, 64), seed=4)
    psf = md.psf.gaussian((15, 15), 2.0)
    blurred = md.convolve(truth, psf, device="cpu")
    return truth, psf, rng.poisson(np.maximum(blurred, 0) * 50).astype(np.float32) / 50


@pytest.mark.parametrize("boundary", ["non-circulant", "periodic", "reflect"])
def test_rl_improves_psnr_3d(device, boundary):
    # data made with the same boundary model that restores it
    truth = md.data.phantom((16, 48, 48), seed=3)
    psf = md.psf.gaussian((9, 11, 11), (2.0, 1.3, 1.3))
    blurred = np.maximum(md.convolve(truth, psf, boundary=boundary, device="cpu"), 0)
    noisy = np.random.default_rng(0).poisson(blurred * 20).astype(np.float32) / 20
    out = md.richardson_lucy(noisy, psf, 15, boundary=boundary, device=device)
    assert psnr(truth, out) > psnr(truth, noisy) + 3.0


def test_rl_improves_psnr_1d_and_2d(device, problem_2d):
    truth, psf, noisy = problem_2d
    assert psnr(truth, md.richardson_lucy(noisy, psf, 20, device=device)) > psnr(truth, noisy) + 2.0
    # 1-D: two peaks closer than the blur's FWHM (7 px) merge in the data and separate again
    signal = np.zeros(200, np.float32)
    signal[[40, 46, 120]] = [50, 80, 60]
    psf1 = md.psf.gaussian(21, 3.0)
    blurred1 = md.convolve(signal, psf1, device="cpu")
    assert blurred1[43] > 0.9 * min(blurred1[40], blurred1[46])  # unresolved
    restored = to_numpy(md.richardson_lucy(blurred1, psf1, 50, device=device))
    assert restored[41:46].min() < 0.3 * min(restored[38:43].max(), restored[44:49].max())
    assert abs(restored[30:60].sum() - 130) < 2 and abs(restored[110:130].sum() - 60) < 1


def test_accelerated_beats_plain_at_equal_iterations(problem_3d):
    truth, psf, noisy = problem_3d
    plain = md.richardson_lucy(noisy, psf, 10, accelerate=False, device="cpu")
    fast = md.richardson_lucy(noisy, psf, 10, accelerate=True, device="cpu")
    assert psnr(truth, fast) > psnr(truth, plain) + 0.5
    # and matches 40 plain iterations in 16
    plain_40 = md.richardson_lucy(noisy, psf, 40, accelerate=False, device="cpu")
    fast_16 = md.richardson_lucy(noisy, psf, 16, accelerate=True, device="cpu")
    assert psnr(truth, fast_16) >= psnr(truth, plain_40)


def test_float32_inputs_views_and_memmaps_are_never_written(tmp_path, problem_3d):
    _, psf, noisy = problem_3d
    signed = noisy - 0.5  # negative values: RL clips its own copy, not the caller's
    before = signed.copy()
    md.richardson_lucy(signed, psf, 3, device="cpu")
    md.richardson_lucy(signed[2:], psf, 3, device="cpu")
    np.testing.assert_array_equal(signed, before)
    mapped = np.lib.format.open_memmap(
        tmp_path / "stack.npy", mode="w+", dtype=np.float32, shape=signed.shape
    )
    mapped[...] = signed
    mapped.flush()
    md.richardson_lucy(mapped, psf, 3, device="cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "stack.npy"), before)
    frozen = signed.copy()
    frozen.flags.writeable = False
    assert md.richardson_lucy(frozen, psf, 3, device="cpu").shape == frozen.shape


def test_output_is_float32_nonnegative_and_input_untouched(device, xp_for, problem_3d):
    _, psf, noisy = problem_3d
    image = xp_for.asarray(np.round(noisy * 100).astype(np.uint16))
    before = image.copy()
    out = md.richardson_lucy(image, psf, 5, device=device)
    assert type(out) is type(image) and out.dtype == np.float32 and out.shape == image.shape
    assert float(out.min()) >= 0 and bool(xp_for.isfinite(out).all())
    assert bool((image == before).all())


def asymmetric_psf(shape):
    """An even-sized, off-centre, skewed PSF: its OTF is complex, so conjugation matters."""
    grids = np.indices(shape, dtype=np.float64)
    centre = [n // 2 + 0.7 for n in shape]
    r2 = sum(((g - c) / (1.0 + 0.4 * i)) ** 2 for i, (g, c) in enumerate(zip(grids, centre)))
    psf = np.exp(-0.5 * r2) * (1 + 0.5 * (grids[-1] - centre[-1]).clip(0))
    return (psf / psf.sum()).astype(np.float32)


def naive_periodic_rl(image, psf, num_iter):
    """Textbook RL with circular convolution via numpy.fft, float64: the reference."""
    kernel = np.zeros(image.shape)
    kernel[tuple(slice(0, n) for n in psf.shape)] = psf / psf.sum()
    kernel = np.roll(kernel, [-(n // 2) for n in psf.shape], axis=tuple(range(image.ndim)))
    otf = np.fft.rfftn(kernel)

    def blur(x, transpose=False):
        spectrum = np.fft.rfftn(x) * (otf.conj() if transpose else otf)
        return np.fft.irfftn(spectrum, s=image.shape, axes=tuple(range(image.ndim)))

    x = 0.95 * image + 0.05 * image.mean()  # microdecon's first estimate
    for _ in range(num_iter):
        x = x * blur(image / blur(x), transpose=True)
    return x


def test_plain_periodic_rl_matches_textbook_reference(device, problem_2d):
    truth, psf, noisy = problem_2d
    image = noisy + 0.5  # strictly positive: the textbook version has no guards
    expected = naive_periodic_rl(image.astype(np.float64), psf.astype(np.float64), 12)
    got = to_numpy(md.richardson_lucy(image, psf, 12, accelerate=False, boundary="periodic", device=device))
    assert np.abs(got - expected).max() <= 1e-4 * expected.max()


def test_plain_periodic_rl_matches_reference_with_an_asymmetric_even_psf():
    truth = md.data.phantom((48, 50), seed=6)
    psf = asymmetric_psf((8, 10))
    image = np.maximum(md.convolve(truth, psf, boundary="periodic", device="cpu"), 0) + 0.5
    expected = naive_periodic_rl(image.astype(np.float64), psf.astype(np.float64), 10)
    got = md.richardson_lucy(image, psf, 10, accelerate=False, boundary="periodic", device="cpu")
    assert np.abs(got - expected).max() <= 1e-4 * expected.max()


@pytest.mark.parametrize("boundary", ["non-circulant", "reflect"])
def test_asymmetric_psf_larger_than_the_stack(boundary):
    # a measured PSF often has more planes than the stack (2P - 1 here) and is not symmetric
    truth = md.data.phantom((9, 40, 40), seed=8)
    psf = asymmetric_psf((17, 9, 9))
    blurred = np.maximum(md.convolve(truth, psf, boundary=boundary, device="cpu"), 0)
    noisy = np.random.default_rng(3).poisson(blurred * 30).astype(np.float32) / 30
    out = md.richardson_lucy(noisy, psf, 15, boundary=boundary, device="cpu")
    assert psnr(truth, out) > psnr(truth, noisy) + 2


def test_background_is_an_additive_offset(problem_3d):
    truth, psf, noisy = problem_3d
    offset = 40.0
    with_offset = noisy + offset
    modelled = md.richardson_lucy(with_offset, psf, 15, background=offset, device="cpu")
    ignored = md.richardson_lucy(with_offset, psf, 15, device="cpu")
    # A background slows RL down (each ratio is diluted by it), but modelling it beats ignoring
    # it by far and still restores the data.
    assert psnr(truth, modelled) > psnr(truth, ignored) + 3
    assert psnr(truth, modelled) > psnr(truth, noisy) + 1
    as_array = md.richardson_lucy(with_offset, psf, 15, background=np.full(noisy.shape, offset), device="cpu")
    np.testing.assert_allclose(as_array, modelled, rtol=1e-4, atol=1e-4)
    per_plane = md.richardson_lucy(
        with_offset, psf, 15, background=np.full(noisy.shape[1:], offset), device="cpu"
    )
    np.testing.assert_allclose(per_plane, modelled, rtol=1e-4, atol=1e-4)


def test_non_circulant_restores_objects_cut_by_the_border():
    truth = np.zeros((64, 64), np.float32)
    truth[20:44, 0:6] = 100  # a bright object cut by the left edge
    truth[30, 40] = 300
    psf = md.psf.gaussian((17, 17), 2.5)
    observed = md.convolve(truth, psf, device="cpu")  # the light that fell outside is lost
    errors = {}
    for boundary in ("non-circulant", "periodic", "reflect"):
        out = md.richardson_lucy(observed, psf, 30, boundary=boundary, device="cpu")
        errors[boundary] = float(np.abs(out[16:48, :10] - truth[16:48, :10]).mean())
    assert errors["non-circulant"] < 12
    assert errors["periodic"] > 3 * errors["non-circulant"]
    assert errors["reflect"] > 2 * errors["non-circulant"]


def test_delta_psf_returns_the_input(device):
    image = np.random.default_rng(2).random((10, 12)).astype(np.float32) + 0.1
    delta = np.zeros((3, 3))
    delta[1, 1] = 1
    for boundary in ("non-circulant", "periodic", "reflect"):
        out = to_numpy(md.richardson_lucy(image, delta, 3, boundary=boundary, device=device))
        np.testing.assert_allclose(out, image, rtol=1e-5)


def test_edge_cases_zero_image_and_zero_iterations(device):
    psf = md.psf.gaussian((5, 5), 1.0)
    zero = to_numpy(md.richardson_lucy(np.zeros((16, 16)), psf, 5, device=device))
    assert np.all(zero == 0)
    image = np.random.default_rng(3).random((16, 16)).astype(np.float32)
    start = to_numpy(md.richardson_lucy(image, psf, 0, device=device))
    np.testing.assert_allclose(start, 0.95 * image + 0.05 * image.mean(), rtol=1e-5)
    huge = to_numpy(md.richardson_lucy(image * 1e30, psf, 5, device=device))
    assert np.isfinite(huge).all() and huge.max() > 1e29


def test_callback_sees_each_iteration_and_can_stop(problem_2d):
    _, psf, noisy = problem_2d
    seen = []

    def callback(iteration, estimate):
        seen.append((iteration, estimate.shape, float(estimate.sum())))
        return iteration == 4

    stopped = md.richardson_lucy(noisy, psf, 30, callback=callback, device="cpu")
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    assert all(s[1] == noisy.shape for s in seen)
    four = md.richardson_lucy(noisy, psf, 4, device="cpu")
    np.testing.assert_array_equal(stopped, four)
    assert abs(seen[-1][2] - float(four.sum())) <= 1e-5 * float(four.sum())


def test_otf_and_plan_are_computed_once_per_call(monkeypatch, problem_2d):
    _, psf, noisy = problem_2d
    calls = {"forward": 0, "plans": 0}
    backend = md._backend.get_backend(device="cpu")
    original_plan = backend.fft_plan

    def counting_plan(shape):
        calls["plans"] += 1
        plan = original_plan(shape)
        original_forward = plan.forward

        def forward(x):
            calls["forward"] += 1
            return original_forward(x)

        monkeypatch.setattr(plan, "forward", forward)
        return plan

    monkeypatch.setattr(backend, "fft_plan", counting_plan)
    md.richardson_lucy(noisy, psf, 7, accelerate=False, device="cpu")
    # one plan; one forward FFT for the OTF (H^T 1 needs none: its input's spectrum is known),
    # then two per iteration
    assert calls["plans"] == 1
    assert calls["forward"] == 1 + 2 * 7


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"num_iter": -1}, ValueError, "num_iter must be >= 0"),
        ({"num_iter": 2.5}, TypeError, "num_iter must be an integer"),
        ({"num_iter": True}, TypeError, "num_iter must be an integer"),
        ({"background": -1.0}, ValueError, "background must be >= 0"),
        ({"background": np.ones((3, 3))}, ValueError, "background of shape"),
        ({"background": np.ones((1, 8, 8))}, ValueError, "background of shape"),
        ({"background": np.array([[np.nan] * 8] * 8)}, ValueError, "background contains NaN"),
        ({"background": float("nan")}, ValueError, "background must be finite"),
        ({"boundary": "wrap"}, ValueError, "boundary must be one of"),
        ({"device": "tpu"}, ValueError, "device must be"),
        ({"callback": 3}, TypeError, "callback must be callable"),
        ({"tv": -0.01}, ValueError, "tv must be >= 0"),
        ({"tv": 0.5}, ValueError, "tv must be <= 0.05"),
        ({"tol": 0.0}, ValueError, "tol must be > 0"),
        ({"tol": "small"}, TypeError, "tol must be a real number"),
    ],
)
def test_bad_parameters_are_named(kwargs, error, match):
    params = {"num_iter": 2, **kwargs}
    with pytest.raises(error, match=match):
        md.richardson_lucy(np.ones((8, 8)), np.ones((3, 3)), device=params.pop("device", "cpu"), **params)


def test_bad_images_and_psfs_are_named():
    with pytest.raises(ValueError, match="image contains NaN"):
        md.richardson_lucy(np.array([[1.0, np.nan]]), np.ones((1, 1)), 2, device="cpu")
    with pytest.raises(ValueError, match="psf has 2 axes but the image has 3"):
        md.richardson_lucy(np.ones((2, 3, 4)), np.ones((3, 3)), 2, device="cpu")
    with pytest.raises(TypeError, match="image has complex dtype"):
        md.richardson_lucy(np.ones((4, 4), complex), np.ones((3, 3)), 2, device="cpu")
    with pytest.raises(ValueError, match="image is empty"):
        md.richardson_lucy(np.ones((4, 0)), np.ones((3, 3)), 2, device="cpu")
    with pytest.raises(ValueError, match="psf contains NaN or infinite"):
        md.richardson_lucy(np.ones((4, 4)), np.array([[1.0, np.inf]]), 2, device="cpu")
    with pytest.raises(ValueError, match="psf is empty"):
        md.richardson_lucy(np.ones((4, 4)), np.ones((0, 3)), 2, device="cpu")
    with pytest.raises(ValueError, match="could overflow; rescale it"):
        md.richardson_lucy(np.full((4, 4), 1e39), np.ones((3, 3)), 2, device="cpu")
    with pytest.raises(TypeError, match="image must be an array of numbers"):
        md.richardson_lucy([[1, 2], [3]], np.ones((3, 3)), 2, device="cpu")


def test_dask_input_is_refused_until_tiling_exists():
    da = pytest.importorskip("dask.array")
    with pytest.raises(TypeError, match="image is a Dask array"):
        md.richardson_lucy(da.ones((8, 8)), np.ones((3, 3)), 2, device="cpu")


@pytest.mark.skipif(md._backend._pyfftw() is None, reason="needs pyFFTW")
@pytest.mark.parametrize("boundary", ["non-circulant", "periodic", "reflect"])
@pytest.mark.parametrize("accelerate", [False, True])
def test_fftw_and_scipy_paths_agree(problem_3d, boundary, accelerate):
    # FFTW's path writes each estimate straight into the transform's buffer; scipy's does not
    _, psf, noisy = problem_3d
    results = {}
    try:
        for library in ("pocketfft", "fftw"):
            md._backend.set_cpu_fft(library)
            results[library] = md.richardson_lucy(
                noisy, psf, 8, accelerate=accelerate, boundary=boundary, device="cpu"
            )
    finally:
        md._backend.set_cpu_fft("pocketfft")  # the suite's setting (conftest)
    scale = float(results["pocketfft"].max())
    # float32 rounding differs between the libraries; the bfloat16 step history can round such
    # differences either way, so the accelerated runs agree a little less closely
    tolerance = 1e-3 if accelerate else 1e-4
    assert np.abs(results["fftw"] - results["pocketfft"]).max() < tolerance * scale


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    data=st.data(),
    ndim=st.integers(1, 3),
    dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float16, np.float32, np.float64]),
    boundary=st.sampled_from(["non-circulant", "periodic", "reflect"]),
    accelerate=st.booleans(),
)
def test_any_shape_and_dtype_gives_a_finite_nonnegative_float32_result(
    data, ndim, dtype, boundary, accelerate
):
    shape = tuple(data.draw(st.integers(1, 11)) for _ in range(ndim))
    psf_shape = tuple(data.draw(st.integers(1, 9)) for _ in range(ndim))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    image = (rng.random(shape) * 100).astype(dtype)
    psf = rng.random(psf_shape)
    out = md.richardson_lucy(image, psf, 4, accelerate=accelerate, boundary=boundary, device="cpu")
    assert out.shape == shape and out.dtype == np.float32
    assert np.isfinite(out).all() and out.min() >= 0
    filtered = md.wiener(image, psf, boundary=boundary, device="cpu")
    assert filtered.shape == shape and filtered.dtype == np.float32 and np.isfinite(filtered).all()


@pytest.fixture(scope="module")
def low_photon_3d():
    """About 15 photons at the brightest blurred voxel over a background of 10: RL amplifies
    the noise within a few accelerated iterations."""
    rng = np.random.default_rng(1)
    truth = md.data.phantom((24, 64, 64), seed=3)
    psf = md.psf.gaussian((11, 15, 15), (2.0, 1.5, 1.5))
    blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    scale = 15 / blurred.max()
    noisy = rng.poisson(blurred * scale + 10).astype(np.float32)
    return truth * scale, psf, noisy


def test_rl_tv_beats_plain_rl_at_low_photon_counts(low_photon_3d):
    truth, psf, noisy = low_photon_3d
    fixed = psnr(truth, md.richardson_lucy(noisy, psf, 30, background=10, device="cpu"))
    plain = psnr(truth, md.richardson_lucy(noisy, psf, background=10, device="cpu"))
    regularized = psnr(truth, md.deconvolve(noisy, psf, "rl-tv", background=10, device="cpu"))
    strong = psnr(truth, md.restore.richardson_lucy_tv(noisy, psf, tv=0.01, background=10, device="cpu"))
    # measured: data 29.6 dB, RL 30 iterations 31.4, RL stopping by itself (hold-out) 34.4,
    # RL-TV with its defaults 34.9, tv=0.01 36.0
    assert regularized > plain + 0.3
    assert regularized > fixed + 2.5
    assert strong > regularized + 0.5


def test_rl_tv_keeps_its_acceleration(low_photon_3d, monkeypatch):
    # The total-variation factor once swung between its bounds on the "non-circulant" margin
    # (where it was divided by the small H^T 1): the margin oscillated, the extrapolation
    # weight fell to 0 after ten iterations, and RL-TV ran as slowly as plain RL.
    truth, psf, noisy = low_photon_3d
    weights = []
    original = rl_module._extrapolation_weight

    def recorded(cross, norm):
        weights.append(original(cross, norm))
        return weights[-1]

    monkeypatch.setattr(rl_module, "_extrapolation_weight", recorded)
    md.richardson_lucy(noisy, psf, 30, tv=0.002, background=10, device="cpu")
    assert len(weights) == 29 and np.median(weights) > 0.5  # measured 0.9; it was 0


@pytest.mark.parametrize("accelerate", [True, False])
def test_rl_tv_is_stable_up_to_the_largest_weight(device, accelerate, problem_2d):
    truth, psf, noisy = problem_2d
    out = to_numpy(md.richardson_lucy(noisy, psf, 40, tv=0.05, accelerate=accelerate, device=device))
    assert np.isfinite(out).all() and out.min() >= 0
    assert abs(out.sum() - noisy.sum()) < 0.02 * noisy.sum()  # RL-TV keeps the flux
    assert psnr(truth, out) > psnr(truth, noisy)


def test_tv_term_is_minus_the_divergence_of_the_unit_gradient():
    # a ramp along x has a unit gradient field that is constant inside: divergence 0 there, and
    # the ends of the ramp where the field stops get -1 and +1
    x = np.tile(np.arange(8, dtype=np.float32), (5, 1))
    divergence = np.zeros_like(x)
    for axis in range(2):
        gradient = rl_module._forward_difference(x, axis, np)
        magnitude = np.sqrt(sum(rl_module._forward_difference(x, a, np) ** 2 for a in range(2)) + 1e-12)
        rl_module._add_backward_difference(divergence, gradient / magnitude, axis)
    np.testing.assert_allclose(divergence[:, 1:-1], 0, atol=1e-6)
    np.testing.assert_allclose(divergence[:, 0], 1, atol=1e-6)
    np.testing.assert_allclose(divergence[:, -1], -1, atol=1e-6)
    # and backward differences are minus the adjoint of forward ones: <Dx, y> = -<x, D*y>
    rng = np.random.default_rng(0)
    a, b = rng.random((6, 7)), rng.random((6, 7))
    for axis in range(2):
        lhs = float(np.sum(rl_module._forward_difference(a, axis, np) * b))
        masked = b.copy()
        masked[(slice(None),) * axis + (slice(-1, None),)] = 0  # D x has no last entry
        back = np.zeros_like(b)
        rl_module._add_backward_difference(back, masked, axis)
        assert abs(lhs + float(np.sum(a * back))) < 1e-6  # float32 differences


def test_tol_stops_when_the_estimate_settles(problem_2d):
    _, psf, noisy = problem_2d
    changes = []

    def record(iteration, estimate, info):
        changes.append(info.relative_change)

    md.richardson_lucy(noisy, psf, 60, accelerate=False, callback=record, device="cpu")
    # plain RL slows down steadily; the rule stops at the first iteration below the tolerance
    tol = 0.01
    expected = next(i for i, c in enumerate(changes, 1) if c < tol)
    seen = []
    stopped = md.richardson_lucy(
        noisy, psf, 60, accelerate=False, tol=tol, callback=lambda i, x: seen.append(i), device="cpu"
    )
    assert 2 < expected < 60 and seen[-1] == expected
    np.testing.assert_array_equal(
        stopped, md.richardson_lucy(noisy, psf, expected, accelerate=False, device="cpu")
    )


def test_callback_info_reports_change_and_a_falling_i_divergence(problem_2d):
    _, psf, noisy = problem_2d
    infos, previous = [], {}

    def callback(iteration, estimate, info):
        if "x" in previous:
            expected = np.linalg.norm(estimate - previous["x"]) / np.linalg.norm(previous["x"])
            assert abs(info.relative_change - expected) < 1e-3 * expected + 1e-7
        previous["x"] = estimate.copy()
        infos.append(info)

    md.richardson_lucy(noisy, psf, 12, accelerate=False, boundary="periodic", callback=callback, device="cpu")
    divergences = [i.i_divergence for i in infos]
    assert [i.iteration for i in infos] == list(range(1, 13))
    # EM never increases the Poisson misfit; the value is that of the iterate each step began from
    assert all(b <= a * (1 + 1e-5) for a, b in zip(divergences, divergences[1:]))
    first = md.richardson_lucy(noisy, psf, 0, boundary="periodic", device="cpu")
    blurred = md.convolve(first, psf, boundary="periodic", device="cpu")
    assert abs(divergences[0] - md.metrics.i_divergence(noisy, blurred)) < 1e-3 * divergences[0]


def _photon_problem(peak, seed=3, shape=(24, 64, 64)):
    rng = np.random.default_rng(seed)
    truth = md.data.phantom(shape, seed=seed)
    psf = md.psf.gaussian((9, 11, 11), (2.0, 1.5, 1.5))
    blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    scale = peak / float(blurred.max())
    image = (rng.poisson(blurred * scale + 10) + rng.normal(0, 2, blurred.shape)).astype(np.float32)
    return image, psf, truth * scale


def _auto_run(image, psf, background=10.0, device="cpu", accelerate=True):
    done = []
    out = md.richardson_lucy(
        image,
        psf,
        background=background,
        accelerate=accelerate,
        device=device,
        callback=lambda i, e: done.append(i),
    )
    return to_numpy(out), len(done)


def _best_of_100(image, psf, truth):
    curve = []
    md.richardson_lucy(
        image, psf, 100, background=10.0, device="cpu", callback=lambda i, e: curve.append(psnr(truth, e))
    )
    return max(curve)


def test_auto_stops_early_on_noisy_data_and_late_on_clean_data():
    image, psf, truth = _photon_problem(30)
    noisy, noisy_count = _auto_run(image, psf)
    bright_image, _, bright_truth = _photon_problem(3000)
    bright, bright_count = _auto_run(bright_image, psf)
    assert 6 <= noisy_count < bright_count <= AUTO_MAX_ITER
    # near the best count in hindsight on both (measured: 0.1 and 0.5 dB below it), where one
    # fixed count for both (30) lost 1.6 dB on each
    for data, truth_, auto in ((image, truth, noisy), (bright_image, bright_truth, bright)):
        assert psnr(truth_, auto) > _best_of_100(data, psf, truth_) - 0.75
        fixed = md.richardson_lucy(data, psf, 30, background=10.0, device="cpu")
        assert psnr(truth_, auto) > psnr(truth_, fixed) + 0.8
    assert psnr(truth, noisy) > psnr(
        truth, md.richardson_lucy(image, psf, noisy_count * 3, background=10.0, device="cpu")
    )


def test_auto_counts_by_holdout_near_the_best_count_where_the_plateau_overshoots(monkeypatch):
    # a dim cell, 15 photons over a background of 10: the data's misfit levels off late, long
    # after RL has begun to fit the noise; the held-out voxels' misfit turns at the best count
    image, psf, truth = _photon_problem(15, seed=7, shape=(32, 96, 96))
    best = _best_of_100(image, psf, truth)
    holdout, count = _auto_run(image, psf)
    monkeypatch.setattr(rl_module, "_holdout_works", lambda psf, image: False)
    plateau, plateau_count = _auto_run(image, psf)
    # measured: best 33.72 dB, hold-out 33.71 after 10 iterations, plateau 30.44 after 24
    assert psnr(truth, holdout) > best - 0.3
    assert psnr(truth, holdout) > psnr(truth, plateau) + 2.5
    assert count < plateau_count


@pytest.mark.gpu
@pytest.mark.parametrize("accelerate", [True, False])
def test_gpu_counts_by_holdout_as_the_cpu_does(accelerate):
    # the GPU's hold-out sums its misfit in other chunks and its FFTs round otherwise: the count
    # may move by one where two iterations' misfits nearly tie, and no more
    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    image, psf, truth = _photon_problem(15, seed=7, shape=(32, 96, 96))
    cpu, cpu_count = _auto_run(image, psf, accelerate=accelerate)
    gpu, gpu_count = _auto_run(image, psf, device="gpu", accelerate=accelerate)
    assert 6 <= cpu_count < 100 and abs(gpu_count - cpu_count) <= 1
    assert abs(psnr(truth, gpu) - psnr(truth, cpu)) < 0.1


def test_holdout_needs_a_psf_that_blurs_the_checkerboard_and_enough_voxels():
    image = np.ones((16, 64, 64), np.float32)
    assert rl_module._holdout_works(md.psf.gaussian((5, 9, 9), 1.0), image)
    assert not rl_module._holdout_works(np.ones((1, 1, 1)), image)  # a delta: half the voxels unfit
    assert not rl_module._holdout_works(md.psf.gaussian((3, 3, 3), 0.3), image)
    assert not rl_module._holdout_works(md.psf.gaussian((5, 9, 9), 1.0), image[:4, :32, :32])
    # a single plane: the PSF's axial spread mixes no colours, only its lateral one counts
    plane = np.ones((1, 128, 128), np.float32)
    assert not rl_module._holdout_works(md.psf.gaussian((9, 9, 9), (2.0, 0.35, 0.35)), plane)
    assert rl_module._holdout_works(md.psf.gaussian((9, 9, 9), (2.0, 1.5, 1.5)), plane)
    kept, held = rl_module._checkerboards((3, 4, 5))
    marks = np.zeros((3, 4, 5), int)
    for part in kept:
        marks[part] += 1
    for part in held:
        marks[part] += 10
    np.testing.assert_array_equal(marks, np.where(np.indices((3, 4, 5)).sum(0) % 2, 10, 1))


def test_the_counting_run_ends_once_the_count_can_only_be_the_cap():
    holdout = rl_module._Holdout((4, 8, 8))
    assert not holdout.stalled(1)  # nothing measured yet
    holdout.best = (1.0, 76)  # 76 x 1.3 = 98.8: a later minimum could still give 99 or 100
    assert holdout.count() == 99 and not holdout.stalled(76)
    holdout.best = (1.0, 77)  # 100.1: the count is the cap whatever follows
    assert holdout.count() == AUTO_MAX_ITER and holdout.stalled(77)
    holdout.best = (1.0, 20)
    assert holdout.count() == 26 and not holdout.stalled(24) and holdout.stalled(25)
    assert rl_module._Holdout((4, 8, 8)).count() == AUTO_MAX_ITER  # no finite misfit at all


def test_auto_stop_does_not_depend_on_the_camera_gain():
    image, psf, _ = _photon_problem(50, seed=4)
    _, count = _auto_run(image, psf)
    _, scaled_count = _auto_run(image * 2.5, psf, background=25.0)
    assert count == scaled_count


def test_auto_is_the_default_and_other_strings_are_refused():
    image, psf, _ = _photon_problem(50, seed=5, shape=(8, 32, 32))
    np.testing.assert_array_equal(
        md.richardson_lucy(image, psf, background=10.0, device="cpu"),
        md.richardson_lucy(image, psf, "auto", background=10.0, device="cpu"),
    )
    with pytest.raises(ValueError, match="num_iter"):
        md.richardson_lucy(image, psf, "fast", device="cpu")
    with pytest.raises(TypeError, match="num_iter"):
        md.richardson_lucy(image, psf, 2.5, device="cpu")


def test_auto_tiles_run_as_many_iterations_as_their_pilot():
    from microdecon import tiling
    from microdecon._tile_model import applying

    image, psf, _ = _photon_problem(60, seed=6, shape=(12, 96, 90))
    tile_shape = (None, 48, 45)
    tile_plan = tiling.plan(image.shape, psf, "rl", tile_shape=tile_shape)
    params = {"background": 10.0}
    model = tiling._measure_model(image, psf, md.richardson_lucy, tile_plan, params, "cpu")
    count = model.values["rl.iterations"]
    assert 6 <= count < 100
    with applying(model):
        whole = md.richardson_lucy(image, psf, device="cpu", **params)
    tiled = md.deconvolve(image, psf, "rl", tile_shape=tile_shape, device="cpu", **params)
    assert float(np.abs(tiled - whole).max() / whole.max()) < 1e-3


def test_auto_stop_with_a_background_that_broadcasts():
    # a per-column offset has fewer axes than the image: the sampled misfit must broadcast it
    image, psf, _ = _photon_problem(50, seed=9, shape=(8, 32, 32))
    column = np.full(32, 10.0, np.float32)
    np.testing.assert_allclose(
        md.richardson_lucy(image, psf, background=column, device="cpu"),
        md.richardson_lucy(image, psf, background=10.0, device="cpu"),
        rtol=1e-5,
        atol=1e-4,
    )
