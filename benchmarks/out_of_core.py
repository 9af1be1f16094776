"""A stack larger than the memory budget, deconvolved from disk to disk in tiles.

    python benchmarks/out_of_core.py [--stack-gb 2] [--budget-mb 512] [--num-iter 10] [--quick]
                                     [--output DIR]

1. Writes a synthetic uint16 stack (64 planes of beads, filaments and cells, blurred by a
   Gaussian PSF of 15 x 11 x 11 voxels, with Poisson noise) to a tiled BigTIFF, plane by plane,
   so the writer never holds the stack.
2. In a fresh process limited to nothing but its own discipline: reads it lazily
   (``md.io.imread(lazy=True)``), deconvolves it with accelerated RL through ``md.deconvolve``
   with a per-tile ``memory_limit`` of the budget less what the process holds before it starts,
   and writes the result to OME-Zarr block by block, tiles run one at a time. Reports the peak
   resident memory of that process (its high-water mark, VmHWM) and the throughput in voxels per second.
3. In another fresh process: the same method on a stack that fits (its first 1024 x 1024 in y
   and x), restored whole in memory, for the throughput tiling is compared with.

In both, the FFT plans are made before the clock starts (FFTW plans once per shape and machine
and keeps its plans for later runs; planning would otherwise dominate a first run).

Results: DIR/out_of_core.md and .json (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PSF_SHAPE = (15, 11, 11)
PSF_SIGMA = (2.0, 1.2, 1.2)
DEPTH = 64


def _psf():
    import microdecon as md

    return md.psf.gaussian(PSF_SHAPE, PSF_SIGMA)


def write_stack(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """A tiled uint16 BigTIFF of ``shape``, written one plane at a time from a repeated,
    randomly flipped phantom block (the blur and the noise are applied per block)."""
    import tifffile

    import microdecon as md

    rng = np.random.default_rng(seed)
    block = (shape[0], 512, 512)
    truth = md.data.phantom(block, seed=seed)
    blurred = np.maximum(md.convolve(truth, _psf(), device="cpu"), 0)
    ny, nx = shape[1] // block[1], shape[2] // block[2]
    flips = rng.integers(0, 4, (ny, nx))

    def planes():
        for z in range(shape[0]):
            plane = np.empty(shape[1:], np.uint16)
            for j in range(ny):
                for i in range(nx):
                    piece = blurred[z]
                    piece = piece[::-1] if flips[j, i] & 1 else piece
                    piece = piece[:, ::-1] if flips[j, i] & 2 else piece
                    counts = rng.poisson(piece * 4 + 100)  # ~400 photons peak over an offset of 100
                    plane[j * 512 : (j + 1) * 512, i * 512 : (i + 1) * 512] = np.minimum(counts, 65535)
            yield plane

    def tiles():  # tifffile takes a tiled file's data tile by tile, in row-major order
        for plane in planes():
            for y in range(0, shape[1], 256):
                for x in range(0, shape[2], 256):
                    yield plane[y : y + 256, x : x + 256]

    tifffile.imwrite(
        path,
        tiles(),
        shape=shape,
        dtype=np.uint16,
        bigtiff=True,
        tile=(256, 256),
        photometric="minisblack",
        metadata={"axes": "ZYX"},
    )


def _rss_mb() -> float:
    """Peak resident memory of this process, MB: the kernel's high-water mark of this address
    space (ru_maxrss would carry over the parent's peak across fork and exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _warm_fft_plans(plan, psf) -> None:
    """Two iterations on the largest tile, whose FFT grid every tile shares, so that FFTW's
    planning (once per shape and machine: it keeps its plans for later runs) is not timed."""
    import microdecon as md
    from microdecon import tiling

    largest = tiling._largest_piece(plan, "non-circulant")
    md.richardson_lucy(np.ones(largest, np.float32), psf, 2, device="cpu")


def run_tiled(source: str, target: str, budget_mb: float, num_iter: int) -> dict:
    """Disk to disk in tiles; runs in its own process (see main)."""
    import dask

    import microdecon as md

    psf = _psf()
    before = _rss_mb()
    image, meta = md.io.imread(source, lazy=True)
    # what the process already holds is not the tiles' to use
    limit = int((budget_mb - before - 40) * 1e6)  # 40 MB for Dask's bookkeeping and the writer
    plan = md.tiling.plan(image.shape, psf, "rl", num_iter=num_iter, memory_limit=limit, input_itemsize=2)
    _warm_fft_plans(plan, psf)
    start = time.perf_counter()
    with dask.config.set(scheduler="synchronous"):
        restored = md.deconvolve(
            image, psf, "rl", num_iter=num_iter, memory_limit=limit, device="cpu", background=100.0
        )
        md.io.imwrite(target, restored, {**meta, "provenance": {"method": "rl", "num_iter": num_iter}})
    seconds = time.perf_counter() - start
    return {
        "shape": list(image.shape),
        "plan": str(plan),
        "tiles": plan.tiles,
        "tile_memory_limit_mb": limit / 1e6,
        "seconds": seconds,
        "voxels_per_second": float(np.prod(image.shape)) / seconds,
        "rss_before_mb": before,
        "peak_rss_mb": _rss_mb(),
    }


def run_whole(source: str, num_iter: int) -> dict:
    """The first 1024 x 1024 of the stack, restored whole in memory; in its own process."""
    import tifffile

    import microdecon as md

    with tifffile.TiffFile(source) as tif:
        image = tif.series[0].asarray()[:, :1024, :1024].copy()
    md.richardson_lucy(image, _psf(), 2, device="cpu", background=100.0)  # FFT plans made, untimed
    start = time.perf_counter()
    md.deconvolve(image, _psf(), "rl", tile_shape=None, num_iter=num_iter, device="cpu", background=100.0)
    seconds = time.perf_counter() - start
    return {
        "shape": list(image.shape),
        "seconds": seconds,
        "voxels_per_second": float(np.prod(image.shape)) / seconds,
        "peak_rss_mb": _rss_mb(),
    }


def _in_fresh_process(function: str, *args) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import out_of_core as b; "
        f"print('RESULT' + json.dumps(b.{function}(*{list(args)!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{function} failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stack-gb", type=float, default=2.0, help="size of the uint16 stack on disk")
    parser.add_argument("--budget-mb", type=float, default=512.0, help="peak resident memory allowed")
    parser.add_argument("--num-iter", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a 256 MB stack (a check, not a result)")
    parser.add_argument("--output", default=str(HERE / "results"))
    parser.add_argument("--workdir", default=None, help="where the stacks go (default: a temporary folder)")
    args = parser.parse_args(argv)
    stack_bytes = (0.25 if args.quick else args.stack_gb) * 2**30
    side = int(np.sqrt(stack_bytes / (DEPTH * 2)) // 512 * 512)
    shape = (DEPTH, side, side)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        source = os.path.join(work, "stack.tif")
        start = time.perf_counter()
        write_stack(Path(source), shape)
        print(
            f"wrote {shape} uint16 ({os.path.getsize(source) / 2**30:.2f} GiB) "
            f"in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        whole = _in_fresh_process("run_whole", source, args.num_iter)
        print(f"whole, in memory: {whole}", flush=True)
        tiled = _in_fresh_process(
            "run_tiled", source, os.path.join(work, "restored.zarr"), args.budget_mb, args.num_iter
        )
        print(f"tiled, disk to disk: {tiled}", flush=True)
    ratio = tiled["voxels_per_second"] / whole["voxels_per_second"]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "stack": {"shape": list(shape), "gib": stack_bytes / 2**30},
        "budget_mb": args.budget_mb,
        "num_iter": args.num_iter,
        "psf": list(PSF_SHAPE),
        "whole": whole,
        "tiled": tiled,
        "throughput_ratio": ratio,
        "within_budget": tiled["peak_rss_mb"] <= args.budget_mb,
    }
    (out_dir / "out_of_core.json").write_text(json.dumps(report, indent=2))
    lines = [
        "# Out-of-core deconvolution",
        "",
        f"{report['machine']}, {report['date']}. Accelerated RL, {args.num_iter} iterations, PSF "
        f"{' x '.join(map(str, PSF_SHAPE))}, CPU (tiles one at a time).",
        "",
        "| case | stack | time (s) | Mvoxel/s | peak RSS (MB) |",
        "|---|---|---|---|---|",
        f"| whole, in memory | {' x '.join(map(str, whole['shape']))} | {whole['seconds']:.1f} | "
        f"{whole['voxels_per_second'] / 1e6:.2f} | {whole['peak_rss_mb']:.0f} |",
        f"| tiled, TIFF on disk -> OME-Zarr | {' x '.join(map(str, tiled['shape']))} "
        f"({stack_bytes / 2**30:.2f} GiB) | {tiled['seconds']:.1f} | "
        f"{tiled['voxels_per_second'] / 1e6:.2f} | "
        f"{tiled['peak_rss_mb']:.0f} (budget {args.budget_mb:.0f}) |",
        "",
        f"Tiled throughput is {100 * ratio:.0f}% of whole-volume throughput. Plan: {tiled['plan']}.",
    ]
    (out_dir / "out_of_core.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
