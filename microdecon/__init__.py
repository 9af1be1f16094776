"""microdecon: fast deconvolution of fluorescence microscopy images on the GPU and the CPU.

Examples
--------
>>> import numpy as np, microdecon as md
>>> image = np.random.default_rng(0).poisson(10, (16, 32, 32)).astype(np.uint16)
>>> md.richardson_lucy(image, md.psf.gaussian((5, 7, 7), 1.0), 5, device="cpu").dtype
dtype('float32')
"""

from . import data, io, metrics, psf, skimage, tiling
from .operators import convolve, convolve_transpose
from .restore import (
    fista,
    inverse,
    landweber,
    richardson_lucy,
    tikhonov,
    unsupervised_wiener,
    wiener,
)
from .tiling import deconvolve

__version__ = "0.1.0"


def __getattr__(name: str):
    # microdecon.plot is loaded on first use: it is the one module that needs matplotlib (an
    # optional extra), and even it imports matplotlib only when a figure is drawn.
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"plot"})


__all__ = [
    "convolve",
    "convolve_transpose",
    "data",
    "deconvolve",
    "fista",
    "inverse",
    "io",
    "landweber",
    "metrics",
    "plot",
    "psf",
    "richardson_lucy",
    "skimage",
    "tikhonov",
    "tiling",
    "unsupervised_wiener",
    "wiener",
    "__version__",
]
