"""Tiling: the plan, seamless stitching (tiled equals whole), Dask in and out, clusters, frames."""

import math
import sys
import tracemalloc

import dask.array as da
import numpy as np
import pytest

import microdecon as md
from microdecon import tiling
from microdecon._tile_model import TileModel, applying, recording, shared
from microdecon.restore import METHODS

# Fast settings per method: what matters here is agreement, not restoration quality.
FAST = {
    "rl": {"num_iter": 10},
    "rl-tv": {"num_iter": 10},
    "wiener": {},
    "tikhonov": {},
    "inverse": {},
    "landweber": {"num_iter": 10},
    "fista": {"num_iter": 10},
    "unsupervised-wiener": {"rng": 0, "num_iter": 20},
    "blind-rl": {"num_iter": 3},
}


def _data(shape, psf_shape, seed=0):
    rng = np.random.default_rng(seed)
    truth = md.data.phantom(shape, seed=seed)
    psf = md.psf.gaussian(psf_shape, [1.2] * len(psf_shape))
    blurred = md.convolve(truth, psf, device="cpu")
    return rng.poisson(np.maximum(blurred, 0) * 4).astype(np.float32) / 4, psf


def _whole_under_the_tiles_model(image, psf, method, tile_plan, params):
    """The whole volume restored under the model the tiler measures (on its central tile)."""
    function = METHODS[method]
    model = tiling._measure_model(image, psf, function, tile_plan, params, "cpu")
    with applying(model):
        return function(image, psf, device="cpu", **params)


def _relative_error(result, reference):
    return float(np.abs(result - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("method", list(METHODS))
def test_tiled_equals_whole_for_every_method(method):
    image, psf = _data((12, 110, 97), (5, 9, 9))
    params = {**FAST[method]}
    tile_shape = (None, 55, 49)
    tile_plan = tiling.plan(image.shape, psf, method, tile_shape=tile_shape, num_iter=params.get("num_iter"))
    assert tile_plan.tiles == 4
    whole = _whole_under_the_tiles_model(image, psf, method, tile_plan, params)
    tiled = md.deconvolve(image, psf, method, tile_shape=tile_shape, device="cpu", **params)
    assert tiled.dtype == np.float32 and tiled.shape == image.shape
    assert _relative_error(tiled, whole) < 1e-3


def test_tiles_run_the_count_their_pilot_tile_chose_by_holdout(monkeypatch):
    # RL's automatic count: measured once by hold-out on the central tile, run by every tile
    image, psf = _data((12, 110, 97), (5, 9, 9), seed=9)
    tile_shape = (None, 55, 49)
    tile_plan = tiling.plan(image.shape, psf, "rl", tile_shape=tile_shape, num_iter="auto")
    solver = sys.modules["microdecon.restore.richardson_lucy"]._RichardsonLucy
    counted = []
    count_by_holdout = solver.count_by_holdout

    def spy(self, *args):
        counted.append(count_by_holdout(self, *args))
        return counted[-1]

    monkeypatch.setattr(solver, "count_by_holdout", spy)
    model = tiling._measure_model(image, psf, METHODS["rl"], tile_plan, {"num_iter": "auto"}, "cpu")
    count = model.values["rl.iterations"]
    assert counted == [count] and 3 <= count < 100
    whole = _whole_under_the_tiles_model(image, psf, "rl", tile_plan, {"num_iter": "auto"})
    tiled = md.deconvolve(image, psf, "rl", tile_shape=tile_shape, device="cpu", num_iter="auto")
    assert _relative_error(tiled, whole) < 1e-3
    with applying(model):
        fixed = md.richardson_lucy(image, psf, count, device="cpu")
    np.testing.assert_array_equal(whole, fixed)
    # counted once per model measured (here, the helper's and the tiler's pilot tile); the four
    # tiles and the whole volume under the model took the recorded count
    assert counted == [count] * 3


@pytest.mark.parametrize("boundary", ["non-circulant", "periodic", "reflect"])
@pytest.mark.parametrize("method", ["rl", "wiener"])
def test_tiled_equals_whole_in_every_boundary_mode(method, boundary):
    image, psf = _data((10, 96, 96), (5, 9, 9), seed=1)
    params = {**FAST[method], "boundary": boundary}
    tile_shape = (None, 32, 48)
    tile_plan = tiling.plan(
        image.shape,
        psf,
        method,
        tile_shape=tile_shape,
        boundary=boundary,
        num_iter=params.get("num_iter"),
    )
    whole = _whole_under_the_tiles_model(image, psf, method, tile_plan, params)
    tiled = md.deconvolve(image, psf, method, tile_shape=tile_shape, device="cpu", **params)
    error = np.abs(tiled - whole) / np.abs(whole).max()
    assert error.max() < 1e-3
    # the seams and the volume's own border are where it would show first
    assert error[:, 30:34, :].max() < 1e-3 and error[:, :, -3:].max() < 1e-3


@pytest.mark.parametrize("tile_shape", [(None, 128, 128), (None, 101, 263), (19, 151, 132)])
def test_odd_shape_several_tile_shapes(tile_shape):
    image, psf = _data((37, 301, 263), (5, 9, 9), seed=2)
    params = {"num_iter": 6}
    tile_plan = tiling.plan(image.shape, psf, "rl", tile_shape=tile_shape, num_iter=6)
    assert tile_plan.tiles > 1
    whole = _whole_under_the_tiles_model(image, psf, "rl", tile_plan, params)
    tiled = md.deconvolve(image, psf, "rl", tile_shape=tile_shape, device="cpu", **params)
    assert _relative_error(tiled, whole) < 1e-3


def test_two_dimensional_image():
    image, psf = _data((200, 180), (11, 11), seed=3)
    tile_plan = tiling.plan(image.shape, psf, "rl", tile_shape=(64, 64), num_iter=10)
    assert tile_plan.grid == (4, 3)
    whole = _whole_under_the_tiles_model(image, psf, "rl", tile_plan, {"num_iter": 10})
    tiled = md.deconvolve(image, psf, "rl", tile_shape=(64, 64), num_iter=10, device="cpu")
    assert _relative_error(tiled, whole) < 1e-3


def test_the_model_matters_without_it_tiles_disagree():
    """The shared model is what makes the seams vanish: tiles measuring their own values differ."""
    image, psf = _data((12, 90, 77), (5, 9, 9))
    tile_plan = tiling.plan(image.shape, psf, "rl", tile_shape=(None, 45, 40), num_iter=10)
    whole = _whole_under_the_tiles_model(image, psf, "rl", tile_plan, {"num_iter": 10})
    volume = da.from_array(image, chunks=tile_plan.chunks)
    own = volume.map_overlap(
        lambda block: md.richardson_lucy(block, psf, 10, device="cpu"),
        depth=dict(enumerate(tile_plan.overlap)),
        boundary="none",
        dtype=np.float32,
    ).compute()
    assert _relative_error(own, whole) > 3e-3


def test_one_tile_is_the_plain_call():
    image, psf = _data((8, 40, 40), (5, 9, 9))
    direct = md.richardson_lucy(image, psf, 10, device="cpu")
    np.testing.assert_array_equal(md.deconvolve(image, psf, "rl", num_iter=10, device="cpu"), direct)
    assert tiling.plan(image.shape, psf, "rl", memory_limit="1GB").tiles == 1


def test_dask_in_lazy_dask_out():
    image, psf = _data((10, 96, 90), (5, 9, 9), seed=4)
    lazy = da.from_array(image, chunks=(10, 30, 30))
    out = md.deconvolve(lazy, psf, "rl", tile_shape=(None, 48, 45), num_iter=8, device="cpu")
    assert isinstance(out, da.Array) and out.dtype == np.float32 and out.shape == image.shape
    assert out.numblocks == (1, 2, 2)  # one task per tile
    eager = md.deconvolve(image, psf, "rl", tile_shape=(None, 48, 45), num_iter=8, device="cpu")
    np.testing.assert_allclose(out.compute(), eager, rtol=0, atol=1e-5 * eager.max())


def test_memory_limit_sets_the_tiles_and_keeps_z_whole():
    tile_plan = tiling.plan((64, 2048, 2048), (33, 65, 65), "rl", memory_limit="2GB")
    assert tile_plan.bytes_per_tile <= 2e9
    assert tile_plan.tile_shape[0] == 64 and tile_plan.grid[0] == 1
    assert tile_plan.overlap[0] == 0 and tile_plan.overlap[1] > 32
    bigger = tiling.plan((64, 2048, 2048), (33, 65, 65), "rl", memory_limit="8GB")
    assert bigger.tiles < tile_plan.tiles
    assert "tiles" in str(tile_plan) and "per tile" in str(tile_plan)
    # only when y and x cannot shrink further is z split
    tight = tiling.plan((400, 64, 64), (9, 9, 9), "rl", memory_limit="20MB", num_iter=30)
    assert tight.grid[0] > 1 and tight.bytes_per_tile <= 20e6


@pytest.mark.parametrize("method", list(METHODS))
def test_working_set_estimate_bounds_the_measured_peak(method):
    image, psf = _data((16, 64, 60), (5, 9, 9))
    params = {**FAST[method]}
    METHODS[method](image, psf, device="cpu", **params)  # FFT plans made
    tracemalloc.start()
    try:
        with recording():  # as a tile runs
            METHODS[method](image, psf, device="cpu", **params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = tiling.working_set_bytes(image.shape, psf.shape, method)
    assert peak <= estimate
    assert estimate < 3 * peak + 4e6  # and not wildly pessimistic


def test_tol_and_callback_refused_when_tiled():
    image, psf = _data((8, 64, 64), (5, 9, 9))
    with pytest.raises(ValueError, match="tol needs the whole volume"):
        md.deconvolve(image, psf, "rl", tile_shape=(None, 32, 32), tol=1e-3, device="cpu")
    with pytest.raises(ValueError, match="callback needs the whole volume"):
        md.deconvolve(image, psf, "rl", tile_shape=(None, 32, 32), callback=lambda i, x: None, device="cpu")
    # whole: allowed
    md.deconvolve(image, psf, "rl", tile_shape=None, tol=1e-3, num_iter=3, device="cpu")


def test_frames_and_one_psf_per_channel():
    image, psf = _data((6, 40, 40), (5, 9, 9))
    other = md.psf.gaussian((5, 9, 9), 2.0)
    stack = np.stack([np.stack([image, image * 2]), np.stack([image * 3, image])])  # T, C, Z, Y, X
    out = md.deconvolve(stack, [psf, other], "rl", num_iter=5, device="cpu")
    assert out.shape == stack.shape and out.dtype == np.float32
    for t in range(2):
        for c, p in enumerate([psf, other]):
            expected = md.richardson_lucy(stack[t, c], p, 5, device="cpu")
            np.testing.assert_array_equal(out[t, c], expected)
    lazy = md.deconvolve(da.from_array(stack), [psf, other], "rl", num_iter=5, device="cpu")
    np.testing.assert_allclose(lazy.compute(), out, rtol=1e-6, atol=1e-6 * out.max())
    with pytest.raises(ValueError, match="3 PSFs for 2 channels"):
        md.deconvolve(stack[0], [psf, other, psf], "rl", channel_axis=0, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"memory_limit": -5}, "memory_limit"),
        ({"memory_limit": "lots"}, "memory_limit|bytes"),
        ({"tile_shape": (10, 10)}, "tile_shape"),
        ({"tile_shape": "big"}, "tile_shape"),
        ({"overlap": "wide"}, "overlap"),
        ({"overlap": (1, 2)}, "overlap"),
    ],
)
def test_bad_arguments(kwargs, match):
    image, psf = _data((6, 32, 32), (3, 5, 5))
    with pytest.raises(ValueError, match=match):
        md.deconvolve(image, psf, "rl", device="cpu", **kwargs)


def test_memory_limit_too_small():
    with pytest.raises(ValueError, match="too small"):
        tiling.plan((16, 64, 64), (9, 9, 9), "rl", memory_limit=1000)


def test_tile_model_records_and_applies():
    model = TileModel()
    with recording(model):
        assert shared("a", lambda: 1.0) == 1.0
    with applying(model):
        assert shared("a", lambda: 2.0) == 1.0
    assert shared("a", lambda: 3.0) == 3.0
    with pytest.raises(TypeError, match="TileModel"):
        with applying({"a": 1}):
            pass


def test_overlap_grows_with_iterations_and_psf():
    assert tiling.overlap_for((9, 15, 15), "rl", 100) >= tiling.overlap_for((9, 15, 15), "rl", 10)
    assert tiling.overlap_for((9, 31, 31), "rl", 30)[1] > tiling.overlap_for((9, 15, 15), "rl", 30)[1]
    assert all(isinstance(v, int) for v in tiling.overlap_for((9, 15, 15), "wiener"))
    assert math.prod(tiling.plan((8, 64, 64), (3, 5, 5), "rl", tile_shape=None).grid) == 1


def test_local_cluster_matches_local_scheduler():
    distributed = pytest.importorskip("distributed")
    image, psf = _data((8, 96, 96), (5, 9, 9), seed=5)
    lazy = md.deconvolve(da.from_array(image), psf, "rl", tile_shape=(None, 48, 48), num_iter=6, device="cpu")
    local = lazy.compute(scheduler="threads")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client:
            remote = client.compute(lazy).result()
    # the same tiles, the same model; only the FFT library's thread count differs in the workers
    np.testing.assert_allclose(remote, local, rtol=0, atol=1e-5 * local.max())


@pytest.mark.gpu
def test_local_cuda_cluster_restores_tiles_on_its_workers_gpus():
    """dask-cuda's LocalCUDACluster: one worker per GPU, each tile on its worker's GPU, the same
    result as the CPU's local scheduler."""
    from microdecon._backend import gpu_available

    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    dask_cuda = pytest.importorskip("dask_cuda")
    distributed = pytest.importorskip("distributed")
    import cupy

    # 16 tiles: the central one is restored here while the model is measured, 15 by the workers
    image, psf = _data((8, 192, 192), (5, 9, 9), seed=5)
    lazy = md.deconvolve(da.from_array(image), psf, "rl", tile_shape=(None, 48, 48), num_iter=6)
    local = md.deconvolve(image, psf, "rl", tile_shape=(None, 48, 48), num_iter=6, device="cpu")
    gpus = cupy.cuda.runtime.getDeviceCount()
    with dask_cuda.LocalCUDACluster(dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            with distributed.get_task_stream(client) as stream:
                remote = client.compute(lazy).result()
            pools = client.run(lambda: cupy.get_default_memory_pool().total_bytes())
    tiles = [task for task in stream.data if "restore_region" in str(task["key"])]
    workers = {task["worker"] for task in tiles}
    assert len(pools) == gpus and len(tiles) == 15, (pools, len(tiles))
    # one worker per GPU, all of them busy, each holding GPU memory: the tiles ran on the GPUs
    assert workers == set(pools) and all(held > 0 for held in pools.values()), (workers, pools)
    np.testing.assert_allclose(np.asarray(remote), local, rtol=0, atol=1e-4 * local.max())


@pytest.mark.gpu
def test_a_real_gpu_out_of_memory_shrinks_the_tiles_with_the_same_result(monkeypatch):
    """A CuPy pool limit makes the whole volume fail for real on the GPU (OutOfMemoryError or a
    cuFFT work-area failure); the planner retries with smaller tiles, and the result is what
    those tiles give on the CPU."""
    from microdecon._backend import gpu_available

    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    import cupy

    image, psf = _data((16, 256, 256), (7, 15, 15), seed=8)
    used = []
    run_plan = tiling._run_plan

    def spy(image, psf, function, tile_plan, params, device, boundary):
        used.append((tile_plan, device))
        return run_plan(image, psf, function, tile_plan, params, device, boundary)

    monkeypatch.setattr(tiling, "_run_plan", spy)
    pool = cupy.get_default_memory_pool()
    cupy.fft.config.get_plan_cache().clear()  # cached cuFFT work areas would count against the limit
    pool.free_all_blocks()
    # about 6 volumes: the whole volume needs more (grid, spectrum, OTF, estimate, ratio, plans)
    pool.set_limit(size=pool.used_bytes() + 6 * image.nbytes)
    try:
        with pytest.warns(RuntimeWarning, match="retrying with|on the CPU"):
            out = md.deconvolve(image, psf, "rl", num_iter=8, device="gpu")
    finally:
        pool.set_limit(size=0)
        cupy.fft.config.get_plan_cache().clear()
    (first, _), (last, device) = used[0], used[-1]
    assert first.tiles == 1 and (last.tiles > 1 or device == "cpu"), used
    tiles = last.tile_shape if last.tiles > 1 else None
    reference = md.deconvolve(image, psf, "rl", num_iter=8, device="cpu", tile_shape=tiles)
    assert isinstance(out, np.ndarray) and out.shape == image.shape
    assert _relative_error(out, reference) < 1e-3


class OutOfMemoryError(Exception):
    """Named like CuPy's: what the tiler recognizes as a device out of memory."""


def test_out_of_memory_retries_with_smaller_tiles(monkeypatch):
    image, psf = _data((8, 96, 96), (5, 9, 9), seed=6)
    real = METHODS["rl"]
    sizes = []

    def small_device(block, psf, **params):  # a "GPU" that holds 40 000 voxels at most
        sizes.append(block.size)
        if params["device"] != "cpu" and block.size > 40_000:
            raise OutOfMemoryError("out of memory allocating 1234 bytes")
        return real(block, psf, **{**params, "device": "cpu"})

    monkeypatch.setitem(METHODS, "rl", small_device)
    with pytest.warns(RuntimeWarning, match="retrying with .* tiles"):
        out = md.deconvolve(image, psf, "rl", num_iter=5, device="gpu", memory_limit="1GB")
    # whole first; then, after the failures, every tile fits the "GPU"
    assert sizes[0] == image.size
    settled = sizes[sizes.index(max(s for s in sizes if s <= 40_000)) :]
    assert max(settled) <= 40_000 and len(settled) >= 4
    assert out.shape == image.shape and out.dtype == np.float32 and np.isfinite(out).all()


def test_out_of_memory_falls_back_to_the_cpu_with_the_same_result(monkeypatch):
    image, psf = _data((8, 64, 64), (5, 9, 9), seed=7)
    real = METHODS["rl"]

    def no_gpu_memory(block, psf, **params):
        if params["device"] != "cpu":
            raise OutOfMemoryError("out of memory")
        return real(block, psf, **params)

    monkeypatch.setitem(METHODS, "rl", no_gpu_memory)
    with pytest.warns(RuntimeWarning) as caught:
        out = md.deconvolve(image, psf, "rl", num_iter=5, device="gpu", memory_limit="1GB")
    said = [str(w.message) for w in caught]
    # smaller tiles first (while any fit the limit), then the CPU
    assert "retrying with" in said[0] and "restoring on the CPU instead" in said[-1]
    np.testing.assert_array_equal(out, real(image, psf, 5, device="cpu"))
    # lazy input: each tile falls back on its own, under the shared model
    with pytest.warns(RuntimeWarning, match="a tile ran out of memory"):
        lazy = md.deconvolve(
            da.from_array(image), psf, "rl", num_iter=5, device="gpu", tile_shape=(None, 32, 32)
        ).compute()
    monkeypatch.setitem(METHODS, "rl", real)
    on_cpu = md.deconvolve(image, psf, "rl", num_iter=5, device="cpu", tile_shape=(None, 32, 32))
    np.testing.assert_allclose(lazy, on_cpu, rtol=0, atol=1e-6 * on_cpu.max())


def test_errors_other_than_memory_are_not_retried(monkeypatch):
    image, psf = _data((8, 32, 32), (5, 9, 9))

    def broken(block, psf, **params):
        raise RuntimeError("something else")

    monkeypatch.setitem(METHODS, "rl", broken)
    with pytest.raises(RuntimeError, match="something else"):
        md.deconvolve(image, psf, "rl", num_iter=5, device="cpu")


@pytest.mark.parametrize("method", list(METHODS))
def test_the_pilot_tile_is_what_the_tile_restores_under_the_model(method):
    """The tile the model is measured on is used as it is: it must equal that tile restored
    under the model, as every other tile is."""
    image, psf = _data((12, 110, 97), (5, 9, 9), seed=8)
    params = {**FAST[method]}
    tile_plan = tiling.plan(
        image.shape, psf, method, tile_shape=(None, 55, 49), num_iter=params.get("num_iter")
    )
    model, index, pilot = tiling._pilot(image, psf, METHODS[method], tile_plan, params, "cpu", False)
    read, core = next((r, c) for i, r, c in tiling._regions(tile_plan, "non-circulant") if i == index)
    again = tiling._restore_region(
        tiling._Region(image[read]), core, METHODS[method], psf, model, "cpu", params, False
    )
    np.testing.assert_array_equal(pilot, again)


def test_tiles_of_one_volume_share_one_otf_and_normalization_in_a_process(monkeypatch):
    import pickle

    from microdecon._tile_model import TileModel, applying, reused
    from microdecon.operators import Convolution

    psf = md.psf.gaussian((5, 9, 9), 1.5)
    outside = [Convolution(psf, (8, 40, 40)).otf for _ in range(2)]
    assert outside[0] is not outside[1]  # no model: nothing is kept
    model = TileModel()
    with applying(model):
        first, second = Convolution(psf, (8, 40, 40)), Convolution(psf, (8, 40, 40))
        other = Convolution(md.psf.gaussian((5, 9, 9), 2.0), (8, 40, 40))
        assert first.otf is second.otf and other.otf is not first.otf
        np.testing.assert_array_equal(first.otf, outside[0])
        assert reused("k", lambda: 1) == 1 and reused("k", lambda: 2) == 1
    # the record travels without them (they are large and this process's)
    assert pickle.loads(pickle.dumps(model))._reused == {}
    # a tiled run makes the OTF once, although its kinds of cached things turn over apart
    image, _ = _data((8, 200, 200), (5, 9, 9))
    made = []
    real = Convolution._make_otf
    monkeypatch.setattr(Convolution, "_make_otf", lambda self, p: made.append(1) or real(self, p))
    md.deconvolve(image, psf, "rl", num_iter=2, tile_shape=(None, 50, 50), device="cpu")
    assert len(made) == 1
    # (that tiles restored so equal the whole volume is tested above, for every method)


def test_tiles_of_a_lazy_tiff_read_their_regions_straight_from_the_file(tmp_path, monkeypatch):
    import tifffile

    from microdecon import io

    image, psf = _data((6, 300, 260), (5, 9, 9))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="minisblack")
    lazy, _ = io.imread(path, lazy=True)
    assert io.region_source(lazy) is not None and io.region_source(lazy + 0) is None
    reads = []
    real = type(io.region_source(lazy))._read
    monkeypatch.setattr(
        type(io.region_source(lazy)), "_read", lambda self, box: reads.append(box) or real(self, box)
    )
    options = {"num_iter": 3, "tile_shape": (None, 100, 100), "device": "cpu"}
    direct = md.deconvolve(lazy, psf, "rl", **options).compute(scheduler="synchronous")
    tiles = tiling.plan(lazy.shape, psf, "rl", num_iter=3, tile_shape=(None, 100, 100)).tiles
    assert len(reads) == tiles  # one read per tile (the pilot's result is kept), not one per chunk
    # the same numbers as reading through the Dask chunks (an array that is no longer imread's)
    chunked = md.deconvolve(lazy.map_blocks(lambda b: b), psf, "rl", **options).compute(
        scheduler="synchronous"
    )
    np.testing.assert_array_equal(direct, chunked)
    np.testing.assert_allclose(direct, md.deconvolve(image, psf, "rl", **options), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("memory_limit, expected", [(None, 1), ("400MB", None)])
def test_threaded_schedulers_restore_no_more_tiles_at_once_than_memory_allows(
    monkeypatch, memory_limit, expected
):
    import threading
    import time

    image, psf = _data((8, 96, 96), (3, 5, 5))
    options = {"num_iter": 2, "device": "cpu", "tile_shape": (None, 32, 32), "memory_limit": memory_limit}
    tile_plan = tiling.plan(
        image.shape, psf, "rl", num_iter=2, tile_shape=(None, 32, 32), memory_limit=memory_limit
    )
    allowed = tiling.tiles_at_once(tile_plan) if expected is None else expected
    assert allowed >= 1 and (expected is not None or allowed > 1)
    running, most, lock = [0], [0], threading.Lock()
    real = tiling._on_device_or_cpu

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(tiling, "_on_device_or_cpu", counted)
    lazy = md.deconvolve(da.from_array(image, chunks=(8, 48, 48)), psf, "rl", **options)
    out = lazy.compute(scheduler="threads", num_workers=6)
    assert most[0] == min(allowed, 6)
    np.testing.assert_allclose(out, md.deconvolve(image, psf, "rl", **options), rtol=1e-6, atol=1e-6)
