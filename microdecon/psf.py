"""Point spread function models and helpers.

Every PSF here has its centre at index ``n // 2`` on each axis and sums to 1, which is what the
operators and algorithms expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import _validate

__all__ = ["gaussian"]


def _per_axis(value: float | Sequence[float], ndim: int, name: str) -> tuple[float, ...]:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} needs one value per axis ({ndim}), got {len(values)}")
    return tuple(_validate.check_float(v, name, strict=True) for v in values)


def gaussian(shape: int | Sequence[int], sigma: float | Sequence[float]) -> np.ndarray:
    """A Gaussian PSF sampled on a grid, centred at ``n // 2``, normalized to sum 1.

    Parameters
    ----------
    shape : int or sequence of int
        Grid size per axis (an int makes a 1-D PSF).
    sigma : float or sequence of float, > 0
        Standard deviation in pixels, one value for all axes or one per axis
        (FWHM = 2.355 sigma).

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``.

    Examples
    --------
    >>> import microdecon as md
    >>> p = md.psf.gaussian((5, 7), sigma=(1.0, 2.0))
    >>> p.shape, round(float(p.sum()), 6), tuple(int(i) for i in divmod(int(p.argmax()), 7))
    ((5, 7), 1.0, (2, 3))
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape:
        raise ValueError("shape must have at least one axis")
    for n in shape:
        _validate.check_int(n, "shape", minimum=1)
    sigmas = _per_axis(sigma, len(shape), "sigma")
    profiles = [np.exp(-0.5 * ((np.arange(n) - n // 2) / s) ** 2) for n, s in zip(shape, sigmas)]
    psf = profiles[0]
    for profile in profiles[1:]:
        psf = np.multiply.outer(psf, profile)
    return (psf / psf.sum()).astype(np.float32)
