import json
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


# --------------------------------------------------------------------------------------------
# Every format, every dimension; eager and lazy
# --------------------------------------------------------------------------------------------
FORMATS = [".tif", ".ome.tif", ".zarr"]
SIZES = {"T": 2, "C": 3, "Z": 4, "Y": 9, "X": 10}
STEPS = {"Z": 0.35, "Y": 0.104, "X": 0.104}


def _example(axes, seed=0):
    data = np.random.default_rng(seed).random([SIZES[a] for a in axes]).astype(np.float32)
    meta = {
        "axes": axes,
        "spacing": tuple(STEPS.get(a, 1.0) for a in axes),
        "provenance": {"method": "rl", "num_iter": 7},
    }
    if "C" in axes:
        meta["channel_names"] = ["DAPI", "GFP", "mCherry"]
        meta["wavelengths"] = [0.461, 0.51, None]
        meta["excitation_wavelengths"] = [0.405, 0.488, 0.561]
    return data, meta


def _same_meta(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            np.testing.assert_array_equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("axes", ["X", "YX", "ZYX", "CZYX", "TCZYX", "ZCYX", "TYXC"])
def test_roundtrip_every_format_eager_and_lazy(tmp_path, ext, axes):
    import dask.array as da

    data, meta = _example(axes)
    path = tmp_path / f"image{ext}"
    io.imwrite(path, data, meta)
    back, got = io.imread(path)
    assert isinstance(back, np.ndarray) and back.dtype == np.float32
    np.testing.assert_array_equal(back, data)  # same values in the caller's axis order
    assert got["axes"] == axes and got["unit"] == "um" and got["spacing_known"] is True
    np.testing.assert_allclose(got["spacing"], meta["spacing"], rtol=1e-6)
    assert got["provenance"] == {"method": "rl", "num_iter": 7}
    if "C" in axes:
        assert got["channel_names"] == ["DAPI", "GFP", "mCherry"]
        assert got["wavelengths"][2] is None
        np.testing.assert_allclose(got["wavelengths"][:2], [0.461, 0.51], rtol=1e-9)
        np.testing.assert_allclose(got["excitation_wavelengths"], [0.405, 0.488, 0.561], rtol=1e-9)
    else:
        assert "channel_names" not in got and "wavelengths" not in got
    assert "scale" not in got and "offset" not in got

    lazy, lazy_meta = io.imread(path, lazy=True)
    assert isinstance(lazy, da.Array) and lazy.shape == data.shape and lazy.dtype == data.dtype
    np.testing.assert_array_equal(lazy.compute(), back)
    _same_meta(lazy_meta, got)
    assert os.listdir(tmp_path) == [path.name]  # no temporary left beside it


def test_each_format_stores_its_own_axis_order(tmp_path):
    import zarr

    data, meta = _example("CZYX")
    io.imwrite(tmp_path / "a.tif", data, meta)
    io.imwrite(tmp_path / "a.ome.tif", data, meta)
    io.imwrite(tmp_path / "a.zarr", data, meta)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:  # ImageJ hyperstacks are TZCYX
        assert tif.series[0].axes == "ZCYX" and tif.imagej_metadata["channels"] == 3
        np.testing.assert_array_equal(tif.asarray(), data.transpose(1, 0, 2, 3))
        np.testing.assert_allclose(tif.imagej_metadata["spacing"], 0.35)
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tif:
        assert tif.series[0].axes == "CZYX"
        assert 'PhysicalSizeZ="0.35"' in tif.ome_metadata and 'Name="GFP"' in tif.ome_metadata
        assert 'ExcitationWavelength="488.0" ExcitationWavelengthUnit="nm"' in tif.ome_metadata
        assert "EmissionWavelength" not in tif.ome_metadata  # one unknown: OME has no "None"
    group = zarr.open_group(tmp_path / "a.zarr", mode="r")  # NGFF 0.4 as other readers see it
    multiscale = group.attrs["multiscales"][0]
    assert multiscale["version"] == "0.4"
    assert [a["name"] for a in multiscale["axes"]] == ["c", "z", "y", "x"]
    assert [a["type"] for a in multiscale["axes"]] == ["channel", "space", "space", "space"]
    assert multiscale["axes"][1]["unit"] == "micrometer"
    transform = multiscale["datasets"][0]["coordinateTransformations"]
    assert multiscale["datasets"][0]["path"] == "0"
    assert transform == [{"type": "scale", "scale": [1.0, 0.35, 0.104, 0.104]}]
    assert [c["label"] for c in group.attrs["omero"]["channels"]] == ["DAPI", "GFP", "mCherry"]
    window = group.attrs["omero"]["channels"][1]["window"]
    assert (window["min"], window["max"]) == (float(data[1].min()), float(data[1].max()))
    np.testing.assert_array_equal(group["0"][...], data)
    assert group.attrs["microdecon"]["provenance"] == {"method": "rl", "num_iter": 7}


def test_unknown_voxel_size_stays_unknown(tmp_path):
    for ext in FORMATS:
        io.imwrite(tmp_path / f"u{ext}", np.ones((3, 4, 5), np.float32))
        _, meta = io.imread(tmp_path / f"u{ext}")
        assert meta["spacing"] == (1.0, 1.0, 1.0) and meta["spacing_known"] is False, ext
        # a real 1.0 micrometre is told from "unknown"
        io.imwrite(tmp_path / f"k{ext}", np.ones((3, 4, 5), np.float32), {"spacing": (1.0, 1.0, 1.0)})
        _, meta = io.imread(tmp_path / f"k{ext}")
        assert meta["spacing"] == (1.0, 1.0, 1.0) and meta["spacing_known"] is True, ext


def test_spacing_per_spatial_axis_and_bad_spacing(tmp_path):
    data = np.zeros((2, 3, 4, 5), np.float32)
    io.imwrite(tmp_path / "s.ome.tif", data, {"axes": "CZYX", "spacing": (0.3, 0.1, 0.1)})
    assert io.imread(tmp_path / "s.ome.tif")[1]["spacing"] == (1.0, 0.3, 0.1, 0.1)
    with pytest.raises(ValueError, match="spacing"):
        io.imwrite(tmp_path / "t.tif", data, {"axes": "CZYX", "spacing": (0.3, 0.1)})
    with pytest.raises(ValueError, match="positive"):
        io.imwrite(tmp_path / "t.tif", data, {"axes": "CZYX", "spacing": (0.3, 0.1, -1.0)})
    with pytest.raises(ValueError, match="axes"):
        io.imwrite(tmp_path / "t.tif", data, {"axes": "CZZX"})
    with pytest.raises(ValueError, match="channel_names has 1 entries for 2"):
        io.imwrite(tmp_path / "t.tif", data, {"axes": "CZYX", "channel_names": ["a"]})
    assert os.listdir(tmp_path) == ["s.ome.tif"]


def test_free_form_keys_travel_in_every_format(tmp_path):
    for ext in FORMATS:
        io.imwrite(tmp_path / f"f{ext}", np.ones((4, 4), np.float32), {"objective": "60x", "na": 1.4})
        meta = io.imread(tmp_path / f"f{ext}")[1]
        assert (meta["objective"], meta["na"]) == ("60x", 1.4), ext


# --------------------------------------------------------------------------------------------
# Files written by other software
# --------------------------------------------------------------------------------------------
def test_ome_tiff_from_tifffile_with_channels_and_nanometres(tmp_path):
    data = np.arange(2 * 3 * 4 * 5 * 6, dtype=np.uint16).reshape(2, 3, 4, 5, 6)
    tifffile.imwrite(
        tmp_path / "cells.ome.tif",
        data,
        ome=True,
        metadata={
            "axes": "TCZYX",
            "PhysicalSizeX": 108.3,
            "PhysicalSizeXUnit": "nm",
            "PhysicalSizeY": 108.3,
            "PhysicalSizeYUnit": "nm",
            "PhysicalSizeZ": 0.25,  # no unit: OME's default, the micrometre
            "Channel": {
                "Name": ["DAPI", "GFP", "RFP"],
                "EmissionWavelength": [461, 0.51, 590],
                "EmissionWavelengthUnit": ["nm", "\u00b5m", "nm"],
                "ExcitationWavelength": [405, 488, 561],  # no unit: nanometres
            },
            "Description": "acquired on scope 3",
        },
    )
    for lazy in (False, True):
        image, meta = io.imread(tmp_path / "cells.ome.tif", lazy=lazy)
        np.testing.assert_array_equal(np.asarray(image), data)
        assert meta["axes"] == "TCZYX" and meta["spacing_known"] is True
        np.testing.assert_allclose(meta["spacing"], (1.0, 1.0, 0.25, 0.1083, 0.1083), rtol=1e-12)
        assert meta["channel_names"] == ["DAPI", "GFP", "RFP"]
        np.testing.assert_allclose(meta["wavelengths"], [0.461, 0.51, 0.59], rtol=1e-12)
        np.testing.assert_allclose(meta["excitation_wavelengths"], [0.405, 0.488, 0.561], rtol=1e-12)
        assert meta["description"] == "acquired on scope 3" and "provenance" not in meta


def test_pyramidal_ome_tiff_reads_its_full_resolution(tmp_path):
    data = np.random.default_rng(8).random((3, 64, 64)).astype(np.float32)
    with tifffile.TiffWriter(tmp_path / "pyramid.ome.tif", ome=True) as tiff:
        options = {"photometric": "minisblack"}
        tiff.write(data, subifds=1, metadata={"axes": "ZYX", "PhysicalSizeX": 0.1}, **options)
        tiff.write(data[:, ::2, ::2], subfiletype=1, **options)
    image, meta = io.imread(tmp_path / "pyramid.ome.tif")
    lazy, _ = io.imread(tmp_path / "pyramid.ome.tif", lazy=True)
    np.testing.assert_array_equal(image, data)
    np.testing.assert_array_equal(lazy.compute(), data)
    assert meta["spacing"] == (1.0, 1.0, 0.1) and meta["spacing_known"] is False


def test_imagej_hyperstack_and_unnamed_axes(tmp_path):
    data = np.random.default_rng(1).integers(0, 999, (2, 3, 2, 5, 6)).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "hyper.tif",
        data,
        imagej=True,
        resolution=(1 / 65.0, 1 / 65.0),
        metadata={"axes": "TZCYX", "spacing": 300.0, "unit": "nm"},
    )
    image, meta = io.imread(tmp_path / "hyper.tif")
    np.testing.assert_array_equal(image, data)
    assert meta["axes"] == "TZCYX" and meta["unit"] == "um"
    np.testing.assert_allclose(meta["spacing"], (1.0, 0.3, 1.0, 0.065, 0.065), rtol=1e-6)
    assert meta["frames"] == 2 and meta["slices"] == 3 and meta["channels"] == 2
    # tifffile's unnamed axes ("Q", "I") and colour samples ("S")
    tifffile.imwrite(tmp_path / "q4.tif", data[:, :, 0], photometric="minisblack")
    assert io.imread(tmp_path / "q4.tif")[1]["axes"] == "TZYX"
    rgb = np.zeros((5, 6, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    image, meta = io.imread(tmp_path / "rgb.tif")
    assert image.shape == (5, 6, 3) and meta["axes"] == "YXC"


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_hand_written_ome_zarr(tmp_path, version):
    import dask.array as da
    import zarr

    full = np.random.default_rng(2).random((2, 4, 16, 12)).astype(np.float32)
    path = tmp_path / "hand.ome.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=2 if version == "0.4" else 3)
    group.create_array("s0", shape=full.shape, chunks=(1, 2, 8, 12), dtype="float32")[...] = full
    group.create_array("s1", shape=(2, 4, 8, 6), chunks=(1, 4, 8, 6), dtype="float32")[...] = 0
    multiscales = [
        {
            "version": version,
            "axes": [
                {"name": "c", "type": "channel"},
                {"name": "z", "type": "space", "unit": "micrometer"},
                {"name": "y", "type": "space", "unit": "nanometer"},
                {"name": "x", "type": "space", "unit": "nanometer"},
            ],
            "datasets": [
                {"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 65, 65]}]},
                {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 130, 130]}]},
            ],
            "coordinateTransformations": [{"type": "scale", "scale": [1, 2, 1, 1]}],
        }
    ]
    omero = {"channels": [{"label": "actin", "color": "00FF00"}, {"label": "dna", "color": "0000FF"}]}
    if version == "0.4":
        group.attrs.update({"multiscales": multiscales, "omero": omero})
    else:
        for entry in multiscales:
            entry.pop("version")
        group.attrs.update({"ome": {"version": "0.5", "multiscales": multiscales, "omero": omero}})
    image, meta = io.imread(path)
    np.testing.assert_array_equal(image, full)
    assert meta["axes"] == "CZYX" and meta["spacing_known"] is True
    np.testing.assert_allclose(meta["spacing"], (1.0, 1.0, 0.065, 0.065), rtol=1e-12)
    assert meta["channel_names"] == ["actin", "dna"] and "provenance" not in meta
    lazy, lazy_meta = io.imread(path, lazy=True)
    assert lazy.chunks == ((1, 1), (2, 2), (8, 8), (12,))  # the stored chunks
    np.testing.assert_array_equal(lazy.compute(), full)
    _same_meta(lazy_meta, meta)
    assert isinstance(lazy, da.Array)


def test_plain_zarr_arrays(tmp_path):
    import zarr

    data = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    plain = zarr.create_array(tmp_path / "plain.zarr", shape=data.shape, dtype="uint16", chunks=(1, 4, 5))
    plain[...] = data
    image, meta = io.imread(tmp_path / "plain.zarr")
    np.testing.assert_array_equal(image, data)
    assert meta["axes"] == "ZYX" and meta["spacing_known"] is False
    plain.attrs["microdecon"] = {"axes": "CYX", "spacing": [1.0, 0.2, 0.2], "channel_names": ["a", "b", "c"]}
    image, meta = io.imread(tmp_path / "plain.zarr", lazy=True)
    assert meta["axes"] == "CYX" and meta["spacing"] == (1.0, 0.2, 0.2) and meta["spacing_known"]
    assert meta["channel_names"] == ["a", "b", "c"] and image.chunksize == (1, 4, 5)


def test_not_a_zarr_store(tmp_path):
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ValueError, match="empty.zarr: not a readable Zarr"):
        io.imread(tmp_path / "empty.zarr")
    with pytest.raises(FileNotFoundError, match="gone.zarr"):
        io.imread(tmp_path / "gone.zarr", lazy=True)


# --------------------------------------------------------------------------------------------
# Lazy reading
# --------------------------------------------------------------------------------------------
def _open_handles(path):
    target = os.path.realpath(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass
    return count


def test_lazy_read_reads_nothing_until_compute(tmp_path):
    import zarr

    data = np.ones((4, 16, 16), np.float32)
    io.imwrite(tmp_path / "a.tif", data)
    io.imwrite(tmp_path / "a.zarr", data)
    lazy_tif, _ = io.imread(tmp_path / "a.tif", lazy=True)
    lazy_zarr, _ = io.imread(tmp_path / "a.zarr", lazy=True)
    assert lazy_tif.chunksize == (1, 16, 16) and lazy_tif.numblocks == (4, 1, 1)
    # change the pixels in place after the read: the lazy arrays see the new values
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        offset = tif.series[0].dataoffset
    pixels = np.memmap(tmp_path / "a.tif", np.float32, "r+", offset=offset, shape=data.shape)
    pixels[2] = 5.0
    pixels.flush()
    del pixels
    zarr.open_group(tmp_path / "a.zarr", mode="r+")["0"][1] = 3.0
    expected = data.copy()
    expected[2] = 5.0
    np.testing.assert_array_equal(lazy_tif.compute(), expected)
    expected = data.copy()
    expected[1] = 3.0
    np.testing.assert_array_equal(lazy_zarr.compute(), expected)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_lazy_tiff_holds_no_file_open_and_refuses_a_replaced_file(tmp_path):
    path = tmp_path / "live.tif"
    old = np.random.default_rng(3).random((3, 8, 8)).astype(np.float32)
    io.imwrite(path, old, {"spacing": (0.3, 0.1, 0.1)})
    lazy, meta = io.imread(path, lazy=True)
    assert _open_handles(path) == 0  # each block opens the file by its path when computed
    # the lazy array written back to its own file: read while the new file is written aside
    io.imwrite(path, lazy * 2, meta)
    np.testing.assert_array_equal(io.imread(path)[0], old * 2)
    assert sorted(os.listdir(tmp_path)) == ["live.tif"] and _open_handles(path) == 0
    # no open file pins the old contents: the array refuses the file that replaced its own
    with pytest.raises(ValueError, match="live.tif: the file was replaced"):
        lazy.compute()
    io.imwrite(path, np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="live.tif: the file was replaced"):
        (lazy[1] + 1).compute()
    again, _ = io.imread(path, lazy=True)
    np.testing.assert_array_equal(again.compute(), 0)
    assert _open_handles(path) == 0


def _planes_file(path, compression=None):
    data = np.random.default_rng(9).random((200, 64, 64)).astype(np.float32)
    if compression is None:
        io.imwrite(path, data)  # contiguous, as microdecon writes
    else:
        tifffile.imwrite(path, data, compression=compression, photometric="minisblack")
    return data


def _tiled_file(path):
    data = np.random.default_rng(10).random((2, 700, 600)).astype(np.float32)
    tifffile.imwrite(path, data, tile=(64, 64), compression="zlib", photometric="minisblack")
    return data


def test_lazy_tiff_pickles(tmp_path):
    import pickle

    files = {
        "raw.tif": _planes_file(tmp_path / "raw.tif"),
        "zlib.tif": _planes_file(tmp_path / "zlib.tif", "zlib"),
        "tiled.tif": _tiled_file(tmp_path / "tiled.tif"),
    }
    for name, data in files.items():
        lazy, _ = io.imread(tmp_path / name, lazy=True)
        copy = pickle.loads(pickle.dumps(lazy))
        assert copy.name == lazy.name and copy.chunks == lazy.chunks
        np.testing.assert_array_equal(copy.compute(), data)
        np.testing.assert_array_equal(copy[5:1:-2, 60:70, ::3].compute(), data[5:1:-2, 60:70, ::3])


def test_lazy_tiff_computes_on_a_distributed_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")

    files = {
        "raw.tif": _planes_file(tmp_path / "raw.tif"),
        "zlib.tif": _planes_file(tmp_path / "zlib.tif", "zlib"),
        "tiled.tif": _tiled_file(tmp_path / "tiled.tif"),
    }
    lazy = [io.imread(tmp_path / name, lazy=True)[0] for name in files]
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    )
    with cluster, distributed.Client(cluster) as client:
        computed = client.compute([a.sum(axis=0) for a in lazy] + lazy, sync=True)
        assert len(client.run(os.getpid)) == 2  # two worker processes besides this one
    for data, total, array in zip(files.values(), computed, computed[len(lazy) :]):
        np.testing.assert_array_equal(array, data)
        np.testing.assert_allclose(total, data.sum(axis=0), rtol=1e-5)


def test_tiled_tiff_reads_in_blocks_of_whole_tiles(tmp_path):
    data = _tiled_file(tmp_path / "tiled.tif")
    lazy, meta = io.imread(tmp_path / "tiled.tif", lazy=True)
    assert meta["axes"] == "ZYX"
    # about 1 MiB of float32 tiles per block: 8 x 8 tiles of 64 x 64, the last ones cut by the edge
    assert lazy.chunks == ((1, 1), (512, 188), (512, 88))
    for axis in (1, 2):
        edges = np.cumsum(lazy.chunks[axis])[:-1]
        assert all(edge % 64 == 0 for edge in edges)
    np.testing.assert_array_equal(lazy.compute(), io.imread(tmp_path / "tiled.tif")[0])
    np.testing.assert_array_equal(lazy.blocks[1, 1, 0].compute(), data[1:, 512:, :512])
    np.testing.assert_array_equal(lazy[1, 100:130, 590:].compute(), data[1, 100:130, 590:])


def _bytes_read():
    with open("/proc/self/io") as stats:
        return next(int(line.split()[1]) for line in stats if line.startswith("rchar"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc")
@pytest.mark.parametrize("kind", ["raw", "zlib", "tiled"])
def test_a_lazy_block_reads_only_its_own_bytes(tmp_path, kind):
    import dask

    path = tmp_path / f"{kind}.tif"
    data = _tiled_file(path) if kind == "tiled" else _planes_file(path, None if kind == "raw" else "zlib")
    lazy, _ = io.imread(path, lazy=True)
    block = (1, 1, 1) if kind == "tiled" else (100, 0, 0)
    with dask.config.set(scheduler="synchronous"):  # reads in this process, where they are counted
        lazy.blocks[0, 0, 0].compute()  # modules imported on first use are read before counting
        before = _bytes_read()
        values = lazy.blocks[block].compute()
        read = _bytes_read() - before
    np.testing.assert_array_equal(values, data[_block_slices(lazy, block)])
    size = path.stat().st_size
    # one plane of 200 (16 KiB), or the 3 x 2 tiles (16 KiB each) under a 188 x 88 corner block;
    # 64 KiB more for the TIFF header and the page's tags
    limit = (1 if kind != "tiled" else 6) * 64 * 64 * 4 + 64 * 2**10
    assert read < limit < size / 10, (read, size)


def _block_slices(array, block):
    starts = [sum(chunks[:i]) for chunks, i in zip(array.chunks, block)]
    return tuple(slice(s, s + chunks[i]) for s, chunks, i in zip(starts, array.chunks, block))


def test_lazy_read_still_refuses_truncated_files(tmp_path):
    good = tmp_path / "good.tif"
    io.imwrite(good, np.ones((8, 64, 64), np.float32))
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.tif: not a readable TIFF .*truncated"):
        io.imread(truncated, lazy=True)


# --------------------------------------------------------------------------------------------
# Writing Dask arrays
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", FORMATS)
def test_dask_array_is_written_block_by_block(tmp_path, ext, monkeypatch):
    import dask.array as da

    values = np.random.default_rng(4).random((8, 256, 256)).astype(np.float32)
    lazy = da.from_array(values, chunks=(8, 64, 64)) * 2.0
    expected = lazy.compute()

    def refuse(*args, **kwargs):
        raise AssertionError("the whole volume was materialized")

    monkeypatch.setattr(da.Array, "__array__", refuse)
    monkeypatch.setattr(da.Array, "compute", refuse)
    path = tmp_path / f"big{ext}"
    io.imwrite(path, lazy, {"spacing": (0.3, 0.1, 0.1), "provenance": {"lazy": True}})
    monkeypatch.undo()
    back, meta = io.imread(path)
    np.testing.assert_array_equal(back, expected)
    np.testing.assert_allclose(meta["spacing"], (0.3, 0.1, 0.1), rtol=1e-6)
    assert meta["provenance"] == {"lazy": True}
    if ext == ".zarr":
        import zarr

        group = zarr.open_group(path, mode="r")
        assert group["0"].chunks == (8, 64, 64)  # the Dask chunks become the Zarr chunks
        window = group.attrs["omero"]["channels"][0]["window"]
        assert (window["min"], window["max"]) == (float(expected.min()), float(expected.max()))
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("ext", FORMATS)
def test_irregular_dask_chunks_and_transposed_axes(tmp_path, ext):
    import dask.array as da

    values = np.random.default_rng(5).random((3, 10, 12, 2)).astype(np.float32)
    lazy = da.from_array(values, chunks=((1, 2), (3, 7), (12,), (1, 1)))
    path = tmp_path / f"odd{ext}"
    io.imwrite(path, lazy, {"axes": "ZYXC", "channel_names": ["a", "b"]})
    back, meta = io.imread(path)
    np.testing.assert_array_equal(back, values)
    assert meta["axes"] == "ZYXC" and meta["channel_names"] == ["a", "b"]


def _failing(shape, chunks):
    import dask.array as da

    def block(x, block_info=None):
        if block_info[None]["chunk-location"] == (1, 1, 1):
            raise RuntimeError("GPU fell over")
        return x

    return da.ones(shape, np.float32, chunks=chunks).map_blocks(block, dtype=np.float32)


@pytest.mark.parametrize("ext", FORMATS)
def test_failure_inside_dask_leaves_nothing_and_keeps_the_old_file(tmp_path, ext):
    path = tmp_path / f"out{ext}"
    with pytest.raises(RuntimeError, match="GPU fell over"):
        io.imwrite(path, _failing((4, 32, 32), (2, 16, 16)))
    assert os.listdir(tmp_path) == []
    io.imwrite(path, np.full((2, 3, 3), 7, np.float32))
    with pytest.raises(RuntimeError, match="GPU fell over"):
        io.imwrite(path, _failing((4, 32, 32), (2, 16, 16)), dtype="uint16")
    with pytest.raises(RuntimeError, match="GPU fell over"):
        io.imwrite(path, _failing((4, 32, 32), (2, 16, 16)))
    assert os.listdir(tmp_path) == [path.name]
    np.testing.assert_array_equal(io.imread(path)[0], 7)


def test_zarr_is_replaced_whole_and_only_a_zarr_store_is_replaced(tmp_path):
    path = tmp_path / "r.zarr"
    io.imwrite(path, np.ones((2, 64, 64), np.float32))
    io.imwrite(path, np.zeros((3, 5), np.uint16))
    back, meta = io.imread(path)
    assert back.shape == (3, 5) and back.dtype == np.uint16 and meta["axes"] == "YX"
    assert sorted(os.listdir(tmp_path)) == ["r.zarr"]
    assert sorted(os.listdir(path)) == [".zattrs", ".zgroup", "0"]
    folder = tmp_path / "notes.zarr"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.zarr: exists and is not a Zarr store"):
        io.imwrite(folder, np.ones((3, 3), np.float32))
    path.rename(tmp_path / "r.zarr.tif")
    with pytest.raises(ValueError, match="r.zarr.tif: is a directory"):
        io.imwrite(tmp_path / "r.zarr.tif", np.ones((3, 3), np.float32))
    assert (folder / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["notes.zarr", "r.zarr.tif"]


def test_reads_provenance_of_files_written_before_the_record(tmp_path):
    tifffile.imwrite(
        tmp_path / "old.tif",
        np.zeros((2, 3, 4), np.float32),
        imagej=True,
        metadata={"axes": "ZYX", "Info": json.dumps({"method": "rl", "num_iter": 3})},
    )
    tifffile.imwrite(
        tmp_path / "text.tif", np.zeros((3, 4), np.float32), imagej=True, metadata={"Info": "hi"}
    )
    assert io.imread(tmp_path / "old.tif")[1]["provenance"] == {"method": "rl", "num_iter": 3}
    meta = io.imread(tmp_path / "text.tif")[1]
    assert meta["info"] == "hi" and "provenance" not in meta


# --------------------------------------------------------------------------------------------
# uint16 storage, errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("low", [0.0, -3.0])
@pytest.mark.parametrize("lazy", [False, True])
def test_uint16_uses_the_full_range_and_recovers_the_values(tmp_path, ext, low, lazy):
    import dask.array as da

    values = (low + 50.0 * np.random.default_rng(6).random((3, 20, 24))).astype(np.float32)
    values[0, 0, 0] = max(low, 0.0)  # a zero in non-negative data keeps the offset at 0
    data = da.from_array(values, chunks=(1, 10, 24)) if lazy else values
    path = tmp_path / f"q{ext}"
    io.imwrite(path, data, {"spacing": (0.3, 0.1, 0.1)}, dtype="uint16")
    stored, meta = io.imread(path)
    assert stored.dtype == np.uint16 and stored.max() == 65535 and stored.min() == 0
    offset = min(0.0, float(values.min()))
    scale = (float(values.max()) - offset) / 65535
    assert meta["offset"] == offset and meta["scale"] == pytest.approx(scale, rel=1e-12)
    recovered = stored * meta["scale"] + meta["offset"]
    assert np.abs(recovered - values.astype(np.float64)).max() <= meta["scale"] / 2 * (1 + 1e-9)
    assert io.imread(path, lazy=True)[1]["scale"] == meta["scale"]
    # the stored integers and their scale travel on together; floats written from them do not
    io.imwrite(tmp_path / f"copy{ext}", stored, meta)
    copy, copy_meta = io.imread(tmp_path / f"copy{ext}")
    np.testing.assert_array_equal(copy, stored)
    assert (copy_meta["scale"], copy_meta["offset"]) == (meta["scale"], meta["offset"])
    io.imwrite(tmp_path / f"float{ext}", recovered, meta)
    assert "scale" not in io.imread(tmp_path / f"float{ext}")[1]


def test_uint16_refuses_nan_and_bad_dtypes_and_extensions(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        io.imwrite(tmp_path / "n.tif", np.array([[np.nan, 1.0]]), dtype="uint16")
    for dtype in ("float64", "uint8", "int32", "nonsense", None):
        with pytest.raises(ValueError, match="dtype must be 'float32' or 'uint16'"):
            io.imwrite(tmp_path / "d.tif", np.ones((3, 3)), dtype=dtype)
    for name in ("image.png", "image.npy", "image"):
        with pytest.raises(ValueError, match=rf"{name}: unsupported extension; use .*\.ome\.tif.*\.zarr"):
            io.imwrite(tmp_path / name, np.ones((3, 3)))
    io.imwrite(tmp_path / "upper.TIFF", np.full((3, 3), 200, np.uint8), dtype="uint16")
    back, meta = io.imread(tmp_path / "upper.TIFF")
    assert back.dtype == np.uint16 and back.max() == 200 and "scale" not in meta  # not rescaled
    assert os.listdir(tmp_path) == ["upper.TIFF"]


@pytest.mark.gpu
def test_cupy_arrays_are_written_from_the_host(tmp_path):
    from microdecon._backend import gpu_available

    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    import cupy

    data = np.random.default_rng(7).random((3, 8, 8)).astype(np.float32)
    for ext in FORMATS:
        io.imwrite(tmp_path / f"g{ext}", cupy.asarray(data))
        np.testing.assert_array_equal(io.imread(tmp_path / f"g{ext}")[0], data)
