"""Richardson–Lucy accelerated by conjugate gradients: ``accelerate="conjugate-gradient"``.

RL is EM for Poisson data, and its update ``x (H^T (y / (H x + b)) / H^T 1 - 1)`` is the
log-likelihood's gradient scaled by ``x / H^T 1``. Used as the preconditioned gradient of a
nonlinear conjugate-gradient ascent (as Kaufman 1987 did for emission tomography), it is
combined with the last search direction by the Polak–Ribière weight, and the step along that
direction is found by Newton's method on the exact likelihood (or by Halley's, from one pass over
the data, where the two agree).

Why it is fast: the blur is linear, so the model ``H (x + t d) = H x + t H d`` costs no
transform for any ``t``. The iteration blurs the direction ``d`` where plain RL blurs its new
estimate, so it costs RL's four FFTs plus a few passes over the data. The model is carried from
one iteration to the next by that sum, which ignores the clip of the new estimate at its floor;
after the clips add up to a fair part of a step it is made anew from the estimate (two more
FFTs). Every ``RESTART_EVERY`` iterations, and at each new model, the direction restarts from
RL's update. New estimates are clipped at a small floor, not at 0: the preconditioner is ``x``,
so a voxel at 0 could never move again.

Memory: beyond plain RL's estimate, normalization, OTF and FFT buffer, it keeps the direction
and RL's last update (bfloat16: half a float32 array each), the model (image-sized float32),
and keeps the normalization in 16 bits (see ``compact_visibility``): 9.1x the input in
arrays on the benchmark problem, as Biggs–Andrews' 8.7x, where float32 buffers and a carried
``H d`` needed 12x.

Measured on the benchmark problem (64x256x256, widefield PSF, Poisson noise): plain RL's best
PSNR in 50 iterations is reached after 7 of these, against 15 Biggs–Andrews iterations; on the 8
phantom cases of ``benchmarks/phantoms.py`` after 6-10 against 15-18, with a best PSNR within
0.05 dB of Biggs–Andrews' or above it in seven (bright beads, mostly at the floor: lower). Its
PSNR also falls faster past the peak on noisy data, so the hold-out count (``num_iter="auto"``)
lands further from the best (0.3-0.4 dB on dim cells and filaments).

References
----------
.. [1] L. Kaufman, "Implementing and accelerating the EM algorithm for positron emission
       tomography", IEEE Trans. Med. Imaging 6 (1987).
.. [2] E. Polak and G. Ribière, "Note sur la convergence de méthodes de directions
       conjuguées", RIRO 3 (1969).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._tile_model import in_force, recorded, shared_step

#: The search direction restarts from RL's update every this many iterations. Every 4th: plain
#: RL's 50-iteration best after 7 iterations on the benchmark problem and 6-10 on the 8 phantom
#: cases; every 6th, 8th or never: 8-9 on the benchmark, and one phantom case (dim cells, light
#: sheet) never got there in 30.
RESTART_EVERY = 4

#: Bounds on the step along the search direction, in units of RL's own step: at least a small
#: fraction (a direction that barely ascends is still followed a little), at most this far.
MIN_STEP, MAX_STEP = 0.05, 50.0

#: The model ``H x`` is carried from one iteration to the next as ``H x + t H d``, which ignores
#: the clip of the new estimate at its floor: it is made anew from the estimate (two FFTs), and
#: the direction restarts, when the clip added more than this fraction of the step (summed over
#: voxels). On a dim cell (15 photons) the first step's clip was 10% of it and left the carried
#: model 10% wrong, and the next three iterations stalled; refreshed, it reached its best PSNR
#: after 2 iterations instead of 5. On the bright benchmark problem the clips stayed under 4%, and
#: the carried model within 2%.
CLIP_REFRESH = 0.05

#: At a restart (every RESTART_EVERY iterations) the model is made anew only when the clips
#: summed since it was last made exceed this fraction of the step. It used to be made at every
#: restart: two more FFTs in a quarter of the iterations, for the same iteration counts to plain
#: RL's best on the benchmark problem and the 8 phantom cases, and best PSNRs within 0.35 dB
#: (bright beads: higher). At 5% the carried model of a dim cell drifted 2.2% from the
#: estimate's (1% when made at every restart); at 1% its drift stays at 1%.
RESTART_CLIP = 0.01

#: A larger Polak–Ribière weight means the last gradient all but vanished (a converged
#: estimate, or a PSF that is a delta): the direction restarts from RL's update instead. On the
#: benchmark problem the weights stayed below 2.5.
MAX_BETA = 10.0

#: The step stays this fraction short of where the model would reach zero somewhere.
DOMAIN_MARGIN = 0.9

#: Newton steps on the likelihood along the direction (from the current point: the first is the
#: quadratic model's maximum). Two were as good as three in every case measured; one, alone,
#: cost the benchmark problem 3 iterations more.
NEWTON_STEPS = 2

#: The first pass over the data also gives the likelihood's third derivative along the line, and
#: with it Halley's step (cubically convergent). Where that lands within this fraction of the
#: first Newton step, it is taken, and the second pass is spared: 88% of the line searches on the
#: benchmark problem and the 8 phantom cases, each reaching plain RL's best after as many
#: iterations as with two Newton steps. Halley's step alone, always taken, cost two phantom cases
#: 1-2 iterations.
HALLEY_AGREEMENT = 0.1

#: New estimate values are floored at this fraction of the first estimate's mean: an EM-scaled
#: gradient is zero where the estimate is, so a voxel clipped to zero could never come back.
#: (An image of zeros has a mean of 0, and stays 0.)
FLOOR_FRACTION = 1e-6


class ConjugateGradient:
    """The search state of conjugate-gradient RL for one run of a ``_RichardsonLucy`` solver.

    Buffers: the search direction and RL's last update (object-sized, bfloat16 bits; float32
    for tiles, as Biggs–Andrews keeps its steps), and the model ``H x`` (image-sized, float32).
    ``H d`` lives in the operator's scratch, where the next ratio is made. The solver's
    normalization is kept in 16 bits too (``compact_visibility``).

    Examples
    --------
    >>> import numpy as np, microdecon as md
    >>> truth = np.zeros((32, 32), np.float32); truth[12:20, 12:20] = 100
    >>> psf = md.psf.gaussian((9, 9), 1.5)
    >>> blurred = md.convolve(truth, psf, device="cpu") + 1
    >>> out = md.richardson_lucy(
    ...     blurred, psf, 10, accelerate="conjugate-gradient", background=1.0, device="cpu"
    ... )
    >>> bool(abs(out - truth).mean() < abs(blurred - 1 - truth).mean())
    True
    """

    def __init__(self, solver: Any, estimate: Any):
        be, op = solver.be, solver.op
        self.solver, self.be, self.op = solver, be, op
        tiles = in_force()
        # bfloat16: the step follows the direction as stored, and H d is the blur of exactly
        # that, so its rounding only tilts the direction a little (on the benchmark problem and
        # the 8 phantom cases every PSNR matched float32's to 0.01 dB). Tiles keep float32:
        # bfloat16 would magnify a tile's float32 differences from the whole.
        step_dtype = np.float32 if tiles else np.uint16
        self.direction = be.empty(op.object_shape, step_dtype)
        self.update = be.empty(op.object_shape, step_dtype)
        # "reflect" extends the transform's input on its way in: the direction needs a float32
        # array of its own to be blurred from
        self.point = be.empty(op.object_shape) if op.staging_buffer() is None else None
        blurred = op.forward(estimate)
        self.model = blurred.copy()
        self.scratch = blurred  # the operator's last output: H x, or H d while ``pending``
        self.pending = None  # the step length not yet carried into the model along H d
        self.norm = 0.0  # <grad, P grad> of the last iteration: the Polak–Ribière denominator
        self.clipped = 0.0  # what the clips at the floor added since the model was made
        self.floor = np.float32(FLOOR_FRACTION * solver.flux)

    def iterate(self, iteration: int, estimate: Any, divergence: bool, sampled: bool, last: bool) -> None:
        """One iteration: ``estimate`` (object-shaped) is advanced in place; ``last`` (no
        iteration follows) spares carrying the model on."""
        solver, be, op = self.solver, self.be, self.op
        if self.pending is None:  # the operator's output is the model
            correction = solver.ratio_and_adjoint(self.scratch, divergence, sampled)
        elif divergence or sampled or solver.holdout is not None:  # measured on the model first
            be.combine(self.model, 1.0, self.pending, self.scratch)
            be.copy(self.scratch, self.model)
            correction = solver.ratio_and_adjoint(self.scratch, divergence, sampled)
        else:  # the last step carried into the model, and the ratio, in one pass
            args = (solver.background, solver.floor, solver.image_scale, solver.image_has_negatives)
            be.cg_model_ratio(solver.image, self.model, self.scratch, self.pending, *args)
            correction = op.adjoint()
        first = iteration == 1
        normalization = solver.normalization
        own, cross = be.cg_gradient(correction, estimate, normalization, self.update, not first)
        del correction  # spent: the direction is staged where it lay
        pilot = recorded("rl.cg.beta")  # a tile: the weights and steps its pilot tile took
        if pilot is not None and iteration < len(pilot) and pilot[iteration] is not None:
            beta, length = pilot[iteration], recorded("rl.cg.step")[iteration]
            blurred = self.blur_direction(beta)
        else:
            beta = 0.0
            if not first and self.norm > 0 and math.isfinite(own) and math.isfinite(cross):
                beta = max(0.0, (own - cross) / self.norm)  # Polak–Ribière, restarted when negative
                if beta > MAX_BETA:  # the last gradient vanished (converged): a fresh start
                    beta = 0.0
            blurred = self.blur_direction(beta)
            length, ascends = self.step_length(blurred)
            if beta and not ascends:  # a fresh start from RL's update (two more FFTs; rare:
                beta = 0.0  # none in 30 iterations of the benchmark problem and 8 phantoms)
                blurred = self.blur_direction(beta)
                length, _ = self.step_length(blurred)
            beta = shared_step("rl.cg.beta", iteration, beta)
            length = shared_step("rl.cg.step", iteration, length)
        self.norm = own
        args = (length, normalization, self.floor, not last)  # the clip decides what follows
        clipped, stepped = be.cg_advance(estimate, self.direction, *args)
        self.pending = None
        if last:
            return
        # the clip at the floor moved the estimate off the line that H x + t H d follows: past
        # CLIP_REFRESH of the step, the model is made anew (a dim first step clipped enough to
        # leave it 10% wrong, and the next iterations then stalled); at a restart, past
        # RESTART_CLIP of the step in all the clips since it was made
        self.clipped += clipped
        restart = iteration % RESTART_EVERY == 0
        drift, limit = (self.clipped, RESTART_CLIP) if restart else (clipped, CLIP_REFRESH)
        # (not "<=": sums that are not finite make the model anew, as every restart did before)
        remake = shared_step("rl.cg.refresh", iteration, float(not drift <= limit * stepped))
        if remake:
            blurred = op.forward(estimate)
            be.copy(self.model, blurred)
            self.clipped = 0.0
        else:
            self.pending = length  # H x + length H d: carried at the start of the next iteration
        if remake or restart:
            # the next direction starts afresh from RL's update. Without these restarts (with or
            # without Powell's restart test) or with one at every other refresh, plain RL's best
            # came later on the benchmark problem or the bright phantoms (up to 11 iterations,
            # against 8), or never on dim cells under a light sheet, though bright beads then went
            # much further by 30 iterations (51-54 dB against 45)
            self.norm = 0.0
        self.scratch = blurred

    def blur_direction(self, beta: float) -> Any:
        """The search direction ``d <- u + beta d`` (``beta`` 0: RL's update ``u``), and ``H d``
        (image-shaped scratch of the operator's). The transform takes the place of plain RL's
        blur of its new estimate: the model is carried by linearity instead."""
        op = self.op
        stage = op.staging_buffer() if self.point is None else self.point
        self.be.cg_direction(self.update, self.direction, beta, beta == 0, stage)
        return op.forward(self.point, staged=self.point is None)

    def step_length(self, blurred: Any) -> tuple[float, bool]:
        """Newton's method on the Poisson log-likelihood along ``H x + t H d`` (``blurred`` is
        ``H d``), from 0 (over the kept voxels only while :meth:`_RichardsonLucy.count_by_holdout`
        counts); Halley's step from the first pass's sums where it agrees with Newton's (see
        HALLEY_AGREEMENT). Returns the step and whether the direction ascends at all (the
        likelihood's slope at 0 is positive)."""
        solver = self.solver
        parts = [...] if solver.holdout is None else solver.holdout.kept
        length, top = 0.0, MAX_STEP
        total = third = 0.0  # sum(H d), the same at every step length; half the third derivative
        for step in range(NEWTON_STEPS):
            first = second = 0.0
            bound = math.inf
            for part in parts:
                sums = self.be.poisson_line(
                    solver.image[part],
                    self.model[part],
                    blurred[part],
                    solver.background_at(part),
                    solver.floor,
                    solver.image_scale,
                    length,
                    step == 0,
                    solver.image_has_negatives,
                )
                first, second, bound = first + sums[0], second + sums[1], min(bound, sums[4])
                third, total = third + sums[2], total + sums[3]
            slope = first - total
            if step == 0:
                top = min(MAX_STEP, DOMAIN_MARGIN * bound)
                ascends = slope > 0
            if not (math.isfinite(slope) and math.isfinite(second) and second > 0):
                # RL's own point (within the domain), or the last good step
                return (min(1.0, max(top, MIN_STEP)) if step == 0 else length), ascends
            newton = slope / second
            if step == 0:
                # the slope's root by Halley's method, with the likelihood's derivatives along the
                # line: slope, -second and 2 third
                denominator = 2 * second * second - 2 * slope * third
                halley = 2 * slope * second / denominator if denominator > 0 else math.nan
                if math.isfinite(halley) and abs(halley - newton) <= HALLEY_AGREEMENT * abs(newton):
                    return min(max(halley, MIN_STEP), max(top, MIN_STEP)), ascends
            length = min(max(length + newton, MIN_STEP), max(top, MIN_STEP))
        return length, ascends
