"""Image quality against a reference (PSNR, SSIM, NRMSE) and the fit of a model to data
(I-divergence); device-agnostic."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import get_backend, is_device_array

__all__ = ["i_divergence", "nrmse", "psnr", "ssim"]


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


def ssim(reference: Any, estimate: Any, *, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004), computed by scikit-image on the host.

    ``data_range`` defaults to the reference's max - min. Works for 2-D and 3-D (and 1-D, with a
    window no longer than the signal).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).random((32, 32))
    >>> ssim(x, x)
    1.0
    """
    from skimage.metrics import structural_similarity

    be, ref, est = _pair(reference, estimate)
    ref, est = be.to_host(ref), be.to_host(est)
    if data_range is None:
        data_range = float(ref.max() - ref.min())
    window = min(7, *(n if n % 2 else n - 1 for n in ref.shape))
    if window < 3:
        raise ValueError(f"ssim needs every axis at least 3 long, got shape {ref.shape}")
    return float(structural_similarity(ref, est, data_range=data_range, win_size=window))


def i_divergence(image: Any, model: Any) -> float:
    """Csiszár's I-divergence ``sum(y log(y / m) - y + m)`` of data ``y`` from a model ``m``.

    The Poisson negative log-likelihood of ``y`` given mean ``m``, less its minimum: 0 when
    ``m == y``, positive otherwise. ``0 log 0`` counts as 0; model values are floored at 1e-12
    times the data's maximum inside the logarithm, so that an empty model voxel under signal
    costs a lot, not infinity. Computed on the arrays' device.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([1.0, 2.0, 0.0])
    >>> i_divergence(y, y), round(i_divergence(y, np.array([2.0, 2.0, 1.0])), 4)
    (0.0, 1.3069)
    """
    be, y, m = _pair(image, model)
    xp = be.xp
    with be.activate():
        y = xp.maximum(y, 0)
        m = xp.maximum(m, 0)
        floored = xp.maximum(m, 1e-12 * max(float(y.max()), 1e-300))
        positive = y > 0
        # where y is 0 the term is 0: divide 1 by 1 there, not by a floored model (overflow)
        ratio = xp.where(positive, y, 1) / xp.where(positive, floored, 1)
        log_term = xp.where(positive, y * xp.log(ratio), 0)
        return float(xp.sum(log_term - y + m))
