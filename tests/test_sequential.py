"""Sequential nulls (Besag & Clifford 1991) decide as the full draws do, at a fraction of the draws for nulls."""

import numpy as np
import pytest

from scsuperweight.errors import DataError
from scsuperweight.metrics import empirical_p
from scsuperweight.sequential import SequentialNull, SequentialPool, decision_h, fixed_p, sequential_p

ALPHA, N = 0.05, 40


def _cases(kind: str, n_cases: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        draws = rng.normal(0, 1, N)  # random scalars: most do nothing, some a little
        if kind == "strong":  # a planted super weight: far outside its matrix's null
            cand = rng.choice([-1, 1]) * rng.uniform(5, 50)
        elif kind == "null":  # a candidate that is just another scalar of its matrix
            cand = rng.normal(0, 1)
        else:  # near the decision boundary: among the 1-3 largest of the draws
            cand = np.sort(np.abs(draws))[-rng.integers(1, 4)] * rng.choice([-1, 1]) * rng.uniform(0.98, 1.02)
        yield cand, draws


@pytest.mark.parametrize("kind", ["strong", "null", "boundary"])
def test_decisions_equal_the_full_draw_decisions(kind):
    h = decision_h(ALPHA, N)
    agree_empirical = []
    for cand, draws in _cases(kind, 400, seed={"strong": 1, "null": 2, "boundary": 3}[kind]):
        s = sequential_p(cand, iter(draws), h=h, max_draws=N)
        full = fixed_p(cand, draws)
        assert (s.p < ALPHA) == (full < ALPHA)
        if not s.stopped_early:
            assert s.draws == N and s.p == pytest.approx(full)
        agree_empirical.append((s.p < ALPHA) == (empirical_p(cand, draws) < ALPHA))
    if kind == "strong":
        assert all(agree_empirical)  # and with the median-centred p that prune reports today
    elif kind == "null":
        assert np.mean(agree_empirical) >= 0.97


def test_null_candidates_stop_after_a_handful_of_draws_strong_ones_use_all():
    h = decision_h(ALPHA, N)
    null = [sequential_p(c, iter(d), h=h, max_draws=N) for c, d in _cases("null", 2000, 4)]
    strong = [sequential_p(c, iter(d), h=h, max_draws=N) for c, d in _cases("strong", 200, 5)]
    mean_null = np.mean([s.draws for s in null])
    # E[min(h / u, N)] for u ~ U(0, 1) is h + h log(N / h) = 8.0 for h = 2, N = 40
    assert 6.5 < mean_null < 9.5
    assert np.mean([s.stopped_early for s in null]) > 0.9
    assert all(s.draws == N and s.p == 1 / (N + 1) for s in strong)


def test_p_values_by_hand():
    s = SequentialNull(2, 10, candidate=1.0)
    for d, done in [(0.1, False), (-1.5, False), (np.nan, False), (0.2, False), (1.0, True)]:  # a tie is extreme
        assert s.add(d) is done
    assert (s.draws, s.extremes, s.p) == (4, 2, 0.5)
    with pytest.raises(DataError, match="already settled"):
        s.add(0.0)
    t = sequential_p(-3.0, [0.1] * 20, h=2, max_draws=5)
    assert (t.draws, t.extremes, t.stopped_early, t.p) == (5, 0, False, 1 / 6)
    assert np.isnan(SequentialNull(1, 3, candidate=0.5).p)
    assert decision_h(0.05, 40) == 2 and decision_h(0.05, 19) == 1 and decision_h(0.01, 200) == 2
    with pytest.raises(DataError, match="`alpha` must be in"):
        decision_h(1.5, 40)


def test_pool_draws_until_every_candidate_is_settled():
    pool = SequentialPool({"weak": 0.05, "strong": 9.0}, h=2, max_draws=30)
    rng = np.random.default_rng(0)
    while not pool.add(float(rng.normal())):
        pass
    weak, strong = pool.tests["weak"], pool.tests["strong"]
    assert weak.stopped_early and weak.draws == 2 and weak.p == 1.0
    assert strong.draws == pool.draws == 30 and strong.p == 1 / 31


def test_a_late_joiner_replays_the_draws_made_then_the_pool_draws_on():
    draws = [0.1, -0.2, 0.05, 3.0, -0.1, 0.3, -4.0, 0.2]
    pool = SequentialPool(h=2, max_draws=len(draws))
    assert pool.next_round() == 2  # nobody joined yet: a fixed-size null, drawn in rounds of h
    pool.add(draws[0]), pool.add(draws[1])
    pool.join("strong", 2.5)  # replays 2 draws, none as extreme
    pool.join("weak", 0.15)  # replays 2 draws, one as extreme (-0.2): unsettled
    assert (pool.tests["strong"].draws, pool.tests["weak"].draws, pool.tests["weak"].extremes) == (2, 2, 1)
    assert pool.join("weak", 9.0) is pool.tests["weak"]  # joining twice keeps the first test
    while n := pool.next_round():
        for d in draws[pool.draws:pool.draws + n]:
            pool.add(d)
    # weak settles on the 4th draw (3.0); strong needs 3.0 and -4.0, the 7th: one draw short of the pool
    assert pool.tests["weak"].draws == 4 and pool.tests["weak"].p == 0.5
    assert pool.tests["strong"].draws == 7 and pool.tests["strong"].p == 2 / 7
    assert pool.draws == 8 and pool.done and not pool.stopped_early  # rounds of 2: the last one drew the 8th
    # a candidate joining the finished pool is judged on the draws recorded: the same p as if it had been there
    late = pool.join("late", 2.5)
    assert (late.draws, late.p) == (7, 2 / 7)
    with pytest.raises(DataError, match="all its 8 draws"):
        pool.add(0.0)


def test_a_pool_settles_early_only_once_every_joiner_is_settled():
    pool = SequentialPool({"a": 0.01}, h=1, max_draws=10)
    assert pool.add(0.5) and pool.settled and pool.stopped_early and pool.next_round() == 0
    pool.join("b", 5.0)  # a later phase's condition reopens the pool
    assert not pool.done and pool.next_round() == 1
    pool.grow(10, h=2)  # more draws arrived: later joiners are judged against all 20
    pool.join("c", 5.0)
    assert (pool.max_draws, pool.tests["c"].max_draws, pool.tests["b"].max_draws, pool.next_round()) == (20, 20, 10, 2)
    with pytest.raises(DataError, match="finite delta"):
        pool.join("nan", float("nan"))
