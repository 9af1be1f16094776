"""The peers microdecon is measured against, each behind one small adapter.

Every adapter takes the background-subtracted image (none of the peers has a background term), the
PSF and its own parameters, and returns a float32 NumPy array of the image's shape. A peer that is
not installed (or, for cuCIM, has no GPU) raises :class:`PeerMissing`, so a benchmark row can say
so instead of failing the run. ``available()`` lists what this machine can run.

Install the CPU peers with ``pip install scikit-image redlionfish``; cuCIM needs a GPU machine
(``pip install cucim-cu12``).

Example
-------
>>> import numpy as np
>>> from peers import skimage_richardson_lucy
>>> image = np.ones((8, 16, 16), np.float32); psf = np.ones((3, 3, 3), np.float32) / 27
>>> skimage_richardson_lucy(image, psf, 5).shape
(8, 16, 16)
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from microdecon import _backend


class PeerMissing(RuntimeError):
    """The peer is not installed here, or needs hardware this machine lacks."""


def _float32(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def skimage_richardson_lucy(image: np.ndarray, psf: np.ndarray, num_iter: int) -> np.ndarray:
    """scikit-image's RL, unclipped (microscopy data are not in [-1, 1])."""
    from skimage.restoration import richardson_lucy

    return _float32(richardson_lucy(image, psf, num_iter, clip=False))


def skimage_wiener(image: np.ndarray, psf: np.ndarray, balance: float) -> np.ndarray:
    """scikit-image's Wiener filter (Laplacian regularizer), unclipped."""
    from skimage.restoration import wiener

    return _float32(wiener(image, psf, balance, clip=False))


def skimage_unsupervised_wiener(image: np.ndarray, psf: np.ndarray, seed: int = 0) -> np.ndarray:
    """scikit-image's unsupervised Wiener (Orieux et al. 2010), unclipped, seeded; 2-D only.

    Its transforms and norms act on the last two axes (scikit-image 0.26), so a 3-D stack gets
    one noise level per plane and fails; it is refused here with that reason instead.
    """
    from skimage.restoration import unsupervised_wiener

    if np.ndim(image) != 2:
        raise PeerMissing("scikit-image's unsupervised_wiener is 2-D only")

    # it scales nothing itself: at unit peak its default priors are in range
    peak = float(image.max()) or 1.0
    out, _ = unsupervised_wiener(image / peak, psf, clip=False, rng=seed)
    return _float32(out * peak)


def redlionfish_richardson_lucy(image: np.ndarray, psf: np.ndarray, num_iter: int) -> np.ndarray:
    """RedLionfish's RL on the CPU (scipy.fft); 3-D only."""
    if importlib.util.find_spec("RedLionfishDeconv") is None:
        raise PeerMissing("redlionfish is not installed (pip install redlionfish)")
    import RedLionfishDeconv

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    out = RedLionfishDeconv.doRLDeconvolutionFromNpArrays(image, psf, niter=num_iter, method="cpu")
    if out is None:  # it logs its errors and returns None
        raise RuntimeError("redlionfish returned no result")
    return _float32(out)


def cucim_richardson_lucy(image: np.ndarray, psf: np.ndarray, num_iter: int) -> np.ndarray:
    """cuCIM's GPU port of scikit-image's RL, unclipped; the result is copied back to the host."""
    if importlib.util.find_spec("cucim") is None or not _backend.gpu_available():
        raise PeerMissing("cucim is not installed or there is no GPU (pip install cucim-cu12)")
    from cucim.skimage.restoration import richardson_lucy

    gpu = _backend.get_backend(device="gpu")  # CuPy is reached through microdecon's backend only
    out = richardson_lucy(gpu.asarray(image), gpu.asarray(psf), num_iter, clip=False)
    return _float32(gpu.to_host(out))


RICHARDSON_LUCY = {
    "skimage": skimage_richardson_lucy,
    "redlionfish": redlionfish_richardson_lucy,
    "cucim": cucim_richardson_lucy,
}


def available() -> list[str]:
    """Names of the RL peers this machine can run."""
    found = ["skimage"]
    if importlib.util.find_spec("RedLionfishDeconv") is not None:
        found.append("redlionfish")
    if importlib.util.find_spec("cucim") is not None and _backend.gpu_available():
        found.append("cucim")
    return found
