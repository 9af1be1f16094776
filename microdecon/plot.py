"""Pictures for notebooks and reports: images and stacks side by side, before and after.

matplotlib is optional (``pip install "microdecon[plot]"``) and imported only when a function here
is called, so ``import microdecon`` and ``import microdecon.plot`` never load it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import _validate
from ._backend import is_device_array

if TYPE_CHECKING:  # pragma: no cover - for annotations only
    from matplotlib.figure import Figure

__all__ = ["compare"]

_PROJECTIONS = ("max", "mean", "slice")
_SCALES = ("each", "shared")


def _import_pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            'microdecon.plot needs matplotlib; install it with: pip install "microdecon[plot]"'
        ) from error
    return plt


def _to_host(array: Any) -> np.ndarray:
    """A NumPy array of what was computed: Dask graphs evaluated, CuPy data copied to the host."""
    if type(array).__module__.split(".")[0] == "dask":
        array = array.compute()
    if is_device_array(array):
        array = array.get()
    return np.asarray(array)


def _check_image(image: Any, name: str) -> Any:
    """An array of real numbers (bool allowed) with 2 or 3 axes, not empty; left on its device."""
    if image is None or isinstance(image, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got {type(image).__name__}")
    if not hasattr(image, "ndim") or not hasattr(image, "dtype"):
        try:
            image = np.asarray(image)
        except Exception as error:  # ragged lists and the like
            raise TypeError(f"{name} must be an array of numbers ({error})") from None
    kind = np.dtype(image.dtype).kind
    if kind == "c":
        raise TypeError(f"{name} has complex dtype {image.dtype}; show its abs() or real part")
    if kind not in "biuf":
        raise TypeError(f"{name} has dtype {image.dtype}, which is not a real numeric type")
    if image.ndim not in (2, 3):
        raise ValueError(f"{name} must have 2 or 3 axes, got shape {tuple(image.shape)}")
    if 0 in image.shape:
        raise ValueError(f"{name} is empty (shape {tuple(image.shape)})")
    return image


def _project(image: Any, projection: str, axis: int, index: int | None, name: str) -> np.ndarray:
    """The 2-D picture of one image, reduced where the data lives (on the GPU, lazily in Dask)."""
    if image.ndim == 2:
        return _to_host(image)
    if image.dtype.kind == "b":
        image = image.astype(np.uint8)
    if projection == "max":
        picture = image.max(axis=axis)
    elif projection == "mean":
        picture = image.mean(axis=axis, dtype=np.float64).astype(np.float32)
    else:
        n = image.shape[axis]
        plane = n // 2 if index is None else index
        if not -n <= plane < n:
            raise ValueError(f"index {plane} is outside axis {axis} of {name} (length {n})")
        picture = image[(slice(None),) * axis + (plane,)]
    return _to_host(picture)


def _limits(pictures: list[np.ndarray], percentiles: tuple[float, float]) -> tuple[float, float]:
    """Display range from percentiles of the finite values (NaN and Inf left out)."""
    values = np.concatenate([p[np.isfinite(p)].ravel() for p in pictures]).astype(np.float64)
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, percentiles)
    if not high > low:  # a constant picture: any range that contains its value
        low, high = float(values.min()), float(values.max())
        if not high > low:
            high = low + 1.0
    return float(low), float(high)


def compare(
    *images: Any,
    titles: Sequence[str] | None = None,
    projection: Literal["max", "mean", "slice"] = "max",
    axis: int = 0,
    index: int | None = None,
    cmap: Any = "gray",
    scale: Literal["each", "shared"] = "each",
    percentiles: tuple[float, float] = (0.1, 99.9),
    spacing: float | Sequence[float] | None = None,
    ncols: int | None = None,
    panel_size: float = 3.0,
    colorbar: bool = False,
) -> Figure:
    """Show images side by side (before and after, several methods): 3-D stacks as projections.

    Each image becomes one panel, left to right in the order given. A 2-D image is shown as it
    is; a 3-D stack is reduced along ``axis`` (``0``: a top view, z projected) to its maximum or
    mean, or cut at one plane. Every panel gets its own contrast by default (see ``scale``).

    Parameters
    ----------
    *images : array_like
        2-D or 3-D arrays of real numbers: NumPy, CuPy (projected on the GPU, then copied to
        the host) or Dask (projected lazily, then computed). Shapes may differ.
    titles : sequence of str, optional
        One title per image.
    projection : {"max", "mean", "slice"}
        How a 3-D stack becomes a picture: maximum-intensity projection, mean projection, or
        the plane at ``index``.
    axis : int
        The axis that is projected or cut (``-3`` to ``2``); 2-D images ignore it.
    index : int, optional
        For ``projection="slice"``: the plane along ``axis``; default the middle one (``n // 2``).
    cmap : str or matplotlib colormap
        Colour map, e.g. "gray", "magma", "inferno".
    scale : {"each", "shared"}
        ``"each"`` (default) stretches every panel between its own ``percentiles``: raw data
        carries a camera offset and restorations move light into sharper, brighter peaks, so one
        shared range would show the input dim or the output saturated. ``"shared"`` uses one
        range, from the percentiles of all panels together, for comparing results in the same
        units (e.g. several methods).
    percentiles : (float, float)
        Low and high percentiles of the shown values that map to the ends of the colour map
        (``(0, 100)``: minimum to maximum). NaN and Inf are left out.
    spacing : float or sequence of float, optional
        Voxel size per axis (e.g. ``meta["spacing"]``: dz, dy, dx), so that panels have their
        physical aspect ratio; a side view (``axis=1``) of a stack with 0.2 um planes and
        0.1 um pixels is drawn twice as tall per plane. Default: square pixels.
    ncols : int, optional
        Panels per row; default all in one row.
    panel_size : float
        Width of one panel in inches.
    colorbar : bool
        Add a colour bar to each panel (one for all with ``scale="shared"``).

    Returns
    -------
    matplotlib.figure.Figure
        One axes per image (``fig.axes[i]``; colour bars, when asked for, come after them).
        The panels share their x and y axes when the pictures have the same shape, so zooming
        one (in an interactive backend) zooms all.

    Raises
    ------
    ImportError
        When matplotlib is not installed.
    ValueError, TypeError
        For bad arguments, naming the argument (``images[1]``, ``titles``, ``axis``...).

    Notes
    -----
    The figure is made through pyplot, like ``plt.subplots``: ``plt.show()`` shows it in a
    script, and Jupyter shows it at the end of the cell. In a notebook assign it (``fig =
    compare(...)``) or end the line with ``;``: a figure that is also the cell's value is shown
    twice. Close figures you no longer need (``plt.close(fig)``) when making many in a loop.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")  # no window: render off screen
    >>> import numpy as np, microdecon as md
    >>> truth = md.data.phantom((16, 64, 64), seed=1)
    >>> psf = md.psf.gaussian((9, 9, 9), 1.5)
    >>> blurred = md.convolve(truth, psf, device="cpu")
    >>> restored = md.richardson_lucy(blurred, psf, 10, device="cpu")
    >>> fig = md.plot.compare(blurred, restored, truth, titles=["blurred", "restored", "truth"])
    >>> [ax.get_title() for ax in fig.axes]
    ['blurred', 'restored', 'truth']
    >>> bool(np.array_equal(fig.axes[2].images[0].get_array(), truth.max(axis=0)))
    True
    >>> import matplotlib.pyplot as plt; plt.close(fig)
    """
    if not images:
        raise ValueError("compare needs at least one image")
    checked = [_check_image(image, f"images[{i}]") for i, image in enumerate(images)]
    count = len(checked)
    if titles is not None:
        if isinstance(titles, str) or not isinstance(titles, Sequence):
            raise TypeError(f"titles must be a sequence of str, one per image; got {titles!r}")
        if len(titles) != count:
            raise ValueError(f"titles has {len(titles)} entries for {count} image(s); give one per image")
        if not all(isinstance(t, str) for t in titles):
            raise TypeError(f"titles must all be str; got {[type(t).__name__ for t in titles]}")
    _validate.check_choice(projection, "projection", _PROJECTIONS)
    _validate.check_choice(scale, "scale", _SCALES)
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -3 <= axis <= 2:
        raise ValueError(f"axis must be between -3 and 2 for a 3-D stack, got {axis}")
    axis = int(axis) % 3
    if index is not None:
        if projection != "slice":
            raise ValueError(f"index applies only to projection='slice', not {projection!r}")
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"index must be an integer, got {index!r}")
        index = int(index)
    if np.ndim(percentiles) != 1 or len(percentiles) != 2:
        raise ValueError(f"percentiles must be two numbers (low, high); got {percentiles!r}")
    low, high = (_validate.check_float(p, "percentiles") for p in percentiles)
    if not low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; got {percentiles!r}")
    steps = None if spacing is None else _validate.per_axis(spacing, 3, "spacing")
    ncols = count if ncols is None else min(_validate.check_int(ncols, "ncols", minimum=1), count)
    panel_size = _validate.check_float(panel_size, "panel_size", strict=True)
    if not isinstance(colorbar, bool):
        raise TypeError(f"colorbar must be True or False, got {colorbar!r}")

    plt = _import_pyplot()
    import matplotlib

    if isinstance(cmap, str) and cmap not in matplotlib.colormaps:
        raise ValueError(f"cmap {cmap!r} is not a matplotlib colour map (e.g. 'gray', 'magma')")

    pictures = [_project(image, projection, axis, index, f"images[{i}]") for i, image in enumerate(checked)]
    # Physical height / width of one shown pixel: the spacing of the two axes left on screen.
    aspects = []
    for image in checked:
        if steps is None:
            aspects.append(1.0)
            continue
        shown = [a for a in range(3) if a != axis] if image.ndim == 3 else [1, 2]
        aspects.append(steps[shown[0]] / steps[shown[1]])
    if scale == "shared":
        limits = [_limits(pictures, (low, high))] * count
    else:
        limits = [_limits([p], (low, high)) for p in pictures]

    nrows = -(-count // ncols)
    heights = [p.shape[0] * a / p.shape[1] for p, a in zip(pictures, aspects)]
    panel_height = panel_size * float(np.clip(max(heights), 0.2, 5.0))
    same = len({(p.shape, a) for p, a in zip(pictures, aspects)}) == 1
    fig = plt.figure(
        figsize=(panel_size * ncols + (0.6 * ncols if colorbar else 0), (panel_height + 0.4) * nrows),
        layout="constrained",
    )
    grid = fig.subplots(nrows, ncols, squeeze=False, sharex=same, sharey=same)
    panels = list(grid.ravel())
    for extra in panels[count:]:
        extra.remove()
    panels = panels[:count]
    shown = []
    for i, (ax, picture, aspect, (vmin, vmax)) in enumerate(zip(panels, pictures, aspects, limits)):
        shown.append(
            ax.imshow(picture, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        )
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i])
    if colorbar:
        if scale == "shared":
            fig.colorbar(shown[0], ax=panels, shrink=0.8)
        else:
            for ax, image in zip(panels, shown):
                fig.colorbar(image, ax=ax, shrink=0.8)
    return fig
