"""Richardson–Lucy accelerated by conjugate gradients (``accelerate="conjugate-gradient"``)."""

import sys

import numpy as np
import pytest

import microdecon as md
from microdecon import tiling
from microdecon._backend import get_backend
from microdecon._tile_model import applying

from .conftest import psnr, to_numpy

CG = "conjugate-gradient"
conjugate_module = sys.modules["microdecon.restore._conjugate"]


@pytest.fixture(scope="module")
def cell():
    """A cell-like 3-D phantom through a Gaussian PSF, 200 photons at the peak, background 10."""
    rng = np.random.default_rng(2)
    truth = md.data.phantom((16, 64, 64), seed=5)
    psf = md.psf.gaussian((9, 11, 11), (2.0, 1.5, 1.5))
    blurred = np.maximum(md.convolve(truth, psf, device="cpu"), 0)
    scale = 200 / float(blurred.max())
    image = rng.poisson(blurred * scale + 10).astype(np.float32)
    return truth * scale, psf, image


def _curve(image, psf, num_iter, accelerate, device="cpu", **params):
    curve = []
    md.richardson_lucy(
        image,
        psf,
        num_iter,
        accelerate=accelerate,
        background=10.0,
        device=device,
        callback=lambda i, e: curve.append(to_numpy(e).copy()) and None,
        **params,
    )
    return curve


def test_reaches_plain_rls_50_iteration_quality_several_times_sooner(cell):
    truth, psf, image = cell
    plain = [psnr(truth, e) for e in _curve(image, psf, 50, False)]
    extrapolated = [psnr(truth, e) for e in _curve(image, psf, 25, True)]
    conjugate = [psnr(truth, e) for e in _curve(image, psf, 25, CG)]
    target = max(plain)

    def reached(curve):
        return next(i + 1 for i, value in enumerate(curve) if value >= target)

    # measured: plain RL's best of 50 iterations (39.27 dB) after 8 of these, 14 of Biggs–Andrews';
    # both then peak near 40 dB (40.13 and 39.98 within 25)
    assert reached(conjugate) <= 10 and reached(conjugate) <= reached(extrapolated) - 4
    assert max(conjugate) > max(extrapolated) - 0.1 > target


@pytest.mark.parametrize("boundary", ["non-circulant", "periodic", "reflect"])
def test_every_boundary_restores_better_than_the_other_schemes(device, boundary):
    # data blurred with the boundary model that restores them; measured at 10 iterations (plain,
    # Biggs–Andrews, conjugate gradients; data 36.5 dB): non-circulant 38.11, 38.62, 39.72;
    # periodic 37.93, 38.43, 39.69; reflect 38.11, 38.59, 39.69
    rng = np.random.default_rng(2)
    truth = md.data.phantom((16, 64, 64), seed=5)
    psf = md.psf.gaussian((9, 11, 11), (2.0, 1.5, 1.5))
    blurred = np.maximum(md.convolve(truth, psf, boundary=boundary, device="cpu"), 0)
    scale = 200 / float(blurred.max())
    image = rng.poisson(blurred * scale + 10).astype(np.float32)
    scores = {}
    for accelerate in (False, True, CG):
        out = md.richardson_lucy(
            image, psf, 10, accelerate=accelerate, background=10.0, boundary=boundary, device=device
        )
        out = to_numpy(out)
        assert out.dtype == np.float32 and out.shape == image.shape and out.min() >= 0
        scores[accelerate] = psnr(truth * scale, out)
    assert scores[CG] > max(scores[False], scores[True]) + 0.7


def test_1d_and_2d(device):
    signal = np.zeros(200, np.float32)
    signal[[40, 46, 120]] = [50, 80, 60]
    psf = md.psf.gaussian(21, 3.0)
    blurred = md.convolve(signal, psf, device="cpu") + 1
    # the peaks part, and each keeps its light (measured: the dip between them at 0.33 of the
    # lower peak after 20 iterations, 0.23 after 30; their light 129.9 and 61.1 after 20, 130.4
    # and 60.4 after 30)
    restored = to_numpy(md.richardson_lucy(blurred, psf, 20, accelerate=CG, background=1.0, device=device))
    assert abs(restored[30:60].sum() - 130) < 2 and abs(restored[110:130].sum() - 60) < 1.5
    restored = to_numpy(md.richardson_lucy(blurred, psf, 30, accelerate=CG, background=1.0, device=device))
    assert abs(restored[30:60].sum() - 130) < 1 and abs(restored[110:130].sum() - 60) < 1
    assert restored[41:46].min() < 0.3 * min(restored[38:43].max(), restored[44:49].max())
    truth = md.data.phantom((64, 64), seed=4)
    psf2 = md.psf.gaussian((15, 15), 2.0)
    noisy = np.random.default_rng(1).poisson(np.maximum(md.convolve(truth, psf2, device="cpu"), 0) * 50) / 50
    out = md.richardson_lucy(noisy.astype(np.float32), psf2, 10, accelerate=CG, device=device)
    assert psnr(truth, out) > psnr(truth, noisy) + 2


def test_gpu_follows_the_cpu(cell):
    from microdecon._backend import gpu_available

    if not gpu_available():
        pytest.skip("needs CuPy and a CUDA GPU")
    truth, psf, image = cell
    cpu = [psnr(truth, e) for e in _curve(image, psf, 12, CG)]
    gpu = [psnr(truth, e) for e in _curve(image, psf, 12, CG, device="gpu")]
    np.testing.assert_allclose(gpu, cpu, atol=0.05)


test_gpu_follows_the_cpu = pytest.mark.gpu(test_gpu_follows_the_cpu)


@pytest.mark.parametrize("problem, bound", [("cell", 0.005), ("dim", 0.02)])
def test_the_model_carried_by_linearity_stays_that_of_the_estimate(problem, bound, cell, monkeypatch):
    # between refreshes H x is carried as H x + t H d: the clip at the floor parts it from the
    # blur of the estimate, and a clip past CLIP_REFRESH of the step refreshes it (measured over
    # 25 iterations, relative L2: 0.14% on the bright cell, 1.1% on a dim one, where the first
    # step's clip left it 10% off before)
    from microdecon.operators import Convolution

    from .test_richardson_lucy import _photon_problem

    image, psf = (cell[2], cell[1]) if problem == "cell" else _photon_problem(15)[:2]
    check = Convolution(psf, image.shape, backend=get_backend(device="cpu"))  # not the run's own
    errors = []
    original = conjugate_module.ConjugateGradient.iterate

    def spy(self, iteration, estimate, *args):
        original(self, iteration, estimate, *args)
        if self.pending is not None:
            carried = self.model + np.float32(self.pending) * self.scratch  # scratch: H d
            exact = check.forward(estimate)
            errors.append(float(np.linalg.norm(carried - exact) / np.linalg.norm(exact)))

    monkeypatch.setattr(conjugate_module.ConjugateGradient, "iterate", spy)
    md.richardson_lucy(image, psf, 25, accelerate=CG, background=10.0, device="cpu")
    assert len(errors) >= 15 and max(errors) < bound


@pytest.mark.parametrize("problem", ["cell", "dim"])
def test_a_restart_makes_the_model_anew_only_after_clips(problem, cell, monkeypatch):
    # the model is made anew after a clip past CLIP_REFRESH of the step, and at a restart after
    # clips past RESTART_CLIP of it since it was last made: not at every restart
    from .test_richardson_lucy import _photon_problem

    image, psf = (cell[2], cell[1]) if problem == "cell" else _photon_problem(15)[:2]
    backend = get_backend(device="cpu")
    sums, remade = [], []
    advance, iterate = backend.cg_advance, conjugate_module.ConjugateGradient.iterate

    def measured(*args, **kwargs):
        sums.append(advance(*args, **kwargs))
        return sums[-1]

    def spy(self, iteration, *args):
        iterate(self, iteration, *args)
        remade.append(self.pending is None)

    monkeypatch.setattr(backend, "cg_advance", measured)
    monkeypatch.setattr(conjugate_module.ConjugateGradient, "iterate", spy)
    md.richardson_lucy(image, psf, 24, accelerate=CG, background=10.0, device="cpu")
    expected, since, restarts = [], 0.0, {True: 0, False: 0}
    for iteration, ((clipped, stepped), was_remade) in enumerate(zip(sums[:-1], remade), start=1):
        since += clipped
        if iteration % conjugate_module.RESTART_EVERY == 0:
            expected.append(since > conjugate_module.RESTART_CLIP * stepped)
            restarts[was_remade] += 1
        else:
            expected.append(clipped > conjugate_module.CLIP_REFRESH * stepped)
        since = 0.0 if expected[-1] else since
    assert remade[:-1] == expected and len(expected) == 23
    assert restarts[False] >= 2  # restarts that kept the carried model


@pytest.mark.parametrize("boundary", ["non-circulant", "periodic", "reflect"])
def test_the_operators_scratch_holds_the_blur_of_the_direction_followed(boundary, cell, monkeypatch):
    # H d lives in the operator's scratch from the line search to the next iteration's ratio:
    # nothing in between may overwrite it (a callback, the hold-out count, a restart's re-blur)
    from microdecon.operators import Convolution

    truth, psf, image = cell
    check = Convolution(psf, image.shape, boundary=boundary, backend=get_backend(device="cpu"))
    errors = []
    original = conjugate_module.ConjugateGradient.iterate
    original_length = conjugate_module.ConjugateGradient.step_length
    calls = [0]

    def stalling(self, blurred):  # every 5th line search reports no ascent: a restart re-blurs
        length, ascends = original_length(self, blurred)
        calls[0] += 1
        return length, ascends and calls[0] % 5 != 0

    def spy(self, iteration, estimate, *args):
        if self.pending is not None:
            direction = to_numpy(self.direction)
            if direction.dtype == np.uint16:
                direction = md._backend.from_bfloat16(direction)
            exact = check.forward(direction)
            errors.append(float(np.abs(to_numpy(self.scratch) - exact).max() / np.abs(exact).max()))
        original(self, iteration, estimate, *args)

    monkeypatch.setattr(conjugate_module.ConjugateGradient, "iterate", spy)
    monkeypatch.setattr(conjugate_module.ConjugateGradient, "step_length", stalling)
    callback = lambda i, e: md.convolve(e, psf, device="cpu") is None  # noqa: E731 - the operator is busy
    md.richardson_lucy(
        image, psf, 12, accelerate=CG, background=10.0, boundary=boundary, device="cpu", callback=callback
    )
    md.richardson_lucy(image, psf, accelerate=CG, background=10.0, boundary=boundary, device="cpu")  # auto
    assert len(errors) >= 10 and max(errors) < 1e-5


def test_reflect_with_an_asymmetric_psf_keeps_its_normalization_exact():
    # H^T 1 reaches 1.5 at the edges there: stored in 16-bit units of 1 it was cut to 1, and the
    # likelihood after 40 iterations fell below plain RL's
    from microdecon.operators import Convolution

    truth = md.data.phantom((64, 64), seed=0) * 50 + 1
    psf = np.zeros((9, 9))
    psf[4, 4], psf[4, 7], psf[7, 5], psf[1, 1] = 1, 1, 0.6, 0.3
    op = Convolution(psf, truth.shape, boundary="reflect", backend=get_backend(device="cpu"))
    image = np.random.default_rng(1).poisson(np.clip(op.forward(truth.astype(np.float32)), 0, None))
    image = image.astype(np.float32)

    def misfit(x):
        model = np.maximum(op.forward(x.astype(np.float32)), 1e-6)
        return float(np.sum(model - image * np.log(model)))

    runs = {
        scheme: md.richardson_lucy(image, psf, 40, accelerate=scheme, boundary="reflect", device="cpu")
        for scheme in (CG, False)
    }
    assert misfit(runs[CG]) < misfit(runs[False]) - 10


def test_the_step_maximizes_the_likelihood_along_the_direction():
    # Newton's steps on a 1-D Poisson likelihood land on its maximum (checked on a fine grid).
    # Its maximum lies near where the model turns negative: Halley's step, from the first
    # pass's sums, overshoots there, and disagrees enough with Newton's to be left
    rng = np.random.default_rng(3)
    data = rng.poisson(20, 5000).astype(np.float32)
    model = rng.uniform(10, 30, 5000).astype(np.float32)
    step = (data - model) * np.float32(0.3)
    be = get_backend(device="cpu")
    args = (np.float32(0), np.float32(1e-6), 1.0)
    first, second, third, total, bound = be.poisson_line(data, model, step, *args, 0.0, True)
    ratio = step.astype(np.float64) / model
    assert total == pytest.approx(float(step.sum(dtype=np.float64)), rel=1e-6)
    assert third == pytest.approx(float(np.sum(data * ratio**3)), rel=1e-5)
    assert bound == pytest.approx(float(np.min(model[step < 0] / -step[step < 0])), rel=1e-6)
    slope = first - total
    halley = 2 * slope * second / (2 * second * second - 2 * slope * third)
    length = 0.0
    for _ in range(6):
        first, second, third, _, _ = be.poisson_line(data, model, step, *args, length, False, False)
        assert third == 0  # only the first pass sums it
        length += (first - total) / second
    grid = np.linspace(0.1, 4.3, 10000)  # the model turns negative past 4.37
    likelihood = [np.sum(data * np.log(model + t * step) - t * step) for t in grid]
    best = grid[int(np.argmax(likelihood))]
    assert abs(length - best) < 2e-3
    newton = slope / second
    assert abs(halley - newton) > conjugate_module.HALLEY_AGREEMENT * newton > 0


def test_halley_step_lands_closer_than_newtons_first():
    # a model off by up to 30% of the truth, and the direction to it: the maximum is near 1
    rng = np.random.default_rng(3)
    truth = rng.uniform(10, 30, 5000).astype(np.float32)
    data = rng.poisson(truth).astype(np.float32)
    model = (truth * rng.uniform(0.7, 1.3, 5000)).astype(np.float32)
    step = truth - model
    be = get_backend(device="cpu")
    first, second, third, total, bound = be.poisson_line(
        data, model, step, np.float32(0), np.float32(1e-6), 1.0, 0.0, True
    )
    slope = first - total
    halley = 2 * slope * second / (2 * second * second - 2 * slope * third)
    grid = np.linspace(0.01, 3, 30000)
    best = grid[int(np.argmax([np.sum(data * np.log(model + t * step) - t * step) for t in grid]))]
    assert abs(halley - best) < 0.8 * abs(slope / second - best)


def test_halley_steps_spare_a_pass_and_reach_as_far(cell, monkeypatch):
    # where Halley's step agrees with Newton's, the line search takes one pass, not two: most of
    # the time here, for the same PSNR after 10 iterations as with two Newton steps everywhere
    truth, psf, image = cell
    be = get_backend(device="cpu")
    passes = []
    original = be.poisson_line

    def counted(*args):
        passes.append(args[7])
        return original(*args)

    monkeypatch.setattr(be, "poisson_line", counted)
    fast = md.richardson_lucy(image, psf, 10, accelerate=CG, background=10.0, device="cpu")
    searches = sum(passes)  # each line search opens with one first pass
    assert searches >= 9 and len(passes) - searches <= searches // 2
    monkeypatch.setattr(conjugate_module, "HALLEY_AGREEMENT", 0.0)  # two Newton steps always
    passes.clear()
    slow = md.richardson_lucy(image, psf, 10, accelerate=CG, background=10.0, device="cpu")
    assert len(passes) == 2 * sum(passes)
    assert psnr(truth, fast) > psnr(truth, slow) - 0.05


def test_tiles_equal_the_whole_under_the_tiles_model(cell, monkeypatch):
    truth, psf, image = cell
    tile_shape = (None, 32, 32)
    params = {"num_iter": 8, "accelerate": CG, "background": 10.0}
    tile_plan = tiling.plan(image.shape, psf, "rl", tile_shape=tile_shape, num_iter=8)
    model = tiling._measure_model(image, psf, md.richardson_lucy, tile_plan, params, "cpu")
    assert len(model.values["rl.cg.step"]) == 9  # one step length per iteration (index 0 unused)
    kept = []  # (normalization, direction) dtypes of each run
    original = conjugate_module.ConjugateGradient.__init__

    def spy(self, solver, estimate):
        original(self, solver, estimate)
        kept.append((solver.normalization.dtype.name, self.direction.dtype.name))

    monkeypatch.setattr(conjugate_module.ConjugateGradient, "__init__", spy)
    with applying(model):
        whole = md.richardson_lucy(image, psf, device="cpu", **params)
    tiled = md.deconvolve(image, psf, "rl", tile_shape=tile_shape, device="cpu", **params)
    assert float(np.abs(tiled - whole).max() / whole.max()) < 1e-3
    # tiles keep float32 buffers and normalization (16 bits would magnify their differences
    # from the whole); an untiled run keeps both in 16 bits
    assert len(kept) > 2 and set(kept) == {("float32", "float32")}
    kept.clear()
    md.richardson_lucy(image, psf, 2, accelerate=CG, background=10.0, device="cpu")
    assert kept == [("uint16", "uint16")]


def test_the_compact_normalization_holds_h_transpose_one():
    from microdecon.operators import Convolution
    from microdecon.restore.richardson_lucy import normalization_of

    psf = np.random.default_rng(3).random((7, 9, 5)) + 0.05  # not symmetric
    op = Convolution(psf, (12, 30, 21), backend=get_backend(device="cpu"))
    inverse = normalization_of(op)
    compact = normalization_of(op, compact=True)
    assert inverse.dtype == np.float32 and compact.dtype == np.uint16 and compact.shape == inverse.shape
    seen = inverse > 0
    assert 0 < seen.sum() < seen.size
    np.testing.assert_array_equal(md._backend.seen_by_data(compact), seen)
    visible = compact[seen] / md._backend.VISIBLE_UNITS
    assert np.abs(visible - 1 / inverse[seen].astype(np.float64)).max() <= 0.5 / 65535 + 1e-6  # half a unit
    with pytest.raises(ValueError, match="non-circulant"):
        normalization_of(Convolution(psf, (12, 30, 21), boundary="reflect"), compact=True)


def test_auto_counts_by_holdout_with_conjugate_gradients(cell):
    truth, psf, image = cell
    done = []
    out = md.richardson_lucy(
        image, psf, accelerate=CG, background=10.0, device="cpu", callback=lambda i, e: done.append(i)
    )
    best = max(psnr(truth, e) for e in _curve(image, psf, 40, CG))
    assert 3 <= len(done) < 40
    assert psnr(truth, out) > best - 1.0


@pytest.mark.parametrize(
    "accelerate, error, match",
    [
        ("fast", ValueError, "accelerate must be True, False, 'biggs-andrews', 'conjugate-gradient'"),
        (1.5, TypeError, "accelerate must be a bool or a string"),
        (None, TypeError, "accelerate must be a bool or a string"),
    ],
)
def test_bad_accelerate_is_named(accelerate, error, match, cell):
    _, psf, image = cell
    with pytest.raises(error, match=match):
        md.richardson_lucy(image, psf, 2, accelerate=accelerate, device="cpu")


def test_tv_is_refused_and_named_schemes_equal_their_booleans(cell):
    _, psf, image = cell
    with pytest.raises(ValueError, match="tv > 0"):
        md.richardson_lucy(image, psf, 2, accelerate=CG, tv=0.002, device="cpu")
    for name, flag in (("biggs-andrews", True),):
        np.testing.assert_array_equal(
            md.richardson_lucy(image, psf, 3, accelerate=name, device="cpu"),
            md.richardson_lucy(image, psf, 3, accelerate=flag, device="cpu"),
        )


def test_input_is_untouched_and_integers_work(cell):
    _, psf, image = cell
    counts = image.astype(np.uint16)
    before = counts.copy()
    out = md.richardson_lucy(counts, psf, 5, accelerate=CG, background=10.0, device="cpu")
    np.testing.assert_array_equal(counts, before)
    reference = md.richardson_lucy(
        counts.astype(np.float32), psf, 5, accelerate=CG, background=10.0, device="cpu"
    )
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-4)


def test_a_background_that_broadcasts_equals_the_scalar(cell):
    # a per-column offset has fewer axes than the image: the line search and the carried ratio
    # must broadcast it (with the hold-out's strided colours too, under num_iter="auto")
    _, psf, image = cell
    column = np.full(image.shape[-1], 10.0, np.float32)
    for num_iter in (6, "auto"):
        np.testing.assert_allclose(
            md.richardson_lucy(image, psf, num_iter, accelerate=CG, background=column, device="cpu"),
            md.richardson_lucy(image, psf, num_iter, accelerate=CG, background=10.0, device="cpu"),
            rtol=1e-4,
            atol=1e-3,
        )


def test_auto_tiles_follow_their_pilot(cell):
    # the pilot tile counts by hold-out and records its weights, steps and refreshes; every tile
    # then runs that count with them, and equals the whole run under the same record
    _, psf, image = cell
    tile_shape = (None, 32, 32)
    params = {"accelerate": CG, "background": 10.0}
    tile_plan = tiling.plan(image.shape, psf, "rl", tile_shape=tile_shape)
    model = tiling._measure_model(image, psf, md.richardson_lucy, tile_plan, params, "cpu")
    count = model.values["rl.iterations"]
    assert 3 <= count < 100 and len(model.values["rl.cg.refresh"]) >= count
    with applying(model):
        whole = md.richardson_lucy(image, psf, device="cpu", **params)
    tiled = md.deconvolve(image, psf, "rl", tile_shape=tile_shape, device="cpu", **params)
    assert float(np.abs(tiled - whole).max() / whole.max()) < 1e-3
