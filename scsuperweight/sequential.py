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
    """Several candidates judged against one parameter's draws: drawing goes on while any of them is unsettled.

    Each draw is recorded, so a candidate can `join` late (a condition run in a later phase, judged against draws
    made before it) and first replays the draws made; the pool then draws on if that did not settle it. A
    candidate that settles keeps its p; later draws (made for the others) are not counted for it. A pool that no
    candidate has joined draws to `max_draws`, as a fixed-size null does (a later joiner finds every draw).

    Parameters
    ----------
    candidates
        Candidate name -> its delta on the primary metric, joined at once (more can `join` later).
    h
        Stop a candidate after this many draws at least as extreme as it (see `decision_h`); also the size of a
        round of draws (`next_round`), since no candidate can settle in fewer.
    max_draws
        The draws in the pool.
    centre
        What "no effect" is (0: no change from baseline).

    Examples
    --------
    >>> pool = SequentialPool({"cand": 0.8}, h=2, max_draws=40)
    >>> while (n := pool.next_round()):
    ...     for d in run_draws(pool.draws, n):
    ...         pool.add(d)
    >>> pool.join("restore", 0.3)  # a later phase's condition: replays the draws made, then draws go on
    """

    def __init__(self, candidates: dict[str, float] | None = None, *, h: int, max_draws: int, centre: float = 0.0):
        if int(h) < 1 or int(max_draws) < 1:
            msg = f"`h` and `max_draws` must be >= 1; got h={h!r}, max_draws={max_draws!r}."
            raise DataError(msg)
        self.h, self.max_draws, self.centre = int(h), int(max_draws), float(centre)
        self.tests: dict[str, SequentialNull] = {}
        self.deltas: list[float] = []  # every draw made, in order, for late joiners to replay
        for name, delta in (candidates or {}).items():
            self.join(name, delta)

    @property
    def draws(self) -> int:
        return len(self.deltas)

    def join(self, name: str, candidate: float) -> SequentialNull:
        """Judge `candidate` (a finite delta) against the pool as `name`, replaying the draws made until it is
        settled; joining twice returns the first test."""
        if name in self.tests:
            return self.tests[name]
        t = SequentialNull(self.h, self.max_draws, candidate=candidate, centre=self.centre)
        for d in self.deltas:
            if t.add(d):
                break
        self.tests[name] = t
        return t

    @property
    def settled(self) -> bool:
        """Some candidate has joined and every one has settled."""
        return bool(self.tests) and all(t.done for t in self.tests.values())

    @property
    def done(self) -> bool:
        """No more draws are needed: every candidate is settled or the pool is exhausted."""
        return self.settled or self.draws >= self.max_draws

    @property
    def stopped_early(self) -> bool:
        """Fewer than `max_draws` draws made (once drawing is `done`: the decisions settled before the end)."""
        return self.draws < self.max_draws

    def grow(self, more: int, *, h: int) -> None:
        """`more` draws joined the pool: later joiners are judged against all of them, stopping after `h`
        extremes (the candidates already in keep the pool they joined)."""
        self.max_draws += int(more)
        self.h = int(h)

    def next_round(self) -> int:
        """How many draws to make next: `h` (none can settle in fewer), fewer at the pool's end, 0 when done."""
        return 0 if self.done else min(self.h, self.max_draws - self.draws)

    def add(self, draw: float) -> bool:
        """Record one draw's delta and count it for every unsettled candidate; return `done`."""
        if self.draws >= self.max_draws:
            msg = f"this pool has made all its {self.max_draws} draws; check `done` before drawing again."
            raise DataError(msg)
        self.deltas.append(float(draw))
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
