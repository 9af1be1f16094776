"""microdecon.skimage against scikit-image itself: same signatures, dtypes and numbers; and
scikit-image's own restoration tests run against the twins (slow, downloads the sdist)."""

import hashlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import urllib.error
import urllib.request

import numpy as np
import pytest
import skimage
from scipy.signal import convolve
from skimage import restoration as reference

from microdecon import skimage as twin
from microdecon._backend import gpu_available

from .conftest import to_numpy

SHAPES = {1: (64,), 2: (30, 34), 3: (12, 10, 14)}
DTYPES = [np.float16, np.float32, np.float64, np.int16]


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|"""
    ours, theirs = np.asarray(to_numpy(ours)), np.asarray(theirs)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def tolerance(dtype) -> float:
    # float16 and float32 data are computed in float32 by both
    return 1e-10 if np.dtype(dtype) in (np.float64, np.int16) else 1e-4


def blurred_data(ndim, psf_size, dtype, seed=0):
    rng = np.random.default_rng(seed)
    psf = rng.random((psf_size,) * ndim) + 0.5  # asymmetric: a flipped PSF would show
    psf /= psf.sum()
    data = convolve(rng.random(SHAPES[ndim]), psf, "same") + 0.02 * rng.standard_normal(SHAPES[ndim])
    if np.dtype(dtype).kind == "i":
        return (data * 1000).astype(dtype), psf
    return data.astype(dtype), psf


@pytest.mark.parametrize("name", ["richardson_lucy", "wiener", "unsupervised_wiener"])
def test_signatures_are_scikit_images(name):
    ours, theirs = inspect.signature(getattr(twin, name)), inspect.signature(getattr(reference, name))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in theirs.parameters.values()
    ]


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("psf_size", [3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "params",
    [{}, {"clip": False, "num_iter": 7}, {"clip": False, "filter_epsilon": 0.05}, {"num_iter": 0}],
    ids=["default", "no-clip", "filter-epsilon", "no-iterations"],
)
def test_richardson_lucy_matches(ndim, psf_size, dtype, params):
    data, psf = blurred_data(ndim, psf_size, dtype)
    expected = reference.richardson_lucy(data, psf, **{"num_iter": 10, **params})
    result = twin.richardson_lucy(data, psf, **{"num_iter": 10, **params})
    assert result.dtype == expected.dtype
    assert type(result) is np.ndarray and result.shape == expected.shape
    assert relative_error(result, expected) < tolerance(dtype)  # measured: 5e-6 (float32), 6e-15


def test_richardson_lucy_even_psf_shift_is_scikit_images():
    # scikit-image's "same" convolution puts an even PSF's origin at p/2 - 1 for the blur and p/2 for
    # the back-projection: a point restored with an even, asymmetric PSF drifts the same way
    image = np.zeros(32)
    image[16] = 1
    psf = np.array([0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(
        twin.richardson_lucy(image, psf, 30, clip=False),
        reference.richardson_lucy(image, psf, 30, clip=False),
        rtol=1e-9,
        atol=1e-12,
    )


def test_richardson_lucy_psf_larger_than_image_and_lists():
    rng = np.random.default_rng(1)
    image, psf = rng.random((6, 7)), rng.random((9, 8))
    np.testing.assert_allclose(twin.richardson_lucy(image, psf, 5), reference.richardson_lucy(image, psf, 5))
    np.testing.assert_allclose(
        twin.richardson_lucy(image.tolist(), psf.tolist(), 3), reference.richardson_lucy(image, psf, 3)
    )


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("psf_size", [3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "params",
    [
        {"balance": 0.05},
        {"balance": 1e-3, "clip": False},
        {"balance": np.float64(0.1), "clip": False},  # NumPy's promotion: float32 data give float64
        {"balance": 0.1, "is_real": False, "clip": False},
        {"balance": 0.1, "reg": "box"},
        {"balance": 0.1, "reg": "transfer-function", "clip": False},
        {"balance": 0.1, "psf": "transfer-function", "clip": False},
    ],
    ids=["default", "no-clip", "float64-balance", "complex", "reg", "reg-tf", "psf-tf"],
)
def test_wiener_matches(ndim, psf_size, dtype, params):
    data, psf = blurred_data(ndim, psf_size, dtype)
    params = dict(params)
    if params.get("reg") == "box":
        params["reg"] = np.ones((2,) * ndim)
    elif params.get("reg") == "transfer-function":
        params["reg"] = reference.uft.ir2tf(np.ones((3,) * ndim) - 1.5, data.shape)
    if params.pop("psf", None) == "transfer-function":
        psf = reference.uft.ir2tf(psf, data.shape)
    expected = reference.wiener(data, psf, **params)
    result = twin.wiener(data, psf, **params)
    assert result.dtype == expected.dtype
    assert relative_error(result, expected) < tolerance(dtype)  # measured: 0 (identical bits)


@pytest.mark.skipif(gpu_available(), reason="with a GPU present the twin computes there")
def test_wiener_is_bit_identical_on_the_cpu():
    data, psf = blurred_data(2, 5, np.float32, seed=3)
    np.testing.assert_array_equal(twin.wiener(data, psf, 0.05), reference.wiener(data, psf, 0.05))


UNSUPERVISED_CASES = {
    "square": ((40, 40), 5, {}),
    "even-psf": ((48, 40), 6, {}),
    # scikit-image takes a half spectrum with M == N // 2 + 1 for a full one; reproduced
    "m-equals-half-n": ((33, 64), 4, {}),
    "user-params": ((40, 40), 5, {"user_params": {"burnin": 5, "min_num_iter": 10, "threshold": 1e-3}}),
    "complex": ((40, 40), 5, {"is_real": False, "clip": False}),
    "reg": ((32, 36), 3, {"reg": np.ones((2, 2)), "clip": False}),
    "few-iterations": ((32, 32), 3, {"user_params": {"max_num_iter": 20}}),
}


@pytest.mark.parametrize("case", list(UNSUPERVISED_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_unsupervised_wiener_gives_the_same_numbers_for_a_seed(case, dtype):
    shape, psf_size, params = UNSUPERVISED_CASES[case]
    rng = np.random.default_rng(4)
    psf = rng.random((psf_size, psf_size)) + 0.5
    psf /= psf.sum()
    data = (convolve(rng.random(shape), psf, "same") + 0.05 * rng.standard_normal(shape)).astype(dtype)
    expected, expected_chains = reference.unsupervised_wiener(data, psf, rng=7, **params)
    result, chains = twin.unsupervised_wiener(data, psf, rng=7, **params)
    assert result.dtype == expected.dtype and type(result) is np.ndarray
    assert relative_error(result, expected) < tolerance(dtype)  # measured: 3e-7 (float32), 1e-15
    assert sorted(chains) == ["noise", "prior"]
    for key in chains:
        assert len(chains[key]) == len(expected_chains[key])
        assert chains[key][0] == 1
        assert relative_error(chains[key], expected_chains[key]) < tolerance(dtype)


def test_unsupervised_wiener_generator_callback_and_clip():
    data, psf = blurred_data(2, 5, np.float64, seed=5)
    seen_ours, seen_theirs = [], []
    params = {"user_params": {"callback": seen_ours.append}}
    result, chains = twin.unsupervised_wiener(data * 3, psf, rng=np.random.default_rng(2), **params)
    expected, _ = reference.unsupervised_wiener(
        data * 3, psf, rng=np.random.default_rng(2), user_params={"callback": seen_theirs.append}
    )
    np.testing.assert_allclose(result, expected, rtol=1e-10, atol=1e-12)
    assert result.max() == 1 and len(seen_ours) == len(seen_theirs) == len(chains["noise"]) - 1
    np.testing.assert_allclose(seen_ours[-1], seen_theirs[-1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ndim", [1, 3])
def test_unsupervised_wiener_other_dimensions_embed_the_2d_case(ndim):
    # scikit-image transforms the last two axes only (a 1-D image fails, a 3-D one mixes 2-D and
    # 3-D transforms); the twin transforms every axis, so a line, or a stack of one plane, is
    # restored exactly as scikit-image restores it as a 2-D image
    data, psf = blurred_data(2, 5, np.float64, seed=7)
    if ndim == 1:
        data, psf = data[0], psf[2] / psf[2].sum()
        laplacian = np.array([[-1.0, 2.0, -1.0]])  # the twin's default in 1-D (3 x 3 fits no 1 x N)
        expected, chains = reference.unsupervised_wiener(data[None], psf[None], reg=laplacian, rng=3)
        expected = expected[0]
    else:
        expected, chains = reference.unsupervised_wiener(data, psf, rng=3)
        data, psf = data[None], psf[None]
        expected = expected[None]
    result, ours = twin.unsupervised_wiener(data, psf, rng=3)
    assert result.shape == data.shape
    assert relative_error(result, expected) < 1e-10
    assert relative_error(ours["prior"], chains["prior"]) < 1e-10


def test_unsupervised_wiener_in_3d_recovers_the_noise_level():
    rng = np.random.default_rng(8)
    shape, sigma = (16, 20, 24), 0.05
    truth = convolve(rng.random(shape), np.ones((3, 3, 3)) / 27, "same")
    psf = np.zeros((3, 3, 3))
    psf[1, 1, :] = psf[1, :, 1] = psf[:, 1, 1] = 1
    psf /= psf.sum()
    data = np.real(np.fft.ifftn(np.fft.fftn(truth) * reference.uft.ir2tf(psf, shape, is_real=False)))
    data += sigma * rng.standard_normal(shape)
    out, chains = twin.unsupervised_wiener(data, psf, rng=0, clip=False)
    assert out.shape == shape and out.dtype == np.float64
    noise_sigma = 1 / np.sqrt(np.mean(chains["noise"][-10:]))
    assert noise_sigma == pytest.approx(sigma, rel=0.1)
    assert np.mean((out - truth) ** 2) < np.mean((data - truth) ** 2)


def test_errors_are_clear():
    image, psf = np.ones((8, 8)), np.ones((3, 3)) / 9
    with pytest.raises(ValueError, match="complex valued input is not supported"):
        twin.wiener(image.astype(complex), psf, 0.1)
    with pytest.raises(ValueError, match="psf has 1 axes but the image has 2"):
        twin.richardson_lucy(image, np.ones(3))
    with pytest.raises(ValueError, match="num_iter must be >= 0"):
        twin.richardson_lucy(image, psf, -1)
    with pytest.raises(ValueError, match=r"user_params has unknown keys \['max_iter'\]"):
        twin.unsupervised_wiener(image, psf, user_params={"max_iter": 10})
    with pytest.raises(TypeError, match="user_params\\['burnin'\\] must be an integer"):
        twin.unsupervised_wiener(image, psf, user_params={"burnin": 1.5})
    with pytest.raises(TypeError, match="balance must be a number"):
        twin.wiener(image, psf, None)
    with pytest.raises(ValueError, match="image is empty"):
        twin.wiener(np.ones((0, 4)), psf, 0.1)


@pytest.mark.gpu
def test_cupy_in_cupy_out():
    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    import cupy

    data, psf = blurred_data(2, 4, np.float32)
    for name, args in (("richardson_lucy", (10,)), ("wiener", (0.05,))):
        result = getattr(twin, name)(cupy.asarray(data), psf, *args)
        assert isinstance(result, cupy.ndarray) and result.dtype == np.float32
        assert relative_error(result, getattr(reference, name)(data, psf, *args)) < 1e-4
    result, chains = twin.unsupervised_wiener(cupy.asarray(data), psf, rng=1)
    assert isinstance(result, cupy.ndarray) and result.dtype == np.float32
    # other random numbers on the GPU: the same noise level, within the spread between seeds
    # (measured on the CPU over 11 seeds: 4 % standard deviation, extremes -6 % and +5 %)
    expected = np.mean(
        [np.mean(reference.unsupervised_wiener(data, psf, rng=s)[1]["noise"][-10:]) for s in (1, 2, 3)]
    )
    assert np.mean(chains["noise"][-10:]) == pytest.approx(expected, rel=0.15)


# --------------------------------------------------------------------------------------------
# scikit-image's own tests, pointed at the twins
# --------------------------------------------------------------------------------------------
_PLUGIN = '''
"""Makes skimage.restoration's deconvolution functions microdecon's twins, before collection."""
import hashlib
import json
import pathlib
import urllib.request

import pytest
from skimage import restoration
from skimage._shared import testing
from skimage.data._registry import registry, registry_urls

from microdecon import skimage as twin

HERE = pathlib.Path(__file__).absolute().parent

CALLS = {"richardson_lucy": 0, "wiener": 0, "unsupervised_wiener": 0}


def _counted(name):
    function = getattr(twin, name)

    def wrapper(*args, **kwargs):
        CALLS[name] += 1
        return function(*args, **kwargs)

    return wrapper


for _name in CALLS:
    setattr(restoration, _name, _counted(_name))


_skimage_fetch = testing.fetch


def _fetch(data_filename, prefix=None):
    """scikit-image's fetch needs pooch for remote reference files; without it, try the URL here."""
    if prefix is None and data_filename in registry_urls:
        target = HERE / "remote" / data_filename
        try:
            with urllib.request.urlopen(registry_urls[data_filename], timeout=30) as answer:
                content = answer.read()
            if hashlib.sha256(content).hexdigest() == registry[data_filename]:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(content)
                return str(target)
        except OSError:
            pass
    return _skimage_fetch(data_filename, prefix=prefix)


testing.fetch = _fetch


@pytest.fixture
def test_root_dir():
    return HERE


def pytest_sessionfinish(session):
    (HERE / "calls.json").write_text(json.dumps(CALLS))
'''


def _download_sdist(version: str) -> bytes:
    """scikit-image's source distribution, from the package index pip uses (its JSON API, PEP 691).

    ``pip download --no-binary :all:`` would do, but it builds the package's metadata first, which
    needs scikit-image's build tools; only the archive is wanted here.
    """
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(
        f"{index}/scikit-image/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        files = json.load(answer)["files"]
    wanted = f"scikit_image-{version}.tar.gz"
    entry = next((f for f in files if f["filename"] == wanted), None)
    if entry is None:
        pytest.skip(f"the package index has no {wanted}")
    with urllib.request.urlopen(entry["url"], timeout=120) as answer:
        archive = answer.read()
    digest = entry.get("hashes", {}).get("sha256")
    if digest and hashlib.sha256(archive).hexdigest() != digest:
        raise AssertionError(f"{wanted}: sha256 differs from the index's")
    return archive


@pytest.mark.slow
def test_scikit_images_own_restoration_tests_pass(tmp_path):
    version = skimage.__version__
    try:
        archive = _download_sdist(version)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        pytest.skip(f"offline: could not download scikit-image {version}'s sources ({error})")
    folder = tmp_path / "skimage_tests"
    (folder / "restoration").mkdir(parents=True)
    prefix = f"scikit_image-{version}/tests/skimage/restoration/"
    with tarfile.open(fileobj=io.BytesIO(archive)) as sdist:
        members = [m for m in sdist.getmembers() if m.isfile() and m.name.startswith(prefix)]
        wanted = [m for m in members if m.name.endswith((".npy", "test_restoration.py"))]
        assert any(m.name.endswith("test_restoration.py") for m in wanted), "no test_restoration.py"
        for member in wanted:
            name = member.name[len(prefix) :]
            if "/" in name:  # only the folder's own files
                continue
            (folder / "restoration" / name).write_bytes(sdist.extractfile(member).read())
    (folder / "conftest.py").write_text(textwrap.dedent(_PLUGIN))
    (folder / "pytest.ini").write_text("[pytest]\n")  # none of this project's options
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "restoration/test_restoration.py",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    # 23 tests; the 6 of test_richardson_lucy_filtered skip unless their reference file downloads
    assert passed >= 17, summary
    calls = json.loads((folder / "calls.json").read_text())
    assert all(count > 0 for count in calls.values()), calls  # the twins, not scikit-image, ran
    print(f"scikit-image {version} test_restoration.py against microdecon.skimage: {summary}; calls {calls}")
