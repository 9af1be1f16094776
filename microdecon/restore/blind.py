"""Blind Richardson–Lucy: the image and the PSF estimated together from the data alone.

Notes
-----
With data ``y``, object ``x``, PSF ``h`` and background ``b``, blind RL (Fish et al. 1995) looks
for the pair that makes ``y ~ Poisson(h * x + b)`` most likely by alternating two EM steps, each
the RL update of one factor with the other held fixed. With ``H`` the blur by ``h`` and ``X``
the convolution by the (extended) object, on the image's window:

.. math::

    x \\leftarrow \\frac{x}{H^T 1} \\, H^T \\frac{y}{H x + b}, \\qquad
    h \\leftarrow \\frac{h}{X^T 1} \\, X^T \\frac{y}{X h + b}

``X^T r`` is the cross-correlation of the ratio ``r`` with the object, read at the PSF's support
offsets; the object lives on the operator's FFT grid, which is ``n + p - 1`` long (or more), so
the correlation wraps nowhere. After each PSF step the PSF is clipped at zero, set to zero
outside its support (the guess's shape, optionally narrowed by a mask) and scaled to sum 1, so
that the object keeps the image's units.

Three choices make the alternation land on the PSF the data show rather than on the trivial
solution (``h`` a delta, ``x = y``), which fits the data perfectly. The numbers below are
second-moment widths relative to the truth, for Gaussian PSFs on the phantoms of the test suite
with Poisson noise, guesses from half to twice the true width.

*The PSF starts wide.* Nothing in the data pulls a too-narrow PSF wider: a narrower blur is
always matched by a blurrier, still non-negative object. A too-wide PSF is different: the object
it calls for needs negative values at sharp features (beads, filaments, edges), which RL cannot
give, so the data pull the PSF narrower until it fits. The first PSF estimate is therefore the
guess blurred by a Gaussian to :data:`START_WIDTH` (3) times its width on every axis, inside the
support. Starting from the true PSF itself ends 10-27% too narrow; starting three times wider,
within 6.5% on every axis with 20 photons per unit of intensity (12% at 5 photons from a guess half
the true width).

*More image steps than PSF steps.* Many PSF steps against one object overfit the noise and
shrink the PSF; many image steps against one PSF let a noisy, over-sharpened object explain a
too-wide PSF. Four image steps (plain RL: the Biggs–Andrews extrapolation over-sharpens here,
2-4% too wide and up to 2 dB less gain) and two PSF steps sit between both.

*The PSF corrections are smoothed.* The PSF step deconvolves the data by the object; left
alone it grows a spike at the centre on a broad halo, most of all for PSFs whose light lies
mostly outside the core (a widefield PSF: its FWHM came out 26-47% of the truth). Each
correction ``X^T (y / (X h + b)) / X^T 1`` is therefore convolved with a Gaussian of
:data:`PSF_SMOOTHING` (1.2) voxels before it multiplies the PSF (an EMS step, Silverman et al.
1990). A fitting PSF has a flat correction of 1, which smoothing leaves alone, so the fixed
points stay those of blind RL; only the fine detail of the PSF, where a sampled PSF has no
light, adapts more slowly (Holmes 1992 holds the PSF to the optics' band limit for the same
reason; smoothing needs no optical parameters). Widefield FWHMs then come out 77-92% of the
truth (``psf_iter=1``: 86-103%), and Gaussian widths are unchanged.

References
----------
.. [1] D. A. Fish, A. M. Brinicombe, E. R. Pike and J. G. Walker, "Blind deconvolution by means
       of the Richardson-Lucy algorithm", JOSA A 12 (1995).
.. [2] T. J. Holmes, "Blind deconvolution of quantum-limited incoherent imagery:
       maximum-likelihood approach", JOSA A 9 (1992).
.. [3] D. S. C. Biggs and M. Andrews, "Acceleration of iterative image restoration
       algorithms", Applied Optics 36 (1997).
.. [4] M. Bertero and P. Boccacci, "A simple method for the reduction of boundary effects in the
       Richardson-Lucy approach to image deconvolution", A&A 437 (2005).
.. [5] B. W. Silverman, M. C. Jones, J. D. Wilson and D. W. Nychka, "A smoothed EM approach to
       indirect estimation problems, with particular reference to stereology and emission
       tomography", J. R. Statist. Soc. B 52 (1990).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .. import _validate
from .._backend import Backend, get_backend, return_like
from .._tile_model import in_force, shared
from ..metrics import i_divergence
from ..operators import Boundary, Convolution
from ._stopping import StoppingRule
from .richardson_lucy import (
    _extrapolation_weight,
    _load_poisson_data,
    _relative_change,
    first_estimate,
    normalization_of,
    richardson_lucy,
)

__all__ = ["BlindResult", "blind_richardson_lucy", "estimate_psf_blind"]

#: The first PSF estimate is the guess blurred to this many times its width on every axis: blind
#: RL narrows a too-wide PSF to what the data show but does not widen a too-narrow one (see the
#: module's Notes). 3 starts wide of the truth for guesses down to a third of the true width.
START_WIDTH = 3.0

#: Standard deviation, in voxels, of the Gaussian that smooths each PSF correction: it stops the
#: PSF growing a spike at its centre (see the module's Notes). 2 made one widefield PSF's FWHM
#: 35% too wide; 1.2 leaves it 9-15% narrow, and Gaussian PSFs within 6.5%.
PSF_SMOOTHING = 1.2

#: Object sums at PSF offsets below this fraction of the largest are not trusted (the PSF step
#: divides by them).
_TINY = 1e-12


class BlindResult(NamedTuple):
    """What :func:`estimate_psf_blind` returns.

    Attributes
    ----------
    image : array
        The restored image: float32, non-negative, the input image's shape and array type.
    psf : array
        The estimated PSF: float32, non-negative, sums to 1, the guess's shape (zero outside
        ``psf_mask``), centre at index ``n // 2``, the input image's array type.
    """

    image: Any
    psf: Any


def blind_richardson_lucy(
    image: Any,
    psf: Any,
    num_iter: int = 30,
    *,
    image_iter: int = 4,
    psf_iter: int = 2,
    psf_mask: Any = None,
    psf_smoothing: float = PSF_SMOOTHING,
    accelerate: bool = False,
    boundary: Boundary = "non-circulant",
    background: Any = 0.0,
    tol: float | None = None,
    callback: Callable[..., bool | None] | None = None,
    device: str = "auto",
    progress: bool = False,
):
    """Restore ``image`` with blind Richardson–Lucy, the PSF estimated along with it.

    The restored image of :func:`estimate_psf_blind`; call that function for the PSF as well.
    All parameters are as there.

    Returns
    -------
    array
        float32 estimate, non-negative, same shape and array type as ``image``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> truth = md.data.phantom((64, 64), seed=1, beads=20)
    >>> blurred = md.convolve(truth, md.psf.gaussian((13, 13), 2.0), device="cpu")
    >>> guess = md.psf.gaussian((13, 13), 1.2)  # 40% too narrow
    >>> from microdecon.restore.blind import blind_richardson_lucy
    >>> restored = blind_richardson_lucy(blurred, guess, 20, device="cpu")
    >>> bool(md.metrics.psnr(truth, restored) > md.metrics.psnr(truth, blurred) + 3)
    True

    Notes
    -----
    Restored tile by tile (:mod:`microdecon.tiling`), the PSF is estimated once, on a
    representative region, and every tile is restored with it by :func:`richardson_lucy`
    (``num_iter * image_iter`` iterations), so that all tiles use the same model.
    """

    def estimate(tol=tol, callback=callback, progress=progress):
        return estimate_psf_blind(
            image,
            psf,
            num_iter,
            image_iter=image_iter,
            psf_iter=psf_iter,
            psf_mask=psf_mask,
            psf_smoothing=psf_smoothing,
            accelerate=accelerate,
            boundary=boundary,
            background=background,
            tol=tol,
            callback=callback,
            device=device,
            progress=progress,
        )

    if in_force():
        estimated = shared("blind.psf", lambda: estimate(None, None, False).psf)
        return richardson_lucy(
            image,
            estimated,
            num_iter * image_iter,
            accelerate=accelerate,
            boundary=boundary,
            background=background,
            tol=tol,
            callback=callback,
            device=device,
            progress=progress,
        )
    return estimate().image


def estimate_psf_blind(
    image: Any,
    psf: Any,
    num_iter: int = 30,
    *,
    image_iter: int = 4,
    psf_iter: int = 2,
    psf_mask: Any = None,
    psf_smoothing: float = PSF_SMOOTHING,
    accelerate: bool = False,
    boundary: Boundary = "non-circulant",
    background: Any = 0.0,
    tol: float | None = None,
    callback: Callable[..., bool | None] | None = None,
    device: str = "auto",
    progress: bool = False,
) -> BlindResult:
    """Estimate the PSF and the restored image together with blind Richardson–Lucy.

    Parameters
    ----------
    image : array_like
        1-D, 2-D or 3-D (or more) image, any real dtype; NumPy, CuPy or anything ``np.asarray``
        takes. Negative values are treated as zero. Blind estimation needs sharp structure
        (beads, filaments, edges) along every axis: along an axis without it, the PSF stays near
        its (wide) start.
    psf : array_like
        The PSF guess, e.g. from :func:`microdecon.psf.gaussian` or
        :func:`microdecon.psf.widefield`: one axis per image axis, centre at index ``n // 2``,
        non-negative. Its shape is the support of the estimate (the PSF is zero outside it): make
        it large enough for the true PSF's light, and no larger than the image on any axis. Its
        width sets only the start (see Notes): half to twice the true width end alike.
    num_iter : int, >= 0
        Most outer iterations to run; each is ``image_iter`` image steps and then ``psf_iter``
        PSF steps. 20-50 is typical; like RL's iteration count it trades sharpness for noise.
    image_iter, psf_iter : int, >= 1
        Image and PSF steps per outer iteration. Fewer PSF steps (``psf_iter=1``) suit PSFs
        with most of their light outside the core (widefield); more, accelerated image steps
        (``image_iter=8, accelerate=True``) suit objects that are mostly isolated points (bead
        slides); see Notes.
    psf_mask : array_like of bool, optional
        Of ``psf``'s shape: where the PSF may be non-zero (e.g. a cylinder or a double cone in
        3-D). It must include the centre. Default: the whole support.
    psf_smoothing : float, >= 0
        Standard deviation, in voxels, of the Gaussian that smooths each PSF correction; 0 turns
        it off. The default, 1.2, suits PSFs sampled at or near Nyquist (a core 2-5 voxels wide).
    accelerate : bool
        Biggs–Andrews extrapolation of the image steps (restarted whenever the PSF changes).
        Off by default: the sharper, noisier object it gives makes the PSF a little too wide.
    boundary : {"non-circulant", "periodic", "reflect"}
        How the object continues past the image edges; see :mod:`microdecon.operators`.
    background : float or array_like, >= 0
        Additive background in image units; part of the forward model ``h * x + background``.
    tol : float > 0, optional
        Stop once an outer iteration changes the image estimate by less than ``tol`` relative to
        its size. Costs one image-sized copy.
    callback : callable, optional
        ``callback(iteration, estimate)`` after each outer iteration, with the image-shaped image
        estimate on the compute device (valid only during the call); return ``True`` to stop. A
        third parameter receives an :class:`~microdecon.restore.IterationInfo`, whose
        ``i_divergence`` is that of the data from the model made by the new image and the PSF
        the iteration started with.
    device : {"auto", "cpu", "gpu", "gpu:N"}
        Where to compute; "auto" takes a GPU when one is usable, else the CPU.
    progress : bool
        Show a progress bar (tqdm; renders in Jupyter).

    Returns
    -------
    BlindResult
        ``(image, psf)``: the restored image (float32, non-negative, ``image``'s shape) and the
        estimated PSF (float32, non-negative, sums to 1, ``psf``'s shape, zero outside
        ``psf_mask``), both of ``image``'s array type.

    Notes
    -----
    With data ``y``, object ``x``, PSF ``h`` and background ``b``, each outer iteration takes
    ``image_iter`` RL steps of the object and then ``psf_iter`` RL steps of the PSF (Fish et al.
    1995):

    .. math::

        x \\leftarrow \\frac{x}{H^T 1} \\, H^T \\frac{y}{H x + b}, \\qquad
        h \\leftarrow P\\left[h \\, S\\left(\\frac{X^T (y / (X h + b))}{X^T 1}\\right)\\right]

    ``H`` blurs by ``h``, ``X`` convolves by the object; ``S`` is the smoothing by
    ``psf_smoothing``, and ``P`` clips at zero, zeroes the PSF outside its support and mask and
    scales it to sum 1. The PSF starts as the guess blurred to three times its width on every
    axis (its width read as the FWHM of its profile through the peak), because blind RL
    narrows a too-wide PSF to what the data show but does not widen a too-narrow one. Why each
    choice, with measurements, is in :mod:`microdecon.restore.blind`.

    Measured on the phantoms of the test suite with Poisson noise: from Gaussian guesses half to
    twice the true width, second-moment widths within 6.5% of the truth on every axis with 20
    photons per unit of intensity (12% narrow at 5 photons from a guess half the true width); a
    widefield PSF's FWHM 8-23% narrow (``psf_iter=1``: -14% to +3%). Sparse points (a spike
    train) need a sharper object: 16% narrow with the defaults, 4% with ``image_iter=8,
    accelerate=True``. A background the model is not told about widens the PSF (25% for a
    background of 4% of the blurred data's peak), and a large one, even modelled, lowers the
    effective signal to noise: at 20% of the peak the core comes out narrower and the wings
    heavier (second moment +11%). Like every
    blind method this cannot tell a shift of the PSF from the opposite shift of the object: the
    estimate's centre may move by a fraction of a voxel.

    An outer iteration costs about 30 FFTs of the padded grid, as much as 7 RL iterations
    (30 outer iterations on a 32 x 128 x 128 stack: 1.8 s, against 0.25 s for 30 plain RL
    iterations, on two CPU cores).

    References
    ----------
    .. [1] D. A. Fish, A. M. Brinicombe, E. R. Pike and J. G. Walker, "Blind deconvolution by
           means of the Richardson-Lucy algorithm", JOSA A 12 (1995).
    .. [2] B. W. Silverman, M. C. Jones, J. D. Wilson and D. W. Nychka, "A smoothed EM approach
           to indirect estimation problems", J. R. Statist. Soc. B 52 (1990).

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> from microdecon.restore.blind import estimate_psf_blind
    >>> rng = np.random.default_rng(0)
    >>> truth = md.data.phantom((64, 64), seed=1, beads=20)
    >>> blurred = md.convolve(truth, md.psf.gaussian((13, 13), 2.0), device="cpu")
    >>> noisy = rng.poisson(20 * blurred.clip(0)).astype(np.float32) / 20
    >>> guess = md.psf.gaussian((13, 13), 3.0)  # 50% too wide
    >>> image, psf = estimate_psf_blind(noisy, guess, device="cpu")
    >>> psf.shape, round(float(psf.sum()), 4), bool(psf.min() >= 0)
    ((13, 13), 1.0, True)
    >>> offsets = np.arange(13) - 6  # the recovered width, from the second moment along x
    >>> round(float(np.sqrt((psf.sum(axis=0) * offsets**2).sum())), 1)
    1.9
    """
    image = _validate.check_array(image, "image")
    psf = _validate.check_psf(psf, image.ndim)
    if any(p > n for p, n in zip(psf.shape, image.shape)):
        raise ValueError(
            f"psf of shape {tuple(psf.shape)} is larger than the image {tuple(image.shape)}: its shape is "
            "the support of the estimated PSF, which the image must cover; crop the guess"
        )
    num_iter = _validate.check_int(num_iter, "num_iter", minimum=0)
    if isinstance(accelerate, str) and accelerate != "biggs-andrews":
        raise ValueError(
            f"accelerate must be True, False or 'biggs-andrews' for blind RL, got {accelerate!r} "
            "(conjugate gradients are richardson_lucy's)"
        )
    if not isinstance(accelerate, (bool, np.bool_, str)):
        raise TypeError(f"accelerate must be a bool or 'biggs-andrews', got {type(accelerate).__name__}")
    image_iter = _validate.check_int(image_iter, "image_iter", minimum=1)
    psf_iter = _validate.check_int(psf_iter, "psf_iter", minimum=1)
    mask = _check_mask(psf_mask, tuple(psf.shape))
    psf_smoothing = _validate.check_float(psf_smoothing, "psf_smoothing")
    _validate.check_choice(boundary, "boundary", _validate.BOUNDARIES)
    background = _validate.check_background(background, tuple(image.shape))
    rule = StoppingRule(tol, callback)
    backend = get_backend(image, psf, device=device)
    start = _widened(np.asarray(backend.to_host(psf), dtype=np.float64), START_WIDTH, mask)
    with backend.activate():
        solver = _BlindRichardsonLucy(image, start, mask, boundary, background, backend, psf_smoothing)
        result, estimate = solver.run(num_iter, image_iter, psf_iter, bool(accelerate), bool(progress), rule)
    return BlindResult(return_like(result, image, backend), return_like(estimate, image, backend))


def _check_mask(psf_mask: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """The support mask as a host bool array of the PSF's shape, or None for the whole support."""
    if psf_mask is None:
        return None
    mask = np.asarray(psf_mask.get() if hasattr(psf_mask, "get") else psf_mask)
    if mask.dtype.kind != "b":
        raise TypeError(f"psf_mask must be a boolean array, got dtype {mask.dtype}")
    if mask.shape != shape:
        raise ValueError(f"psf_mask has shape {mask.shape}, but the psf has shape {shape}")
    centre = tuple(n // 2 for n in shape)
    if not mask[centre]:
        raise ValueError(f"psf_mask must include the PSF's centre, index {centre}")
    return mask


def _half_maximum_width(profile: np.ndarray, peak: int) -> float:
    """Full width at half maximum of a 1-D profile around ``peak``, by linear interpolation.

    A profile that stays above half its maximum to an end counts to that end (plus half a voxel).
    """
    half = 0.5 * profile[peak]
    reach = []
    for direction in (-1, 1):
        i = peak
        while 0 <= i + direction < len(profile) and profile[i + direction] > half:
            i += direction
        j = i + direction
        if 0 <= j < len(profile):
            # the crossing lies between i (above half) and j (at or below it)
            reach.append(abs(i - peak) + (profile[i] - half) / (profile[i] - profile[j]))
        else:
            reach.append(abs(i - peak) + 0.5)
    return float(sum(reach))


def _widened(guess: np.ndarray, factor: float, mask: np.ndarray | None) -> np.ndarray:
    """The guess blurred by a Gaussian to ``factor`` times its width on each axis, inside the support.

    The width is the FWHM of the profile through the guess's peak (robust to the rings and the
    out-of-focus cone of a widefield PSF, which would dominate a second moment).
    """
    from scipy import ndimage

    if mask is not None:
        guess = guess * mask
    if guess.sum() <= 0:
        raise ValueError("psf has no light inside psf_mask")
    peak = np.unravel_index(int(np.argmax(guess)), guess.shape)
    sigmas = []
    for axis in range(guess.ndim):
        line = list(peak)
        line[axis] = slice(None)
        width = _half_maximum_width(guess[tuple(line)], peak[axis]) / (2 * np.sqrt(2 * np.log(2)))
        sigmas.append(np.sqrt(factor**2 - 1) * width)
    # zeros beyond the support: the blur's light that leaves it is dropped, not folded back
    start = ndimage.gaussian_filter(guess, sigmas, mode="constant", truncate=5.0)
    if mask is not None:
        start *= mask
    return start / start.sum()


class _BlindRichardsonLucy:
    """State of one blind RL run: the data, the object and the PSF on the device, and the PSF step's
    transforms."""

    def __init__(
        self,
        image: Any,
        psf: np.ndarray,
        mask: np.ndarray | None,
        boundary: str,
        background,
        be: Backend,
        smoothing: float = PSF_SMOOTHING,
    ):
        xp = be.xp
        self.be, self.xp, self.boundary = be, xp, boundary
        self.image_shape = tuple(image.shape)
        # As in RL: the data stay in their own dtype, and the work runs at unit scale.
        _load_poisson_data(self, be, image, background)
        self.psf = be.asarray(psf)
        self.mask = None if mask is None else be.asarray(mask, dtype=np.float32)
        self.smoothing = None
        if smoothing > 0:
            # sampled Gaussian to 3 sigma, one per axis (an axis the support has one voxel on needs none)
            reach = max(1, int(np.ceil(3 * smoothing)))
            taps = np.exp(-0.5 * (np.arange(-reach, reach + 1) / smoothing) ** 2)
            self.smoothing = [taps / taps.sum() if n > 1 else np.ones(1) for n in psf.shape]
        self.op = self._operator()
        self.fft_shape = self.op.fft_shape
        self.image_slices = self.op.image_slices
        self.plan = be.fft_plan(self.fft_shape)
        # Where each PSF voxel sits on the FFT grid: offset k - n // 2 from the origin, wrapped.
        self.support_index = xp.ix_(
            *[xp.asarray((np.arange(p) - p // 2) % n) for p, n in zip(self.psf.shape, self.fft_shape)]
        )
        # Reflect mode: buffer position q shows image index reflect(q - left) (half-sample
        # symmetric), over the extent n + p - 1, as the operator's mirror extension does.
        self.mirror_index = None
        if boundary == "reflect":
            self.mirror_index = []
            for window, n, p in zip(self.image_slices, self.image_shape, self.psf.shape):
                j = np.mod(np.arange(n + p - 1) - window.start, 2 * n)
                self.mirror_index.append(xp.asarray(np.where(j < n, j, 2 * n - 1 - j)))

    # ---- the image steps -------------------------------------------------------------------
    def _operator(self) -> Convolution:
        return Convolution(self.psf, self.image_shape, boundary=self.boundary, backend=self.be)

    def initial_estimate(self, normalization):
        """As RL's (:func:`~.richardson_lucy.first_estimate`); its mean is not shared by tiles."""
        return first_estimate(self, self.op, normalization)

    def image_steps(self, current, count: int, normalization, accelerate: bool, buffers):
        """``count`` RL steps of the image with the PSF fixed; the extrapolation restarts here, as
        the last steps were taken with another PSF."""
        be, op = self.be, self.op
        if not accelerate:
            for _ in range(count):
                correction = self._correction(op.forward(current))
                be.rl_update(current, correction, normalization, current)
            return
        step, update_prev, predicted = buffers
        alpha, have_update = 0.0, False
        for _ in range(count):
            be.predict(current, step if have_update else None, alpha, predicted)
            correction = self._correction(op.forward(predicted))
            cross, norm = be.rl_accelerated_update(
                current, step, alpha, correction, normalization, update_prev, have_update
            )
            if have_update:
                alpha = _extrapolation_weight(cross, norm)
            have_update = True

    def _correction(self, blurred):
        """``H^T (y / (H x + b))`` from the blurred estimate the operator just returned."""
        self.be.rl_ratio(
            self.image, blurred, self.background, self.floor, self.image_scale, self.image_has_negatives
        )
        return self.op.adjoint()

    # ---- the PSF steps ---------------------------------------------------------------------
    def _grid(self):
        """A zeroed real FFT-grid array that the plan's forward transform may consume."""
        grid = getattr(self.plan, "real", None)
        if grid is None:
            grid = self.be.empty(self.fft_shape)
        grid[...] = 0
        return grid

    def _extended_object(self, current):
        """The object as the blur sees it on the FFT grid: the estimate itself ("non-circulant",
        "periodic"), or the image-shaped estimate mirrored over the extent and zero beyond
        ("reflect")."""
        if self.mirror_index is None:
            return current
        xp = self.xp
        extended = current
        for axis, index in enumerate(self.mirror_index):
            extended = xp.take(extended, index, axis=axis)
        grid = self._grid()
        grid[tuple(slice(0, n) for n in extended.shape)] = extended
        return grid

    def _correlate(self, grid, spectrum_of_object):
        """``X^T grid``: the grid's correlation with the object, at the PSF's support offsets."""
        spectrum = self.plan.forward(grid)
        self.be.multiply_spectrum(spectrum, spectrum_of_object, True)
        return self.plan.inverse(spectrum)[self.support_index]

    def _smooth(self, correction):
        """The correction convolved with the smoothing Gaussian, axis by axis; the support's edge
        values continue past it, so that a flat correction (1: the PSF fits) stays flat."""
        xp = self.xp
        for axis, kernel in enumerate(self.smoothing):
            reach = (len(kernel) - 1) // 2
            n = correction.shape[axis]
            pad = [(0, 0)] * correction.ndim
            pad[axis] = (reach, reach)
            padded = xp.pad(correction, pad, mode="edge")
            out = xp.zeros_like(correction)
            for offset, weight in enumerate(kernel):
                index = [slice(None)] * correction.ndim
                index[axis] = slice(offset, offset + n)
                out += np.float32(weight) * padded[tuple(index)]
            correction = out
        return correction

    def object_spectrum(self, current):
        """The spectrum of the object as the blur sees it, scaled by ``1 / prod(fft_shape)`` so that
        an unnormalized transform pair needs no further scaling (a new array)."""
        scale = np.float32(1.0 / float(np.prod(self.fft_shape, dtype=np.float64)))
        return self.plan.forward(self._extended_object(current)) * scale  # a copy: plans reuse buffers

    def psf_forward(self, psf, object_spectrum):
        """``X h``: the PSF convolved with the object, on the FFT grid (the image window holds the
        blurred image without background; scratch memory the next transform may overwrite)."""
        grid = self._grid()
        grid[self.support_index] = psf
        spectrum = self.plan.forward(grid)
        self.be.multiply_spectrum(spectrum, object_spectrum, False)
        return self.plan.inverse(spectrum)

    def psf_steps(self, current, count: int, want_divergence: bool):
        """``count`` RL steps of the PSF with the object fixed; returns the I-divergence of the data
        from the first step's model when asked (else None)."""
        xp, be = self.xp, self.be
        object_spectrum = self.object_spectrum(current)
        # X^T 1: how much object light each PSF offset carries into the image window
        if self.boundary == "periodic":
            reach = None  # the same for every offset: the object's sum, which the sum-1 scaling absorbs
        else:
            window = self._grid()
            window[self.image_slices] = 1
            reach = self._correlate(window, object_spectrum)
            xp.maximum(reach, np.float32(_TINY * max(float(reach.max()), 0.0) + 1e-30), out=reach)
        divergence = None
        psf = self.psf
        for k in range(count):
            model_grid = self.psf_forward(psf, object_spectrum)
            model = model_grid[self.image_slices]
            if want_divergence and k == 0:
                data = xp.multiply(self.image, self.image_scale, dtype=np.float32)
                divergence = i_divergence(data, model + self.background) * self.scale
                del data
            be.rl_ratio(
                self.image, model, self.background, self.floor, self.image_scale, self.image_has_negatives
            )
            self.op.fill_outside_image(model_grid)  # the ratio lives on the image window only
            correlation = self._correlate(model_grid, object_spectrum)
            if reach is not None:
                correlation /= reach
            if self.smoothing is not None:
                correlation = self._smooth(correlation)
            psf = psf * correlation
            xp.maximum(psf, 0, out=psf)
            if self.mask is not None:
                psf *= self.mask
            total = float(psf.sum())
            if not total > 0:  # no light left (an empty image): keep the last PSF
                break
            psf *= np.float32(1 / total)
            self.psf = psf
        return divergence

    # ---- the run ---------------------------------------------------------------------------
    def run(self, num_iter: int, image_iter: int, psf_iter: int, accelerate: bool, progress: bool, rule):
        from tqdm.auto import tqdm

        be = self.be
        normalization = normalization_of(self.op)
        current = self.initial_estimate(normalization)
        buffers = None
        if accelerate:
            shape = current.shape
            buffers = (be.empty(shape, np.uint16), be.empty(shape, np.uint16), be.empty(shape))
        with tqdm(total=num_iter, desc="Blind Richardson-Lucy", disable=not progress, leave=False) as bar:
            for iteration in range(1, num_iter + 1):
                previous = self.op.restrict(current).copy() if rule.needs_change else None
                if iteration > 1:  # the PSF changed: a new blur, and a new H^T 1
                    self.op = None  # let the old operator's buffers go first (peak memory)
                    self.op = self._operator()
                    normalization = normalization_of(self.op)
                self.image_steps(current, image_iter, normalization, accelerate, buffers)
                divergence = self.psf_steps(current, psf_iter, rule.needs_divergence)
                bar.update()
                change = None
                if previous is not None:
                    change = _relative_change(self.op.restrict(current), previous, self.xp)
                estimate = lambda: self.in_image_units(current)  # noqa: E731 - made only if asked for
                if rule(iteration, estimate, change=change, divergence=divergence):
                    break
        del buffers
        return self.in_image_units(current), self.xp.array(self.psf, dtype=np.float32, copy=True)

    def in_image_units(self, estimate):
        """The image-shaped part of an estimate in the image's units, clipped at zero (a new array)."""
        result = self.op.restrict(estimate) * np.float32(self.scale)
        return self.xp.maximum(result, 0, out=result)
