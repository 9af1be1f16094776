"""FFT convolution with a PSF as a linear operator: the blur, its exact adjoint, and boundaries.

A :class:`Convolution` is built once per PSF, image shape, boundary mode and device. It computes
the OTF once (on fast FFT lengths), keeps it on the device and reuses one FFT plan, so iterative
algorithms pay only for their transforms. ``forward`` and ``adjoint`` are exact transposes of
each other in every boundary mode (a dot-product test in the suite checks this).

Boundary modes
--------------
``"periodic"``
    The image is one period of a periodic object: plain circular convolution on the image grid.
``"reflect"``
    The object is the image mirrored at its edges (half-sample symmetric, like
    ``scipy.ndimage``'s ``"reflect"``): ``forward = crop . circular-convolve . mirror-extend``.
``"non-circulant"`` (default)
    The object lives on a larger domain than the image, extending past each edge by the PSF's
    reach, and only the image's window of its blur is observed (Bertero & Boccacci 2005). The
    estimate therefore has ``object_shape = image_shape + psf_shape - 1`` (rounded up to a fast
    FFT length), and objects at the border are restored without wrap-around or ringing. As an
    image-to-image operator (``convolve``), it is linear convolution with zeros outside the image,
    which is ``scipy.signal.fftconvolve(x, psf, mode="same")`` for odd PSF sizes.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from . import _validate
from ._backend import Backend, get_backend, return_like
from ._tile_model import reused, setting, shared

Boundary = Literal["non-circulant", "periodic", "reflect"]

__all__ = ["Convolution", "convolve", "convolve_transpose"]


@dataclass(frozen=True)
class _Run:
    """A stretch of buffer positions [start, stop) copied from core positions src_start... (step ±1)."""

    start: int
    stop: int
    src_start: int
    step: int


def _reflect_runs(length: int, n: int, left: int) -> list[_Run]:
    """Runs of buffer positions 0..length-1 outside the core [left, left + n) that mirror the core.

    Buffer position q shows image index reflect(q - left) with half-sample symmetry (period 2n).
    """
    q = np.arange(length)
    j = np.mod(q - left, 2 * n)
    source = np.where(j < n, j, 2 * n - 1 - j) + left
    outside = (q < left) | (q >= left + n)
    runs: list[_Run] = []
    i = 0
    while i < length:
        if not outside[i]:
            i += 1
            continue
        start = i
        step = 0
        i += 1
        while i < length and outside[i]:
            delta = source[i] - source[i - 1]
            if delta not in (1, -1) or (step and delta != step):
                break
            step = int(delta)
            i += 1
        runs.append(_Run(start, i, int(source[start]), step or 1))
    return runs


def _along(axis: int, ndim: int, index: slice) -> tuple[slice, ...]:
    """Index tuple selecting ``index`` on ``axis`` and everything on the other axes."""
    full = [slice(None)] * ndim
    full[axis] = index
    return tuple(full)


def _mirror_runs(
    grid, runs: list[_Run], prefix: tuple[slice, ...], rest: tuple[slice, ...], *, transpose: bool = False
) -> None:
    """Fill the runs of one axis from the core they mirror; with ``transpose``, add them back onto it.

    ``prefix`` and ``rest`` select, on the axes before and after this one, where to work.
    """
    for run in runs:
        margin = prefix + (slice(run.start, run.stop),) + rest
        core = prefix + (_source_slice(run),) + rest
        if transpose:
            grid[core] += grid[margin]
        else:
            grid[margin] = grid[core]


def _source_slice(run: _Run) -> slice:
    length = run.stop - run.start
    if run.step == 1:
        return slice(run.src_start, run.src_start + length)
    stop = run.src_start - length
    return slice(run.src_start, stop if stop >= 0 else None, -1)


def _wrapped_kernel(psf: np.ndarray, shape: tuple[int, ...], backend: Backend):
    """The PSF on an FFT grid of ``shape``, centre (index n // 2) at the origin, on the device.

    Axes where the PSF is longer than the grid are folded first (summing what wraps onto the
    same place, as circular convolution does). Then the PSF's quadrants are copied to the grid's
    corners: only the small PSF is handled on the host, and the grid is made once, in float32.
    """
    folded = psf
    centre = [p // 2 for p in psf.shape]
    for axis, length in enumerate(shape):
        p = folded.shape[axis]
        if p <= length:
            continue
        new_shape = list(folded.shape)
        new_shape[axis] = length
        out = np.zeros(new_shape, dtype=np.float64)
        index = [slice(None)] * folded.ndim
        index[axis] = np.mod(np.arange(p) - p // 2, length)
        np.add.at(out, tuple(index), folded)
        folded, centre[axis] = out, 0  # already centred at the origin on this axis
    folded = backend.asarray(folded, dtype=np.float32)
    grid = backend.empty(shape)
    grid[...] = 0
    pieces = []
    for n, c, length in zip(folded.shape, centre, shape):
        # [c, n) goes to the start of the grid, [0, c) wraps to its end
        pieces.append([(slice(c, n), slice(0, n - c)), (slice(0, c), slice(length - c, length))])
    for choice in itertools.product(*pieces):
        source = tuple(src for src, _ in choice)
        target = tuple(dst for _, dst in choice)
        if all(s.stop > s.start for s in source):
            grid[target] = folded[source]
    return grid


def _window_spectrum(shape: tuple[int, ...], window: tuple[slice, ...], backend: Backend, out: Any) -> Any:
    """The real FFT (unnormalized, as the plans' forward) of the indicator of ``window`` on a grid
    of ``shape``, into ``out`` (complex64, the last axis halved): the outer product of the
    transforms of the window's sides, made on the host in float64 (small) and multiplied out
    on the device in one pass."""
    factors = []
    for axis, (length, side) in enumerate(zip(shape, window)):
        indicator = np.zeros(length)
        indicator[side] = 1.0
        transform = np.fft.rfft(indicator) if axis == len(shape) - 1 else np.fft.fft(indicator)
        factors.append(transform.reshape([-1 if a == axis else 1 for a in range(len(shape))]))
    leading = np.ones((1,) * len(shape), np.complex128)
    for factor in factors[:-1]:  # all axes but the last: an array the size of one grid plane
        leading = leading * factor
    xp = backend.xp
    return xp.multiply(
        xp.asarray(leading.astype(np.complex64)), xp.asarray(factors[-1].astype(np.complex64)), out=out
    )


def _is_point_symmetric(psf: np.ndarray) -> bool:
    """Whether psf[c + d] == psf[c - d] for every offset d (c = n // 2), to 1e-6 of its peak."""
    pad = []
    for n in psf.shape:
        left, right = n // 2, n - 1 - n // 2
        reach = max(left, right)
        pad.append((reach - left, reach - right))
    centred = np.pad(psf, pad)
    return bool(np.abs(centred - centred[(slice(None, None, -1),) * psf.ndim]).max() <= 1e-6 * psf.max())


class Convolution:
    """Blur by a PSF, and its exact adjoint, for one image shape, boundary mode and device.

    Parameters
    ----------
    psf : array_like
        Point spread function, any size (odd or even, smaller or larger than the image), centre
        at index ``n // 2`` on each axis. Normalized to sum 1 here.
    image_shape : tuple of int
        Shape of the observed image.
    boundary : {"non-circulant", "periodic", "reflect"}
        How the object continues past the image edges (see the module docstring).
    backend : Backend, optional
        Device to run on; the CPU when omitted.
    margin : int
        The FFT grid extends past the image by ``margin * (psf_shape - 1)`` (rounded up to a fast
        length; "non-circulant" and "reflect"). 1 suffices for the operator to be exact; the
        one-pass filters ask for 2, so that what their long inverse kernels pick up across the
        grid's wrap-around is far away, and alike for a whole volume and its tiles.

    Attributes
    ----------
    object_shape : tuple of int
        Shape of the estimate the operator acts on (larger than the image for "non-circulant").
    fft_shape : tuple of int
        Shape of the FFTs (fast lengths).
    image_slices : tuple of slice
        Where the image sits inside the FFT grid.
    otf : array
        Half-spectrum OTF on the FFT grid, scaled by ``1 / prod(fft_shape)`` so that an
        unnormalized forward and inverse transform pair needs no further scaling. Real (float32)
        when the PSF is symmetric about its centre, complex64 otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> op = Convolution(np.ones((3, 3)), (8, 8), boundary="periodic")
    >>> y = op.forward(np.ones((8, 8), np.float32))
    >>> float(y.mean())
    1.0
    """

    def __init__(
        self,
        psf: Any,
        image_shape: tuple[int, ...],
        *,
        boundary: Boundary = "non-circulant",
        backend: Backend | None = None,
        margin: int = 1,
    ):
        _validate.check_choice(boundary, "boundary", _validate.BOUNDARIES)
        self.backend = backend or get_backend(device="cpu")
        self.boundary = boundary
        self.image_shape = tuple(_validate.check_int(n, "image_shape", minimum=1) for n in image_shape)
        psf = _validate.check_psf(psf, len(self.image_shape))
        psf_host = np.asarray(self.backend.to_host(psf), dtype=np.float64)
        self.psf_shape = psf_host.shape
        psf_host = psf_host / psf_host.sum()
        ndim = len(self.image_shape)

        if boundary == "periodic":
            fft_shape = self.image_shape
            left = (0,) * ndim
        else:
            # The blur reaches (p - 1 - p // 2) pixels to one side and p // 2 to the other: an FFT
            # grid of n + p - 1 holds the image and all the object that can reach it, without wrap.
            last = len(self.image_shape) - 1
            # Tiles of one volume share one grid, that of the largest: one FFT plan for all
            # (FFTW measures each new shape, which costs seconds), the same numbers at the edges.
            sizes = setting("tile.largest_shape") or self.image_shape
            if len(sizes) != ndim:
                sizes = self.image_shape
            fft_shape = tuple(
                self.backend.next_fast_len(max(n, s) + margin * (p - 1), even=axis == last)
                for axis, (n, s, p) in enumerate(zip(self.image_shape, sizes, self.psf_shape))
            )
            left = tuple(p - 1 - p // 2 for p in self.psf_shape)
        self.fft_shape = fft_shape
        self.fft_scale = 1.0 / float(np.prod(fft_shape, dtype=np.float64))
        self.image_slices = tuple(slice(a, a + n) for a, n in zip(left, self.image_shape))
        self.extent = tuple(n + p - 1 for n, p in zip(self.image_shape, self.psf_shape))
        self.object_shape = fft_shape if boundary == "non-circulant" else self.image_shape
        self._runs = (
            [_reflect_runs(e, n, a) for e, n, a in zip(self.extent, self.image_shape, left)]
            if boundary == "reflect"
            else None
        )

        self.plan = self.backend.fft_plan(fft_shape)
        # The tiles of a volume share the PSF and the grid: one OTF serves them all (read only)
        digest = hashlib.blake2b(psf_host.tobytes(), digest_size=16).hexdigest()
        self.otf_key = ("otf", self.backend.name, self.backend.device_id, fft_shape, psf_host.shape, digest)
        self.otf = reused(self.otf_key, lambda: self._make_otf(psf_host))
        self._work = None  # the last transform's output: scratch for the next one

    def _make_otf(self, psf_host: np.ndarray):
        xp = self.backend.xp
        kernel = _wrapped_kernel(psf_host, self.fft_shape, self.backend)
        spectrum = self.plan.forward(kernel)
        del kernel
        scale = np.float32(self.fft_scale)
        if _is_point_symmetric(psf_host):
            # A PSF symmetric about its centre has a real OTF: keep half the memory, and the
            # adjoint's conjugation is free. Scaled as it is copied out of the spectrum: one pass.
            return xp.multiply(spectrum.real, scale)
        # keep the spectrum as the OTF, unless the plan will overwrite it
        otf = xp.array(spectrum, copy=True) if self.plan.reuses_buffers else spectrum
        otf *= scale
        return otf

    # ---- buffers ----------------------------------------------------------------------------
    def _grid_buffer(self):
        """A writable FFT-grid real array that the next transform may consume."""
        own = getattr(self.plan, "real", None)
        if own is not None:
            return own
        if self._work is not None:  # the last inverse output is scratch by now
            return self._work
        return self.backend.empty(self.fft_shape)

    def fill_outside_image(self, grid, value: float = 0.0) -> None:
        """Set every FFT-grid voxel outside the image's window to ``value``, in place."""
        if self.boundary == "periodic":
            return
        ndim = grid.ndim
        for axis, window in enumerate(self.image_slices):
            grid[_along(axis, ndim, slice(0, window.start))] = value
            grid[_along(axis, ndim, slice(window.stop, None))] = value

    def _mirror_extend(self, x, grid):
        """grid <- x mirrored past the image edges over the extent, zero beyond (reflect mode)."""
        ndim = grid.ndim
        for axis, extent in enumerate(self.extent):
            grid[_along(axis, ndim, slice(extent, None))] = 0
        grid[self.image_slices] = x
        # Axis by axis: each pass mirrors what the passes before it filled, so the corners fill too.
        for axis, runs in enumerate(self._runs):
            prefix = tuple(slice(0, e) for e in self.extent[:axis])
            _mirror_runs(grid, runs, prefix, tuple(self.image_slices[axis + 1 :]))
        return grid

    def _mirror_fold(self, grid):
        """Adjoint of :meth:`_mirror_extend`: add the mirrored margins back onto the image window."""
        for axis in reversed(range(grid.ndim)):
            prefix = tuple(slice(0, e) for e in self.extent[:axis])
            _mirror_runs(grid, self._runs[axis], prefix, tuple(self.image_slices[axis + 1 :]), transpose=True)
        return grid[self.image_slices]

    # ---- the operator -----------------------------------------------------------------------
    def staging_buffer(self):
        """Where to write the next :meth:`forward` input so that the transform needs no copy of it.

        The FFT's own input buffer (FFTW), or the operator's spent scratch grid (scipy.fft, CuPy),
        which the transform then releases: no grid-sized array of the caller's is kept alive.
        Valid until the next transform; None for "reflect", whose input is extended on its way in.
        """
        if self.boundary == "reflect":
            return None
        if self.plan.reuses_buffers:
            return self.plan.real
        if self._work is None:
            self._work = self.backend.empty(self.fft_shape)
        return self._work

    def forward(self, x, *, staged: bool = False):
        """Blur an object-shaped array; returns the image-shaped result.

        ``staged=True`` says ``x`` has already been written to :meth:`staging_buffer`. The result
        may be a view of scratch memory that the next call overwrites: use or copy it before
        calling the operator again.
        """
        be = self.backend
        if staged:
            source = self.staging_buffer()
        else:
            if tuple(x.shape) != self.object_shape:
                raise ValueError(f"x must have the object shape {self.object_shape}, got {tuple(x.shape)}")
            source = self._mirror_extend(x, self._grid_buffer()) if self.boundary == "reflect" else x
        spectrum = self.plan.forward(source)
        del source
        self._work = None  # let go of the last result before the inverse makes a new one
        be.multiply_spectrum(spectrum, self.otf, False)
        self._work = self.plan.inverse(spectrum)
        return self._work[self.image_slices]

    def adjoint(self, y=None):
        """Apply the transpose of :meth:`forward` to an image-shaped array.

        With ``y=None`` the image-shaped array is the one the last :meth:`forward` returned,
        modified in place by the caller (this saves a copy in iterative algorithms). The result
        may be scratch memory that the next call overwrites.
        """
        if y is None:
            grid = self._work
        else:
            if tuple(y.shape) != self.image_shape:
                raise ValueError(f"y must have the image shape {self.image_shape}, got {tuple(y.shape)}")
            grid = self._grid_buffer()
            grid[self.image_slices] = y
        self.fill_outside_image(grid)
        spectrum = self.plan.forward(grid)
        del grid
        return self._adjoint_from_spectrum(spectrum)

    def _adjoint_from_spectrum(self, spectrum):
        """The rest of :meth:`adjoint` once its grid is transformed (``spectrum``, consumed)."""
        self._work = None  # let go of the last result before the inverse makes a new one
        self.backend.multiply_spectrum(spectrum, self.otf, True)
        self._work = self.plan.inverse(spectrum)
        if self.boundary == "reflect":
            return self._mirror_fold(self._work)
        return self._work

    # ---- helpers for algorithms -------------------------------------------------------------
    def embed(self, image):
        """Image-shaped array to object-shaped: zeros around it for "non-circulant", else itself."""
        if self.boundary != "non-circulant":
            return image
        out = self.backend.xp.zeros(self.object_shape, dtype=np.float32)
        out[self.image_slices] = image
        return out

    def restrict(self, obj):
        """Object-shaped array to the image's field of view (a view; the adjoint of :meth:`embed`)."""
        if self.boundary != "non-circulant":
            return obj
        return obj[self.image_slices]

    def extend_image(self, image):
        """The image on the whole FFT grid, for direct (one-pass) filters.

        The margin holds the mirrored image, faded to the image mean within the PSF's reach of
        the edge, so the FFT sees no jump where the grid wraps around. "non-circulant" fades over
        the whole reach; "reflect" keeps the mirror intact for half of it first.
        """
        if self.boundary == "periodic":
            return image
        xp = self.backend.xp
        grid = self.backend.empty(self.fft_shape)
        grid[self.image_slices] = image
        ndim = grid.ndim
        for axis, (length, n, window) in enumerate(zip(self.fft_shape, self.image_shape, self.image_slices)):
            runs = _reflect_runs(length, n, window.start)
            _mirror_runs(grid, runs, (slice(None),) * axis, tuple(self.image_slices[axis + 1 :]))
        keep = 0.5 if self.boundary == "reflect" else 0.0
        mean = np.float32(shared("extend.mean", lambda: float(image.mean())))  # alike in every tile
        grid -= mean
        for axis, (length, window, p) in enumerate(zip(self.fft_shape, self.image_slices, self.psf_shape)):
            margin = length - (window.stop - window.start)
            if not margin:
                continue
            q = np.arange(length)
            # distance into the margin from the nearer image edge, cyclically, as a fraction of
            # the PSF's reach, (p - 1) / 2: the margin holds at least twice that, and fading over
            # a length set by the PSF alone, not by how far the FFT grid was rounded up, makes
            # the extension the same for a whole volume and for its tiles
            distance = np.minimum(np.mod(q - (window.stop - 1), length), np.mod(window.start - q, length))
            fade = min((p - 1) / 2.0, margin / 2.0) + 0.5
            fraction = np.clip((distance / fade - keep) / (1 - keep), 0, 1)
            weights = np.where(
                (q < window.start) | (q >= window.stop), 0.5 * (1 + np.cos(np.pi * fraction)), 1.0
            ).astype(np.float32)
            shape = [1] * ndim
            shape[axis] = length
            grid *= xp.asarray(weights.reshape(shape))
        grid += mean
        return grid

    def adjoint_of_ones(self, scratch: bool = False):
        """``H^T 1``: how much of each object voxel's light the image sees (RL's normalization).

        :meth:`adjoint` of an image of ones, whose embedding in the FFT grid is the indicator of
        the image's window: its transform is the outer product of the transforms of the
        window's sides, so one inverse transform makes ``H^T 1`` (10 ms less on the benchmark
        grid than transforming the indicator). ``scratch=True`` may return the operator's
        scratch memory (valid until its next transform): no copy, for a result read once.
        """
        be = self.backend
        spectrum = getattr(self.plan, "spectrum", None)  # the plan's own buffer, or a new one
        if spectrum is None:
            spectrum = be.xp.empty(self.fft_shape[:-1] + (self.fft_shape[-1] // 2 + 1,), np.complex64)
        _window_spectrum(self.fft_shape, self.image_slices, be, out=spectrum)
        result = self._adjoint_from_spectrum(spectrum)
        if self.plan.reuses_buffers or self.boundary == "reflect":  # scratch, or a view into it
            return result if scratch else self.backend.xp.array(result, copy=True)
        self._work = None  # hand the fresh array over (the GPU's): it goes when the caller is done
        return result


def _apply(x: Any, psf: Any, name: str, boundary: str, device: str, transpose: bool):
    x = _validate.check_array(x, name)
    psf = _validate.check_psf(psf, x.ndim)
    _validate.check_choice(boundary, "boundary", _validate.BOUNDARIES)
    backend = get_backend(x, psf, device=device)
    with backend.activate():  # the OTF and the plan on the chosen GPU
        op = Convolution(psf, tuple(x.shape), boundary=boundary, backend=backend)
        data = backend.asarray(x)
        result = op.restrict(op.adjoint(data)) if transpose else op.forward(op.embed(data))
        out = backend.xp.array(result, dtype=np.float32, copy=True)
    return return_like(out, x, backend)


def convolve(x: Any, psf: Any, *, boundary: Boundary = "non-circulant", device: str = "auto"):
    """Blur ``x`` by ``psf``: the forward model of deconvolution.

    Parameters
    ----------
    x : array_like
        1-D, 2-D or 3-D (or more) real array.
    psf : array_like
        PSF with as many axes as ``x``; any size; centre at ``n // 2``; normalized to sum 1.
    boundary : {"non-circulant", "periodic", "reflect"}
        ``"non-circulant"``: zeros outside ``x`` (linear convolution, cropped to ``x``'s shape);
        ``"periodic"``: circular; ``"reflect"``: mirrored edges.
    device : {"auto", "cpu", "gpu", "gpu:N"}

    Returns
    -------
    array
        float32, same shape and array type as ``x``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> x = np.zeros(7, np.float32); x[3] = 1
    >>> md.convolve(x, np.array([1.0, 2.0, 1.0]), device="cpu").round(2).tolist()
    [0.0, 0.0, 0.25, 0.5, 0.25, 0.0, 0.0]
    """
    return _apply(x, psf, "x", boundary, device, transpose=False)


def convolve_transpose(y: Any, psf: Any, *, boundary: Boundary = "non-circulant", device: str = "auto"):
    """The exact adjoint of :func:`convolve` (transposed convolution, i.e. correlation).

    ``np.vdot(convolve(x), y) == np.vdot(x, convolve_transpose(y))`` to float32 precision for
    every boundary mode.

    Parameters
    ----------
    y : array_like
        Image-shaped real array.
    psf : array_like
        The PSF given to :func:`convolve`.
    boundary : {"non-circulant", "periodic", "reflect"}
    device : {"auto", "cpu", "gpu", "gpu:N"}

    Returns
    -------
    array
        float32, same shape and array type as ``y``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> y = np.zeros(7, np.float32); y[3] = 1
    >>> (md.convolve_transpose(y, np.array([0.0, 1.0, 3.0]), device="cpu").round(2) + 0).tolist()
    [0.0, 0.0, 0.75, 0.25, 0.0, 0.0, 0.0]
    """
    return _apply(y, psf, "y", boundary, device, transpose=True)
