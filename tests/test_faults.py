"""Faults a long batch job meets: killed writes and batches, killed Dask workers, full disks, and
hundreds of stacks in one process. Nothing may be lost: every file is either complete or absent,
and a rerun finishes the rest."""

import errno
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tifffile

import microdecon as md
from microdecon import io
from microdecon.cli import main

# A child process running the command with the suite's deterministic FFT (see conftest.py), so
# its results can be compared with the parent's.
COMMAND = [
    sys.executable,
    "-c",
    "import sys; from microdecon import _backend, cli; _backend.set_cpu_fft('pocketfft'); "
    "sys.exit(cli.main(sys.argv[1:]))",
]
FAST = ["--num-iter", "2", "--device", "cpu", "-q"]


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def make_inputs(folder, count, shape=(16, 48, 48)):
    folder.mkdir(parents=True, exist_ok=True)
    psf = md.psf.gaussian((5, 7, 7), (1.0, 1.5, 1.5))
    io.imwrite(folder.parent / "psf.tif", psf, {"spacing": (0.2, 0.1, 0.1)})
    for index in range(count):
        truth = md.data.phantom(shape, seed=index)
        image = np.random.default_rng(index).poisson(md.convolve(truth, psf, device="cpu").clip(0) + 5)
        io.imwrite(folder / f"stack{index:03d}.tif", image.astype(np.float32), {"spacing": (0.2, 0.1, 0.1)})
    return folder.parent / "psf.tif"


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- a write killed half-way ---------------------------------------------------------------

SLOW_WRITE = textwrap.dedent(
    """
    import sys, time
    import dask, dask.array as da, numpy as np
    from microdecon import io

    def slow(block):
        time.sleep(0.05)
        return block + 1

    data = da.zeros((200, 32, 32), chunks=(1, 32, 32), dtype=np.float32).map_blocks(slow)
    with dask.config.set(scheduler="synchronous"):
        io.imwrite(sys.argv[1], data, {"axes": "ZYX"})
    """
)


@pytest.mark.parametrize("name", ["out.tif", "out.ome.tif", "out.zarr"])
def test_a_write_killed_half_way_leaves_the_old_result_or_nothing(tmp_path, name):
    target = tmp_path / name
    for previous in (None, np.full((4, 8, 8), 7, np.float32)):
        if previous is not None:
            io.imwrite(target, previous)
        writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(target)])
        deadline = time.monotonic() + 60
        while not any(n.endswith(".part") for n in hidden(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # blocks are being written into the temporary
        assert writer.poll() is None, "the write ended before it could be killed"
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        # the killed write is invisible: the old result whole, or no file at all
        if previous is None:
            assert visible(tmp_path) == []
        else:
            np.testing.assert_array_equal(io.imread(target)[0], previous)
        assert len(hidden(tmp_path)) == 1  # its hidden temporary ...
        io.imwrite(target, np.ones((3, 4, 5), np.float32))
        assert hidden(tmp_path) == []  # ... is swept by the next write of the same file
        np.testing.assert_array_equal(io.imread(target)[0], np.ones((3, 4, 5), np.float32))


def test_a_result_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    target = tmp_path / "out.zarr"
    io.imwrite(target, np.full((2, 3, 4), 5, np.float32))
    pid = dead_pid()
    # killed between the two renames of an overwrite: old result aside, new one unfinished
    prefix = io._temporary_prefix(target).replace(f"-{os.getpid()}.", f"-{pid}.")
    os.rename(target, tmp_path / f"{prefix}0123abcd.old")
    (tmp_path / f"{prefix}xyz_9.part").mkdir()
    # a concurrent writer's temporary (this process is alive) is left alone
    mine = tmp_path / f"{io._temporary_prefix(target)}live.part"
    mine.mkdir()

    import dask.array as da

    def fail(block):
        raise RuntimeError("the restoration failed")

    with pytest.raises(RuntimeError, match="restoration failed"):
        io.imwrite(target, da.zeros((2, 3, 4), chunks=1, dtype=np.float32).map_blocks(fail, dtype=np.float32))
    np.testing.assert_array_equal(io.imread(target)[0], np.full((2, 3, 4), 5, np.float32))
    assert hidden(tmp_path) == [mine.name]


def test_leftovers_of_another_pid_namespace_are_left_alone(tmp_path, monkeypatch):
    # A container on this host may share its name but number its processes separately: a
    # process ID that is dead here may be a live writer there.
    monkeypatch.setattr(io.os, "readlink", lambda path: "pid:[4026531836]")
    here = io._process_space()
    monkeypatch.setattr(io.os, "readlink", lambda path: "pid:[4026532999]")
    there = io._process_space()
    assert here != there and here.split("_ns")[0] == there.split("_ns")[0]  # same host name
    monkeypatch.setattr(io, "_HOST", here)
    target = tmp_path / "out.tif"
    pid = dead_pid()
    prefix = io._temporary_prefix(target).replace(f"-{os.getpid()}.", f"-{pid}.")
    (tmp_path / f"{prefix}efgh.part").write_bytes(b"a dead process's leftover")
    elsewhere = prefix.replace(f".{here}-", f".{there}-")
    (tmp_path / f"{elsewhere}abcd.part").write_bytes(b"a container's write in progress")
    io.imwrite(target, np.ones((3, 4), np.float32))
    assert hidden(tmp_path) == [f"{elsewhere}abcd.part"]  # the dead one swept, the other kept


# --- a batch killed at random moments -------------------------------------------------------


def test_a_batch_killed_at_random_moments_loses_nothing_and_a_rerun_finishes(tmp_path):
    psf = make_inputs(tmp_path / "in", 12)
    reference, out = tmp_path / "reference", tmp_path / "out"
    start = time.perf_counter()
    subprocess.run(
        [*COMMAND, "deconvolve", str(tmp_path / "in"), "--psf", str(psf), "-o", str(reference), *FAST],
        check=True,
    )
    whole = time.perf_counter() - start
    expected = {name: io.imread(reference / name)[0] for name in visible(reference)}
    assert len(expected) == 12

    rng = np.random.default_rng(2026)
    kills = checks = 0
    for _ in range(40):
        done_before = len(visible(out)) if out.exists() else 0
        batch = subprocess.Popen(
            [*COMMAND, "deconvolve", str(tmp_path / "in"), "--psf", str(psf), "-o", str(out), *FAST]
        )
        # Each run first finishes one more file (a time drawn from the whole batch's could fall
        # before the first file on a slow start, every time), then dies at a random moment,
        # often in the middle of writing the next one.
        deadline = time.perf_counter() + 3 * whole + 30
        while batch.poll() is None and time.perf_counter() < deadline:
            if out.exists() and len(visible(out)) > done_before:
                break
            time.sleep(0.005)
        try:
            code = batch.wait(timeout=rng.uniform(0.0, 0.05) * whole)
        except subprocess.TimeoutExpired:
            batch.send_signal(signal.SIGKILL)
            code = batch.wait()
            kills += 1
        names = visible(out) if out.exists() else []
        for name in names:  # what is there is complete and right
            np.testing.assert_allclose(io.imread(out / name)[0], expected[name], rtol=1e-6, atol=1e-6)
            checks += 1
        if code == 0:
            break
        assert code == -signal.SIGKILL
    assert kills >= 3, "the batch was never killed mid-way: the timing assumptions are wrong"
    assert visible(out) == sorted(expected) and hidden(out) == []  # the reruns finished the rest
    assert checks > 12


# --- full disks and files too large -------------------------------------------------------


def test_a_full_disk_fails_that_file_and_the_batch_goes_on(tmp_path, monkeypatch, capsys):
    psf = make_inputs(tmp_path / "in", 4)
    out = tmp_path / "out"
    real = tifffile.imwrite
    calls = []

    def disk_fills_on_the_second_file(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as partial:
                partial.write(b"II*\0" + bytes(1000))  # some bytes reach the disk first
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tifffile, "imwrite", disk_fills_on_the_second_file)
    code = main(["deconvolve", str(tmp_path / "in"), "--psf", str(psf), "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert code == 1
    target = out / "stack001_decon.tif"
    assert f"{tmp_path / 'in' / 'stack001.tif'}: FAILED: No space left on device: {target}" in err
    assert "1 of 4 file(s) failed" in err
    assert visible(out) == ["stack000_decon.tif", "stack002_decon.tif", "stack003_decon.tif"]
    assert hidden(out) == []  # the partial temporary is gone
    # space is freed: the rerun writes only the missing file
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert main(["deconvolve", str(tmp_path / "in"), "--psf", str(psf), "-o", str(out), *FAST]) == 0
    assert len(visible(out)) == 4 and hidden(out) == []


def _limit_file_size():
    # writes past the limit fail with EFBIG, as the kernel reports a quota or a full small volume
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs POSIX file-size limits")
def test_an_operating_system_write_limit_fails_only_the_files_above_it(tmp_path):
    psf = make_inputs(tmp_path / "in", 2)  # 16 x 48 x 48 float32: 147 kB out
    big = md.data.phantom((32, 64, 64), seed=9)  # 524 kB out: over the limit
    io.imwrite(tmp_path / "in" / "stack_big.tif", big, {"spacing": (0.2, 0.1, 0.1)})
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [*COMMAND, "deconvolve", str(tmp_path / "in"), "--psf", str(psf), "-o", str(out), *FAST],
        preexec_fn=_limit_file_size,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert f"stack_big.tif: FAILED: File too large: {out / 'stack_big_decon.tif'}" in done.stderr
    assert visible(out) == ["stack000_decon.tif", "stack001_decon.tif"] and hidden(out) == []


# --- a killed Dask worker -------------------------------------------------------------------


def test_a_killed_worker_is_retried_and_the_result_is_unchanged():
    distributed = pytest.importorskip("distributed")
    import dask.array as da

    truth = md.data.phantom((16, 96, 96), seed=4)
    psf = md.psf.gaussian((5, 7, 7), (1.0, 1.5, 1.5))
    image = np.random.default_rng(4).poisson(md.convolve(truth, psf, device="cpu").clip(0) + 5)
    image = image.astype(np.float32)
    options = {"num_iter": 40, "device": "cpu", "tile_shape": (16, 48, 48), "overlap": 8}
    expected = md.deconvolve(image, psf, "rl", **options)

    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        # the workers use the suite's FFT too, so the numbers compare exactly
        client.run(lambda: __import__("microdecon")._backend.set_cpu_fft("pocketfft"))
        lazy = md.deconvolve(da.from_array(image, chunks=(16, 48, 48)), psf, "rl", **options)
        future = client.compute(lazy)
        deadline = time.monotonic() + 60
        busy = {}
        while not busy and time.monotonic() < deadline:
            busy = {w: t for w, t in client.processing().items() if t}
            time.sleep(0.01)
        victim = next(iter(busy))
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)  # mid-task: the nanny restarts it, the scheduler reruns its tasks
        result = future.result(timeout=120)
        assert pid not in client.run(os.getpid).values()  # that process is gone: its work was redone
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5 * float(expected.max()))


# --- a long run in one process ----------------------------------------------------------------


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_two_hundred_stacks_in_one_process_keep_memory_steady():
    psf = md.psf.gaussian((5, 7, 7), (1.0, 1.5, 1.5))
    rng = np.random.default_rng(0)
    base = rng.poisson(20.0, (16, 64, 64)).astype(np.float32)
    resident = []
    for index in range(200):
        image = base + np.float32(index % 7)  # new data each time, same shape
        md.deconvolve(image, psf, "rl", num_iter=3, device="cpu")
        resident.append(_resident_bytes())
    warm = np.median(resident[10:30])
    # after the first few (FFT plans, caches), no growth: a leak of even one input per stack
    # (64 kB x 170) would add 11 MB
    assert max(resident[30:]) - warm < 4e6, (warm, max(resident[30:]))
    assert np.median(resident[-20:]) - warm < 2e6


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_a_batch_of_two_hundred_files_keeps_memory_steady(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for index in range(200):
        io.imwrite(folder / f"s{index:03d}.tif", rng.poisson(20.0, (8, 48, 48)).astype(np.uint16))
    psf = tmp_path / "psf.tif"
    io.imwrite(psf, md.psf.gaussian((3, 5, 5), 1.0))
    resident = []
    write = io.imwrite

    def measured(*args, **kwargs):
        write(*args, **kwargs)
        resident.append(_resident_bytes())

    monkeypatch.setattr(io, "imwrite", measured)
    assert main(["deconvolve", str(folder), "--psf", str(psf), "-o", str(tmp_path / "out"), *FAST]) == 0
    assert len(resident) == 200 and len(visible(tmp_path / "out")) == 200
    warm = np.median(resident[10:30])
    assert max(resident[30:]) - warm < 4e6, (warm, max(resident[30:]))


@pytest.mark.gpu
def test_two_hundred_stacks_on_the_gpu_keep_the_memory_pool_steady():
    from microdecon import _backend

    if not _backend.gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    xp = _backend.get_backend(device="gpu").xp
    pool = xp.get_default_memory_pool()
    psf = md.psf.gaussian((5, 7, 7), (1.0, 1.5, 1.5))
    base = np.random.default_rng(0).poisson(20.0, (32, 128, 128)).astype(np.float32)
    held, used = [], []
    for index in range(200):
        md.deconvolve(base + np.float32(index % 7), psf, "rl", num_iter=3, device="gpu")
        held.append(pool.total_bytes())
        used.append(pool.used_bytes())
    # the pool keeps its blocks for reuse, so it may grow over the first stacks, then not at all
    assert max(held[10:]) == held[10], (held[10], max(held[10:]))
    assert max(used[10:]) <= used[10] + 4 * base.nbytes


def test_a_short_write_without_a_limit_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    # NumPy reports a full disk as a bare count of elements; with no file-size limit it is ENOSPC
    def short_write(path, *args, **kwargs):
        with open(path, "wb") as partial:
            partial.write(bytes(4096))
        raise OSError("1000000 requested and 1024 written")

    monkeypatch.setattr(tifffile, "imwrite", short_write)
    target = tmp_path / "x.tif"
    with pytest.raises(OSError) as raised:
        io.imwrite(target, np.ones((4, 8, 8), np.float32))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert visible(tmp_path) == [] and hidden(tmp_path) == []
