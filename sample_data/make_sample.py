"""Make the bundled sample: a synthetic cell-like stack, blurred and noisy like a widefield image.

Run from the repository root: ``python sample_data/make_sample.py``. Deterministic (fixed seed).
"""

from pathlib import Path

import numpy as np

import microdecon as md

SHAPE = (40, 128, 128)
SPACING = (0.2, 0.1, 0.1)  # micrometres (z, y, x)
PSF_SHAPE = (41, 65, 65)
OFFSET = 100.0  # camera offset, counts
PEAK_PHOTONS = 250.0
READ_NOISE = 2.0


def main() -> None:
    here = Path(__file__).resolve().parent
    rng = np.random.default_rng(2026)
    truth = md.data.phantom(SHAPE, seed=7)
    psf = md.psf.widefield(PSF_SHAPE, SPACING, wavelength=0.52, na=1.2, n_immersion=1.33)
    blurred = md.convolve(truth, psf, device="cpu")
    scale = PEAK_PHOTONS / float(blurred.max())
    truth *= scale
    counts = rng.poisson(blurred * scale) + OFFSET + rng.normal(0, READ_NOISE, SHAPE)
    image = np.clip(np.round(counts), 0, 65535).astype(np.uint16)
    meta = {"spacing": SPACING, "background": OFFSET}
    md.io.imwrite(here / "phantom_blurred.tif", image, meta)
    md.io.imwrite(here / "phantom_truth.tif", truth.astype(np.float32), {"spacing": SPACING})
    md.io.imwrite(here / "psf.tif", psf, {"spacing": SPACING})


if __name__ == "__main__":
    main()
