"""One checker per kind of value, shared by the primitives and the config layer. Pure Python (no torch).

Each checker returns the value (``int``/``float`` normalised) or raises ``ValueError`` with one line
``"NAME must be <what is allowed>, got VALUE"``. ``NAME`` is whatever the caller calls the value: a primitive
names its own argument (``steps``, ``every_n``); the config layer re-raises under the key's group with
``prefixed("train.")``, so ``steps`` becomes ``train.steps`` without every primitive knowing about Hydra.

``note`` (optional) is appended to what is allowed, e.g. ``"(1 = no accumulation)"``. Booleans are never
numbers here: ``True`` is not a step count.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from numbers import Integral, Real


def _fail(name: str, allowed: str, value, note: str = ""):
    raise ValueError(f"{name} must be {allowed}{' ' + note if note else ''}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _number(value) -> str:
    """How to name a number requirement: "a finite number" when ``value`` is inf or nan."""
    return "a finite number" if isinstance(value, Real) and not math.isfinite(value) else "a number"


def integer(name: str, value, low: int | None = None, high: int | None = None, note: str = "") -> int:
    """An integer in ``[low, high]`` (either bound may be None = unbounded)."""
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        if low is None and high is None:
            _fail(name, "an integer", value, note)
        if high is None:
            _fail(name, "a positive integer" if low == 1 else f"an integer >= {low}", value, note)
        if low is None:
            _fail(name, f"an integer <= {high}", value, note)
        _fail(name, f"an integer in [{low}, {high}]", value, note)
    return int(value)


def positive_int(name: str, value, note: str = "") -> int:
    return integer(name, value, low=1, note=note)


def non_negative_int(name: str, value, note: str = "") -> int:
    return integer(name, value, low=0, note=note)


def positive_float(name: str, value, note: str = "") -> float:
    """A finite number > 0 (ints are accepted)."""
    if not _is_number(value) or value <= 0:
        _fail(name, f"{_number(value)} > 0", value, note)
    return float(value)


def non_negative_float(name: str, value, note: str = "") -> float:
    """A finite number >= 0 (ints are accepted)."""
    if not _is_number(value) or value < 0:
        _fail(name, f"{_number(value)} >= 0", value, note)
    return float(value)


def fraction(name: str, value, low: float = 0.0, high: float = 1.0, include_high: bool = True, note: str = "") -> float:
    """A number in ``[low, high]`` (or ``[low, high)`` with ``include_high=False``)."""
    if not _is_number(value) or value < low or value > high or (value == high and not include_high):
        _fail(name, f"{_number(value)} in [{low:g}, {high:g}{']' if include_high else ')'}", value, note)
    return float(value)


def boolean(name: str, value, note: str = "") -> bool:
    if not isinstance(value, bool):
        _fail(name, "true or false", value, note)
    return value


def choice(name: str, value, allowed, note: str = ""):
    """One of ``allowed``, of the same type (``True`` is not ``1``; ``None`` prints as ``null``)."""
    allowed = tuple(allowed)
    if not any(type(value) is type(a) and value == a for a in allowed):
        _fail(name, "one of " + ", ".join("null" if a is None else str(a) for a in allowed), value, note)
    return value


@contextmanager
def prefixed(prefix: str):
    """Re-raise a ``ValueError`` from the block with ``prefix`` in front (``steps must`` -> ``train.steps must``)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{prefix}{e}") from None
