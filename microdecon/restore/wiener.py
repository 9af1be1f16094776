"""Wiener deconvolution: one regularized division in Fourier space, written once for every device.

Notes
-----
With OTF ``H`` and a noise-to-signal power ratio ``balance`` (assumed flat over frequency),

.. math:: \\hat X = \\frac{H^*}{|H|^2 + \\mathrm{balance}} \\, \\hat Y

``balance="auto"`` chooses it by Morozov's discrepancy principle: the largest balance whose
restoration, blurred again, differs from the data by no more than the noise. The noise power is
read off the spectrum where the OTF is zero (past the microscope's cutoff only noise remains;
the median of the power there, so that edges cannot pass for noise); when
there is no such band (undersampled data) it falls back to the finest-scale wavelet detail
(Donoho & Johnstone 1994).

A direct filter cannot use the "non-circulant" model exactly (that needs iterations), so the
boundary decides how the image is extended to the FFT grid before filtering: "periodic" not at
all; "reflect" and "non-circulant" by mirroring, faded smoothly to the image mean where the grid
wraps around (right from the edge for "non-circulant", after half the margin for "reflect"), so
the FFT sees no jump and the border rings least.

References
----------
.. [1] N. Wiener, "Extrapolation, Interpolation, and Smoothing of Stationary Time Series" (1949).
.. [2] V. A. Morozov, "On the solution of functional equations by the method of
       regularization", Soviet Math. Dokl. 7 (1966).
.. [3] D. L. Donoho and I. M. Johnstone, "Ideal spatial adaptation by wavelet shrinkage",
       Biometrika 81 (1994).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _validate
from .._backend import array_module, get_backend, return_like
from ..operators import Boundary, Convolution

__all__ = ["discrepancy_balance", "estimate_noise_sigma", "wiener"]


def estimate_noise_sigma(image: Any) -> float:
    """Root-mean-square noise in ``image``, from its finest diagonal Haar detail.

    A microscope's PSF removes the signal at the finest scale (images are sampled at or above
    Nyquist), so what is left there is noise. The mean square is used rather than the median
    absolute deviation: with Poisson noise on a dark background most details are exactly zero
    and a median would report no noise at all. For signal-dependent noise this is the noise
    variance averaged over the image.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> noisy = np.full((256, 256), 10.0) + rng.normal(0, 2.0, (256, 256))
    >>> round(estimate_noise_sigma(noisy), 1)
    2.0
    """
    xp = array_module(image)
    detail = xp.asarray(image, dtype=np.float32)
    for axis in range(detail.ndim):
        n = detail.shape[axis] // 2 * 2
        if n < 2:
            continue  # a length-1 axis has no detail
        even = xp.take(detail, xp.arange(0, n, 2), axis=axis)
        odd = xp.take(detail, xp.arange(1, n, 2), axis=axis)
        detail = (even - odd) / np.float32(np.sqrt(2.0))
    return float(xp.sqrt(xp.mean(detail * detail)))


def wiener(
    image: Any,
    psf: Any,
    *,
    balance: float | str = "auto",
    boundary: Boundary = "non-circulant",
    background: Any = 0.0,
    clip: bool = True,
    device: str = "auto",
):
    """Restore ``image`` with a Wiener filter (fast, one pass, linear).

    Parameters
    ----------
    image : array_like
        1-D, 2-D or 3-D (or more) image, any real dtype.
    psf : array_like
        PSF with one axis per image axis, any size, centre at ``n // 2``; normalized here.
    balance : float >= 0 or "auto"
        Noise-to-signal power ratio (dimensionless; the OTF peaks at 1). Larger is smoother;
        0 is the plain inverse filter (unstable with noise). Typical: 1e-4 (clean) to 1e-1
        (very noisy). "auto" estimates it from the image.
    boundary : {"non-circulant", "periodic", "reflect"}
        How the image is extended to the FFT grid (see Notes).
    background : float or array_like, >= 0
        Subtracted before filtering.
    clip : bool
        Set negative values (ringing) to zero, as intensities cannot be negative.
    device : {"auto", "cpu", "gpu", "gpu:N"}

    Returns
    -------
    array
        float32, same shape and array type as ``image``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> truth = np.zeros((32, 32), np.float32); truth[12:20, 12:20] = 1
    >>> psf = md.psf.gaussian((9, 9), sigma=0.7)
    >>> blurred = md.convolve(truth, psf, boundary="periodic", device="cpu")
    >>> out = md.wiener(blurred, psf, balance=1e-8, boundary="periodic", device="cpu")
    >>> bool(abs(out - truth).max() < 1e-3)
    True
    """
    image = _validate.check_array(image, "image")
    psf = _validate.check_psf(psf, image.ndim)
    if isinstance(balance, str):
        _validate.check_choice(balance, "balance", ("auto",))
    else:
        balance = _validate.check_float(balance, "balance")
    _validate.check_choice(boundary, "boundary", _validate.BOUNDARIES)
    background = _validate.check_background(background, tuple(image.shape))
    backend = get_backend(image, psf, device=device)
    xp = backend.xp
    with backend.activate():
        data = backend.asarray(image)
        if not isinstance(background, float) or background != 0:
            data = data - backend.asarray(background)
        op = Convolution(psf, tuple(image.shape), boundary=boundary, backend=backend)
        grid = op.extend_image(data)
        spectrum = op.plan.forward(grid)
        true_otf = op.otf / np.float32(op.fft_scale)
        power = true_otf.real**2 + true_otf.imag**2 if true_otf.dtype.kind == "c" else true_otf**2
        if balance == "auto":
            balance = discrepancy_balance(spectrum, power, op.fft_shape, data, xp)
        denominator = power + np.float32(max(balance, 1e-12))
        spectrum *= xp.conj(true_otf) * (np.float32(op.fft_scale) / denominator)
        del true_otf, power, denominator
        result = xp.array(op.plan.inverse(spectrum)[op.image_slices], dtype=np.float32, copy=True)
        if clip:
            xp.maximum(result, 0, out=result)
    return return_like(result, image, backend)


def _half_spectrum_weights(fft_shape: tuple[int, ...], xp: Any):
    """How many times each rfft coefficient stands in the full spectrum (1 or 2)."""
    weights = np.full(fft_shape[-1] // 2 + 1, 2.0, dtype=np.float32)
    weights[0] = 1
    if fft_shape[-1] % 2 == 0:
        weights[-1] = 1
    return xp.asarray(weights)


def discrepancy_balance(
    spectrum: Any, otf_power: Any, fft_shape: tuple[int, ...], data: Any, xp: Any = np
) -> float:
    """Balance by the discrepancy principle: residual power equal to the noise power.

    Parameters
    ----------
    spectrum : array
        Unnormalized half spectrum (rfftn) of the image on the FFT grid.
    otf_power : array
        ``|OTF|^2`` on the same half spectrum (peak 1).
    fft_shape : tuple of int
        The FFT grid.
    data : array
        The image, for the fallback noise estimate.

    Returns
    -------
    float
        Between 1e-7 and 1.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> from microdecon.operators import Convolution
    >>> rng = np.random.default_rng(0)
    >>> psf = md.psf.gaussian((15, 15), 2.0)
    >>> blurred = md.convolve(md.data.phantom((64, 64), seed=1), psf, device="cpu").clip(0)
    >>> image = (blurred + rng.normal(0, 0.5, blurred.shape)).astype(np.float32)
    >>> op = Convolution(psf, image.shape, boundary="periodic")
    >>> power = (op.otf / np.float32(op.fft_scale)) ** 2  # a symmetric PSF: real OTF
    >>> 1e-4 < discrepancy_balance(np.fft.rfftn(image), power, op.fft_shape, image) < 1e-2
    True
    """
    n = float(np.prod(fft_shape))
    weighted = (spectrum.real**2 + spectrum.imag**2) * _half_spectrum_weights(fft_shape, xp)
    flat = otf_power.ravel()
    weighted = weighted.ravel()
    dead = flat < 1e-8
    if int(dead.sum()) > max(100, 1e-3 * flat.size):
        # White noise has exponentially distributed |Y|^2, whose median is ln 2 times its mean. The
        # median ignores the few lines of strong coefficients that an edge of the extended grid
        # puts across the spectrum, which a mean would take for noise.
        raw = spectrum.ravel()[dead]
        noise_power = float(xp.median(raw.real**2 + raw.imag**2)) / np.log(2)
    else:
        noise_power = estimate_noise_sigma(data) ** 2 * n
    # Group frequencies by |H|^2 in fine logarithmic bins: the residual for any balance then
    # costs a few hundred operations instead of a pass over the spectrum.
    per_decade = 40
    index = xp.clip(xp.floor((xp.log10(xp.maximum(flat, 1e-12)) + 12) * per_decade), 0, 12 * per_decade)
    index = index.astype(np.int64)
    bins = 12 * per_decade + 1
    power_sum = xp.bincount(index, weights=weighted, minlength=bins)
    otf_sum = xp.bincount(index, weights=flat * weighted, minlength=bins)
    power_sum = np.asarray(power_sum.get() if hasattr(power_sum, "get") else power_sum, np.float64)
    otf_sum = np.asarray(otf_sum.get() if hasattr(otf_sum, "get") else otf_sum, np.float64)
    otf_level = np.where(power_sum > 0, otf_sum / np.maximum(power_sum, 1e-300), 0.0)
    target = noise_power * n
    for balance in np.logspace(-7, 0, 141):
        leak = balance / (otf_level + balance)
        if float(np.sum(power_sum * leak * leak)) >= target:
            return float(balance)
    return 1.0
