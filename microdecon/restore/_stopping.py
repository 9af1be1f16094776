"""Stopping rules shared by the iterative methods: a fixed count, a relative-change tolerance, and a
callback that sees each iterate (and may stop the run).

Every iterative method takes ``num_iter`` (the most iterations it runs), ``tol`` and ``callback``
and builds one :class:`StoppingRule` from them; after each iteration it calls the rule with the
numbers it has at hand. Quantities a callback may ask for (the relative change, the I-divergence)
are computed only when some rule needs them, so an unmonitored run pays nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _validate

__all__ = ["IterationInfo", "StoppingRule"]


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
