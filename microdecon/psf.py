"""Point spread function models and helpers.

Every PSF here has its centre at index ``n // 2`` on each axis and sums to 1, which is what the
operators and algorithms expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from . import _validate

__all__ = ["BeadAverage", "confocal", "from_beads", "gaussian", "prepare", "resample", "widefield"]


def _deliver(result: np.ndarray, *, device: str = "cpu", like: Any = None):
    """The result where the caller wants it: CuPy when the input was CuPy or a GPU device is named.

    The models and preparations run on the CPU in well under a second; what goes to the GPU is
    the finished, small PSF, once.
    """
    from ._backend import get_backend, is_device_array

    if like is not None and is_device_array(like):
        return get_backend(like).asarray(result)
    if device != "cpu":
        backend = get_backend(device=device)
        with backend.activate():
            return backend.asarray(result)
    return result


def gaussian(
    shape: int | Sequence[int],
    sigma: float | Sequence[float],
    spacing: float | Sequence[float] | None = None,
    *,
    device: str = "cpu",
):
    """A Gaussian PSF sampled on a grid, centred at ``n // 2``, normalized to sum 1.

    Parameters
    ----------
    shape : int or sequence of int
        Grid size per axis (an int makes a 1-D PSF).
    sigma : float or sequence of float, > 0
        Standard deviation, one value for all axes or one per axis (FWHM = 2.355 sigma): in
        micrometres when ``spacing`` is given, else in pixels.
    spacing : float or sequence of float, optional
        Voxel size per axis in micrometres (anisotropic voxels welcome).
    device : {"cpu", "gpu", "gpu:N", "auto"}
        Where the returned array lives (NumPy for "cpu", else CuPy on that GPU).

    Returns
    -------
    array
        float32 array of ``shape``; NumPy, or CuPy for a GPU ``device``.

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
    if spacing is not None:
        steps = _validate.per_axis(spacing, len(shape), "spacing")
        sigmas = tuple(s / d for s, d in zip(sigmas, steps))
    profiles = [np.exp(-0.5 * ((np.arange(n) - n // 2) / s) ** 2) for n, s in zip(shape, sigmas)]
    psf = profiles[0]
    for profile in profiles[1:]:
        psf = np.multiply.outer(psf, profile)
    return _deliver((psf / psf.sum()).astype(np.float32), device=device)


def widefield(
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    wavelength: float,
    na: float,
    n_immersion: float = 1.515,
    n_sample: float | None = None,
    particle_depth: float = 0.0,
    n_immersion_design: float | None = None,
    n_coverslip: float = 1.515,
    n_coverslip_design: float | None = None,
    coverslip: float = 170.0,
    coverslip_design: float | None = None,
    working_distance: float = 150.0,
    oversample: int = 3,
    device: str = "cpu",
):
    """Scalar widefield PSF (Gibson & Lanni; Born & Wolf when the indices match), on a 3-D grid.

    Each plane is ``|int_0^1 J0(k NA r rho) exp(i k W(rho, z)) rho d rho|^2`` with
    ``k = 2 pi / wavelength`` and ``W`` the optical path difference of Gibson & Lanni (1992):
    the sample (index ``n_sample``, the bead ``particle_depth`` below the coverslip), the coverslip
    and the immersion medium, each against its design value. With the default design values and
    ``n_sample == n_immersion`` it is the matched Born & Wolf PSF. Laterally each pixel is
    averaged over ``oversample^2`` sub-pixels, so coarse pixels stay right.

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
        Refractive index of the immersion medium.
    n_sample : float, optional
        Refractive index of the sample; default ``n_immersion`` (the matched case). It may be
        smaller than ``na`` (an oil objective imaging into water).
    particle_depth : float, >= 0
        Depth of the bead below the coverslip, micrometres. Plane ``n // 2`` is the focal plane
        placed at that depth; with a refractive-index mismatch the intensity peak shifts from it
        (the focal shift), as in real data.
    n_immersion_design, n_coverslip_design, coverslip_design : float, optional
        Design values of the immersion index, coverslip index and coverslip thickness
        (micrometres); default the actual values.
    n_coverslip, coverslip : float
        Actual coverslip index and thickness (micrometres).
    working_distance : float
        The objective's design working distance, micrometres.
    oversample : int, >= 1
        Sub-pixels per pixel along y and x.
    device : {"cpu", "gpu", "gpu:N", "auto"}
        Where the returned array lives. The model is computed on the CPU either way (a
        128 x 256 x 256 model takes about half a second); only the result is moved.

    Returns
    -------
    array
        float32 (z, y, x), normalized to sum 1; NumPy, or CuPy for a GPU ``device``.

    Notes
    -----
    Matched case: lateral FWHM ~ 0.51 wavelength / NA; axial FWHM ~ 0.88 wavelength /
    (n - sqrt(n^2 - NA^2)). The focal plane sits at depth ``z_v`` = ``particle_depth`` + plane
    offset (positive into the sample), and the immersion thickness follows Aguet (2009):
    ``t_i = z_p - z_v + n_i (t_i0 / n_i0 + t_g0 / n_g0 - t_g / n_g - z_p / n_s)``, so that
    ``W = z_p n_s cos_s + t_i n_i cos_i - t_i0 n_i0 cos_i0 + t_g n_g cos_g - t_g0 n_g0 cos_g0``
    (``n cos = sqrt(n^2 - NA^2 rho^2)``, evanescent where imaginary). This matches the scalar
    model of psfmodels (tested).

    Examples
    --------
    >>> import microdecon as md
    >>> p = md.psf.widefield((33, 33, 33), (0.2, 0.1, 0.1), wavelength=0.52, na=1.4)
    >>> p.shape, tuple(int(i) for i in np.unravel_index(p.argmax(), p.shape))
    ((33, 33, 33), (16, 16, 16))
    """
    from scipy.special import j0

    shape = tuple(_validate.check_int(n, "shape", minimum=1) for n in np.atleast_1d(shape))
    if len(shape) != 3:
        raise ValueError(f"shape must be (z, y, x), got {len(shape)} axes")
    dz, dy, dx = _validate.per_axis(spacing, 3, "spacing")
    wavelength = _validate.check_float(wavelength, "wavelength", strict=True)
    na = _validate.check_float(na, "na", strict=True)
    n_immersion = _validate.check_float(n_immersion, "n_immersion", strict=True)
    if na >= n_immersion:
        raise ValueError(f"na ({na}) must be smaller than n_immersion ({n_immersion})")
    oversample = _validate.check_int(oversample, "oversample", minimum=1)
    ns = n_immersion if n_sample is None else _validate.check_float(n_sample, "n_sample", strict=True)
    ni0 = (
        n_immersion
        if n_immersion_design is None
        else _validate.check_float(n_immersion_design, "n_immersion_design", strict=True)
    )
    ng = _validate.check_float(n_coverslip, "n_coverslip", strict=True)
    ng0 = (
        ng
        if n_coverslip_design is None
        else _validate.check_float(n_coverslip_design, "n_coverslip_design", strict=True)
    )
    for name, value in (("n_immersion_design", ni0), ("n_coverslip_design", ng0)):
        if value <= na:  # its (subtracted) path term would grow exponentially past the critical angle
            raise ValueError(f"{name} ({value}) must be larger than na ({na})")
    tg = _validate.check_float(coverslip, "coverslip")
    tg0 = tg if coverslip_design is None else _validate.check_float(coverslip_design, "coverslip_design")
    ti0 = _validate.check_float(working_distance, "working_distance")
    zp = _validate.check_float(particle_depth, "particle_depth")

    k = 2 * np.pi / wavelength
    z = (np.arange(shape[0]) - shape[0] // 2) * dz
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    yy = ((np.arange(shape[1]) - shape[1] // 2)[:, None] + sub[None, :]).ravel() * dy
    xx = ((np.arange(shape[2]) - shape[2] // 2)[:, None] + sub[None, :]).ravel() * dx
    radius = np.hypot(yy[:, None], xx[None, :])
    # The radial profile on a fine grid, then interpolated: far cheaper than Bessel per pixel.
    r_step = min(dy, dx) / (4 * oversample)
    r = np.arange(0, radius.max() + 2 * r_step, r_step)

    def n_cos(n, rho):  # n cos(theta) in a layer of index n; imaginary (evanescent) past n
        return np.sqrt((n**2 - (na * rho) ** 2).astype(complex))

    def path(rho):  # optical path difference W(rho, z), one column per plane
        ti = -z + n_immersion * (ti0 / ni0 + tg0 / ng0 - tg / ng - zp / ns)  # z_p - z_v, z_v = z_p + z
        fixed = zp * n_cos(ns, rho) - ti0 * n_cos(ni0, rho) + tg * n_cos(ng, rho) - tg0 * n_cos(ng0, rho)
        return fixed[:, None] + ti[None, :] * n_cos(n_immersion, rho)[:, None]

    # Enough quadrature nodes to follow the phase across the pupil.
    probe = np.linspace(0, 1, 257)
    phase = k * path(probe).real
    max_phase = float(np.abs(np.diff(phase, axis=0)).sum(axis=0).max()) if z.size else 0.0
    # ... and the Bessel function's oscillations at the largest radius
    bessel_cycles = k * na * float(r.max()) / np.pi
    count = int(min(64 + 4 * max_phase / np.pi + 4 * bessel_cycles, 20000))
    nodes, weights = np.polynomial.legendre.leggauss(count)
    rho = 0.5 * (nodes + 1)
    weights = 0.5 * weights * rho
    bessel = j0(k * na * r[:, None] * rho[None, :]) * weights[None, :]
    defocus = np.exp(1j * k * path(rho))
    profile = np.abs(bessel @ defocus) ** 2  # (len(r), len(z))
    # Every pixel is a fixed mix of profile samples (linear interpolation at each sub-pixel's
    # radius, averaged over the sub-pixels): one sparse matrix serves all planes at once.
    from scipy import sparse

    position = np.clip(radius.ravel() / r_step, 0, len(r) - 1.000001)
    left = np.floor(position).astype(np.int64)
    weight = position - left
    # sub-pixel (y, sy, x, sx), in the radius array's order, belongs to pixel y * nx + x
    pixel = np.arange(shape[1])[:, None, None, None] * shape[2] + np.arange(shape[2])[None, None, :, None]
    pixel = np.broadcast_to(pixel, (shape[1], oversample, shape[2], oversample)).ravel()
    share = 1.0 / oversample**2
    mix = sparse.csr_matrix(
        (
            np.concatenate([(1 - weight) * share, weight * share]),
            (np.concatenate([pixel, pixel]), np.concatenate([left, left + 1])),
        ),
        shape=(shape[1] * shape[2], len(r)),
    )
    out = np.asarray(mix @ profile).T.reshape(shape)
    return _deliver((out / out.sum()).astype(np.float32), device=device)


def prepare(
    bead: Any,
    *,
    background: float | str = "auto",
    center: Literal["mass", "peak"] | None = "mass",
    shape: Sequence[int] | None = None,
    energy: float | None = None,
) -> np.ndarray:
    """Turn a measured bead image into a PSF: background off, noise cut, centred, cropped, normalized.

    Parameters
    ----------
    bead : array_like
        Image of one sub-resolution bead (raw camera counts are fine), the bead roughly in the
        middle; 1-D to 3-D.
    background : float or "auto"
        Counts to subtract (camera offset plus diffuse light). "auto" takes the median of the
        image's outer shell (2 voxels deep on every face), where a centred bead puts no light.
    center : {"mass", "peak"} or None
        Shift the PSF with sub-voxel accuracy (Fourier shift) so that its centre sits exactly at
        index ``n // 2`` on each axis, as the operators expect: the centre of mass, or the peak
        of a parabola fitted through the smoothed maximum and its neighbours on each axis (for
        asymmetric PSFs whose mass and peak differ). None leaves it where it is.
    shape : sequence of int, optional
        Crop to this shape around the centre (each axis at most the input's).
    energy : float in (0, 1], optional
        Crop to the smallest box around the centre that holds this fraction of the PSF's light
        (e.g. 0.99); ignored when ``shape`` is given.

    Returns
    -------
    numpy.ndarray
        float32, non-negative, sums to 1.

    Notes
    -----
    After the background is subtracted, noise is cut by keeping only the connected region
    around the bead where the image, smoothed by a one-voxel Gaussian, stands more than three
    noise standard deviations (measured on the shell) above zero, widened by two voxels; the
    rest is set to zero. Clipping negative noise alone would leave a floor of positive noise
    that, summed over a large array, can hold more light than the bead.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> rng = np.random.default_rng(0)
    >>> bead = rng.poisson(5000 * md.psf.gaussian((21, 21), 2.0) + 100).astype(np.uint16)
    >>> psf = md.psf.prepare(bead, energy=0.999)
    >>> psf.shape[0] % 2, round(float(psf.sum()), 5), bool(psf.min() >= 0)
    (1, 1.0, True)
    """

    bead = _validate.check_array(bead, "bead")
    data = np.asarray(bead.get() if hasattr(bead, "get") else bead, dtype=np.float64)
    shell = _outer_shell(data, depth=2)
    if isinstance(background, str):
        _validate.check_choice(background, "background", ("auto",))
        background = float(np.median(shell))
    else:
        background = _validate.check_float(background, "background", minimum=None)
    if energy is not None and not (0 < float(energy) <= 1):
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if center is not None:
        _validate.check_choice(center, "center", ("mass", "peak"))
    psf = np.clip(_centred_signal(data - background, shell - background, center), 0, None)
    if shape is not None:
        psf = _crop_centred(psf, tuple(_validate.check_int(n, "shape", minimum=1) for n in shape))
    elif energy is not None:
        psf = _crop_centred(psf, _energy_box(psf, float(energy)))
    total = float(psf.sum())
    if total <= 0:
        raise ValueError("bead has no light left after background subtraction")
    return _deliver((psf / total).astype(np.float32), like=bead)


def _centred_signal(
    data: np.ndarray, shell: np.ndarray, center: str | None, *, mask: bool = True
) -> np.ndarray:
    """The bead's light (background already off), shifted so its centre of mass sits at n // 2.

    With ``mask``, noise outside the bead's connected 3-sigma region is set to zero; the centre
    of mass is always taken over that region. Not clipped at zero: averaging many beads first
    and clipping once keeps the clipped noise from biasing the result.
    """
    from scipy import ndimage

    noise = 1.4826 * float(np.median(np.abs(shell - np.median(shell))))
    smooth = ndimage.gaussian_filter(data, 1.0)
    smoothed_noise = max(noise * _gaussian_noise_gain(data.ndim, 1.0), 1e-12 * float(np.abs(data).max()))
    if float(data.max()) <= 0 or float(smooth.max()) < 10 * smoothed_noise:
        raise ValueError("bead has no bead in it: nothing stands 10 noise deviations above the background")
    above = smooth > 3 * smoothed_noise
    labels, _ = ndimage.label(above)
    peak = np.unravel_index(int(np.argmax(smooth)), data.shape)
    region = ndimage.binary_dilation(labels == labels[peak], iterations=2)
    signal = data * region if mask else data.copy()
    if center:
        if center == "peak":
            where = _fitted_peak(smooth, peak)
        else:
            where = np.array(ndimage.center_of_mass(np.clip(data * region, 0, None)))
        shift = np.array([n // 2 for n in signal.shape]) - where
        signal = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(signal), shift)).real
    return signal


def _fitted_peak(smooth: np.ndarray, peak: tuple[int, ...]) -> np.ndarray:
    """Sub-voxel peak: a parabola through the maximum and its two neighbours, axis by axis."""
    where = np.array(peak, dtype=np.float64)
    for axis, index in enumerate(peak):
        if 0 < index < smooth.shape[axis] - 1:
            left, middle, right = (smooth[peak[:axis] + (index + d,) + peak[axis + 1 :]] for d in (-1, 0, 1))
            curvature = left - 2 * middle + right
            if curvature < 0:
                where[axis] += 0.5 * (left - right) / curvature
    return where


def _outer_shell(data: np.ndarray, depth: int) -> np.ndarray:
    """The voxels within ``depth`` of any face (all of them for arrays too thin to have an inside)."""
    inside = np.zeros(data.shape, bool)
    core = tuple(slice(depth, n - depth) if n > 2 * depth else slice(0, 0) for n in data.shape)
    inside[core] = True
    return data[~inside]


def _gaussian_noise_gain(ndim: int, sigma: float) -> float:
    """How much a Gaussian filter of ``sigma`` shrinks white noise's standard deviation."""
    profile = np.exp(-0.5 * (np.arange(-4 * int(np.ceil(sigma)), 4 * int(np.ceil(sigma)) + 1) / sigma) ** 2)
    profile /= profile.sum()
    return float(np.sqrt(np.sum(profile**2)) ** ndim)


def _box_kernel(width: float) -> np.ndarray:
    """A centred box ``width`` samples wide (odd length, fractional weight at both ends), summing to 1."""
    half = width / 2
    reach = int(np.ceil(half - 0.5))
    offsets = np.arange(-reach, reach + 1)
    weights = np.clip(half + 0.5 - np.abs(offsets), 0, 1)
    return weights / weights.sum()


def _crop_centred(psf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) != psf.ndim:
        raise ValueError(f"shape needs one value per axis ({psf.ndim}), got {len(shape)}")
    if any(s > n for s, n in zip(shape, psf.shape)):
        raise ValueError(f"shape {shape} is larger than the bead image {psf.shape}")
    # keep index n // 2 at the new centre s // 2
    window = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(psf.shape, shape))
    return psf[window]


def _energy_box(psf: np.ndarray, energy: float) -> tuple[int, ...]:
    """Smallest box around index n // 2 holding ``energy`` of the light, grown greedily: each step
    widens (by one voxel on both sides) the axis that adds the most light per added voxel."""
    total = float(psf.sum())
    centre = [n // 2 for n in psf.shape]
    reach = [0] * psf.ndim

    def window(r):
        return tuple(slice(max(c - q, 0), min(c + q + 1, n)) for c, q, n in zip(centre, r, psf.shape))

    held = float(psf[window(reach)].sum())
    while held < energy * total - 1e-12 * total:
        best, best_gain = None, -1.0
        for axis in range(psf.ndim):
            current = window(reach)
            if current[axis].start == 0 and current[axis].stop == psf.shape[axis]:
                continue  # this axis is already whole
            wider = list(reach)
            wider[axis] += 1
            grown = window(wider)
            added_voxels = np.prod([w.stop - w.start for w in grown]) - np.prod(
                [w.stop - w.start for w in current]
            )
            gain = (float(psf[grown].sum()) - held) / max(added_voxels, 1)
            if gain > best_gain:
                best, best_gain = axis, gain
        if best is None:
            break
        reach[best] += 1
        held = float(psf[window(reach)].sum())
    return tuple(w.stop - w.start for w in window(reach))


#: A local maximum at most this fraction of a neighbour's height is that neighbour's ring or lobe.
RING_FRACTION = 0.2

#: A peak this many times higher than its one-voxel-Gaussian smoothing is a single hot pixel: a
#: PSF sampled at Nyquist (sigma >= 1 voxel) loses at most a factor 2.8 to that smoothing in 3-D.
HOT_PIXEL_RATIO = 5.0


class BeadAverage(NamedTuple):
    """What :func:`from_beads` found: the averaged PSF, how many beads went into it, and where they are."""

    psf: np.ndarray
    count: int
    positions: np.ndarray


def from_beads(
    image: Any,
    size: int | Sequence[int],
    *,
    min_distance: float | None = None,
    saturation: float | None = None,
    background: float | str = "auto",
    threshold: float = 10.0,
) -> BeadAverage:
    """Average the isolated beads of a bead stack into one PSF.

    Beads are the local maxima of the (slightly smoothed) stack that stand ``threshold`` noise
    standard deviations above the background. Kept are those whose whole ``size`` window lies
    inside the stack, with no other bead within ``min_distance``, below ``saturation`` and not a
    single hot pixel (a peak far sharper than the optics can image). Each is
    cut out, cleaned and centred with sub-voxel accuracy by :func:`prepare`, and the centred beads
    are averaged with equal weight.

    Parameters
    ----------
    image : array_like
        Bead stack (raw counts are fine), 2-D or 3-D.
    size : int or sequence of int
        Window (and PSF) shape in voxels, odd sizes recommended; an int for every axis.
    min_distance : float, optional
        Closest allowed distance between two beads, in voxels (Euclidean); default: the window's
        half-diagonal plus one, so that no window holds a second bead, not even in a corner.
    saturation : float, optional
        Raw value at or above which a bead counts as saturated and is dropped; default: the
        dtype's maximum for integer images, none for floats.
    background : float or "auto"
        Counts to subtract; "auto" is the median of the stack (beads are sparse).
    threshold : float
        Detection level in noise standard deviations.

    Returns
    -------
    BeadAverage
        ``psf`` (float32, sums to 1, centre at ``n // 2``), ``count`` (beads used) and ``positions``
        (their integer peak positions, one row per bead).

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> rng = np.random.default_rng(0)
    >>> stack = np.zeros((96, 96)); stack[[20, 20, 70, 70], [20, 70, 20, 70]] = 5000
    >>> stack = rng.poisson(md.convolve(stack, md.psf.gaussian((15, 15), 2.0), device="cpu").clip(0) + 50)
    >>> found = md.psf.from_beads(stack, 21)
    >>> found.count, found.psf.shape
    (4, (21, 21))
    """
    from scipy import ndimage

    image = _validate.check_array(image, "image")
    raw = np.asarray(image.get() if hasattr(image, "get") else image)
    if raw.ndim not in (2, 3):
        raise ValueError(f"image must be 2-D or 3-D, got {raw.ndim} axes")
    sizes = np.atleast_1d(size)
    if sizes.size not in (1, raw.ndim):
        raise ValueError(f"size needs one value or one per axis ({raw.ndim}), got {sizes.size}")
    size = tuple(_validate.check_int(int(n), "size", minimum=1) for n in np.broadcast_to(sizes, raw.ndim))
    if any(s > n for s, n in zip(size, raw.shape)):
        raise ValueError(f"size {size} does not fit in the image {raw.shape}")
    data = raw.astype(np.float64)
    if isinstance(background, str):
        _validate.check_choice(background, "background", ("auto",))
        background = float(np.median(data))
    else:
        background = _validate.check_float(background, "background", minimum=None)
    if saturation is None and raw.dtype.kind in "ui":
        saturation = float(np.iinfo(raw.dtype).max)
    if min_distance is None:  # no other bead anywhere in a window, corners included
        min_distance = float(np.sqrt(sum((s // 2) ** 2 for s in size))) + 1
    min_distance = _validate.check_float(min_distance, "min_distance")
    threshold = _validate.check_float(threshold, "threshold", strict=True)

    deviation = data - background
    noise = 1.4826 * float(np.median(np.abs(deviation[deviation <= np.percentile(deviation, 90)])))
    smooth = ndimage.gaussian_filter(deviation, 1.0)
    level = threshold * max(noise * _gaussian_noise_gain(raw.ndim, 1.0), 1e-12)
    # every local maximum, so that a close neighbour is seen (and both are dropped) rather than
    # swallowed by a wide filter
    peaks = (smooth == ndimage.maximum_filter(smooth, size=3)) & (smooth > level)
    candidates = np.argwhere(peaks)
    # a hot pixel is far sharper than anything the optics can image: not a bead, nor a neighbour
    sharp = deviation[tuple(candidates.T)] > HOT_PIXEL_RATIO * smooth[tuple(candidates.T)]
    candidates = candidates[~sharp]
    if len(candidates) == 0:
        raise ValueError("image has no bead in it: nothing stands above the background noise")
    half = np.array([s // 2 for s in size])
    inside = np.all((candidates - half >= 0) & (candidates - half + np.array(size) <= raw.shape), axis=1)
    # Pairs closer than min_distance (a k-d tree: no N x N matrix for stacks with many beads).
    # A maximum at most a fifth as bright as its neighbour is that bead's ring or axial lobe and
    # is ignored; neighbours of comparable brightness are two beads too close to use.
    from scipy.spatial import cKDTree

    height = smooth[tuple(candidates.T)]
    pairs = (
        cKDTree(candidates).query_pairs(min_distance, output_type="ndarray") if len(candidates) > 1 else []
    )
    ring = np.zeros(len(candidates), bool)
    for a, b in pairs:
        if height[a] <= RING_FRACTION * height[b]:
            ring[a] = True
        elif height[b] <= RING_FRACTION * height[a]:
            ring[b] = True
    isolated = ~ring
    for a, b in pairs:
        if not (ring[a] or ring[b]):
            isolated[a] = isolated[b] = False
    kept = []
    for position, ok in zip(candidates, inside & isolated):
        if not ok:
            continue
        window = tuple(slice(p - h, p - h + s) for p, h, s in zip(position, half, size))
        if saturation is not None and float(raw[window].max()) >= saturation:
            continue
        kept.append((position, window))
    if not kept:
        raise ValueError(
            f"image has {len(candidates)} bead(s), but none is isolated (min_distance={min_distance}), "
            f"unsaturated and a whole window ({size}) away from the border"
        )
    total = np.zeros(size)
    noise_sample = deviation.ravel()[:: max(1, deviation.size // 100_000)]  # enough for a robust spread
    for _, window in kept:
        bead = data[window] - background
        # unmasked: the faint out-of-focus light of each bead averages in (its noise averages out)
        signal = _centred_signal(bead, noise_sample, center="mass", mask=False)
        total += signal / signal.sum()  # equal weights
    # Cut the noise that is left only now, on the average, where it is sqrt(count) times lower
    # than on any one bead, so faint out-of-focus light survives; then clip once.
    total = _centred_signal(total, _outer_shell(total, depth=2), center=None)
    total = np.clip(total, 0, None)
    psf = (total / total.sum()).astype(np.float32)
    return BeadAverage(
        psf=_deliver(psf, like=image), count=len(kept), positions=np.array([p for p, _ in kept])
    )


def resample(
    psf: Any,
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    shape: Sequence[int] | None = None,
    *,
    integrate: Sequence[bool] | None = None,
) -> np.ndarray:
    """Resample a PSF from one voxel size to another, keeping its centre at index ``n // 2``.

    Coarser pixels first average the light over their footprint (a box filter, along the axes
    that ``integrate``), then cubic interpolation about the centre; negative overshoot clipped,
    normalized to sum 1. Use it when the PSF was measured or modelled at another voxel size
    than the image's.

    Parameters
    ----------
    psf : array_like
        The PSF, centre at ``n // 2``.
    spacing, new_spacing : sequence of float, > 0
        Voxel size per axis now and wanted (any unit, the same for both).
    shape : sequence of int, optional
        Output shape; default: the same physical extent, rounded to odd sizes.
    integrate : sequence of bool, optional
        Per axis, whether a coarser voxel averages over its footprint (camera pixels do) or is
        a point sample (each plane of a z-stack is one focal position). Default: the last two
        axes (y, x) integrate, z does not.

    Returns
    -------
    numpy.ndarray
        float32, sums to 1.

    Examples
    --------
    >>> import microdecon as md
    >>> fine = md.psf.gaussian((61, 61), 4.0)  # sigma 4 voxels of 0.05 um = 0.2 um
    >>> coarse = md.psf.resample(fine, (0.05, 0.05), (0.1, 0.1))
    >>> coarse.shape, round(float(abs(coarse - md.psf.gaussian((31, 31), 2.0)).max() / coarse.max()), 2)
    ((31, 31), 0.0)
    """
    from scipy import ndimage

    psf = _validate.check_psf(psf, np.ndim(psf))
    data = np.asarray(psf.get() if hasattr(psf, "get") else psf, dtype=np.float64)
    old = np.array(_validate.per_axis(spacing, data.ndim, "spacing"))
    new = np.array(_validate.per_axis(new_spacing, data.ndim, "new_spacing"))
    if shape is None:
        extent = (np.array(data.shape) - 1) * old / new
        shape = tuple(int(2 * np.floor(e / 2) + 1) for e in extent)
    shape = tuple(_validate.check_int(n, "shape", minimum=1) for n in shape)
    if len(shape) != data.ndim:
        raise ValueError(f"shape needs one value per axis ({data.ndim}), got {len(shape)}")
    # Coarser voxels collect the light of everything they cover: average over each new voxel's
    # footprint (a box new/old input pixels wide, fractional at its ends) before sampling.
    scale = new / old
    if integrate is None:
        integrate = [axis >= data.ndim - 2 for axis in range(data.ndim)]
    if len(integrate) != data.ndim:
        raise ValueError(f"integrate needs one value per axis ({data.ndim}), got {len(integrate)}")
    for axis, (ratio, pixel_area) in enumerate(zip(scale, integrate)):
        if ratio > 1 and pixel_area:
            data = ndimage.convolve1d(data, _box_kernel(float(ratio)), axis=axis, mode="constant")
    # output index o maps to input coordinate c_in + (o - c_out) * new / old
    centre_in = np.array([n // 2 for n in data.shape], dtype=np.float64)
    centre_out = np.array([n // 2 for n in shape], dtype=np.float64)
    out = ndimage.affine_transform(
        data,
        scale,
        offset=centre_in - scale * centre_out,
        output_shape=shape,
        order=3,
        mode="constant",
        cval=0.0,
    )
    out = np.clip(out, 0, None)
    total = float(out.sum())
    if total <= 0:
        raise ValueError("psf has no light left after resampling; check spacing and new_spacing")
    return _deliver((out / total).astype(np.float32), like=psf)


def confocal(
    shape: Sequence[int],
    spacing: Sequence[float],
    *,
    excitation: float,
    emission: float,
    na: float,
    n_immersion: float = 1.515,
    pinhole: float = 1.0,
    n_sample: float | None = None,
    particle_depth: float = 0.0,
    oversample: int = 3,
    device: str = "cpu",
):
    """Confocal PSF: the excitation PSF times the emission PSF seen through the pinhole.

    Parameters
    ----------
    shape : (int, int, int)
        Grid (z, y, x); the focus is at index ``n // 2``.
    spacing : (float, float, float)
        Voxel size (dz, dy, dx) in micrometres.
    excitation, emission : float, > 0
        Wavelengths in micrometres.
    na : float, 0 < na < n_immersion
        Numerical aperture.
    n_immersion : float
        Refractive index of the immersion medium (and the sample: matched case).
    pinhole : float, >= 0
        Pinhole diameter in Airy units (1 AU = 1.22 emission / NA, back-projected to the
        sample); 0 is an ideal point detector.
    n_sample, particle_depth : optional
        Refractive-index mismatch, as in :func:`widefield` (applied to both factors).
    oversample : int
        Sub-pixels per pixel along y and x for both widefield factors.
    device : {"cpu", "gpu", "gpu:N", "auto"}
        Where the returned array lives.

    Returns
    -------
    numpy.ndarray
        float32 (z, y, x), normalized to sum 1.

    Notes
    -----
    ``h = h_ex * (h_em convolved laterally with the pinhole disk)``, with both factors from
    :func:`widefield`. A small pinhole narrows the lateral FWHM towards 0.37 wavelength / NA; any
    finite pinhole makes each plane's total light fall off away from focus (optical sectioning).

    Examples
    --------
    >>> import microdecon as md
    >>> p = md.psf.confocal((33, 33, 33), (0.2, 0.05, 0.05), excitation=0.488, emission=0.52, na=1.4)
    >>> p.shape, round(float(p.sum()), 5)
    ((33, 33, 33), 1.0)
    """
    from scipy.signal import fftconvolve

    pinhole = _validate.check_float(pinhole, "pinhole")
    excitation = _validate.check_float(excitation, "excitation", strict=True)
    emission = _validate.check_float(emission, "emission", strict=True)
    mismatch = {"n_sample": n_sample, "particle_depth": particle_depth}
    excitation_psf = widefield(
        shape,
        spacing,
        wavelength=excitation,
        na=na,
        n_immersion=n_immersion,
        oversample=oversample,
        **mismatch,
    ).astype(np.float64)
    emission_psf = widefield(
        shape, spacing, wavelength=emission, na=na, n_immersion=n_immersion, oversample=oversample, **mismatch
    ).astype(np.float64)
    if pinhole > 0:
        _, dy, dx = _validate.per_axis(spacing, 3, "spacing")
        radius = 0.5 * pinhole * 1.22 * emission / na
        # the disk, anti-aliased by 8 x 8 sub-pixel sampling
        sub = (np.arange(8) + 0.5) / 8 - 0.5
        ny = 2 * int(np.ceil(radius / dy)) + 1
        nx = 2 * int(np.ceil(radius / dx)) + 1
        yy = ((np.arange(ny) - ny // 2)[:, None] + sub[None, :]).ravel() * dy
        xx = ((np.arange(nx) - nx // 2)[:, None] + sub[None, :]).ravel() * dx
        inside = (yy[:, None] ** 2 + xx[None, :] ** 2) <= radius**2
        disk = inside.reshape(ny, 8, nx, 8).mean(axis=(1, 3))
        emission_psf = np.clip(fftconvolve(emission_psf, disk[None], mode="same", axes=(1, 2)), 0, None)
    out = excitation_psf * emission_psf
    return _deliver((out / out.sum()).astype(np.float32), device=device)
