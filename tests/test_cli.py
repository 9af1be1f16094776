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
