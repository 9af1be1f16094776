"""GPU speed: an RL iteration against the cuFFT floor, cuCIM and scikit-image; a file-to-file run.

    python benchmarks/gpu.py [--quick] [--output DIR] [--device gpu|cpu]

For each size (256^3 and 64x1024x1024; 64x256x256 with --quick) it measures, on one machine in
one run:
- the floor: the best time of the four real FFTs one RL iteration needs, on microdecon's padded
  grid for that volume (non-circulant boundary, widefield PSF 31^3);
- microdecon's plain and accelerated RL per iteration, with the data on the device;
- cuCIM's ``richardson_lucy`` per iteration (NumPy in and out through benchmarks/peers.py: the
  copies cancel in the marginal cost; carry its wheel to a GPU machine), and scikit-image's on
  this machine's CPU (at the first size only: it is slow).

"Per iteration" is the marginal cost: the best time of ``many`` iterations less that of ``few``,
over the difference, so that set-up (OTF, normalization, plans) and transfers cancel. Then, end to
end, a 64x1024x1024 uint16 TIFF goes through the ``microdecon deconvolve`` command with 50 RL
iterations (file in, file out, process start and transfers included), then again under
cProfile, whose listing says where the seconds go.

``--device cpu`` runs the same script on the CPU (a check of the script, not a benchmark).
Results: DIR/gpu.md and DIR/gpu.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import optics  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import run as run_py  # noqa: E402
import scaling  # noqa: E402

import microdecon as md  # noqa: E402
from microdecon import _backend  # noqa: E402

SIZES = [(256, 256, 256), (64, 1024, 1024)]
QUICK_SIZES = [(64, 256, 256)]
END_TO_END = (64, 1024, 1024)
CAMERA_OFFSET = 100.0


def problem(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A noisy cell-like volume and a 31^3 widefield PSF (the content does not change the timing;
    large volumes tile a 64x256x256 phantom so that making them takes seconds)."""
    block = tuple(min(n, m) for n, m in zip(shape, (64, 256, 256)))
    truth = md.data.phantom(block, seed=11)
    truth = np.tile(truth, [-(-n // b) for n, b in zip(shape, block)])[tuple(slice(0, n) for n in shape)]
    rng = np.random.default_rng(0)
    image = rng.poisson(truth * 200.0 + run_py.BACKGROUND).astype(np.float32)
    return image, optics.widefield_psf()


def timings(call, backend, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls, each waiting for the device before and after."""
    seconds = []
    for _ in range(repeats):
        backend.synchronize()
        start = time.perf_counter()
        call()
        backend.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds


def per_iteration(run, few: int, many: int, backend, repeats: int = 2) -> float:
    """Marginal seconds per iteration of ``run(num_iter)``: set-up and transfers cancel."""
    run(few)  # warm-up: plans, kernels, the memory pool
    best = {n: min(timings(lambda n=n: run(n), backend, repeats)) for n in (many, few)}
    return (best[many] - best[few]) / (many - few)


def measure_size(shape, device: str, with_skimage: bool) -> dict:
    image, psf = problem(shape)
    backend = _backend.get_backend(device=device)
    xp = backend.xp
    on_device = xp.asarray(image)  # the data stay on the device: only the iterations are timed
    floor, fft_shape = scaling._fft_floor(psf, shape, backend)
    entry = {"shape": list(shape), "fft_shape": fft_shape, "fft_floor_seconds": floor, "cases": {}}
    print(f"{shape}: FFT floor {floor:.4f} s on {fft_shape}", file=sys.stderr, flush=True)
    few, many = (5, 25) if backend.name == "gpu" else (1, 3)

    schemes = (
        ("microdecon-plain", False),
        ("microdecon-accel", True),
        ("microdecon-cg", "conjugate-gradient"),
    )
    for name, accelerate in schemes:

        def rl(n, accelerate=accelerate, data=on_device):
            return md.richardson_lucy(
                data, psf, n, accelerate=accelerate, background=run_py.BACKGROUND, device=device
            )

        seconds = per_iteration(rl, few, many, backend)
        entry["cases"][name] = {"seconds_per_iteration": seconds, "floor_ratio": seconds / floor}
        print(f"{shape}: {name} {seconds:.4f} s/iteration ({seconds / floor:.2f}x floor)", file=sys.stderr)
    entry["auto"] = automatic(on_device, psf, device, backend)
    del on_device

    signal = np.maximum(image - run_py.BACKGROUND, 0).astype(np.float32)  # the peers have no background
    peer_runs = [("cucim", few, many, 2)]
    if with_skimage:
        peer_runs.append(("skimage", 1, 2, 1))
    for name, low, high, repeats in peer_runs:
        adapter = peers.RICHARDSON_LUCY[name]
        try:
            seconds = per_iteration(lambda n, a=adapter: a(signal, psf, n), low, high, backend, repeats)
        except peers.PeerMissing as missing:
            entry["cases"][name] = {"status": "missing", "reason": str(missing)}
            continue
        entry["cases"][name] = {"seconds_per_iteration": seconds}
        print(f"{shape}: {name} {seconds:.4f} s/iteration", file=sys.stderr, flush=True)
    if backend.name == "gpu":
        backend.xp.get_default_memory_pool().free_all_blocks()
    return entry


def automatic(data, psf, device: str, backend) -> dict:
    """``num_iter="auto"`` (accelerated RL): the count it chose, its seconds, and those of the same
    count given as a number, so that the ratio is what counting by hold-out costs."""
    done = []

    def auto():
        done.clear()
        md.richardson_lucy(
            data, psf, background=run_py.BACKGROUND, device=device, callback=lambda i, e: done.append(i)
        )

    auto()  # warm-up
    seconds = min(timings(auto, backend, 2))
    count = len(done)

    def fixed_count():
        md.richardson_lucy(data, psf, count, background=run_py.BACKGROUND, device=device)

    fixed = min(timings(fixed_count, backend, 2))
    shape = "x".join(map(str, data.shape))
    print(f"{shape}: num_iter='auto' chose {count} in {seconds:.3f} s; fixed {fixed:.3f} s", file=sys.stderr)
    return {"iterations": count, "seconds": seconds, "fixed_seconds": fixed}


def end_to_end(shape, device: str, folder: Path, runs: int = 2) -> dict:
    """The command on a uint16 TIFF, 50 RL iterations, timed from process start to written file."""
    image, psf = problem(shape)
    source, psf_path = folder / "stack.tif", folder / "psf.tif"
    meta = {"axes": "ZYX", "spacing": optics.SPACING}
    counts = np.clip(image + (CAMERA_OFFSET - run_py.BACKGROUND), 0, 65535).astype(np.uint16)
    md.io.imwrite(source, counts, meta)
    md.io.imwrite(psf_path, psf, meta)
    command = [sys.executable, "-m", "microdecon", "deconvolve", str(source), "--psf", str(psf_path)]
    command += ["--method", "rl", "--num-iter", "50", "--background", str(CAMERA_OFFSET)]
    command += ["--device", device, "--overwrite", "-q", "-o", str(folder / "out")]
    seconds = []
    profile = folder / "profile.out"
    for index in range(runs):
        # the last run under cProfile, which slows it (4.6 against 3.2 s on the H200): where the
        # seconds go, in proportion
        prefix = ["-m", "cProfile", "-o", str(profile)] if index == runs - 1 else []
        start = time.perf_counter()
        subprocess.run([command[0], *prefix, *command[1:]], check=True, cwd=HERE.parent, env=dict(os.environ))
        seconds.append(time.perf_counter() - start)
        print(f"end to end {shape}: {seconds[-1]:.2f} s", file=sys.stderr, flush=True)
    import pstats

    stats = pstats.Stats(str(profile), stream=sys.stderr)
    stats.sort_stats("cumulative").print_stats("microdecon/", 25)
    stats.sort_stats("tottime").print_stats(15)
    written = md.io.imread(folder / "out" / "stack_decon.tif")[0]
    assert written.shape == shape and np.isfinite(written).all()
    return {"shape": list(shape), "num_iter": 50, "seconds": seconds}


def parts(shape, device: str, repeats: int = 20) -> dict:
    """Milliseconds of each step of an RL iteration on its FFT grid (median of ``repeats``): where
    the time beyond the floor goes."""
    backend = _backend.get_backend(device=device)
    xp = backend.xp
    from microdecon.operators import Convolution

    operator = Convolution(optics.widefield_psf(), shape, boundary="non-circulant", backend=backend)
    fft_shape = tuple(operator.fft_shape)
    plan = backend.fft_plan(fft_shape)
    rng = np.random.default_rng(0)

    def grid(low=0.5):
        return xp.asarray(rng.uniform(low, 1.0, fft_shape).astype(np.float32))

    x, image, estimate, correction, normalization = grid(), grid(), grid(), grid(), grid()
    spectrum = plan.forward(x)
    otf = spectrum.copy()
    step = xp.asarray(_backend.to_bfloat16(rng.uniform(-0.1, 0.1, fft_shape).astype(np.float32)))
    previous = xp.asarray(_backend.to_bfloat16(rng.uniform(-0.1, 0.1, fft_shape).astype(np.float32)))
    out = grid()  # the ratio's blurred estimate, then the update's output
    steps = {
        "4 FFTs": lambda: (plan.inverse(plan.forward(x)), plan.inverse(plan.forward(x))),
        "OTF multiply": lambda: backend.multiply_spectrum(spectrum, otf, False),
        "conjugate OTF multiply": lambda: backend.multiply_spectrum(spectrum, otf, True),
        "ratio": lambda: backend.rl_ratio(image, out, np.float32(10), np.float32(1e-6)),
        "update": lambda: backend.rl_update(estimate, correction, normalization, out),
        "predict": lambda: backend.predict(estimate, step, 0.5, out),
        "accelerated update (with dot products)": lambda: backend.rl_accelerated_update(
            estimate, step, 0.5, correction, normalization, previous, True
        ),
    }
    milliseconds = {}
    for name, call in steps.items():
        call()
        milliseconds[name] = float(np.median(timings(call, backend, repeats))) * 1e3
        print(f"parts {fft_shape}: {name} {milliseconds[name]:.3f} ms", file=sys.stderr, flush=True)
    return {"fft_shape": list(fft_shape), "milliseconds": milliseconds}


def _cell(entry: dict, name: str, with_floor: bool = False) -> str:
    case = entry["cases"].get(name, {})
    if "seconds_per_iteration" not in case:
        return case.get("status", "not run")
    text = f"{case['seconds_per_iteration'] * 1e3:.1f} ms"
    return text + (f" ({case['floor_ratio']:.2f}x floor)" if with_floor else "")


def _speedup(entry: dict, name: str) -> str:
    """How many times faster microdecon's plain RL is than ``name`` per iteration."""
    seconds = entry["cases"].get(name, {}).get("seconds_per_iteration")
    plain = entry["cases"]["microdecon-plain"]["seconds_per_iteration"]
    return f"{seconds / plain:.1f}x" if seconds else "-"


def table(result: dict) -> str:
    lines = [
        f"GPU speed: Richardson-Lucy per iteration (marginal: set-up and transfers cancel), data on "
        f"the device; widefield PSF 31^3, non-circulant boundary; machine: {result['machine']}; "
        f"{result['date']}.",
        "",
        "| size | FFT grid | cuFFT floor (4 FFTs) | microdecon RL | microdecon accelerated RL | "
        "microdecon conjugate-gradient RL | cuCIM RL | scikit-image RL (CPU) | microdecon RL vs cuCIM | "
        "vs scikit-image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in result["sizes"]:
        lines.append(
            f"| {'x'.join(map(str, entry['shape']))} | {'x'.join(map(str, entry['fft_shape']))} | "
            f"{entry['fft_floor_seconds'] * 1e3:.1f} ms | {_cell(entry, 'microdecon-plain', True)} | "
            f"{_cell(entry, 'microdecon-accel', True)} | {_cell(entry, 'microdecon-cg', True)} | "
            f"{_cell(entry, 'cucim')} | "
            f"{_cell(entry, 'skimage')} | {_speedup(entry, 'cucim')} | {_speedup(entry, 'skimage')} |"
        )
    for entry in result["sizes"]:
        auto = entry.get("auto")
        if auto:
            lines += [
                "",
                f'`num_iter="auto"` at {"x".join(map(str, entry["shape"]))} (accelerated RL, data on the '
                f"device): {auto['iterations']} iterations in {auto['seconds']:.2f} s, against "
                f"{auto['fixed_seconds']:.2f} s for the same count given as a number "
                f"({auto['seconds'] / auto['fixed_seconds']:.1f}x: the hold-out run that counts them).",
            ]
    if result.get("parts"):
        split = result["parts"]
        lines += [
            "",
            f"Where an iteration's time goes, on the {'x'.join(map(str, split['fft_shape']))} grid "
            "(median ms): "
            + ", ".join(f"{name} {ms:.3f}" for name, ms in split["milliseconds"].items())
            + ".",
        ]
    e2e = result.get("end_to_end")
    if e2e:
        first, *others = e2e["seconds"]
        profiled = f" ({others[-1]:.1f} s in a second run under cProfile)" if others else ""
        lines += [
            "",
            f"End to end, `microdecon deconvolve` on a {'x'.join(map(str, e2e['shape']))} uint16 TIFF, "
            f"{e2e['num_iter']} RL iterations, file in to file out (process start, imports, reading, "
            f"transfers, writing float32 included): {first:.1f} s{profiled}.",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = report.parser(__doc__, "gpu", "64x256x256 only, no end-to-end run")
    parser.add_argument("--device", default="gpu", help="gpu (default), or cpu to check the script")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    result = {
        "machine": run_py.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": scaling.versions(),
        "device": args.device,
        "sizes": [],
    }
    result["parts"] = parts(sizes[0], args.device)
    for index, shape in enumerate(sizes):
        result["sizes"].append(measure_size(shape, args.device, with_skimage=index == 0))
    if not args.quick:
        with tempfile.TemporaryDirectory() as folder:
            result["end_to_end"] = end_to_end(END_TO_END, args.device, Path(folder))
    report.publish(args.output, "gpu", table(result), json.loads(json.dumps(result, default=float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
