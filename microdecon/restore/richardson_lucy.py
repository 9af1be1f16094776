"""Richardson–Lucy deconvolution, plain and accelerated, written once for every device.

Notes
-----
With image ``y``, blur ``H`` (see :class:`microdecon.operators.Convolution`) and additive
background ``b``, RL is the EM algorithm for Poisson data ``y ~ Poisson(H x + b)``:

.. math:: x_{k+1} = \\frac{x_k}{H^T 1} \\, H^T \\frac{y}{H x_k + b}

``H^T 1`` is 1 for periodic boundaries; for "non-circulant" it is the fraction of each object
voxel's light that falls inside the image (Bertero & Boccacci 2005), which lets the estimate grow
past the image edge to explain light from outside it.

Acceleration is Biggs & Andrews (1997) first-order vector extrapolation: each RL step starts from
``x_k + alpha_k (x_k - x_{k-1})`` with ``alpha_k`` the correlation of the last two RL updates.

Total-variation regularization (Dey et al. 2006) adds ``tv * TV(x)`` to the negative Poisson
log-likelihood; its one-step-late update divides by ``H^T 1 (1 - tv * div(grad x / |grad x|))``,
which flattens noise in uniform regions while keeping edges (the weight fades with ``H^T 1`` on the
"non-circulant" margin, see ``_RichardsonLucy.tv_factor``). The divergence of a unit field is at
most ``2 ndim`` in size, so weights up to ~0.01 keep the factor within a few percent of 1.

References
----------
.. [1] W. H. Richardson, "Bayesian-based iterative method of image restoration", JOSA 62 (1972).
.. [2] L. B. Lucy, "An iterative technique for the rectification of observed distributions",
       AJ 79 (1974).
.. [3] D. S. C. Biggs and M. Andrews, "Acceleration of iterative image restoration
       algorithms", Applied Optics 36 (1997).
.. [5] N. Dey et al., "Richardson-Lucy algorithm with total variation regularization for 3D
       confocal microscope deconvolution", Microscopy Research and Technique 69 (2006).
.. [4] M. Bertero and P. Boccacci, "A simple method for the reduction of boundary effects in the
       Richardson-Lucy approach to image deconvolution", A&A 437 (2005).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import _validate
from .._backend import Backend, get_backend, release_freed_memory, return_like, seen_by_data
from .._tile_model import in_force, recorded, reused, shared, shared_step
from ..operators import Boundary, Convolution
from ._conjugate import ConjugateGradient
from ._stopping import AUTO_MAX_ITER, Plateau, StoppingRule, check_num_iter

__all__ = ["richardson_lucy", "richardson_lucy_tv"]

#: Object voxels that send less than this fraction of their light into the image are left at
#: zero: they are too weakly constrained by the data to estimate ("non-circulant" margins).
MIN_VISIBLE_FRACTION = 1e-3


#: Share of the flat mean in the first estimate (the rest is the observed image): starting from
#: the data saves iterations, and the flat share keeps every voxel positive.
INITIAL_FLAT_FRACTION = 0.05

#: TV weights above this make the one-step-late denominator lose its sign where the estimate is
#: noisy: the iteration then diverges (Dey et al. 2006 use 0.002-0.02).
MAX_TV = 0.05

#: The weight :func:`richardson_lucy_tv` uses unless told (Dey et al.'s examples use it too). Both
#: stopping by themselves, on the phantoms of benchmarks/phantoms.py: at 40 photons it restores
#: filaments and cells 0.5-0.9 dB above RL (RL counting by hold-out; 1.9-3.2 dB above RL's older
#: plateau stop on cells at 15 photons); at 1000 photons, where little noise is left to suppress,
#: 1-18 dB below (most on beads, which TV flattens).
DEFAULT_TV = 0.002

#: ``num_iter="auto"`` for RL (not RL-TV) counts its iterations by hold-out: RL runs on the
#: voxels of one colour of a checkerboard, and the Poisson misfit of the other colour's voxels,
#: which that run never saw, is measured each iteration. Their noise is independent of what was
#: fitted, so their misfit falls while the estimate improves and rises once it fits noise; the
#: count is that misfit's minimum (no new one for HOLDOUT_PATIENCE iterations ends the search),
#: and RL then runs on all the data for HOLDOUT_SCALE times that many iterations. Measured on 27
#: problems (see HOLDOUT_SCALE): within 0.2 dB of the best count on 17, where the misfit plateau
#: stopped up to 3.3 dB past it (the quality stack, the results problem, dim cells) or 6 dB short
#: of it (bright beads); 0.25-1.1 dB short on 8 (dim and Gaussian-PSF cells, the bright cell
#: through the measured light-sheet PSF, small stacks), 2.4 dB on a small bright cell, and 4.4 dB
#: on sparse beads at 40 photons, which keep sharpening after the data stop being predicted any
#: better.
HOLDOUT_PATIENCE = 5

#: The hold-out run sees half the voxels, so half the light: it starts fitting noise sooner than
#: a run on all the data, and its count comes early. RL on all the data runs this many times it
#: (at most AUTO_MAX_ITER; the count is of the iteration whose starting point fit best, one more
#: than that point's iterations). Measured on 27 problems (the 8 phantom cases, the quality
#: stack, the results problem, dim cells and filaments, Gaussian-PSF cells, and cells and
#: filaments of 16x64x64 and 24x96x96 at 40, 200 and 1000 photons): the best count was 0.9-2.5
#: times the hold-out's, more at more light. Summed over the 26 that are not dim beads, the PSNR
#: left below the best count was 8.4 dB at 1.3, 11.0 at 1.2, 23.9 at 1.0, and 24.8 for the
#: plateau rule; at 1.3 dim cells (15 photons) lose up to 0.7 dB, small bright stacks up to 2.4.
HOLDOUT_SCALE = 1.3

#: The checkerboard needs a PSF that spreads each voxel's light over both colours: its response
#: to the alternating pattern (the highest frequency, relative to the flat one) must be below
#: this, or the plateau rule counts instead (a delta-like PSF would leave half the voxels unfit).
HOLDOUT_MAX_CHECKER_RESPONSE = 0.1

#: Below this many held-out voxels the hold-out misfit is too noisy to count by.
HOLDOUT_MIN_VOXELS = 4096

#: Gradient magnitudes are floored at this (at the unit scale the run works in, where the image
#: peaks at 1): it keeps ``grad x / |grad x|`` finite in perfectly flat regions.
TV_EPSILON = 1e-4


def richardson_lucy(
    image: Any,
    psf: Any,
    num_iter: int | str = "auto",
    *,
    accelerate: bool | str = True,
    tv: float = 0.0,
    boundary: Boundary = "non-circulant",
    background: Any = 0.0,
    tol: float | None = None,
    device: str = "auto",
    progress: bool = False,
    callback: Callable[..., bool | None] | None = None,
):
    """Restore ``image`` blurred by ``psf`` with Richardson–Lucy iterations.

    Parameters
    ----------
    image : array_like
        1-D, 2-D or 3-D (or more) image, any real dtype (integers are computed in float32).
        NumPy, CuPy or anything ``np.asarray`` takes. Negative values are treated as zero.
    psf : array_like
        Point spread function with one axis per image axis, any size (it may be larger than the
        image), centre at index ``n // 2``, non-negative; normalized to sum 1 here.
    num_iter : int >= 0, or "auto"
        Most iterations to run. "auto" (the default) counts them by hold-out, at most 100: RL
        first runs on half the voxels (one colour of a checkerboard) while the misfit of the
        other half, which it never saw, is measured; where that misfit is lowest, further
        iterations only fit the noise, and RL then runs on all the data for 1.3 times as many
        (it has twice the light; see ``HOLDOUT_PATIENCE`` and ``HOLDOUT_SCALE``). Noisy data stop
        early (13-30 iterations at 15-40 photons), clean data late (25-100). It costs about
        twice the iterations it chooses. Sparse beads keep sharpening past that count: give
        them a number. With a PSF too narrow to blur the
        checkerboard, a tiny image, or ``tv > 0``, "auto" stops when the data's misfit levels
        off instead (see ``_stopping.Plateau``). A number runs exactly that many (unless ``tol``
        or ``callback`` stop it); with ``accelerate=True`` 10-50 is typical, plain RL needs
        several times more for the same sharpness.
    accelerate : bool or {"biggs-andrews", "conjugate-gradient"}
        True (the default) is "biggs-andrews": Biggs–Andrews vector extrapolation, the same
        restoration in several times fewer iterations, for two extra half-precision buffers the
        size of the estimate. "conjugate-gradient" ascends the Poisson likelihood along
        conjugate directions, with RL's update as the preconditioned gradient and an exact line
        search (see :mod:`microdecon.restore._conjugate`): fewer iterations still (plain RL's
        best of 50 in 6-10, against 15-18), each 1.2-1.3x as dear on the CPU, in about the same
        memory (two half-precision buffers the size of the estimate and an image-sized model,
        with the normalization kept in 16 bits); its quality falls faster past the best count,
        which "auto" finds less closely. Not with ``tv > 0``. False runs plain RL.
    tv : float, 0 to 0.05
        Weight of total-variation regularization (dimensionless: the image's scale does not
        change its effect). 0 is plain RL; 0.001-0.01 suppresses the noise that RL amplifies at
        low photon counts, at the cost of flattening fine texture. Costs a few image-sized
        temporaries per iteration.
    boundary : {"non-circulant", "periodic", "reflect"}
        How the object continues past the image edges; see :mod:`microdecon.operators`.
        "non-circulant" restores objects cut by the border without wrap-around or ringing.
    background : float or array_like, >= 0
        Additive background (camera offset plus diffuse light) in image units; part of the
        forward model ``H x + background``, not subtracted from the result.
    tol : float > 0, optional
        Stop early once an iteration changes the estimate by less than ``tol`` relative to its
        size, ``||x_k - x_{k-1}|| / ||x_{k-1}||`` (e.g. 1e-3). Costs one image-sized copy.
    device : {"auto", "cpu", "gpu", "gpu:N"}
        Where to compute; "auto" takes a GPU when one is usable, else the CPU.
    progress : bool
        Show a progress bar (tqdm; renders in Jupyter).
    callback : callable, optional
        ``callback(iteration, estimate)`` after each iteration (``iteration`` counts from 1;
        ``estimate`` is the current image-shaped estimate on the compute device, valid only
        during the call: copy what you keep). Return ``True`` to stop early. A callback with a
        third parameter also gets an :class:`~microdecon.restore.IterationInfo` with the
        relative change and the I-divergence (Poisson misfit) of the data.

    Returns
    -------
    array
        float32 estimate, non-negative, same shape and array type as ``image``.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> truth = np.zeros((32, 32), np.float32); truth[12:20, 12:20] = 100
    >>> psf = md.psf.gaussian((9, 9), sigma=1.5)
    >>> blurred = md.convolve(truth, psf, device="cpu")
    >>> restored = md.richardson_lucy(blurred, psf, 20, device="cpu")
    >>> bool(abs(restored - truth).mean() < abs(blurred - truth).mean())
    True
    """
    image = _validate.check_array(image, "image")
    psf = _validate.check_psf(psf, image.ndim)
    num_iter = check_num_iter(num_iter)
    tv = _validate.check_float(tv, "tv")
    if tv > MAX_TV:
        raise ValueError(f"tv must be <= {MAX_TV} (larger weights make RL-TV diverge), got {tv}")
    acceleration = _acceleration(accelerate, tv)
    _validate.check_choice(boundary, "boundary", _validate.BOUNDARIES)
    background = _validate.check_background(background, tuple(image.shape))
    rule = StoppingRule(tol, callback)
    backend = get_backend(image, psf, device=device)
    with backend.activate():
        op = Convolution(psf, tuple(image.shape), boundary=boundary, backend=backend)
        solver = _RichardsonLucy(op, image, background, tv=tv, compact=acceleration == "conjugate-gradient")
        counted = recorded("rl.iterations") is not None  # a tile: its pilot tile counted for it
        if num_iter == "auto" and tv == 0 and not counted and _holdout_works(psf, image):
            count = lambda: solver.count_by_holdout(acceleration, bool(progress))  # noqa: E731
            num_iter = shared("rl.iterations", count)
        result = solver.run(num_iter, accelerate=acceleration, progress=bool(progress), rule=rule)
    return return_like(result, image, backend)


def richardson_lucy_tv(
    image: Any, psf: Any, num_iter: int | str = "auto", *, tv: float = DEFAULT_TV, **params: Any
):
    """Richardson–Lucy with total-variation regularization (RL-TV, Dey et al. 2006).

    :func:`richardson_lucy` with a non-zero default ``tv``: the method of choice for noisy,
    low-photon data. ``params`` are those of :func:`richardson_lucy`.

    Parameters
    ----------
    image, psf, num_iter
        As for :func:`richardson_lucy`: by default it stops when the Poisson misfit levels off
        (at most 100 iterations), which lands within 0.2 dB of the best count on most of the
        benchmark's phantoms (``benchmarks/phantoms.py``).
    tv : float, 0 to 0.05
        Regularization weight (dimensionless). The default, 0.002, suits most data; raise it
        towards 0.01-0.02 for very few photons per voxel, lower it for bright, clean data.

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> rng = np.random.default_rng(0)
    >>> truth = md.data.phantom((48, 48), seed=0) * 10
    >>> psf = md.psf.gaussian((9, 9), 1.5)
    >>> noisy = rng.poisson(md.convolve(truth, psf, device="cpu").clip(0)).astype(np.float32)
    >>> out = md.restore.richardson_lucy_tv(noisy, psf, device="cpu")
    >>> md.metrics.psnr(truth, out) > md.metrics.psnr(truth, noisy)
    True
    """
    return richardson_lucy(image, psf, num_iter, tv=tv, **params)


#: What ``accelerate`` may be: its values, and the scheme each names (None: plain RL).
ACCELERATIONS = {
    True: "biggs-andrews",
    False: None,
    "biggs-andrews": "biggs-andrews",
    "conjugate-gradient": "conjugate-gradient",
}


def _acceleration(accelerate: Any, tv: float) -> str | None:
    """The scheme ``accelerate`` names, or a clear error."""
    if not isinstance(accelerate, (bool, np.bool_, str)):
        raise TypeError(f"accelerate must be a bool or a string, got {type(accelerate).__name__}")
    if isinstance(accelerate, np.bool_):
        accelerate = bool(accelerate)
    if accelerate not in ACCELERATIONS:
        choices = ", ".join(repr(k) for k in ACCELERATIONS if isinstance(k, str))
        raise ValueError(f"accelerate must be True, False, {choices}; got {accelerate!r}")
    scheme = ACCELERATIONS[accelerate]
    if scheme == "conjugate-gradient" and tv > 0:
        raise ValueError(
            "accelerate='conjugate-gradient' does not take tv > 0: RL-TV's one-step-late factor "
            "needs accelerate=True (Biggs–Andrews) or False"
        )
    return scheme


def _checkerboards(shape: tuple[int, ...]) -> tuple[list[tuple[slice, ...]], list[tuple[slice, ...]]]:
    """The voxels of a checkerboard over ``shape``, as strided slices: those whose indices sum to
    an even number (kept) and those whose indices sum to an odd number (held out)."""
    import itertools

    even, odd = [], []
    for starts in itertools.product((0, 1), repeat=len(shape)):
        (odd if sum(starts) % 2 else even).append(tuple(slice(s, None, 2) for s in starts))
    return even, odd


def _holdout_works(psf: Any, image: Any) -> bool:
    """Whether the hold-out count applies: enough voxels, and a PSF that blurs the checkerboard
    (its response to the alternating pattern below HOLDOUT_MAX_CHECKER_RESPONSE)."""
    if image.size // 2 < HOLDOUT_MIN_VOXELS:
        return False
    host = np.asarray(psf.get() if hasattr(psf, "get") else psf, dtype=np.float64)
    # along an axis the image has one voxel of, every voxel has the same colour: the PSF's
    # spread there mixes nothing, so it is summed away before the pattern is applied
    flat = tuple(axis for axis, n in enumerate(image.shape) if n == 1)
    host = host.sum(axis=flat, keepdims=True)
    signs = np.indices(host.shape).sum(axis=0) % 2 * -2 + 1  # +1 on even voxels, -1 on odd
    return abs(float((host * signs).sum())) <= HOLDOUT_MAX_CHECKER_RESPONSE * float(host.sum())


class _Holdout:
    """The hold-out misfit of one RL run: held-out voxels' ratio zeroed (the kept ones doubled,
    as half the voxels now carry the light ``H^T 1`` counts), their misfit measured."""

    def __init__(self, shape: tuple[int, ...]):
        self.kept, self.held = _checkerboards(shape)
        self.misfits: list[float] = []
        self.best = (math.inf, 0)  # (misfit, iteration)

    def measure(self, solver: Any, blurred: Any) -> None:
        """The I-divergence of the held-out data from ``blurred + background`` (unit scale), by
        the backend's one-pass kernel: no temporary of the image's size. The misfit measured at
        iteration k is that of the point iteration k started from, so ``best[1]`` is one more
        than the iterations that point had."""
        total = math.fsum(solver.divergence_on(blurred, part) for part in self.held)
        self.misfits.append(total)
        iteration = len(self.misfits)
        if math.isfinite(total) and total < self.best[0]:
            self.best = (total, iteration)

    def hold_out(self, ratio: Any) -> None:
        for part in self.held:
            ratio[part] = 0
        for part in self.kept:
            view = ratio[part]
            view *= np.float32(2)  # in place: ``ratio[part] *= 2`` would also copy it back

    def stalled(self, iteration: int, *args: Any, **kwargs: Any) -> bool:
        """A stopping rule: no new minimum for HOLDOUT_PATIENCE iterations, or a minimum so late
        that the count is AUTO_MAX_ITER whatever follows (a later minimum only raises it): on
        bright data that spares the last quarter of the counting run."""
        late = self.best[1] > 0 and self.count() == AUTO_MAX_ITER
        return late or iteration - max(self.best[1], 1) >= HOLDOUT_PATIENCE

    def count(self) -> int:
        """The iterations RL runs on all the data: HOLDOUT_SCALE times the best count so far."""
        if self.best[1] == 0:  # no finite misfit (data beyond float32): as the plateau would
            return AUTO_MAX_ITER
        return min(max(round(self.best[1] * HOLDOUT_SCALE), 1), AUTO_MAX_ITER)

    needs_change = needs_divergence = False

    def __call__(self, iteration: int, estimate: Any, **kwargs: Any) -> bool:
        return self.stalled(iteration)


def first_estimate(solver: Any, op: Convolution, normalization: Any, flux_name: str | None = None):
    """The first estimate of an RL-type solver (data set by :func:`_load_poisson_data`): the
    observed image less background, mixed with 5% of its mean so that no voxel starts at zero
    (RL's multiplicative update could never lift it); the mean signal on the margin that
    "non-circulant" adds around the image; zero where ``normalization`` says the data see
    nothing. ``flux_name``: the mean is shared under that name by the tiles of a volume."""
    xp = solver.xp
    x = solver.be.empty(op.object_shape)
    inside = op.restrict(x)
    # a large negative value may overflow to -inf here: harmless, as it is clipped below
    with np.errstate(over="ignore"):
        xp.multiply(solver.image, solver.image_scale, out=inside, dtype=np.float32)
    inside -= solver.background
    xp.maximum(inside, 0, out=inside)

    def mean():
        # by rows first: CuPy reduces a strided view to one value in a single thread block
        # (14 ms at 16.7 M voxels on an H200), a row at a time it uses the whole GPU
        return float(inside.sum(axis=-1).sum(dtype=np.float64)) / inside.size

    flux = mean() if flux_name is None else shared(flux_name, mean)
    solver.flux = flux  # the mean signal: a scale for floors (conjugate-gradient RL's)
    inside *= np.float32(1 - INITIAL_FLAT_FRACTION)
    inside += np.float32(INITIAL_FLAT_FRACTION * flux)
    if op.object_shape != op.image_shape:  # "non-circulant": the margin
        op.fill_outside_image(x, flux)
    if normalization is not None:  # zero exactly where the data say nothing
        x *= seen_by_data(normalization)
    return x


def _load_poisson_data(solver: Any, be: Backend, image: Any, background: Any) -> None:
    """Set the data attributes an RL-type solver shares: ``image`` (as given, on the device),
    ``image_has_negatives``, ``scale`` and ``image_scale``, ``background`` at unit scale, and the
    denominator ``floor``."""
    # The data stay as the caller gave them (on the device, in their own dtype): the ratio
    # kernel clips, converts and scales them on the fly, so no float32 copy is made and the
    # caller's array is never written.
    solver.image = be.asarray(image, dtype=None)
    solver.image_has_negatives = solver.image.dtype.kind != "u" and float(solver.image.min()) < 0
    level = background if isinstance(background, float) else float(background.max())
    # RL is scale-equivariant; working at unit scale keeps float32 sums and dot products far
    # from overflow (1e30 counts) and underflow alike. The result is scaled back at the end.
    # Shared by the tiles of one volume (see microdecon._tile_model), like every value below
    # that is measured on the data.
    solver.scale = shared("rl.scale", lambda: max(float(solver.image.max()), level, 1e-30))
    solver.image_scale = np.float32(1 / solver.scale)
    if isinstance(background, float):
        solver.background = np.float32(background / solver.scale)
    else:
        solver.background = be.asarray(background) / np.float32(solver.scale)
    # Denominators below this are noise: a floor stops 0/0 and blow-ups in empty regions.
    solver.floor = np.float32(1e-6)


def normalization_of(op: Convolution, compact: bool = False):
    """``1 / H^T 1`` where the image sees at least MIN_VISIBLE_FRACTION of a voxel's light, 0
    elsewhere; None where ``H^T 1 == 1`` (periodic, or reflect with a symmetric PSF). Made in
    place: no grid-sized temporaries.

    ``compact``: ``H^T 1`` itself in 16-bit fixed point instead (see the backend's
    ``compact_visibility``; "non-circulant" only, where ``H^T 1`` is at most 1), for
    conjugate-gradient RL: half the memory."""
    xp = op.backend.xp
    if op.boundary == "periodic" or (op.boundary == "non-circulant" and op.object_shape == op.image_shape):
        return None  # every voxel's light falls on the image: H^T 1 is the PSF's sum, 1
    visible = op.adjoint_of_ones(scratch=compact)
    # "non-circulant" has a margin, which the image sees only in part; "reflect" folds the
    # light back, all of it for a PSF symmetric about its centre
    if op.boundary == "reflect" and float(visible.max()) - 1 < 1e-5 and 1 - float(visible.min()) < 1e-5:
        return None
    if compact:
        if op.boundary != "non-circulant":
            raise ValueError(f"a compact normalization needs boundary='non-circulant', got {op.boundary!r}")
        return op.backend.compact_visibility(visible, MIN_VISIBLE_FRACTION)
    support = visible > MIN_VISIBLE_FRACTION
    xp.maximum(visible, MIN_VISIBLE_FRACTION, out=visible)
    xp.reciprocal(visible, out=visible)
    visible *= support
    return visible


class _RichardsonLucy:
    """State of one RL run: the data on the device, the normalization and the update step."""

    def __init__(self, op: Convolution, image: Any, background: Any, tv: float = 0.0, compact: bool = False):
        be: Backend = op.backend
        xp = be.xp
        self.op, self.be, self.xp = op, be, xp
        _load_poisson_data(self, be, image, background)
        self.tv = tv
        self.holdout: _Holdout | None = None  # while count_by_holdout runs
        self.divergence = None  # of the last forward model, when a stopping rule asks for it
        self.sampled_divergence = None  # the same on a quarter of the voxels, for num_iter="auto"
        # H^T 1, the fraction of each voxel's light that the image sees; the update divides by
        # it, so its masked reciprocal is kept (made in place: no grid-sized temporaries).
        # Tiles of one shape share them (read only): a process makes them once for all.
        # ``compact``: conjugate-gradient RL keeps it as H^T 1 in 16 bits (normalization_of),
        # for half the memory: without it that mode needed 10.5-10.8x the input on the
        # benchmark, over the 10x the project allows. Exact where H^T 1 is 1 (inside the image,
        # away from its edges), within 6e-5 in the rest of the image (H^T 1 >= 1/8 there for a
        # PSF symmetric about its centre), and up to 0.8% on the margin, where the image sees as
        # little as 0.1% of a voxel's light. Only "non-circulant": its H^T 1 is at most 1;
        # "reflect" with an asymmetric PSF reaches 1.5, and its normalization is the image's
        # size, not the grid's. Tiles keep float32, as they keep their steps.
        compact = compact and op.boundary == "non-circulant" and not in_force()
        key = ("rl.normalization", op.otf_key, op.image_shape, op.boundary, compact)
        self.normalization = reused(key, lambda: normalization_of(op, compact), entries=1)

    def initial_estimate(self):
        """See :func:`first_estimate`; the flux is shared by the tiles of a volume."""
        return first_estimate(self, self.op, self.normalization, flux_name="rl.flux")

    def correction(self, estimate, staged: bool = False, divergence: bool = False, sampled: bool = False):
        """``H^T (y / (H x + b))``, the RL correction before normalization (scratch memory).

        ``divergence`` also measures the I-divergence of the data from ``H x + b`` (in image
        units, into ``self.divergence``) before the ratio overwrites the blurred estimate;
        ``sampled`` measures it on every other voxel of the last two axes, at unit scale (into
        ``self.sampled_divergence``): a quarter of the cost, for the automatic stop.
        """
        return self.ratio_and_adjoint(self.op.forward(estimate, staged=staged), divergence, sampled)

    def ratio_and_adjoint(self, blurred, divergence: bool = False, sampled: bool = False):
        """``H^T (y / (blurred + b))`` for a model ``blurred`` that is the operator's last output
        (scratch, overwritten by the ratio); the measurements of :meth:`correction`."""
        if divergence:
            self.divergence = self.divergence_on(blurred, ...) * self.scale
        if sampled:
            every_other = (Ellipsis,) + (slice(None, None, 2),) * min(2, blurred.ndim)
            self.sampled_divergence = self.divergence_on(blurred, every_other)
        if self.holdout is not None:
            self.holdout.measure(self, blurred)
        self.be.rl_ratio(
            self.image, blurred, self.background, self.floor, self.image_scale, self.image_has_negatives
        )
        if self.holdout is not None:
            self.holdout.hold_out(blurred)
        return self.op.adjoint()  # the ratio was written in place into the forward's output

    def divergence_on(self, blurred, part) -> float:
        """The I-divergence of the data at ``part`` (an index) from ``blurred + background``, at
        unit scale; non-finite where the data pass float32's range (which stops nothing)."""
        background = self.background_at(part)
        return self.be.i_divergence(self.image[part], blurred[part], background, self.floor, self.image_scale)

    def background_at(self, part):
        """The background (unit scale) at ``part`` of the image: a scalar stays one; an array,
        which may have fewer axes than the image, is broadcast to it first."""
        if not np.ndim(self.background):
            return self.background
        return self.xp.broadcast_to(self.background, self.op.image_shape)[part]

    def tv_factor(self, estimate, out=None):
        """``1 / (1 - tv * div(grad x / |grad x|))``: RL-TV's one-step-late factor.

        Multiplying the correction by it turns the RL update into Dey et al.'s. Forward
        differences for the gradient and backward ones for the divergence make the pair adjoint
        (up to sign), as the variational derivation needs. Floored so that the factor stays below
        10: where the estimate is nearly flat the unit field can point anywhere.

        The divergence is not divided by ``H^T 1``, as the exact gradient of the penalized
        likelihood would have it: on the "non-circulant" margin, where the image sees little of
        a voxel's light, that division made the factor swing between its bounds from one
        iteration to the next. The margin then oscillated with growing amplitude, the
        extrapolation weight fell to zero, and RL-TV ran as slowly as plain RL. So the
        penalty's weight on the margin is ``tv * H^T 1``: it fades where the data say little.
        Inside the image ``H^T 1`` is 1 and nothing changes.
        """
        xp = self.xp
        ndim = estimate.ndim
        magnitude = xp.full(estimate.shape, np.float32(TV_EPSILON**2), dtype=np.float32)
        gradient = xp.empty(estimate.shape, dtype=np.float32)  # one scratch for every axis
        for axis in range(ndim):
            _forward_difference(estimate, axis, xp, out=gradient)
            xp.multiply(gradient, gradient, out=gradient)
            magnitude += gradient
        xp.sqrt(magnitude, out=magnitude)
        xp.reciprocal(magnitude, out=magnitude)
        divergence = xp.zeros(estimate.shape, dtype=np.float32) if out is None else out
        divergence[...] = 0
        for axis in range(ndim):
            unit = _forward_difference(estimate, axis, xp, out=gradient)
            unit *= magnitude
            _add_backward_difference(divergence, unit, axis)
        del magnitude, gradient
        divergence *= np.float32(-self.tv)
        divergence += np.float32(1)
        xp.maximum(divergence, np.float32(0.1), out=divergence)
        return xp.reciprocal(divergence, out=divergence)

    def count_by_holdout(self, accelerate: str | None, progress: bool) -> int:
        """How many iterations ``num_iter="auto"`` runs: the minimum of the hold-out misfit
        (see HOLDOUT_PATIENCE), found by a run on one colour of a checkerboard."""
        holdout = _Holdout(self.op.image_shape)
        self.holdout = holdout
        try:
            label = "Richardson-Lucy, counting on half the voxels"
            self.run(AUTO_MAX_ITER, accelerate=accelerate, progress=progress, rule=holdout, label=label)
        finally:
            self.holdout = None
        return holdout.count()

    def run(
        self,
        num_iter: int | str,
        *,
        accelerate: str | None,
        progress: bool,
        rule: StoppingRule,
        label: str = "Richardson-Lucy",
    ):
        """Run RL from the first estimate; ``accelerate`` is one of ACCELERATIONS' values."""
        from tqdm.auto import tqdm

        be = self.be
        plateau = Plateau("rl.iterations") if num_iter == "auto" else None
        limit = plateau.limit if plateau is not None else int(num_iter)
        done = 0
        current = self.initial_estimate()
        extrapolate = accelerate == "biggs-andrews"
        conjugate = ConjugateGradient(self, current) if accelerate == "conjugate-gradient" else None
        if extrapolate:
            # The extrapolation needs the last step h = x_k - x_{k-1} and the last RL update g, but
            # only to move the predicted point and to weigh it by dot products: bfloat16 (2-3
            # digits) serves, for a quarter of the memory of two float32 estimates.
            # Tiles of one volume keep them in float32: bfloat16's truncation would turn the
            # float32 rounding differences between a tile and the whole (1e-6) into differences
            # of 1e-3 after 30 iterations.
            step_dtype = np.float32 if in_force() else np.uint16
            step = be.empty(current.shape, step_dtype)
            update_prev = be.empty(current.shape, step_dtype)
        alpha = 0.0
        have_update = False
        tv_factor = be.empty(current.shape) if self.tv > 0 else None
        previous = None  # the last image-shaped estimate, when the relative change is wanted
        # Each step also writes its result where the next transform reads (the FFT's own buffer,
        # or spent scratch): that spares a copy, and the predicted point needs no array of its own.
        # RL-TV reads the staged point for its factor before the transform overwrites it.
        staged = self.op.staging_buffer() is not None
        if staged and accelerate is None:
            be.copy(self.op.staging_buffer(), current)
        want_divergence = rule.needs_divergence
        with tqdm(total=limit, desc=label, disable=not progress, leave=False) as bar:
            for iteration in range(1, limit + 1):
                measure = plateau is not None and plateau.wants(iteration)
                if rule.needs_change:
                    previous = self.op.restrict(current).copy()
                if conjugate is not None:
                    conjugate.iterate(iteration, current, want_divergence, measure, iteration == limit)
                elif not extrapolate:
                    if tv_factor is not None:
                        self.tv_factor(current, out=tv_factor)
                    correction = self.correction(current, staged, want_divergence, measure)
                    if tv_factor is not None:
                        correction *= tv_factor
                    stage = self.op.staging_buffer() if staged and iteration < limit else None
                    be.rl_update(current, correction, self.normalization, current, stage)
                else:
                    known_step = step if have_update else None
                    if staged:
                        be.predict(current, known_step, alpha, self.op.staging_buffer())
                        if tv_factor is not None:
                            self.tv_factor(self.op.staging_buffer(), out=tv_factor)
                        correction = self.correction(None, True, want_divergence, measure)
                    else:
                        predicted = be.predict(current, known_step, alpha, be.empty(current.shape))
                        if tv_factor is not None:
                            self.tv_factor(predicted, out=tv_factor)
                        correction = self.correction(predicted, False, want_divergence, measure)
                        del predicted
                    if tv_factor is not None:
                        correction *= tv_factor
                    # current <- x_{k+1}; step, update_prev <- x_{k+1} - x_k, x_{k+1} - predicted
                    cross, norm = be.rl_accelerated_update(
                        current, step, alpha, correction, self.normalization, update_prev, have_update
                    )
                    if have_update:
                        alpha = shared_step("rl.alpha", iteration, _extrapolation_weight(cross, norm))
                    have_update = True
                bar.update()
                change = None
                if previous is not None:
                    change = _relative_change(self.op.restrict(current), previous, self.xp)
                estimate = lambda: self.in_image_units(current)  # noqa: E731 - made only if asked for
                done = iteration
                if rule(iteration, estimate, change=change, divergence=self.divergence):
                    break
                if measure and plateau.reached(iteration, self.sampled_divergence):
                    break
        if plateau is not None:
            plateau.finish(done)  # recorded by a pilot tile for the others
        if extrapolate:
            del step, update_prev  # before the result is made: lower peak memory
        del conjugate
        del tv_factor, previous
        if be.name == "cpu":  # the result may take their pages, not new ones
            release_freed_memory()
        return self.in_image_units(current)

    def in_image_units(self, estimate):
        """The image-shaped part of an estimate in the image's units, clipped at zero (a new array)."""
        result = self.op.restrict(estimate) * np.float32(self.scale)
        return self.xp.maximum(result, 0, out=result)


def _forward_difference(x, axis: int, xp, out=None):
    """``x[i+1] - x[i]`` along ``axis``, 0 at the last index (into ``out``, float32 of ``x``'s
    shape, or a new array)."""
    if out is None:
        out = xp.empty(x.shape, dtype=np.float32)
    n = x.shape[axis]
    head = [slice(None)] * x.ndim
    tail = [slice(None)] * x.ndim
    head[axis], tail[axis] = slice(0, n - 1), slice(1, n)
    last = [slice(None)] * x.ndim
    last[axis] = slice(n - 1, n)
    if n > 1:
        xp.subtract(x[tuple(tail)], x[tuple(head)], out=out[tuple(head)])
    out[tuple(last)] = 0
    return out


def _add_backward_difference(out, field, axis: int) -> None:
    """``out += field[i] - field[i-1]`` along ``axis`` with ``field[-1] = 0`` (minus the
    adjoint of :func:`_forward_difference`, whose last entry is always 0)."""
    n = field.shape[axis]
    head = [slice(None)] * field.ndim
    tail = [slice(None)] * field.ndim
    head[axis], tail[axis] = slice(0, n - 1), slice(1, n)
    out += field
    if n > 1:
        out[tuple(tail)] -= field[tuple(head)]


def _relative_change(current, previous, xp) -> float:
    """``||current - previous|| / ||previous||`` (``previous`` is overwritten)."""
    reference = float(xp.sqrt(xp.vdot(previous.ravel(), previous.ravel()).real))
    previous -= current
    difference = float(xp.sqrt(xp.vdot(previous.ravel(), previous.ravel()).real))
    return difference / reference if reference > 0 else (0.0 if difference == 0 else float("inf"))


def _extrapolation_weight(cross: float, norm: float) -> float:
    """Biggs–Andrews alpha = <g_k, g_{k-1}> / <g_{k-1}, g_{k-1}>, kept in [0, 1] for stability."""
    if not (norm > 0 and np.isfinite(norm) and np.isfinite(cross)):
        return 0.0
    return min(max(cross / norm, 0.0), 1.0)
