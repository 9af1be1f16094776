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


from pathlib import Path  # noqa: E402

from scipy import ndimage  # noqa: E402

LLSM_BEAD = Path(__file__).resolve().parents[2] / "shared" / "data" / "psf_llsm_bead.tif"


def test_prepare_recovers_a_shifted_noisy_bead():
    rng = np.random.default_rng(1)
    truth = md.psf.gaussian((25, 41, 41), (3.0, 2.0, 2.0)).astype(np.float64)
    shifted = ndimage.shift(truth, (0.3, -0.4, 0.25), order=3)  # off-centre by a fraction of a voxel
    bead = rng.poisson(20000 * shifted / shifted.max() + 100).astype(np.uint16)  # camera offset 100
    psf = md.psf.prepare(bead)
    assert psf.dtype == np.float32 and abs(float(psf.sum()) - 1) < 1e-5 and psf.min() >= 0
    assert np.abs(psf - truth).sum() < 0.05 * truth.sum()
    np.testing.assert_allclose(ndimage.center_of_mass(psf), (12, 20, 20), atol=0.05)


def test_prepare_crops_by_shape_and_by_energy():
    rng = np.random.default_rng(2)
    bead = rng.poisson(5000 * md.psf.gaussian((31, 45), (2.0, 3.0)) / 0.01 + 50).astype(np.float32)
    cropped = md.psf.prepare(bead, shape=(15, 21))
    assert cropped.shape == (15, 21) and np.unravel_index(cropped.argmax(), cropped.shape) == (7, 10)
    whole = md.psf.prepare(bead)
    boxed = md.psf.prepare(bead, energy=0.95)
    assert boxed.shape[0] < 31 and boxed.shape[1] < 45
    inner = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(whole.shape, boxed.shape))
    assert float(whole[inner].sum()) >= 0.95


@pytest.mark.skipif(not LLSM_BEAD.exists(), reason="needs the shared measured bead")
def test_prepare_cleans_the_measured_lattice_light_sheet_bead():
    import tifffile

    raw = tifffile.imread(LLSM_BEAD)  # 61 x 128 x 128 uint16, camera offset ~100
    psf = md.psf.prepare(raw)
    assert psf.shape == raw.shape and psf.min() >= 0 and abs(float(psf.sum()) - 1) < 1e-5
    np.testing.assert_allclose(ndimage.center_of_mass(psf), [n // 2 for n in raw.shape], atol=0.2)
    # the light is in the bead, not in a floor of clipped noise (a plain median subtraction and
    # clip keeps 14% within 5 voxels of the peak)
    core = tuple(slice(n // 2 - 5, n // 2 + 6) for n in raw.shape)
    assert float(psf[core].sum()) > 0.6
    # no floor of noise left far from the bead (a median subtraction and clip leaves about 40%)
    shell = np.ones(raw.shape, bool)
    shell[tuple(slice(10, n - 10) for n in raw.shape)] = False
    assert float(psf[shell].sum()) < 0.02
    # the brightest voxel is the bead's, within a voxel of the centre
    peak = np.unravel_index(int(psf.argmax()), psf.shape)
    assert all(abs(p - n // 2) <= 1 for p, n in zip(peak, raw.shape))
    # an energy crop keeps what it promises and follows the PSF's elongated shape
    cropped = md.psf.prepare(raw, energy=0.99)
    window = tuple(slice(n // 2 - s // 2, n // 2 - s // 2 + s) for n, s in zip(raw.shape, cropped.shape))
    assert float(psf[window].sum()) >= 0.99 - 1e-3 and np.prod(cropped.shape) < 0.5 * psf.size
    # usable as it is: the operators image a point at the centre as exactly this PSF
    point = np.zeros(raw.shape, np.float32)
    point[tuple(n // 2 for n in raw.shape)] = 1
    np.testing.assert_allclose(md.convolve(point, psf, boundary="periodic", device="cpu"), psf, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,bead,match",
    [
        ({}, np.full((9, 9), 100.0), "no bead"),
        ({"energy": 0.0}, None, "energy must be in"),
        ({"shape": (41, 41)}, None, "larger than the bead image"),
        ({"background": "median"}, None, "background must be one of"),
    ],
)
def test_prepare_rejects_bad_input(kwargs, bead, match):
    if bead is None:
        bead = np.random.default_rng(0).poisson(1000 * md.psf.gaussian((21, 21), 2.0) + 10)
    with pytest.raises(ValueError, match=match):
        md.psf.prepare(bead, **kwargs)


def gaussian_at(shape, centre, sigma):
    grids = np.indices(shape, dtype=np.float64)
    return np.exp(-0.5 * sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, sigma)))


def bead_stack(rng, positions, sigma, brightness=3000.0, shape=(32, 128, 128), offset=100.0):
    ideal = np.zeros(shape)
    for position in positions:
        ideal += brightness * gaussian_at(shape, position, sigma)
    return rng.poisson(ideal + offset)


def test_from_beads_recovers_the_psf_within_five_percent():
    rng = np.random.default_rng(3)
    sigma = (2.0, 1.5, 1.5)
    grid = [(z, y, x) for z in (8.0, 24.0) for y in (20.0, 55.0, 90.0) for x in (20.0, 55.0, 90.0)]
    positions = [np.array(p) + rng.uniform(-0.5, 0.5, 3) for p in grid]  # sub-voxel positions
    positions.append(np.array([16.0, 108.0, 108.0]))  # a close pair: both must be rejected
    positions.append(np.array([16.0, 110.0, 112.0]))
    stack = bead_stack(rng, positions, sigma)
    saturated = stack.copy()
    found = md.psf.from_beads(stack, (15, 21, 21), min_distance=8)
    assert found.count == len(grid)  # the pair is out
    expected = gaussian_at((15, 21, 21), (7, 10, 10), sigma)
    expected /= expected.sum()
    assert np.abs(found.psf - expected).sum() < 0.05  # relative L1 error (both sum to 1)
    # a saturated bead is dropped too
    saturated[tuple(np.round(positions[0]).astype(int))] = 4095
    assert md.psf.from_beads(saturated, (15, 21, 21), min_distance=8, saturation=4095).count == len(grid) - 1


def test_from_beads_names_what_is_missing():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="image has no bead"):
        md.psf.from_beads(rng.poisson(100, (16, 64, 64)), 11)
    crowded = bead_stack(rng, [(8.0, 30.0, 30.0), (8.0, 30.0, 35.0)], (1.5, 1.5, 1.5), shape=(16, 64, 64))
    with pytest.raises(ValueError, match="none is isolated"):
        md.psf.from_beads(crowded, 11, min_distance=6)
    with pytest.raises(ValueError, match="size .* does not fit"):
        md.psf.from_beads(crowded, 21)


def test_resample_matches_the_model_computed_at_the_new_voxel_size():
    optics = dict(wavelength=0.52, na=1.2, n_immersion=1.33)
    fine = md.psf.widefield((61, 65, 65), (0.1, 0.05, 0.05), oversample=1, **optics)
    coarse = md.psf.widefield((31, 33, 33), (0.2, 0.1, 0.1), oversample=1, **optics)
    resampled = md.psf.resample(fine, (0.1, 0.05, 0.05), (0.2, 0.1, 0.1), integrate=(False, False, False))
    assert resampled.shape == (31, 33, 33) and abs(float(resampled.sum()) - 1) < 1e-5
    assert np.abs(resampled - coarse).sum() < 0.03  # relative L1 error, both sum to 1
    assert np.unravel_index(resampled.argmax(), resampled.shape) == (15, 16, 16)
    # coarse camera pixels integrate the light they cover (z planes stay point samples)
    finer = md.psf.widefield((61, 241, 241), (0.1, 0.02, 0.02), oversample=1, **optics)  # wider: no edge loss
    integrated = md.psf.widefield((31, 25, 25), (0.2, 0.1, 0.1), oversample=5, **optics)
    resampled = md.psf.resample(finer, (0.1, 0.02, 0.02), (0.2, 0.1, 0.1), shape=(31, 25, 25))
    assert np.abs(resampled - integrated).sum() < 1e-3  # measured 4e-9


def test_resample_checks_its_arguments():
    psf = md.psf.gaussian((9, 9), 1.0)
    with pytest.raises(ValueError, match="new_spacing"):
        md.psf.resample(psf, (0.1, 0.1), (0.1, -0.1))
    with pytest.raises(ValueError, match="spacing needs one value per axis"):
        md.psf.resample(psf, (0.1, 0.1, 0.1), (0.1, 0.1))


def test_widefield_agrees_with_psfmodels():
    # psfmodels (PyPI; Aguet's C++ implementation of the Gibson-Lanni scalar model), matched indices
    psfmodels = pytest.importorskip("psfmodels")
    z = (np.arange(41) - 20) * 0.1
    n = 1.515
    params = dict(NA=1.4, ng0=n, ng=n, ni0=n, ni=n, ns=n, ti0=150, tg=170, tg0=170)
    reference = psfmodels.scalar_psf(z, nx=41, dxy=0.05, pz=0, wvl=0.6, params=params, normalize=False)
    reference = reference / reference.sum()
    ours = md.psf.widefield(
        (41, 41, 41), (0.1, 0.05, 0.05), wavelength=0.6, na=1.4, n_immersion=n, oversample=1
    )
    assert np.abs(ours - reference).sum() < 0.02  # measured: 0.8% relative L1


def test_confocal_is_narrower_and_sections_optically():
    shape, spacing = (41, 81, 81), (0.2, 0.02, 0.02)
    widefield = md.psf.widefield(shape, spacing, wavelength=0.5, na=1.4).astype(np.float64)
    widths, falloff = [], []
    for pinhole in (0.0, 1.0, 2.0):
        psf = md.psf.confocal(shape, spacing, excitation=0.5, emission=0.5, na=1.4, pinhole=pinhole)
        psf = psf.astype(np.float64)
        widths.append(fwhm(psf[20, 40, :], 0.02))
        planes = psf.sum(axis=(1, 2))
        falloff.append(planes[30] / planes[20])  # 2 um from focus
    assert abs(widths[0] - 0.37 * 0.5 / 1.4) < 0.03 * 0.37 * 0.5 / 1.4  # point detector: 0.37 lambda/NA
    assert widths[0] < widths[1] < widths[2] <= fwhm(widefield[20, 40, :], 0.02) * 1.01
    planes = widefield.sum(axis=(1, 2))
    assert max(falloff) < 0.1 * planes[30] / planes[20]  # out-of-focus light rejected
    with pytest.raises(ValueError, match="pinhole"):
        md.psf.confocal(shape, spacing, excitation=0.5, emission=0.5, na=1.4, pinhole=-1.0)


@pytest.mark.parametrize(
    "n_sample,depth,n_immersion,na",
    [(1.33, 5.0, 1.515, 1.4), (1.45, 10.0, 1.515, 1.4), (1.33, 3.0, 1.33, 1.2)],
)
def test_gibson_lanni_mismatch_agrees_with_psfmodels(n_sample, depth, n_immersion, na):
    # refractive-index mismatch: oil objective into water or glycerol, and water into water
    psfmodels = pytest.importorskip("psfmodels")
    z = depth + (np.arange(41) - 20) * 0.1
    params = dict(
        NA=na, ng0=1.515, ng=1.515, ni0=n_immersion, ni=n_immersion, ns=n_sample, ti0=150, tg=170, tg0=170
    )
    reference = psfmodels.scalar_psf(z, nx=41, dxy=0.05, pz=depth, wvl=0.6, params=params, normalize=False)
    reference = reference / reference.sum()
    ours = md.psf.widefield(
        (41, 41, 41),
        (0.1, 0.05, 0.05),
        wavelength=0.6,
        na=na,
        n_immersion=n_immersion,
        n_sample=n_sample,
        particle_depth=depth,
        oversample=1,
    )
    assert np.abs(ours - reference).sum() < 0.04  # measured: 0.7% to 2.0% relative L1
    if n_sample < n_immersion:  # the focal shift moves the peak off the nominal plane
        assert abs(int(np.argmax(ours.sum(axis=(1, 2)))) - int(np.argmax(reference.sum(axis=(1, 2))))) <= 1


def test_gaussian_sigma_in_micrometres_with_anisotropic_voxels():
    in_um = md.psf.gaussian((15, 31), (0.6, 0.2), spacing=(0.3, 0.1))
    np.testing.assert_allclose(in_um, md.psf.gaussian((15, 31), (2.0, 2.0)), rtol=1e-6)


def test_widefield_focal_plane_is_the_airy_pattern_over_a_wide_field():
    from scipy.special import j1

    na, wavelength, dx = 1.4, 0.52, 0.1
    plane = md.psf.widefield((1, 257, 257), (0.1, dx, dx), wavelength=wavelength, na=na, oversample=1)[0]
    y, x = np.indices(plane.shape) - 128
    v = 2 * np.pi / wavelength * na * np.hypot(y, x) * dx
    airy = np.where(v > 0, (2 * j1(v) / np.where(v > 0, v, 1)) ** 2, 1.0)
    assert np.abs(plane - airy / airy.sum()).sum() < 0.03  # measured 1.4% (rings out to 18 um)


def test_widefield_and_confocal_name_bad_optics():
    with pytest.raises(ValueError, match="n_coverslip_design"):
        md.psf.widefield((3, 9, 9), (0.2, 0.1, 0.1), wavelength=0.5, na=1.4, n_coverslip_design=1.33)
    with pytest.raises(ValueError, match="n_immersion_design"):
        md.psf.widefield((3, 9, 9), (0.2, 0.1, 0.1), wavelength=0.5, na=1.4, n_immersion_design=1.33)
    with pytest.raises(ValueError, match="emission"):
        md.psf.confocal((3, 9, 9), (0.2, 0.1, 0.1), excitation=0.5, emission=-0.5, na=1.2)
    with pytest.raises(ValueError, match="excitation"):
        md.psf.confocal((3, 9, 9), (0.2, 0.1, 0.1), excitation=0.0, emission=0.5, na=1.2)


def test_prepare_refuses_pure_noise():
    with pytest.raises(ValueError, match="no bead"):
        md.psf.prepare(np.random.default_rng(7).poisson(100, (31, 64, 64)))


def test_from_beads_recovers_a_widefield_psf_with_its_rings():
    rng = np.random.default_rng(5)
    truth = md.psf.widefield(
        (21, 31, 31), (0.2, 0.1, 0.1), wavelength=0.52, na=1.2, n_immersion=1.33, oversample=1
    )
    points = np.zeros((48, 160, 160))
    for y in (30, 80, 130):
        for x in (30, 80, 130):
            points[24, y, x] = 1
    blurred = md.convolve(points, truth, device="cpu").clip(0)
    stack = rng.poisson(blurred / blurred.max() * 20000 + 100)
    found = md.psf.from_beads(stack, (21, 31, 31), min_distance=20)
    assert found.count == 9  # rings and axial lobes are not taken for neighbouring beads
    assert np.abs(found.psf - truth / truth.sum()).sum() < 0.05  # measured 4.1% (relative L1)
    with pytest.raises(ValueError, match="size needs one value or one per axis"):
        md.psf.from_beads(stack, (21, 31))


def test_prepare_centres_on_the_mass_or_on_a_fitted_peak():
    # a skewed bead: its centre of mass and its peak are in different places
    grid = np.indices((31, 31), dtype=np.float64)
    skewed = np.exp(-0.5 * (((grid[0] - 14.6) / 2.0) ** 2 + ((grid[1] - 15.3) / 1.5) ** 2))
    skewed += 0.3 * np.exp(-0.5 * (((grid[0] - 19.0) / 3.0) ** 2 + ((grid[1] - 15.3) / 3.0) ** 2))
    bead = 10000 * skewed + 100
    by_mass = md.psf.prepare(bead, background=100.0, center="mass")
    np.testing.assert_allclose(ndimage.center_of_mass(by_mass), (15, 15), atol=0.02)
    by_peak = md.psf.prepare(bead, background=100.0, center="peak")
    smooth = ndimage.gaussian_filter(by_peak.astype(np.float64), 1.0)
    top = np.unravel_index(int(smooth.argmax()), smooth.shape)
    assert top == (15, 15)
    np.testing.assert_allclose(md.psf._fitted_peak(smooth, top), (15, 15), atol=0.05)
    assert ndimage.center_of_mass(by_peak)[0] > 15.5  # the tail is left where it is
    with pytest.raises(ValueError, match="center must be one of"):
        md.psf.prepare(bead, center="middle")


def test_confocal_with_an_index_mismatch_shifts_like_its_widefield_factors():
    args = dict(na=1.4, n_immersion=1.515, n_sample=1.33, particle_depth=10.0)
    shape, spacing = (61, 33, 33), (0.1, 0.05, 0.05)
    confocal = md.psf.confocal(shape, spacing, excitation=0.5, emission=0.5, pinhole=0.0, **args)
    widefield = md.psf.widefield(shape, spacing, wavelength=0.5, **args).astype(np.float64)
    np.testing.assert_allclose(confocal, (widefield**2) / (widefield**2).sum(), rtol=1e-4, atol=1e-9)
    assert int(np.argmax(confocal.sum(axis=(1, 2)))) != 30  # the focal shift moved the peak


def test_from_beads_ignores_hot_pixels():
    rng = np.random.default_rng(6)
    positions = [(16.0, y, x) for y in (30.0, 90.0) for x in (30.0, 90.0)]
    stack = bead_stack(rng, positions, (2.0, 1.5, 1.5))
    clean = md.psf.from_beads(stack, (15, 21, 21), min_distance=8)
    stack[16, 60, 60] = 60000  # one hot camera pixel, far from the beads
    with_hot = md.psf.from_beads(stack, (15, 21, 21), min_distance=8)
    assert clean.count == with_hot.count == 4
    np.testing.assert_allclose(with_hot.psf, clean.psf, atol=1e-7)


def test_energy_crop_is_the_smallest_box_grown_axis_by_axis():
    # elongated along z: a cube would waste voxels on y and x and still run short in z
    psf = md.psf.gaussian((61, 61, 61), (6.0, 1.5, 1.5))
    cropped = md.psf.prepare(psf * 1e4, background=0.0, energy=0.95)
    inner = tuple(slice(30 - s // 2, 30 - s // 2 + s) for s in cropped.shape)
    assert float(psf[inner].sum()) >= 0.95 * float(psf.sum())
    assert cropped.shape[0] > 2 * cropped.shape[1]  # the box follows the PSF's shape
    assert np.prod(cropped.shape) < 0.2 * max(cropped.shape) ** 3


def test_models_on_the_cpu_are_numpy():
    assert type(md.psf.gaussian((5, 5), 1.0, device="cpu")) is np.ndarray
    with pytest.raises(ValueError, match="device"):
        md.psf.gaussian((5, 5), 1.0, device="tpu")


@pytest.mark.gpu
def test_psf_tools_deliver_on_the_gpu(device):
    if device != "gpu":
        pytest.skip("GPU only")
    import cupy

    model = md.psf.widefield(
        (9, 17, 17), (0.2, 0.1, 0.1), wavelength=0.5, na=1.2, n_immersion=1.33, device="gpu"
    )
    assert isinstance(model, cupy.ndarray) and abs(float(model.sum()) - 1) < 1e-5
    bead = cupy.asarray(np.random.default_rng(0).poisson(5000 * md.psf.gaussian((21, 21), 2.0) / 0.04 + 50))
    assert isinstance(md.psf.prepare(bead), cupy.ndarray)
    assert isinstance(md.psf.resample(model, (0.2, 0.1, 0.1), (0.2, 0.2, 0.2)), cupy.ndarray)
