"""Small helpers the application's modules share: one integer check and one number format."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_int", "fmt"]


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int (numpy integers too) in [minimum, maximum]; TypeError or ValueError naming ``name``."""
    import numpy as np

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return int(value)


def fmt(value: Any, spec: str = ".3f", suffix: str = "", missing: str = "-") -> str:
    """``value`` formatted with ``spec`` plus ``suffix``; ``missing`` for None, NaN, infinities and non-numbers."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return missing
    return f"{value:{spec}}{suffix}"
