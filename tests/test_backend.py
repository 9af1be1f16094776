import numpy as np
import pytest

from microdecon import _backend
from microdecon._backend import Backend, get_backend


def fft_libraries():
    libraries = ["pocketfft"]
    if _backend._pyfftw() is not None:
        libraries.append("fftw")
    return libraries


def test_auto_never_fails_and_cpu_is_numpy():
    backend = get_backend(np.zeros(3), device="auto")
    assert backend.name in ("cpu", "gpu")
    cpu = get_backend(device="cpu")
    assert cpu.xp is np and cpu.name == "cpu"


@pytest.mark.parametrize("bad", ["tpu", "gpu:x", "", "cuda:-"])
def test_unknown_device_names_the_argument(bad):
    with pytest.raises(ValueError, match="device"):
        get_backend(device=bad)


def test_device_must_be_a_string():
    with pytest.raises(TypeError, match="device"):
        get_backend(device=0)


@pytest.mark.skipif(_backend.gpu_available(), reason="a GPU is present")
def test_gpu_request_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CuPy"):
        get_backend(device="gpu")


@pytest.mark.parametrize("library", fft_libraries())
@pytest.mark.parametrize("shape", [(30,), (12, 15), (6, 10, 9)])
def test_fft_plan_is_unnormalized_roundtrip(library, shape):
    backend = Backend("cpu", fft_library=library)
    plan = backend.fft_plan(shape)
    assert backend.fft_plan(shape) is plan  # planned once, reused
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    spectrum = plan.forward(x)
    np.testing.assert_allclose(spectrum, np.fft.rfftn(x), rtol=1e-4, atol=1e-4)
    back = plan.inverse(spectrum.copy())
    np.testing.assert_allclose(back / np.prod(shape), x, rtol=1e-5, atol=1e-5)


def test_fft_plans_are_bounded_per_backend():
    backend = Backend("cpu", fft_library="pocketfft")
    for n in range(8, 8 + 3 * _backend.MAX_CACHED_PLANS):
        backend.fft_plan((n,))
    assert len(backend._plans) == _backend.MAX_CACHED_PLANS


def test_numpy_kernels_match_their_formulas():
    be = get_backend(device="cpu")
    rng = np.random.default_rng(1)
    image, blurred = rng.random(50).astype(np.float32), rng.random(50).astype(np.float32) - 0.5
    out = np.empty_like(image)
    be.rl_ratio(image, blurred, np.float32(0.1), np.float32(0.05), out)
    np.testing.assert_allclose(out, image / np.maximum(blurred + 0.1, 0.05), rtol=1e-6)
    a, b = rng.random(50).astype(np.float32) - 0.5, rng.random(50).astype(np.float32)
    np.testing.assert_allclose(be.multiply_clip(a, b, np.empty_like(a)), np.maximum(a * b, 0))
    previous, current = rng.random(50).astype(np.float32), rng.random(50).astype(np.float32)
    expected = np.maximum(current + 0.7 * (current - previous), 0)
    np.testing.assert_allclose(be.extrapolate(previous.copy(), current, 0.7), expected, rtol=1e-6)
    spectrum = (rng.random((40, 5)) + 1j * rng.random((40, 5))).astype(np.complex64)
    otf = (rng.random((40, 5)) + 1j * rng.random((40, 5))).astype(np.complex64)
    np.testing.assert_allclose(
        be.multiply_spectrum(spectrum.copy(), otf, True), spectrum * otf.conj(), rtol=1e-6
    )
    np.testing.assert_allclose(be.multiply_spectrum(spectrum.copy(), otf, False), spectrum * otf, rtol=1e-6)


@pytest.mark.gpu
def test_gpu_kernels_match_numpy(device):
    if device != "gpu":
        pytest.skip("GPU-only comparison")
    import cupy

    cpu, gpu = get_backend(device="cpu"), get_backend(device="gpu")
    rng = np.random.default_rng(2)
    image, blurred = rng.random(1000).astype(np.float32), rng.random(1000).astype(np.float32)
    out = cupy.empty(1000, np.float32)
    gpu.rl_ratio(cupy.asarray(image), cupy.asarray(blurred), np.float32(0.1), np.float32(0.05), out)
    np.testing.assert_allclose(
        out.get(),
        cpu.rl_ratio(image, blurred, np.float32(0.1), np.float32(0.05), np.empty_like(image)),
        rtol=1e-6,
    )
    spectrum = (rng.random(64) + 1j * rng.random(64)).astype(np.complex64)
    otf = (rng.random(64) + 1j * rng.random(64)).astype(np.complex64)
    got = gpu.multiply_spectrum(cupy.asarray(spectrum), cupy.asarray(otf), True).get()
    np.testing.assert_allclose(got, spectrum * otf.conj(), rtol=1e-6)
    previous, current = rng.random(64).astype(np.float32), rng.random(64).astype(np.float32)
    got = gpu.extrapolate(cupy.asarray(previous), cupy.asarray(current), 0.5).get()
    np.testing.assert_allclose(got, np.maximum(current + 0.5 * (current - previous), 0), rtol=1e-6)


def test_import_does_not_load_cupy_or_dask():
    import subprocess
    import sys

    code = "import sys, microdecon; print('cupy' in sys.modules, 'dask' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
