"""What the tiles of one volume share: the values a method measures on its data, measured once.

Some methods measure things on the whole of their input: Richardson–Lucy its unit scale, the
flux of its first estimate and, when accelerated, one extrapolation weight per iteration; FISTA
its momentum and restarts; Wiener and Tikhonov an automatic balance and the mean their boundary
margin fades to; unsupervised Wiener its noise and prior precisions; blind RL its PSF. Restored tile by tile,
each tile would measure its own, and the seams would show. So the tiler measures them once, on a
representative region, *recording* each value as the method asks for it, and then restores
every tile while *applying* that record: every tile, and a whole-volume run under the same
record, then compute the same model, and the stitched result equals the whole one.

The record travels with each tile's task (it pickles), so it works in worker processes and on
other machines. Outside a recording or applying block, :func:`shared` simply measures.

Examples
--------
>>> model = TileModel()
>>> with recording(model):
...     shared("scale", lambda: 4.0)
4.0
>>> with applying(model):
...     shared("scale", lambda: 99.0)   # the recorded value, not a new measurement
4.0
>>> shared("scale", lambda: 99.0)       # no model in force: measured
99.0
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = [
    "TileModel",
    "applying",
    "in_force",
    "recorded",
    "recording",
    "reused",
    "setting",
    "shared",
    "shared_step",
]

T = TypeVar("T")


class TileModel:
    """The recorded values, by name (floats, lists of per-iteration values, small arrays)."""

    def __init__(self, values: dict[str, Any] | None = None):
        self.values: dict[str, Any] = dict(values or {})
        self._reused: dict[Any, Any] = {}  # see reused(): this process's, never pickled
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"values": self.values}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["values"])

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{key}=[{len(value)} values]" if isinstance(value, list) else f"{key}={value!r:.40}"
            for key, value in sorted(self.values.items())
        )
        return f"TileModel({shown})"


_ACTIVE: contextvars.ContextVar[tuple[str, TileModel] | None] = contextvars.ContextVar(
    "microdecon_tile_model", default=None
)


@contextlib.contextmanager
def recording(model: TileModel | None = None) -> Iterator[TileModel]:
    """Record every shared value measured inside the block into ``model`` (a new one if None)."""
    model = TileModel() if model is None else model
    token = _ACTIVE.set(("record", model))
    try:
        yield model
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def applying(model: TileModel) -> Iterator[TileModel]:
    """Use ``model``'s recorded values inside the block instead of measuring them."""
    if not isinstance(model, TileModel):
        raise TypeError(f"model must be a TileModel, got {type(model).__name__}")
    token = _ACTIVE.set(("apply", model))
    try:
        yield model
    finally:
        _ACTIVE.reset(token)


def in_force() -> bool:
    """Whether a model is being recorded or applied (the caller is a tile, or its pilot)."""
    return _ACTIVE.get() is not None


def setting(name: str, default: Any = None) -> Any:
    """A value the tiler put in the model for every tile (not measured: never recorded)."""
    state = _ACTIVE.get()
    if state is None:
        return default
    return state[1].values.get(name, default)


def shared(name: str, measure: Callable[[], T]) -> T:
    """The value ``measure()`` gives, or the recorded one while a model is applied."""
    state = _ACTIVE.get()
    if state is None:
        return measure()
    mode, model = state
    if mode == "apply" and name in model.values:
        return model.values[name]
    value = measure()
    if mode == "record":
        model.values[name] = value
    return value


def recorded(name: str) -> Any:
    """The value recorded under ``name`` while a model is applied, else None (for decisions a
    method must take before it can measure, such as how many iterations to run)."""
    state = _ACTIVE.get()
    if state is None or state[0] != "apply":
        return None
    return state[1].values.get(name)


def reused(key: Any, make: Callable[[], T], entries: int = 2) -> T:
    """What ``make()`` gives, made once per key for all the tiles a process restores.

    For things every tile computes alike and that are too large to travel with the record, such
    as an OTF: they live with the model in this process only (a pickled model arrives without
    them), at most ``entries`` of a kind (a tuple key's first item) at a time, and go with the
    model. Outside a model: ``make()``.
    """
    state = _ACTIVE.get()
    if state is None:
        return make()
    model = state[1]
    kind = key[0] if isinstance(key, tuple) and key else key
    with model._lock:  # tiles restored by threads of one process make it once
        if key not in model._reused:
            # the oldest of the same kind make room: one kind's turnover keeps the others
            alike = [k for k in model._reused if (k[0] if isinstance(k, tuple) and k else k) == kind]
            for old in alike[: max(0, len(alike) - entries + 1)]:
                del model._reused[old]
            model._reused[key] = make()
        return model._reused[key]


def shared_step(name: str, index: int, measured: float) -> float:
    """Like :func:`shared` for a cheap value measured anew at each iteration ``index``: returns
    ``measured``, or the recorded value for that iteration while a model is applied."""
    state = _ACTIVE.get()
    if state is None:
        return measured
    mode, model = state
    values = model.values.setdefault(name, []) if mode == "record" else model.values.get(name)
    if mode == "apply" and values is not None and index < len(values) and values[index] is not None:
        return values[index]
    value = measured
    if mode == "record":
        values.extend([None] * (index + 1 - len(values)))
        values[index] = value
    return value
