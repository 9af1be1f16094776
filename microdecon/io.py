"""Reading and writing images with their axes, voxel size, channels and provenance.

This module owns every file microdecon touches: ImageJ TIFF, OME-TIFF and OME-Zarr (NGFF).

``imread`` returns the array (NumPy, or Dask with ``lazy=True``) and one metadata dict whatever
the format: ``axes`` (letters from T, C, Z, Y, X, in the array's order), ``spacing`` (micrometres
per axis), ``spacing_known``, ``unit``, and where the file has them ``channel_names``,
``wavelengths``, ``excitation_wavelengths``, ``provenance``, ``scale`` and ``offset``.

``imwrite`` picks the format from the extension and writes atomically: to a temporary file or
folder beside the destination first, moved into place only when complete, so an interrupted job
never leaves a truncated file that looks finished, and a failed write leaves an existing file as it
was. Dask arrays are written block by block, never held in memory whole.

What a format has no field for (the caller's axis order where the format prescribes one, the uint16
scale, channel names in ImageJ files, the provenance) travels in a small JSON record under the
key ``"microdecon"``: in the ImageJ ``Info`` field, the OME ``Image/Description`` or the Zarr group
attributes.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import uuid
import weakref
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["imread", "imwrite"]

_AXES = "TCZYX"
_SPATIAL = "ZYX"
_IMAGEJ_ORDER = "TZCYX"  # the only order ImageJ hyperstacks allow
_NGFF_ORDER = "TCZYX"  # NGFF 0.4: time, then channel, then space
_DEFAULT_AXES = {1: "X", 2: "YX", 3: "ZYX", 4: "TZYX", 5: "TZCYX"}
_RECORD = "microdecon"
_RECORD_VERSION = 1
_EXTENSIONS = ".tif/.tiff (ImageJ TIFF), .ome.tif/.ome.tiff (OME-TIFF) or .zarr (OME-Zarr)"
_DTYPES = {"float32": np.dtype(np.float32), "uint16": np.dtype(np.uint16)}
_UINT16_MAX = 65535
_BIGTIFF_BYTES = 2**31  # some readers take classic TIFF offsets as signed 32-bit
_ZARR_CHUNK_BYTES = 16 * 2**20
_ZARR_PLANE_MAX = 2048
_TILE_CHUNK_BYTES = 2**20  # a lazy read of a tiled TIFF groups its tiles into chunks of about this

# length units as ImageJ, OME and NGFF (UDUNITS-2) write them, in micrometres
_UNITS_UM = {
    "pm": 1e-6,
    "picometer": 1e-6,
    "\u00e5": 1e-4,
    "angstrom": 1e-4,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "micron": 1.0,
    "microns": 1.0,
    "um": 1.0,
    "\u00b5m": 1.0,
    "\u03bcm": 1.0,
    "\\u00b5m": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "mm": 1e3,
    "millimeter": 1e3,
    "millimetre": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "centimetre": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "metre": 1e6,
    "in": 25400.0,
    "inch": 25400.0,
}
_NGFF_TYPES = {"T": "time", "C": "channel", "Z": "space", "Y": "space", "X": "space"}
_CHANNEL_KEYS = ("channel_names", "wavelengths", "excitation_wavelengths")
# keys the formats manage themselves: never passed on as free-form properties
_RESERVED = frozenset(
    {
        "axes",
        "spacing",
        "spacing_known",
        "unit",
        "provenance",
        "scale",
        "offset",
        *_CHANNEL_KEYS,
        "ImageJ",
        "images",
        "slices",
        "frames",
        "channels",
        "hyperstack",
        "mode",
        "loop",
        "min",
        "max",
        "Info",
        "Labels",
        "Ranges",
        "LUTs",
    }
)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def imread(path: str | os.PathLike, *, lazy: bool = False) -> tuple[Any, dict[str, Any]]:
    """Read a TIFF (plain, ImageJ, OME) or a Zarr / OME-Zarr store with its metadata.

    Parameters
    ----------
    path : str or path-like
        A TIFF file, or a Zarr directory: a plain Zarr array, or an OME-NGFF (0.4 or 0.5) image
        group, of which the full-resolution dataset (the first) is read.
    lazy : bool, optional
        Return a Dask array that reads on ``compute()`` instead of a NumPy array (default False).
        A TIFF is chunked one plane per block (a tiled TIFF in blocks of whole tiles of about
        1 MiB), a Zarr array as stored. The metadata are the same as for an eager read.

    Returns
    -------
    array : numpy.ndarray or dask.array.Array
        The pixels, stored values as they are (see ``scale`` below), axes in the order ``axes``
        gives. A file microdecon wrote comes back in the order it was given, even where the
        format prescribes another.
    meta : dict
        ``axes``
            str, one letter per array axis from T, C, Z, Y, X (e.g. "TCZYX", "CZYX", "ZYX").
            Axes the file leaves unnamed become Z, then T, then C; colour samples become C.
        ``spacing``
            tuple of float, micrometres per axis; 1.0 for T and C and where unknown.
        ``spacing_known``
            bool, whether the file gives the voxel size of every spatial axis in a length unit.
        ``unit``
            "um", the unit of ``spacing``.
        ``channel_names``, ``wavelengths``, ``excitation_wavelengths``
            Where the file has them: lists with one entry per channel (one for an image with
            no C axis); names are str ("" when unnamed), wavelengths micrometres or None.
        ``provenance``
            dict, when microdecon wrote the file with one.
        ``scale``, ``offset``
            float, when microdecon stored floats as uint16: the values are
            ``array * scale + offset``.

        ImageJ files add their own keys (``images``, ``slices``, ...); text that is not
        microdecon's record comes back as ``info`` (ImageJ) or ``description`` (OME).

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        The file is not a readable TIFF or Zarr store, or is truncated.

    Notes
    -----
    A lazy read keeps no file open: each block opens the file (or store) by its path when it is
    computed and reads what it holds (its planes; of a tiled TIFF, its tiles), not the rest. The
    array therefore pickles, and computes on the worker processes of a ``dask.distributed``
    cluster that see the file at the same path. Pixels changed in place are read as they are then.
    A lazy TIFF array refuses (``ValueError``) to read a file that was replaced since (another
    file now at the path, as after ``imwrite`` to the same path; told by its inode number) or that
    changed size: a lazy array can be written back to its own file, but is not to be used after
    that; read the new file instead.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.tif")
    >>> imwrite(path, np.zeros((2, 3, 4), np.float32), {"spacing": (0.3, 0.1, 0.1)})
    >>> image, meta = imread(path)
    >>> image.shape, meta["axes"], meta["spacing"]
    ((2, 3, 4), 'ZYX', (0.3, 0.1, 0.1))
    >>> lazy, _ = imread(path, lazy=True)
    >>> type(lazy).__name__, lazy.chunksize, bool((lazy.compute() == image).all())
    ('Array', (1, 3, 4), True)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        return _read_zarr(path, lazy)
    return _read_tiff(path, lazy)


def _read_tiff(path: Path, lazy: bool) -> tuple[Any, dict[str, Any]]:
    import tifffile

    tif = None
    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        _check_complete(tif, path)
        file_axes = _letters(series.axes)
        if len(file_axes) != len(series.shape):
            raise ValueError(f"axes {series.axes!r} do not match the shape {series.shape}")
        spacing, found, record, base = _tiff_metadata(tif)
        array = _lazy_tiff(tif, series, path) if lazy else series.asarray()
    except (tifffile.TiffFileError, ValueError, IndexError, struct.error) as error:
        raise ValueError(f"{path}: not a readable TIFF ({error})") from None
    finally:
        if tif is not None:
            tif.close()  # a lazy array opens the file by its path when it reads
    return _finish(array, file_axes, spacing, found, record, base)


def _lazy_tiff(tif: Any, series: Any, path: Path) -> Any:
    """A Dask array over the series that reads the file by its path, one plane or tile block per chunk."""
    import dask.array as da
    from dask.base import tokenize

    source = _TiffSource(tif, series, path)
    name = "imread-" + tokenize(*source.token)
    meta = np.empty((0,) * len(source.shape), source.dtype)
    _SOURCES[name] = source
    return da.from_array(source, chunks=source.chunks, name=name, lock=False, meta=meta)


#: The readers behind the lazy TIFF arrays ``imread`` made, by their Dask names (while the
#: arrays live): see :func:`region_source`.
_SOURCES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def region_source(array: Any) -> Any | None:
    """The file reader behind a lazy array from ``imread(..., lazy=True)`` that is still as it
    was returned (not sliced, transposed or computed on), or None.

    Indexing it with a tuple of slices reads that region straight from the file: each plane
    once, and of a tiled TIFF only the tiles the region touches. The tiler reads each tile's
    region so: through the Dask chunks, neighbouring tiles' overlaps read the chunks they share
    again (six times over, for 342-pixel tiles on 512-pixel chunks), one task per chunk.
    """
    name = getattr(array, "name", None)
    return _SOURCES.get(name) if isinstance(name, str) else None


class _TiffSource:
    """A TIFF series as a picklable array-like that reads the file by its path on each access.

    Built from the metadata alone (no pixels are read). It holds the path, the layout and where each
    plane lies in the file, never an open file, so it pickles and reads as well in the worker processes
    of a cluster (that share the file system) as here. Each ``__getitem__`` opens the file, reads the
    planes it needs (and of a tiled plane only the tiles it needs), and closes it.

    Three layouts:

    ``"raw"``
        Uncompressed contiguous pixels (what ``imwrite`` writes): read from their byte offset.
    ``"pages"``
        One TIFF page (IFD) per plane: the page is parsed at its recorded offset and decoded,
        a tiled page tile by tile.
    ``"series"``
        Anything else (a series spread over several files, pages that do not stack): read whole,
        as one chunk, through tifffile's series.

    A file replaced since the read (another inode) or grown or shrunk is refused; changes made in
    place are read.
    """

    def __init__(self, tif: Any, series: Any, path: Path) -> None:
        self.path = os.path.abspath(path)
        self.shape = tuple(int(n) for n in series.shape)
        self.dtype = np.dtype(series.dtype).newbyteorder("=")
        self.ndim = len(self.shape)
        stat = os.fstat(tif.filehandle.fileno())  # the file the metadata came from
        self._identity = (stat.st_ino, stat.st_size)
        self.token = (os.path.realpath(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
        self._file_dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
        key = series.keyframe
        lead = _plane_axes(self.shape, int(key.size))
        self._mode, self._offset, self._ifds = "series", 0, ()
        if lead is not None and series.dataoffset is not None:
            self._mode, self._offset = "raw", int(series.dataoffset)
        elif lead is not None and len(series.pages) == math.prod(self.shape[:lead]):
            pages = list(series.pages)  # parsed already, by the check for a truncated file
            if all(p is not None and p.parent is tif for p in pages):  # not OME's other files
                self._mode, self._ifds = "pages", tuple(int(p.offset) for p in pages)
        if self._mode == "series":
            lead = 0
        self._lead = lead
        self._page_shape = tuple(int(n) for n in key.shape)
        self._whole_pages = self.shape[lead:] == self._page_shape
        chunks: list[tuple[int, ...]] = [(1,) * n for n in self.shape[:lead]]
        chunks += [(n,) for n in self.shape[lead:]]
        if self._mode != "series" and self._whole_pages and key.is_tiled and key.tiledepth == 1:
            # blocks of whole tiles, about _TILE_CHUNK_BYTES each: a chunk reads only its own tiles
            tile = (int(key.tilelength), int(key.tilewidth))
            samples = math.prod(self._page_shape) // max(1, int(key.imagelength) * int(key.imagewidth))
            tile_bytes = math.prod(tile) * samples * self.dtype.itemsize
            per_side = max(1, math.isqrt(_TILE_CHUNK_BYTES // max(1, tile_bytes)))
            for letter, size in zip("YX", tile):
                axis = lead + key.axes.index(letter)
                chunks[axis] = _blocks(self.shape[axis], size * per_side)
        self.chunks = tuple(chunks)

    def __getitem__(self, key: Any) -> np.ndarray:
        box, rest = _bounding_box(key, self.shape)
        return self._read(box)[rest]

    def _read(self, box: list[tuple[int, int]]) -> np.ndarray:
        out = np.empty([hi - lo for lo, hi in box], self.dtype)
        if out.size == 0:
            return out
        lead, tail = box[: self._lead], box[self._lead :]
        region = tuple(slice(lo, hi) for lo, hi in tail)
        with open(self.path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            inode, size = self._identity
            if stat.st_size != size or (inode and stat.st_ino != inode):  # 0: no inodes here
                raise _ChangedFile(
                    f"{self.path}: the file was replaced or changed size after it was read lazily; "
                    "read it again"
                )
            try:
                if self._mode == "series":
                    import tifffile

                    with tifffile.TiffFile(handle) as tif:
                        return np.asarray(tif.series[0].asarray())[region]
                tif = None
                if self._mode == "pages":
                    import tifffile

                    tif = tifffile.TiffFile(handle)
                try:
                    for index in np.ndindex(*out.shape[: self._lead]):
                        plane = int(
                            np.ravel_multi_index(
                                [i + lo for i, (lo, _) in zip(index, lead)], self.shape[: self._lead]
                            )
                        )
                        if tif is None:
                            out[index] = self._read_raw(handle, plane, tail)
                        else:
                            out[index] = self._read_page(tif, plane, region)
                finally:
                    if tif is not None:
                        tif.close()
            except _ChangedFile:
                raise
            except Exception as error:  # tifffile's errors, short reads: the file is not what it was
                raise ValueError(
                    f"{self.path}: cannot read the lazily opened TIFF ({type(error).__name__}: {error}); "
                    "was it changed since?"
                ) from error
        return out

    def _read_raw(self, handle: Any, plane: int, tail: list[tuple[int, int]]) -> np.ndarray:
        """Rows ``tail[0]`` of one plane, every column: one contiguous run of bytes."""
        shape = self.shape[self._lead :]
        row = math.prod(shape[1:])
        (first, last), others = tail[0], tail[1:]
        start = self._offset + (plane * math.prod(shape) + first * row) * self._file_dtype.itemsize
        count = (last - first) * row
        handle.seek(start)
        data = handle.read(count * self._file_dtype.itemsize)
        if len(data) != count * self._file_dtype.itemsize:
            raise EOFError("image data runs past the end of the file")
        rows = np.frombuffer(data, self._file_dtype, count).reshape((last - first, *shape[1:]))
        return rows[(slice(None), *(slice(lo, hi) for lo, hi in others))].astype(self.dtype)

    def _read_page(self, tif: Any, plane: int, region: tuple[slice, ...]) -> np.ndarray:
        """``region`` of one page, parsed where the page was found; a tiled page reads its tiles only."""
        import tifffile

        tif.filehandle.seek(self._ifds[plane])
        page = tifffile.TiffPage(tif, index=plane)
        if tuple(page.shape) != self._page_shape or np.dtype(page.dtype) != self.dtype:
            raise _ChangedFile(
                f"{self.path}: page {plane} changed after the file was read lazily; read it again"
            )
        shape = self.shape[self._lead :]
        full = all(s.start == 0 and s.stop == n for s, n in zip(region, shape))
        if full or not self._whole_pages:
            return page.asarray(maxworkers=1).reshape(shape)[region]  # Dask runs chunks in parallel
        import zarr

        return np.asarray(zarr.open_array(page.aszarr(), mode="r")[region])


class _ChangedFile(ValueError):
    """The file behind a lazy TIFF array is no longer the one it was read from."""


def _plane_axes(shape: tuple[int, ...], plane_size: int) -> int | None:
    """How many leading axes index the planes: the most for which the rest hold one plane's pixels."""
    for lead in range(len(shape) - 1, -1, -1):
        if math.prod(shape[lead:]) == plane_size:
            return lead
    return None


def _blocks(size: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, size - start) for start in range(0, size, step)) or (0,)


def _bounding_box(key: Any, shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], tuple]:
    """The box of ``shape`` that ``key`` selects from, and the index that picks the selection from the box."""
    key = key if isinstance(key, tuple) else (key,)
    used = sum(k is not None and k is not Ellipsis for k in key)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        key = key[:at] + (slice(None),) * (len(shape) - used) + key[at + 1 :]
    key = key + (slice(None),) * (len(shape) - sum(k is not None for k in key))
    box: list[tuple[int, int]] = []
    rest: list[Any] = []
    axis = 0
    for k in key:
        if k is None:
            rest.append(None)
            continue
        n = shape[axis]
        axis += 1
        if isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            if not 0 <= i < n:
                raise IndexError(f"index {k} is out of bounds for an axis of size {n}")
            box.append((i, i + 1))
            rest.append(0)
        elif isinstance(k, slice):
            start, stop, step = k.indices(n)
            count = len(range(start, stop, step))
            if count == 0:
                box.append((0, 0))
                rest.append(slice(0, 0))
            elif step > 0:
                box.append((start, start + (count - 1) * step + 1))
                rest.append(slice(0, None, step))
            else:
                low = start + (count - 1) * step
                box.append((low, start + 1))
                rest.append(slice(start - low, None, step))
        else:  # lists and arrays: the whole axis, indexed afterwards
            box.append((0, n))
            rest.append(k)
    return box, tuple(rest)


def _tiff_metadata(tif: Any) -> tuple[dict[str, float], dict, dict | None, dict[str, Any]]:
    """Voxel size (micrometres, known axes only), channel lists, microdecon's record, other keys."""
    spacing: dict[str, float] = {}
    found: dict[str, list] = {}
    record = None
    base: dict[str, Any] = {}
    page = tif.pages.first
    if tif.is_ome and tif.ome_metadata:
        ome = _ome_metadata(tif.ome_metadata)
        spacing.update(ome.pop("spacing"))
        description = ome.pop("description", None)
        found = ome
        if description:
            record = _parse_record(description)
            if record is None:
                base["description"] = description
    elif tif.imagej_metadata is not None:
        imagej = tif.imagej_metadata
        base.update({k: v for k, v in imagej.items() if k not in ("Info", "spacing", "unit")})
        raw = _resolution(page)
        if "spacing" in imagej:
            raw["Z"] = float(imagej["spacing"])
        factor = _UNITS_UM.get(str(imagej.get("unit", "micron")).strip().lower())
        if factor is not None:
            spacing = {axis: value * factor for axis, value in raw.items()}
        info = imagej.get("Info")
        if info:
            record = _parse_record(info)
            if record is None:
                try:
                    base["provenance"] = json.loads(info)  # written by microdecon before the record
                except ValueError:
                    base["info"] = info
    else:
        # Plain TIFFs: centimetres convert; inches (the 72 or 300 dpi of image editors) and
        # "no unit" say nothing about a microscope's voxels.
        unit = page.tags.get("ResolutionUnit")
        if unit is not None and int(unit.value) == 3:
            spacing = {axis: value * 1e4 for axis, value in _resolution(page).items()}
    return spacing, found, record, base


def _resolution(page: Any) -> dict[str, float]:
    """Pixel size in the file's unit from the resolution tags (pixels per unit); (1, 1) is no value."""
    spacing = {}
    for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
        if tag in page.tags:
            num, den = page.tags[tag].value
            if num and den and (num, den) != (1, 1):
                spacing[axis] = den / num
    return spacing


def _ome_metadata(xml: str) -> dict[str, Any]:
    """Voxel size, channels and description of the first image in an OME-XML document."""
    result: dict[str, Any] = {"spacing": {}}
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return result  # the pixels are still readable; their calibration is unknown
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    image = root.find(f"{ns}Image")
    pixels = image.find(f"{ns}Pixels") if image is not None else None
    if pixels is None:
        return result
    for axis in _SPATIAL:
        # OME's default length unit is the micrometre, its default wavelength unit the nanometre
        size = _length(pixels.get(f"PhysicalSize{axis}"), pixels.get(f"PhysicalSize{axis}Unit", "\u00b5m"))
        if size is not None and size > 0:
            result["spacing"][axis] = size
    channels = pixels.findall(f"{ns}Channel")
    if channels:
        result["channel_names"] = [c.get("Name", "") for c in channels]
        for key, attribute in (("wavelengths", "Emission"), ("excitation_wavelengths", "Excitation")):
            result[key] = [
                _length(c.get(f"{attribute}Wavelength"), c.get(f"{attribute}WavelengthUnit", "nm"))
                for c in channels
            ]
    description = image.findtext(f"{ns}Description")
    if description and description.strip():
        result["description"] = description.strip()
    return result


def _length(value: Any, unit: str | None) -> float | None:
    """``value`` in ``unit`` as micrometres; None when either is missing or not a length."""
    if value is None or unit is None:
        return None
    factor = _UNITS_UM.get(str(unit).strip().lower())
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if factor is None or not math.isfinite(number):
        return None
    return number * factor


def _parse_record(text: str) -> dict[str, Any] | None:
    """microdecon's record from a JSON text, or None when the text is something else."""
    try:
        content = json.loads(text)
    except ValueError:
        return None
    if isinstance(content, dict) and isinstance(content.get(_RECORD), dict):
        return content[_RECORD]
    return None


def _read_zarr(path: Path, lazy: bool) -> tuple[Any, dict[str, Any]]:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
        attrs = dict(node.attrs)
        if isinstance(node, zarr.Array):
            array_node = node
            record = attrs.get(_RECORD) if isinstance(attrs.get(_RECORD), dict) else {}
            names = record.get("axes") or attrs.get("_ARRAY_DIMENSIONS")
            if names is None:
                file_axes = _DEFAULT_AXES.get(node.ndim, "")
            else:
                file_axes = _letters("".join(str(n)[:1] for n in names))
            spacing = {a: float(v) for a, v in zip(file_axes, record.get("spacing") or ()) if a in _SPATIAL}
            record = {k: v for k, v in record.items() if k not in ("axes", "spacing")}
            found: dict[str, Any] = {}
        else:
            array_node, file_axes, spacing, found, record = _ngff(node, attrs)
        if len(file_axes) != array_node.ndim:
            raise ValueError(f"axes {file_axes!r} do not match the shape {array_node.shape}")
        if lazy:
            import dask.array as da
            from dask.base import tokenize

            stat = path.stat()
            name = "imread-" + tokenize(str(path.resolve()), stat.st_ino, stat.st_mtime_ns)
            array = da.from_zarr(array_node, name=name)
        else:
            array = array_node[...]
    except Exception as error:  # zarr's own errors, malformed JSON and metadata all mean the same
        raise ValueError(f"{path}: not a readable Zarr ({type(error).__name__}: {error})") from None
    return _finish(array, file_axes, spacing, found, record, {})


def _ngff(group: Any, attrs: dict[str, Any]) -> tuple[Any, str, dict[str, float], dict, dict]:
    """Dataset 0 of an OME-NGFF image group, its axes, voxel size, channel labels and record."""
    ome = attrs.get("ome") if isinstance(attrs.get("ome"), dict) else attrs  # 0.5 nests under "ome"
    multiscales = ome.get("multiscales")
    if not multiscales:
        raise ValueError("a group without OME-NGFF multiscales metadata")
    multiscale = multiscales[0]
    dataset = multiscale["datasets"][0]
    array_node = group[dataset["path"]]
    axes_meta = multiscale.get("axes")
    if axes_meta is None:  # NGFF 0.1 and 0.2 are always 5-D, t c z y x
        axes_meta = [{"name": a} for a in "tczyx"[-array_node.ndim :]]
    axes_meta = [a if isinstance(a, dict) else {"name": str(a)} for a in axes_meta]
    codes = ""
    for axis in axes_meta:
        name = str(axis.get("name", "")).upper()
        kind = str(axis.get("type", "")).lower()
        codes += name if name in _AXES else {"time": "T", "channel": "C"}.get(kind, "Q")
    file_axes = _letters(codes)
    scale = [1.0] * len(axes_meta)
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for transform in transforms or ():
            if transform.get("type") == "scale" and "scale" in transform:
                scale = [a * float(b) for a, b in zip(scale, transform["scale"])]
    spacing = {}
    for letter, axis, value in zip(file_axes, axes_meta, scale):
        size = _length(value, axis.get("unit"))
        if letter in _SPATIAL and size is not None and size > 0:
            spacing[letter] = size
    found = {}
    omero = ome.get("omero") or attrs.get("omero") or {}
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if channels and any("label" in c for c in channels):
        found["channel_names"] = [str(c.get("label", "")) for c in channels]
    record = attrs.get(_RECORD) if isinstance(attrs.get(_RECORD), dict) else {}
    return array_node, file_axes, spacing, found, record


def _letters(codes: str) -> str:
    """Map a file's axis codes (tifffile's, or NGFF names) to the letters T, C, Z, Y, X."""
    codes = codes.upper()
    out = [c if c in _AXES else "" for c in codes]
    named = [c for c in out if c]
    if len(set(named)) != len(named):
        raise ValueError(f"axes {codes!r} repeat a letter")
    for i, code in enumerate(codes):
        if not out[i] and code in "SE" and "C" not in out:  # colour samples, wavelengths
            out[i] = "C"
    generic = [i for i, c in enumerate(out) if not c]
    free = [c for c in "TZC" if c not in out]
    if len(generic) > len(free):
        raise ValueError(f"axes {codes!r} cannot be told apart with the letters T, C, Z, Y, X")
    if len(generic) == 1 and "Z" in free:
        free = ["Z"]  # one unnamed axis beside the plane is a stack's depth
    for i, letter in zip(generic, free):
        out[i] = letter
    return "".join(out)


def _reorder(array: Any, axes: str, wanted: Any) -> tuple[Any, str]:
    """Bring a stored array back to the caller's axis order, dropping axes added to store it."""
    if not isinstance(wanted, str) or wanted == axes:
        return array, axes
    added = [a for a in axes if a not in wanted]
    if sorted(wanted) != sorted(a for a in axes if a in wanted) or any(
        array.shape[axes.index(a)] != 1 for a in added
    ):
        return array, axes  # the file changed since microdecon wrote it: trust the file
    array = array[tuple(0 if a in added else slice(None) for a in axes)]
    kept = "".join(a for a in axes if a not in added)
    array = array.transpose([kept.index(a) for a in wanted])
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)
    return array, wanted


def _finish(
    array: Any,
    file_axes: str,
    spacing: dict[str, float],
    found: dict[str, Any],
    record: dict[str, Any] | None,
    base: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """The array in its caller's order and the metadata dict, the same for every format."""
    record = record or {}
    recorded_spacing = record.get("spacing")
    if isinstance(recorded_spacing, dict):  # what the format's own fields could not hold
        for axis, value in recorded_spacing.items():
            spacing.setdefault(axis, float(value))
    array, axes = _reorder(array, file_axes, record.get("axes"))
    meta = dict(base)
    extra = record.get("extra")
    if isinstance(extra, dict):
        meta.update({k: v for k, v in extra.items() if k not in _RESERVED})
    meta["axes"] = axes
    meta["spacing"] = tuple(float(spacing.get(a, 1.0)) if a in _SPATIAL else 1.0 for a in axes)
    meta["spacing_known"] = all(a in spacing for a in axes if a in _SPATIAL)
    meta["unit"] = "um"
    channels = array.shape[axes.index("C")] if "C" in axes else 1
    for key in _CHANNEL_KEYS:
        values = _merge_channels(found.get(key), record.get(key), channels, names=key == "channel_names")
        if values is not None:
            meta[key] = values
    if "provenance" in record:
        meta["provenance"] = record["provenance"]
    if "scale" in record and "offset" in record:
        meta["scale"], meta["offset"] = float(record["scale"]), float(record["offset"])
    return array, meta


def _merge_channels(standard: Any, recorded: Any, channels: int, *, names: bool) -> list | None:
    """One value per channel: the format's own field first, microdecon's record for the gaps."""
    sources = [s for s in (standard, recorded) if isinstance(s, list) and len(s) == channels]
    if not sources:
        return None
    merged = []
    for values in zip(*sources):
        value = next((v for v in values if v not in (None, "")), None)
        merged.append(str(value or "") if names else (None if value is None else float(value)))
    if all(v in (None, "") for v in merged):
        return None
    return merged


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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def imwrite(
    path: str | os.PathLike,
    array: Any,
    meta: dict[str, Any] | None = None,
    *,
    dtype: str = "float32",
) -> None:
    """Write an image with its axes, voxel size, channels and provenance, atomically.

    Parameters
    ----------
    path : str or path-like
        Destination; its folder must exist. The extension picks the format: ``.ome.tif`` or
        ``.ome.tiff`` an OME-TIFF, any other ``.tif`` or ``.tiff`` an ImageJ TIFF, ``.zarr`` an
        OME-Zarr (NGFF 0.4) image with one dataset ``"0"``. An existing file (or, for ``.zarr``,
        an existing Zarr store) is replaced; any other directory is left alone.
    array : array_like, cupy.ndarray or dask.array.Array
        Up to five axes (T, C, Z, Y, X in any order). CuPy arrays are copied to the host. A Dask
        array is computed and written block by block, so the volume never has to fit in memory.
    meta : dict, optional
        ``axes`` (default "X", "YX", "ZYX", "TZYX", "TZCYX" by dimension), ``spacing``
        (micrometres, one per axis or one per spatial axis; left out or with
        ``spacing_known=False`` the voxel size is stored as unknown), ``channel_names``,
        ``wavelengths`` and ``excitation_wavelengths`` (one per channel, micrometres or None),
        ``provenance`` (a JSON-serializable dict), and any other keys with str, int, float or
        bool values (ImageJ properties, whose names ImageJ lower-cases; in microdecon's record
        elsewhere). The dict ``imread`` returns can be passed back as it is.
    dtype : {"float32", "uint16"}, optional
        How values are stored. float32 (the default) keeps uint8 and uint16 input as it is and
        stores any other numbers as float32. uint16 stores numbers scaled to the full range,
        ``stored = round((value - offset) / scale)`` with ``offset = min(0, minimum)`` and
        ``scale = (maximum - offset) / 65535``, and records ``scale`` and ``offset`` so that
        ``imread`` returns them; ``stored * scale + offset`` is within ``scale / 2`` of each value.
        For a Dask array the minimum and maximum take one extra pass over the data before the
        write. uint8 and uint16 input is never rescaled: it is stored as it is (uint8 widened to
        uint16), and the ``scale`` and ``offset`` in ``meta``, if any, stay with it.

    Raises
    ------
    ValueError
        An unsupported extension or ``dtype``, axes or per-axis values that do not fit the array,
        values uint16 cannot hold (NaN, infinity), or a destination that is a directory (other
        than a Zarr store replaced by Zarr).
    TypeError
        Data that cannot be stored as numbers (complex, objects).
    FileNotFoundError
        The destination folder does not exist.

    Notes
    -----
    ImageJ requires the order TZCYX, NGFF 0.4 the order TCZYX, and TIFF needs Y and X: the data are
    transposed (and a missing Y or X added with length 1) for storage, and ``imread`` restores the
    caller's order. OME-TIFF keeps any order that ends in YX.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> path = os.path.join(folder, "restored.tif")
    >>> imwrite(path, np.ones((4, 8, 8), np.float32), {"spacing": (0.2, 0.1, 0.1),
    ...                                                   "provenance": {"method": "rl"}})
    >>> imread(path)[1]["provenance"]
    {'method': 'rl'}

    Two channels as OME-Zarr, and floats stored as uint16:

    >>> data = np.stack([np.full((3, 4, 5), 1.5), np.full((3, 4, 5), 3.0)]).astype(np.float32)
    >>> imwrite(os.path.join(folder, "cells.zarr"), data,
    ...         {"axes": "CZYX", "spacing": (0.5, 0.1, 0.1), "channel_names": ["dapi", "gfp"]})
    >>> back, meta = imread(os.path.join(folder, "cells.zarr"))
    >>> meta["axes"], meta["spacing"], meta["channel_names"]
    ('CZYX', (1.0, 0.5, 0.1, 0.1), ['dapi', 'gfp'])
    >>> imwrite(os.path.join(folder, "small.tif"), data, {"axes": "CZYX"}, dtype="uint16")
    >>> stored, meta = imread(os.path.join(folder, "small.tif"))
    >>> stored.dtype, stored.max(), float(stored.max() * meta["scale"] + meta["offset"])
    (dtype('uint16'), np.uint16(65535), 3.0)
    """
    path = Path(path)
    kind = _format_of(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist")
    try:
        target = _DTYPES[str(np.dtype(dtype))]
    except (TypeError, KeyError):
        raise ValueError(f"dtype must be 'float32' or 'uint16', not {dtype!r}") from None
    if kind == "zarr" and path.exists() and not _is_zarr(path):
        raise ValueError(f"{path}: exists and is not a Zarr store; it is not replaced")
    if kind != "zarr" and path.is_dir():
        raise ValueError(f"{path}: is a directory; it is not replaced")
    meta = dict(meta or {})
    data = _on_host(array)
    if data.ndim == 0:
        raise ValueError("array has no axes; an image needs at least one")
    axes = _check_axes(meta.get("axes") or _DEFAULT_AXES.get(data.ndim, ""), data.ndim)
    spacing = _check_spacing(meta, axes)
    channels = data.shape[axes.index("C")] if "C" in axes else 1
    data, scale, offset = _encode(data, target, meta)
    record: dict[str, Any] = {"version": _RECORD_VERSION, "axes": axes}
    if spacing:
        record["spacing"] = spacing
    for key in _CHANNEL_KEYS:
        values = _check_channels(meta.get(key), key, channels)
        if values is not None:
            record[key] = values
    if meta.get("provenance") is not None:
        record["provenance"] = meta["provenance"]
    if scale is not None:
        record["scale"], record["offset"] = scale, offset
    extra = {
        k: v
        for k, v in meta.items()
        if isinstance(k, str) and k not in _RESERVED and isinstance(v, (bool, int, float, str))
    }
    # Stored order: what the format prescribes, with Y and X present.
    for axis in "YX":
        if axis not in axes:
            data = data[..., None]
            axes += axis
    if kind == "imagej":
        stored = "".join(a for a in _IMAGEJ_ORDER if a in axes)
    elif kind == "ome":
        stored = "".join(a for a in axes if a not in "YX") + "YX"
    else:
        stored = "".join(a for a in _NGFF_ORDER if a in axes)
    data = data.transpose([axes.index(a) for a in stored])
    _sweep_stale(path)
    if kind == "zarr":
        record["extra"] = extra
        _write_zarr(path, data, stored, spacing, record)
    else:
        _write_tiff(path, data, stored, spacing, record, extra, kind)


def _format_of(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return "ome"
    if name.endswith((".tif", ".tiff")):
        return "imagej"
    if name.endswith(".zarr"):
        return "zarr"
    raise ValueError(f"{path}: unsupported extension; use {_EXTENSIONS}")


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in (".zgroup", ".zarray", "zarr.json"))


def _is_dask(array: Any) -> bool:
    dask_array = sys.modules.get("dask.array")  # a Dask array means Dask is already imported
    return dask_array is not None and isinstance(array, dask_array.Array)


def _to_host(block: Any) -> Any:
    return block.get() if hasattr(block, "get") else np.asarray(block)


def _on_host(array: Any) -> Any:
    """NumPy array, or Dask array of NumPy blocks."""
    from ._backend import is_device_array

    if _is_dask(array):
        if is_device_array(array._meta):
            array = array.map_blocks(_to_host, meta=np.empty((0,) * array.ndim, array.dtype))
        return array
    return array.get() if is_device_array(array) else np.asarray(array)


def _check_axes(axes: Any, ndim: int) -> str:
    letters = str(axes).upper().replace("S", "C") if "C" not in str(axes).upper() else str(axes).upper()
    if len(letters) != ndim or any(a not in _AXES for a in letters) or len(set(letters)) != ndim:
        raise ValueError(
            f"axes {axes!r} do not describe an array of {ndim} axes (letters T, C, Z, Y, X, each once)"
        )
    return letters


def _check_spacing(meta: dict[str, Any], axes: str) -> dict[str, float]:
    """Voxel size per spatial axis (micrometres), empty when unknown."""
    values = meta.get("spacing")
    if values is None or meta.get("spacing_known") is False:
        return {}
    values = tuple(np.atleast_1d(np.asarray(values, dtype=float)))
    spatial = [a for a in axes if a in _SPATIAL]
    if len(values) == len(axes):
        pairs = zip(axes, values)
    elif len(values) == len(spatial):
        pairs = zip(spatial, values)
    else:
        raise ValueError(
            f"spacing {tuple(values)} has {len(values)} values; axes {axes!r} need {len(axes)} "
            f"(one per axis) or {len(spatial)} (one per spatial axis)"
        )
    spacing = {a: float(v) for a, v in pairs if a in _SPATIAL}
    if any(not (math.isfinite(v) and v > 0) for v in spacing.values()):
        raise ValueError(f"spacing {tuple(values)} must be positive and finite")
    return spacing


def _check_channels(values: Any, key: str, channels: int) -> list | None:
    if values is None:
        return None
    values = list(values)
    if len(values) != channels:
        raise ValueError(f"{key} has {len(values)} entries for {channels} channel(s)")
    if key == "channel_names":
        return [str(v) for v in values]
    out = []
    for v in values:
        if v is not None and not (math.isfinite(float(v)) and float(v) > 0):
            raise ValueError(f"{key} must be positive micrometres or None, not {v!r}")
        out.append(None if v is None else float(v))
    return out


def _encode(data: Any, target: np.dtype, meta: dict[str, Any]) -> tuple[Any, float | None, float | None]:
    """Values as stored, and the scale and offset that map them back (None when not scaled)."""
    if data.dtype.kind not in "buif":
        raise TypeError(f"array dtype {data.dtype} cannot be stored; use integers or floats")
    if data.dtype in (np.uint8, np.uint16):
        scale, offset = meta.get("scale"), meta.get("offset")
        known = isinstance(scale, (int, float)) and isinstance(offset, (int, float))
        if target == np.uint16:
            data = data.astype(np.uint16)
        if known:
            return data, float(scale), float(offset)
        return data, None, None
    if target == np.float32:
        return data.astype(np.float32), None, None
    if _is_dask(data):
        import dask

        low, high = dask.compute(data.min(), data.max())  # one extra pass for the range
    else:
        low, high = data.min(), data.max()
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("array holds NaN or infinity, which uint16 cannot store")
    offset = min(0.0, low)
    scale = (high - offset) / _UINT16_MAX if high > offset else 1.0
    if _is_dask(data):
        data = data.map_blocks(_quantize, offset, scale, dtype=np.uint16)
    elif data.ndim > 1:
        out = np.empty(data.shape, np.uint16)
        for i in range(data.shape[0]):  # a slab at a time keeps the float64 temporaries small
            out[i] = _quantize(data[i], offset, scale)
        data = out
    else:
        data = _quantize(data, offset, scale)
    return data, scale, offset


def _quantize(block: np.ndarray, offset: float, scale: float) -> np.ndarray:
    values = np.rint((np.asarray(block, np.float64) - offset) / scale)
    return np.clip(values, 0, _UINT16_MAX).astype(np.uint16)


def _write_tiff(
    path: Path,
    data: Any,
    axes: str,
    spacing: dict[str, float],
    record: dict[str, Any],
    extra: dict[str, Any],
    kind: str,
) -> None:
    import tifffile

    if kind == "imagej":
        # free-form keys become ImageJ properties, one "key=value" line each
        metadata: dict[str, Any] = {
            k: v for k, v in extra.items() if not (isinstance(v, str) and ("\n" in v or "\r" in v))
        }
        metadata.update(axes=axes, unit="um")
        if "Z" in spacing:
            metadata["spacing"] = spacing["Z"]
        metadata["Info"] = json.dumps({_RECORD: record}, default=str)
        kwargs: dict[str, Any] = {"imagej": True, "metadata": metadata, "photometric": "minisblack"}
        if "X" in spacing or "Y" in spacing:
            x = spacing.get("X", spacing.get("Y", 1.0))
            kwargs["resolution"] = (1.0 / x, 1.0 / spacing.get("Y", x))
    else:
        metadata = {"axes": axes}
        for axis, value in spacing.items():
            metadata[f"PhysicalSize{axis}"] = value
            metadata[f"PhysicalSize{axis}Unit"] = "\u00b5m"
        channel: dict[str, Any] = {}
        if record.get("channel_names"):
            channel["Name"] = record["channel_names"]
        for key, attribute in (("wavelengths", "Emission"), ("excitation_wavelengths", "Excitation")):
            values = record.get(key)
            if values and all(v is not None for v in values):  # OME has no "unknown" per channel
                channel[f"{attribute}Wavelength"] = [round(v * 1e3, 9) for v in values]
                channel[f"{attribute}WavelengthUnit"] = ["nm"] * len(values)
        if channel:
            metadata["Channel"] = channel
        record["extra"] = extra
        metadata["Description"] = json.dumps({_RECORD: record}, default=str)
        nbytes = math.prod(data.shape) * data.dtype.itemsize
        kwargs = {
            "ome": True,
            "metadata": metadata,
            "photometric": "minisblack",
            "bigtiff": nbytes > _BIGTIFF_BYTES,
        }
    handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        if _is_dask(data):
            import dask.array as da

            # tifffile lays the pixels out contiguously; each block is then written into its place
            mapped = tifffile.memmap(temporary, shape=data.shape, dtype=data.dtype, **kwargs)
            region = _FileRegion(temporary, int(mapped.offset), data.shape, data.dtype)
            del mapped
            da.store(data, region, lock=False)
        else:
            tifffile.imwrite(temporary, data, **kwargs)
        os.chmod(temporary, _normal_mode(0o666))  # mkstemp makes 0600
        os.replace(temporary, path)
    except BaseException as error:
        explained = _write_error(error, temporary, path)  # while the partial file tells its size
        Path(temporary).unlink(missing_ok=True)
        if explained is error:
            raise
        raise explained from error


class _FileRegion:
    """A file's contiguous pixel data as a target for ``dask.array.store``.

    Each block maps the file anew, so the target pickles (to the workers of a cluster that share
    the file system) and never holds more than the block being written.
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), np.dtype(dtype)
        self.ndim = len(self.shape)

    def __setitem__(self, key: Any, value: Any) -> None:
        mapped = np.memmap(self.path, dtype=self.dtype, mode="r+", offset=self.offset, shape=self.shape)
        mapped[key] = value
        del mapped  # unmapped; the pages are in the file's cache, which the rename keeps


def _write_zarr(path: Path, data: Any, axes: str, spacing: dict[str, float], record: dict[str, Any]) -> None:
    import zarr

    temporary = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".part", dir=path.parent))
    try:
        root = zarr.open_group(str(temporary), mode="w", zarr_format=2)
        lazy = _is_dask(data)
        if lazy:
            if any(len(set(c[:-1])) > 1 or c[-1] > c[0] for c in data.chunks):
                data = data.rechunk(data.chunksize)  # Zarr chunks are regular
            chunks = data.chunksize
        else:
            chunks = _zarr_chunks(data.shape, axes, data.dtype.itemsize)
        array = root.create_array(
            "0",
            shape=data.shape,
            chunks=tuple(max(1, c) for c in chunks),
            dtype=data.dtype,
            chunk_key_encoding={"name": "v2", "separator": "/"},  # NGFF 0.4 asks for "/"
            fill_value=0,
        )
        others = tuple(i for i, a in enumerate(axes) if a != "C")
        if data.size == 0:
            low = high = np.zeros(data.shape[axes.index("C")] if "C" in axes else 1)
        elif lazy:
            import dask
            import dask.array as da

            # one pass: each block is written and enters the display range as it is computed
            stored = da.store(data, array, lock=False, compute=False)
            _, low, high = dask.compute(stored, data.min(axis=others), data.max(axis=others))
        else:
            array[...] = data
            low, high = data.min(axis=others), data.max(axis=others)
        root.attrs.update(_ngff_attributes(path, axes, spacing, record, low, high))
        os.chmod(temporary, _normal_mode(0o777))  # mkdtemp makes 0700
        _swap_in(temporary, path)
    except BaseException as error:
        explained = _write_error(error, temporary, path)
        shutil.rmtree(temporary, ignore_errors=True)
        if explained is error:
            raise
        raise explained from error


def _zarr_chunks(shape: tuple[int, ...], axes: str, itemsize: int) -> tuple[int, ...]:
    """Whole planes (up to 2048 x 2048) and as many of them along Z as make about 16 MiB."""
    plane = itemsize
    for n, a in zip(shape, axes):
        if a in "YX":
            plane *= max(1, min(n, _ZARR_PLANE_MAX))
    chunks = []
    for n, a in zip(shape, axes):
        if a in "YX":
            chunks.append(min(n, _ZARR_PLANE_MAX))
        elif a == "Z":
            chunks.append(min(n, max(1, _ZARR_CHUNK_BYTES // plane)))
        else:
            chunks.append(1)
    return tuple(max(1, c) for c in chunks)


def _ngff_attributes(
    path: Path, axes: str, spacing: dict[str, float], record: dict[str, Any], low: Any, high: Any
) -> dict[str, Any]:
    """OME-NGFF 0.4 group attributes: multiscales (one level), omero channels, microdecon's record."""
    axes_meta = []
    for axis in axes:
        entry = {"name": axis.lower(), "type": _NGFF_TYPES[axis]}
        if axis in spacing:
            entry["unit"] = "micrometer"
        axes_meta.append(entry)
    scale = [spacing.get(a, 1.0) for a in axes]
    low, high = np.atleast_1d(np.asarray(low, np.float64)), np.atleast_1d(np.asarray(high, np.float64))
    names = record.get("channel_names")
    palette = ["00FF00", "FF00FF", "00FFFF", "FF0000", "0000FF", "FFFF00"]
    channels = []
    for i, (lo, hi) in enumerate(zip(low, high)):
        lo, hi = (float(lo), float(hi)) if math.isfinite(lo) and math.isfinite(hi) else (0.0, 0.0)
        channel = {
            "color": "FFFFFF" if len(low) == 1 else palette[i % len(palette)],
            "window": {"min": lo, "max": hi, "start": lo, "end": hi},
            "active": True,
        }
        if names:
            channel["label"] = names[i]
        channels.append(channel)
    name = path.name[: -len(".zarr")]
    return {
        "multiscales": [
            {
                "version": "0.4",
                "name": name.removesuffix(".ome"),
                "axes": axes_meta,
                "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
            }
        ],
        "omero": {"channels": channels, "rdefs": {"model": "greyscale" if len(channels) == 1 else "color"}},
        _RECORD: json.loads(json.dumps(record, default=str)),
    }


def _swap_in(temporary: Path, path: Path) -> None:
    """Move a finished directory into place; an old one is moved aside first, removed last."""
    if not (path.exists() or path.is_symlink()):
        os.rename(temporary, path)
        return
    aside = path.with_name(f"{_temporary_prefix(path)}{uuid.uuid4().hex[:8]}.old")
    os.rename(path, aside)
    try:
        os.rename(temporary, path)
    except BaseException:
        os.rename(aside, path)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _write_error(error: BaseException, temporary: Any, path: Path) -> BaseException:
    """The error a failed write reports, naming the file the user asked for, not the temporary.

    NumPy reports a short write (a full disk, a quota, a file-size limit) as a bare
    "N requested and M written"; it becomes an OSError: EFBIG where the partial file stopped at
    the process's file-size limit, ENOSPC (no room: a full disk or a quota) otherwise.
    """
    if not isinstance(error, OSError):
        return error
    if error.errno is None and re.search(r"\d+ requested and \d+ written", str(error)):
        code = errno.EFBIG if _at_file_size_limit(temporary) else errno.ENOSPC
        return OSError(code, os.strerror(code), str(path))
    if error.filename and str(error.filename).startswith(str(temporary)):
        error.filename = str(path)
    return error


def _at_file_size_limit(temporary: Any) -> bool:
    """Whether the partial file reached the process's file-size limit (RLIMIT_FSIZE): the write
    stopped there, not because the disk was full."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        return soft != resource.RLIM_INFINITY and os.path.getsize(temporary) + (1 << 16) >= soft
    except (ImportError, OSError, ValueError, AttributeError):  # no such limit here
        return False


def _temporary_prefix(path: Path) -> str:
    """Hidden names for a write in progress, naming the host and process that owns them."""
    return f".{path.name}.{_HOST}-{os.getpid()}."


def _process_space() -> str:
    """The host name and, on Linux, the PID namespace: together they say whose process IDs
    these are. Containers on one host (Docker, Kubernetes, Apptainer) often share its name but
    count their processes separately, so a process ID seen from another namespace says nothing
    about whether its owner still runs."""
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
    try:
        namespace = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))  # "pid:[4026531836]"
    except OSError:  # not Linux: one namespace per host
        namespace = ""
    return f"{host}_ns{namespace}" if namespace else host


_HOST = _process_space()


def _sweep_stale(path: Path) -> None:
    """Clear what a killed write of ``path`` left beside it, so a rerun ends clean.

    A write that was killed (SIGKILL, a power cut) leaves its hidden ``.part`` temporary, and a
    Zarr store killed in mid-swap leaves the previous result aside as ``.old``. Only leftovers of
    processes of this host and PID namespace that no longer run are touched: a concurrent
    writer's are its own, and so are those of a container whose process IDs cannot be checked. A
    previous result found aside while ``path`` is missing is put back, so nothing is lost.
    """
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>\w+)-(?P<pid>\d+)\.\w+\.(?P<kind>part|old)$")
    try:
        names = os.listdir(path.parent)
    except OSError:  # unreadable folder: the write itself will say why
        return
    for name in sorted(names, key=lambda n: n.endswith(".part")):  # restore an .old one first
        found = pattern.match(name)
        if not found or found["host"] != _HOST or _alive(int(found["pid"])):
            continue
        leftover = path.parent / name
        try:
            if found["kind"] == "old" and not (path.exists() or path.is_symlink()):
                os.rename(leftover, path)
            elif leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        except OSError:  # another rerun swept it first, or it is not ours to remove
            pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _normal_mode(mode: int) -> int:
    """``mode`` less the process umask: the permissions a plain open() or mkdir() would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask
