"""Quality of every microdecon method on one 3-D phantom: best PSNR / SSIM, where it is reached,
and the wall time of the method's default call.

    python benchmarks/quality.py [--quick] [--output DIR]

Also run by ``benchmarks/run.py``. The problem: a cell-like phantom blurred by a widefield PSF
(1.2 NA water, 520 nm, voxel 0.2 x 0.1 x 0.1 um), Poisson noise at about 200 photons peak over a
background of 10 (32 x 128 x 128; 48 x 192 x 192 without --quick). Iterative methods are followed
iteration by iteration through their callback (PSNR every iteration, SSIM at every fifth and
at the best PSNR); one-pass filters are swept over their weight, and their automatic choice is
reported beside the best. scikit-image runs the same problem for reference (RL on the
background-subtracted image, as it has no background term).
Results go to DIR/quality.md and DIR/quality.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import optics  # noqa: E402  (benchmarks/optics.py)
import report  # noqa: E402  (benchmarks/report.py)

import microdecon as md  # noqa: E402
from microdecon.metrics import psnr, ssim  # noqa: E402
from microdecon.restore.wiener import DEFAULT_INVERSE_EPSILON  # noqa: E402

BACKGROUND = 10.0
SPACING = optics.SPACING


def make_problem(shape: tuple[int, ...]):
    rng = np.random.default_rng(0)
    truth = md.data.phantom(shape, seed=11)
    psf = optics.widefield_psf()
    blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    scale = 200.0 / float(blurred.max())
    image = rng.poisson(blurred * scale + BACKGROUND).astype(np.float32)
    return image, psf, (truth * scale).astype(np.float32)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def iterative(name: str, fn, truth, num_iter: int, default: int | str | None = None, **params) -> dict:
    """Follow ``fn`` iteration by iteration; time its call without the callback. ``default``:
    the method's own iteration count when it is not ``num_iter`` ("auto": it stops by itself)."""
    if default is not None:
        done = []
        out, seconds = _timed(lambda: fn(num_iter=default, callback=lambda i, e: done.append(i), **params))
        row = iterative(name, fn, truth, num_iter, **params)
        row.update(last_psnr=psnr(truth, out), seconds=seconds, setting=f"{default} ({len(done)} iterations)")
        return row
    curve, ssims, best = {}, {}, {"psnr": -np.inf}

    def callback(iteration, estimate):
        value = psnr(truth, estimate)
        curve[iteration] = value
        if iteration % 5 == 0:
            ssims[iteration] = ssim(truth, estimate)
        if value > best["psnr"]:
            best.update(psnr=value, iteration=iteration, estimate=np.array(estimate))

    fn(num_iter=num_iter, callback=callback, **params)
    best_ssim = ssim(truth, best.pop("estimate"))
    ssims[best["iteration"]] = best_ssim
    ssim_at = max(ssims, key=ssims.get)
    _, seconds = _timed(lambda: fn(num_iter=num_iter, **params))
    return {
        "method": name,
        "best_psnr": best["psnr"],
        "at": f"iteration {best['iteration']}",
        "best_ssim": ssims[ssim_at],
        "ssim_at": f"iteration {ssim_at}",
        "last_psnr": curve[max(curve)],
        "seconds": seconds,
        "setting": f"{num_iter} iterations",
        "curve": curve,
    }


def swept(name: str, fn, truth, key: str, values, default) -> dict:
    """Sweep a one-pass filter's weight; report the best and the default (automatic) choice."""
    scores = []
    for value in values:
        out = fn(**{key: value})
        scores.append((psnr(truth, out), value, out))
    best_psnr, best_value, best_out = max(scores, key=lambda s: s[0])
    default_out, seconds = _timed(lambda: fn(**{key: default}))
    ssim_best, ssim_default = ssim(truth, best_out), ssim(truth, default_out)
    return {
        "method": name,
        "best_psnr": best_psnr,
        "at": f"{key}={best_value:.2g}",
        "best_ssim": max(ssim_best, ssim_default),
        "ssim_at": f"{key}={best_value:.2g}" if ssim_best >= ssim_default else "default",
        "last_psnr": psnr(truth, default_out),
        "seconds": seconds,
        "setting": f"default {key}={default}",
    }


def run(quick: bool) -> dict:
    shape = (32, 128, 128) if quick else (48, 192, 192)
    image, psf, truth = make_problem(shape)
    signal = np.maximum(image - BACKGROUND, 0)
    common = {"background": BACKGROUND, "device": "cpu"}
    n = 30 if quick else 50

    def method(name, **fixed):
        return lambda **params: md.deconvolve(image, psf, name, **common, **fixed, **params)

    # each iterative method runs at least its default count, so the table shows its peak
    rows = [
        iterative("rl (accelerated)", method("rl"), truth, 2 * n, default="auto"),
        iterative(
            "rl (conjugate gradient)",
            method("rl", accelerate="conjugate-gradient"),
            truth,
            2 * n,
            default="auto",
        ),
        iterative("rl (plain)", method("rl", accelerate=False), truth, 2 * n, default="auto"),
        iterative("rl-tv", method("rl-tv"), truth, 2 * n, default="auto"),
        iterative("landweber", method("landweber"), truth, 200),
        iterative("fista", method("fista"), truth, 100, default="auto"),
        iterative("blind-rl", method("blind-rl"), truth, 30),
    ]
    grid = np.logspace(-5, 0, 11)
    rows.append(swept("wiener", method("wiener"), truth, "balance", grid, "auto"))
    rows.append(swept("tikhonov", method("tikhonov"), truth, "balance", np.logspace(-6, -1, 11), "auto"))
    epsilons = [0.01, 0.03, 0.1, 0.2, 0.3, 0.5]
    rows.append(swept("inverse", method("inverse"), truth, "epsilon", epsilons, DEFAULT_INVERSE_EPSILON))
    out, seconds = _timed(lambda: method("unsupervised-wiener")())
    rows.append(
        {
            "method": "unsupervised-wiener",
            "best_psnr": psnr(truth, out),
            "at": "default",
            "best_ssim": ssim(truth, out),
            "ssim_at": "default",
            "last_psnr": psnr(truth, out),
            "seconds": seconds,
            "setting": "default (sampled)",
        }
    )
    from skimage.restoration import richardson_lucy

    skimage_curve = {}
    for k in (5, 10, 20, n):
        skimage_curve[k] = psnr(truth, richardson_lucy(signal, psf, k, clip=False))
    best_k = max(skimage_curve, key=skimage_curve.get)
    out, seconds = _timed(lambda: richardson_lucy(signal, psf, n, clip=False))
    rows.append(
        {
            "method": "skimage richardson_lucy",
            "best_psnr": skimage_curve[best_k],
            "at": f"iteration {best_k} (of 5, 10, 20, {n})",
            "best_ssim": ssim(truth, richardson_lucy(signal, psf, best_k, clip=False)),
            "ssim_at": f"iteration {best_k}",
            "last_psnr": psnr(truth, out),
            "seconds": seconds,
            "setting": f"{n} iterations",
        }
    )
    return {
        "shape": shape,
        "blurred_psnr": psnr(truth, signal),
        "blurred_ssim": ssim(truth, signal),
        "rows": rows,
    }


def table(result: dict) -> str:
    shape = "x".join(map(str, result["shape"]))
    lines = [
        f"Quality on a {shape} phantom (widefield PSF, Poisson noise, ~200 photons peak); the data: "
        f"PSNR {result['blurred_psnr']:.2f} dB, SSIM {result['blurred_ssim']:.3f}.",
        "",
        "| method | best PSNR (dB) | reached at | best SSIM | reached at | default: PSNR at the end | "
        "default setting | wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['best_psnr']:.2f} | {row['at']} | {row['best_ssim']:.3f} | "
            f"{row['ssim_at']} | {row['last_psnr']:.2f} | {row['setting']} | {row['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = report.parser(__doc__, "quality", "32x128x128 (about a minute on 2 cores)").parse_args(argv)
    result = run(args.quick)
    report.publish(args.output, "quality", table(result), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
