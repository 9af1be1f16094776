"""Sample data: the bundled stack in ``sample_data/`` and synthetic phantoms with known truth.

Examples
--------
>>> import microdecon as md
>>> truth = md.data.phantom((16, 64, 64), seed=0)
>>> truth.shape, truth.dtype.name, bool(truth.min() >= 0)
((16, 64, 64), 'float32', True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import _validate

__all__ = ["Sample", "phantom", "sample", "sample_dir"]

_SAMPLE_FILES = {"image": "phantom_blurred.tif", "psf": "psf.tif", "truth": "phantom_truth.tif"}


def sample_dir() -> Path:
    """Folder of the bundled sample (``sample_data/`` beside the package, or installed with it)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "sample_data", here.parent / "sample_data"):
        if (candidate / _SAMPLE_FILES["image"]).exists():
            return candidate
    raise FileNotFoundError(
        "the microdecon sample data was not found next to the package; reinstall microdecon "
        "or run from a checkout of its repository"
    )


@dataclass
class Sample:
    """The bundled sample: observed stack, its PSF, the ground truth and their metadata."""

    image: np.ndarray
    psf: np.ndarray
    truth: np.ndarray
    spacing: tuple[float, ...]
    background: float
    paths: dict[str, Path] = field(default_factory=dict)


def sample() -> Sample:
    """Load the bundled sample: a synthetic cell-like stack blurred by a widefield-like PSF.

    See ``sample_data/README.md`` for how it was made.

    Examples
    --------
    >>> import microdecon as md
    >>> s = md.data.sample()
    >>> s.image.shape == s.truth.shape, s.image.dtype.name
    (True, 'uint16')
    """
    from . import io

    folder = sample_dir()
    paths = {key: folder / name for key, name in _SAMPLE_FILES.items()}
    image, meta = io.imread(paths["image"])
    psf, _ = io.imread(paths["psf"])
    truth, _ = io.imread(paths["truth"])
    background = float(meta.get("background", 0.0))
    return Sample(
        image=image, psf=psf, truth=truth, spacing=tuple(meta["spacing"]), background=background, paths=paths
    )


def phantom(
    shape: Sequence[int],
    *,
    seed: int = 0,
    cells: int | None = None,
    filaments: int | None = None,
    beads: int | None = None,
) -> np.ndarray:
    """A fluorescence-like test object with known ground truth (2-D or 3-D).

    Cells (bright membranes around dimmer cytoplasm and a nucleus), thin curved filaments and
    sub-resolution beads, on a zero background; values roughly 0-100. The counts default to
    amounts that scale with the volume.

    Parameters
    ----------
    shape : sequence of int
        2 or 3 axes.
    seed : int
        Random seed: the same seed gives the same phantom.
    cells, filaments, beads : int, optional
        How many of each.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``.

    Examples
    --------
    >>> truth = phantom((64, 64), seed=3, cells=2, filaments=3, beads=10)
    >>> truth.shape, bool(truth.max() > 0)
    ((64, 64), True)
    """
    shape = tuple(_validate.check_int(n, "shape", minimum=1) for n in shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must have 2 or 3 axes, got {len(shape)}")
    rng = np.random.default_rng(seed)
    scale = float(np.prod(shape)) / (32 * 128 * 128)
    cells = max(1, round(6 * scale)) if cells is None else cells
    filaments = max(1, round(12 * scale)) if filaments is None else filaments
    beads = max(1, round(80 * scale)) if beads is None else beads
    out = np.zeros(shape, np.float32)
    grid = np.indices(shape, dtype=np.float32)
    size = np.array(shape, np.float32)

    for _ in range(cells):
        centre = rng.uniform(0.15, 0.85, len(shape)) * size
        radii = rng.uniform(0.12, 0.22, len(shape)) * size.min()
        if len(shape) == 3:
            radii[0] = min(radii[0], 0.4 * shape[0])
        # work on the cell's bounding box (the membrane's tail is negligible 4 px outside it)
        box = tuple(
            slice(max(0, int(c - a - 4)), min(n, int(np.ceil(c + a + 4))))
            for c, a, n in zip(centre, radii, shape)
        )
        local = [g[box] for g in grid]
        r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(local, centre, radii)))
        cell = np.where(r < 1, 8.0, 0.0)  # cytoplasm
        cell += 40.0 * np.exp(-0.5 * ((r - 1) * radii.mean() / 0.8) ** 2)  # membrane
        nucleus = np.sqrt(sum(((g - c) / (0.45 * a)) ** 2 for g, c, a in zip(local, centre, radii)))
        cell += np.where(nucleus < 1, 12.0, 0.0)
        out[box] += cell.astype(np.float32)

    lines = np.zeros(shape, np.float32)
    for _ in range(filaments):
        steps = int(2 * size.max())
        start = rng.uniform(0, 1, len(shape)) * size
        direction = rng.normal(size=len(shape))
        points = [start]
        for _ in range(steps):
            direction = direction / np.linalg.norm(direction) + 0.15 * rng.normal(size=len(shape))
            points.append(points[-1] + 0.5 * direction / np.linalg.norm(direction))
        points = np.round(np.array(points)).astype(int)
        inside = np.all((points >= 0) & (points < np.array(shape)), axis=1)
        lines[tuple(np.unique(points[inside], axis=0).T)] += 1.0
    out += 150.0 * ndimage.gaussian_filter(lines, 0.6)  # one filter for all: it is linear

    positions = (rng.uniform(0, 1, (beads, len(shape))) * size).astype(int)
    out[tuple(positions.T)] += rng.uniform(60, 150, beads).astype(np.float32)
    return out
