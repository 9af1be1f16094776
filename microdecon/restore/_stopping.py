"""Stopping rules shared by the iterative methods: a fixed count, a relative-change tolerance, and a
callback that sees each iterate (and may stop the run).

Every iterative method takes ``num_iter`` (the most iterations it runs), ``tol`` and ``callback``
and builds one :class:`StoppingRule` from them; after each iteration it calls the rule with the
numbers it has at hand. Quantities a callback may ask for (the relative change, the I-divergence)
are computed only when some rule needs them, so an unmonitored run pays nothing.

``num_iter="auto"`` (the default of RL, RL-TV and FISTA; Landweber takes it too) stops when the
misfit of the data levels off (:class:`Plateau`): past that point an iteration mostly fits the
noise. RL counts its iterations by hold-out instead where it can (see
``richardson_lucy.HOLDOUT_PATIENCE``), and falls back on the plateau.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _validate
from .._tile_model import recorded, shared

__all__ = ["IterationInfo", "Plateau", "StoppingRule", "check_num_iter"]

#: ``num_iter="auto"``: stop once the misfit of the data (RL and RL-TV: the Poisson I-divergence;
#: Landweber: the squared residual) falls by less than AUTO_PLATEAU of itself per iteration,
#: averaged over AUTO_WINDOW iterations, at two checks in a row, or after AUTO_MAX_ITER. Measured
#: on 11 problems (beads, filaments and cells; widefield, measured light-sheet and Gaussian PSFs;
#: 40 to 1000 photons; the bundled sample): accelerated RL came within 0.35 dB of its best
#: iteration on 8 and 1.2 dB below 30 fixed iterations on one, where 30 fixed iterations lost up
#: to 20 dB (bright beads) and 1.7 dB (40 photons). At 15 photons it stops 1.6-2.7 dB past RL's
#: peak on cells (RL-TV does not), and at 200 photons 1.4-2.9 dB past it on larger stacks: RL
#: now counts by hold-out where it can. The ratio does not change with the camera's gain.
AUTO_PLATEAU = 4e-4
AUTO_WINDOW = 3
AUTO_MAX_ITER = 100

#: The same rule judged against the data's noise instead (``Plateau(scale=...)``, FISTA): stop
#: once an iteration lowers the objective by less than AUTO_PLATEAU_NOISE of the noise energy
#: (the expected squared residual of the true object). A squared residual levels off at the same
#: relative pace whether it is all noise (a dim cell, which the iterations then only spoil) or
#: the data of a few bright beads still sharpening; against the noise the two differ. Measured
#: with FISTA on 11 problems (the 8 phantoms of benchmarks/phantoms.py and 1-D and 2-D Gaussian
#: cases), see gradient.fista.
AUTO_PLATEAU_NOISE = 1e-4


def check_num_iter(num_iter: Any) -> int | str:
    """``num_iter`` as an int >= 0 or "auto" (a ValueError/TypeError naming it otherwise)."""
    if isinstance(num_iter, str):
        return _validate.check_choice(num_iter, "num_iter", ("auto",))
    return _validate.check_int(num_iter, "num_iter", minimum=0)


class Plateau:
    """The automatic stop of ``num_iter="auto"``, for a run recorded under ``name``.

    ``scale``, when given, is the misfit's noise level (in its own units): a fall of less than
    AUTO_PLATEAU_NOISE of it per iteration is level. ``limit`` is how many iterations to allow:
    AUTO_MAX_ITER, or, for a tile of a volume, as many as the tile the model was measured on ran
    (so that every tile computes the same thing). Each AUTO_WINDOW-th iteration the method
    measures its misfit (``wants``) and asks ``reached``; ``finish`` records how many ran, for
    the other tiles.

    Examples
    --------
    >>> plateau = Plateau("example.iterations")
    >>> [plateau.reached(i, m) for i, m in ((3, 10.0), (6, 9.0), (9, 8.9999), (12, 8.9998))]
    [False, False, False, True]
    """

    def __init__(self, name: str, *, scale: float | None = None):
        self.name = name
        # the misfit's fall is judged against ``scale`` (AUTO_PLATEAU_NOISE of it) when given,
        # else against the misfit itself (AUTO_PLATEAU of it)
        self.scale = scale
        count = recorded(name)
        self.active = count is None
        self.limit = AUTO_MAX_ITER if count is None else int(count)
        self.misfits: dict[int, float] = {}
        self.levels = 0  # checks in a row that found the misfit level

    def wants(self, iteration: int) -> bool:
        return self.active and iteration % AUTO_WINDOW == 0

    def reached(self, iteration: int, misfit: float) -> bool:
        """Whether the misfit has levelled off at two checks in a row (one alone may be a bump:
        FISTA's momentum can raise its residual for an iteration or two)."""
        if not math.isfinite(misfit):  # nothing to judge by (data beyond float32's range)
            self.levels = 0
            return False
        self.misfits[iteration] = misfit
        earlier = self.misfits.get(iteration - AUTO_WINDOW)
        allowed = AUTO_PLATEAU * misfit if self.scale is None else AUTO_PLATEAU_NOISE * self.scale
        level = earlier is not None and earlier - misfit <= allowed * AUTO_WINDOW
        self.levels = self.levels + 1 if level else 0
        return self.levels >= 2

    def finish(self, done: int) -> None:
        shared(self.name, lambda: done)


@dataclass(frozen=True)
class IterationInfo:
    """What a three-argument callback receives as its third argument.

    Attributes
    ----------
    iteration : int
        Iterations done so far (from 1).
    relative_change : float or None
        ``||x_k - x_{k-1}|| / ||x_{k-1}||`` (Euclidean norms over the estimate); None before the
        first change is known.
    i_divergence : float or None
        Csiszár's I-divergence ``sum(y log(y / m) - y + m)`` of the data ``y`` from the model
        ``m = H x + background`` of the estimate this iteration started from (the Poisson
        negative log-likelihood up to a constant), in image units; None for methods that do not
        blur an estimate each iteration.
    """

    iteration: int
    relative_change: float | None = None
    i_divergence: float | None = None


def _positional_arity(callback: Callable) -> int:
    """How many positional arguments ``callback`` accepts (a large number for ``*args``)."""
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: the two-argument form
        return 2
    count = 0
    for p in parameters:
        if p.kind == p.VAR_POSITIONAL:
            return 1 << 16
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            count += 1
    return count


class StoppingRule:
    """Decides after each iteration whether a run stops before ``num_iter``.

    Parameters
    ----------
    tol : float > 0 or None
        Stop once the relative change of the estimate, ``||x_k - x_{k-1}|| / ||x_{k-1}||``, falls
        below ``tol`` (dimensionless; 1e-3 to 1e-2 is typical). None: never on change.
    callback : callable or None
        ``callback(iteration, estimate)`` or ``callback(iteration, estimate, info)`` with ``info``
        an :class:`IterationInfo`; a true return value stops the run. ``estimate`` lives on the
        compute device and is valid only during the call (copy what you keep).

    Examples
    --------
    >>> rule = StoppingRule(tol=1e-3, callback=None)
    >>> rule.needs_change, rule(1, lambda: None, change=0.5), rule(2, lambda: None, change=1e-4)
    (True, False, True)
    """

    def __init__(self, tol: float | None, callback: Callable | None):
        self.tol = None if tol is None else _validate.check_float(tol, "tol", strict=True)
        self.callback = _validate.check_callback(callback)
        self.callback_wants_info = callback is not None and _positional_arity(callback) >= 3

    @property
    def needs_change(self) -> bool:
        """Whether the method must measure the relative change of its estimate."""
        return self.tol is not None or self.callback_wants_info

    @property
    def needs_divergence(self) -> bool:
        """Whether the method should compute the I-divergence of the data from its model."""
        return self.callback_wants_info

    def __call__(
        self,
        iteration: int,
        estimate: Callable[[], Any],
        *,
        change: float | None = None,
        divergence: float | None = None,
    ) -> bool:
        """True when the run should stop after ``iteration``.

        ``estimate`` is a function returning the current image-shaped estimate, called only when
        a callback wants it (making it may cost a copy).
        """
        stop = self.tol is not None and change is not None and change < self.tol
        if self.callback is not None:
            if self.callback_wants_info:
                info = IterationInfo(iteration, change, divergence)
                stop = bool(self.callback(iteration, estimate(), info)) or stop
            else:
                stop = bool(self.callback(iteration, estimate())) or stop
        return stop
