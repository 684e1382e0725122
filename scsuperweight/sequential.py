"""Sequential Monte Carlo p-values: stop drawing random controls once the decision is settled.

Besag, J. & Clifford, P. (1991). "Sequential Monte Carlo p-values." Biometrika 78(2):301-304.

Random same-matrix scalars are drawn one at a time and each draw's effect (delta vs baseline on the primary metric)
is compared with the candidate's. Sampling stops after `h` draws at least as extreme as the candidate, with
p = h / draws; if that never happens it goes on to `max_draws`, with p = (1 + extremes) / (1 + max_draws), the
usual fixed-size empirical p. A candidate inside its null reaches `h` extremes after a handful of draws; a strong
one uses every draw, which is where the draws matter.

With ``h = decision_h(alpha, max_draws)`` the decision ``p < alpha`` is *identical* to the fixed `max_draws`
decision on the same draw sequence: an early stop means at least `h` extremes among all `max_draws`, so the full
p is at least (1 + h) / (1 + max_draws) >= alpha, and the early p is h / draws >= h / max_draws >= alpha.

"Extreme" is two-sided, as in `scsuperweight.metrics.empirical_p`: ``|draw - centre| >= |candidate - centre|``
(with its relative tolerance of 1e-12). `empirical_p` centres on the null sample's median, which a sequential
test cannot know before it has drawn; here the centre is fixed in advance, 0 by default: a delta is a change
against the baseline, and zeroing a random scalar leaves the metric unchanged to first order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .errors import DataError

_TOL = 1e-12  # the relative tie tolerance of metrics.empirical_p


def decision_h(alpha: float, max_draws: int) -> int:
    """The smallest stopping count `h` whose decisions at level `alpha` equal the fixed-`max_draws` decisions."""
    if not 0 < alpha < 1:
        msg = f"`alpha` must be in (0, 1); got {alpha!r}."
        raise DataError(msg)
    return max(1, math.ceil(alpha * max_draws - 1e-9))


def _is_extreme(draw: float, candidate: float, centre: float) -> bool:
    v = abs(candidate - centre)
    return abs(draw - centre) >= v - _TOL * max(1.0, v)


class SequentialNull:
    """One candidate's sequential test against random draws of its own parameter.

    Parameters
    ----------
    h
        Stop after this many draws at least as extreme as the candidate (see `decision_h`).
    max_draws
        The most draws; reaching it gives the fixed-size empirical p.
    candidate
        The candidate's delta on the primary metric.
    centre
        What "no effect" is (0: no change from baseline).

    Examples
    --------
    >>> s = SequentialNull(h=2, max_draws=40, candidate=0.8)
    >>> for d in draws:
    ...     if s.add(d):
    ...         break
    >>> s.p, s.draws
    """

    def __init__(self, h: int, max_draws: int, *, candidate: float, centre: float = 0.0):
        if int(h) < 1 or int(max_draws) < 1:
            msg = f"`h` and `max_draws` must be >= 1; got h={h!r}, max_draws={max_draws!r}."
            raise DataError(msg)
        if not np.isfinite(candidate):
            msg = f"`candidate` must be a finite delta; got {candidate!r}."
            raise DataError(msg)
        self.h, self.max_draws = int(h), int(max_draws)
        self.candidate, self.centre = float(candidate), float(centre)
        self.draws = 0
        self.extremes = 0

    @property
    def stopped_early(self) -> bool:
        return self.extremes >= self.h

    @property
    def done(self) -> bool:
        return self.stopped_early or self.draws >= self.max_draws

    def add(self, draw: float) -> bool:
        """Count one draw's delta (NaN draws are skipped: they do not count as draws); return `done`."""
        if self.done:
            msg = "this sequential test is already settled; check `done` before drawing again."
            raise DataError(msg)
        if np.isfinite(draw):
            self.draws += 1
            self.extremes += _is_extreme(float(draw), self.candidate, self.centre)
        return self.done

    @property
    def p(self) -> float:
        """h / draws after an early stop, else (1 + extremes) / (1 + draws); NaN before the first draw."""
        if self.draws == 0:
            return float("nan")
        if self.stopped_early:
            return self.h / self.draws
        return (1 + self.extremes) / (1 + self.draws)

    def to_dict(self) -> dict:
        return {"candidate_delta": self.candidate, "h": self.h, "max_draws": self.max_draws, "draws": self.draws,
                "extremes": self.extremes, "stopped_early": self.stopped_early, "p_value": self.p}


class SequentialPool:
    """Several candidates sharing one parameter's draws: drawing goes on while any of them is unsettled.

    A candidate that settles keeps its p; later draws (made for the others) are not counted for it.
    """

    def __init__(self, candidates: dict[str, float], *, h: int, max_draws: int, centre: float = 0.0):
        self.tests = {k: SequentialNull(h, max_draws, candidate=v, centre=centre) for k, v in candidates.items()}
        self.draws = 0

    @property
    def done(self) -> bool:
        return all(t.done for t in self.tests.values())

    def add(self, draw: float) -> bool:
        self.draws += 1
        for t in self.tests.values():
            if not t.done:
                t.add(draw)
        return self.done

    @property
    def p(self) -> dict[str, float]:
        return {k: t.p for k, t in self.tests.items()}


def sequential_p(candidate: float, draws: Iterable[float], *, h: int, max_draws: int, centre: float = 0.0
                 ) -> SequentialNull:
    """Consume `draws` lazily (a generator that runs a condition per draw) until settled; return the test."""
    s = SequentialNull(h, max_draws, candidate=candidate, centre=centre)
    for d in draws:
        if s.add(d):
            break
    return s


def fixed_p(candidate: float, draws, *, centre: float = 0.0) -> float:
    """The fixed-size empirical p with the same statistic: (1 + #extreme) / (1 + n)."""
    z = np.asarray(draws, dtype=float)
    z = z[np.isfinite(z)]
    n_ext = sum(_is_extreme(d, candidate, centre) for d in z)
    return (1 + n_ext) / (1 + z.size)
