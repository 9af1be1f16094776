"""Reading and writing TIFF stacks with their axes, voxel size and provenance.

``imread`` returns the array and a metadata dict (``axes``, ``spacing`` in micrometres per
axis, ``unit``, any ImageJ keys, and ``provenance`` when microdecon wrote the file).
``imwrite`` writes an ImageJ TIFF atomically: to a temporary file first, renamed into place only
when complete, so an interrupted job never leaves a truncated file that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["imread", "imwrite"]

_IMAGEJ_AXES = "TZCYXS"
# length units as ImageJ writes them, in micrometres
_UNITS_UM = {
    "micron": 1.0,
    "microns": 1.0,
    "um": 1.0,
    "\u00b5m": 1.0,
    "\\u00b5m": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "cm": 1e4,
    "m": 1e6,
    "meter": 1e6,
}
_DEFAULT_AXES = {1: "X", 2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}


def _ome_spacing(ome_xml: str, axes: str) -> dict[str, float]:
    spacing = {}
    for axis in "ZYX":
        match = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', ome_xml)
        if match and axis in axes:
            spacing[axis] = float(match.group(1))
    return spacing


def imread(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a TIFF (plain, ImageJ or OME) into an array and its metadata.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    array : numpy.ndarray
    meta : dict
        ``axes`` (e.g. "ZYX"), ``spacing`` (tuple, micrometres per axis; 1.0 where unknown),
        ``spacing_known`` (bool), ``unit``, ImageJ keys, ``provenance`` (dict) if present.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.tif")
    >>> imwrite(path, np.zeros((2, 3, 4), np.float32), {"spacing": (0.3, 0.1, 0.1)})
    >>> image, meta = imread(path)
    >>> image.shape, meta["axes"], meta["spacing"]
    ((2, 3, 4), 'ZYX', (0.3, 0.1, 0.1))
    """
    import tifffile

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            array = series.asarray()
            axes = series.axes.upper().replace("Q", "").replace("I", "Z")
            meta: dict[str, Any] = {}
            spacing: dict[str, float] = {}
            if tif.imagej_metadata:
                meta.update({k: v for k, v in tif.imagej_metadata.items() if k not in ("Info",)})
                if "spacing" in tif.imagej_metadata:
                    spacing["Z"] = float(tif.imagej_metadata["spacing"])
                info = tif.imagej_metadata.get("Info")
                if info:
                    try:
                        meta["provenance"] = json.loads(info)
                    except ValueError:
                        meta["info"] = info
            page = tif.pages[0]
            if "XResolution" in page.tags and not tif.is_ome:
                for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
                    num, den = page.tags[tag].value
                    if num and den and (num, den) != (1, 1):
                        spacing[axis] = den / num
                spacing = _in_micrometres(spacing, tif, page)
            if tif.is_ome and tif.ome_metadata:
                spacing.update(_ome_spacing(tif.ome_metadata, axes))
            _check_complete(tif, path)
    except (tifffile.TiffFileError, ValueError, struct.error) as error:
        raise ValueError(f"{path}: not a readable TIFF ({error})") from None
    if len(axes) != array.ndim:
        axes = _DEFAULT_AXES.get(array.ndim, "?" * array.ndim)
    meta["axes"] = axes
    meta["spacing"] = tuple(float(spacing.get(a, 1.0)) for a in axes)
    meta["spacing_known"] = all(a in spacing for a in axes if a in "ZYX")
    meta.setdefault("unit", "um")
    return array, meta


def _in_micrometres(spacing: dict[str, float], tif: Any, page: Any) -> dict[str, float]:
    """Convert ImageJ / TIFF resolution units to micrometres; drop what has no length unit."""
    if tif.imagej_metadata:
        unit = str(tif.imagej_metadata.get("unit", "micron")).strip().lower()
        factor = _UNITS_UM.get(unit)
    else:
        # Plain TIFFs: centimetres convert; inches (the 72 or 300 dpi of image editors) and
        # "no unit" say nothing about a microscope's voxels.
        unit_tag = page.tags.get("ResolutionUnit")
        factor = 1e4 if unit_tag is not None and int(unit_tag.value) == 3 else None
        spacing = {k: v for k, v in spacing.items() if k in "XY"}
    if factor is None:
        return {}
    return {axis: value * factor for axis, value in spacing.items()}


def _check_complete(tif: Any, path: Path) -> None:
    """Refuse a file cut short (an interrupted write or copy): tifffile reads what is there and
    would hand back a stack with planes missing or zeroed."""
    size = path.stat().st_size
    series = tif.series[0]
    expected = (tif.imagej_metadata or {}).get("images")
    planes = int(np.prod(series.shape[:-2])) if len(series.shape) > 2 else 1
    if series.axes.endswith("S"):
        planes = int(np.prod(series.shape[:-3])) if len(series.shape) > 3 else 1
    if expected and planes < int(expected):
        raise ValueError(f"truncated: {planes} of {expected} planes present")
    if series.dataoffset is not None:
        end = series.dataoffset + int(np.prod(series.shape)) * series.dtype.itemsize
        if end > size:
            raise ValueError("truncated: image data runs past the end of the file")
        return
    for page in series.pages:
        if page is None:
            raise ValueError("truncated: a plane is missing")
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            if offset + count > size:
                raise ValueError("truncated: image data runs past the end of the file")


def imwrite(path: str | os.PathLike, array: Any, meta: dict[str, Any] | None = None) -> None:
    """Write ``array`` as an ImageJ TIFF with voxel size and provenance, atomically.

    Parameters
    ----------
    path : str or path-like
        Destination; its folder must exist.
    array : array_like
        uint8, uint16 or float32 data (other floats are stored as float32), up to TZCYX.
    meta : dict, optional
        ``axes`` (default "X", "YX", "ZYX", "TZYX", "TZCYX" by dimension), ``spacing`` (micrometres per axis),
        ``provenance`` (a JSON-serializable dict stored in the ImageJ Info field), and any
        other scalar keys (stored as ImageJ properties).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "restored.tif")
    >>> imwrite(path, np.ones((4, 8, 8), np.float32), {"spacing": (0.2, 0.1, 0.1),
    ...                                                   "provenance": {"method": "rl"}})
    >>> imread(path)[1]["provenance"]
    {'method': 'rl'}
    """
    import tifffile

    from ._backend import is_device_array

    meta = dict(meta or {})
    data = array.get() if is_device_array(array) else np.asarray(array)
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    if data.dtype not in (np.uint8, np.uint16, np.float32):
        raise TypeError(f"array dtype {data.dtype} cannot be stored; use uint8, uint16 or float32")
    axes = meta.pop("axes", None) or _DEFAULT_AXES.get(data.ndim, "")
    if len(axes) != data.ndim or any(a not in _IMAGEJ_AXES for a in axes):
        raise ValueError(f"axes {axes!r} do not describe an array of {data.ndim} axes in TZCYX order")
    spacing = dict(zip(axes, meta.pop("spacing", None) or (1.0,) * data.ndim))
    provenance = meta.pop("provenance", None)
    for key in (
        "spacing_known",
        "ImageJ",
        "images",
        "slices",
        "frames",
        "channels",
        "hyperstack",
        "mode",
        "unit",
        "loop",
        "min",
        "max",
    ):
        meta.pop(key, None)
    extra = {k: v for k, v in meta.items() if isinstance(v, (int, float, str))}
    imagej = {"axes": axes, "unit": "um", **extra}
    if "Z" in spacing:
        imagej["spacing"] = float(spacing["Z"])
    if provenance is not None:
        imagej["Info"] = json.dumps(provenance, default=str)
    resolution = (1.0 / float(spacing.get("X", 1.0)), 1.0 / float(spacing.get("Y", 1.0)))
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        tifffile.imwrite(temporary, data, imagej=True, resolution=resolution, metadata=imagej)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
