"""Image quality against a reference: PSNR and NRMSE (device-agnostic)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import get_backend, is_device_array

__all__ = ["psnr", "nrmse"]


def _pair(reference: Any, estimate: Any):
    on_gpu = is_device_array(reference) or is_device_array(estimate)
    be = get_backend(reference, estimate, device="auto" if on_gpu else "cpu")
    with be.activate():
        ref = be.asarray(reference, dtype=np.float64)
        est = be.asarray(estimate, dtype=np.float64)
    if ref.shape != est.shape:
        raise ValueError(f"reference shape {tuple(ref.shape)} and estimate shape {tuple(est.shape)} differ")
    return be, ref, est


def psnr(reference: Any, estimate: Any, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` defaults to the reference's max - min.

    Examples
    --------
    >>> import numpy as np
    >>> round(psnr(np.array([0.0, 1.0]), np.array([0.0, 0.9])), 2)
    23.01
    """
    be, ref, est = _pair(reference, estimate)
    with be.activate():  # on the arrays' GPU
        if data_range is None:
            data_range = float(ref.max() - ref.min())
        mse = float(be.xp.mean((ref - est) ** 2))
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(data_range**2 / mse))


def nrmse(reference: Any, estimate: Any) -> float:
    """Root-mean-square error divided by the reference's root-mean-square.

    Examples
    --------
    >>> import numpy as np
    >>> nrmse(np.array([3.0, 4.0]), np.array([3.0, 4.0]))
    0.0
    """
    be, ref, est = _pair(reference, estimate)
    with be.activate():
        return float(be.xp.sqrt(be.xp.mean((ref - est) ** 2) / be.xp.mean(ref**2)))
