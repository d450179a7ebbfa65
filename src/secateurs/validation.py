"""Argument checks, written once: a wrong type raises :class:`ArgumentTypeError`, a value out
of range raises ``ValueError``; both name the argument, the value and what would be valid.

:class:`ArgumentTypeError` is a ``TypeError`` that is also a ``ValueError``, so code that
catches ``ValueError`` for any bad argument (as the command line does) keeps working.

Example:
    >>> integer("patience", 3, low=0)
    3
    >>> number("decay", 0.9, low=0.0, high=1.0, high_open=True)
    0.9
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["ArgumentTypeError", "boolean", "callable_", "choice", "instance", "integer",
           "number", "sparsity"]

T = TypeVar("T")


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError``, and a ``ValueError`` for callers that
    catch every bad argument as one)."""


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    return f"{left}{low:g}, {high:g}{right}"


def integer(name: str, value: object, *, low: int | None = None,
            high: int | None = None) -> int:
    """``value`` as an ``int`` in ``[low, high]`` (either bound may be ``None``).

    Raises:
        ArgumentTypeError: if ``value`` is not an integer (``bool`` is not one).
        ValueError: if it is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an integer{_int_range(low, high)}, got "
                                f"{type(value).__name__} {value!r}")
    out = int(value)
    if (low is not None and out < low) or (high is not None and out > high):
        raise ValueError(f"{name} must be an integer{_int_range(low, high)}, got {out!r}")
    return out


def _int_range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def number(name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
           low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite ``float`` in the interval from ``low`` to ``high``.

    Raises:
        ArgumentTypeError: if ``value`` is not a real number (``bool`` is not one).
        ValueError: if it is NaN, infinite or outside the interval.
    """
    where = _interval(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a finite number in {where}, got "
                                f"{type(value).__name__} {value!r}")
    out = float(value)
    inside = (out > low if low_open else out >= low) and (out < high if high_open else out <= high)
    if not math.isfinite(out) or not inside:
        raise ValueError(f"{name} must be a finite number in {where}, got {value!r}")
    return out


def sparsity(name: str, value: object, *, top: float = 1.0) -> float:
    """A sparsity: a number in ``[0, 1)``, or ``[0, top]`` when ``top < 1`` (N:M's ``1 - N/M``).

    Raises:
        ArgumentTypeError: for a value that is not a number.
        ValueError: for a value out of range.
    """
    if top < 1:
        return number(name, value, low=0.0, high=top)
    return number(name, value, low=0.0, high=1.0, high_open=True)


def boolean(name: str, value: object) -> bool:
    """``value``, which must be a ``bool``.

    Raises:
        ArgumentTypeError: otherwise.
    """
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {type(value).__name__} "
                                f"{value!r}")
    return value


def instance(name: str, value: T, types: type | tuple[type, ...], what: str) -> T:
    """``value``, which must be an instance of ``types`` (described to the user as ``what``).

    Raises:
        ArgumentTypeError: otherwise.
    """
    if not isinstance(value, types):
        raise ArgumentTypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return value


def callable_(name: str, value: T, what: str = "a callable") -> T:
    """``value``, which must be callable (described to the user as ``what``).

    Raises:
        ArgumentTypeError: otherwise.
    """
    if not callable(value):
        raise ArgumentTypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    return value


def choice(name: str, value: object, choices: Iterable[str]) -> str:
    """``value``, which must be one of the strings ``choices``.

    Raises:
        ArgumentTypeError: if ``value`` is not a string.
        ValueError: if it is not one of ``choices`` (all listed in the message).
    """
    options = list(choices)
    listed = ", ".join(repr(c) for c in options)
    if not isinstance(value, str):
        raise ArgumentTypeError(f"{name} must be one of {listed}, got {type(value).__name__} "
                                f"{value!r}")
    if value not in options:
        raise ValueError(f"{name} must be one of {listed}, got {value!r}")
    return value


def optional(check: Callable[..., T], name: str, value: Any, **options: Any) -> T | None:
    """``None``, or ``check(name, value, **options)``."""
    return None if value is None else check(name, value, **options)
