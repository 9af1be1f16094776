"""Argument checks shared by every public function: one dtype rule and clear errors.

The dtype rule: images and PSFs of any real numeric dtype (integers, float16/32/64) are accepted
and computed in float32; bool, complex, object and string arrays are refused. Every error names
the argument and says what was wrong, and nothing here modifies its input.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._backend import array_module, is_device_array

BOUNDARIES = ("non-circulant", "periodic", "reflect")


def _dtype_of(array: Any, name: str) -> np.dtype:
    dtype = getattr(array, "dtype", None)
    try:
        return np.dtype(dtype) if dtype is not None else np.asarray(array).dtype
    except Exception as error:  # ragged lists, tensors of other libraries and the like
        raise TypeError(f"{name} must be an array of numbers; could not read it as one ({error})") from None


#: The largest magnitude an image or PSF may hold. Everything is computed in float32, whose
#: range ends at 3.4e38; a restoration can exceed its input (ringing, sharpened peaks), and
#: Wiener's did overflow at 3e38. Every method is tested up to 1e30.
LARGEST_VALUE = 1e37


def check_array(array: Any, name: str) -> Any:
    """Check that ``array`` is a non-empty, finite, real numeric array; return it as an array.

    NumPy and CuPy arrays are returned as they are (no copy); other array-likes via ``np.asarray``.
    Values must fit in float32, the dtype everything is computed in.

    Examples
    --------
    >>> check_array([1, 2, 3], "image").dtype.kind
    'i'
    >>> check_array([1.0, float("nan")], "image")
    Traceback (most recent call last):
    ...
    ValueError: image contains NaN or infinite values (1 of 2); replace or mask them before deconvolving
    """
    if array is None:
        raise TypeError(f"{name} must be an array of numbers, got None")
    if type(array).__module__.split(".")[0] == "dask":
        raise TypeError(
            f"{name} is a Dask array: md.deconvolve(image, psf, method) restores it lazily, tile by "
            f"tile; the single-volume functions need {name}.compute() (a NumPy or CuPy array)"
        )
    dtype = _dtype_of(array, name)
    if dtype.kind == "b":
        raise TypeError(
            f"{name} has dtype bool; convert a mask to numbers explicitly (e.g. .astype('float32'))"
        )
    if dtype.kind == "c":
        raise TypeError(f"{name} has complex dtype {dtype}; microdecon restores real-valued intensities")
    if dtype.kind not in "iuf":
        raise TypeError(f"{name} has dtype {dtype}, which is not a real numeric type")
    if not (isinstance(array, np.ndarray) or is_device_array(array)):
        array = np.asarray(array)
    if array.ndim == 0:
        raise ValueError(f"{name} must have at least one axis, got a scalar")
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)})")
    with _on_its_device(array):
        _check_values(array, name, dtype)
    return array


def _on_its_device(array: Any):
    """The array's GPU as the current device (CuPy reductions run there); nothing on the CPU."""
    import contextlib

    return array.device if is_device_array(array) else contextlib.nullcontext()


def _check_values(array: Any, name: str, dtype: np.dtype) -> None:
    if dtype.kind == "f":
        xp = array_module(array)
        # One cheap reduction first; the count of bad values (a full-size mask) only on failure.
        with np.errstate(over="ignore", invalid="ignore"):  # +huge and -huge may sum to NaN
            total = array.sum(dtype=np.float64)
        if not bool(xp.isfinite(total)):
            bad = int(array.size - int(xp.isfinite(array).sum()))
            if bad:
                raise ValueError(
                    f"{name} contains NaN or infinite values ({bad} of {array.size}); "
                    "replace or mask them before deconvolving"
                )
        # the largest magnitude from max and min: abs() would make an image-sized temporary
        largest = max(float(array.max()), -float(array.min())) if array.size else 0.0
        if largest > LARGEST_VALUE:
            # computed in float32: a restoration can exceed its input (ringing, sharpened peaks),
            # and near float32's end (3.4e38) it overflows to infinity
            raise ValueError(
                f"{name} has values up to {largest:.3g}, beyond {LARGEST_VALUE:.0e}: restored in float32 "
                f"(whose range ends at 3.4e38) they could overflow; rescale it"
            )


def check_psf(psf: Any, ndim: int, name: str = "psf") -> Any:
    """Check a PSF against an image of ``ndim`` axes: real, finite, non-negative, not all zero.

    Examples
    --------
    >>> check_psf([[0, 1], [1, 0]], ndim=1)
    Traceback (most recent call last):
    ...
    ValueError: psf has 2 axes but the image has 1; give a PSF with one axis per image axis
    """
    psf = check_array(psf, name)
    if psf.ndim != ndim:
        raise ValueError(
            f"{name} has {psf.ndim} axes but the image has {ndim}; give a PSF with one axis per image axis"
        )
    with _on_its_device(psf):
        minimum, maximum = float(psf.min()), float(psf.max())
    if minimum < 0:
        raise ValueError(
            f"{name} has negative values (min {minimum:.3g}); subtract its background and clip it at "
            "zero first (see microdecon.psf)"
        )
    if maximum <= 0:
        raise ValueError(f"{name} is all zero; it must contain the blur, with a positive sum")
    return psf


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` must be one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")
    return value


def check_int(value: Any, name: str, *, minimum: int = 0) -> int:
    """An integer ``>= minimum`` (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(value: Any, name: str, *, minimum: float | None = 0.0, strict: bool = False) -> float:
    """A finite real number, ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value}")
    return value


def check_background(background: Any, shape: tuple[int, ...]) -> Any:
    """A non-negative scalar, or a non-negative array that broadcasts to the image shape."""
    if getattr(background, "ndim", None) == 0:
        background = float(background)
    if isinstance(background, numbers.Real) and not isinstance(background, bool):
        return check_float(background, "background")
    background = check_array(background, "background")
    try:
        fits = np.broadcast_shapes(tuple(background.shape), tuple(shape)) == tuple(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"background of shape {tuple(background.shape)} does not broadcast to the image shape {shape}"
        )
    with _on_its_device(background):
        lowest = float(background.min())
    if lowest < 0:
        raise ValueError("background must be non-negative everywhere")
    return background


def per_axis(value: Any, ndim: int, name: str, *, positive: bool = True) -> tuple[float, ...]:
    """One value per axis from a scalar, or from a sequence or array of ``ndim`` values."""
    values = tuple(np.ravel(value).tolist()) if np.ndim(value) > 0 else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} needs one value per axis ({ndim}), got {len(values)}")
    return tuple(check_float(v, name, strict=positive) for v in values)


def check_callback(callback: Any) -> Any:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable as callback(iteration, estimate), got {callback!r}")
    return callback
