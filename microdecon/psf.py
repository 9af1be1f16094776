"""Point spread function models and helpers.

Every PSF here has its centre at index ``n // 2`` on each axis and sums to 1, which is what the
operators and algorithms expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import _validate

__all__ = ["gaussian", "widefield"]


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
    shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
    if not shape:
        raise ValueError("shape must have at least one axis")
    for n in shape:
        _validate.check_int(n, "shape", minimum=1)
    sigmas = _validate.per_axis(sigma, len(shape), "sigma")
    profiles = [np.exp(-0.5 * ((np.arange(n) - n // 2) / s) ** 2) for n, s in zip(shape, sigmas)]
    psf = profiles[0]
    for profile in profiles[1:]:
        psf = np.multiply.outer(psf, profile)
    return (psf / psf.sum()).astype(np.float32)


def widefield(
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    wavelength: float,
    na: float,
    n_immersion: float = 1.515,
    oversample: int = 3,
) -> np.ndarray:
    """Scalar widefield PSF (Born & Wolf, matched refractive indices), sampled on a 3-D grid.

    Each plane is the intensity of the pupil's field focused through defocus ``z``:
    ``|int_0^1 J0(k NA r rho) exp(i k z sqrt(n^2 - NA^2 rho^2)) rho d rho|^2`` with
    ``k = 2 pi / wavelength``. Laterally each pixel is averaged over ``oversample^2`` sub-pixels,
    so coarse pixels stay right.

    Parameters
    ----------
    shape : (int, int, int)
        Grid (z, y, x); the focus is at index ``n // 2``.
    spacing : (float, float, float)
        Voxel size (dz, dy, dx) in micrometres.
    wavelength : float, > 0
        Emission wavelength in micrometres (e.g. 0.52).
    na : float, 0 < na < n_immersion
        Numerical aperture of the objective.
    n_immersion : float
        Refractive index of the immersion medium (and, in this matched model, the sample).
    oversample : int, >= 1
        Sub-pixels per pixel along y and x.

    Returns
    -------
    numpy.ndarray
        float32 (z, y, x), normalized to sum 1.

    Notes
    -----
    Lateral FWHM ~ 0.51 wavelength / NA; axial FWHM ~ 0.88 wavelength / (n - sqrt(n^2 - NA^2)).

    Examples
    --------
    >>> import microdecon as md
    >>> p = md.psf.widefield((33, 33, 33), (0.2, 0.1, 0.1), wavelength=0.52, na=1.4)
    >>> p.shape, tuple(int(i) for i in np.unravel_index(p.argmax(), p.shape))
    ((33, 33, 33), (16, 16, 16))
    """
    from scipy.special import j0

    shape = tuple(_validate.check_int(n, "shape", minimum=1) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (z, y, x), got {len(shape)} axes")
    dz, dy, dx = _validate.per_axis(spacing, 3, "spacing")
    wavelength = _validate.check_float(wavelength, "wavelength", strict=True)
    na = _validate.check_float(na, "na", strict=True)
    n_immersion = _validate.check_float(n_immersion, "n_immersion", strict=True)
    if na >= n_immersion:
        raise ValueError(f"na ({na}) must be smaller than n_immersion ({n_immersion})")
    oversample = _validate.check_int(oversample, "oversample", minimum=1)

    k = 2 * np.pi / wavelength
    z = (np.arange(shape[0]) - shape[0] // 2) * dz
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    yy = ((np.arange(shape[1]) - shape[1] // 2)[:, None] + sub[None, :]).ravel() * dy
    xx = ((np.arange(shape[2]) - shape[2] // 2)[:, None] + sub[None, :]).ravel() * dx
    radius = np.hypot(yy[:, None], xx[None, :])
    # The radial profile on a fine grid, then interpolated: far cheaper than Bessel per pixel.
    r_step = min(dy, dx) / (4 * oversample)
    r = np.arange(0, radius.max() + 2 * r_step, r_step)
    # Enough quadrature nodes to follow the defocus phase across the pupil.
    max_phase = k * np.abs(z).max() * (n_immersion - np.sqrt(n_immersion**2 - na**2)) if z.size else 0
    nodes, weights = np.polynomial.legendre.leggauss(int(max(64, 4 * max_phase / np.pi + 64)))
    rho = 0.5 * (nodes + 1)
    weights = 0.5 * weights * rho
    bessel = j0(k * na * r[:, None] * rho[None, :]) * weights[None, :]
    defocus = np.exp(1j * k * z[None, :] * np.sqrt(n_immersion**2 - (na * rho[:, None]) ** 2))
    profile = np.abs(bessel @ defocus) ** 2  # (len(r), len(z))
    out = np.empty(shape, np.float64)
    for plane in range(shape[0]):
        values = np.interp(radius, r, profile[:, plane])
        out[plane] = values.reshape(shape[1], oversample, shape[2], oversample).mean(axis=(1, 3))
    return (out / out.sum()).astype(np.float32)
