"""How Richardson-Lucy's cost grows with the volume: microdecon and its peers, side by side.

    python benchmarks/scaling.py [--quick] [--output DIR]

For each volume size in a geometric series (16x64x64 up to 64x512x512; two small sizes with
--quick) one problem is made: the cell-like phantom ``md.data.phantom(shape, seed=11)`` blurred by
the widefield PSF of benchmarks/run.py (1.2 NA water, 520 nm, voxel 0.2 x 0.1 x 0.1 um) on a grid
of min(31, n) voxels per axis, made odd, so that the smallest volumes still hold their PSF; then
Poisson noise at about 200 photons peak over a background of 10.

Every case then runs on that problem in a process of its own, so that the memory it reports is
its own: microdecon RL, plain and accelerated, on the CPU (FFTW when pyFFTW is installed, else
scipy.fft), scikit-image RL, RedLionfish RL on the CPU, and, where a GPU and the packages are
present, cuCIM RL and microdecon on the GPU. A peer that is not installed is reported as such.
microdecon is given ``background=10``; the peers, which have no background term, get the image
with 10 subtracted and clipped at zero.

What a case reports (the same method as benchmarks/run.py):

* seconds per iteration: a warm-up call, then the best wall time of two more calls of
  ``num_iter`` iterations (10; 5 with --quick), divided by ``num_iter``. Calls so short that two
  of them take under a second get more tries (at most 10), as scheduler noise dominates them.
  A call's own set-up (its PSF spectra, its buffers) is part of it, spread over its iterations,
  as a user would see it. The full run makes two passes over all sizes, minutes apart, and keeps
  each case's faster one, so that a burst of other work on a shared machine rarely spoils a case.
* the ratio to the FFT floor: the best time of the four real FFTs one RL iteration needs, on
  microdecon's padded grid for that volume, with the same FFT library (cuFFT for GPU cases). It
  is one yardstick for every case of a size, peers included, whose own grids differ: scikit-image
  pads to the full linear convolution, RedLionfish does not pad at all (periodic boundaries).
* peak memory: the high-water mark of resident memory during the warm-up call less what was
  resident before it (the input is not counted; FFT plans made during the call are), shown as a
  multiple of the input's float32 size. GPU cases report what CuPy's memory pool had to hold.
* how busy the rest of the machine was meanwhile (other processes' CPU time over the case's wall
  time, from /proc/stat): cases that shared the cores with a quarter of a core or more of other
  work are flagged with a dagger in the table and hollow markers in the time plot.

Results: DIR/scaling.md (table), DIR/scaling.json (raw numbers, machine, date, versions),
DIR/scaling_time.png and DIR/scaling_memory.png (log-log plots against the number of voxels).
``run(quick)``, ``table(result)``, ``plot(result, folder)`` and ``main(argv)`` let
benchmarks/run.py drive it in-process.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the microdecon of this checkout
sys.path.insert(0, str(HERE))  # run.py and peers.py, beside this file, when imported from elsewhere

import optics  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402  (benchmarks/report.py)
import run as run_py  # noqa: E402  (benchmarks/run.py; its main is guarded, so importing runs nothing)

import microdecon as md  # noqa: E402
from microdecon import _backend  # noqa: E402
from microdecon.metrics import psnr  # noqa: E402

FULL_SIZES = [(16, 64, 64), (32, 128, 128), (64, 128, 128), (64, 256, 256), (64, 512, 512)]
QUICK_SIZES = [(16, 64, 64), (32, 128, 128)]
PSF_EDGE = 31

# Cases in table order, with their labels. A case's name says which code runs in the child.
CASES = {
    "microdecon-plain": "microdecon RL",
    "microdecon-accel": "microdecon accelerated RL",
    "skimage": "scikit-image RL",
    "redlionfish": "RedLionfish RL (CPU)",
    "cucim": "cuCIM RL (GPU)",
    "microdecon-plain-gpu": "microdecon RL (GPU)",
    "microdecon-accel-gpu": "microdecon accelerated RL (GPU)",
}
GPU_CASES = {"cucim", "microdecon-plain-gpu", "microdecon-accel-gpu"}
# Other processes' load (in cores) during a case above which its cell is flagged as contended.
CONTENDED = 0.25


# ----------------------------------------------------------------------------------------------
# the problem
# ----------------------------------------------------------------------------------------------
def psf_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """min(31, n) per axis, made odd, so the PSF has a centre voxel and fits the volume."""
    edges = (min(PSF_EDGE, n) for n in shape)
    return tuple(edge if edge % 2 else edge - 1 for edge in edges)


def make_problem(shape: tuple[int, ...], path: Path) -> Path:
    """Phantom, PSF and noisy image of one size, saved to ``path`` (.npz) for the children."""
    rng = np.random.default_rng(0)
    truth = md.data.phantom(shape, seed=11)
    psf = optics.widefield_psf(psf_shape(shape))
    # scipy.fft here: the problem is the same with either library, and FFTW would first spend
    # up to a minute measuring a plan for a grid that no case uses
    _backend.set_cpu_fft("pocketfft")
    try:
        blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    finally:
        _backend.set_cpu_fft("auto")
    scale = 200.0 / float(blurred.max())
    image = rng.poisson(blurred * scale + run_py.BACKGROUND).astype(np.float32)
    np.savez(path, image=image, psf=psf, truth=(truth * scale).astype(np.float32))
    return path


def cpu_library() -> str:
    """The CPU FFT library microdecon's CPU cases use: FFTW when pyFFTW is installed."""
    return "fftw" if _backend._pyfftw() is not None else "pocketfft"


# ----------------------------------------------------------------------------------------------
# one case, in its own process
# ----------------------------------------------------------------------------------------------
def _timed_calls(call, gpu_backend=None) -> dict:
    """Warm-up call (its peak memory), then the best wall time of two or more calls."""
    if gpu_backend is not None:
        # CuPy's pool keeps its blocks, so after an emptied start its size is the call's peak
        pool = gpu_backend.xp.get_default_memory_pool()
        pool.free_all_blocks()
        result, cold, _ = run_py._measure(call)
        peak = pool.total_bytes()
    else:
        result, cold, peak = run_py._measure(call)
    # Best of two; short calls get more tries (up to 10, within about a second), since on a
    # shared machine one descheduled thread can double a call of a few milliseconds.
    timings: list[float] = []
    while len(timings) < 2 or (sum(timings) < 1.0 and len(timings) < 10):
        timings.append(run_py._measure(call)[1])
    seconds = min(timings)
    return {"result": result, "cold_seconds": cold, "seconds": seconds, "peak_bytes": int(peak)}


def _fft_floor(psf: np.ndarray, shape: tuple[int, ...], backend) -> tuple[float, list[int]]:
    """Best time of the four real FFTs of one RL iteration on microdecon's padded grid."""
    from microdecon.operators import Convolution

    op = Convolution(psf, shape, boundary="non-circulant", backend=backend)
    plan = op.plan
    # transform the plan's own buffer where it has one, so that no copy is timed
    x = plan.real if plan.reuses_buffers else backend.xp.ones(op.fft_shape, np.float32)
    x[...] = 1
    timings: list[float] = []
    while len(timings) < 5 or (sum(timings) < 0.5 and len(timings) < 50):  # small grids: more tries
        backend.synchronize()
        start = time.perf_counter()
        plan.inverse(plan.forward(x))
        plan.inverse(plan.forward(x))
        backend.synchronize()
        timings.append(time.perf_counter() - start)
    return min(timings), [int(n) for n in op.fft_shape]


def run_case(case: str, problem: Path, num_iter: int) -> dict:
    """Time one case on one problem; in the child process."""
    data = np.load(problem)
    image, psf, truth = data["image"], data["psf"], data["truth"]
    out: dict = {"case": case, "num_iter": num_iter, "status": "ok"}

    if not case.startswith("microdecon"):
        adapter = peers.RICHARDSON_LUCY[case]
        signal = np.maximum(image - run_py.BACKGROUND, 0).astype(np.float32)
        on_gpu = case in GPU_CASES and _backend.gpu_available()  # else cuCIM says it is missing
        gpu_backend = _backend.get_backend(device="gpu") if on_gpu else None
        try:
            measured = _timed_calls(lambda: adapter(signal, psf, num_iter), gpu_backend)
        except peers.PeerMissing as missing:
            return {"case": case, "status": "missing", "reason": str(missing)}
    else:
        on_gpu = case.endswith("-gpu")
        device = "gpu" if on_gpu else "cpu"
        if not on_gpu:
            _backend.set_cpu_fft(cpu_library())
        backend = _backend.get_backend(device=device)
        out["fft_library"] = "cufft" if on_gpu else backend.fft_library

        def deconvolve():
            return md.richardson_lucy(
                image,
                psf,
                num_iter,
                accelerate="accel" in case,
                background=run_py.BACKGROUND,
                device=device,
            )

        measured = _timed_calls(deconvolve, backend if on_gpu else None)
        if "plain" in case:  # one floor per size and device, measured beside its plain RL
            out["fft_floor_seconds"], out["fft_shape"] = _fft_floor(psf, image.shape, backend)

    # a check that every case restored the same problem, not a quality benchmark
    out["psnr"] = psnr(truth, np.asarray(measured.pop("result")))
    out.update(measured, seconds_per_iteration=measured["seconds"] / num_iter)
    return out


def _busy_seconds() -> float | None:
    """CPU seconds all processes on this machine have used so far (/proc/stat; Linux only)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_in_subprocess(case: str, problem: Path, num_iter: int) -> dict:
    """Run one case in a fresh interpreter; a crash becomes a "failed" record, not an exception.

    Also records ``other_cores``: how many cores other processes kept busy meanwhile (the
    machine's CPU time less the child's, over the wall time), to tell a clean timing from one
    taken while other work competed for the cores.
    """
    command = [sys.executable, __file__, "--case", case, "--problem", str(problem)]
    command += ["--num-iter", str(num_iter)]
    busy, own, start = _busy_seconds(), _children_seconds(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=False)
    wall, busy_after = time.perf_counter() - start, _busy_seconds()
    if done.returncode != 0:
        print(f"case {case} failed:\n{done.stderr}", file=sys.stderr, flush=True)
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"case": case, "status": "failed", "reason": tail[0]}
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    if busy is not None and busy_after is not None:
        others = (busy_after - busy) - (_children_seconds() - own)
        measured["other_cores"] = round(max(others, 0.0) / wall, 2)
        if "fft_floor_seconds" in measured:  # the floor keeps its own pass's load when merged
            measured["fft_floor_other_cores"] = measured["other_cores"]
    return measured


# ----------------------------------------------------------------------------------------------
# the whole run
# ----------------------------------------------------------------------------------------------
def _why_not(case: str, found: list[str]) -> str | None:
    """Why a case cannot run on this machine, or None when it can."""
    if case in ("redlionfish", "cucim") and case not in found:
        if case == "cucim" and importlib.util.find_spec("cucim") and importlib.util.find_spec("cupy"):
            return "no GPU"
        return "not installed"
    if case.startswith("microdecon") and case.endswith("-gpu") and not _backend.gpu_available():
        return "no GPU"
    return None


def versions() -> dict:
    """Versions of the packages the numbers depend on (those installed)."""
    # key: the distribution names it may be installed under (CuPy and cuCIM name their CUDA)
    names = {
        "microdecon": ("microdecon",),
        "numpy": ("numpy",),
        "scipy": ("scipy",),
        "scikit-image": ("scikit-image",),
        "redlionfish": ("RedLionfish",),
        "pyfftw": ("pyFFTW",),
        "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"),
        "cucim": ("cucim-cu13", "cucim-cu12", "cucim-cu11", "cucim"),
    }
    found = {}
    for key, distributions in names.items():
        for distribution in distributions:
            try:
                found[key] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    found.setdefault("microdecon", md.__version__)  # an in-tree checkout that is not installed
    return found


def _keep_faster(kept: dict | None, new: dict) -> dict:
    """Merge a case's later pass into what earlier passes gave: the faster pass's numbers."""
    if kept is None:
        new["passes"] = [new.get("seconds_per_iteration")]
        return new
    passes = kept["passes"] + [new.get("seconds_per_iteration")]
    if kept["status"] == "ok" and new["status"] == "ok":
        floors = [
            (r["fft_floor_seconds"], r.get("fft_floor_other_cores"))
            for r in (kept, new)
            if "fft_floor_seconds" in r
        ]
        if new["seconds_per_iteration"] < kept["seconds_per_iteration"]:
            kept = new
        if floors:
            kept["fft_floor_seconds"], kept["fft_floor_other_cores"] = min(floors, key=lambda f: f[0])
    elif kept["status"] == "ok":  # a failure in any pass is reported, not hidden
        kept = new
    kept["passes"] = passes
    return kept


def run(quick: bool, cases: list[str] | None = None, passes: int | None = None) -> dict:
    """Every case (or those in ``cases``) at every size; returns the raw numbers (what
    scaling.json holds).

    The full run makes two passes over all sizes and keeps each case's faster pass (the floor:
    the lower of its two): on a shared machine another job can slow a whole case down, and
    microdecon's multi-threaded FFTs suffer more from it than the single-threaded peers. The
    passes are minutes apart, so one burst of other work rarely spoils both. ``passes`` overrides
    the count (a GPU machine lent for minutes can afford one).
    """
    sizes = QUICK_SIZES if quick else FULL_SIZES
    num_iter = 5 if quick else 10
    if passes is None:
        passes = 1 if quick else 2
    chosen = {case: CASES[case] for case in (cases or CASES)}
    found = peers.available()
    result = {
        "machine": run_py.machine(),
        "date": time.strftime("%Y-%m-%d"),
        # a shared machine: other work on its cores shows in the timings, so say how busy it was
        "load_average": round(os.getloadavg()[0], 2),
        "versions": versions(),
        "quick": quick,
        "num_iter": num_iter,
        "passes": passes,
        "cpu_fft_library": cpu_library(),
        "background": run_py.BACKGROUND,
        "cases": chosen,
        "sizes": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        problems = []
        for shape in sizes:
            name = "x".join(map(str, shape))
            print(f"{name}: making the problem ...", file=sys.stderr, flush=True)
            problems.append(make_problem(shape, Path(folder) / f"problem-{name}.npz"))
            voxels = int(np.prod(shape))
            entry = {
                "shape": list(shape),
                "voxels": voxels,
                "input_bytes": voxels * 4,
                "psf_shape": list(psf_shape(shape)),
                "cases": {},
            }
            for case in chosen:
                reason = _why_not(case, found)
                if reason is not None:
                    entry["cases"][case] = {"case": case, "status": "missing", "reason": reason}
            result["sizes"].append(entry)
        for index in range(passes):
            for entry, problem in zip(result["sizes"], problems):
                for case in chosen:
                    if entry["cases"].get(case, {}).get("status") == "missing":
                        continue
                    label = "x".join(map(str, entry["shape"]))
                    print(f"pass {index + 1}/{passes}, {label}: {case} ...", file=sys.stderr, flush=True)
                    measured = run_in_subprocess(case, problem, num_iter)
                    entry["cases"][case] = _keep_faster(entry["cases"].get(case), measured)
    for entry in result["sizes"]:
        for device, case in (("cpu", "microdecon-plain"), ("gpu", "microdecon-plain-gpu")):
            measured = entry["cases"].get(case, {})
            if "fft_floor_seconds" in measured:
                entry.setdefault("fft_floor_seconds", {})[device] = measured["fft_floor_seconds"]
                load = measured.get("fft_floor_other_cores")
                entry.setdefault("fft_floor_other_cores", {})[device] = load
                entry.setdefault("fft_shape", measured["fft_shape"])
    return result


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def _label(result: dict, case: str) -> str:
    label = result["cases"][case]
    if case in ("microdecon-plain", "microdecon-accel"):
        label += " (FFTW)" if result["cpu_fft_library"] == "fftw" else " (scipy.fft)"
    return label


def _floor(entry: dict, case: str) -> float | None:
    return entry.get("fft_floor_seconds", {}).get("gpu" if case in GPU_CASES else "cpu")


def _floor_cell(entry: dict, device: str) -> str:
    floors = entry.get("fft_floor_seconds", {})
    if device not in floors:
        return "-"
    load = entry.get("fft_floor_other_cores", {}).get(device) or 0.0
    return f"{floors[device]:.3g} s" + (" †" if load >= CONTENDED else "")


def _cell(entry: dict, case: str) -> str:
    measured = entry["cases"][case]
    if measured["status"] == "missing":
        # a peer's own PeerMissing message is long; the table needs only the fact
        return "no GPU" if measured.get("reason") == "no GPU" else "not installed"
    if measured["status"] == "failed":
        return "failed"
    per_iteration = measured["seconds_per_iteration"]
    floor = _floor(entry, case)
    ratio = f"{per_iteration / floor:.1f}x" if floor else "-"
    memory = measured["peak_bytes"] / entry["input_bytes"]
    busy = " †" if measured.get("other_cores", 0.0) >= CONTENDED else ""
    return f"{per_iteration:.3g} s ({ratio}, {memory:.1f}x){busy}"


def table(result: dict) -> str:
    """The Markdown table: one row per size, one column per case."""
    cases = list(result["cases"])
    gpu = any("gpu" in entry.get("fft_floor_seconds", {}) for entry in result["sizes"])
    header = ["size", "voxels", "FFT grid", "FFT floor (CPU)"] + (["FFT floor (GPU)"] if gpu else [])
    header += [_label(result, case) for case in cases]
    lines = [
        f"Richardson-Lucy time and memory against volume size: cell-like phantom, widefield PSF "
        f"(min(31, n) voxels per axis, odd), Poisson noise at ~200 photons peak over a background "
        f"of {result['background']:g}; {result['num_iter']} iterations per call"
        + (f"; the faster of {result['passes']} passes per case." if result["passes"] > 1 else "."),
        "",
        "Each cell: seconds per iteration (best of 2 calls after a warm-up; of up to 10 for short "
        "calls), then in brackets that time over the FFT floor (the four real FFTs of one RL "
        "iteration on microdecon's padded grid) and the peak memory of the warm-up call as a "
        "multiple of the input's float32 size (GPU cases: CuPy pool memory on the GPU).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for entry in result["sizes"]:
        row = [
            "x".join(map(str, entry["shape"])),
            f"{entry['voxels']:,}",
            "x".join(map(str, entry["fft_shape"])) if "fft_shape" in entry else "-",
            _floor_cell(entry, "cpu"),
        ]
        if gpu:
            row.append(_floor_cell(entry, "gpu"))
        row += [_cell(entry, case) for case in cases]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        f"† other processes kept {CONTENDED:g} cores or more busy while this case (or floor) ran "
        "(other_cores in scaling.json): its time is not that of an idle machine, and the "
        "multi-threaded microdecon cases suffer more from it than the single-threaded peers.",
        "",
        f"microdecon gets background={result['background']:g}; the peers get the image less the "
        "background, clipped at 0. scikit-image pads each convolution to the full linear size; "
        "RedLionfish does not pad (periodic boundaries); microdecon pads to the FFT grid "
        "(non-circulant boundaries).",
        "",
        "Machine: "
        + result["machine"]
        + f"; load average {result['load_average']:.2f} at the start; date {result['date']}; "
        + ", ".join(f"{name} {version}" for name, version in result["versions"].items())
        + ".",
    ]
    return "\n".join(lines)


def plot(result: dict, folder: Path) -> list[Path]:
    """scaling_time.png and scaling_memory.png in ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a benchmark machine
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = result["sizes"]
    voxels = [entry["voxels"] for entry in sizes]
    ticks = [f"{'x'.join(map(str, entry['shape']))}\n{entry['voxels'] / 1e6:.2g} M" for entry in sizes]

    def measured(case, key, scale=1.0):
        points = [
            (entry["voxels"], entry["cases"][case][key] * scale)
            for entry in sizes
            if entry["cases"][case]["status"] == "ok"
        ]
        return tuple(zip(*points)) if points else None

    def finish(axes, ylabel, title, path):
        axes.set_xscale("log")
        axes.set_yscale("log")
        # one tick per measured size, named by its shape: easier to read than bare powers of ten
        axes.set_xticks(voxels, ticks, fontsize=8)  # 32x128x128 and 64x128x128 sit close
        axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axes.set_xlabel("volume size (z x y x x; millions of voxels)")
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        axes.figure.tight_layout()
        axes.figure.savefig(path, dpi=120)
        plt.close(axes.figure)
        return path

    markers = "osD^v<>"
    subtitle = f"{result['num_iter']} iterations per call; {result['machine']}"

    figure, axes = plt.subplots(figsize=(9, 5.5))
    contended = False
    for marker, case in zip(markers, result["cases"]):
        points = measured(case, "seconds_per_iteration")
        if points:
            (line,) = axes.plot(*points, marker=marker, label=_label(result, case))
            # hollow markers: other processes competed for the cores during that case
            busy = [
                (e["voxels"], e["cases"][case]["seconds_per_iteration"])
                for e in sizes
                if e["cases"][case]["status"] == "ok" and e["cases"][case].get("other_cores", 0) >= CONTENDED
            ]
            if busy:
                axes.plot(*zip(*busy), marker, color=line.get_color(), markerfacecolor="white")
                contended = True
    for device, style in (("cpu", "k--"), ("gpu", "k:")):
        points = [
            (e["voxels"], e["fft_floor_seconds"][device])
            for e in sizes
            if device in e.get("fft_floor_seconds", {})
        ]
        if points:
            library = {"cpu": result["cpu_fft_library"], "gpu": "cuFFT"}[device]
            library = {"fftw": "FFTW", "pocketfft": "scipy.fft"}.get(library, library)
            axes.plot(*zip(*points), style, label=f"FFT floor ({library}: 4 real FFTs)")
    if contended:
        axes.plot(
            [], [], "o", color="grey", markerfacecolor="white", label="hollow: cores shared with other work"
        )
    time_png = finish(
        axes,
        "seconds per iteration",
        "Richardson-Lucy: time per iteration vs volume size\n" + subtitle,
        folder / "scaling_time.png",
    )

    figure, axes = plt.subplots(figsize=(9, 5.5))
    for marker, case in zip(markers, result["cases"]):
        points = measured(case, "peak_bytes", 1e-6)
        if points:
            suffix = " (GPU pool)" if case in GPU_CASES else ""
            axes.plot(*points, marker=marker, label=_label(result, case) + suffix)
    axes.plot(voxels, [entry["input_bytes"] / 1e6 for entry in sizes], "k--", label="input (float32)")
    memory_png = finish(
        axes,
        "peak memory above the input (MB)",
        "Richardson-Lucy: peak memory vs volume size\n" + subtitle,
        folder / "scaling_memory.png",
    )
    return [time_png, memory_png]


def main(argv=None) -> int:
    """Command line; 0 when every case that could run did, 1 when one failed."""
    parser = report.parser(__doc__, "scaling", "two small sizes, 5 iterations (~30 s)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--problem", help=argparse.SUPPRESS)
    parser.add_argument("--num-iter", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cases", help="comma-separated columns to run (default: all)")
    parser.add_argument("--passes", type=int, default=None, help="passes over the sizes (2; --quick 1)")
    args = parser.parse_args(argv)

    if args.case:  # child process: one case, its numbers as the last line of stdout
        print(json.dumps(run_case(args.case, Path(args.problem), args.num_iter), default=float))
        return 0

    cases = args.cases.split(",") if args.cases else list(CASES)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    result = run(args.quick, cases, args.passes)
    report.publish(args.output, "scaling", table(result), result, plot)
    failed = [
        f"{case} at {'x'.join(map(str, entry['shape']))}"
        for entry in result["sizes"]
        for case, measured in entry["cases"].items()
        if measured["status"] == "failed"
    ]
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
