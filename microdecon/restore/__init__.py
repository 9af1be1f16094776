"""The restoration algorithms, each written once against the backend's array module."""

from __future__ import annotations

from typing import Any

from ._stopping import IterationInfo, StoppingRule
from .blind import BlindResult, blind_richardson_lucy, estimate_psf_blind
from .gradient import fista, landweber
from .richardson_lucy import richardson_lucy, richardson_lucy_tv
from .unsupervised_wiener import unsupervised_wiener
from .wiener import inverse, tikhonov, wiener

__all__ = [
    "METHODS",
    "BlindResult",
    "IterationInfo",
    "StoppingRule",
    "blind_richardson_lucy",
    "deconvolve",
    "estimate_psf_blind",
    "fista",
    "inverse",
    "landweber",
    "richardson_lucy",
    "richardson_lucy_tv",
    "tikhonov",
    "unsupervised_wiener",
    "wiener",
]

#: Method names accepted by :func:`deconvolve`, and the function each runs.
METHODS = {
    "rl": richardson_lucy,
    "rl-tv": richardson_lucy_tv,
    "wiener": wiener,
    "tikhonov": tikhonov,
    "inverse": inverse,
    "landweber": landweber,
    "fista": fista,
    "unsupervised-wiener": unsupervised_wiener,
    "blind-rl": blind_richardson_lucy,
}


def deconvolve(image: Any, psf: Any, method: str = "rl", **options: Any):
    """:func:`microdecon.tiling.deconvolve`: any method by name, in tiles when needed.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> img = np.ones((16, 16), np.float32)
    >>> md.restore.deconvolve(img, md.psf.gaussian((5, 5), 1.0), "wiener", balance=0.01, device="cpu").shape
    (16, 16)
    """
    from ..tiling import deconvolve as tiled

    return tiled(image, psf, method, **options)
