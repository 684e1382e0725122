"""Numbers in words, the same way in the verdicts' reasons, the report and the CLI (1.23, +1.11, p = 0.048)."""

from __future__ import annotations

import math


def finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def num(x, signed: bool = False, digits: int = 3) -> str:
    """`digits` significant digits, no exponent for ordinary magnitudes (1.23, 0.9, +1.11, 1235)."""
    if not finite(x):
        return "n/a"
    x = float(x)
    sign = "+" if signed and x > 0 else ""
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e3:
        s = f"{x:.{digits}g}"
    elif 1e3 <= a < 1e6:
        s = f"{x:.0f}"
    else:
        s = f"{x:.{digits - 1}e}"
    return sign + s


def ci(lo, hi) -> str:
    if not (finite(lo) and finite(hi)):
        return "no interval"
    if float(lo) >= 0 and float(hi) >= 0:
        return f"{num(lo)}–{num(hi)}"
    return f"{num(lo)} to {num(hi)}"


def p(value) -> str:
    if not finite(value):
        return "p n/a"
    value = float(value)
    return "p < 0.001" if value < 1e-3 else f"p = {value:.2g}"
