"""Shared fixtures: the device parameter (GPU cases marked `gpu`, skipped without CuPy and a GPU)."""

import numpy as np
import pytest

from microdecon._backend import gpu_available

DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "gpu" and not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    return request.param


@pytest.fixture
def xp_for(device):
    """Array module matching the device, so a test body runs unchanged on NumPy and CuPy."""
    if device == "gpu":
        import cupy

        return cupy
    return np


def to_numpy(array):
    return array.get() if hasattr(array, "get") else np.asarray(array)


def psnr(truth, estimate):
    truth = np.asarray(truth, np.float64)
    estimate = np.asarray(to_numpy(estimate), np.float64)
    mse = np.mean((truth - estimate) ** 2)
    return 10 * np.log10((truth.max() - truth.min()) ** 2 / mse)


@pytest.fixture(autouse=True, scope="session")
def _private_fftw_wisdom(tmp_path_factory):
    """Keep the FFTW wisdom the tests measure out of the user's cache folder."""
    import os

    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(autouse=True, scope="session")
def _deterministic_cpu_fft():
    """scipy.fft for the suite: FFTW_MEASURE picks its algorithm by timing, so its rounding, and
    with it every Poisson draw made from a blurred image, could change from run to run. The FFTW
    path is tested where a test asks for it (parity with scipy.fft, operators, plans)."""
    from microdecon import _backend

    _backend.set_cpu_fft("pocketfft")
    yield
    _backend.set_cpu_fft("auto")
