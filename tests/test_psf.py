import numpy as np
import pytest

import microdecon as md


def fwhm(profile, spacing):
    profile = profile / profile.max()
    above = np.where(profile >= 0.5)[0]
    i0, i1 = above[0], above[-1]
    left = i0 - 1 + (0.5 - profile[i0 - 1]) / (profile[i0] - profile[i0 - 1])
    right = i1 + (profile[i1] - 0.5) / (profile[i1] - profile[i1 + 1])
    return (right - left) * spacing


def test_gaussian_is_normalized_centred_and_has_the_right_width():
    psf = md.psf.gaussian((31, 41), (2.0, 3.0))
    assert psf.dtype == np.float32 and abs(psf.sum() - 1) < 1e-6
    assert np.unravel_index(psf.argmax(), psf.shape) == (15, 20)
    assert abs(fwhm(psf[:, 20], 1.0) - 2.3548 * 2.0) < 0.05
    assert md.psf.gaussian((4, 4), 1.0).argmax() == 2 * 4 + 2  # even size: centre at n // 2


@pytest.mark.parametrize("na,n,wavelength", [(1.2, 1.33, 0.52), (1.4, 1.515, 0.6), (0.8, 1.0, 0.5)])
def test_widefield_matches_diffraction_theory(na, n, wavelength):
    psf = md.psf.widefield((129, 129, 129), (0.04, 0.02, 0.02), wavelength=wavelength, na=na, n_immersion=n)
    lateral = fwhm(psf[64, 64, :].astype(np.float64), 0.02)
    axial = fwhm(psf[:, 64, 64].astype(np.float64), 0.04)
    assert abs(lateral - 0.51 * wavelength / na) < 0.05 * 0.51 * wavelength / na
    expected_axial = 0.88 * wavelength / (n - np.sqrt(n**2 - na**2))
    assert abs(axial - expected_axial) < 0.1 * expected_axial
    assert abs(psf.sum() - 1) < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"na": 1.4, "n_immersion": 1.33}, "na"),
        ({"wavelength": 0.0}, "wavelength"),
        ({"wavelength": -1.0}, "wavelength"),
        ({"na": 0.0}, "na"),
    ],
)
def test_widefield_rejects_impossible_optics(kwargs, match):
    params = {"wavelength": 0.52, "na": 1.2, "n_immersion": 1.33, **kwargs}
    with pytest.raises(ValueError, match=match):
        md.psf.widefield((9, 9, 9), (0.2, 0.1, 0.1), **params)


def test_per_axis_values_may_be_arrays():
    a = md.psf.gaussian(np.array([9, 11]), np.array([1.0, 2.0]))
    np.testing.assert_array_equal(a, md.psf.gaussian((9, 11), (1.0, 2.0)))
    assert md.psf.gaussian(np.int64(5), 1.0).shape == (5,)


def test_gaussian_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma"):
        md.psf.gaussian((5, 5), 0.0)
    with pytest.raises(ValueError, match="sigma needs one value per axis"):
        md.psf.gaussian((5, 5), (1.0, 1.0, 1.0))
