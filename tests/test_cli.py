import numpy as np

import microdecon as md
from microdecon import io
from microdecon.cli import main


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
    # a second run skips what is done
    code = main(["deconvolve", str(good), "--psf", str(sample.paths["psf"]), "-o", str(out), "-q"])
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
    capsys.readouterr()
    assert main(["demo", "-q", "--method", "wiener", "--num-iter", "5", "-o", str(tmp_path)]) == 2
    assert "--num-iter does not apply to --method wiener" in capsys.readouterr().err
    assert main(["demo", "-q", "--method", "inverse", "--tv", "0.01", "-o", str(tmp_path)]) == 2
