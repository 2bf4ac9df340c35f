"""Small helpers the application's modules share: an integer argument check and the number format of its tables.

The library never imports this module (nor anything of :mod:`monai_gdl_plus.app`).

Examples:
    >>> check_int("rounds", 3, 1)
    3
    >>> format_number(0.98765), format_number(float("nan")), format_number(None, ".1f", "-")
    ('0.988', '  n/a', '-')
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["check_int", "format_number"]


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int, checked against ``[minimum, maximum]``.

    Args:
        name: the argument's name, for the message.
        value: what the caller passed (a Python or NumPy integer; not a bool).
        minimum: the smallest value accepted.
        maximum: the largest value accepted, or None for no upper bound.

    Returns:
        ``int(value)``.

    Raises:
        TypeError: ``value`` is not an integer.
        ValueError: ``value`` lies outside the bounds.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return int(value)


def format_number(value: object, spec: str = ".3f", missing: str = "  n/a") -> str:
    """``value`` formatted with ``spec``, or ``missing`` when it is None, NaN, infinite or not a number.

    The default ``missing`` is as wide as a Dice with three decimals, so the CLI's columns stay aligned.
    """
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return missing
    return f"{value:{spec}}"
