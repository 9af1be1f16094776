"""The ``microdecon`` command: wiring from files and flags to the library, no algorithms.

``microdecon demo`` deconvolves the bundled sample and prints time and quality;
``microdecon deconvolve INPUT... (--psf PSF.tif | --psf-model MODEL) -o OUTDIR`` deconvolves TIFF
files, folders of them and glob patterns, one file at a time: a PSF file is resampled to each
image's voxel size, a model PSF is computed at it; one bad file does not stop the others;
``microdecon psf -o PSF.tif ...`` writes a model PSF or one made from measured beads.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

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


# --------------------------------------------------------------------------------------------
# PSF models: the optics flags, shared by `psf --model` and `deconvolve --psf-model`
# --------------------------------------------------------------------------------------------
_MODELS = ("widefield", "confocal", "gaussian")
_LENSES = ("widefield", "confocal")
# flag name: (default, the models that use it, help)
_OPTICS: dict[str, tuple[object, tuple[str, ...], str]] = {
    "wavelength": (0.52, _LENSES, "emission wavelength, um"),
    "excitation": (0.488, ("confocal",), "excitation wavelength, um"),
    "na": (1.4, _LENSES, "numerical aperture"),
    "n_immersion": (1.515, _LENSES, "immersion refractive index"),
    "n_sample": (None, _LENSES, "sample refractive index (default: that of the immersion)"),
    "particle_depth": (0.0, _LENSES, "depth below the coverslip, um"),
    "pinhole": (1.0, ("confocal",), "pinhole diameter, Airy units"),
    "n_immersion_design": (None, ("widefield",), "design immersion index (default: the actual one)"),
    "n_coverslip": (1.515, ("widefield",), "coverslip refractive index"),
    "coverslip": (170.0, ("widefield",), "coverslip thickness, um"),
    "working_distance": (150.0, ("widefield",), "design working distance, um"),
    "oversample": (3, _LENSES, "sub-pixels per pixel along y and x"),
    "sigma": (None, ("gaussian",), "gaussian sigma, um: one value, or one per axis"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_optics_flags(parser: argparse.ArgumentParser, model_flag: str) -> None:
    """The optics of the PSF models, for ``psf`` and ``deconvolve`` alike (defaults filled in by
    :func:`_optics`, so that a flag given for the wrong model can be refused)."""
    group = parser.add_argument_group(f"PSF model optics (with {model_flag})")
    for name, (default, models, text) in _OPTICS.items():
        shown = "" if default is None else f" (default {default})"
        only = "" if models == _LENSES else f"; {' / '.join(models)} only"
        group.add_argument(
            _flag(name),
            type=int if name == "oversample" else float,
            nargs="+" if name == "sigma" else None,
            default=None,
            help=f"{text}{shown}{only}",
        )


def _optics(args: argparse.Namespace, model: str | None, model_flag: str) -> dict:
    """The optics flags ``model`` uses, defaults filled in; one meant for another model (or given
    with a PSF that is not a model) is an error rather than silently ignored."""
    values = {}
    for name, (default, models, _) in _OPTICS.items():
        given = getattr(args, name)
        if model in models:
            values[name] = default if given is None else given
        elif given is not None:
            used_with = f"{model_flag} {' or '.join(models)}"
            raise ValueError(
                f"{_flag(name)} applies to {used_with}, not to "
                + (f"{model_flag} {model}" if model else "a PSF read from a file")
            )
    if model == "gaussian" and not values["sigma"]:
        raise ValueError(f"{model_flag} gaussian needs --sigma (micrometres, one or one per axis)")
    return values


def _model_psf(model: str, shape: tuple[int, ...], spacing: tuple[float, ...], optics: dict) -> np.ndarray:
    """The model PSF on a grid of ``shape`` and voxel size ``spacing``; a 2-D grid gets the in-focus
    plane of the 3-D widefield or confocal model."""
    from . import psf as psf_module

    if model == "gaussian":
        sigma = optics["sigma"]
        return psf_module.gaussian(shape, tuple(sigma) if len(sigma) > 1 else sigma[0], spacing=spacing)
    if len(shape) == 2:
        plane = _model_psf(model, (1, *shape), (spacing[0], *spacing), optics)
        return plane[0] / plane[0].sum()
    lens = dict(
        na=optics["na"],
        n_immersion=optics["n_immersion"],
        n_sample=optics["n_sample"],
        particle_depth=optics["particle_depth"],
        oversample=optics["oversample"],
    )
    if model == "widefield":
        return psf_module.widefield(
            shape,
            spacing,
            wavelength=optics["wavelength"],
            n_immersion_design=optics["n_immersion_design"],
            n_coverslip=optics["n_coverslip"],
            coverslip=optics["coverslip"],
            working_distance=optics["working_distance"],
            **lens,
        )
    return psf_module.confocal(
        shape,
        spacing,
        excitation=optics["excitation"],
        emission=optics["wavelength"],
        pinhole=optics["pinhole"],
        **lens,
    )


def _model_shape(
    model: str, image_shape: tuple[int, ...], spacing: tuple[float, ...], optics: dict
) -> tuple[int, ...]:
    """The grid of a model PSF for an image (the rule is in the ``deconvolve`` help: _SHAPE_RULE)."""
    if model == "gaussian":
        given = optics["sigma"]
        sigma = _validate.per_axis(given[0] if len(given) == 1 else given, len(image_shape), "--sigma")
        return tuple(2 * math.ceil(4 * s / d) + 1 for s, d in zip(sigma, spacing))
    na, wavelength = optics["na"], optics["wavelength"]  # the emission: the wider of a confocal's two
    n_sample = optics["n_sample"] or optics["n_immersion"]
    airy = 0.61 * wavelength / na
    reach = 4 * airy
    half_z = 0
    if len(image_shape) == 3:
        dz = spacing[0]
        fwhm_z = 0.88 * wavelength / (n_sample - math.sqrt(max(n_sample**2 - na**2, 0.0)))
        half_z = image_shape[0] // 2
        half_z = min(max(half_z, math.ceil(2 * fwhm_z / dz)), math.ceil(8 * fwhm_z / dz))
        sin_theta = min(na / n_sample, 0.95)  # past the critical angle only evanescent light
        cone = half_z * dz * sin_theta / math.sqrt(1 - sin_theta**2)
        reach = max(reach, cone)
    lateral = []
    for n, d in zip(image_shape[-2:], spacing[-2:]):
        half = max(min(math.ceil(reach / d), n // 2), math.ceil(4 * airy / d))
        lateral.append(2 * half + 1)
    return (2 * half_z + 1, *lateral) if len(image_shape) == 3 else tuple(lateral)


_SHAPE_RULE = """\
A model PSF (--psf-model) is computed at each image's voxel size on a grid chosen from the optics
and the image (or given with --psf-shape), all sizes odd so the centre is a voxel:
z: as many planes as the stack has (the smallest odd number >= its planes), so the PSF spans the
stack's depth, but at least +-2 and at most +-8 axial FWHM (0.88 lambda / (n - sqrt(n^2 - NA^2)));
y, x: out to the radius of the defocus cone at the outermost plane (z tan(theta), sin(theta) =
NA / n), but no wider than the image, and in any case at least 4 Airy radii (4 x 0.61 lambda / NA).
A 2-D image gets the in-focus plane (4 Airy radii). gaussian: +-4 sigma along every axis."""


# --------------------------------------------------------------------------------------------
# deconvolve: inputs, the PSF for each image, one file at a time
# --------------------------------------------------------------------------------------------
_TIFF_SUFFIXES = (".tif", ".tiff")


class _Job(NamedTuple):
    path: Path
    target: Path
    from_expansion: bool  # found in a folder or by a pattern, rather than named


def _expand(
    inputs: Sequence[str], recursive: bool
) -> tuple[list[tuple[Path, Path, bool]], list[tuple[str, str]]]:
    """Files from the INPUT arguments: (file, sub-folder of the output folder, found by expansion),
    duplicates removed, and (INPUT, why) for each argument that names nothing."""
    found: list[tuple[Path, Path, bool]] = []
    failures: list[tuple[str, str]] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir() and path.suffix.lower() != ".zarr":  # a Zarr store is one image
            # hidden files are not data (macOS "._x.tif" forks, temporaries of interrupted writes)
            pattern = "**/*" if recursive else "*"
            files = sorted(
                p
                for p in path.glob(pattern)
                if p.suffix.lower() in _TIFF_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not files:
                hint = "" if recursive else " (--recursive also searches its subfolders)"
                failures.append((name, f"no .tif or .tiff files in this folder{hint}"))
            found += [(p, p.relative_to(path).parent, True) for p in files]
        elif path.exists():
            found.append((path, Path(), False))
        elif any(c in name for c in "*?["):  # a pattern the shell did not expand (Windows, quoted)
            files = [Path(m) for m in sorted(glob.glob(name, recursive=recursive)) if Path(m).is_file()]
            if not files:
                failures.append((name, "the pattern matches no files"))
            found += [(p, Path(), True) for p in files]
        else:
            failures.append((name, "no such file or folder"))
    unique, seen = [], set()
    for path, sub, expanded in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, sub, expanded))
    return unique, failures


def _output_name(path: Path) -> str:
    """NAME_decon.tif, or NAME_decon.ome.tif for an OME-TIFF (its metadata kept in its own format)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return f"{name[: -len(suffix)]}_decon.ome.tif"
    return f"{path.stem}_decon.tif"


def _read(path: Path) -> tuple[np.ndarray, dict]:
    """An image and its metadata, with stored integers mapped back to the values they stand for
    where the file records a scale and offset (floats that microdecon kept as uint16)."""
    image, meta = io.imread(path)
    scale, offset = meta.pop("scale", None), meta.pop("offset", None)
    if scale is not None or offset is not None:
        scale = 1.0 if scale is None else scale
        image = image.astype(np.float32) * np.float32(scale) + np.float32(offset or 0.0)
    return image, meta


def _plan(found: list[tuple[Path, Path, bool]], out_dir: Path) -> tuple[list[_Job], list[tuple[str, str]]]:
    """Output paths; the outputs of earlier runs found in a folder are not inputs, no two inputs
    share an output, and no output replaces an input."""
    jobs = [_Job(p, out_dir / sub / _output_name(p), e) for p, sub, e in found]
    targets = {job.target.resolve() for job in jobs}
    jobs = [job for job in jobs if not (job.from_expansion and job.path.resolve() in targets)]
    inputs = {job.path.resolve() for job in jobs}
    planned, failures, owner = [], [], {}
    for job in jobs:
        target = job.target.resolve()
        if target in inputs:
            failures.append((str(job.path), f"its output {job.target} would overwrite an input"))
        elif target in owner:
            why = f"its output {job.target} is also that of {owner[target]}; rename one or run them apart"
            failures.append((str(job.path), why))
        else:
            owner[target] = job.path
            planned.append(job)
    return planned, failures


def _check_writable(folder: Path) -> None:
    """Create the output folder and make sure files can be made in it, before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".microdecon-", suffix=".probe", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OSError(f"cannot write to the output folder {folder}: {error.strerror or error}") from None


def _um(spacing: Sequence[float]) -> str:
    return "x".join(f"{s:g}" for s in spacing) + " um"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def _cause(error: BaseException, path: Path) -> str:
    """The reason a file failed, on one line, without repeating the file's name."""
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
        if error.filename and str(error.filename) != str(path):
            text += f": {error.filename}"
    else:
        text = " ".join(str(error).split())
        prefix = f"{path}: "
        if text.startswith(prefix):
            text = text[len(prefix) :]
    if not isinstance(error, (OSError, ValueError, TypeError)):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text or type(error).__name__


class _PsfSource:
    """The PSF for each image: a file, resampled to the image's voxel size where they differ, or a
    model computed at it; each distinct result made once per run."""

    def __init__(self, args: argparse.Namespace):
        self.model = args.psf_model
        self.shape = tuple(args.psf_shape) if args.psf_shape else None
        self.cache: dict[tuple, tuple[np.ndarray, str, str]] = {}
        self.warned = False
        self.warnings: list[str] = []
        if self.model:
            if args.psf_spacing:
                raise ValueError("--psf-spacing applies to a PSF file (--psf), not to --psf-model")
            self.optics = _optics(args, self.model, "--psf-model")
            # refuse impossible optics once, up front, on a tiny grid
            probe_ndim = len(args.sigma) if self.model == "gaussian" and len(args.sigma) > 1 else 3
            _model_psf(self.model, (3,) * probe_ndim, (0.1,) * probe_ndim, self.optics)
            self.description = f"model {self.model}"
            return
        if args.psf_shape:
            raise ValueError("--psf-shape applies to --psf-model, not to a PSF file")
        _optics(args, None, "--psf-model")
        self.path = Path(args.psf)
        self.psf, meta = _read(self.path)
        self.psf = _validate.check_psf(self.psf, self.psf.ndim, name=f"the PSF {self.path}")
        if args.psf_spacing:
            if len(args.psf_spacing) != self.psf.ndim:
                raise ValueError(
                    f"--psf-spacing has {len(args.psf_spacing)} values but the PSF {self.path} has "
                    f"{self.psf.ndim} axes (shape {_shape(self.psf.shape)})"
                )
            self.spacing = _validate.per_axis(args.psf_spacing, self.psf.ndim, "--psf-spacing")
            self.known = True
        else:
            self.spacing, self.known = tuple(meta["spacing"]), bool(meta["spacing_known"])
        known = f"voxel {_um(self.spacing)}" if self.known else "no voxel size recorded"
        self.description = f"{self.path} ({_shape(self.psf.shape)}, {known})"

    def for_image(
        self, path: Path, shape: tuple[int, ...], spacing: tuple[float, ...], known: bool
    ) -> tuple[np.ndarray, str, str]:
        """(PSF, its provenance, a note for the log line or "") for one image."""
        if self.model:
            return self._model_for(path, shape, spacing, known)
        if self.psf.ndim != len(shape):
            raise ValueError(
                f"the PSF {self.path} has shape {_shape(self.psf.shape)} but the image has shape "
                f"{_shape(shape)}; they need the same number of axes"
            )
        if known and self.known:
            if np.allclose(spacing, self.spacing, rtol=1e-3):
                return self.psf, str(self.path), ""
            key = ("resampled", spacing)
            if key not in self.cache:
                from . import psf as psf_module

                resampled = psf_module.resample(self.psf, self.spacing, spacing)
                text = f"PSF resampled from {_um(self.spacing)} to {_um(spacing)}"
                self.cache[key] = (resampled, f"{self.path}, {text}", text)
            return self.cache[key]
        if known:
            raise ValueError(
                f"voxel size {_um(spacing)}, but the PSF {self.path} records none, so they cannot be "
                "matched; give the PSF's with --psf-spacing"
            )
        if self.known:
            raise ValueError(
                f"no voxel size in its metadata, so the PSF ({_um(self.spacing)}) cannot be matched "
                "to it; give it with --spacing"
            )
        if not self.warned:
            self.warned = True
            self.warnings.append(
                f"neither {path} nor the PSF {self.path} records a voxel size: assuming they are the "
                "same (give --spacing and --psf-spacing to be sure)"
            )
        return self.psf, f"{self.path} (voxel sizes unknown, assumed equal)", ""

    def _model_for(self, path: Path, shape: tuple[int, ...], spacing: tuple[float, ...], known: bool):
        if not known:
            raise ValueError(
                "no voxel size in its metadata, and a model PSF needs one; give it with --spacing DZ DY DX"
            )
        if len(shape) not in (2, 3):
            raise ValueError(f"the image has shape {_shape(shape)}; a model PSF is 2-D or 3-D")
        grid = self.shape or _model_shape(self.model, shape, spacing, self.optics)
        if len(grid) != len(shape):
            raise ValueError(
                f"--psf-shape has {len(grid)} values but the image has shape {_shape(shape)}; give one "
                "per image axis"
            )
        key = ("model", grid, spacing)
        if key not in self.cache:
            model = _model_psf(self.model, grid, spacing, self.optics)
            text = f"PSF model {self.model} {_shape(grid)} at {_um(spacing)}"
            self.cache[key] = (model, text, text)
        return self.cache[key]


def _device_text(device: str) -> str:
    backend = get_backend(device=device)  # a bad or missing device fails here, before any work
    where = f"gpu:{backend.device_id}" if backend.name == "gpu" else "cpu"
    return f"{where} ({backend.fft_library})"


def _deconvolve(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    params = _method_params(args)
    if params.get("background") is None:
        params["background"] = 0.0
    device = _device_text(args.device)
    if args.spacing:
        _validate.per_axis(args.spacing, len(args.spacing), "--spacing")
    source = _PsfSource(args)
    out_dir = Path(args.output)
    _check_writable(out_dir)
    found, failures = _expand(args.inputs, args.recursive)
    jobs, refused = _plan(found, out_dir)
    failures += refused
    total = len(jobs) + len(failures)

    def say(line: str) -> None:
        if not args.quiet:
            tqdm.write(line, file=sys.stdout)

    def report(name: str, cause: str) -> None:
        tqdm.write(f"{name}: FAILED: {cause}", file=sys.stderr)

    for name, cause in failures:
        report(name, cause)
    say(f"PSF: {source.description}; {args.method} on {device}")
    written = skipped = 0
    for job in tqdm(jobs, desc="files", unit="file", disable=args.quiet, dynamic_ncols=True):
        path, target = job.path, job.target
        if target.exists() and not args.overwrite:
            skipped += 1
            say(f"{path}: skipped, {target} exists (--overwrite replaces it)")
            continue
        try:
            start = time.perf_counter()
            image, meta = _read(path)
            shape = tuple(image.shape)
            if args.spacing:
                if len(args.spacing) != image.ndim:
                    raise ValueError(
                        f"--spacing has {len(args.spacing)} values but the image has shape {_shape(shape)}"
                    )
                spacing, known = tuple(float(s) for s in args.spacing), True
            else:
                spacing, known = tuple(meta["spacing"]), bool(meta["spacing_known"])
            psf, psf_text, note = source.for_image(path, shape, spacing, known)
            for warning in source.warnings:
                tqdm.write(f"microdecon: warning: {warning}", file=sys.stderr)
            source.warnings.clear()
            restored = deconvolve(image, psf, args.method, device=args.device, **params)
            meta["spacing"], meta["spacing_known"] = spacing, known
            meta["provenance"] = _provenance(args, params, psf_text, device)
            target.parent.mkdir(parents=True, exist_ok=True)
            io.imwrite(target, restored, meta)
            written += 1
            seconds = time.perf_counter() - start
            say(
                f"{path} -> {target}: {_shape(shape)} {image.dtype}, {args.method}, {seconds:.2f} s "
                f"on {device}" + (f"; {note}" if note else "")
            )
        except Exception as error:  # one bad file (or a device out of memory) must not stop the batch
            failures.append((str(path), _cause(error, path)))
            report(*failures[-1])
    say(f"{written} written, {skipped} skipped, {len(failures)} failed, of {total} file(s)")
    if failures:
        print(f"{len(failures)} of {total} file(s) failed:", file=sys.stderr)
        for name, cause in failures:
            print(f"  {name}: {cause}", file=sys.stderr)
        return 1
    return 0


def _psf(args: argparse.Namespace) -> int:
    from . import psf as psf_module

    source: str
    if args.from_bead or args.from_beads:
        _optics(args, None, "--model")
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
        optics = _optics(args, args.model, "--model")
        if not (args.shape and args.spacing):
            raise ValueError("a model PSF needs --shape Z Y X and --spacing DZ DY DX (micrometres)")
        spacing = tuple(args.spacing)
        result = _model_psf(args.model, tuple(args.shape), spacing, optics)
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
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or progress lines (errors still shown)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microdecon", description="Deconvolve fluorescence microscopy stacks."
    )
    parser.add_argument("--version", action="version", version=f"microdecon {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="deconvolve the bundled sample and report time and quality")
    demo.add_argument("-o", "--output", default="demo_output", help="output folder (default demo_output)")
    _add_method_flags(demo)

    run = commands.add_parser(
        "deconvolve",
        help="deconvolve TIFF files, folders of them or glob patterns",
        description=(
            "Deconvolve each input into OUTPUT/NAME_decon.tif (voxel size, metadata and provenance\n"
            "kept). Existing outputs are skipped unless --overwrite, so a stopped batch resumes; one\n"
            "bad file does not stop the others. Exit code 0 only if every file succeeded: 1 if any\n"
            "failed (each named, with its reason), 2 for bad flags or an unusable PSF or output folder."
        ),
        epilog=_SHAPE_RULE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="TIFF files, folders (every .tif/.tiff in them, sorted) and glob patterns such as "
        "'data/*.tif' (expanded here too, for shells that do not)",
    )
    psf_source = run.add_mutually_exclusive_group(required=True)
    psf_source.add_argument(
        "--psf", help="PSF TIFF file (resampled to each image's voxel size if it differs)"
    )
    psf_source.add_argument(
        "--psf-model", choices=_MODELS, help="compute the PSF from the optics flags below, per voxel size"
    )
    run.add_argument("-o", "--output", required=True, help="output folder (made if missing)")
    run.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="D",
        help="voxel size DZ DY DX in micrometres, one per image axis: overrides the files' metadata",
    )
    run.add_argument(
        "--psf-spacing",
        type=float,
        nargs="+",
        metavar="D",
        help="voxel size of the --psf file, micrometres, when its metadata has none (or is wrong)",
    )
    run.add_argument(
        "--psf-shape", type=int, nargs="+", metavar="N", help="grid of a --psf-model (default: see below)"
    )
    run.add_argument(
        "--recursive",
        action="store_true",
        help="search folders' subfolders too (outputs keep the subfolders); ** in patterns spans folders",
    )
    run.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_method_flags(run)
    _add_optics_flags(run, "--psf-model")

    psf = commands.add_parser("psf", help="write a model PSF, or one made from a measured bead or bead stack")
    psf.add_argument("-o", "--output", required=True, help="output TIFF")
    source = psf.add_mutually_exclusive_group()
    source.add_argument("--model", choices=_MODELS, default="widefield")
    source.add_argument("--from-bead", help="TIFF of one bead: clean, centre and normalize it")
    source.add_argument("--from-beads", help="TIFF of a bead stack: average its isolated beads")
    psf.add_argument("--shape", type=int, nargs="+", help="PSF shape (z y x) for a model")
    psf.add_argument("--spacing", type=float, nargs="+", help="voxel size (dz dy dx), micrometres")
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
    _add_optics_flags(psf, "--model")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``microdecon`` command; returns the exit code.

    0 when everything succeeded, 1 when some files of a ``deconvolve`` batch failed (each named on
    stderr, with its reason), 2 for bad flags or an error that stops the whole run (an unreadable
    PSF, an output folder that cannot be written).

    Examples
    --------
    >>> main(["--version"])  # doctest: +SKIP
    microdecon 0.1.0
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse's usage errors (2), --help and --version (0)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "psf":
            return _psf(args)
        return _deconvolve(args)
    except (OSError, ValueError, TypeError) as error:
        print(f"microdecon: error: {error}", file=sys.stderr)
        return 2
