import os

import numpy as np
import pytest

import microdecon as md
from microdecon import io
from microdecon.cli import _model_shape, main

SPACING = (0.2, 0.1, 0.1)
FAST = ["--num-iter", "2", "--device", "cpu"]


def test_demo_writes_the_result_and_reports_quality(tmp_path, capsys):
    assert main(["demo", "-q", "--num-iter", "10", "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "PSNR against ground truth" in printed
    before, after = (float(v) for v in printed.split("truth ")[1].split(" dB;")[0].split(" dB -> "))
    assert after > before + 1.5
    restored, meta = io.imread(tmp_path / "phantom_deconvolved.tif")
    assert restored.dtype == np.float32 and meta["provenance"]["method"] == "rl"
    assert meta["spacing"] == md.data.sample().spacing


def test_deconvolve_goes_on_after_a_bad_file_and_fails_overall(tmp_path, capsys):
    sample = md.data.sample()
    good = tmp_path / "good.tif"
    io.imwrite(good, sample.image[:8], {"spacing": sample.spacing})
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    out = tmp_path / "out"
    code = main(
        [
            "deconvolve",
            str(bad),
            str(good),
            "--psf",
            str(sample.paths["psf"]),
            "-o",
            str(out),
            "--num-iter",
            "3",
            "--background",
            "100",
            "-q",
            "--device",
            "cpu",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "bad.tif" in captured.err and "not a readable TIFF" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["good_decon.tif"]
    # a second run skips what is done (and says so when not quiet)
    code = main(
        ["deconvolve", str(good), "--psf", str(sample.paths["psf"]), "-o", str(out), "--device", "cpu"]
    )
    assert code == 0 and "skipped" in capsys.readouterr().out


def test_bad_flags_exit_nonzero(tmp_path, capsys):
    code = main(["demo", "-q", "--num-iter", "-3", "-o", str(tmp_path)])
    assert code == 2 and "num_iter must be >= 0" in capsys.readouterr().err


def test_psf_command_writes_models_and_bead_psfs(tmp_path, capsys):
    model = tmp_path / "wf.tif"
    assert (
        main(
            [
                "psf",
                "-o",
                str(model),
                "--shape",
                "17",
                "33",
                "33",
                "--spacing",
                "0.2",
                "0.1",
                "0.1",
                "--na",
                "1.2",
                "--n-immersion",
                "1.33",
            ]
        )
        == 0
    )
    psf, meta = io.imread(model)
    assert (
        psf.shape == (17, 33, 33) and abs(float(psf.sum()) - 1) < 1e-4 and meta["spacing"] == (0.2, 0.1, 0.1)
    )
    assert meta["provenance"]["psf"] == "model widefield"
    gauss = tmp_path / "g.tif"
    assert (
        main(
            [
                "psf",
                "-o",
                str(gauss),
                "--model",
                "gaussian",
                "--shape",
                "9",
                "15",
                "15",
                "--spacing",
                "0.3",
                "0.1",
                "0.1",
                "--sigma",
                "0.6",
                "0.2",
                "0.2",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(io.imread(gauss)[0], md.psf.gaussian((9, 15, 15), 2.0), rtol=1e-5)
    # from a bead stack written with its voxel size, resampled to another
    rng = np.random.default_rng(0)
    stack = np.zeros((24, 96, 96))
    for y, x in ((24, 24), (24, 72), (72, 24), (72, 72)):
        stack[12, y, x] = 5000
    stack = rng.poisson(
        md.convolve(stack, md.psf.gaussian((11, 15, 15), (1.5, 1.5, 1.5)), device="cpu").clip(0) + 50
    )
    beads = tmp_path / "beads.tif"
    io.imwrite(beads, stack.astype(np.uint16), {"spacing": (0.2, 0.1, 0.1)})
    out = tmp_path / "measured.tif"
    assert (
        main(
            [
                "psf",
                "-o",
                str(out),
                "--from-beads",
                str(beads),
                "--size",
                "11",
                "21",
                "21",
                "--spacing",
                "0.2",
                "0.2",
                "0.2",
            ]
        )
        == 0
    )
    measured, meta = io.imread(out)
    assert meta["spacing"] == (0.2, 0.2, 0.2) and measured.shape == (11, 11, 11)
    assert meta["provenance"]["psf"].startswith("4 beads")


def test_psf_command_refuses_impossible_optics_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bad.tif"
    assert (
        main(
            ["psf", "-o", str(out), "--shape", "9", "9", "9", "--spacing", "0.2", "0.1", "0.1", "--na", "1.6"]
        )
        == 2
    )
    assert "na (1.6) must be smaller than n_immersion" in capsys.readouterr().err
    assert not out.exists()


def test_every_method_runs_from_the_command_with_its_own_flags(tmp_path, capsys, monkeypatch):
    from microdecon.restore import METHODS

    calls = []

    def spy(image, psf, method, device, **params):
        calls.append((method, params))
        return np.zeros(image.shape, np.float32)

    monkeypatch.setattr("microdecon.cli.deconvolve", spy)
    for method in METHODS:
        assert main(["demo", "-q", "--method", method, "-o", str(tmp_path / method)]) == 0
    seen = dict(calls)
    assert set(seen) == set(METHODS)
    assert seen["wiener"]["balance"] == "auto" and "num_iter" not in seen["wiener"]
    assert "progress" in seen["rl-tv"] and "progress" not in seen["inverse"]
    assert main(["demo", "-q", "--method", "rl", "--tv", "0.01", "--tol", "1e-3", "-o", str(tmp_path)]) == 0
    assert calls[-1][1]["tv"] == 0.01 and calls[-1][1]["tol"] == 1e-3
    for flag, value in (("conjugate-gradient", "conjugate-gradient"), ("none", False)):
        assert main(["demo", "-q", "--method", "rl", "--accelerate", flag, "-o", str(tmp_path)]) == 0
        assert calls[-1][1]["accelerate"] == value
    capsys.readouterr()
    assert main(["demo", "-q", "--method", "wiener", "--accelerate", "none", "-o", str(tmp_path)]) == 2
    assert "--accelerate does not apply to --method wiener" in capsys.readouterr().err
    assert (
        main(["demo", "-q", "--method", "rl-tv", "--accelerate", "conjugate-gradient", "-o", str(tmp_path)])
        == 2
    )
    assert "does not combine with total variation" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["demo", "-q", "--method", "wiener", "--num-iter", "5", "-o", str(tmp_path)]) == 2
    assert "--num-iter does not apply to --method wiener" in capsys.readouterr().err
    assert main(["demo", "-q", "--method", "inverse", "--tv", "0.01", "-o", str(tmp_path)]) == 2


# --------------------------------------------------------------------------------------------
# deconvolve: inputs, PSF sources, voxel sizes, bad input
# --------------------------------------------------------------------------------------------
def stack(seed=0, shape=(8, 32, 32)):
    """A small blurred, noisy stack (uint16) and the PSF that blurred it."""
    psf = md.psf.gaussian((7, 9, 9), (0.3, 0.15, 0.15), spacing=SPACING)
    truth = md.data.phantom(shape, seed=seed)
    blurred = md.convolve(truth, psf, device="cpu")
    image = np.random.default_rng(seed).poisson(np.clip(blurred, 0, None) + 10).astype(np.uint16)
    return image, psf


@pytest.fixture
def psf_file(tmp_path):
    path = tmp_path / "psf.tif"
    io.imwrite(path, stack()[1], {"spacing": SPACING})
    return path


def write(path, image, spacing=SPACING):
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imwrite(path, image, {"spacing": spacing} if spacing else None)
    return path


def files_in(folder):
    """Every file left under ``folder``, hidden temporaries included."""
    return (
        sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if folder.exists()
        else []
    )


def failed_lines(err):
    return [line for line in err.splitlines() if "FAILED" in line]


def assert_one_file_failed(code, err, name, cause, out):
    """Exit code 1, one FAILED line naming the file and the cause, and nothing written."""
    assert code == 1
    lines = failed_lines(err)
    assert len(lines) == 1, err
    assert name in lines[0] and cause in lines[0], lines[0]
    assert "1 of 1 file(s) failed" in err
    assert files_in(out) == []


def test_missing_input_file(tmp_path, psf_file, capsys):
    out = tmp_path / "out"
    code = main(["deconvolve", str(tmp_path / "nope.tif"), "--psf", str(psf_file), "-o", str(out), "-q"])
    assert_one_file_failed(code, capsys.readouterr().err, "nope.tif", "no such file or folder", out)


def test_a_text_file_named_tif(tmp_path, psf_file, capsys):
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    out = tmp_path / "out"
    code = main(["deconvolve", str(text), "--psf", str(psf_file), "-o", str(out), "-q", *FAST])
    assert_one_file_failed(code, capsys.readouterr().err, "notes.tif", "not a readable TIFF", out)


def test_a_truncated_tiff(tmp_path, psf_file, capsys):
    cut = write(tmp_path / "cut.tif", stack()[0])
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    code = main(["deconvolve", str(cut), "--psf", str(psf_file), "-o", str(out), "-q", *FAST])
    assert_one_file_failed(code, capsys.readouterr().err, "cut.tif", "truncated", out)


def test_a_psf_with_other_axes_than_the_image(tmp_path, psf_file, capsys):
    flat = write(tmp_path / "flat.tif", stack()[0][4], spacing=SPACING[1:])
    out = tmp_path / "out"
    code = main(["deconvolve", str(flat), "--psf", str(psf_file), "-o", str(out), "-q", *FAST])
    err = capsys.readouterr().err
    assert_one_file_failed(code, err, "flat.tif", "has shape 7x9x9 but the image has shape 32x32", out)


def test_unknown_voxel_size_against_a_known_one(tmp_path, psf_file, capsys):
    image = write(tmp_path / "bare.tif", stack()[0], spacing=None)
    out = tmp_path / "out"
    code = main(["deconvolve", str(image), "--psf", str(psf_file), "-o", str(out), "-q", *FAST])
    err = capsys.readouterr().err
    assert_one_file_failed(code, err, "bare.tif", "no voxel size in its metadata", out)
    assert "give it with --spacing" in failed_lines(err)[0]
    # --spacing supplies it, and the output records it
    code = main(
        [
            "deconvolve",
            str(image),
            "--psf",
            str(psf_file),
            "-o",
            str(out),
            "-q",
            *FAST,
            "--spacing",
            "0.2",
            "0.1",
            "0.1",
        ]
    )
    assert code == 0
    assert io.imread(out / "bare_decon.tif")[1]["spacing"] == SPACING
    # and a PSF file without one, against an image with one
    bare_psf = write(tmp_path / "bare_psf.tif", stack()[1], spacing=None)
    good = write(tmp_path / "good.tif", stack()[0])
    out2 = tmp_path / "out2"
    code = main(["deconvolve", str(good), "--psf", str(bare_psf), "-o", str(out2), "-q", *FAST])
    err = capsys.readouterr().err
    assert_one_file_failed(code, err, "good.tif", "records none", out2)
    assert "--psf-spacing" in failed_lines(err)[0]
    assert (
        main(
            [
                "deconvolve",
                str(good),
                "--psf",
                str(bare_psf),
                "-o",
                str(out2),
                "-q",
                *FAST,
                "--psf-spacing",
                *map(str, SPACING),
            ]
        )
        == 0
    )


def test_both_voxel_sizes_unknown_are_assumed_equal_with_one_warning(tmp_path, capsys):
    image, psf = stack()
    a = write(tmp_path / "a.tif", image, spacing=None)
    b = write(tmp_path / "b.tif", image, spacing=None)
    psf_path = write(tmp_path / "p.tif", psf, spacing=None)
    out = tmp_path / "out"
    assert main(["deconvolve", str(a), str(b), "--psf", str(psf_path), "-o", str(out), "-q", *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "assuming they are the same" in err
    assert files_in(out) == ["a_decon.tif", "b_decon.tif"]


def test_an_output_folder_that_cannot_be_made(tmp_path, psf_file, capsys):
    image = write(tmp_path / "a.tif", stack()[0])
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    code = main(["deconvolve", str(image), "--psf", str(psf_file), "-o", str(blocker / "out"), "-q", *FAST])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"cannot write to the output folder {blocker / 'out'}" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_an_output_folder_that_cannot_be_written(tmp_path, psf_file, capsys):
    image = write(tmp_path / "a.tif", stack()[0])
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        code = main(["deconvolve", str(image), "--psf", str(psf_file), "-o", str(out), "-q", *FAST])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert f"cannot write to the output folder {out}" in err and "Permission denied" in err
        assert files_in(out) == []
    finally:
        out.chmod(0o700)


def test_one_bad_file_does_not_stop_the_good_ones(tmp_path, psf_file, capsys):
    image, psf = stack()
    first = write(tmp_path / "in" / "a.tif", image)
    (tmp_path / "in" / "b.tif").write_bytes(b"II*\0garbage")
    last = write(tmp_path / "in" / "c.tif", stack(seed=1)[0])
    out = tmp_path / "out"
    code = main(["deconvolve", str(tmp_path / "in"), "--psf", str(psf_file), "-o", str(out), "-q", *FAST])
    err = capsys.readouterr().err
    assert code == 1
    assert len(failed_lines(err)) == 1 and "b.tif" in failed_lines(err)[0]
    assert (
        "1 of 3 file(s) failed" in err
        and "  " + str(tmp_path / "in" / "b.tif") + ": not a readable TIFF" in err
    )
    assert files_in(out) == ["a_decon.tif", "c_decon.tif"]
    for path in (first, last):
        expected = md.deconvolve(io.imread(path)[0], psf, "rl", num_iter=2, device="cpu", background=0.0)
        np.testing.assert_allclose(io.imread(out / f"{path.stem}_decon.tif")[0], expected, rtol=1e-5)


def test_folders_patterns_and_files_expand_sorted_without_duplicates(tmp_path, psf_file, capsys):
    image = stack()[0]
    data = tmp_path / "data"
    for name in ("b.tif", "a.TIFF", "sub/c.tif", "sub/deeper/d.tif", "._a.tif"):
        write(data / name, image)
    (data / "notes.txt").write_text("not data")
    out = tmp_path / "out"
    argv = [
        "deconvolve",
        str(data),
        str(data / "*.tif"),
        str(data / "b.tif"),
        "--psf",
        str(psf_file),
        "-o",
        str(out),
        *FAST,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert files_in(out) == ["a_decon.tif", "b_decon.tif"]
    lines = [line for line in printed.splitlines() if " -> " in line]
    assert [line.split(" -> ")[0] for line in lines] == [str(data / "a.TIFF"), str(data / "b.tif")]
    assert (
        "8x32x32 uint16, rl," in lines[0]
        and " s on cpu (" in lines[0]
        and str(out / "a_decon.tif") in lines[0]
    )
    # --recursive: subfolders too, mirrored under the output folder; a pattern's ** spans folders
    assert main([*argv, "--recursive", "-q"]) == 0
    assert files_in(out) == ["a_decon.tif", "b_decon.tif", "sub/c_decon.tif", "sub/deeper/d_decon.tif"]
    out2 = tmp_path / "out2"
    assert (
        main(
            [
                "deconvolve",
                str(data / "**" / "d.tif"),
                "--psf",
                str(psf_file),
                "-o",
                str(out2),
                "-q",
                *FAST,
                "--recursive",
            ]
        )
        == 0
    )
    assert files_in(out2) == ["d_decon.tif"]


def test_inputs_that_name_nothing_fail_alone(tmp_path, psf_file, capsys):
    good = write(tmp_path / "good.tif", stack()[0])
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    argv = [str(good), str(empty), str(tmp_path / "*.tiff"), str(tmp_path / "gone")]
    code = main(["deconvolve", *argv, "--psf", str(psf_file), "-o", str(out), "-q", *FAST])
    err = capsys.readouterr().err
    assert code == 1 and files_in(out) == ["good_decon.tif"]
    assert "3 of 4 file(s) failed" in err
    causes = {line.split(": FAILED: ")[0]: line.split(": FAILED: ")[1] for line in failed_lines(err)}
    assert causes == {
        str(empty): "no .tif or .tiff files in this folder (--recursive also searches its subfolders)",
        str(tmp_path / "*.tiff"): "the pattern matches no files",
        str(tmp_path / "gone"): "no such file or folder",
    }


def test_quiet_prints_nothing_but_errors_and_progress_shows_otherwise(tmp_path, psf_file, capsys):
    image = write(tmp_path / "a.tif", stack()[0])
    out = tmp_path / "out"
    assert main(["deconvolve", str(image), "--psf", str(psf_file), "-o", str(out), "-q", *FAST]) == 0
    assert capsys.readouterr() == ("", "")
    assert main(["deconvolve", str(image), "--psf", str(psf_file), "-o", str(out), "--overwrite", *FAST]) == 0
    captured = capsys.readouterr()
    assert "files: 100%" in captured.err  # the bar over the files
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"PSF: {psf_file} (7x9x9, voxel 0.2x0.1x0.1 um); rl on cpu")
    assert lines[1].startswith(f"{image} -> {out / 'a_decon.tif'}: 8x32x32 uint16, rl, ")
    assert lines[-1] == "1 written, 0 skipped, 0 failed, of 1 file(s)"


def test_a_psf_at_another_voxel_size_is_resampled_to_the_image(tmp_path, capsys):
    image, _ = stack()
    fine = md.psf.gaussian((13, 17, 17), (0.3, 0.15, 0.15), spacing=(0.1, 0.05, 0.05))
    psf_path = write(tmp_path / "fine.tif", fine, spacing=(0.1, 0.05, 0.05))
    path = write(tmp_path / "a.tif", image)
    out = tmp_path / "out"
    assert main(["deconvolve", str(path), "--psf", str(psf_path), "-o", str(out), *FAST]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
    assert line.endswith("; PSF resampled from 0.1x0.05x0.05 um to 0.2x0.1x0.1 um")
    restored, meta = io.imread(out / "a_decon.tif")
    resampled = md.psf.resample(fine, (0.1, 0.05, 0.05), SPACING)
    expected = md.deconvolve(image, resampled, "rl", num_iter=2, device="cpu", background=0.0)
    np.testing.assert_allclose(restored, expected, rtol=1e-5)
    assert "resampled" in meta["provenance"]["psf"] and meta["provenance"]["device"].startswith("cpu")


def test_model_psf_is_computed_at_the_image_voxel_size(tmp_path, capsys):
    image, _ = stack()
    path = write(tmp_path / "a.tif", image)
    out = tmp_path / "out"
    optics = ["--na", "1.2", "--n-immersion", "1.33", "--wavelength", "0.52"]
    assert (
        main(["deconvolve", str(path), "--psf-model", "widefield", *optics, "-o", str(out), "-q", *FAST]) == 0
    )
    restored, meta = io.imread(out / "a_decon.tif")
    # the shape rule: z spans the stack but at least +-2 axial FWHM (0.605 um: 7 planes of 0.2 um);
    # y, x reach the defocus cone at z = 1.4 um (2.9 um), capped at the image (32 -> 33)
    shape = (15, 33, 33)
    assert meta["provenance"]["psf"] == "PSF model widefield 15x33x33 at 0.2x0.1x0.1 um"
    model = md.psf.widefield(shape, SPACING, wavelength=0.52, na=1.2, n_immersion=1.33)
    expected = md.deconvolve(image, model, "rl", num_iter=2, device="cpu", background=0.0)
    np.testing.assert_allclose(restored, expected, rtol=1e-5)
    # gaussian: +-4 sigma; a 2-D image gets the in-focus plane
    flat = write(tmp_path / "flat.tif", image[4], spacing=SPACING[1:])
    assert (
        main(
            [
                "deconvolve",
                str(flat),
                "--psf-model",
                "gaussian",
                "--sigma",
                "0.2",
                "-o",
                str(out),
                "-q",
                *FAST,
            ]
        )
        == 0
    )
    assert io.imread(out / "flat_decon.tif")[1]["provenance"]["psf"].startswith("PSF model gaussian 17x17 ")
    assert (
        main(
            [
                "deconvolve",
                str(flat),
                "--psf-model",
                "confocal",
                "--pinhole",
                "0.5",
                "-o",
                str(out),
                "-q",
                "--overwrite",
                *FAST,
            ]
        )
        == 0
    )
    restored, meta = io.imread(out / "flat_decon.tif")
    assert meta["provenance"]["psf"] == "PSF model confocal 21x21 at 0.1x0.1 um"  # 4 Airy radii (NA 1.4)
    plane = md.psf.confocal(
        (1, 21, 21), (0.1, 0.1, 0.1), excitation=0.488, emission=0.52, na=1.4, pinhole=0.5
    )[0]
    expected = md.deconvolve(image[4], plane, "rl", num_iter=2, device="cpu", background=0.0)
    np.testing.assert_allclose(restored, expected, rtol=1e-5)


def test_model_shape_rule():
    optics = dict(na=1.2, wavelength=0.52, n_immersion=1.33, n_sample=None)
    # the bundled sample: z spans its 40 planes (41), y and x the defocus cone, capped at 128 -> 129
    assert _model_shape("widefield", (40, 128, 128), SPACING, optics) == (41, 129, 129)
    # a deep stack: at most +-8 axial FWHM (0.605 um / 0.2 um: 25 planes each side)
    assert _model_shape("widefield", (400, 512, 512), SPACING, optics)[0] == 51
    # 2-D: 4 Airy radii (1.06 um: 11 pixels each side)
    assert _model_shape("widefield", (64, 64), SPACING[1:], optics) == (23, 23)
    assert _model_shape("gaussian", (8, 32, 32), SPACING, {"sigma": [0.4, 0.2, 0.2]}) == (17, 17, 17)


def test_psf_source_flags(tmp_path, psf_file, capsys):
    path = write(tmp_path / "a.tif", stack()[0])
    out = tmp_path / "out"
    base = ["deconvolve", str(path), "-o", str(out), "-q", *FAST]
    assert main(base) == 2 and "one of the arguments --psf --psf-model is required" in capsys.readouterr().err
    assert main([*base, "--psf", str(psf_file), "--psf-model", "widefield"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main([*base, "--psf", str(psf_file), "--na", "1.2"]) == 2
    assert (
        "--na applies to --psf-model widefield or confocal, not to a PSF read from a file"
        in capsys.readouterr().err
    )
    assert main([*base, "--psf-model", "widefield", "--pinhole", "1"]) == 2
    assert (
        "--pinhole applies to --psf-model confocal, not to --psf-model widefield" in capsys.readouterr().err
    )
    assert main([*base, "--psf-model", "gaussian"]) == 2
    assert "--psf-model gaussian needs --sigma" in capsys.readouterr().err
    assert main([*base, "--psf-model", "widefield", "--na", "1.6"]) == 2  # refused once, before any file
    assert "na (1.6) must be smaller than n_immersion" in capsys.readouterr().err
    assert main([*base, "--psf", str(psf_file), "--psf-shape", "9", "9", "9"]) == 2
    assert "--psf-shape applies to --psf-model" in capsys.readouterr().err
    assert main([*base, "--psf-model", "widefield", "--psf-spacing", "0.2", "0.1", "0.1"]) == 2
    assert "--psf-spacing applies to a PSF file" in capsys.readouterr().err
    assert main([*base, "--psf", str(tmp_path / "missing.tif")]) == 2
    assert "missing.tif: no such file" in capsys.readouterr().err
    assert main([*base, "--device", "tpu", "--psf", str(psf_file)]) == 2
    assert files_in(out) == []


def test_outputs_never_replace_inputs_or_each_other(tmp_path, psf_file, capsys):
    image = stack()[0]
    data = tmp_path / "data"
    write(data / "a.tif", image)
    # the output folder is the input folder: a second run does not take the outputs as inputs
    argv = ["deconvolve", str(data), "--psf", str(psf_file), "-o", str(data), *FAST]
    assert main([*argv, "-q"]) == 0
    assert main(argv) == 0
    assert "1 written" not in capsys.readouterr().out and files_in(data) == ["a.tif", "a_decon.tif"]
    # named explicitly, an input that is another input's output is kept, and that other input fails
    code = main(
        [
            "deconvolve",
            str(data / "a.tif"),
            str(data / "a_decon.tif"),
            "--psf",
            str(psf_file),
            "-o",
            str(data),
            "-q",
            "--overwrite",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "would overwrite an input" in failed_lines(err)[0]
    assert files_in(data) == ["a.tif", "a_decon.tif", "a_decon_decon.tif"]
    # two inputs with one output name: the second is refused, the first written
    write(tmp_path / "d1" / "x.tif", image)
    write(tmp_path / "d2" / "x.tif", image)
    out = tmp_path / "out"
    code = main(
        [
            "deconvolve",
            str(tmp_path / "d1"),
            str(tmp_path / "d2"),
            "--psf",
            str(psf_file),
            "-o",
            str(out),
            "-q",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and str(tmp_path / "d2" / "x.tif") in failed_lines(err)[0] and "is also that of" in err
    assert files_in(out) == ["x_decon.tif"]


def test_psf_command_refuses_optics_of_another_model(tmp_path, capsys):
    out = tmp_path / "p.tif"
    argv = ["psf", "-o", str(out), "--shape", "9", "9", "9", "--spacing", "0.2", "0.1", "0.1"]
    assert main([*argv, "--pinhole", "0.5"]) == 2
    assert "--pinhole applies to --model confocal, not to --model widefield" in capsys.readouterr().err
    assert (
        main([*argv, "--model", "confocal", "--pinhole", "0.5", "--na", "1.2", "--n-immersion", "1.33"]) == 0
    )
    assert io.imread(out)[1]["provenance"]["psf"] == "model confocal"
    assert not (tmp_path / "other.tif").exists()


def test_help_and_usage_errors_return_exit_codes(capsys):
    assert main(["deconvolve", "--help"]) == 0
    printed = capsys.readouterr().out
    assert "--psf-model" in printed and "defocus cone" in printed and "--recursive" in printed
    assert main(["deconvolve"]) == 2


def test_other_formats_and_values_stored_with_a_scale(tmp_path, psf_file, capsys):
    image, psf = stack()
    values = image.astype(np.float32) * 0.37 + 5.0
    scaled = tmp_path / "scaled.tif"
    io.imwrite(scaled, values, {"spacing": SPACING}, dtype="uint16")  # floats kept as uint16 + scale
    ome = write(tmp_path / "cells.ome.tif", image)
    zarr = write(tmp_path / "cells.zarr", image)
    out = tmp_path / "out"
    argv = [str(scaled), str(ome), str(zarr), "--psf", str(psf_file), "-o", str(out), "-q", *FAST]
    assert main(["deconvolve", *argv]) == 0
    assert files_in(out) == ["cells_decon.ome.tif", "cells_decon.tif", "scaled_decon.tif"]
    stored, meta = io.imread(scaled)
    meant = stored.astype(np.float32) * np.float32(meta["scale"]) + np.float32(meta["offset"])
    np.testing.assert_allclose(meant, values, atol=meta["scale"])
    expected = md.deconvolve(meant, psf, "rl", num_iter=2, device="cpu", background=0.0)
    restored, out_meta = io.imread(out / "scaled_decon.tif")
    assert "scale" not in out_meta and restored.dtype == np.float32
    np.testing.assert_allclose(restored, expected, rtol=1e-5)
    for name in ("cells_decon.ome.tif", "cells_decon.tif"):
        restored, out_meta = io.imread(out / name)
        assert out_meta["spacing"] == SPACING
        np.testing.assert_allclose(
            restored, md.deconvolve(image, psf, "rl", num_iter=2, device="cpu", background=0.0), rtol=1e-5
        )


# --------------------------------------------------------------------------------------------
# info, --dry-run, tiles and memory, large files, channels and time points
# --------------------------------------------------------------------------------------------
def channels(count=2, seed=0, shape=(8, 32, 32)):
    """``count`` stacks (uint16) blurred with PSFs of growing width, and those PSFs."""
    psfs = [
        md.psf.gaussian((7, 9, 9), (0.3, 0.1 + 0.05 * c, 0.1 + 0.05 * c), spacing=SPACING)
        for c in range(count)
    ]
    images = []
    for c, psf in enumerate(psfs):
        truth = md.data.phantom(shape, seed=seed + c)
        blurred = md.convolve(truth, psf, device="cpu")
        images.append(
            np.random.default_rng(seed + c).poisson(np.clip(blurred, 0, None) + 10).astype(np.uint16)
        )
    return np.stack(images), psfs


def rl(image, psf, **options):
    """What the command computes with FAST for one volume."""
    return md.richardson_lucy(image, psf, 2, device="cpu", background=0.0, **options)


def psf_files(tmp_path, psfs):
    return [str(write(tmp_path / f"psf{c}.tif", p)) for c, p in enumerate(psfs)]


def test_info_describes_each_file_and_its_tile_plan(tmp_path, psf_file, capsys):
    image, _ = channels(shape=(8, 64, 64))
    ome = tmp_path / "two.ome.tif"
    io.imwrite(
        ome,
        image,
        {"axes": "CZYX", "spacing": SPACING, "channel_names": ["GFP", "RFP"], "wavelengths": [0.52, 0.61]},
    )
    bare = write(tmp_path / "bare.tif", image[0], spacing=None)
    bad = tmp_path / "bad.tif"
    bad.write_text("not a tiff")
    argv = ["info", str(ome), str(bare), "--psf", str(psf_file), "--memory-limit", "2MB", "--num-iter", "2"]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    blocks = printed.split("\n\n")
    assert len(blocks) == 2
    lines = blocks[0].splitlines()
    size = os.path.getsize(ome)
    assert lines[:5] == [
        str(ome),
        "  shape: 2x8x64x64, uint16, axes CZYX",
        "  voxel size: 0.2x0.1x0.1 um",
        "  channels: 2: 'GFP' emission 0.52 um, 'RFP' emission 0.61 um",
        f"  file size: {size / 1000:.1f} KB ({size} bytes)",
    ]
    psf_array = io.imread(psf_file)[0]  # the plan is made from the PSF itself
    expected = md.tiling.plan((8, 64, 64), psf_array, "rl", memory_limit="2MB", num_iter=2, input_itemsize=2)
    assert expected.tiles == 9
    assert f"  tile plan (rl): {expected} (each of 2 volumes)" in lines
    assert f"  PSF: {psf_file}: 7x9x9, not resampled" in lines
    assert "  voxel size: unknown" in blocks[1] and "channels" not in blocks[1]
    # without a voxel size the PSF cannot be matched: said so, and the file still counts as read
    assert "tile plan: not available: no voxel size in its metadata" in blocks[1]
    # --tile-shape as in deconvolve
    assert main([*argv[:2], "--psf", str(psf_file), "--tile-shape", "0", "-1", "32", "--num-iter", "2"]) == 0
    tile_plan = md.tiling.plan(
        (8, 64, 64), psf_array, "rl", tile_shape=(-1, -1, 32), num_iter=2, input_itemsize=2
    )
    assert tile_plan.tiles == 2
    assert f"  tile plan (rl): {tile_plan} (each of 2 volumes)" in capsys.readouterr().out.splitlines()
    # no PSF: the grid of --psf-model widefield, per channel at its wavelength
    assert main(["info", str(ome), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    optics = {"na": 1.4, "wavelength": 0.52, "n_immersion": 1.515, "n_sample": None}
    grid = _model_shape("widefield", (8, 64, 64), SPACING, optics)
    shape = "x".join(map(str, grid))
    line = (
        f"  PSF (none given: --psf-model widefield): channel 0: model widefield {shape} at 0.2x0.1x0.1 um, "
    )
    line += "emission 0.52 um (file)"
    assert line in printed.splitlines() and "emission 0.61 um (file)" in printed
    tile_plan = md.tiling.plan((8, 64, 64), grid, "rl", device="cpu", input_itemsize=2)
    assert f"  tile plan (rl): channel 0: {tile_plan} (each of 2 volumes)" in printed.splitlines()
    # a file that cannot be read: one line naming it, exit code 1, the others still described
    assert main(["info", str(bad), str(bare)]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(
        f"{bad}: error: not a readable TIFF"
    )
    assert captured.out.startswith(str(bare)) and "shape: 8x64x64, uint16, axes ZYX" in captured.out
    assert main(["info", str(ome), "--memory-limit", "lots"]) == 2
    assert "is not a size such as 512MB or 4GB" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    image, _ = stack(shape=(8, 40, 40))
    fine = md.psf.gaussian((13, 17, 17), (0.3, 0.15, 0.15), spacing=(0.1, 0.05, 0.05))
    psf_path = write(tmp_path / "fine.tif", fine, spacing=(0.1, 0.05, 0.05))
    good = write(tmp_path / "in" / "a.tif", image)
    flat = write(tmp_path / "in" / "flat.tif", image[4], spacing=SPACING[1:])
    out = tmp_path / "out" / "deeper"
    argv = ["deconvolve", str(good), "--psf", str(psf_path), "-o", str(out), "--dry-run", "-q", *FAST]
    assert main([*argv, "--tile-shape", "0", "0", "20"]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # not even the output folder
    resampled = md.psf.resample(fine, (0.1, 0.05, 0.05), SPACING)
    plan = md.tiling.plan((8, 40, 40), resampled, "rl", tile_shape=(-1, -1, 20), num_iter=2)
    assert plan.tiles == 2
    shape = "x".join(map(str, resampled.shape))
    assert printed.splitlines()[1:] == [
        f"{good} -> {out / 'a_decon.tif'}",
        "  image: 8x40x40 uint16, axes ZYX, voxel 0.2x0.1x0.1 um (file), "
        f"{md.tiling._human(os.path.getsize(good))} on disk",
        f"  PSF: {psf_path}, PSF resampled from 0.1x0.05x0.05 um to 0.2x0.1x0.1 um: {shape}",
        "  method: rl on cpu (" + printed.split("  method: rl on cpu (")[1].split(")")[0] + "): "
        "boundary=non-circulant, background=0.0, num_iter=2",
        f"  tiles: {plan}",
        "  read: " + printed.split("  read: ")[1].splitlines()[0],
        "dry run: 1 to write, 0 skipped, 0 failed, of 1 file(s); nothing was computed or written",
    ]
    assert printed.split("  read: ")[1].startswith("whole, in memory (")
    # bad inputs are still found and reported, and still nothing is written
    bad = tmp_path / "in" / "bad.tif"
    bad.write_text("not a tiff")
    code = main(
        ["deconvolve", str(tmp_path / "in"), "--psf", str(psf_path), "-o", str(out), "--dry-run", *FAST]
    )
    captured = capsys.readouterr()
    assert code == 1 and not (tmp_path / "out").exists()
    causes = {line.split(": FAILED: ")[0]: line.split(": FAILED: ")[1] for line in failed_lines(captured.err)}
    assert set(causes) == {str(bad), str(flat)}
    assert causes[str(bad)].startswith("not a readable TIFF")
    assert causes[str(flat)] == (
        f"the PSF {psf_path} has shape 13x17x17 but the image has shape 40x40; "
        "they need the same number of axes"
    )
    assert "dry run: 1 to write, 0 skipped, 2 failed, of 3 file(s)" in captured.out
    # a memory limit no tile fits in is found before anything runs
    assert main([*argv, "--memory-limit", "10KB"]) == 1
    assert "memory_limit of 10.0 KB is too small for rl" in capsys.readouterr().err


def test_tile_shape_and_memory_limit_reach_the_restoration(tmp_path, psf_file, capsys):
    image, psf = stack(shape=(8, 64, 64))
    path = write(tmp_path / "a.tif", image)
    out = tmp_path / "out"
    argv = ["deconvolve", str(path), "--psf", str(psf_file), "-o", str(out), *FAST]
    assert main([*argv, "--tile-shape", "0", "32", "-1"]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
    assert line.endswith("on cpu (" + line.split("on cpu (")[1].split(")")[0] + "); 2 tiles")
    tiled = md.deconvolve(image, psf, "rl", num_iter=2, device="cpu", background=0.0, tile_shape=(-1, 32, -1))
    restored = io.imread(out / "a_decon.tif")[0]
    np.testing.assert_allclose(restored, tiled, rtol=1e-5, atol=1e-5 * float(tiled.max()))
    # tiles differ from the whole volume (a little), so the tiling really happened
    assert not np.allclose(restored, rl(image, psf), rtol=1e-6, atol=0)
    # --memory-limit: the library's plan for that limit
    limit = "2MB"
    plan = md.tiling.plan((8, 64, 64), psf, "rl", memory_limit=limit, num_iter=2, input_itemsize=2)
    assert 1 < plan.tiles
    assert main([*argv, "--memory-limit", limit, "--overwrite", "-q", "--spacing", *map(str, SPACING)]) == 0
    expected = md.deconvolve(image, psf, "rl", num_iter=2, device="cpu", background=0.0, memory_limit=limit)
    np.testing.assert_allclose(
        io.imread(out / "a_decon.tif")[0], expected, rtol=1e-5, atol=1e-5 * float(expected.max())
    )
    # wrong counts and sizes are refused
    assert main([*argv, "--tile-shape", "32", "32", "--overwrite", "-q"]) == 1
    assert "--tile-shape has 2 values but the image has 3 spatial axes" in capsys.readouterr().err
    assert main([*argv, "--tile-shape", "0", "-5", "0"]) == 2
    assert main([*argv, "--tol", "1e-3", "--tile-shape", "0", "32", "0", "--overwrite", "-q"]) == 1
    assert "--tol needs the whole volume" in capsys.readouterr().err


def test_a_file_larger_than_the_memory_is_read_and_written_tile_by_tile(tmp_path, capsys, monkeypatch):
    psf = md.psf.gaussian((9, 9), 1.5)
    truth = md.data.phantom((640, 640), seed=3)
    image = (md.convolve(truth, psf, device="cpu") + 10).astype(np.float32)  # 1.6 MB
    path = write(tmp_path / "big.tif", image, spacing=SPACING[1:])
    psf_path = write(tmp_path / "psf.tif", psf, spacing=SPACING[1:])
    limit = "1.5MB"  # smaller than the file, larger than a tile
    plan = md.tiling.plan(image.shape, psf, "rl", memory_limit=limit, num_iter=2)
    assert 1 < plan.tiles <= 25
    seen = []
    original = md.restore.deconvolve

    def spy(pixels, *args, **kwargs):
        seen.append(type(pixels).__module__.split(".")[0])
        return original(pixels, *args, **kwargs)

    monkeypatch.setattr("microdecon.cli.deconvolve", spy)
    out = tmp_path / "out"
    argv = ["deconvolve", str(path), "--psf", str(psf_path), "-o", str(out), *FAST, "--memory-limit", limit]
    assert main(argv) == 0
    assert seen == ["dask"]
    line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
    assert line.endswith(f"; {plan.tiles} tiles; read and written tile by tile")
    restored, meta = io.imread(out / "big_decon.tif")
    assert meta["spacing"] == SPACING[1:] and restored.dtype == np.float32
    # the same as the in-memory path with the same tiles
    in_memory = md.deconvolve(image, psf, "rl", num_iter=2, device="cpu", background=0.0, memory_limit=limit)
    np.testing.assert_allclose(restored, in_memory, rtol=1e-5, atol=1e-5 * float(in_memory.max()))
    # a file smaller than the limit stays in memory
    assert main([*argv[:-1], "64MB", "--overwrite", "-q"]) == 0
    assert seen[-1] == "numpy"
    np.testing.assert_allclose(io.imread(out / "big_decon.tif")[0], rl(image, psf), rtol=1e-5, atol=1e-4)


def test_each_channel_gets_its_own_psf(tmp_path, capsys):
    image, psfs = channels()
    path = tmp_path / "two.tif"
    io.imwrite(path, image, {"axes": "CZYX", "spacing": SPACING})
    out = tmp_path / "out"
    argv = ["deconvolve", str(path), "-o", str(out), "-q", *FAST]
    files = psf_files(tmp_path, psfs)
    assert main([*argv, "--psf", files[0], "--psf", files[1]]) == 0
    restored, meta = io.imread(out / "two_decon.tif")
    assert meta["axes"] == "CZYX" and restored.shape == image.shape
    for c in range(2):
        np.testing.assert_allclose(restored[c], rl(image[c], psfs[c]), rtol=1e-5, atol=1e-5)
    assert meta["provenance"]["psf"] == f"channel 0: {files[0]}; channel 1: {files[1]}"
    # one PSF serves every channel
    assert main([*argv, "--psf", files[1], "--overwrite"]) == 0
    restored = io.imread(out / "two_decon.tif")[0]
    for c in range(2):
        np.testing.assert_allclose(restored[c], rl(image[c], psfs[1]), rtol=1e-5, atol=1e-5)
    # as many PSFs as channels, or one
    assert main([*argv, "--psf", files[0], "--psf", files[1], "--psf", files[0], "--overwrite"]) == 1
    lines = failed_lines(capsys.readouterr().err)
    assert lines == [
        f"{path}: FAILED: 3 PSF files (--psf) for 2 channels (axes CZYX); give one per channel, "
        "in channel order, or one for all"
    ]
    single = write(tmp_path / "single.tif", image[0])
    assert (
        main(["deconvolve", str(single), "-o", str(out), "-q", *FAST, "--psf", files[0], "--psf", files[1]])
        == 1
    )
    assert (
        "2 PSF files (--psf) were given, one per channel, but the image has no channel axis (axes ZYX)"
        in (capsys.readouterr().err)
    )


def test_a_time_lapse_of_channels(tmp_path, capsys):
    first, psfs = channels(seed=0)
    second, _ = channels(seed=5)
    image = np.stack([first, second])  # T, C, Z, Y, X
    path = tmp_path / "movie.tif"
    io.imwrite(path, image, {"axes": "TCZYX", "spacing": SPACING})
    out = tmp_path / "out"
    files = psf_files(tmp_path, psfs)
    assert main(["deconvolve", str(path), "-o", str(out), *FAST, "--psf", files[0], "--psf", files[1]]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
    assert ": 2x2x8x32x32 TCZYX uint16, rl, " in line
    restored, meta = io.imread(out / "movie_decon.tif")
    assert meta["axes"] == "TCZYX" and meta["spacing"] == (1.0, 1.0, *SPACING)
    for t in range(2):
        for c in range(2):
            np.testing.assert_allclose(restored[t, c], rl(image[t, c], psfs[c]), rtol=1e-5, atol=1e-5)


def test_channels_between_the_spatial_axes_are_moved_and_moved_back(tmp_path, capsys):
    image, psfs = channels()
    zcyx = np.ascontiguousarray(np.moveaxis(image, 0, 1))
    path = tmp_path / "zc.tif"
    io.imwrite(path, zcyx, {"axes": "ZCYX", "spacing": SPACING})
    out = tmp_path / "out"
    files = psf_files(tmp_path, psfs)
    argv = ["deconvolve", str(path), "-o", str(out), *FAST, "--psf", files[0], "--psf", files[1]]
    # in memory, and read lazily (a limit below the file's size; whole volumes): the same
    for lazy in (False, True):
        extra = ["--memory-limit", "20KB", "--tile-shape", "0", "0", "0", "--overwrite"] if lazy else []
        assert main([*argv, *extra]) == 0
        line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
        assert (": 8x2x32x32 ZCYX uint16, rl, " in line) and line.endswith(
            "read and written tile by tile"
        ) == lazy
        restored, meta = io.imread(out / "zc_decon.tif")
        assert meta["axes"] == "ZCYX" and restored.shape == zcyx.shape
        for c in range(2):
            np.testing.assert_allclose(restored[:, c], rl(image[c], psfs[c]), rtol=1e-5, atol=1e-5)


def test_model_psfs_per_channel_at_each_channels_wavelength(tmp_path, capsys):
    image, _ = channels()
    path = tmp_path / "two.ome.tif"
    io.imwrite(path, image, {"axes": "CZYX", "spacing": SPACING, "wavelengths": [0.45, 0.65]})
    out = tmp_path / "out"
    optics = ["--na", "1.2", "--n-immersion", "1.33"]
    argv = ["deconvolve", str(path), "-o", str(out), *FAST, "--psf-model", "widefield", *optics]

    def model(wavelength):
        grid = _model_shape(
            "widefield",
            (8, 32, 32),
            SPACING,
            {"na": 1.2, "wavelength": wavelength, "n_immersion": 1.33, "n_sample": None},
        )
        return md.psf.widefield(grid, SPACING, wavelength=wavelength, na=1.2, n_immersion=1.33)

    def check(wavelengths):
        restored = io.imread(out / "two_decon.ome.tif")[0]
        for c, wavelength in enumerate(wavelengths):
            np.testing.assert_allclose(restored[c], rl(image[c], model(wavelength)), rtol=1e-5, atol=1e-5)

    # the file's emission wavelengths, one per channel
    assert main(argv) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
    assert "channel 0: PSF model widefield" in line and "emission 0.45 um (file)" in line
    assert "channel 1: PSF model widefield" in line and "emission 0.65 um (file)" in line
    check([0.45, 0.65])
    # --wavelength, one per channel, is used rather than the file's
    assert main([*argv, "--wavelength", "0.5", "0.6", "--overwrite"]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
    assert "emission 0.5 um (--wavelength)" in line and "emission 0.6 um (--wavelength)" in line
    check([0.5, 0.6])
    # a file without wavelengths: --wavelength, or the default
    plain = tmp_path / "plain.tif"
    io.imwrite(plain, image, {"axes": "CZYX", "spacing": SPACING})
    assert main([*argv[:1], str(plain), *argv[2:], "-q", "--wavelength", "0.5", "0.6", "0.7"]) == 1
    assert "--wavelength has 3 values for 2 channel(s)" in capsys.readouterr().err
    assert main([*argv[:1], str(plain), *argv[2:]]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if " -> " in line][0]
    assert line.endswith("; PSF model widefield 15x33x33 at 0.2x0.1x0.1 um; emission 0.52 um (default)")
    restored = io.imread(out / "plain_decon.tif")[0]
    for c in range(2):
        np.testing.assert_allclose(restored[c], rl(image[c], model(0.52)), rtol=1e-5, atol=1e-5)


def test_help_describes_the_new_flags(tmp_path, capsys):
    assert main(["deconvolve", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    for text in (
        "--tile-shape N",
        "0 or -1 keeps an axis whole",
        "--memory-limit SIZE",
        "512MB or 4GB",
        "--dry-run",
        "without computing or writing anything",
        "one file per channel in channel order",
        "one per channel in channel order",
    ):
        assert text in printed, text
    assert main(["info", "--help"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the tile plan deconvolve would use" in printed and "--psf-shape N" in printed
    # the psf command writes one PSF: one wavelength
    argv = ["psf", "-o", str(tmp_path / "p.tif"), "--shape", "3", "3", "3", "--spacing", "0.1", "0.1", "0.1"]
    assert main([*argv, "--wavelength", "0.5", "0.6"]) == 2
    assert "--wavelength takes one value for the psf command" in capsys.readouterr().err
    assert files_in(tmp_path) == []


def test_uint16_output_records_its_scale(tmp_path):
    image = (np.random.default_rng(0).poisson(50, (8, 32, 32))).astype(np.uint16)
    io.imwrite(tmp_path / "a.tif", image, {"spacing": (0.3, 0.1, 0.1)})
    psf = md.psf.gaussian((5, 7, 7), 1.0)
    io.imwrite(tmp_path / "psf.tif", psf, {"spacing": (0.3, 0.1, 0.1)})
    args = [str(tmp_path / "a.tif"), "--psf", str(tmp_path / "psf.tif"), "--num-iter", "5", "-q"]
    assert main(["deconvolve", *args, "-o", str(tmp_path / "f"), "--device", "cpu"]) == 0
    assert main(["deconvolve", *args, "-o", str(tmp_path / "u"), "--device", "cpu", "--dtype", "uint16"]) == 0
    floats, _ = io.imread(tmp_path / "f" / "a_decon.tif")
    stored, meta = io.imread(tmp_path / "u" / "a_decon.tif")
    assert stored.dtype == np.uint16 and meta["scale"] > 0
    recovered = stored * meta["scale"] + meta["offset"]
    assert np.abs(recovered - floats).max() <= meta["scale"] / 2 + 1e-6 * floats.max()
