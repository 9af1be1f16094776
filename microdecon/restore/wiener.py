"""One-pass linear filters: Wiener, Tikhonov-regularized inverse and the guarded inverse filter,
written once for every device.

Notes
-----
With OTF ``H``, a regularizer ``R`` (the identity for Wiener, the Laplacian for Tikhonov) and a
weight ``balance`` (for Wiener, the noise-to-signal power ratio, assumed flat over frequency),

.. math:: \\hat X = \\frac{H^*}{|H|^2 + \\mathrm{balance} \\, |R|^2} \\, \\hat Y

``balance="auto"`` takes the balance of least unbiased predictive risk (Mallows' C_p; Vogel
2002, ch. 7): the estimated distance between the re-blurred restoration and the noise-free
image, which weighs the noise a filter passes against the detail it removes. It needs the noise
power, read off the spectrum where the OTF is zero (past the microscope's cutoff only noise
remains; the median of the power there, so that edges cannot pass for noise), or, when there is
no such band (undersampled data), from the finest-scale wavelet detail (Donoho & Johnstone
1994). It is measured on the periodic component of the image (Moisan 2011), whose spectrum has
no lines from the image's edges. On phantoms with Gaussian noise from 0.04% to 4% of the peak
the choice lands within 0.2 dB of the best balance in hindsight. Tikhonov's Laplacian needs
more: see ``_object_risk_balance`` for why its error is estimated on the object instead.

A direct filter cannot use the "non-circulant" model exactly (that needs iterations), so the
boundary decides how the image is extended to the FFT grid before filtering: "periodic" not at
all; "reflect" and "non-circulant" by mirroring, faded smoothly to the image mean where the grid
wraps around (right from the edge for "non-circulant", after half the margin for "reflect"), so
the FFT sees no jump and the border rings least.

References
----------
.. [1] N. Wiener, "Extrapolation, Interpolation, and Smoothing of Stationary Time Series" (1949).
.. [2] C. R. Vogel, "Computational Methods for Inverse Problems", SIAM (2002), ch. 7.
.. [3] D. L. Donoho and I. M. Johnstone, "Ideal spatial adaptation by wavelet shrinkage",
       Biometrika 81 (1994).
.. [4] L. Moisan, "Periodic plus smooth image decomposition", J. Math. Imaging Vis. 39 (2011).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _validate
from .._backend import array_module, get_backend, return_like
from .._tile_model import shared
from ..operators import Boundary, Convolution

__all__ = ["predictive_risk_balance", "estimate_noise_sigma", "inverse", "tikhonov", "wiener"]


#: The one-pass filters' FFT grid reaches twice the PSF's extent past the image (see
#: :class:`~microdecon.operators.Convolution`): their inverse kernels are long, and with the
#: grid's wrap-around that far away, a tile and the whole volume see the same thing near an edge.
ONE_PASS_MARGIN = 2


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
    balance = _check_balance(balance)
    return _linear_filter(image, psf, boundary, background, clip, device, balance=balance, reg="identity")


def tikhonov(
    image: Any,
    psf: Any,
    *,
    balance: float | str = "auto",
    reg: str | Any = "laplacian",
    boundary: Boundary = "non-circulant",
    background: Any = 0.0,
    clip: bool = True,
    device: str = "auto",
):
    """Restore ``image`` with a Tikhonov-regularized inverse filter (one pass, linear).

    Minimizes ``||h * x - y||^2 + balance ||r * x||^2`` with ``r`` a regularizing operator:
    the Laplacian (default) penalizes curvature, so noise is smoothed while slow intensity
    changes pass untouched; "identity" penalizes energy and is the Wiener filter.

    Parameters
    ----------
    image, psf : array_like
        As for :func:`wiener`.
    balance : float >= 0 or "auto"
        Regularization weight (dimensionless: the OTF peaks at 1, the Laplacian's transfer
        function at ``4 ndim``). Typical 1e-5 to 1e-1 for the Laplacian. "auto" chooses it by
        the least estimated error of the restored object, against a Wiener restoration of the
        same data (see ``_object_risk_balance``); with ``reg="identity"`` as Wiener does.
    reg : {"laplacian", "identity"} or array_like
        The regularizing operator, or its impulse response (centre at ``n // 2``, one axis
        per image axis, no larger than the image).
    boundary, background, clip, device
        As for :func:`wiener`.

    Returns
    -------
    array
        float32, same shape and array type as ``image``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> rng = np.random.default_rng(0)
    >>> truth = md.data.phantom((64, 64), seed=2)
    >>> psf = md.psf.gaussian((15, 15), 1.5)
    >>> noisy = md.convolve(truth, psf, device="cpu") + rng.normal(0, 0.02, truth.shape)
    >>> out = md.restore.tikhonov(noisy, psf, device="cpu")
    >>> md.metrics.psnr(truth, out) > md.metrics.psnr(truth, noisy) + 1
    True
    """
    balance = _check_balance(balance)
    if isinstance(reg, str):
        _validate.check_choice(reg, "reg", ("laplacian", "identity"))
    else:
        reg = _validate.check_array(reg, "reg")  # its shape is checked against the image's below
    return _linear_filter(image, psf, boundary, background, clip, device, balance=balance, reg=reg)


#: The inverse filter's guard: frequencies where the OTF is weaker than this (relative to its
#: peak of 1) are damped instead of divided by. At 0.3 the noise gain stays below 3.3x, which
#: keeps typical noisy data better than blurred (2-D phantom, Gaussian noise at 2% and 10% of the
#: peak: +2.0 and +3.4 dB, where 0.1 gives +0.1 and -4.7 dB); lower values sharpen clean data more.
DEFAULT_INVERSE_EPSILON = 0.3


def inverse(
    image: Any,
    psf: Any,
    *,
    epsilon: float = DEFAULT_INVERSE_EPSILON,
    boundary: Boundary = "non-circulant",
    background: Any = 0.0,
    clip: bool = True,
    device: str = "auto",
):
    """Restore ``image`` with the naive inverse filter ``Y / H``, guarded where ``H`` is small.

    Where ``|H| >= epsilon`` the spectrum is divided by the OTF; below it the gain is
    ``conj(H) / epsilon^2``, which meets ``1 / H`` at ``|H| = epsilon`` and falls to zero with
    ``H``, so frequencies the microscope did not transmit are not amplified from noise. The
    baseline all regularized methods improve on; useful on clean, well-sampled data.

    Parameters
    ----------
    image, psf : array_like
        As for :func:`wiener`.
    epsilon : float in (0, 1]
        The guard, as a fraction of the OTF's peak (1). Smaller is sharper and noisier.
    boundary, background, clip, device
        As for :func:`wiener`.

    Returns
    -------
    array
        float32, same shape and array type as ``image``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> truth = md.data.phantom((64, 64), seed=2)
    >>> psf = md.psf.gaussian((15, 15), 1.5)
    >>> blurred = md.convolve(truth, psf, boundary="periodic", device="cpu")
    >>> out = md.restore.inverse(blurred, psf, epsilon=0.01, boundary="periodic", device="cpu")
    >>> md.metrics.psnr(truth, out) > md.metrics.psnr(truth, blurred) + 6
    True
    """
    epsilon = _validate.check_float(epsilon, "epsilon", strict=True)
    if epsilon > 1:
        raise ValueError(f"epsilon must be in (0, 1] (a fraction of the OTF peak), got {epsilon}")

    return _linear_filter(image, psf, boundary, background, clip, device, guard=epsilon)


def _check_balance(balance: Any) -> float | str:
    if isinstance(balance, str):
        return _validate.check_choice(balance, "balance", ("auto",))
    return _validate.check_float(balance, "balance")


def _regularizer_power(reg: Any, fft_shape: tuple[int, ...], xp: Any):
    """``|R|^2`` on the half spectrum of ``fft_shape`` (float32)."""
    if isinstance(reg, str) and reg == "identity":
        return xp.ones(fft_shape[:-1] + (fft_shape[-1] // 2 + 1,), dtype=np.float32)
    if isinstance(reg, str):  # the discrete Laplacian's transfer function is known in closed form
        total = None
        for axis, n in enumerate(fft_shape):
            length = n // 2 + 1 if axis == len(fft_shape) - 1 else n
            k = np.arange(length)
            term = (2 - 2 * np.cos(2 * np.pi * k / n)).astype(np.float32)
            shape = [1] * len(fft_shape)
            shape[axis] = length
            term = xp.asarray(term.reshape(shape))
            total = term if total is None else total + term
        return total * total
    kernel = np.zeros(fft_shape, dtype=np.float32)
    host = np.asarray(reg.get() if hasattr(reg, "get") else reg, dtype=np.float32)
    kernel[tuple(slice(0, n) for n in host.shape)] = host
    kernel = np.roll(kernel, [-(n // 2) for n in host.shape], axis=tuple(range(host.ndim)))
    spectrum = np.fft.rfftn(kernel)
    return xp.asarray((spectrum.real**2 + spectrum.imag**2).astype(np.float32))


def _linear_filter(
    image, psf, boundary, background, clip, device, *, balance=0.0, reg="identity", guard=None
):
    """Shared by the one-pass filters: ``X = conj(H) Y / (|H|^2 + balance |R|^2)`` on the
    boundary-extended FFT grid, or with ``guard``, ``X = conj(H) Y / max(|H|^2, guard^2)``.
    """
    image = _validate.check_array(image, "image")
    psf = _validate.check_psf(psf, image.ndim)
    _validate.check_choice(boundary, "boundary", _validate.BOUNDARIES)
    background = _validate.check_background(background, tuple(image.shape))
    if not isinstance(reg, str):
        if reg.ndim != image.ndim:
            raise ValueError(f"reg has {reg.ndim} axes but the image has {image.ndim}")
        if any(r > n for r, n in zip(reg.shape, image.shape)):
            raise ValueError(f"reg of shape {tuple(reg.shape)} is larger than the image {tuple(image.shape)}")
    backend = get_backend(image, psf, device=device)
    xp = backend.xp
    with backend.activate():
        data, scale = _unit_scaled_data(image, background, backend)
        op = Convolution(psf, tuple(image.shape), boundary=boundary, backend=backend, margin=ONE_PASS_MARGIN)
        spectrum = op.plan.forward(op.extend_image(data))
        if balance == "auto":
            if isinstance(reg, str) and reg == "identity":
                balance = shared("wiener.balance", lambda: _auto_balance(data, psf, reg, backend))
            else:
                pilot = shared("wiener.balance", lambda: _auto_balance(data, psf, "identity", backend))
                balance = shared(
                    "tikhonov.balance", lambda: _object_risk_balance(spectrum, op, reg, data, pilot)
                )
        otf, power = _true_otf(op)
        if guard is not None:
            denominator = xp.maximum(power, np.float32(guard * guard))
        else:
            denominator = _regularizer_power(reg, op.fft_shape, xp)
            denominator *= np.float32(max(balance, 1e-12))
            denominator += power
        del power
        denominator *= np.float32(1 / op.fft_scale)  # the inverse transform is unnormalized
        spectrum *= xp.conj(otf)
        spectrum /= denominator
        del otf, denominator
        result = xp.array(op.plan.inverse(spectrum)[op.image_slices], dtype=np.float32, copy=True)
        result *= np.float32(scale)
        if clip:
            xp.maximum(result, 0, out=result)
    return return_like(result, image, backend)


def _unit_scaled_data(image: Any, background: Any, backend) -> tuple[Any, float]:
    """The data less background, divided by its largest magnitude (a new float32 array on the
    device), and that scale.

    The one-pass filters are linear in the data (unsupervised Wiener too, for given
    precisions), so they compute at unit scale and scale back exactly: there no FFT sum or
    squared spectrum can overflow float32 (at 1e18 counts the risk estimate did, at 1e35 the
    filters). The scale is shared by the tiles of a volume: what they share is in its units.
    """
    xp = backend.xp
    data = backend.asarray(image)
    if not isinstance(background, float) or background != 0:
        data = data - backend.asarray(background)
    scale = shared("one_pass.scale", lambda: max(float(xp.abs(data).max()), 1e-30))
    return data * np.float32(1 / scale), scale


def _true_otf(op: Convolution):
    """The operator's OTF at its true scale (peak 1) and its power ``|H|^2``."""
    otf = op.otf / np.float32(op.fft_scale)
    power = otf.real**2 + otf.imag**2 if otf.dtype.kind == "c" else otf**2
    return otf, power


def _auto_balance(data: Any, psf: Any, reg: Any, backend) -> float:
    """The balance of least predictive risk, measured on the periodic part of the image.

    The risk estimate needs a spectrum whose residual is noise: a boundary-extended grid repeats
    the noise in its mirrored margins (no longer independent samples: by the discrepancy
    principle the balance came out 30x too small on a 3-D stack), and the image's own periodic
    grid adds the jumps where opposite edges meet, lines of energy across all frequencies that
    no balance explains (it came out at its floor on clean 2-D data). The periodic component of
    Moisan's periodic-plus-smooth decomposition has neither; the filter then uses the balance
    on whatever grid the boundary asks for.
    """
    op = Convolution(psf, tuple(data.shape), boundary="periodic", backend=backend)
    spectrum = _periodic_component_spectrum(data, backend)
    _, power = _true_otf(op)
    if isinstance(reg, str) and reg == "identity":
        return predictive_risk_balance(spectrum, power, op.fft_shape, data, backend.xp)
    reg_power = _regularizer_power(reg, op.fft_shape, backend.xp)
    return predictive_risk_balance(
        spectrum, power, op.fft_shape, data, backend.xp, reg_power=reg_power, search=(1e-6, 10.0)
    )


#: How much of the data a Wiener pilot cannot explain counts as noise in Tikhonov's automatic
#: balance (see :func:`_object_risk_balance`). 1 is safest where the margins or the optics put
#: content the OTF barely passes (a 48-plane widefield stack: best balance found, where the
#: noise alone chose one 160x too small, 3.4 dB worse than the data); it costs up to 0.7 dB
#: where that content was real. 0.3 stayed within 0.6 dB of the best balance on eight
#: problems (widefield and Gaussian PSFs, 2-D and 3-D, 40 to 1000 photons, the bundled sample).
UNEXPLAINED_AS_NOISE = 0.3


def _object_risk_balance(spectrum: Any, op: Convolution, reg: Any, data: Any, pilot_balance: float) -> float:
    """Tikhonov's automatic balance: the least estimated error of the restored *object*.

    The predictive risk that sets Wiener's balance measures the error after re-blurring, which
    hides what a Laplacian regularizer lets through: near the widefield OTF's missing cone the
    OTF is weak and the Laplacian weaker still (both vanish at low frequency), so the filter
    multiplies there whatever the data hold, noise or the mismatch of the boundary margins,
    many times over. Here the error is estimated on the object, per frequency: the detail lost,
    ``|1 - A|^2 |X|^2`` with ``X`` the Wiener restoration at its own automatic balance, plus what
    is amplified, ``A^2 / |H|^2`` times the noise power, where the noise power is raised by a part
    (UNEXPLAINED_AS_NOISE) of whatever the Wiener pilot cannot explain, ``|Y - H X|^2``. It is
    evaluated on the filter's own boundary-extended grid, margins included.
    """
    xp = op.backend.xp
    otf = op.otf
    power = otf.real**2 + otf.imag**2 if otf.dtype.kind == "c" else otf * otf
    power *= np.float32(1 / op.fft_scale) ** 2  # the OTF at its true scale, peak 1
    data_power = spectrum.real**2 + spectrum.imag**2
    dead = power < 1e-8
    if int(dead.sum()) > max(100, 1e-3 * dead.size):
        noise_power = float(xp.median(data_power[dead])) / np.log(2)  # as in predictive_risk_balance
    else:
        noise_power = estimate_noise_sigma(data) ** 2 / float(op.fft_scale)
    del dead
    multiplicity = xp.broadcast_to(_half_spectrum_weights(op.fft_shape, xp), power.shape)
    pilot = np.float32(pilot_balance)
    denominator = power + pilot
    denominator *= denominator
    # the pilot's restored power |X|^2, and the power it leaves unexplained, |Y - H X|^2
    detail = power * data_power / denominator
    unexplained = data_power
    unexplained *= pilot * pilot
    unexplained /= denominator
    del denominator
    unexplained -= np.float32(noise_power)
    xp.maximum(unexplained, 0, out=unexplained)
    amplified = unexplained
    amplified *= np.float32(UNEXPLAINED_AS_NOISE)
    amplified += np.float32(noise_power)
    amplified /= xp.maximum(power, np.float32(1e-12))
    amplified *= power >= 1e-8  # past the cutoff the filter passes nothing
    detail *= multiplicity
    amplified *= multiplicity
    # the transmission A depends on a frequency only through ratio = |H|^2 / |R|^2: binned by
    # it, the error for any balance costs a few hundred operations
    ratio = power
    ratio /= xp.maximum(_regularizer_power(reg, op.fft_shape, xp), np.float32(1e-12))
    per_decade, lowest, decades = 40, -12, 24
    index = xp.log10(xp.clip(ratio, 1e-12, 1e12))
    index -= lowest
    index *= per_decade
    index = xp.clip(xp.floor(index), 0, decades * per_decade).astype(np.int32).ravel()
    bins = decades * per_decade + 1
    weights = (detail, amplified, ratio * multiplicity)
    sums = [xp.bincount(index, weights=w.ravel(), minlength=bins) for w in weights]
    count = xp.bincount(index, weights=xp.ascontiguousarray(multiplicity).ravel(), minlength=bins)
    detail_sum, amplified_sum, ratio_sum, count = (
        np.asarray(v.get() if hasattr(v, "get") else v, np.float64) for v in (*sums, count)
    )
    edges = 10.0 ** (lowest + np.arange(bins) / per_decade)
    middle = np.where(count > 0, ratio_sum / np.maximum(count, 1e-300), edges)
    candidates = np.logspace(-6, 1, 141)
    risks = [
        float(np.sum(detail_sum * (b / (middle + b)) ** 2 + amplified_sum * (middle / (middle + b)) ** 2))
        for b in candidates
    ]
    return float(candidates[int(np.argmin(risks))])


def _periodic_component_spectrum(image: Any, backend):
    """Half spectrum of the periodic component of ``image`` (Moisan 2011, in n dimensions).

    The smooth component ``s`` solves ``laplacian(s) = v``, with ``v`` the jumps between
    opposite faces; it carries the boundary discontinuities, so ``Y - S`` is free of them.
    """
    xp = backend.xp
    shape = tuple(image.shape)
    spectrum = backend.fft_plan(shape).forward(image)
    jumps = xp.zeros(shape, dtype=np.float32)
    laplacian = None
    for axis, n in enumerate(shape):
        first = [slice(None)] * len(shape)
        last = [slice(None)] * len(shape)
        first[axis], last[axis] = slice(0, 1), slice(n - 1, n)
        if n > 1:
            step = image[tuple(last)] - image[tuple(first)]
            jumps[tuple(first)] += step
            jumps[tuple(last)] -= step
        length = n // 2 + 1 if axis == len(shape) - 1 else n
        term = 2 * np.cos(2 * np.pi * np.arange(length) / n) - 2
        term = xp.asarray(
            term.astype(np.float32).reshape([length if a == axis else 1 for a in range(len(shape))])
        )
        laplacian = term if laplacian is None else laplacian + term
    smooth = backend.fft_plan(shape).forward(jumps)
    laplacian.ravel()[0] = 1  # the smooth part has zero mean: its DC term is dropped below
    smooth /= laplacian
    smooth.ravel()[0] = 0
    spectrum -= smooth
    return spectrum


def _half_spectrum_weights(fft_shape: tuple[int, ...], xp: Any):
    """How many times each rfft coefficient stands in the full spectrum (1 or 2)."""
    weights = np.full(fft_shape[-1] // 2 + 1, 2.0, dtype=np.float32)
    weights[0] = 1
    if fft_shape[-1] % 2 == 0:
        weights[-1] = 1
    return xp.asarray(weights)


def predictive_risk_balance(
    spectrum: Any,
    otf_power: Any,
    fft_shape: tuple[int, ...],
    data: Any,
    xp: Any = np,
    *,
    reg_power: Any = None,
    search: tuple[float, float] = (1e-5, 1.0),
) -> float:
    """Balance that minimizes the unbiased predictive risk (Mallows' C_p) of the filter.

    For a filter with per-frequency transmission ``A = |H|^2 / (|H|^2 + balance |R|^2)`` and
    white noise of power ``s`` per coefficient, ``||(1 - A) Y||^2 - n s + 2 s trace(A)``
    estimates, without knowing the object, how far the re-blurred restoration lies from the
    noise-free image; its minimum balances noise passed against detail lost.

    Parameters
    ----------
    spectrum : array
        Unnormalized half spectrum (rfftn) of the image on a periodic grid.
    otf_power : array
        ``|OTF|^2`` on the same half spectrum (peak 1).
    fft_shape : tuple of int
        The FFT grid.
    data : array
        The image, for the fallback noise estimate.
    reg_power : array, optional
        ``|R|^2`` of a regularizer on the same half spectrum (Tikhonov); None is the identity.
    search : (float, float)
        The range searched, on a logarithmic grid of 20 steps per decade. Below the default
        floor, float32 rounding and the mismatch of any boundary model with the real optics
        outweigh what is left of the noise, so smaller balances only add ringing.

    Returns
    -------
    float
        Within ``search``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> from microdecon.operators import Convolution
    >>> rng = np.random.default_rng(0)
    >>> psf = md.psf.gaussian((15, 15), 2.0)
    >>> truth = md.data.phantom((64, 64), seed=1)
    >>> blurred = md.convolve(truth, psf, boundary="periodic", device="cpu")
    >>> image = (blurred + rng.normal(0, 0.5, blurred.shape)).astype(np.float32)
    >>> op = Convolution(psf, image.shape, boundary="periodic")
    >>> power = (op.otf / np.float32(op.fft_scale)) ** 2  # a symmetric PSF: real OTF
    >>> 1e-4 < predictive_risk_balance(np.fft.rfftn(image), power, op.fft_shape, image) < 1e-2
    True
    """
    n = float(np.prod(fft_shape))
    multiplicity = xp.broadcast_to(_half_spectrum_weights(fft_shape, xp), spectrum.shape).ravel()
    weighted = (spectrum.real**2 + spectrum.imag**2).ravel() * multiplicity
    dead = otf_power.ravel() < 1e-8
    if int(dead.sum()) > max(100, 1e-3 * dead.size):
        # White noise has exponentially distributed |Y|^2, whose median is ln 2 times its mean. The
        # median ignores the few lines of strong coefficients that edges put across the spectrum,
        # which a mean would take for noise.
        raw = spectrum.ravel()[dead]
        noise_power = float(xp.median(raw.real**2 + raw.imag**2)) / np.log(2)
        # Past the cutoff no balance changes the residual, and what is there beyond noise is
        # model error: counted as noise only, it cannot sway the choice.
        weighted = xp.where(dead, np.float32(noise_power) * multiplicity, weighted)
    else:
        noise_power = estimate_noise_sigma(data) ** 2 * n
    # Everything depends on a frequency only through ratio = |H|^2 / |R|^2: grouping frequencies
    # by it in fine logarithmic bins makes the risk for any balance a few hundred operations
    # instead of a pass over the spectrum.
    if reg_power is None:
        flat = otf_power.ravel()
    else:
        flat = xp.minimum(otf_power / xp.maximum(reg_power, np.float32(1e-12)), np.float32(1e12)).ravel()
    per_decade = 40
    lowest, decades = -12, 24
    index = xp.floor((xp.log10(xp.clip(flat, 1e-12, 1e12)) - lowest) * per_decade)
    index = xp.clip(index, 0, decades * per_decade).astype(np.int64)
    bins = decades * per_decade + 1
    sums = [xp.bincount(index, weights=w, minlength=bins) for w in (weighted, flat * weighted, multiplicity)]
    power_sum, ratio_sum, count = (np.asarray(v.get() if hasattr(v, "get") else v, np.float64) for v in sums)
    ratio = np.where(
        power_sum > 0,
        ratio_sum / np.maximum(power_sum, 1e-300),
        10.0 ** (lowest + np.arange(bins) / per_decade),
    )
    low, high = np.log10(search[0]), np.log10(search[1])
    candidates = np.logspace(low, high, int(round((high - low) * 20)) + 1)
    risks = []
    for balance in candidates:
        leak = balance / (ratio + balance)
        risks.append(
            float(np.sum(power_sum * leak * leak)) + 2 * noise_power * float(np.sum(count * (1 - leak)))
        )
    return float(candidates[int(np.argmin(risks))])
