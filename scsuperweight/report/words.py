"""Numbers and data in words: the escaping every section applies to what comes from the data, and the small
number formats the sentences share (two values to as many digits as show they differ, a percentage).

What belongs here: formatting of one value for a sentence. Not here: HTML structure (`page`), whole sentences
about a candidate (`hypotheses`).
"""

from __future__ import annotations

import html

from scsuperweight._fmt import finite as _finite
from scsuperweight._fmt import num as _num


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pair(a, b) -> tuple[str, str]:
    """Two numbers to as few digits as show that they differ (1.23 → 1.233, not 1.23 → 1.23)."""
    for d in range(3, 8):
        sa, sb = _num(a, digits=d), _num(b, digits=d)
        if sa != sb or not (_finite(a) and _finite(b)) or float(a) == float(b):
            return sa, sb
    return sa, sb


def _pct(x) -> str:
    return f"{100 * x:.0f}%"
