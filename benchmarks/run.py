"""Every benchmark in one run: microdecon beside its peers on speed, memory and quality.

    python benchmarks/run.py [--quick] [--output DIR]

--quick finishes in under two minutes on 2 CPU cores. It writes four tables, each as
Markdown and JSON with the machine, versions and date; each also runs alone:
- results: this script's RL speed/memory/quality table, described below;
- quality (benchmarks/quality.py): every method on one phantom, best PSNR/SSIM and where;
- scaling (benchmarks/scaling.py): time per iteration and peak memory against volume size,
  beside scikit-image, RedLionfish and (on a GPU) cuCIM, with the FFT floor; log-log plots;
- phantoms (benchmarks/phantoms.py): beads, filaments and a cell, model and measured PSFs,
  high and low photon counts; PSNR/SSIM against iteration plots.

The problem: a cell-like phantom (64 x 256 x 256; 32 x 128 x 128 with --quick) blurred by a
widefield PSF (1.2 NA water, 520 nm, voxel 0.2 x 0.1 x 0.1 um, 31 x 31 x 31), Poisson noise at
about 200 photons peak over a background of 10. Every case runs in a fresh process, so its peak
memory is its own: the high-water mark of resident memory during the first call, less what was
resident before (the input is already there and is not counted; FFT plans made during the call
are). Time per iteration is the best wall time of two more calls over their iterations; the FFT
floor is the best time of the four real FFTs one RL iteration needs at the padded size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import optics  # noqa: E402  (benchmarks/*.py, beside this script)
import phantoms  # noqa: E402
import quality  # noqa: E402
import report  # noqa: E402  (benchmarks/report.py)
import scaling  # noqa: E402

import microdecon as md  # noqa: E402
from microdecon import _backend  # noqa: E402
from microdecon.metrics import psnr  # noqa: E402

BACKGROUND = 10.0
LIBRARIES = ("fftw", "pocketfft", "gpu")
TABLES = ("results", "quality", "scaling", "phantoms")
PSF_SHAPE = (31, 31, 31)
SPACING = optics.SPACING


# ----------------------------------------------------------------------------------------------
# the problem
# ----------------------------------------------------------------------------------------------
def make_problem(shape: tuple[int, ...], folder: Path) -> Path:
    rng = np.random.default_rng(0)
    truth = md.data.phantom(shape, seed=11)
    psf = optics.widefield_psf(PSF_SHAPE)
    blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    scale = 200.0 / float(blurred.max())
    image = rng.poisson(blurred * scale + BACKGROUND).astype(np.float32)
    path = folder / "problem.npz"
    np.savez(path, image=image, psf=psf, truth=(truth * scale).astype(np.float32))
    return path


# ----------------------------------------------------------------------------------------------
# one case, in its own process
# ----------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
        return True
    except OSError:
        return False


def _measure(fn):
    """Run fn(); return (result, seconds, extra peak resident bytes)."""
    import gc

    gc.collect()
    _reset_peak()
    before = _status("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, _status("VmHWM") - before


def run_case(case: str, problem: Path, num_iter: int, checkpoints: list[int]) -> dict:
    data = np.load(problem)
    image, psf, truth = data["image"], data["psf"], data["truth"]
    out: dict = {"case": case, "num_iter": num_iter, "input_bytes": image.size * 4}

    if case.startswith("skimage"):
        from skimage.restoration import richardson_lucy

        signal = np.maximum(image - BACKGROUND, 0).astype(np.float32)  # skimage has no background
        restored, seconds, peak = _measure(lambda: richardson_lucy(signal, psf, num_iter, clip=False))
        _, again, _ = _measure(lambda: richardson_lucy(signal, psf, num_iter, clip=False))
        out.update(seconds=min(seconds, again), peak_bytes=peak, psnr={num_iter: psnr(truth, restored)})
        for n in checkpoints:
            if n < num_iter:
                out["psnr"][n] = psnr(truth, richardson_lucy(signal, psf, n, clip=False))
        return out

    library = _library(case)
    on_gpu = library == "gpu"
    if not on_gpu:
        _backend.set_cpu_fft(library)
    device = "gpu" if on_gpu else "cpu"
    backend = _backend.get_backend(device=device)
    accelerate = "conjugate-gradient" if case.startswith("rl-cg-") else "accel" in case
    boundary = "reflect" if "reflect" in case else "non-circulant"

    def deconvolve(callback=None, n=num_iter):
        return md.richardson_lucy(
            image,
            psf,
            n,
            accelerate=accelerate,
            background=BACKGROUND,
            boundary=boundary,
            device=device,
            callback=callback,
        )

    # Memory from the first call, which also makes the FFT plans and their buffers; time from
    # the best of two more, as in a batch job where FFTW has measured its plans once (the
    # machine is shared, so single timings wander by 10-20%).
    if on_gpu:
        # GPU memory: what CuPy's pool had to hold (it keeps its blocks, so this is the peak)
        pool = backend.xp.get_default_memory_pool()
        pool.free_all_blocks()
        _, cold_seconds, _ = _measure(deconvolve)
        peak = pool.total_bytes()
    else:
        _, cold_seconds, peak = _measure(deconvolve)
    seconds = min(_measure(deconvolve)[1] for _ in range(2))  # NumPy out: includes the transfers
    out.update(seconds=seconds, peak_bytes=peak, cold_seconds=cold_seconds)
    # Quality per iteration, in runs whose clock leaves out the PSNR computation; each
    # iteration's time is the smaller of two runs', as the seconds above are the best of two
    # (single runs on a shared machine wander by 10-20%).
    curve, clock = {}, {}

    def timed_run():
        spent = [0.0]
        start = time.perf_counter()

        def callback(iteration, estimate):
            # A GPU runs ahead of Python: wait for this iteration's work, so that the clock counts
            # it here and not in the PSNR's device-to-host copy, whose time is left out.
            backend.synchronize()
            tick = time.perf_counter()
            curve[iteration] = psnr(truth, estimate)
            elapsed = tick - start - spent[0]
            clock[iteration] = min(elapsed, clock.get(iteration, elapsed))
            spent[0] += time.perf_counter() - tick

        deconvolve(callback)

    timed_run()
    timed_run()
    out.update(psnr=curve, clock=clock, clock_waits_for_device=True)

    if case.startswith("rl-plain-"):  # the floor: the four real FFTs an iteration needs
        out["fft_floor_seconds"], out["fft_shape"] = scaling._fft_floor(psf, image.shape, backend)
    return out


def _library(case: str) -> str:
    return next(name for name in LIBRARIES if name in case)


def run_in_subprocess(case: str, problem: Path, num_iter: int, checkpoints: list[int]) -> dict:
    command = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--problem",
        str(problem),
        "--num-iter",
        str(num_iter),
        "--checkpoints",
        ",".join(map(str, checkpoints)),
    ]
    env = dict(os.environ)
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def _first_reaching(curve: dict, level: float) -> int | None:
    for iteration in sorted(curve, key=int):
        if curve[iteration] >= level - 1e-9:
            return int(iteration)
    return None


def summarize(results: dict, shape, num_iter: int, checkpoints: list[int]) -> str:
    cases = results["cases"]
    sk = cases["skimage"]
    sk_per_iter = sk["seconds"] / num_iter
    lines = [
        f"Problem: {shape[0]}x{shape[1]}x{shape[2]} float32, PSF {PSF_SHAPE[0]}^3 widefield, Poisson noise; "
        f"{num_iter} iterations; machine: {results['machine']}.",
        "",
        "| method | s / iteration | speed-up vs skimage | time / FFT floor | peak memory (x input) | "
        + " | ".join(f"PSNR @{n}" for n in checkpoints)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(checkpoints),
    ]
    libraries = LIBRARIES
    floor = {lib: cases.get(f"rl-plain-{lib}", {}).get("fft_floor_seconds") for lib in libraries}
    for name, case in cases.items():
        per_iter = case["seconds"] / num_iter
        library = _library(name) if name != "skimage" else None
        vs_floor = f"{per_iter / floor[library]:.2f}x" if floor.get(library) and name != "skimage" else "-"
        memory = case["peak_bytes"] / case["input_bytes"]
        quality = " | ".join(
            f"{case['psnr'][str(n)] if str(n) in case['psnr'] else case['psnr'].get(n, float('nan')):.2f}"
            for n in checkpoints
        )
        lines.append(
            f"| {name} | {per_iter:.3g} | {sk_per_iter / per_iter:.1f}x | {vs_floor} | "
            f"{memory:.1f} | {quality} |"
        )
    lines.append("")
    schemes = {"accel": "accelerated RL (Biggs–Andrews)", "cg": "conjugate-gradient RL"}
    for lib in libraries:
        plain = cases.get(f"rl-plain-{lib}")
        if not plain:
            continue
        best_iteration = max(plain["psnr"], key=lambda k: plain["psnr"][k])
        for kind, label in schemes.items():
            accel = cases.get(f"rl-{kind}-{lib}")
            if accel:
                lines.append(_sooner(lib, plain, accel, label, best_iteration, num_iter))
    names = {"fftw": "FFTW", "pocketfft": "scipy.fft", "gpu": "cuFFT"}
    measured = [f"{names[lib]} {floor[lib]:.3g} s" for lib in libraries if floor.get(lib)]
    shape = next((case["fft_shape"] for case in cases.values() if "fft_shape" in case), "?")
    lines.append(f"FFT floor (4 real FFTs at {shape}): " + ", ".join(measured) + ".")
    return "\n".join(lines)


def _sooner(lib: str, plain: dict, accel: dict, label: str, best_iteration, num_iter: int) -> str:
    """How much sooner than plain RL an accelerated scheme reaches plain RL's best PSNR."""
    best = plain["psnr"][best_iteration]
    reach = _first_reaching(accel["psnr"], best)
    if reach is None:
        return f"{lib}: {label} did not reach plain RL's best PSNR ({best:.2f} dB)."
    if lib == "gpu" and not (plain.get("clock_waits_for_device") and accel.get("clock_waits_for_device")):
        # runs before the clock waited for the GPU: their clocks hid queued work
        return (
            f"{lib}: plain RL's best PSNR in {num_iter} iterations is {best:.2f} dB at iteration "
            f"{best_iteration}; {label} reaches it at iteration {reach} (the clock of this run did "
            "not wait for the GPU, so no time is given)."
        )
    plain_time = plain["clock"][best_iteration]
    accel_time = accel["clock"][str(reach)] if str(reach) in accel["clock"] else accel["clock"][reach]
    return (
        f"{lib}: plain RL's best PSNR in {num_iter} iterations is {best:.2f} dB at iteration "
        f"{best_iteration} ({plain_time:.3g} s); {label} reaches it at iteration {reach} "
        f"({accel_time:.3g} s): {plain_time / accel_time:.1f}x sooner. Its best PSNR: "
        f"{max(accel['psnr'].values()):.2f} dB."
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = f"{cpu}, {_backend.cpu_count()} cores, Python {platform.python_version()}, NumPy {np.__version__}"
    if _backend.gpu_available():
        cupy = _backend.array_module(_backend.get_backend(device="gpu").xp.zeros(1))
        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        text += f", GPU {name.decode() if isinstance(name, bytes) else name} (CuPy {cupy.__version__})"
    return text


def main(argv=None) -> int:
    parser = report.parser(__doc__, "results", "32x128x128, 20 iterations (under 2 minutes)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--num-iter", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cases", help="comma-separated cases of the results table (default: all here)")
    parser.add_argument("--tables", default=",".join(TABLES), help="the tables to make (default: all four)")
    args = parser.parse_args(argv)

    if args.case:  # child process
        checkpoints = [int(c) for c in args.checkpoints.split(",") if c]
        print(json.dumps(run_case(args.case, Path(args.problem), args.num_iter, checkpoints), default=float))
        return 0

    shape = (32, 128, 128) if args.quick else (64, 256, 256)
    num_iter = 20 if args.quick else 50
    checkpoints = [5, 10, 20] if args.quick else [10, 20, 30, 50]
    cases = ["skimage", "rl-plain-pocketfft", "rl-accel-pocketfft", "rl-cg-pocketfft"]
    if _backend._pyfftw() is not None:
        cases += ["rl-plain-fftw", "rl-accel-fftw", "rl-cg-fftw", "rl-accel-reflect-fftw"]
    if _backend.gpu_available():  # on a GPU machine the same command adds the GPU rows
        cases += ["rl-plain-gpu", "rl-accel-gpu", "rl-cg-gpu"]
    if args.cases:
        kinds = ("plain", "accel", "cg", "accel-reflect")
        known = {"skimage"} | {f"rl-{kind}-{lib}" for kind in kinds for lib in LIBRARIES}
        cases = args.cases.split(",")
        unknown = sorted(set(cases) - known)
        if unknown or "skimage" not in cases:  # the table's ratios are to scikit-image's row
            parser.error(f"--cases takes skimage and any of {sorted(known - {'skimage'})}; got {cases}")
    tables = args.tables.split(",")
    if set(tables) - set(TABLES):
        parser.error(f"--tables takes any of {list(TABLES)}; got {tables}")
    results = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "shape": shape,
        "num_iter": num_iter,
        "versions": {"microdecon": md.__version__},
        "cases": {},
    }
    try:
        import skimage

        results["versions"]["scikit-image"] = skimage.__version__
    except ImportError:  # pragma: no cover
        pass
    output = args.output
    if "results" in tables:
        with tempfile.TemporaryDirectory() as folder:
            problem = make_problem(shape, Path(folder))
            for case in cases:
                print(f"running {case} ...", file=sys.stderr, flush=True)
                result = run_in_subprocess(case, problem, num_iter, checkpoints)
                results["cases"][case] = json.loads(json.dumps(result))  # keys as JSON has them
        summary = summarize(results, shape, num_iter, checkpoints)
        output = report.publish(args.output, "results", summary, results)
    # the other tables, each also runnable alone: every method's quality on one phantom, time and
    # memory against volume size beside the peers, and quality on beads, filaments and cells
    quick = ["--quick"] if args.quick else []
    codes = [0]
    for name, module in (("quality", quality), ("scaling", scaling), ("phantoms", phantoms)):
        if name not in tables:
            continue
        print(f"running the {name} table ...", file=sys.stderr, flush=True)
        codes.append(module.main(["--output", str(output), *quick]))
    print(f"results in {output}: {', '.join(tables)} (.md, .json, .png)", file=sys.stderr)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
