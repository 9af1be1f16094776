"""The ``microdecon`` command: wiring from files and flags to the library, no algorithms.

``microdecon demo`` deconvolves the bundled sample and prints time and quality;
``microdecon deconvolve INPUT... (--psf PSF.tif | --psf-model MODEL) -o OUTDIR`` deconvolves TIFF
files, folders of them and glob patterns, one file at a time: a PSF file is resampled to each
image's voxel size, a model PSF is computed at it (per channel, at its wavelengths); time and
channel axes are restored volume by volume, one PSF per channel; files larger than the memory are
read, restored and written tile by tile; ``--dry-run`` prints the plan and computes nothing; one
bad file does not stop the others;
``microdecon info FILE...`` describes files (read lazily) and the tile plan deconvolve would use;
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


#: ``--accelerate`` values: the scheme ``richardson_lucy(accelerate=...)`` runs ("none": plain RL).
ACCELERATE_FLAGS = {
    "biggs-andrews": "biggs-andrews",
    "conjugate-gradient": "conjugate-gradient",
    "none": False,
}


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
        "accelerate": ACCELERATE_FLAGS.get(args.accelerate),
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
    if params.get("accelerate") == "conjugate-gradient" and (args.method == "rl-tv" or params.get("tv")):
        raise ValueError(
            "--accelerate conjugate-gradient does not combine with total variation (rl-tv, --tv): "
            "use biggs-andrews or none"
        )
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


# optics flags that take several values: sigma per axis; wavelength per channel (deconvolve, info)
_LISTS = ("sigma", "wavelength")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_optics_flags(parser: argparse.ArgumentParser, model_flag: str, *, per_channel: bool = False) -> None:
    """The optics of the PSF models, for ``psf`` and ``deconvolve`` alike (defaults filled in by
    :func:`_optics`, so that a flag given for the wrong model can be refused); ``per_channel``:
    the wavelengths may also come from the image files' metadata, one per channel."""
    group = parser.add_argument_group(f"PSF model optics (with {model_flag})")
    for name, (default, models, text) in _OPTICS.items():
        shown = "" if default is None else f" (default {default})"
        if per_channel and name == "wavelength":
            text = (
                "emission wavelength, um: one for all channels, or one per channel in channel order; "
                "given, it is used rather than the file's"
            )
            shown = f" (default: each channel's from the file's metadata, else {default})"
        elif per_channel and name == "excitation":
            shown = f" (default: each channel's from the file's metadata, else {default})"
        only = "" if models == _LENSES else f"; {' / '.join(models)} only"
        group.add_argument(
            _flag(name),
            type=int if name == "oversample" else float,
            nargs="+" if name in _LISTS else None,
            default=None,
            help=f"{text}{shown}{only}",
        )


def _optics(args: argparse.Namespace, model: str | None, model_flag: str) -> dict:
    """The optics flags ``model`` uses, defaults filled in; one meant for another model (or given
    with a PSF that is not a model) is an error rather than silently ignored."""
    values = {}
    for name, (default, models, _) in _OPTICS.items():
        given = getattr(args, name)
        if name == "wavelength" and given:
            given = given[0]  # the others, one per channel, are the PSF source's to use
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


class _PsfFile:
    """One PSF file, resampled to each image's voxel size where they differ (each size once)."""

    def __init__(self, path: str, psf_spacing: Sequence[float] | None, warnings: list[str]):
        self.path = Path(path)
        self.cache: dict[tuple, tuple[np.ndarray, str, str]] = {}
        self.warned = False
        self.warnings = warnings
        self.psf, meta = _read(self.path)
        self.psf = _validate.check_psf(self.psf, self.psf.ndim, name=f"the PSF {self.path}")
        if psf_spacing:
            if len(psf_spacing) != self.psf.ndim:
                raise ValueError(
                    f"--psf-spacing has {len(psf_spacing)} values but the PSF {self.path} has "
                    f"{self.psf.ndim} axes (shape {_shape(self.psf.shape)})"
                )
            self.spacing = _validate.per_axis(psf_spacing, self.psf.ndim, "--psf-spacing")
            self.known = True
        else:
            self.spacing, self.known = tuple(meta["spacing"]), bool(meta["spacing_known"])
        known = f"voxel {_um(self.spacing)}" if self.known else "no voxel size recorded"
        self.description = f"{self.path} ({_shape(self.psf.shape)}, {known})"

    def for_image(
        self, path: Path, shape: tuple[int, ...], spacing: tuple[float, ...], known: bool
    ) -> tuple[np.ndarray, str, str]:
        """(PSF, its provenance, a note for the log line or "") for one image."""
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


class _ImagePsfs(NamedTuple):
    """The PSFs of one image: one for every channel, or one per channel."""

    arrays: list  # the PSFs (None where only the shape was asked for)
    shapes: list[tuple[int, ...]]
    provenance: str
    notes: list[str]  # for the log line
    lines: list[str]  # what each PSF is, for --dry-run and info


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


class _PsfSource:
    """The PSF for each image and channel: files (one for all channels, or one per channel),
    resampled to the image's voxel size where they differ, or a model computed at it, per channel
    at that channel's wavelengths; each distinct result made once per run."""

    def __init__(self, args: argparse.Namespace):
        self.model = args.psf_model
        self.shape = tuple(args.psf_shape) if args.psf_shape else None
        self.cache: dict[tuple, tuple[np.ndarray, str]] = {}
        self.warnings: list[str] = []
        self.files: list[_PsfFile] = []
        self.emission = args.wavelength  # None, one value, or one per channel
        self.excitation = args.excitation
        if self.shape and any(n < 1 for n in self.shape):
            raise ValueError(f"--psf-shape must be positive, got {' '.join(map(str, self.shape))}")
        if self.model:
            if args.psf_spacing:
                raise ValueError("--psf-spacing applies to a PSF file (--psf), not to --psf-model")
            self.optics = _optics(args, self.model, "--psf-model")
            # refuse impossible optics once, up front, on a tiny grid
            probe_ndim = len(args.sigma) if self.model == "gaussian" and len(args.sigma) > 1 else 3
            lens = self.model in _LENSES
            for wavelength in (self.emission or [self.optics["wavelength"]]) if lens else [None]:
                optics = dict(self.optics, wavelength=wavelength) if lens else self.optics
                _model_psf(self.model, (3,) * probe_ndim, (0.1,) * probe_ndim, optics)
            self.description = f"model {self.model}"
            return
        _optics(args, None, "--psf-model")
        if not args.psf:  # `info` with --psf-shape alone: a grid, nothing to compute
            self.description = f"--psf-shape {_shape(self.shape or ())}"
            return
        if args.psf_shape:
            raise ValueError("--psf-shape applies to --psf-model, not to a PSF file")
        self.files = [_PsfFile(path, args.psf_spacing, self.warnings) for path in args.psf]
        self.description = ", ".join(f.description for f in self.files)

    def for_image(
        self,
        path: Path,
        shape: tuple[int, ...],
        spacing: tuple[float, ...],
        known: bool,
        *,
        axes: str,
        channels: int,
        meta: dict,
        compute: bool = True,
    ) -> _ImagePsfs:
        """The PSFs for an image of spatial ``shape`` with ``channels`` channels (``compute=False``:
        model PSFs only sized, not computed)."""
        if self.files:
            return self._files_for(path, shape, spacing, known, axes, channels)
        if self.model is None:
            if len(self.shape) != len(shape):
                raise ValueError(
                    f"--psf-shape has {len(self.shape)} values but the image has {len(shape)} spatial "
                    f"axes ({_shape(shape)})"
                )
            return _ImagePsfs([None], [self.shape], self.description, [], [f"grid {_shape(self.shape)}"])
        return self._models_for(shape, spacing, known, channels, meta, compute)

    def _files_for(self, path, shape, spacing, known, axes, channels) -> _ImagePsfs:
        count = len(self.files)
        if count > 1 and "C" not in axes:
            raise ValueError(
                f"{count} PSF files (--psf) were given, one per channel, but the image has no channel "
                f"axis (axes {axes})"
            )
        if count > 1 and count != channels:
            raise ValueError(
                f"{count} PSF files (--psf) for {channels} channels (axes {axes}); give one per "
                "channel, in channel order, or one for all"
            )
        found = [f.for_image(path, shape, spacing, known) for f in self.files]
        lines = [
            f"{text}: {_shape(psf.shape)}" + ("" if note else ", not resampled") for psf, text, note in found
        ]
        if count == 1:
            provenance = found[0][1]
        else:
            provenance = "; ".join(f"channel {c}: {text}" for c, (_, text, _) in enumerate(found))
            lines = [f"channel {c}: {line}" for c, line in enumerate(lines)]
        arrays = [psf for psf, _, _ in found]
        return _ImagePsfs(arrays, [p.shape for p in arrays], provenance, _unique(n for *_, n in found), lines)

    def _wavelengths(self, channels: int, meta: dict) -> list[tuple[float, str, float | None, str]]:
        """(emission, its source, excitation, its source) per channel: a flag when given, else the
        file's metadata for that channel when it has it, else the flag's default (the excitation
        for a confocal model only)."""
        emission = self.emission
        if emission and len(emission) not in (1, channels):
            raise ValueError(
                f"--wavelength has {len(emission)} values for {channels} channel(s); give one for all, "
                "or one per channel"
            )
        recorded_em = meta.get("wavelengths") or [None] * channels
        recorded_ex = meta.get("excitation_wavelengths") or [None] * channels
        values = []
        for c in range(channels):
            if emission:
                em = (emission[c if len(emission) > 1 else 0], "--wavelength")
            elif recorded_em[c] is not None:
                em = (recorded_em[c], "file")
            else:
                em = (self.optics["wavelength"], "default")
            if self.model != "confocal":
                ex = (None, "")
            elif self.excitation is not None:
                ex = (self.excitation, "--excitation")
            elif recorded_ex[c] is not None:
                ex = (recorded_ex[c], "file")
            else:
                ex = (self.optics["excitation"], "default")
            values.append((*em, *ex))
        return values

    def _models_for(self, shape, spacing, known, channels, meta, compute) -> _ImagePsfs:
        if not known and (compute or not self.shape):
            raise ValueError(
                "no voxel size in its metadata, and a model PSF needs one; give it with --spacing DZ DY DX"
            )
        if len(shape) not in (2, 3):
            raise ValueError(f"the image has shape {_shape(shape)}; a model PSF is 2-D or 3-D")
        if self.shape and len(self.shape) != len(shape):
            raise ValueError(
                f"--psf-shape has {len(self.shape)} values but the image has shape {_shape(shape)}; give "
                "one per image axis"
            )
        lens = self.model in _LENSES
        per_channel = self._wavelengths(channels, meta) if lens else [(None, "", None, "")]
        arrays, grids, texts, notes = [], [], [], []
        for em, em_from, ex, ex_from in per_channel:
            optics = self.optics
            if lens:
                optics = dict(optics, wavelength=em, **({"excitation": ex} if ex is not None else {}))
            grid = self.shape or _model_shape(self.model, shape, spacing, optics)
            text = f"PSF model {self.model} {_shape(grid)} at {_um(spacing)}"
            key = ("model", grid, spacing, em, ex)
            if compute and key not in self.cache:
                self.cache[key] = (_model_psf(self.model, grid, spacing, optics), text)
            arrays.append(self.cache[key][0] if compute else None)
            grids.append(grid)
            texts.append(text)
            note = f"emission {em:g} um ({em_from})" if lens else ""
            notes.append(note + (f", excitation {ex:g} um ({ex_from})" if ex is not None else ""))
        if len(set(zip(grids, notes))) == 1:  # every channel the same PSF
            line = f"model {self.model} {_shape(grids[0])} at {_um(spacing)}"
            line += f", {notes[0]}" if notes[0] else ""
            return _ImagePsfs(arrays[:1], grids[:1], texts[0], _unique([texts[0], notes[0]]), [line])
        lines = [
            f"channel {c}: model {self.model} {_shape(g)} at {_um(spacing)}, {n}"
            for c, (g, n) in enumerate(zip(grids, notes))
        ]
        each = [f"channel {c}: {t}" + (f", {n}" if n else "") for c, (t, n) in enumerate(zip(texts, notes))]
        return _ImagePsfs(arrays, grids, "; ".join(each), each, lines)


def _device_text(device: str) -> str:
    backend = get_backend(device=device)  # a bad or missing device fails here, before any work
    where = f"gpu:{backend.device_id}" if backend.name == "gpu" else "cpu"
    return f"{where} ({backend.fft_library})"


# --------------------------------------------------------------------------------------------
# One image: its facts (read lazily), its PSFs, its tile plan, and how it will be read
# --------------------------------------------------------------------------------------------
#: Without --memory-limit, a file larger than this fraction of the available RAM is read lazily.
_LAZY_FRACTION = 0.25


def _byte_size(text: str) -> int:
    """``--memory-limit``: bytes from "512MB", "4GB", "2GiB" or a plain number."""
    import dask.utils

    try:
        value = dask.utils.parse_bytes(text)
    except (ValueError, TypeError):
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 512MB or 4GB")
    return int(value)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def _disk_bytes(path: Path) -> int:
    if path.is_dir():  # a Zarr store
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class _Image(NamedTuple):
    """What is known of an input before any pixel is read."""

    path: Path
    lazy: object  # the pixels as a Dask array (stored values; see meta's scale and offset)
    meta: dict
    axes: str
    order: tuple[int, ...]  # the axes put in the order T, C, then Z, Y, X
    spatial: tuple[int, ...]  # the shape of one volume
    spacing: tuple[float, ...]  # of the spatial axes
    known: bool
    spacing_from: str
    channels: int
    channel_axis: int | None  # in the reordered array
    disk_bytes: int
    memory_bytes: int
    itemsize: int  # bytes per voxel handed to the restoration (4 when stored values are scaled)


def _open(path: Path) -> _Image:
    """Read an input's metadata (lazily, so files larger than memory are fine)."""
    lazy, meta = io.imread(path, lazy=True)
    axes = str(meta["axes"])
    frames = [a for a in "TC" if a in axes]
    spatial_axes = [a for a in "ZYX" if a in axes]
    order = tuple(axes.index(a) for a in frames + spatial_axes)
    if len(order) != lazy.ndim:
        raise ValueError(f"axes {axes} cannot be put in the order T, C, Z, Y, X")
    spatial = tuple(lazy.shape[axes.index(a)] for a in spatial_axes)
    scaled = meta.get("scale") is not None or meta.get("offset") is not None
    itemsize = 4 if scaled else lazy.dtype.itemsize
    return _Image(
        path=path,
        lazy=lazy,
        meta=meta,
        axes=axes,
        order=order,
        spatial=spatial,
        spacing=tuple(float(meta["spacing"][axes.index(a)]) for a in spatial_axes),
        known=bool(meta["spacing_known"]),
        spacing_from="file",
        channels=lazy.shape[axes.index("C")] if "C" in axes else 1,
        channel_axis=frames.index("C") if "C" in frames else None,
        disk_bytes=_disk_bytes(path),
        memory_bytes=math.prod(lazy.shape) * itemsize,
        itemsize=itemsize,
    )


def _with_spacing(image: _Image, args: argparse.Namespace) -> _Image:
    """The image with the voxel size of ``--spacing`` where given (one per spatial axis)."""
    if not args.spacing:
        return image
    if len(args.spacing) != len(image.spatial):
        spatial = "".join(a for a in image.axes if a in "ZYX")
        raise ValueError(
            f"--spacing has {len(args.spacing)} values but the image has shape {_shape(image.lazy.shape)} "
            f"(axes {image.axes}); give one per spatial axis ({spatial})"
        )
    return image._replace(spacing=tuple(float(s) for s in args.spacing), known=True, spacing_from="--spacing")


def _tile_shape(args: argparse.Namespace, ndim: int) -> object:
    """``--tile-shape`` for ``tiling``: "auto", or one size per axis (-1: the whole axis)."""
    if not args.tile_shape:
        return "auto"
    if len(args.tile_shape) != ndim:
        raise ValueError(
            f"--tile-shape has {len(args.tile_shape)} values but the image has {ndim} spatial axes; give "
            "one per axis (0 or -1 for a whole axis)"
        )
    return tuple(-1 if n in (0, -1) else n for n in args.tile_shape)


def _tile_plans(image: _Image, psfs: _ImagePsfs, args: argparse.Namespace, params: dict) -> list:
    """The tile plan of one volume for each PSF (as ``tiling.deconvolve`` will make it)."""
    from . import tiling

    plans: dict = {}
    arrays = psfs.arrays if psfs.arrays is not None else [None] * len(psfs.shapes)
    for shape, array in zip(psfs.shapes, arrays):
        if shape not in plans:
            # the PSF itself when it is at hand: a compact one gets a narrower overlap
            plans[shape] = tiling.plan(
                image.spatial,
                array if array is not None else shape,
                args.method,
                tile_shape=_tile_shape(args, len(image.spatial)),
                memory_limit=args.memory_limit,
                boundary=params["boundary"],
                num_iter=params.get("num_iter"),
                device=args.device,
                input_itemsize=image.itemsize,
            )
    tiles = max(p.tiles for p in plans.values())
    if tiles > 1 and params.get("tol") is not None:
        raise ValueError(
            f"--tol needs the whole volume at every iteration and it is cut into {tiles} tiles; give a "
            "larger --memory-limit, or --tile-shape 0 0 0 (whole axes)"
        )
    return [plans[shape] for shape in psfs.shapes]


def _reading(image: _Image, args: argparse.Namespace) -> tuple[bool, str]:
    """Whether to read the image lazily (tile by tile) rather than whole, and why."""
    size = max(image.disk_bytes, image.memory_bytes)
    if args.memory_limit is not None:
        limit, of = args.memory_limit, "--memory-limit"
    else:
        free = get_backend(device="cpu").free_memory()
        limit, of = int(_LAZY_FRACTION * free), f"{_LAZY_FRACTION:.0%} of the available RAM"
    if size > limit:
        return True, f"lazily, tile by tile ({_human(size)} > {of}, {_human(limit)})"
    return False, f"whole, in memory ({_human(size)} <= {of}, {_human(limit)})"


def _plan_text(plans: list, image: _Image) -> list[str]:
    """The tile plan, once, or per channel where the channels' PSFs differ in size."""
    volumes = math.prod(image.lazy.shape) // math.prod(image.spatial)
    each = f" (each of {volumes} volumes)" if volumes > 1 else ""
    if len({str(p) for p in plans}) == 1:
        return [f"{plans[0]}{each}"]
    return [f"channel {c}: {plan}{each}" for c, plan in enumerate(plans)]


def _tiles_note(plans: list, image: _Image) -> str:
    tiles = max(p.tiles for p in plans)
    if tiles == 1:
        return ""
    volumes = math.prod(image.lazy.shape) // math.prod(image.spatial)
    return f"{tiles} tiles" + (" per volume" if volumes > 1 else "")


def _full_spacing(image: _Image) -> tuple[float, ...]:
    """The voxel size in the file's axis order (1.0 for T and C), as ``io`` records it."""
    spatial = iter(image.spacing)
    return tuple(next(spatial) if a in "ZYX" else 1.0 for a in image.axes)


def _scaled(array, meta: dict):
    """Stored integers mapped back to the values they stand for, where the file records a scale and
    offset (floats that microdecon kept as uint16); NumPy or Dask alike."""
    scale, offset = meta.pop("scale", None), meta.pop("offset", None)
    if scale is None and offset is None:
        return array
    scale = 1.0 if scale is None else scale
    return array.astype(np.float32) * np.float32(scale) + np.float32(offset or 0.0)


def _restore(image: _Image, psfs: _ImagePsfs, lazy: bool, args: argparse.Namespace, params: dict):
    """Deconvolve one image: whole in memory, or (``lazy``) as a Dask graph read and written tile
    by tile; returns the result in the file's axis order (NumPy, or lazy Dask)."""
    if lazy:
        pixels = _scaled(image.lazy, image.meta)
    else:
        pixels, _ = _read(image.path)
        image.meta.pop("scale", None)
        image.meta.pop("offset", None)
    pixels = pixels.transpose(image.order)
    psf = psfs.arrays[0] if len(psfs.arrays) == 1 else psfs.arrays
    restored = deconvolve(
        pixels,
        psf,
        args.method,
        device=args.device,
        tile_shape=_tile_shape(args, len(image.spatial)),
        memory_limit=args.memory_limit,
        channel_axis=image.channel_axis if len(psfs.arrays) > 1 else None,
        **params,
    )
    return restored.transpose(tuple(int(a) for a in np.argsort(image.order)))


def _check_writable_dry(folder: Path) -> None:
    """What :func:`_check_writable` checks, without making the folder or writing in it."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OSError(f"cannot write to the output folder {folder}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"cannot write to the output folder {folder}: Permission denied")


def _deconvolve(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    params = _method_params(args)
    if params.get("background") is None:
        params["background"] = 0.0
    device = _device_text(args.device)
    if args.spacing:
        _validate.per_axis(args.spacing, len(args.spacing), "--spacing")
    if args.tile_shape and any(n < -1 for n in args.tile_shape):
        raise ValueError("--tile-shape takes sizes in voxels, or 0 or -1 for a whole axis")
    source = _PsfSource(args)
    out_dir = Path(args.output)
    if args.dry_run:
        _check_writable_dry(out_dir)
    else:
        _check_writable(out_dir)
    found, failures = _expand(args.inputs, args.recursive)
    jobs, refused = _plan(found, out_dir)
    failures += refused
    total = len(jobs) + len(failures)
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if k != "progress")

    def say(line: str) -> None:
        if not args.quiet:
            tqdm.write(line, file=sys.stdout)

    def report(name: str, cause: str) -> None:
        tqdm.write(f"{name}: FAILED: {cause}", file=sys.stderr)

    for name, cause in failures:
        report(name, cause)
    (print if args.dry_run else say)(f"PSF: {source.description}; {args.method} on {device}")
    written = skipped = 0
    bar = not (args.quiet or args.dry_run)
    for job in tqdm(jobs, desc="files", unit="file", disable=not bar, dynamic_ncols=True):
        path, target = job.path, job.target
        if target.exists() and not args.overwrite:
            skipped += 1
            (print if args.dry_run else say)(f"{path}: skipped, {target} exists (--overwrite replaces it)")
            continue
        try:
            start = time.perf_counter()
            image = _with_spacing(_open(path), args)
            psfs = source.for_image(
                path,
                image.spatial,
                image.spacing,
                image.known,
                axes=image.axes,
                channels=image.channels,
                meta=image.meta,
                compute=not args.dry_run,
            )
            for warning in source.warnings:
                tqdm.write(f"microdecon: warning: {warning}", file=sys.stderr)
            source.warnings.clear()
            plans = _tile_plans(image, psfs, args, params)
            lazy, reading = _reading(image, args)
            dtype = image.lazy.dtype
            if args.dry_run:
                voxel = (
                    f"voxel {_um(image.spacing)} ({image.spacing_from})" if image.known else "voxel unknown"
                )
                print(f"{path} -> {target}")
                print(
                    f"  image: {_shape(image.lazy.shape)} {dtype}, axes {image.axes}, {voxel}, "
                    f"{_human(image.disk_bytes)} on disk"
                )
                for line in psfs.lines:
                    print(f"  PSF: {line}")
                print(f"  method: {args.method} on {device}: {shown}")
                for line in _plan_text(plans, image):
                    print(f"  tiles: {line}")
                print(f"  read: {reading}")
                written += 1
                continue
            restored = _restore(image, psfs, lazy, args, params)
            meta = image.meta
            meta["spacing"], meta["spacing_known"] = _full_spacing(image), image.known
            meta["provenance"] = _provenance(args, params, psfs.provenance, device)
            target.parent.mkdir(parents=True, exist_ok=True)
            if lazy:
                import dask

                with dask.config.set(scheduler="synchronous"):  # one tile at a time: bounded memory
                    io.imwrite(target, restored, meta, dtype=args.dtype)
            else:
                io.imwrite(target, restored, meta, dtype=args.dtype)
            written += 1
            seconds = time.perf_counter() - start
            axes = f" {image.axes}" if image.axes != "ZYX"[-len(image.spatial) :] else ""
            notes = _unique([_tiles_note(plans, image), "read and written tile by tile" if lazy else ""])
            notes += psfs.notes
            say(
                f"{path} -> {target}: {_shape(image.lazy.shape)}{axes} {dtype}, {args.method}, "
                f"{seconds:.2f} s on {device}" + "".join(f"; {n}" for n in _unique(notes))
            )
        except Exception as error:  # one bad file (or a device out of memory) must not stop the batch
            failures.append((str(path), _cause(error, path)))
            report(*failures[-1])
    if args.dry_run:
        print(
            f"dry run: {written} to write, {skipped} skipped, {len(failures)} failed, of {total} file(s); "
            "nothing was computed or written"
        )
    else:
        say(f"{written} written, {skipped} skipped, {len(failures)} failed, of {total} file(s)")
    if failures:
        print(f"{len(failures)} of {total} file(s) failed:", file=sys.stderr)
        for name, cause in failures:
            print(f"  {name}: {cause}", file=sys.stderr)
        return 1
    return 0


def _info(args: argparse.Namespace) -> int:
    params = _method_params(args)
    default = not (args.psf or args.psf_model or args.psf_shape)
    if default:
        args.psf_model = "widefield"  # the grid deconvolve --psf-model widefield would use
    if args.tile_shape and any(n < -1 for n in args.tile_shape):
        raise ValueError("--tile-shape takes sizes in voxels, or 0 or -1 for a whole axis")
    source = _PsfSource(args)
    found, failures = _expand(args.files, recursive=False)
    for name, cause in failures:
        print(f"{name}: error: {cause}", file=sys.stderr)
    first = True
    for path, _, _ in found:
        try:
            image = _open(path)
        except Exception as error:  # unreadable: named on one line, and the others go on
            failures.append((str(path), _cause(error, path)))
            print(f"{path}: error: {failures[-1][1]}", file=sys.stderr)
            continue
        if not first:
            print()
        first = False
        meta = image.meta
        print(f"{path}")
        print(f"  shape: {_shape(image.lazy.shape)}, {image.lazy.dtype}, axes {image.axes}")
        print(f"  voxel size: {_um(image.spacing) if image.known else 'unknown'}")
        names, em = meta.get("channel_names"), meta.get("wavelengths")
        ex = meta.get("excitation_wavelengths")
        if names or em or ex:
            channels = []
            for c in range(image.channels):
                parts = [repr(names[c]) if names and names[c] else f"channel {c}"]
                if em and em[c] is not None:
                    parts.append(f"emission {em[c]:g} um")
                if ex and ex[c] is not None:
                    parts.append(f"excitation {ex[c]:g} um")
                channels.append(" ".join(parts))
            print(f"  channels: {image.channels}: " + ", ".join(channels))
        if meta.get("scale") is not None:
            print(f"  stored as {image.lazy.dtype}: values = stored x {meta['scale']:g} + {meta['offset']:g}")
        print(f"  file size: {_human(image.disk_bytes)} ({image.disk_bytes} bytes)")
        try:
            image = _with_spacing(image, args)
            psfs = source.for_image(
                path,
                image.spatial,
                image.spacing,
                image.known,
                axes=image.axes,
                channels=image.channels,
                meta=meta,
                compute=False,
            )
            source.warnings.clear()
            for line in psfs.lines:
                print("  PSF" + (" (none given: --psf-model widefield)" if default else "") + f": {line}")
            for line in _plan_text(_tile_plans(image, psfs, args, params), image):
                print(f"  tile plan ({args.method}): {line}")
            print(f"  deconvolve reads it {_reading(image, args)[1]}")
        except (ValueError, TypeError) as error:
            print(f"  tile plan: not available: {_cause(error, path)}")
    return 1 if failures else 0


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
        if args.wavelength and len(args.wavelength) > 1:
            raise ValueError("--wavelength takes one value for the psf command")
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


def _num_iter(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got {text!r}") from None


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=sorted(METHODS), default="rl")
    parser.add_argument(
        "--num-iter",
        type=_num_iter,
        default=None,
        help="iterations of an iterative method, or 'auto' (default: its own; rl counts them on half "
        "the voxels against the other half, rl-tv and fista stop when their fit levels off; at most 100)",
    )
    parser.add_argument(
        "--accelerate",
        choices=list(ACCELERATE_FLAGS),
        default=None,
        help="rl / rl-tv: biggs-andrews (the default), conjugate-gradient (fewer iterations, about "
        "the same memory; not with --tv) or none (plain RL)",
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


def _add_psf_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """Where the PSF comes from, and the voxel sizes: shared by ``deconvolve`` and ``info``."""
    psf_source = parser.add_mutually_exclusive_group(required=required)
    psf_source.add_argument(
        "--psf",
        action="append",
        metavar="PSF",
        help="PSF TIFF file (resampled to each image's voxel size if it differs); once for every "
        "channel, or repeated, one file per channel in channel order",
    )
    psf_source.add_argument(
        "--psf-model",
        choices=_MODELS,
        help="compute the PSF from the optics flags below, per voxel size and, for widefield and "
        "confocal, per channel at its wavelengths",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        metavar="D",
        help="voxel size DZ DY DX in micrometres, one per spatial axis: overrides the files' metadata",
    )
    parser.add_argument(
        "--psf-spacing",
        type=float,
        nargs="+",
        metavar="D",
        help="voxel size of the --psf file(s), micrometres, when their metadata has none (or is wrong)",
    )


def _add_plan_flags(parser: argparse.ArgumentParser) -> None:
    """How volumes are cut into tiles: shared by ``deconvolve`` and ``info``."""
    group = parser.add_argument_group("tiles and memory")
    group.add_argument(
        "--tile-shape",
        type=int,
        nargs="+",
        metavar="N",
        help="tile size Z Y X in voxels (Y X for 2-D images), each restored with an overlap and "
        "stitched; 0 or -1 keeps an axis whole (default: whole volumes when they fit the memory, "
        "else the fewest tiles that do)",
    )
    group.add_argument(
        "--memory-limit",
        type=_byte_size,
        metavar="SIZE",
        help="memory one tile may use, e.g. 512MB or 4GB; a file larger than this is read and "
        "written tile by tile (default: 60%% of the device's free memory per tile, and files "
        "larger than 25%% of the available RAM read tile by tile)",
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
    _add_psf_flags(run, required=True)
    run.add_argument("-o", "--output", required=True, help="output folder (made if missing)")
    run.add_argument(
        "--psf-shape", type=int, nargs="+", metavar="N", help="grid of a --psf-model (default: see below)"
    )
    run.add_argument(
        "--recursive",
        action="store_true",
        help="search folders' subfolders too (outputs keep the subfolders); ** in patterns spans folders",
    )
    run.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    run.add_argument(
        "--dtype",
        choices=["float32", "uint16"],
        default="float32",
        help="output type: float32 (default), or uint16 scaled to the full range with the scale "
        "and offset recorded in the file (half the size)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be done to each input (output, shape, axes, voxel size, PSF, method, "
        "tiles, how it is read) and check it, without computing or writing anything",
    )
    _add_plan_flags(run)
    _add_method_flags(run)
    _add_optics_flags(run, "--psf-model", per_channel=True)

    info = commands.add_parser(
        "info",
        help="describe image files and how deconvolve would cut them into tiles",
        description=(
            "For each FILE: shape, dtype, axes, voxel size, channels, file size, and the tile plan\n"
            "deconvolve would use with the same flags (without a PSF: the grid of --psf-model\n"
            "widefield at the file's voxel size). Only metadata are read, so files larger than the\n"
            "memory are fine. Exit code 0 only if every file could be read: 1 if any could not\n"
            "(each named on one line), 2 for bad flags."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument(
        "files", nargs="+", metavar="FILE", help="TIFF files or Zarr stores (folders, patterns)"
    )
    _add_psf_flags(info, required=False)
    info.add_argument(
        "--psf-shape", type=int, nargs="+", metavar="N", help="the PSF's shape, instead of a file or model"
    )
    _add_plan_flags(info)
    _add_method_flags(info)
    _add_optics_flags(info, "--psf-model", per_channel=True)

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

    0 when everything succeeded, 1 when some files of a ``deconvolve`` batch failed or some files
    given to ``info`` could not be read (each named on stderr, with its reason), 2 for bad flags or
    an error that stops the whole run (an unreadable PSF, an output folder that cannot be written).

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
        if args.command == "info":
            return _info(args)
        return _deconvolve(args)
    except (OSError, ValueError, TypeError) as error:
        print(f"microdecon: error: {error}", file=sys.stderr)
        return 2
