import os

import numpy as np
import pytest
import tifffile

from microdecon import io


def test_roundtrip_keeps_axes_spacing_and_provenance(tmp_path):
    data = np.random.default_rng(0).random((3, 5, 7)).astype(np.float32)
    path = tmp_path / "x.tif"
    io.imwrite(path, data, {"spacing": (0.3, 0.11, 0.12), "provenance": {"method": "rl", "num_iter": 5}})
    back, meta = io.imread(path)
    np.testing.assert_array_equal(back, data)
    assert meta["axes"] == "ZYX"
    np.testing.assert_allclose(meta["spacing"], (0.3, 0.11, 0.12), rtol=1e-6)
    assert meta["spacing_known"] is True
    assert meta["provenance"] == {"method": "rl", "num_iter": 5}
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_float64_is_stored_as_float32_and_uint16_kept(tmp_path):
    io.imwrite(tmp_path / "a.tif", np.ones((4, 4)))
    io.imwrite(tmp_path / "b.tif", np.full((4, 4), 7, np.uint16))
    assert io.imread(tmp_path / "a.tif")[0].dtype == np.float32
    b, meta = io.imread(tmp_path / "b.tif")
    assert b.dtype == np.uint16 and meta["spacing_known"] is False


def test_reads_plain_and_ome_tiffs(tmp_path):
    data = np.arange(2 * 5 * 6, dtype=np.uint16).reshape(2, 5, 6)
    tifffile.imwrite(tmp_path / "plain.tif", data)
    tifffile.imwrite(
        tmp_path / "ome.ome.tif",
        data,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 0.5},
    )
    plain, meta = io.imread(tmp_path / "plain.tif")
    np.testing.assert_array_equal(plain, data)
    ome, meta = io.imread(tmp_path / "ome.ome.tif")
    np.testing.assert_array_equal(ome, data)
    assert meta["spacing"] == (0.5, 0.2, 0.2)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        io.imread(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"this is not a tiff")
    with pytest.raises(ValueError, match="bad.tif: not a readable TIFF"):
        io.imread(bad)
    good = tmp_path / "good.tif"
    io.imwrite(good, np.ones((8, 64, 64), np.float32))
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ValueError, match="truncated.tif"):
        io.imread(truncated)


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError, match="dtype"):
        io.imwrite(tmp_path / "c.tif", np.ones((3, 3), np.complex64))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.imwrite(tmp_path / "missing" / "c.tif", np.ones((3, 3), np.float32))

    assert os.listdir(tmp_path) == []


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.tif"
    io.imwrite(path, np.ones((4, 4), np.float32))

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", fail)
    with pytest.raises(OSError, match="disk full"):
        io.imwrite(path, np.zeros((4, 4), np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(io.imread(path)[0], 1)
    assert sorted(os.listdir(tmp_path)) == ["keep.tif"]


def test_units_are_converted_or_marked_unknown(tmp_path):
    data = np.zeros((3, 5, 6), np.uint16)
    tifffile.imwrite(
        tmp_path / "nm.tif",
        data,
        imagej=True,
        resolution=(1 / 100.0, 1 / 100.0),
        metadata={"spacing": 200, "unit": "nm", "axes": "ZYX"},
    )
    _, meta = io.imread(tmp_path / "nm.tif")
    assert meta["spacing"] == (0.2, 0.1, 0.1) and meta["spacing_known"]
    tifffile.imwrite(tmp_path / "dpi.tif", data[0], resolution=(72, 72), resolutionunit=2)
    _, meta = io.imread(tmp_path / "dpi.tif")  # an image editor's 72 dpi is not a voxel size
    assert meta["spacing"] == (1.0, 1.0) and not meta["spacing_known"]
    tifffile.imwrite(tmp_path / "cm.tif", data[0], resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit=3)
    _, meta = io.imread(tmp_path / "cm.tif")
    np.testing.assert_allclose(meta["spacing"], (0.25, 0.25))
