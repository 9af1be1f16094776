"""Volumes larger than a device: the tile plan and the Dask graph that restores tile by tile.

:func:`deconvolve` is the public entry point (``md.deconvolve``). It takes NumPy, CuPy or Dask
arrays; Dask in gives a lazy Dask array out, one task per tile, which any Dask scheduler runs
(the threaded default, ``dask.distributed`` clusters, or dask-cuda's ``LocalCUDACluster`` with one
worker per GPU, where ``device="auto"`` puts each tile on its worker's GPU).

How tiles meet without seams
----------------------------
Each tile is restored with a margin (the *overlap*) of the volume around it, and the margin is
trimmed from its result. Trimming was chosen over blending: a blend averages two restorations
that are both disturbed near their own edges, so with the same overlap it is never more exact
than taking the one whose edge is farther away, and it costs more. At the volume's own border a
tile is restored with the method's boundary mode, exactly as the whole volume is: nothing is
added past the border for ``"non-circulant"`` and ``"reflect"`` (the tile mirrors at its edge
just as the whole does), and the volume's far side for ``"periodic"``. Axes that are not split
(z, usually) need no overlap at all.

Each tile's task reads its own region, overlap included, so tiles share no input that would
have to be held until all their neighbours are done: memory is bounded by the tiles in flight,
whatever the width of the stack.

What a method measures on its input (RL's scale and extrapolation weights, an automatic Wiener
balance, blind RL's PSF, ...) is measured once, on the central tile, and applied to every tile
(:mod:`microdecon._tile_model`), so that every tile is restored under one model: the stitched
result equals the whole volume restored under that model to within 1e-3 of its maximum.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _validate
from ._tile_model import TileModel, applying, recording

__all__ = ["TilePlan", "deconvolve", "overlap_for", "plan", "tiles_at_once", "working_set_bytes"]

#: Peak memory of one run of each method, in float32 arrays the size of its FFT grid (measured
#: with tracemalloc on 3-D stacks in every boundary mode, with ~15% to spare). The tile's input
#: and output are counted apart.
WORKING_SET = {
    "rl": 7.5,
    "rl-tv": 12.0,
    "wiener": 11.0,
    "tikhonov": 11.5,
    "inverse": 5.0,
    "landweber": 5.5,
    "fista": 5.5,
    "unsupervised-wiener": 16.5,
    "blind-rl": 8.0,
}

#: Fraction of a device's free memory that a tile may plan to use: the rest is left for the
#: FFT library's work areas, the allocator's rounding and the caller.
MEMORY_FRACTION = 0.6

#: Overlap as a multiple of the PSF's half-width, per method: the distance at which the edge of
#: a tile no longer changes the restoration by 1e-3 of its maximum (measured; see
#: tests/test_tiling.py). Iterative methods spread an edge's influence further with every
#: iteration, but ever more weakly.
_ONE_PASS_REACH = {"wiener": 3.0, "tikhonov": 3.0, "unsupervised-wiener": 3.0, "inverse": 8.0}
_ITERATIVE_MIN_REACH = 3.0
_MAX_REACH = 8.0

#: Periodic tiles wrap their own artificial edges around, a jump that reaches further.
_PERIODIC_OVERLAP = 1.5


@dataclass(frozen=True)
class TilePlan:
    """How a volume is cut: tile core shape, overlap, tile counts and memory per tile.

    Examples
    --------
    >>> p = plan((64, 2048, 2048), (33, 65, 65), "rl", memory_limit="2GB")
    >>> p.tiles > 1, p.tile_shape[0]  # split in y and x, z kept whole
    (True, 64)
    """

    shape: tuple[int, ...]
    tile_shape: tuple[int, ...]
    overlap: tuple[int, ...]
    grid: tuple[int, ...]
    bytes_per_tile: int
    memory_limit: int | None
    method: str

    @property
    def tiles(self) -> int:
        """Number of tiles."""
        return math.prod(self.grid)

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """Dask chunks of the tile cores."""
        return tuple(_regular_chunks(n, t) for n, t in zip(self.shape, self.tile_shape))

    def __str__(self) -> str:
        size = " x ".join(map(str, self.shape))
        if self.tiles == 1:
            return f"{size}: one piece, {_human(self.bytes_per_tile)} for {self.method}"
        return (
            f"{size}: {self.tiles} tiles ({' x '.join(map(str, self.grid))}) of "
            f"{' x '.join(map(str, self.tile_shape))} + overlap {' x '.join(map(str, self.overlap))}, "
            f"{_human(self.bytes_per_tile)} per tile for {self.method}"
            + (f" (limit {_human(self.memory_limit)})" if self.memory_limit else "")
        )


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def _regular_chunks(n: int, size: int) -> tuple[int, ...]:
    """Chunks of ``size`` covering ``n``, the last one smaller if it must be.

    Regular chunks, as Zarr stores them: a result written to a Zarr store then goes chunk for
    tile, with no store chunk shared between two tiles (irregular ones made the writer fall back
    to whole-plane chunks, each rewritten by every tile across it: slow, and memory-hungry).
    """
    full, rest = divmod(n, size)
    return (size,) * full + ((rest,) if rest else ())


def overlap_for(psf: Any, method: str = "rl", num_iter: int | None = None) -> tuple[int, ...]:
    """The margin each tile is restored with, per axis, in voxels.

    Parameters
    ----------
    psf : sequence of int, or array
        The PSF's shape, or the PSF itself: then a compact PSF in a large box (a Gaussian of
        sigma 1.2 in 11 voxels) gets the narrower margin its width needs rather than its box's.
    method : str
        A name of :data:`microdecon.restore.METHODS`.
    num_iter : int, optional
        Iterations of an iterative method (its default when None).

    Examples
    --------
    >>> overlap_for((31, 31, 31), "rl", 30)
    (84, 84, 84)
    >>> overlap_for((31, 31, 31), "wiener")
    (50, 50, 50)
    >>> import microdecon as md
    >>> overlap_for(md.psf.gaussian((15, 11, 11), (2.0, 1.2, 1.2)), "rl", 10)
    (25, 16, 16)
    """
    _check_method(method)
    if method in _ONE_PASS_REACH:
        reach = _ONE_PASS_REACH[method]
    else:
        from .restore._stopping import check_num_iter

        count = check_num_iter(_default_iterations(method) if num_iter is None else num_iter)
        if count == "auto":  # the automatic stop: as far as it may go
            from .restore._stopping import AUTO_MAX_ITER

            count = AUTO_MAX_ITER
        count = int(count)
        if method == "blind-rl":
            count *= 4  # image steps per outer iteration, as richardson_lucy runs it in tiles
        # accelerated RL on a widefield PSF needed 3.5, 4.5 and 5.5 half-widths for 10, 30 and
        # 100 iterations: the reach grows with the logarithm of the count
        reach = min(max(1.0 + 1.2 * math.log(max(count, 2)), _ITERATIVE_MIN_REACH), _MAX_REACH)
    # (p // 2 + 1): a PSF cut short on an axis (a few z planes) still blurs past its box, so
    # a small PSF gets a margin for the voxel it sits on and two more. A PSF whose light lies
    # well inside its box is measured by its width instead: 3 RMS widths (a Gaussian cut to 5
    # planes at sigma 1.2 needed 3.0 of them, 6 iterations).
    if hasattr(psf, "shape") and hasattr(psf, "ndim"):
        widths = tuple(min(p // 2 + 1, 3.0 * w) for p, w in zip(psf.shape, _rms_widths(psf)))
        shape = psf.shape
    else:
        shape = tuple(psf)
        widths = tuple(p // 2 + 1 for p in shape)
    return tuple(int(math.ceil(reach * w)) + 2 if p > 1 else 0 for p, w in zip(shape, widths))


def _rms_widths(psf: Any) -> tuple[float, ...]:
    """The RMS width of the PSF's light along each axis, in voxels."""
    values = np.abs(np.asarray(psf.get() if hasattr(psf, "get") else psf, dtype=np.float64))
    values /= values.sum()
    widths = []
    for axis in range(values.ndim):
        profile = values.sum(axis=tuple(a for a in range(values.ndim) if a != axis))
        x = np.arange(profile.size, dtype=np.float64)
        mean = float((profile * x).sum())
        widths.append(float(np.sqrt((profile * (x - mean) ** 2).sum())))
    return tuple(widths)


def _default_iterations(method: str) -> int | str:
    import inspect

    from .restore import METHODS

    parameter = inspect.signature(METHODS[method]).parameters.get("num_iter")
    return parameter.default if parameter is not None else 1


def _check_method(method: Any) -> str:
    from .restore import METHODS

    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return method


def _fft_grid(shape: Sequence[int], psf_shape: Sequence[int], boundary: str, method: str) -> int:
    import scipy.fft

    from .restore.wiener import ONE_PASS_MARGIN

    if boundary == "periodic":
        return math.prod(shape)
    margin = ONE_PASS_MARGIN if method in _ONE_PASS_REACH else 1
    return math.prod(
        scipy.fft.next_fast_len(n + margin * (p - 1), real=True) for n, p in zip(shape, psf_shape)
    )


def working_set_bytes(
    shape: Sequence[int],
    psf_shape: Sequence[int],
    method: str = "rl",
    *,
    boundary: str = "non-circulant",
    input_itemsize: int = 4,
) -> int:
    """Peak memory of restoring one piece of ``shape``: the method's buffers, input and output.

    Examples
    --------
    >>> working_set_bytes((64, 256, 256), (31, 31, 31), "rl") // 2**20
    259
    """
    _check_method(method)
    grid = _fft_grid(shape, psf_shape, boundary, method)
    voxels = math.prod(shape)
    return int(WORKING_SET[method] * 4 * grid + (input_itemsize + 4) * voxels)


def _memory_budget(memory_limit: Any, device: str) -> int:
    if memory_limit is not None:
        import dask.utils

        try:
            value = dask.utils.parse_bytes(memory_limit) if isinstance(memory_limit, str) else memory_limit
        except ValueError:
            value = None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(
                f"memory_limit must be a positive number of bytes or a size like '2GB', got {memory_limit!r}"
            )
        return int(value)
    from ._backend import get_backend

    return int(MEMORY_FRACTION * get_backend(device=device).free_memory())


def plan(
    shape: Sequence[int],
    psf_shape: Any,
    method: str = "rl",
    *,
    tile_shape: Any = "auto",
    memory_limit: int | str | None = None,
    overlap: Any = "auto",
    boundary: str = "non-circulant",
    num_iter: int | None = None,
    device: str = "auto",
    input_itemsize: int = 4,
) -> TilePlan:
    """Choose the tiles for restoring a volume of ``shape`` with ``method``.

    Parameters
    ----------
    shape : sequence of int
        The volume's shape.
    psf_shape : sequence of int, or array
        The PSF's shape (same number of axes), or the PSF itself, which lets a compact PSF in
        a large box have a narrower overlap (see :func:`overlap_for`).
    method : str
        A name of :data:`microdecon.restore.METHODS`.
    tile_shape : "auto", None or sequence of int
        "auto": the whole volume when it fits the memory, else the fewest tiles that fit,
        split along the last two axes (y, x) first and the others (z) only when needed.
        None: the whole volume in one piece. A sequence: tile cores of that shape (None or -1
        for a whole axis).
    memory_limit : int or str, optional
        Bytes one tile may use (e.g. ``"512MB"``). Default: 60% of the device's free memory
        (GPU memory, or available RAM on the CPU).
    overlap : "auto", int or sequence of int
        Margin per side, voxels; "auto" uses :func:`overlap_for`.
    boundary : {"non-circulant", "periodic", "reflect"}
    num_iter : int, optional
        Iterations, for the overlap of iterative methods.
    device : {"auto", "cpu", "gpu", "gpu:N"}
        Whose free memory sets the default limit.
    input_itemsize : int
        Bytes per voxel of the input (2 for uint16).

    Returns
    -------
    TilePlan

    Examples
    --------
    >>> print(plan((37, 301, 263), (9, 15, 15), "rl", tile_shape=(None, 128, 128)))
    37 x 301 x 263: 9 tiles (1 x 3 x 3) of 37 x 101 x 88 + overlap 0 x 55 x 55, 78.0 MB per tile for rl
    """
    _check_method(method)
    _validate.check_choice(boundary, "boundary", _validate.BOUNDARIES)
    shape = tuple(_validate.check_int(n, "shape", minimum=1) for n in shape)
    psf_array = psf_shape if hasattr(psf_shape, "shape") and hasattr(psf_shape, "ndim") else None
    if psf_array is not None:
        psf_shape = psf_array.shape
    psf_shape = tuple(_validate.check_int(n, "psf_shape", minimum=1) for n in psf_shape)
    if len(psf_shape) != len(shape):
        raise ValueError(f"psf has {len(psf_shape)} axes but the image has {len(shape)}")
    ndim = len(shape)
    if isinstance(overlap, str):
        if overlap != "auto":
            raise ValueError(f"overlap must be 'auto', an int or one int per axis, got {overlap!r}")
        margin = overlap_for(psf_array if psf_array is not None else psf_shape, method, num_iter)
        if boundary == "periodic":
            margin = tuple(int(math.ceil(_PERIODIC_OVERLAP * m)) for m in margin)
    else:
        margin = tuple(
            _validate.check_int(v, "overlap") for v in (overlap if np.ndim(overlap) else [overlap] * ndim)
        )
        if len(margin) != ndim:
            raise ValueError(f"overlap needs one value per axis ({ndim}), got {len(margin)}")

    def cost(core: tuple[int, ...], grid: tuple[int, ...]) -> int:
        piece = tuple(n if k == 1 else min(n, c + 2 * m) for n, c, k, m in zip(shape, core, grid, margin))
        return working_set_bytes(piece, psf_shape, method, boundary=boundary, input_itemsize=input_itemsize)

    def make(grid: tuple[int, ...], limit: int | None) -> TilePlan:
        core = tuple(-(-n // k) for n, k in zip(shape, grid))  # ceil(n / k)
        grid = tuple(-(-n // c) for n, c in zip(shape, core))  # as many as that size needs
        used = tuple(0 if k == 1 else m for k, m in zip(grid, margin))
        return TilePlan(shape, core, used, grid, cost(core, grid), limit, method)

    if tile_shape is None:
        return make((1,) * ndim, None)
    if not isinstance(tile_shape, str):
        if len(tile_shape) != ndim:
            raise ValueError(f"tile_shape needs one value per axis ({ndim}), got {len(tile_shape)}")
        grid = []
        for n, t, m in zip(shape, tile_shape, margin):
            t = n if t is None or t == -1 else _validate.check_int(t, "tile_shape", minimum=1)
            count = max(1, math.ceil(n / t))
            if count > 1 and n // count < m:
                raise ValueError(
                    f"tile_shape {tuple(tile_shape)}: a tile of {n // count} voxels on axis {len(grid)} is "
                    f"smaller than the overlap of {m} it needs; use tiles of at least {m} there, "
                    f"or tile_shape='auto'"
                )
            grid.append(count)
        # a limit given beside the tiles says how many of them may be restored at once
        return make(tuple(grid), _memory_budget(memory_limit, device) if memory_limit is not None else None)
    if tile_shape != "auto":
        raise ValueError(f"tile_shape must be 'auto', None or one size per axis, got {tile_shape!r}")

    budget = _memory_budget(memory_limit, device)
    grid = [1] * ndim
    # y and x first (the last two axes), then the leading ones; always the one with the
    # largest tile, so that tiles stay close to square in the plane
    order = list(range(ndim))[-2:] + list(range(ndim))[:-2]

    def splittable(axis: int) -> bool:  # one more tile on ``axis`` keeps cores >= overlap
        return grid[axis] < shape[axis] and shape[axis] // (grid[axis] + 1) >= max(margin[axis], 1)

    while cost(make(tuple(grid), budget).tile_shape, tuple(grid)) > budget:
        candidates = [a for a in order[:2] if splittable(a)] or [a for a in order[2:] if splittable(a)]
        if not candidates:
            smallest = make(tuple(grid), budget)
            raise ValueError(
                f"memory_limit of {_human(budget)} is too small for {method}: the smallest tiles that "
                f"are no smaller than their overlap ({' x '.join(map(str, smallest.tile_shape))} + "
                f"{' x '.join(map(str, smallest.overlap))}) need {_human(smallest.bytes_per_tile)} each; "
                f"give at least that, or fewer iterations or a smaller PSF (less overlap)"
            )
        axis = max(candidates, key=lambda a: shape[a] / grid[a])
        grid[axis] += 1
    return make(tuple(grid), budget)


def deconvolve(
    image: Any,
    psf: Any,
    method: str = "rl",
    *,
    tile_shape: Any = "auto",
    memory_limit: int | str | None = None,
    overlap: Any = "auto",
    channel_axis: int | None = None,
    device: str = "auto",
    **params: Any,
):
    """Deconvolve with the method named by ``method``, in tiles when the volume needs them.

    Parameters
    ----------
    image : array_like
        NumPy, CuPy or Dask array. Dask in gives a lazy Dask array out, one task per tile.
        Axes before the PSF's (time, channel) are restored frame by frame.
    psf : array_like or sequence of array_like
        The PSF, or one PSF per channel (then ``channel_axis`` says which image axis holds the
        channels; by default the axis just before the PSF's).
    method : str
        "rl": :func:`~microdecon.richardson_lucy` (accelerated by default);
        "rl-tv": :func:`~microdecon.restore.richardson_lucy_tv` (RL with total variation);
        "wiener", "tikhonov", "inverse": the one-pass filters;
        "landweber", "fista": gradient methods; "unsupervised-wiener"; "blind-rl".
    tile_shape : "auto", None or sequence of int
        See :func:`plan`. "auto" keeps the volume whole when it fits the device's memory.
    memory_limit : int or str, optional
        Bytes one tile may use, e.g. ``"4GB"``; default 60% of the device's free memory.
    overlap : "auto", int or sequence of int
        Margin per side of each tile, voxels; "auto" is enough for 1e-3 agreement with the
        whole volume.
    channel_axis : int, optional
        The image axis that indexes ``psf`` when it is a sequence.
    device : {"auto", "cpu", "gpu", "gpu:N"}
    **params
        Keyword arguments of the method, e.g. ``num_iter=30`` or ``balance=1e-3``. ``tol`` and
        ``callback`` need the whole volume at each iteration, so they are refused when the
        volume is cut into tiles.

    Returns
    -------
    array
        float32, same shape as ``image``; NumPy, CuPy or lazy Dask as ``image``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> img = np.random.default_rng(0).poisson(20, (8, 96, 96)).astype(np.float32)
    >>> psf = md.psf.gaussian((5, 9, 9), 1.5)
    >>> whole = md.deconvolve(img, psf, "rl", num_iter=10, device="cpu")
    >>> tiled = md.deconvolve(img, psf, "rl", num_iter=10, device="cpu", tile_shape=(8, 48, 48))
    >>> whole.shape == tiled.shape
    True
    """
    _check_method(method)
    psfs = _as_psf_list(psf)
    image = _check_lazy(image) if _is_dask(image) else _validate.check_array(image, "image")
    ndim = np.ndim(psfs[0])
    if image.ndim < ndim:
        raise ValueError(f"psf has {ndim} axes but the image only {image.ndim}")
    if any(np.ndim(p) != ndim for p in psfs):
        raise ValueError("psf: every channel's PSF must have the same number of axes")
    frames = image.ndim - ndim
    if len(psfs) > 1:
        if frames == 0:
            raise ValueError(f"psf: {len(psfs)} PSFs were given but the image has no channel axis")
        channel_axis = frames - 1 if channel_axis is None else channel_axis
        if not isinstance(channel_axis, int) or not -image.ndim <= channel_axis < frames:
            raise ValueError(
                f"channel_axis must name one of the image's first {frames} axes, got {channel_axis!r}"
            )
        channel_axis %= image.ndim
        if image.shape[channel_axis] != len(psfs):
            raise ValueError(
                f"psf: {len(psfs)} PSFs for {image.shape[channel_axis]} channels (axis {channel_axis})"
            )
    settings = dict(tile_shape=tile_shape, memory_limit=memory_limit, overlap=overlap, device=device)
    if frames == 0:
        return _deconvolve_volume(image, psfs[0], method, params, **settings)
    is_dask = _is_dask(image)
    results = []
    for index in np.ndindex(*image.shape[:frames]):
        frame_psf = psfs[index[channel_axis]] if len(psfs) > 1 else psfs[0]
        results.append(_deconvolve_volume(image[index], frame_psf, method, params, **settings))
    if is_dask:
        import dask.array as da

        stacked = da.stack(results)
    else:
        from ._backend import array_module

        stacked = array_module(results[0]).stack(results)
    return stacked.reshape(image.shape)


def _as_psf_list(psf: Any) -> list:
    if isinstance(psf, (list, tuple)):
        if not psf:
            raise ValueError("psf: an empty sequence of PSFs")
        if all(np.ndim(p) >= 1 and not np.isscalar(p) and hasattr(p, "shape") for p in psf):
            return list(psf)
    return [psf]


def _check_lazy(image: Any) -> Any:
    """What can be checked of a Dask array without computing it (each tile checks its values)."""
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must hold real numbers, got dtype {image.dtype}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    return image


def _is_dask(array: Any) -> bool:
    return type(array).__module__.split(".")[0] == "dask"


#: Times a volume that ran out of memory is planned again with tiles half the size, before the
#: GPU is given up for the CPU.
OUT_OF_MEMORY_RETRIES = 3


def _deconvolve_volume(image, psf, method, params, *, tile_shape, memory_limit, overlap, device):
    """One volume (no frame axes): whole, or tiled through a Dask graph.

    Out of memory on an in-memory volume (a GPU's, usually), it plans again with tiles half the
    size, up to :data:`OUT_OF_MEMORY_RETRIES` times, then restores on the CPU; each step warns.
    A lazy (Dask) volume's tiles fall back to the CPU one by one (see :func:`_restore_region`).
    """
    import warnings

    from ._backend import is_out_of_memory
    from .restore import METHODS

    function = METHODS[method]
    psf = _validate.check_psf(psf, image.ndim)
    boundary = params.get("boundary", "non-circulant")

    def make_plan(tiles, limit):
        return plan(
            image.shape,
            psf,
            method,
            tile_shape=tiles,
            memory_limit=limit,
            overlap=overlap,
            boundary=boundary,
            num_iter=params.get("num_iter"),
            device=device,
            input_itemsize=np.dtype(image.dtype).itemsize,
        )

    tile_plan = make_plan(tile_shape, memory_limit)
    if _is_dask(image):
        return _run_plan(image, psf, function, tile_plan, params, device, boundary)
    for attempt in range(OUT_OF_MEMORY_RETRIES + 1):
        try:
            return _run_plan(image, psf, function, tile_plan, params, device, boundary)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            smaller = tile_plan.bytes_per_tile // 2
            try:
                retry = make_plan("auto", smaller) if attempt < OUT_OF_MEMORY_RETRIES else None
            except ValueError:  # no tile that small exists
                retry = None
            if retry is None:
                if device == "cpu":
                    raise
                warnings.warn(
                    f"out of memory on {device} ({type(error).__name__}); restoring on the CPU instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                device = "cpu"
                tile_plan = make_plan(tile_shape, memory_limit)
                continue
            warnings.warn(
                f"out of memory on {device} with {tile_plan.tiles} tile(s) of "
                f"{_human(tile_plan.bytes_per_tile)}; retrying with {retry.tiles} tiles of "
                f"{_human(retry.bytes_per_tile)}",
                RuntimeWarning,
                stacklevel=3,
            )
            tile_plan = retry
    return _run_plan(image, psf, function, tile_plan, params, "cpu", boundary)


def _run_plan(image, psf, function, tile_plan: TilePlan, params, device, boundary):
    """Restore ``image`` as ``tile_plan`` says: whole, or through the tile graph."""
    is_dask = _is_dask(image)
    if tile_plan.tiles == 1 and not is_dask:
        return function(image, psf, device=device, **params)
    for name in ("tol", "callback"):
        if params.get(name) is not None and tile_plan.tiles > 1:
            raise ValueError(
                f"{name} needs the whole volume at every iteration and cannot be used when it is cut "
                f"into {tile_plan.tiles} tiles; give a larger memory_limit or tile_shape=None"
            )
    from ._backend import return_freed_memory

    return_freed_memory()
    # A lazy volume's tiles fall back to the CPU one by one; an in-memory one is planned again
    # with smaller tiles by the caller first.
    fallback = is_dask
    source = _padded_source(image, tile_plan, boundary)
    model, done = None, {}
    if tile_plan.tiles > 1:
        model, index, result = _pilot(image, psf, function, tile_plan, params, device, fallback)
        done[index] = result  # the pilot tile is restored already: not again
    restored = _tile_graph(source, psf, function, tile_plan, model, device, params, boundary, fallback, done)
    if is_dask:
        return restored
    return restored.compute(scheduler="synchronous")


class _Region:
    """A tile's input with its overlap: a NumPy/CuPy view or a small lazy Dask array.

    Not a Dask collection on purpose: Dask leaves it alone when it builds the graph, so each
    tile reads its own region inside its own task, and no input is shared between tiles and
    held until all its neighbours are done (which, tile row after tile row across a wide
    stack, held rows of the whole input in memory).
    """

    __slots__ = ("part", "reader", "box")

    def __init__(self, part: Any, reader: Any = None, box: tuple[slice, ...] | None = None):
        self.part, self.reader, self.box = part, reader, box

    @classmethod
    def of(cls, source: Any, read: tuple[slice, ...]) -> _Region:
        """``source[read]``, read straight from its file where the source is an untouched lazy
        TIFF from ``io.imread`` (one pass, not one task per chunk; see ``io.region_source``)."""
        from .io import region_source

        reader = region_source(source) if _is_dask(source) else None
        if reader is not None:
            return cls(None, reader, read)
        return cls(source[read])

    def load(self):
        if self.reader is not None:
            return self.reader[self.box]
        if _is_dask(self.part):
            return self.part.compute(scheduler="synchronous")
        return self.part


def _padded_source(image: Any, tile_plan: TilePlan, boundary: str):
    """The volume tiles read from: the image itself, or for "periodic" the image wrapped
    around by the overlap (lazily: only what each tile reads is made)."""
    if boundary != "periodic" or not any(tile_plan.overlap):
        return image
    import dask.array as da

    lazy = image if _is_dask(image) else da.from_array(image, chunks=tile_plan.chunks)
    return da.pad(lazy, [(m, m) for m in tile_plan.overlap], mode="wrap")


def _regions(tile_plan: TilePlan, boundary: str):
    """Per tile: its index, the region it reads (in the source's coordinates) and, within that
    region, the slices of its core."""
    wrap = boundary == "periodic"
    starts = [np.cumsum((0,) + chunks[:-1]) for chunks in tile_plan.chunks]
    for index in np.ndindex(*tile_plan.grid):
        read, core = [], []
        for axis, i in enumerate(index):
            start, size = int(starts[axis][i]), tile_plan.chunks[axis][i]
            margin, n = tile_plan.overlap[axis], tile_plan.shape[axis]
            if wrap:  # the source is padded by the margin on both sides
                low, high = start, start + size + 2 * margin
            else:
                low, high = max(start - margin, 0), min(start + size + margin, n)
            read.append(slice(low, high))
            offset = start + (margin if wrap else 0) - low
            core.append(slice(offset, offset + size))
        yield index, tuple(read), tuple(core)


def _tile_graph(
    source, psf, function, tile_plan: TilePlan, model, device, params, boundary, fallback, done=None
):
    """A lazy Dask array of the restored volume: one task per tile, assembled by ``da.block``;
    ``done`` maps tile indices to cores already restored."""
    import dask
    import dask.array as da

    host_psf = psf if not hasattr(psf, "get") else psf.get()
    meta = source._meta.astype(np.float32) if _is_dask(source) else np.empty((0,) * source.ndim, np.float32)
    if not _is_dask(source) and hasattr(source, "get"):  # CuPy: keep the blocks on the device
        meta = source[(slice(0, 0),) * source.ndim].astype(np.float32)
    blocks = np.empty(tile_plan.grid, dtype=object)
    restore = dask.delayed(_restore_region, pure=False)
    at_once = tiles_at_once(tile_plan)
    for index, read, core in _regions(tile_plan, boundary):
        if done and index in done:
            blocks[index] = da.from_array(done[index], chunks=done[index].shape, meta=meta)
            continue
        task = restore(
            _Region.of(source, read), core, function, host_psf, model, device, params, fallback, at_once
        )
        shape = tuple(c.stop - c.start for c in core)
        blocks[index] = da.from_delayed(task, shape=shape, dtype=np.float32, meta=meta)
    return da.block(blocks.tolist())


def tiles_at_once(tile_plan: TilePlan) -> int:
    """How many of the plan's tiles one process may restore at the same time: as many as its
    memory limit holds (one, for a plan that sized its tiles to the limit).

    Dask's threaded scheduler (and each threaded worker of a cluster) starts a task per core;
    unchecked, a 16-core machine would restore 16 tiles at once in memory planned for one, and
    their FFTs would fight over the cores. The tiles wait for a slot instead.

    Examples
    --------
    >>> tiles_at_once(plan((64, 4096, 4096), (15, 11, 11), "rl", num_iter=10, memory_limit="512MB"))
    1
    """
    if not tile_plan.memory_limit or tile_plan.bytes_per_tile <= 0:
        return 1
    return max(1, int(tile_plan.memory_limit // tile_plan.bytes_per_tile))


_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slot(at_once: int) -> threading.BoundedSemaphore:
    """This process's gate for tiles of plans that allow ``at_once`` of them at a time."""
    with _SLOTS_LOCK:
        if at_once not in _SLOTS:
            _SLOTS[at_once] = threading.BoundedSemaphore(at_once)
        return _SLOTS[at_once]


def _restore_region(region: _Region, core, function, psf, model, device, params, fallback=True, at_once=1):
    """One tile: read its region, restore it (under the shared model), keep its core.

    At most ``at_once`` tiles run at a time in a process (see :func:`tiles_at_once`). A tile
    that runs out of a GPU's memory is restored on the CPU instead, with a warning: the same
    model, so the same result to float32 rounding.
    """
    import contextlib

    with _slot(at_once):
        data = region.load()
        with applying(model) if model is not None else contextlib.nullcontext():
            result = _on_device_or_cpu(function, data, psf, device, params, fallback)
        return result[core]


def _on_device_or_cpu(function, data, psf, device, params, fallback=True):
    """``function`` on ``device``; on the CPU, with a warning, if the device runs out of memory
    (and ``fallback``)."""
    import warnings

    from ._backend import is_out_of_memory

    try:
        return function(data, psf, device=device, **params)
    except Exception as error:
        if not fallback or device == "cpu" or not is_out_of_memory(error):
            raise
        warnings.warn(
            f"a tile ran out of memory on {device} ({type(error).__name__}); restoring it on the CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return function(data, psf, device="cpu", **params)


def _largest_piece(tile_plan: TilePlan, boundary: str) -> tuple[int, ...]:
    """The largest tile with its overlap: every tile computes on the FFT grid this one needs."""
    pieces = []
    for chunks, margin in zip(tile_plan.chunks, tile_plan.overlap):
        last = len(chunks) - 1
        wrap = boundary == "periodic"  # periodic tiles get overlap at the volume's border too
        pieces.append(
            max(
                c + (margin if i > 0 or wrap else 0) + (margin if i < last or wrap else 0)
                for i, c in enumerate(chunks)
            )
        )
    return tuple(pieces)


def _measure_model(
    image, psf, function, tile_plan: TilePlan, params: dict, device: str, fallback: bool = False
) -> TileModel:
    """The model the tiles of ``image`` share (see :func:`_pilot`)."""
    return _pilot(image, psf, function, tile_plan, params, device, fallback)[0]


def _pilot(image, psf, function, tile_plan: TilePlan, params: dict, device: str, fallback: bool):
    """Restore the central tile (with its overlap) while recording what the method measures.

    Returns the model, the tile's index and its restored core: recording measures the values
    and uses them, so the core is what the tile restored under the model gives, and the graph
    takes it as it is rather than restoring the tile twice.
    """
    boundary = params.get("boundary", "non-circulant")
    source = _padded_source(image, tile_plan, boundary)
    central = tuple(k // 2 for k in tile_plan.grid)
    read, core = next((read, core) for index, read, core in _regions(tile_plan, boundary) if index == central)
    region = _Region.of(source, read).load()
    largest = _largest_piece(tile_plan, boundary)
    with recording(TileModel({"tile.largest_shape": largest})) as model:
        result = _on_device_or_cpu(function, region, psf, device, params, fallback)
    return model, central, result[core]
