"""Restoration quality on phantoms whose ground truth is known: microdecon's methods and the peers.

    python benchmarks/phantoms.py [--quick] [--output DIR]

What is measured. Three synthetic objects from ``md.data.phantom`` -- isolated point beads, thin
curved filaments, and the default cell-like mix (cells with membranes and nuclei, filaments,
beads) -- are blurred by a PSF, scaled so that the blurred object peaks at a chosen photon count,
put on a background of 10 counts, drawn from a Poisson distribution and given Gaussian read noise
(sigma 2 counts). Two photon levels: about 1000 photons at the peak (well exposed) and 40 (dim,
where noise decides). Two PSFs: the scalar widefield model (1.2 NA water, 520 nm, voxel
0.2 x 0.1 x 0.1 um, as in quality.py) and a real measured lattice light-sheet bead
(shared/data/psf_llsm_bead.tif, voxel 0.1 x 0.101 x 0.101 um), made into a PSF by
``md.psf.prepare`` (camera offset from the border, noise cut, centred, cropped, unit sum). The
full run restores every phantom through the widefield PSF at both levels, and the cell phantom
through the measured PSF at both levels (8 cases, 32 x 128 x 128); --quick runs 3 cases at
16 x 64 x 64. Every random draw has a fixed seed, so the numbers repeat (the times do not: the
machine is shared).

How. Each restoration is scored against the truth scaled like the image (the same factor as the
blur), with ``microdecon.metrics.psnr`` (range of the truth) and ``ssim``. microdecon's iterative
methods run past their default iteration count with a callback that scores every iteration (PSNR
each time, SSIM every few and at the best PSNR and the default count), so the best PSNR, where it
is reached and the PSNR at the default setting all come from one run; the wall time is that of a
separate call with the default setting and no callback. One-pass filters: microdecon's Wiener is
swept over its balance for the best, and its automatic balance is the default; unsupervised
Wiener has no weight to sweep. Peers (benchmarks/peers.py) get the background-subtracted image,
as none has a background term: scikit-image and RedLionfish Richardson-Lucy have no callback, so
they are scored at a few iteration counts (each a fresh call); scikit-image's Wiener has no
automatic balance, so only its best over a grid is shown (an oracle choice it would not have in
practice); scikit-image's unsupervised Wiener is 2-D only and is reported as failing on 3-D. A
peer that is missing or raises becomes a row saying so.

Results go to DIR/phantoms.md, DIR/phantoms.json (all numbers and curves) and the plots
DIR/phantoms_psnr.png and DIR/phantoms_ssim.png (quality against iteration, one panel per case).
"""

from __future__ import annotations

import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import optics  # noqa: E402  (benchmarks/optics.py, beside this script)
import peers  # noqa: E402
import report  # noqa: E402  (benchmarks/report.py)

import microdecon as md  # noqa: E402
from microdecon.metrics import psnr, ssim  # noqa: E402

BACKGROUND = 10.0
READ_NOISE = 2.0  # Gaussian read noise, counts (sCMOS-like)
COUNTS = {"high": 1000.0, "low": 40.0}  # photons at the blurred object's peak
WIDEFIELD_SPACING = optics.SPACING
LLSM_SPACING = (0.1, 0.101, 0.101)  # from the bead file's bounding box (shared/data/README.md)
PHANTOM_SEEDS = {"beads": 21, "filaments": 22, "cell": 11}
WIENER_GRID = np.logspace(-5, 0, 11)  # microdecon Wiener: noise-to-signal ratio, OTF peak 1
SKIMAGE_WIENER_GRID = np.logspace(-4, 1, 11)  # its Laplacian regularizer peaks at 144 in 3-D


# ----------------------------------------------------------------------------------------------
# the problems
# ----------------------------------------------------------------------------------------------
def make_phantom(kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """The ground truth of one phantom kind; object counts scale with the volume."""
    scale = float(np.prod(shape)) / (32 * 128 * 128)
    seed = PHANTOM_SEEDS[kind]
    if kind == "beads":
        return md.data.phantom(shape, seed=seed, cells=0, filaments=0, beads=max(20, round(300 * scale)))
    if kind == "filaments":
        return md.data.phantom(shape, seed=seed, cells=0, beads=0, filaments=max(4, round(20 * scale)))
    return md.data.phantom(shape, seed=seed)  # the default mix of cells, filaments and beads


def _shared_data() -> Path | None:
    # the shared folder sits beside the checkout here, and inside it on the device machines
    for folder in (HERE.parent / "shared" / "data", HERE.parent.parent / "shared" / "data"):
        if (folder / "psf_llsm_bead.tif").exists():
            return folder
    return None


def make_psf(kind: str, shape: tuple[int, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    """The PSF (cropped to fit ``shape``, odd on every axis) and the voxel size it implies."""
    # widefield: quality.py's 31^3 box; the measured bead's lateral tails reach further (a
    # 31 x 63 x 63 crop holds 95% of its light); either way no larger than the volume
    limits = (31, 31, 31) if kind == "widefield" else (31, 63, 63)
    box = tuple(min(n if n % 2 else n - 1, limit) for n, limit in zip(shape, limits))
    if kind == "widefield":
        psf = optics.widefield_psf(box, WIDEFIELD_SPACING)
        return psf, WIDEFIELD_SPACING
    folder = _shared_data()
    if folder is None:
        raise FileNotFoundError("shared/data/psf_llsm_bead.tif was not found")
    bead, _ = md.io.imread(folder / "psf_llsm_bead.tif")
    # prepare: offset = median of the border (~100 counts), noise outside the bead cut to zero,
    # centre of mass moved to n // 2, cropped, unit sum
    return md.psf.prepare(bead, background="auto", center="mass", shape=box), LLSM_SPACING


def make_image(truth: np.ndarray, psf: np.ndarray, peak: float, seed: int):
    """Blur, scale to ``peak`` photons, add the background, Poisson and read noise.

    Returns the image and the truth scaled by the same factor (what a perfect restoration of the
    background-free signal would be).
    """
    rng = np.random.default_rng(seed)
    blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    scale = peak / float(blurred.max())
    counts = rng.poisson(blurred * scale + BACKGROUND).astype(np.float64)
    image = counts + rng.normal(0.0, READ_NOISE, truth.shape)
    return image.astype(np.float32), (truth * scale).astype(np.float32)


def cases(quick: bool) -> list[dict]:
    """The case matrix: every phantom through the model PSF, the cell through the measured one."""
    if quick:
        chosen = [("beads", "widefield", "high"), ("cell", "widefield", "low"), ("cell", "llsm", "high")]
    else:
        chosen = [(kind, "widefield", level) for kind in PHANTOM_SEEDS for level in COUNTS]
        chosen += [("cell", "llsm", level) for level in COUNTS]
    return [{"phantom": p, "psf": q, "counts": c, "name": f"{p} / {q} / {c}"} for p, q, c in chosen]


# ----------------------------------------------------------------------------------------------
# scoring one method
# ----------------------------------------------------------------------------------------------
def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def follow(fn, truth, num_iter: int, default_iter: int | str, ssim_every: int) -> dict:
    """Score an iterative microdecon method at every iteration through its callback.

    PSNR every iteration; SSIM every ``ssim_every`` iterations (it costs a few hundred times
    more), at the default count and at the best PSNR. The time is a separate default call;
    with ``default_iter="auto"`` that call also gives the default's score and its count.
    """
    if default_iter == "auto":
        done = []
        out, seconds = _timed(lambda: fn(num_iter="auto", callback=lambda i, e: done.append(i)))
        row = follow(fn, truth, num_iter, 0, ssim_every)
        row.update(
            default_psnr=psnr(truth, out),
            default_ssim=ssim(truth, out),
            setting=f"auto ({len(done)} iter)",
            seconds=seconds,
        )
        # it may stop past the followed range, and do better than all of it
        if row["default_psnr"] > row["best_psnr"]:
            row.update(best_psnr=row["default_psnr"], psnr_at="default")
        if row["default_ssim"] > row["best_ssim"]:
            row.update(best_ssim=row["default_ssim"], ssim_at="default")
        return row
    curve, ssims, best = {}, {}, {"psnr": -np.inf}

    def callback(iteration, estimate):
        value = psnr(truth, estimate)
        curve[iteration] = value
        if iteration % ssim_every == 0 or iteration in (1, default_iter):  # default 0: none
            ssims[iteration] = ssim(truth, estimate)
        if value > best["psnr"]:
            # a copy: the solver may reuse the buffer it hands over
            best.update(psnr=value, iteration=iteration, estimate=np.array(estimate))

    fn(num_iter=num_iter, callback=callback)
    if best["iteration"] not in ssims:
        ssims[best["iteration"]] = ssim(truth, best["estimate"])
    ssim_at = max(ssims, key=ssims.get)
    _, seconds = _timed(lambda: fn(num_iter=default_iter)) if default_iter else (None, None)
    return {
        "kind": "iterative",
        "best_psnr": best["psnr"],
        "psnr_at": f"iter {best['iteration']}" + (" (last)" if best["iteration"] == num_iter else ""),
        "best_ssim": ssims[ssim_at],
        "ssim_at": f"iter {ssim_at}",
        "default_psnr": curve.get(default_iter),
        "default_ssim": ssims.get(default_iter),
        "setting": f"{default_iter} iter",
        "seconds": seconds,
        "curve": curve,
        "ssim_curve": dict(sorted(ssims.items())),
    }


def checkpoints(fn, truth, counts, default_iter: int) -> dict:
    """Score a peer without a callback: a fresh call per iteration count, each timed."""
    curve, ssims, times = {}, {}, {}
    for n in counts:
        out, times[n] = _timed(lambda n=n: fn(n))
        curve[n], ssims[n] = psnr(truth, out), ssim(truth, out)
    best_at = max(curve, key=curve.get)
    ssim_at = max(ssims, key=ssims.get)
    listed = ", ".join(map(str, counts))
    return {
        "kind": "checkpoints",
        "best_psnr": curve[best_at],
        "psnr_at": f"iter {best_at} (of {listed})",
        "best_ssim": ssims[ssim_at],
        "ssim_at": f"iter {ssim_at}",
        "default_psnr": curve[default_iter],
        "default_ssim": ssims[default_iter],
        "setting": f"{default_iter} iter",
        "seconds": times[default_iter],
        "curve": curve,
        "ssim_curve": ssims,
    }


def swept(fn, truth, grid, default=None) -> dict:
    """Sweep a one-pass filter's weight; the default is its automatic choice, if it has one."""
    sweep = {float(value): fn(value) for value in grid}
    scores = {value: psnr(truth, out) for value, out in sweep.items()}
    best_value = max(scores, key=scores.get)
    best_ssim = ssim(truth, sweep[best_value])
    row = {
        "kind": "one-pass",
        "best_psnr": scores[best_value],
        "psnr_at": f"balance {best_value:.2g}",
        "best_ssim": best_ssim,
        "ssim_at": f"balance {best_value:.2g}",
        "sweep": scores,
    }
    if default is None:  # no automatic choice: the table shows only the oracle best
        _, seconds = _timed(lambda: fn(best_value))
        row.update(default_psnr=None, default_ssim=None, setting="none (no auto balance)", seconds=seconds)
        return row
    out, seconds = _timed(lambda: fn(default))
    row.update(default_psnr=psnr(truth, out), default_ssim=ssim(truth, out), setting=f"balance {default}")
    row["seconds"] = seconds
    # the automatic choice may fall between grid points and beat them all
    if row["default_psnr"] > row["best_psnr"]:
        row.update(best_psnr=row["default_psnr"], psnr_at="default")
    if row["default_ssim"] > best_ssim:
        row.update(best_ssim=row["default_ssim"], ssim_at="default")
    return row


def single(fn, truth, setting: str) -> dict:
    """A method with nothing to sweep or follow: its default call, scored and timed."""
    out, seconds = _timed(fn)
    value, structure = psnr(truth, out), ssim(truth, out)
    return {
        "kind": "one-pass",
        "best_psnr": value,
        "psnr_at": "default",
        "best_ssim": structure,
        "ssim_at": "default",
        "default_psnr": value,
        "default_ssim": structure,
        "setting": setting,
        "seconds": seconds,
    }


def guarded(name: str, origin: str, measure) -> dict:
    """Run one measurement; a missing or failing method becomes a row that says so."""
    print(f"  {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        row = measure()
    except peers.PeerMissing as missing:
        row = {"kind": "missing", "error": str(missing)}  # not installed, or cannot run this case
    except Exception as error:  # a peer's failure is a result to report, not a crash
        first = str(error).splitlines()[0] if str(error) else ""
        row = {"kind": "failed", "error": f"{type(error).__name__}: {first}"[:200]}
    # the whole measurement (all sweeps and checkpoints), to see where a run's time goes
    return {"method": name, "origin": origin, **row, "measure_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------
# one case, every method
# ----------------------------------------------------------------------------------------------
def run_case(case: dict, shape: tuple[int, ...], quick: bool) -> dict:
    truth = make_phantom(case["phantom"], shape)
    psf, spacing = make_psf(case["psf"], shape)
    seed = zlib.crc32(case["name"].encode())  # fixed per case, independent of the case order
    image, truth = make_image(truth, psf, COUNTS[case["counts"]], seed)
    signal = np.maximum(image - BACKGROUND, 0)  # for the peers, which have no background term
    common = {"background": BACKGROUND, "device": "cpu"}

    def method(name, **fixed):
        return lambda **params: md.deconvolve(image, psf, name, **common, **fixed, **params)

    # past the default count, to see whether the default stops short of the peak or beyond it;
    # SSIM sampled more sparsely on the long runs
    rl_n, plain_n = (40, 60) if quick else (100, 100)
    rows = [
        guarded("rl (accelerated)", "microdecon", lambda: follow(method("rl"), truth, rl_n, "auto", 5)),
        guarded(
            "rl (conjugate gradient)",
            "microdecon",
            lambda: follow(method("rl", accelerate="conjugate-gradient"), truth, rl_n, "auto", 5),
        ),
        guarded(
            "rl (plain)",
            "microdecon",
            lambda: follow(method("rl", accelerate=False), truth, plain_n, "auto", 10),
        ),
        guarded("rl-tv", "microdecon", lambda: follow(method("rl-tv"), truth, rl_n, "auto", 5)),
        guarded("fista", "microdecon", lambda: follow(method("fista"), truth, 100, "auto", 10)),
        guarded(
            "wiener",
            "microdecon",
            lambda: swept(lambda b: method("wiener")(balance=b), truth, WIENER_GRID, "auto"),
        ),
        guarded(
            "unsupervised-wiener",
            "microdecon",
            lambda: single(lambda: method("unsupervised-wiener")(rng=0), truth, "default (seeded)"),
        ),
    ]
    peer_counts = (5, 10, 20, 50)
    rows += [
        guarded(
            "skimage richardson_lucy",
            "peer",
            lambda: checkpoints(
                lambda n: peers.skimage_richardson_lucy(signal, psf, n), truth, peer_counts, 50
            ),
        ),
        guarded(
            "redlionfish rl (cpu)",
            "peer",
            lambda: checkpoints(
                lambda n: peers.redlionfish_richardson_lucy(signal, psf, n), truth, peer_counts, 10
            ),
        ),
        guarded(
            "skimage wiener",
            "peer",
            lambda: swept(lambda b: peers.skimage_wiener(signal, psf, b), truth, SKIMAGE_WIENER_GRID),
        ),
        # 2-D only in skimage 0.26 (see the module docstring); tried so that a fixed release shows
        guarded(
            "skimage unsupervised_wiener",
            "peer",
            lambda: single(lambda: peers.skimage_unsupervised_wiener(signal, psf), truth, "default (seeded)"),
        ),
    ]
    return {
        **case,
        "shape": list(shape),
        "spacing": list(spacing),
        "psf_shape": list(psf.shape),
        "peak_photons": COUNTS[case["counts"]],
        "data_psnr": psnr(truth, signal),
        "data_ssim": ssim(truth, signal),
        "rows": rows,
    }


def _machine() -> str:
    # imported here, not at the top: run.py may import this module in turn
    from run import machine

    return machine()


def run(quick: bool) -> dict:
    """Every case of the matrix; returns the numbers table() and plot() need."""
    shape = (16, 64, 64) if quick else (32, 128, 128)
    versions = {"microdecon": md.__version__}
    for module, label in (("skimage", "scikit-image"), ("RedLionfishDeconv", "redlionfish")):
        try:
            versions[label] = __import__(module).__version__
        except (ImportError, AttributeError):
            versions[label] = "not installed" if label == "scikit-image" else "installed"
    if versions["redlionfish"] == "installed":
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions["redlionfish"] = version("redlionfish")
        except PackageNotFoundError:
            pass
    result = {
        "machine": _machine(),
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions,
        "quick": quick,
        "shape": list(shape),
        "background": BACKGROUND,
        "read_noise": READ_NOISE,
        "cases": [],
    }
    start = time.perf_counter()
    for case in cases(quick):
        print(f"case {case['name']} ...", file=sys.stderr, flush=True)
        if case["psf"] == "llsm" and _shared_data() is None:
            result["cases"].append({**case, "skipped": "shared/data/psf_llsm_bead.tif not found"})
            continue
        result["cases"].append(run_case(case, shape, quick))
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: dict) -> str:
    """Markdown: a summary across cases, then one table per case."""
    shape = "x".join(map(str, result["shape"]))
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [
        f"# Restoration quality on phantoms ({shape}{', quick' if result['quick'] else ''})",
        "",
        f"Machine: {result['machine']}; {result['date']}; {versions}.",
        "",
        f"Noise: Poisson at the stated photon count at the blurred object's peak, background "
        f"{result['background']:g} counts, Gaussian read noise sigma {result['read_noise']:g}. "
        "Truth scaled like the image. PSNR in dB over the truth's range. microdecon runs with "
        "background=10; the peers get max(image - 10, 0). 'default' is each method's default "
        "setting (Wiener: automatic balance); 'best' is the best over its iterations or balance "
        "grid, chosen with the truth.",
        "",
        "## Summary: PSNR at the default setting (best in brackets)",
        "",
    ]
    done = [case for case in result["cases"] if "rows" in case]
    header = "| method | " + " | ".join(case["name"] for case in done) + " |"
    lines += [header, "|---|" + "---|" * len(done)]
    data_row = "| (data, no restoration) | " + " | ".join(_num(c["data_psnr"], 2) for c in done) + " |"
    lines.append(data_row)
    names = [row["method"] for row in done[0]["rows"]] if done else []
    for name in names:
        cells = []
        for case in done:
            row = next(r for r in case["rows"] if r["method"] == name)
            if "error" in row:
                cells.append("fails" if row["kind"] == "failed" else "n/a")
            else:
                cells.append(f"{_num(row['default_psnr'], 2)} ({row['best_psnr']:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for case in result["cases"]:
        lines += ["", f"## {case['name']}", ""]
        if "skipped" in case:
            lines.append(f"Skipped: {case['skipped']}.")
            continue
        psf_shape = "x".join(map(str, case["psf_shape"]))
        spacing = " x ".join(f"{s:g}" for s in case["spacing"])
        lines += [
            f"{case['phantom']} phantom, {case['psf']} PSF {psf_shape} (voxel {spacing} um), "
            f"~{case['peak_photons']:g} photons peak; the data: PSNR {case['data_psnr']:.2f} dB, "
            f"SSIM {case['data_ssim']:.3f}.",
            "",
            "| method | best PSNR | at | best SSIM | at | PSNR at default | SSIM at default | "
            "default setting | time of default call (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in case["rows"]:
            if "error" in row:
                lines.append(f"| {row['method']} | {row['error']} |  |  |  |  |  |  |  |")
                continue
            lines.append(
                f"| {row['method']} | {row['best_psnr']:.2f} | {row['psnr_at']} | {row['best_ssim']:.3f} | "
                f"{row['ssim_at']} | {_num(row['default_psnr'], 2)} | {_num(row['default_ssim'], 3)} | "
                f"{row['setting']} | {row['seconds']:.2f} |"
            )
    lines += [
        "",
        "Notes: scikit-image's wiener has no automatic balance, so its row is the best of a grid "
        f"({SKIMAGE_WIENER_GRID[0]:g} to {SKIMAGE_WIENER_GRID[-1]:g}, chosen with the truth) and "
        "its output is not clipped at zero. scikit-image's unsupervised_wiener is written for 2-D "
        "images (its Fourier transforms and quadratic norms act on the last two axes): on a 3-D "
        "volume its noise precision becomes one value per plane and it stops with a broadcast "
        "error, so it is n/a here. RedLionfish's CPU RL is "
        "circulant at the image size (no padding), hence far cheaper per iteration. Peer times "
        "come from the checkpoint calls; microdecon's from a separate call with the default "
        "setting. The machine is shared, so times vary by 10-30%.",
    ]
    return "\n".join(lines)


STYLE = {
    # one colour per method in every panel; peers dashed or with markers
    "rl (accelerated)": ("tab:blue", "-"),
    "rl (conjugate gradient)": ("navy", "-"),
    "rl (plain)": ("tab:cyan", "-"),
    "rl-tv": ("tab:green", "-"),
    "fista": ("tab:purple", "-"),
    "wiener": ("tab:orange", "--"),
    "unsupervised-wiener": ("tab:brown", "--"),
    "skimage richardson_lucy": ("tab:red", "o"),
    "redlionfish rl (cpu)": ("tab:pink", "s"),
    "skimage wiener": ("tab:olive", ":"),
    "skimage unsupervised_wiener": ("tab:gray", ":"),
}


def _points(curve: dict) -> tuple[list[int], list[float]]:
    # JSON turns the iteration keys into strings; accept both
    pairs = sorted((int(k), float(v)) for k, v in curve.items())
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(result: dict, folder: Path) -> list[Path]:
    """PSNR and SSIM against iteration, one panel per case; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [case for case in result["cases"] if "rows" in case]
    if not done:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    columns = min(4, len(done))
    rows = -(-len(done) // columns)
    paths = []
    for metric, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM")):
        figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.7 * rows + 1.2), squeeze=False)
        handles = {}
        for ax, case in zip(axes.flat, done):
            longest, plotted = 1, [case[f"data_{metric}"]]
            for row in case["rows"]:
                if "error" in row:
                    continue
                colour, style = STYLE.get(row["method"], ("black", "-"))
                curve = row.get("curve" if metric == "psnr" else "ssim_curve")
                if curve:
                    x, y = _points(curve)
                    longest = max(longest, x[-1])
                    plotted += y
                    if row["kind"] == "checkpoints":
                        (line,) = ax.plot(
                            x, y, style, color=colour, markersize=5, linewidth=0.8, linestyle=":"
                        )
                    else:
                        (line,) = ax.plot(x, y, style, color=colour, linewidth=1.5)
                else:  # one pass: a horizontal line at its default (or oracle best) setting
                    value = row[f"default_{metric}"]
                    value = row[f"best_{metric}"] if value is None else value
                    plotted.append(value)
                    line = ax.axhline(value, color=colour, linestyle=style, linewidth=1.3)
                handles.setdefault(row["method"], line)
            data = case[f"data_{metric}"]
            handles.setdefault(
                "data (no restoration)", ax.axhline(data, color="black", linewidth=0.8, alpha=0.5)
            )
            ax.set_xscale("log")
            ax.set_xlim(1, longest * 1.1)
            ax.set_title(case["name"], fontsize=10)
            ax.set_xlabel("iteration")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
            # a method that diverges would squash the rest into a sliver: show down to a fixed
            # depth below the data (8 dB, 0.4 SSIM) and let what falls further leave the panel
            top = float(np.nanmax(plotted))
            floor = max(float(np.nanmin(plotted)), float(data) - (8.0 if metric == "psnr" else 0.4))
            ax.set_ylim(floor - 0.04 * (top - floor), top + 0.04 * (top - floor))
        for ax in list(axes.flat)[len(done) :]:
            ax.axis("off")
        labels = list(handles)
        legend_labels = [
            f"{name} (one pass: {'best balance' if name == 'skimage wiener' else 'default'})"
            if name in ("wiener", "unsupervised-wiener", "skimage wiener", "skimage unsupervised_wiener")
            else name
            for name in labels
        ]
        figure.legend(
            [handles[n] for n in labels], legend_labels, loc="lower center", ncol=4, fontsize=9, frameon=False
        )
        figure.suptitle(
            f"{label} against iteration on phantoms ({'x'.join(map(str, result['shape']))}); "
            "peers without a callback: markers at the counts run",
            fontsize=11,
        )
        # room below the panels for the shared legend (3 rows of entries)
        legend_height = 0.8 / (3.7 * rows + 1.2)
        figure.tight_layout(rect=(0, legend_height + 0.02, 1, 0.96))
        path = folder / f"phantoms_{metric}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    args = report.parser(__doc__, "phantoms", "3 cases at 16x64x64 (about half a minute)").parse_args(argv)
    result = run(args.quick)
    report.publish(args.output, "phantoms", table(result), result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
