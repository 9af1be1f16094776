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


def deconvolve(image: Any, psf: Any, method: str = "rl", *, device: str = "auto", **params: Any):
    """Deconvolve with the method named by ``method``; ``params`` go to that method.

    Parameters
    ----------
    image, psf : array_like
        As for the method.
    method : str
        "rl": :func:`richardson_lucy` (accelerated by default);
        "rl-tv": :func:`richardson_lucy_tv` (RL with total variation, for noisy data);
        "wiener": :func:`wiener`; "tikhonov": :func:`tikhonov`; "inverse": :func:`inverse`;
        "landweber": :func:`landweber` (projected gradient, for comparison);
        "fista": :func:`fista` (l1-sparse, for beads and spots);
        "unsupervised-wiener": :func:`unsupervised_wiener` (Wiener with the noise and prior
        learned by Gibbs sampling);
        "blind-rl": :func:`blind_richardson_lucy` (the PSF refined from a guess with the image).
    device : {"auto", "cpu", "gpu", "gpu:N"}
    **params
        Keyword arguments of the method, e.g. ``num_iter=30`` or ``balance=1e-3``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> img = np.ones((16, 16), np.float32)
    >>> md.deconvolve(img, md.psf.gaussian((5, 5), 1.0), "wiener", balance=0.01, device="cpu").shape
    (16, 16)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return METHODS[method](image, psf, device=device, **params)
