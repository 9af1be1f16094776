"""The ``microdecon`` command: wiring from files and flags to the library, no algorithms.

``microdecon demo`` deconvolves the bundled sample and prints time and quality;
``microdecon deconvolve INPUT... --psf PSF -o OUTDIR`` deconvolves TIFF files;
``microdecon psf -o PSF.tif ...`` writes a model PSF or one made from measured beads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__, _validate, data, io, metrics
from ._backend import get_backend
from .restore import METHODS, deconvolve

__all__ = ["main"]


def _accepted(method: str) -> set[str]:
    """The keyword arguments the function behind ``method`` takes (through wrappers)."""
    import inspect

    from .restore import richardson_lucy

    function = METHODS[method]
    names = set(inspect.signature(function).parameters)
    if "params" in names:  # a thin wrapper (rl-tv) passes the rest on to richardson_lucy
        names |= set(inspect.signature(richardson_lucy).parameters)
    return names


def _method_params(args: argparse.Namespace) -> dict:
    """The flags that apply to the chosen method; a flag the method has no use for is an error."""
    accepted = _accepted(args.method)
    given = {
        "num_iter": args.num_iter,
        "balance": args.balance,
        "tv": args.tv,
        "tol": args.tol,
    }
    params = {"boundary": args.boundary, "background": args.background}
    for name, value in given.items():
        if value is None:
            continue  # the method's own default
        if name not in accepted:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --method {args.method}")
        params[name] = value
    if args.method == "wiener" or args.method == "tikhonov":
        params.setdefault("balance", "auto")
    if "progress" in accepted:
        params["progress"] = not args.quiet
    return params


def _provenance(args: argparse.Namespace, params: dict, psf_source: str, device: str) -> dict:
    shown = {k: v for k, v in params.items() if k != "progress"}
    return {
        "software": f"microdecon {__version__}",
        "method": args.method,
        "parameters": shown,
        "psf": psf_source,
        "device": device,
    }


def _demo(args: argparse.Namespace) -> int:
    sample = data.sample()
    params = _method_params(args)
    if args.background is None:
        params["background"] = sample.background
    print(
        f"sample: {sample.image.shape} {sample.image.dtype}, voxel {sample.spacing} um, "
        f"PSF {sample.psf.shape}",
        flush=True,
    )
    start = time.perf_counter()
    restored = deconvolve(sample.image, sample.psf, args.method, device=args.device, **params)
    seconds = time.perf_counter() - start
    before = metrics.psnr(sample.truth, sample.image.astype(np.float32) - sample.background)
    after = metrics.psnr(sample.truth, restored)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / "phantom_deconvolved.tif"
    io.imwrite(
        out_path,
        restored,
        {
            "spacing": sample.spacing,
            "provenance": _provenance(args, params, str(sample.paths["psf"]), args.device),
        },
    )
    print(
        f"{args.method}: {seconds:.2f} s on {get_backend(device=args.device)!r}; PSNR against ground truth "
        f"{before:.2f} dB -> {after:.2f} dB; wrote {out_path}"
    )
    return 0


def _deconvolve(args: argparse.Namespace) -> int:
    psf, _ = io.imread(args.psf)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = _method_params(args)
    if params.get("background") is None:
        params["background"] = 0.0
    failures = []
    for name in args.inputs:
        path = Path(name)
        target = out_dir / f"{path.stem}_decon.tif"
        if target.exists() and not args.overwrite:
            print(f"{path}: skipped, {target} exists (use --overwrite)")
            continue
        try:
            if target.resolve() == path.resolve():
                raise ValueError("the output would overwrite the input")
            image, meta = io.imread(path)
            start = time.perf_counter()
            restored = deconvolve(image, psf, args.method, device=args.device, **params)
            meta["provenance"] = _provenance(args, params, str(args.psf), args.device)
            io.imwrite(target, restored, meta)
            print(f"{path}: {time.perf_counter() - start:.2f} s -> {target}")
        except Exception as error:  # one bad file (or a device out of memory) must not stop the batch
            failures.append(f"{path}: {error}")
            print(f"{path}: FAILED: {error}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(args.inputs)} file(s) failed:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def _psf(args: argparse.Namespace) -> int:
    from . import psf as psf_module

    source: str
    if args.from_bead or args.from_beads:
        path = args.from_bead or args.from_beads
        image, meta = io.imread(path)
        if args.from_bead:
            result = psf_module.prepare(image, energy=args.energy)
            source = f"bead {path}"
        else:
            if not args.size:
                raise ValueError("--from-beads needs --size (the PSF window, one value per axis)")
            found = psf_module.from_beads(
                image, tuple(args.size), min_distance=args.min_distance, saturation=args.saturation
            )
            result = found.psf
            source = f"{found.count} beads of {path}"
        if meta["spacing_known"]:
            spacing = tuple(meta["spacing"])
            if args.spacing and tuple(args.spacing) != spacing:
                result = psf_module.resample(result, spacing, tuple(args.spacing))
                spacing = tuple(args.spacing)
        elif args.spacing:
            spacing = tuple(args.spacing)  # the file has none: take the given one as its own
        else:
            raise ValueError(f"{path} has no voxel size in its metadata; give it with --spacing")
    else:
        if not (args.shape and args.spacing):
            raise ValueError("a model PSF needs --shape Z Y X and --spacing DZ DY DX (micrometres)")
        spacing = tuple(args.spacing)
        if args.model == "gaussian":
            if not args.sigma:
                raise ValueError("--model gaussian needs --sigma (micrometres, one or one per axis)")
            sigma = tuple(args.sigma) if len(args.sigma) > 1 else args.sigma[0]
            result = psf_module.gaussian(tuple(args.shape), sigma, spacing=spacing)
        else:
            # what the widefield and confocal models share
            optics = dict(
                na=args.na,
                n_immersion=args.n_immersion,
                n_sample=args.n_sample,
                particle_depth=args.particle_depth,
                oversample=args.oversample,
            )
            if args.model == "widefield":
                result = psf_module.widefield(
                    tuple(args.shape),
                    spacing,
                    wavelength=args.wavelength,
                    **optics,
                    n_immersion_design=args.n_immersion_design,
                    n_coverslip=args.n_coverslip,
                    coverslip=args.coverslip,
                    working_distance=args.working_distance,
                )
            else:
                result = psf_module.confocal(
                    tuple(args.shape),
                    spacing,
                    excitation=args.excitation,
                    emission=args.wavelength,
                    pinhole=args.pinhole,
                    **optics,
                )
        source = f"model {args.model}"
    provenance = {"software": f"microdecon {__version__}", "psf": source}
    io.imwrite(args.output, result, {"spacing": spacing, "provenance": provenance})
    print(f"wrote {args.output}: {source}, shape {result.shape}, voxel {spacing} um")
    return 0


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=sorted(METHODS), default="rl")
    parser.add_argument(
        "--num-iter", type=int, default=None, help="iterations of an iterative method (default: its own)"
    )
    parser.add_argument(
        "--balance", type=float, default=None, help="wiener/tikhonov weight (default: chosen from the data)"
    )
    parser.add_argument("--tv", type=float, default=None, help="total-variation weight of rl / rl-tv")
    parser.add_argument("--tol", type=float, default=None, help="stop once the relative change is below this")
    parser.add_argument("--boundary", choices=list(_validate.BOUNDARIES), default="non-circulant")
    parser.add_argument(
        "--background", type=float, default=None, help="additive background in counts (camera offset)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, gpu or gpu:N")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microdecon", description="Deconvolve fluorescence microscopy stacks."
    )
    parser.add_argument("--version", action="version", version=f"microdecon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="deconvolve the bundled sample and report time and quality")
    demo.add_argument("-o", "--output", default="demo_output", help="output folder (default demo_output)")
    _add_method_flags(demo)
    run = commands.add_parser("deconvolve", help="deconvolve TIFF files")
    run.add_argument("inputs", nargs="+", help="input TIFF files")
    run.add_argument("--psf", required=True, help="PSF TIFF file")
    run.add_argument("-o", "--output", required=True, help="output folder")
    run.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_method_flags(run)
    psf = commands.add_parser("psf", help="write a model PSF, or one made from a measured bead or bead stack")
    psf.add_argument("-o", "--output", required=True, help="output TIFF")
    source = psf.add_mutually_exclusive_group()
    source.add_argument("--model", choices=["widefield", "confocal", "gaussian"], default="widefield")
    source.add_argument("--from-bead", help="TIFF of one bead: clean, centre and normalize it")
    source.add_argument("--from-beads", help="TIFF of a bead stack: average its isolated beads")
    psf.add_argument("--shape", type=int, nargs="+", help="PSF shape (z y x) for a model")
    psf.add_argument("--spacing", type=float, nargs="+", help="voxel size (dz dy dx), micrometres")
    psf.add_argument("--wavelength", type=float, default=0.52, help="emission wavelength, um (default 0.52)")
    psf.add_argument("--excitation", type=float, default=0.488, help="confocal excitation wavelength, um")
    psf.add_argument("--na", type=float, default=1.4, help="numerical aperture (default 1.4)")
    psf.add_argument("--n-immersion", type=float, default=1.515, help="immersion refractive index")
    psf.add_argument(
        "--n-sample", type=float, default=None, help="sample refractive index (default: matched)"
    )
    psf.add_argument("--particle-depth", type=float, default=0.0, help="depth below the coverslip, um")
    psf.add_argument("--pinhole", type=float, default=1.0, help="confocal pinhole, Airy units (default 1)")
    psf.add_argument("--n-immersion-design", type=float, default=None, help="design immersion index")
    psf.add_argument("--n-coverslip", type=float, default=1.515, help="coverslip refractive index")
    psf.add_argument("--coverslip", type=float, default=170.0, help="coverslip thickness, um (default 170)")
    psf.add_argument("--working-distance", type=float, default=150.0, help="design working distance, um")
    psf.add_argument(
        "--oversample", type=int, default=3, help="sub-pixels per pixel along y and x (default 3)"
    )
    psf.add_argument("--sigma", type=float, nargs="+", help="gaussian sigma, um")
    psf.add_argument("--energy", type=float, default=None, help="--from-bead: crop to this fraction of light")
    psf.add_argument("--size", type=int, nargs="+", help="--from-beads: window shape, voxels")
    psf.add_argument(
        "--min-distance", type=float, default=None, help="--from-beads: closest neighbour, voxels"
    )
    psf.add_argument(
        "--saturation",
        type=float,
        default=None,
        help="--from-beads: camera saturation in counts (default: the file dtype's maximum; give 4095 for "
        "12-bit data stored as uint16)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``microdecon`` command; returns the exit code (0 only when everything succeeded).

    Examples
    --------
    >>> main(["--version"])  # doctest: +SKIP
    microdecon 0.1.0
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "psf":
            return _psf(args)
        return _deconvolve(args)
    except (OSError, ValueError, TypeError) as error:
        print(f"microdecon: error: {error}", file=sys.stderr)
        return 2
