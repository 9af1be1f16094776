"""Drop-in twins of scikit-image's deconvolution functions, computed with microdecon's backend.

:func:`richardson_lucy`, :func:`wiener` and :func:`unsupervised_wiener` take the arguments of
``skimage.restoration``'s functions of the same names (scikit-image 0.26), with the same
defaults, and return what those return: the same dtype (float16 and float32 inputs give float32,
float64 and integers give float64), the same PSF conventions, the same boundaries, the clipping to
[-1, 1] when ``clip=True``, and for :func:`unsupervised_wiener` the same numbers for the same seed.
Replace ``from skimage import restoration`` by ``from microdecon import skimage as restoration``
and a script computes as before; pass CuPy arrays and it computes on their GPU.

The FFTs are ``scipy.fft``'s on the CPU, as in scikit-image, and ``cupy.fft``'s on a GPU, in the
precision scikit-image computes in: on the CPU :func:`wiener` gives scikit-image's bits, and the
others agree with it to rounding (Richardson–Lucy by FFT where SciPy may sum directly; the
sampler's squared norms summed in float64). Richardson–Lucy and Wiener run on a GPU when the
input is a CuPy array or a GPU is present (NumPy in, NumPy out); :func:`unsupervised_wiener`
runs on the GPU for CuPy input only, so that a seed gives scikit-image's numbers for NumPy input.

Where scikit-image would fail or return a result without meaning, these functions differ, and
say so: a PSF larger than the image wraps around (circular convolution) instead of raising in
:func:`wiener` and :func:`unsupervised_wiener`; :func:`unsupervised_wiener` transforms every axis
for images that are not 2-D (scikit-image transforms the last two only, so it raises for 1-D
images and mixes 2-D and 3-D transforms for 3-D ones); unknown ``user_params`` keys and PSFs
with another number of axes than the image raise a clear error.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from . import _validate
from ._backend import Backend, get_backend, is_device_array, return_like
from .restore.unsupervised_wiener import (
    DeviceDraws,
    HostDraws,
    fft_module,
    gibbs_chain,
    laplacian_kernel,
    transfer_function,
)

__all__ = ["richardson_lucy", "unsupervised_wiener", "wiener"]

#: scikit-image's guard against division by zero in Richardson–Lucy.
_RL_EPSILON = 1e-12

#: ``user_params`` of :func:`unsupervised_wiener` and scikit-image's defaults for them.
_GIBBS_DEFAULTS = {"threshold": 1e-4, "max_num_iter": 200, "min_num_iter": 30, "burnin": 15, "callback": None}


# --------------------------------------------------------------------------------------------
# scikit-image's conventions
# --------------------------------------------------------------------------------------------
def _float_type(dtype: Any, name: str = "image") -> np.dtype:
    """scikit-image's working precision for ``dtype``: float32 and float64 kept, float16 promoted
    to float32, everything else (integers, bool, long double) computed in float64."""
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise ValueError(f"{name}: complex valued input is not supported (got dtype {dtype})")
    if dtype in (np.float16, np.float32):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _complex_of(dtype: Any) -> np.dtype:
    return np.result_type(dtype, np.complex64)


def _as_array(array: Any, name: str):
    """NumPy and CuPy arrays as they are; other array-likes through ``np.asarray``."""
    if array is None:
        raise TypeError(f"{name} must be an array, got None")
    if not (isinstance(array, np.ndarray) or is_device_array(array)):
        try:
            array = np.asarray(array)
        except Exception as error:
            raise TypeError(
                f"{name} must be an array of numbers; could not read it as one ({error})"
            ) from None
    if array.dtype.kind not in "biufc":
        raise TypeError(f"{name} has dtype {array.dtype}, which is not numeric")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)})")
    return array


def _same_ndim(kernel: Any, image: Any, name: str) -> None:
    if kernel.ndim != image.ndim:
        raise ValueError(
            f"{name} has {kernel.ndim} axes but the image has {image.ndim}; give one axis per image axis"
        )


def _clip_unit(array, xp) -> None:
    """scikit-image's ``a[a > 1] = 1; a[a < -1] = -1``, in place.

    For complex arrays NumPy orders values by real part, then imaginary part; spelled out here so
    that CuPy, which does not order complex numbers, gives the same.
    """
    if array.dtype.kind != "c":
        xp.clip(array, -1, 1, out=array)
        return
    real, imag = array.real, array.imag
    above = (real > 1) | ((real == 1) & (imag > 0))
    below = (real < -1) | ((real == -1) & (imag < 0))
    array[above] = 1
    array[below] = -1


def _unitary_forward(array, backend: Backend, real: bool, dtype):
    fft = fft_module(backend)
    axes = tuple(range(array.ndim))
    spectrum = fft.rfftn(array, axes=axes, norm="ortho") if real else fft.fftn(array, axes=axes, norm="ortho")
    return spectrum.astype(_complex_of(dtype), copy=False)


def _unitary_inverse(spectrum, shape, backend: Backend, real: bool, dtype):
    fft = fft_module(backend)
    axes = tuple(range(len(shape)))
    if real:
        return fft.irfftn(spectrum, s=shape, axes=axes, norm="ortho").astype(dtype, copy=False)
    return fft.ifftn(spectrum, axes=axes, norm="ortho").astype(_complex_of(dtype), copy=False)


def _transfer_and_reg(image, psf, reg, is_real: bool, float_type, backend: Backend):
    """The transfer function and the regularization's (real) transfer function, as scikit-image
    makes them: ``reg`` defaults to the Laplacian; real impulse responses are transformed (centre
    ``n // 2`` at the origin); complex arrays are taken as transfer functions; only the real parts
    are kept (scikit-image's ``.real``), and ``psf`` counts as a transfer function whenever it has
    the regularization's shape.
    """
    shape = tuple(image.shape)
    if reg is None:
        # from the impulse response, in float64, as scikit-image does: the same bits
        reg_tf = transfer_function(
            laplacian_kernel(len(shape)), shape, backend, dtype=np.float64, real=is_real
        )
        reg_real = reg_tf.real.astype(float_type)
    else:
        reg = _as_array(reg, "reg")
        if reg.dtype.kind == "c":
            reg_real = backend.asarray(reg.real, dtype=float_type)
        else:
            _same_ndim(reg, image, "reg")
            reg_tf = transfer_function(reg, shape, backend, dtype=_float_type(reg.dtype, "reg"), real=is_real)
            reg_real = reg_tf.real.astype(float_type)
    psf_real = backend.asarray(psf.real, dtype=float_type)
    if tuple(psf_real.shape) != tuple(reg_real.shape):
        _same_ndim(psf_real, image, "psf")
        transfer = transfer_function(psf_real, shape, backend, dtype=float_type, real=is_real)
    else:
        transfer = psf_real
    return transfer, reg_real


# --------------------------------------------------------------------------------------------
# Richardson–Lucy
# --------------------------------------------------------------------------------------------
class _SameConvolution:
    """``scipy.signal.convolve(x, psf, mode="same")`` and the same with the flipped PSF, by FFT.

    "same" keeps the centre part of the full linear convolution: the kernel's origin is index
    ``(p - 1) // 2``, one below microdecon's ``p // 2`` on axes of even length, for the PSF and
    for its mirror alike. So for even sizes the back-projection is not the exact adjoint of the
    blur but shifted by one pixel, as in scikit-image; both are reproduced.
    """

    def __init__(self, psf: np.ndarray, shape: tuple[int, ...], backend: Backend, dtype: Any):
        self.xp = backend.xp
        self.dtype = dtype
        self.shape = shape
        # zero padding to n + p - 1 keeps the wrap-around of circular convolution out of the image
        self.fft_shape = tuple(backend.next_fast_len(n + p - 1) for n, p in zip(shape, psf.shape))
        self.crop = tuple(slice(0, n) for n in shape)
        self.axes = tuple(range(len(shape)))
        self.fft = fft_module(backend)
        self.forward_otf = self._spectrum(psf, backend)
        self.backward_otf = self._spectrum(np.flip(psf), backend)

    def _spectrum(self, kernel: np.ndarray, backend: Backend):
        grid = np.zeros(self.fft_shape, dtype=self.dtype)
        index = np.ix_(
            *[np.mod(np.arange(p) - (p - 1) // 2, n) for p, n in zip(kernel.shape, self.fft_shape)]
        )
        grid[index] = kernel
        return self.fft.rfftn(backend.asarray(grid, dtype=self.dtype), axes=self.axes).astype(
            _complex_of(self.dtype), copy=False
        )

    def _apply(self, x, otf):
        spectrum = self.fft.rfftn(x, s=self.fft_shape, axes=self.axes)
        spectrum *= otf
        out = self.fft.irfftn(spectrum, s=self.fft_shape, axes=self.axes)[self.crop]
        return out.astype(self.dtype, copy=True)

    def forward(self, x):
        return self._apply(x, self.forward_otf)

    def backward(self, x):
        return self._apply(x, self.backward_otf)


def richardson_lucy(image: Any, psf: Any, num_iter: int = 50, clip: bool = True, filter_epsilon: Any = None):
    """Richardson–Lucy deconvolution, as ``skimage.restoration.richardson_lucy``.

    Parameters
    ----------
    image : ([P, ]M, N) ndarray
        Input degraded image (any number of axes), NumPy or CuPy.
    psf : ndarray
        The point spread function, same number of axes; not normalized (its sum scales the
        blur). Its origin is index ``(p - 1) // 2`` on each axis, as in ``scipy.signal.convolve``
        with ``mode="same"``.
    num_iter : int, >= 0
        Number of iterations.
    clip : bool
        Clip the result to [-1, 1] (scikit-image's convention for images scaled to that range).
    filter_epsilon : float, optional
        Where the blurred estimate falls below this value (image units), the ratio is set to 0
        instead of dividing by a small number. None or 0: no filtering.

    Returns
    -------
    ndarray
        The deconvolved image: float32 for float16 and float32 input, float64 otherwise; NumPy
        for NumPy input, CuPy for CuPy input.

    Notes
    -----
    Starts from 0.5 everywhere and repeats ``x <- x * (psf_mirror * (image / (psf * x + 1e-12)))``,
    with ``*`` the zero-padded linear convolution cropped to the image ("same"). The convolutions
    are computed by FFT (scikit-image lets SciPy choose direct sums or FFTs); the results agree
    to rounding.

    Examples
    --------
    >>> import numpy as np
    >>> from microdecon import skimage as restoration
    >>> image = np.zeros((9, 9)); image[3:6, 3:6] = 0.5
    >>> psf = np.ones((3, 3)) / 9
    >>> out = restoration.richardson_lucy(image, psf, num_iter=5)
    >>> out.dtype, out.shape
    (dtype('float64'), (9, 9))
    """
    image = _as_array(image, "image")
    psf = _as_array(psf, "psf")
    _same_ndim(psf, image, "psf")
    num_iter = _validate.check_int(num_iter, "num_iter", minimum=0)
    float_type = _float_type(image.dtype)
    backend = get_backend(image, psf, device="auto")
    xp = backend.xp
    with backend.activate():
        data = backend.asarray(image, dtype=float_type)
        # as in scikit-image, a complex PSF loses its imaginary part (with NumPy's warning)
        kernel = np.asarray(backend.to_host(psf)).astype(float_type, copy=False)
        blur = _SameConvolution(kernel, tuple(data.shape), backend, float_type)
        estimate = xp.full(data.shape, 0.5, dtype=float_type)
        for _ in range(num_iter):
            blurred = blur.forward(estimate)
            blurred += _RL_EPSILON
            if filter_epsilon:
                ratio = xp.where(blurred < filter_epsilon, 0, data / blurred)
            else:
                ratio = xp.divide(data, blurred, out=blurred)
            estimate *= blur.backward(ratio.astype(float_type, copy=False))
        if clip:
            _clip_unit(estimate, xp)
    return return_like(estimate, image, backend)


# --------------------------------------------------------------------------------------------
# Wiener–Hunt
# --------------------------------------------------------------------------------------------
def _wiener_result_dtype(transfer_dtype, reg_dtype, balance, spectrum_dtype) -> np.dtype:
    """The dtype scikit-image's expression ends in, found by evaluating it on one-element arrays:
    NumPy's promotion rules then decide exactly as they do there (a NumPy float64 ``balance``
    promotes float32 data to float64; a Python float does not)."""
    probe_balance = balance if np.ndim(balance) == 0 else np.ones(1, np.asarray(balance).dtype)
    transfer = np.ones(1, transfer_dtype)
    with np.errstate(all="ignore"):
        response = np.conj(transfer) / (
            np.abs(transfer) ** 2 + probe_balance * np.abs(np.ones(1, reg_dtype)) ** 2
        )
        return (response * np.ones(1, spectrum_dtype)).dtype


def wiener(image: Any, psf: Any, balance: Any, reg: Any = None, is_real: bool = True, clip: bool = True):
    """Wiener–Hunt deconvolution, as ``skimage.restoration.wiener``.

    Parameters
    ----------
    image : (N1, N2, ..., ND) ndarray
        Degraded image, NumPy or CuPy.
    psf : ndarray
        Impulse response (real; origin at index ``n // 2``, not normalized; circular
        convolution), or transfer function (complex, shaped like the image's spectrum: the half
        spectrum of ``rfftn`` when ``is_real``, else the full one).
    balance : float
        Regularization weight ``lambda`` (dimensionless, >= 0): larger favours the prior.
    reg : ndarray, optional
        Regularization operator, impulse response or transfer function as for ``psf``.
        Default: the Laplacian.
    is_real : bool
        Whether ``psf`` and ``reg``, when transfer functions, cover half the frequencies (the
        image is real). With False the result is complex.
    clip : bool
        Clip the result to [-1, 1].

    Returns
    -------
    ndarray
        The deconvolved image, in scikit-image's dtype (float32 for float16 and float32 input,
        float64 otherwise; complex for ``is_real=False``); NumPy or CuPy as the input.

    Notes
    -----
    .. math:: \\hat x = F^{-1} \\frac{\\Lambda_H^*}{|\\Lambda_H|^2 + \\lambda |\\Lambda_D|^2} F y

    with unitary transforms, ``Lambda_H`` the transfer function and ``Lambda_D`` the
    regularization's. As in scikit-image, only the real part of ``reg``'s transfer function and
    of a complex ``psf`` is used.

    Examples
    --------
    >>> import numpy as np
    >>> from microdecon import skimage as restoration
    >>> rng = np.random.default_rng(0)
    >>> image = rng.random((16, 16)).astype(np.float32)
    >>> restoration.wiener(image, np.ones((3, 3)) / 9, 0.1).dtype
    dtype('float32')
    """
    image = _as_array(image, "image")
    psf = _as_array(psf, "psf")
    if not (isinstance(balance, numbers.Real) or hasattr(balance, "dtype")):
        raise TypeError(f"balance must be a number (or an array), got {balance!r}")
    float_type = _float_type(image.dtype)
    backend = get_backend(image, psf, device="auto")
    xp = backend.xp
    real = bool(is_real)
    with backend.activate():
        transfer, reg_real = _transfer_and_reg(image, psf, reg, real, float_type, backend)
        if is_device_array(balance) or (isinstance(balance, np.ndarray) and balance.ndim):
            balance_here = backend.asarray(balance, dtype=None)
        else:
            balance_here = balance
        result_dtype = _wiener_result_dtype(transfer.dtype, reg_real.dtype, balance, _complex_of(float_type))
        response = xp.conj(transfer) / (xp.abs(transfer) ** 2 + balance_here * xp.abs(reg_real) ** 2)
        spectrum = _unitary_forward(backend.asarray(image, dtype=float_type), backend, real, float_type)
        spectrum = response * spectrum  # in scikit-image's order: complex products may round differently
        # the inverse gives the real (or, without is_real, complex) type of that precision
        result = _unitary_inverse(spectrum, tuple(image.shape), backend, real, np.finfo(result_dtype).dtype)
        if clip:
            _clip_unit(result, xp)
    return return_like(result, image, backend)


# --------------------------------------------------------------------------------------------
# Unsupervised Wiener–Hunt
# --------------------------------------------------------------------------------------------
def _check_user_params(user_params: Any) -> dict:
    params = dict(_GIBBS_DEFAULTS)
    if user_params is None:
        return params
    if not isinstance(user_params, dict):
        raise TypeError(f"user_params must be a dict or None, got {type(user_params).__name__}")
    unknown = sorted(set(user_params) - set(_GIBBS_DEFAULTS))
    if unknown:
        raise ValueError(
            f"user_params has unknown keys {unknown}; accepted: {', '.join(sorted(_GIBBS_DEFAULTS))}"
        )
    params.update(user_params)
    params["max_num_iter"] = _validate.check_int(
        params["max_num_iter"], "user_params['max_num_iter']", minimum=1
    )
    params["min_num_iter"] = _validate.check_int(params["min_num_iter"], "user_params['min_num_iter']")
    params["burnin"] = _validate.check_int(params["burnin"], "user_params['burnin']")
    params["threshold"] = _validate.check_float(params["threshold"], "user_params['threshold']", minimum=None)
    if params["callback"] is not None and not callable(params["callback"]):
        raise TypeError(f"user_params['callback'] must be callable, got {params['callback']!r}")
    return params


def _skimage_quad_weights(spectrum_shape: tuple[int, ...], image_shape: tuple[int, ...], real: bool):
    """The weights of scikit-image's ``image_quad_norm``: a spectrum whose last two axes differ
    in length counts as a half spectrum, every coefficient twice but the first column (for 2-D
    images; scikit-image's test, reproduced, also misreads full spectra of non-square images and
    half spectra with ``M == N // 2 + 1``). Images that are not 2-D are judged by ``is_real``."""
    if len(image_shape) == 2:
        half = spectrum_shape[-1] != spectrum_shape[-2]
    else:
        half = real
    if not half:
        return 1.0
    weights = np.full(spectrum_shape[-1], 2.0)
    weights[0] = 1.0
    return weights


def unsupervised_wiener(
    image: Any,
    psf: Any,
    reg: Any = None,
    user_params: dict | None = None,
    is_real: bool = True,
    clip: bool = True,
    *,
    rng: Any = None,
):
    """Unsupervised Wiener–Hunt deconvolution, as ``skimage.restoration.unsupervised_wiener``.

    A Gibbs sampler estimates the restoration together with the noise and prior precisions
    (Orieux, Giovannelli & Rodet 2010); see :mod:`microdecon.restore.unsupervised_wiener`.

    Parameters
    ----------
    image : (M, N) ndarray
        The degraded image (other numbers of axes work too, see the module docstring).
    psf : ndarray
        Impulse response (real, origin at ``n // 2``, not normalized) or transfer function
        (complex), as for :func:`wiener`.
    reg : ndarray, optional
        Regularization operator, impulse response or transfer function. Default: the Laplacian.
    user_params : dict, optional
        Sampler settings: ``threshold`` (float, 1e-4: stop when the change of the mean of the
        samples, relative to its size and divided by the squared number of samples, falls below
        it), ``burnin`` (int, 15: iterations before averaging starts, counted from 0),
        ``min_num_iter`` (int, 30), ``max_num_iter`` (int, 200), ``callback`` (callable, given
        each object sample, a spectrum, before the precisions are drawn).
    is_real : bool
        Whether ``psf`` and ``reg``, when transfer functions, cover half the frequencies. With
        False the result is complex.
    clip : bool
        Clip the result to [-1, 1].
    rng : numpy.random.Generator or int, optional
        Generator or seed (``numpy.random.default_rng`` takes it). For NumPy input the draws are
        scikit-image's, in its order and precision, so a seed gives its numbers. For CuPy input
        the image-sized draws come from the GPU's generator, seeded from this one.

    Returns
    -------
    x_postmean : ndarray
        The deconvolved image (the posterior mean), in scikit-image's dtype.
    chains : dict
        ``"noise"`` and ``"prior"``: lists of the noise and prior precisions drawn, starting
        with the initial 1.

    Examples
    --------
    >>> import numpy as np
    >>> from microdecon import skimage as restoration
    >>> rng = np.random.default_rng(0)
    >>> image = rng.random((32, 32))
    >>> out, chains = restoration.unsupervised_wiener(image, np.ones((5, 5)) / 25, rng=1)
    >>> out.shape, sorted(chains), chains["noise"][0]
    ((32, 32), ['noise', 'prior'], 1)
    """
    params = _check_user_params(user_params)
    image = _as_array(image, "image")
    psf = _as_array(psf, "psf")
    float_type = _float_type(image.dtype)
    real = bool(is_real)
    # NumPy input stays on the CPU: there the draws are scikit-image's
    backend = get_backend(image, psf, device="auto" if is_device_array(image) else "cpu")
    xp = backend.xp
    shape = tuple(image.shape)
    with backend.activate():
        transfer, reg_real = _transfer_and_reg(image, psf, reg, real, float_type, backend)
        data_spectrum = _unitary_forward(backend.asarray(image, dtype=float_type), backend, real, float_type)
        weights = _skimage_quad_weights(tuple(data_spectrum.shape), shape, real)
        generator = np.random.default_rng(rng)
        draws = DeviceDraws(backend, generator) if backend.name == "gpu" else HostDraws(generator, exact=True)
        chain = gibbs_chain(
            data_spectrum,
            transfer,
            reg_real**2,
            n_data=math.prod(shape),
            weights=xp.asarray(weights) if np.ndim(weights) else weights,
            burn_in=params["burnin"] + 1,  # scikit-image averages from iteration burnin + 1 (from 0)
            draws=draws,
            rao_blackwell=False,
            inspect=params["callback"],
            xp=xp,
        )
        noise_chain: list[Any] = [1]
        prior_chain: list[Any] = [1]
        for state in chain:
            noise_chain.append(state.noise)
            prior_chain.append(state.prior)
            iteration = state.iteration - 1  # scikit-image counts from 0
            if state.change is not None:
                # scikit-image's criterion: the relative change over the number of samples squared
                delta = state.change / state.samples**2
                if iteration > params["min_num_iter"] and delta < params["threshold"]:
                    break
            if state.iteration >= params["max_num_iter"]:
                break
        samples = iteration - params["burnin"]
        if state.total is None:
            # nothing averaged (max_num_iter <= burnin + 1): scikit-image divides zeros by 0 or less
            with np.errstate(all="ignore"):
                mean = xp.zeros(data_spectrum.shape, float_type) / samples
        else:
            mean = state.total / samples
        result = _unitary_inverse(mean, shape, backend, real, float_type)
        if clip:
            _clip_unit(result, xp)
    return return_like(result, image, backend), {"noise": noise_chain, "prior": prior_chain}
