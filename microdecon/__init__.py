"""microdecon: fast deconvolution of fluorescence microscopy images on the GPU and the CPU.

Examples
--------
>>> import numpy as np, microdecon as md
>>> image = np.random.default_rng(0).poisson(10, (16, 32, 32)).astype(np.uint16)
>>> md.richardson_lucy(image, md.psf.gaussian((5, 7, 7), 1.0), 5, device="cpu").dtype
dtype('float32')
"""

from . import data, io, metrics, psf
from .operators import convolve, convolve_transpose
from .restore import deconvolve, richardson_lucy, wiener

__version__ = "0.1.0"

__all__ = [
    "convolve",
    "convolve_transpose",
    "data",
    "deconvolve",
    "io",
    "metrics",
    "psf",
    "richardson_lucy",
    "wiener",
    "__version__",
]
