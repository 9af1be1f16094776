"""The optics the benchmarks image through: one widefield microscope, one voxel size.

Example
-------
>>> from optics import SPACING, widefield_psf
>>> psf = widefield_psf((9, 15, 15))
>>> psf.shape, SPACING
((9, 15, 15), (0.2, 0.1, 0.1))
"""

from __future__ import annotations

import numpy as np

import microdecon as md

#: Voxel size of the benchmark volumes, micrometres (z, y, x).
SPACING = (0.2, 0.1, 0.1)


def widefield_psf(shape: tuple[int, ...] = (31, 31, 31), spacing: tuple[float, ...] = SPACING) -> np.ndarray:
    """A widefield PSF: 1.2 NA water immersion, 520 nm emission, on ``shape`` voxels of ``spacing``."""
    return md.psf.widefield(shape, spacing, wavelength=0.52, na=1.2, n_immersion=1.33)
