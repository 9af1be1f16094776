import subprocess
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

import microdecon as md  # noqa: E402
from microdecon.plot import compare  # noqa: E402


@pytest.fixture
def stacks():
    rng = np.random.default_rng(0)
    before = rng.poisson(20, (6, 12, 16)).astype(np.uint16)
    after = rng.gamma(2.0, 10.0, (6, 12, 16)).astype(np.float32)
    return before, after


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def shown(fig, i):
    return np.asarray(fig.axes[i].images[0].get_array())


def test_panels_show_the_max_projection_with_titles(stacks):
    before, after = stacks
    fig = compare(before, after, titles=["raw", "restored"])
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["raw", "restored"]
    np.testing.assert_array_equal(shown(fig, 0), before.max(axis=0))
    np.testing.assert_array_equal(shown(fig, 1), after.max(axis=0))
    assert shown(fig, 0).shape == (12, 16)


def test_mean_and_slice_along_any_axis(stacks):
    before, _ = stacks
    fig = compare(before, projection="mean", axis=1)
    np.testing.assert_allclose(shown(fig, 0), before.mean(axis=1), rtol=1e-6)
    assert shown(fig, 0).shape == (6, 16)
    fig = compare(before, projection="slice", axis=-1)
    np.testing.assert_array_equal(shown(fig, 0), before[:, :, 8])
    fig = compare(before, projection="slice", axis=0, index=-1)
    np.testing.assert_array_equal(shown(fig, 0), before[5])


def test_two_d_images_are_shown_as_they_are_and_shapes_may_differ(stacks):
    before, _ = stacks
    flat = np.arange(30, dtype=np.float32).reshape(5, 6)
    fig = compare(flat, before, axis=2)
    np.testing.assert_array_equal(shown(fig, 0), flat)
    np.testing.assert_array_equal(shown(fig, 1), before.max(axis=2))
    # different shapes: panels keep their own axes (no shared zoom)
    assert not fig.axes[0].get_shared_x_axes().joined(fig.axes[0], fig.axes[1])


def test_same_shapes_share_their_axes(stacks):
    fig = compare(*stacks)
    assert fig.axes[0].get_shared_x_axes().joined(fig.axes[0], fig.axes[1])


def test_each_panel_gets_its_own_percentile_range_or_one_shared(stacks):
    before, after = stacks
    fig = compare(before, after, percentiles=(1, 99))
    for i, image in enumerate((before, after)):
        lo, hi = np.percentile(image.max(axis=0).astype(np.float64), (1, 99))
        assert fig.axes[i].images[0].get_clim() == pytest.approx((lo, hi))
    fig = compare(before, after * 10, scale="shared", percentiles=(0, 100))
    both = np.concatenate([before.max(axis=0).ravel(), (after * 10).max(axis=0).ravel()])
    for ax in fig.axes:
        assert ax.images[0].get_clim() == pytest.approx((both.min(), both.max()))


def test_nan_is_left_out_of_the_range_and_constant_images_work():
    image = np.ones((4, 5, 5), np.float32)
    image[0, 0, 0] = np.nan
    image[1, 2, 2] = 3.0
    fig = compare(image, np.full((5, 5), 7.0), percentiles=(0, 100))
    assert fig.axes[0].images[0].get_clim() == pytest.approx((1.0, 3.0))
    lo, hi = fig.axes[1].images[0].get_clim()
    assert lo <= 7.0 < hi


def test_spacing_gives_the_physical_aspect_and_grid_and_colorbars(stacks):
    before, after = stacks
    fig = compare(before, after, before, axis=1, spacing=(0.3, 0.1, 0.1), ncols=2, colorbar=True)
    panels = fig.axes[:3]
    assert [ax.get_aspect() for ax in panels] == pytest.approx([3.0, 3.0, 3.0])
    assert len(fig.axes) == 6  # three panels, then one colour bar each
    rows = sorted({round(ax.get_position().y0, 3) for ax in panels})
    assert len(rows) == 2
    fig = compare(before, after, scale="shared", colorbar=True)
    assert len(fig.axes) == 3


def test_bool_and_list_input():
    mask = np.zeros((3, 4, 4), bool)
    mask[1, 2, 3] = True
    fig = compare(mask, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(shown(fig, 0), mask.max(axis=0).astype(np.uint8))
    np.testing.assert_array_equal(shown(fig, 1), [[1, 2], [3, 4]])


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((), {}, ValueError, "at least one image"),
        ((np.zeros(5),), {}, ValueError, r"images\[0\] must have 2 or 3 axes"),
        ((np.zeros((2, 2)), np.zeros((2, 2, 2, 2))), {}, ValueError, r"images\[1\] must have 2 or 3"),
        ((np.zeros((0, 3)),), {}, ValueError, r"images\[0\] is empty"),
        ((np.zeros((2, 2), complex),), {}, TypeError, "complex"),
        ((np.array([["a", "b"]]),), {}, TypeError, "not a real numeric"),
        (("image.tif",), {}, TypeError, r"images\[0\] must be an array"),
        ((np.zeros((2, 2)),), {"titles": ["a", "b"]}, ValueError, "titles has 2 entries"),
        ((np.zeros((2, 2)),), {"titles": "a"}, TypeError, "titles must be a sequence"),
        ((np.zeros((2, 2)),), {"titles": [1]}, TypeError, "titles must all be str"),
        ((np.zeros((2, 2)),), {"projection": "min"}, ValueError, "projection must be one of"),
        ((np.zeros((2, 2)),), {"scale": "global"}, ValueError, "scale must be one of"),
        ((np.zeros((2, 2)),), {"axis": 3}, ValueError, "axis must be between"),
        ((np.zeros((2, 2)),), {"axis": 1.0}, TypeError, "axis must be an integer"),
        ((np.zeros((2, 2)),), {"index": 1}, ValueError, "index applies only"),
        ((np.zeros((2, 2, 2)),), {"projection": "slice", "index": 2}, ValueError, "index 2 is outside"),
        ((np.zeros((2, 2)),), {"percentiles": (50, 10)}, ValueError, "percentiles must satisfy"),
        ((np.zeros((2, 2)),), {"percentiles": (1,)}, ValueError, "percentiles must be two"),
        ((np.zeros((2, 2)),), {"spacing": (0.1, 0.1)}, ValueError, "spacing needs one value per axis"),
        ((np.zeros((2, 2)),), {"ncols": 0}, ValueError, "ncols must be >= 1"),
        ((np.zeros((2, 2)),), {"cmap": "nope"}, ValueError, "cmap 'nope'"),
        ((np.zeros((2, 2)),), {"colorbar": "yes"}, TypeError, "colorbar must be"),
    ],
)
def test_bad_arguments_are_named(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        compare(*args, **kwargs)
    assert plt.get_fignums() == []  # nothing half-drawn is left open


def test_dask_input_is_projected_lazily_then_computed(stacks):
    da = pytest.importorskip("dask.array")
    before, _ = stacks
    fig = compare(da.from_array(before, chunks=(2, 6, 8)))
    np.testing.assert_array_equal(shown(fig, 0), before.max(axis=0))


@pytest.mark.gpu
def test_cupy_input_is_projected_on_the_gpu_and_shown_from_the_host(stacks):
    from microdecon._backend import gpu_available

    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    import cupy

    before, after = stacks
    fig = compare(cupy.asarray(before), cupy.asarray(after), projection="mean")
    assert isinstance(fig.axes[0].images[0].get_array(), np.ndarray)
    np.testing.assert_allclose(shown(fig, 1), after.mean(axis=0), rtol=1e-5)


def test_import_microdecon_does_not_load_matplotlib():
    code = (
        "import sys, microdecon as md, microdecon.plot\n"
        "assert 'matplotlib' not in sys.modules, 'loaded by import'\n"
        "assert callable(md.plot.compare)\n"
        "assert 'matplotlib' not in sys.modules, 'loaded by attribute access'\n"
        "import matplotlib; matplotlib.use('Agg')\n"
        "md.plot.compare([[1.0, 2.0]])\n"
        "assert 'matplotlib.pyplot' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_missing_matplotlib_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "microdecon\[plot\]"'):
        compare(np.zeros((2, 2)))


def test_the_package_exposes_the_module():
    assert md.plot.compare is compare
    with pytest.raises(AttributeError, match="no attribute 'plots'"):
        md.plots  # noqa: B018
