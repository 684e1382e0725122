"""Right answers for scsuperweight.metrics: brute-force references, planted structure, exact small cases."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from scsuperweight import metrics as m
from scsuperweight.errors import DataError

# ----------------------------------------------------------------------------------- brute-force references


def _brute_knn(x: np.ndarray, k: int, metric: str = "euclidean") -> list[list[int]]:
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for i in range(len(x)):
        dists = []
        for j in range(len(x)):
            if j != i:
                dists.append((float(np.sqrt(np.sum((x[i] - x[j]) ** 2))), j))
        dists.sort()
        out.append([j for _, j in dists[:k]])
    return out


def _brute_knn_preservation(ref, emb, k, metric="euclidean"):
    nr, ne = _brute_knn(ref, k, metric), _brute_knn(emb, k, metric)
    return np.array([len(set(a) & set(b)) / k for a, b in zip(nr, ne)])


def _brute_knc(ref, emb, labels, k):
    classes = sorted(set(labels.tolist()))
    mr = np.array([ref[labels == c].mean(axis=0) for c in classes])
    me = np.array([emb[labels == c].mean(axis=0) for c in classes])
    return float(np.mean(_brute_knn_preservation(mr, me, k)))


def _brute_cpd(ref, emb):
    dr, de = [], []
    for i in range(len(ref)):
        for j in range(i + 1, len(ref)):
            dr.append(np.linalg.norm(ref[i] - ref[j]))
            de.append(np.linalg.norm(emb[i] - emb[j]))
    return spearmanr(dr, de).statistic


def _brute_label_correct(x, labels, k, metric="euclidean"):
    out = []
    for i, neigh in enumerate(_brute_knn(x, k, metric)):
        votes: dict = {}
        for j in neigh:
            votes[labels[j]] = votes.get(labels[j], 0) + 1
        best = max(votes.values())
        # tie: the label of the nearest neighbour among the tied labels
        pred = next(labels[j] for j in neigh if votes[labels[j]] == best)
        out.append(pred == labels[i])
    return np.array(out)


def _clusters(n_per=60, n_clusters=5, dim=32, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)) * 5
    labels = np.repeat(np.array([f"type{c}" for c in range(n_clusters)]), n_per)
    x = np.repeat(centres, n_per, axis=0) + rng.normal(size=(n_per * n_clusters, dim)) * spread
    return x, labels


# ---------------------------------------------------------------------------------- Kobak–Berens metrics


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_knn_preservation_matches_brute_force(metric, k):
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(40, 8))
    emb = ref[:, :3] + rng.normal(size=(40, 3)) * 0.7
    got = m.knn_preservation(ref, emb, k=k, metric=metric)
    assert got.shape == (40,)
    np.testing.assert_array_equal(got, _brute_knn_preservation(ref, emb, k, metric))
    assert 0 < got.mean() < 1  # the test data are neither trivially kept nor scrambled


@pytest.mark.parametrize("k", [None, 1, 3])
def test_knc_preservation_matches_brute_force(k):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(12), 5)
    centres = rng.normal(size=(12, 10)) * 2
    ref = centres[labels] + rng.normal(size=(60, 10))
    emb = ref[:, :2] + rng.normal(size=(60, 2)) * 1.5
    expected_k = min(10, max(1, 12 // 4)) if k is None else k
    assert m.knc_preservation(ref, emb, labels, k=k) == _brute_knc(ref, emb, labels, expected_k)


def test_cpd_matches_spearman_on_all_pairs():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(40, 6))
    emb = ref[:, :2] + rng.normal(size=(40, 2)) * 0.5
    expected = _brute_cpd(ref, emb)
    assert 0.1 < expected < 0.9
    np.testing.assert_allclose(m.cpd(ref, emb), expected, rtol=1e-12)
    # asking for at least all pairs gives all pairs
    np.testing.assert_allclose(m.cpd(ref, emb, n_pairs=10_000), expected, rtol=1e-12)


def test_cpd_sampled_pairs_and_cells_approximate_the_full_value():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(1500, 10))
    emb = ref[:, :3] + rng.normal(size=(1500, 3)) * 0.5
    full = spearmanr(pdist(ref), pdist(emb)).statistic
    assert abs(m.cpd(ref, emb) - full) < 0.02  # 1000-cell subsample
    assert abs(m.cpd(ref, emb, n_pairs=50_000) - full) < 0.02
    assert m.cpd(ref, emb, seed=7) == m.cpd(ref, emb, seed=7)


def test_condensed_index_to_pair_mapping():
    for n in (2, 3, 37, 1000):
        i, j = np.triu_indices(n, 1)
        gi, gj = m._pairs_from_condensed(np.arange(n * (n - 1) // 2), n)
        np.testing.assert_array_equal(gi, i)
        np.testing.assert_array_equal(gj, j)


def test_identity_is_perfect_and_permutation_is_chance():
    rng = np.random.default_rng(5)
    n, k = 500, 10
    ref = rng.normal(size=(n, 16))
    np.testing.assert_array_equal(m.knn_preservation(ref, ref, k=k), np.ones(n))
    assert m.cpd(ref, ref) == pytest.approx(1.0)
    assert m.knc_preservation(ref, ref, rng.integers(0, 20, n)) == 1.0
    # an unrelated order of the same points: overlap of two random k-sets out of n - 1
    shuffled = ref[rng.permutation(n)]
    assert m.knn_preservation(ref, shuffled, k=k).mean() == pytest.approx(k / (n - 1), abs=0.01)
    assert abs(m.cpd(ref, shuffled)) < 0.05
    # scaling and rotating keeps every neighbourhood and distance rank
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    np.testing.assert_array_equal(m.knn_preservation(ref, 3.0 * ref @ q, k=k), np.ones(n))
    assert m.cpd(ref, 3.0 * ref @ q) == pytest.approx(1.0)


def test_cpd_of_a_fully_collapsed_embedding_is_zero():
    ref = np.random.default_rng(6).normal(size=(30, 4))
    assert m.cpd(ref, np.ones((30, 4))) == 0.0


# --------------------------------------------------------------------------------------- label structure


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_label_correct_matches_brute_force_including_ties(metric):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 5))
    labels = rng.integers(0, 3, 40)
    # k=4 with 3 labels makes 2-2 ties common, so this checks the tie rule too
    for k in (1, 4, 6):
        got = m.knn_label_correct(x, labels, k=k, metric=metric)
        assert got.dtype == bool
        np.testing.assert_array_equal(got, _brute_label_correct(x, labels, k, metric))


def test_knn_label_correct_tie_goes_to_the_nearest_neighbour():
    # cell 0 (label b): neighbours 1 (a, distance 1) and 2 (b, distance 2) tie 1-1, so the vote is a
    x = np.array([[0.0], [1.0], [-2.0], [10.0], [11.0], [13.0]])
    labels = np.array(["b", "a", "b", "a", "a", "b"])
    got = m.knn_label_correct(x, labels, k=2, metric="euclidean")
    assert not got[0]
    # cell 2 (b): neighbours 0 (b, 2) and 1 (a, 3): tie, nearest is b, correct
    assert got[2]


def test_planted_clusters_are_recovered():
    x, labels = _clusters()
    assert m.knn_label_correct(x, labels).all()
    assert m.knn_accuracy(x, labels) == 1.0
    ari, nmi = m.leiden_ari_nmi(x, labels)
    assert ari > 0.95 and nmi > 0.95
    assert m.silhouette_labels(x, labels) > 0.6
    per_cell = m.silhouette_per_cell(x, labels)
    assert per_cell.shape == (300,) and per_cell.min() > 0.3
    assert m.leiden_ari_nmi(x, labels) == (ari, nmi)  # seeded: same answer twice


def test_shuffled_labels_are_at_chance():
    x, labels = _clusters(seed=1)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert m.knn_accuracy(x, shuffled) < 0.4  # chance is 0.2
    assert m.knn_label_correct(x, shuffled).mean() < 0.4
    ari, nmi = m.leiden_ari_nmi(x, shuffled)
    assert abs(ari) < 0.05 and nmi < 0.1
    assert abs(m.silhouette_labels(x, shuffled)) < 0.15  # vs > 0.6 with the true labels


def test_silhouette_matches_hand_computation():
    # two tight pairs at right angles: cosine distance 0 within a pair, 1 across
    x = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    labels = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(m.silhouette_per_cell(x, labels), np.ones(4))
    assert m.silhouette_labels(x, np.array([0, 1, 0, 1])) == pytest.approx(-0.5)


# ---------------------------------------------------------------------------------------------- collapse


def test_mean_pairwise_cosine_matches_brute_force():
    x = np.random.default_rng(8).normal(size=(30, 5)) + 0.5
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = u @ u.T
    expected = (cos.sum() - np.trace(cos)) / (30 * 29)
    assert m.mean_pairwise_cosine(x) == pytest.approx(expected, abs=1e-12)


def test_collapse_diagnostics_on_planted_extremes():
    rng = np.random.default_rng(9)
    # collapsed: a shared offset plus a spread along one line, plus a whisper of noise
    c, v = rng.normal(size=64) * 10, rng.normal(size=64)
    collapsed = c + rng.normal(size=(2000, 1)) * v + rng.normal(size=(2000, 64)) * 1e-6
    assert m.mean_pairwise_cosine(collapsed) > 0.9
    assert m.effective_rank(collapsed) == pytest.approx(1.0, abs=0.01)
    isotropic = rng.normal(size=(2000, 64))
    assert abs(m.mean_pairwise_cosine(isotropic)) < 0.01
    assert 0.95 * 64 < m.effective_rank(isotropic) <= 64
    assert m.effective_rank(np.tile(rng.normal(size=64), (50, 1))) == 0.0


def test_effective_rank_of_planted_singular_values():
    rng = np.random.default_rng(10)
    n, d, s = 200, 20, np.array([3.0, 2.0, 1.0])
    # column-centred orthonormal left vectors, so centring leaves the planted spectrum intact
    q, _ = np.linalg.qr(rng.normal(size=(n, 3)) - rng.normal(size=(n, 3)).mean(axis=0))
    q, _ = np.linalg.qr(q - q.mean(axis=0))
    vt, _ = np.linalg.qr(rng.normal(size=(d, 3)))
    x = q @ np.diag(s) @ vt.T + rng.normal(size=d)  # a shared offset that centring removes
    p = s / s.sum()
    assert m.effective_rank(x) == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)
    equal = q @ np.diag([1.0, 1.0, 1.0]) @ vt.T
    assert m.effective_rank(equal) == pytest.approx(3.0, rel=1e-9)


# -------------------------------------------------------------------------------------------- statistics


def test_bootstrap_ci_covers_the_true_mean():
    rng = np.random.default_rng(11)
    hits = 0
    for rep in range(200):
        sample = rng.exponential(scale=2.0, size=60)
        low, high = m.bootstrap_ci(sample, n_boot=400, seed=rep)
        hits += low <= 2.0 <= high
    assert 0.85 <= hits / 200 <= 0.99  # nominal 0.95; the percentile interval runs a little short


def test_cluster_bootstrap_is_wider_under_donor_effects():
    rng = np.random.default_rng(12)
    donors = np.repeat(np.arange(8), 100)
    values = rng.normal(size=8)[donors] + rng.normal(size=800) * 0.3
    lo_c, hi_c = m.bootstrap_ci(values, seed=0)
    lo_d, hi_d = m.bootstrap_ci(values, units=donors, seed=0)
    assert hi_d - lo_d > 3 * (hi_c - lo_c)
    assert lo_d <= values.mean() <= hi_d
    assert m.bootstrap_ci(values, units=donors, seed=0) == (lo_d, hi_d)
    assert m.bootstrap_ci(values, units=donors, seed=1) != (lo_d, hi_d)


def test_bootstrap_ci_with_another_statistic_and_alpha():
    values = np.random.default_rng(13).normal(size=300)
    lo90, hi90 = m.bootstrap_ci(values, alpha=0.10, stat=np.median)
    lo99, hi99 = m.bootstrap_ci(values, alpha=0.01, stat=np.median)
    assert lo99 <= lo90 < np.median(values) < hi90 <= hi99


def test_bootstrap_indices_cells_and_whole_donors():
    cells = m.bootstrap_indices(50, n_boot=20, seed=3)
    assert len(cells) == 20 and all(i.shape == (50,) and i.min() >= 0 and i.max() < 50 for i in cells)
    assert all(np.array_equal(a, b) for a, b in zip(cells, m.bootstrap_indices(50, 20, 3)))

    donors = np.array(["d1"] * 3 + ["d2"] * 5 + ["d3"] * 2 + ["d1"] * 1)  # d1's cells are not contiguous
    sizes = {"d1": 4, "d2": 5, "d3": 2}
    resamples = m.bootstrap_indices(donors, n_boot=50, seed=0)
    for idx in resamples:
        counts = np.bincount(idx, minlength=donors.size)
        drawn = {}
        for d in sizes:
            c = counts[donors == d]
            assert (c == c[0]).all()  # a drawn donor brings all its cells, each the same number of times
            drawn[d] = c[0]
        assert sum(drawn.values()) == 3  # as many donors drawn as there are
        assert idx.size == sum(sizes[d] * drawn[d] for d in sizes)
    assert len({tuple(i) for i in resamples}) > 1


def test_bootstrap_diff_ci_detects_a_planted_difference():
    rng = np.random.default_rng(14)
    da, db = np.repeat(np.arange(6), 40), np.repeat(np.arange(6, 12), 40)
    a = 1.0 + rng.normal(size=6)[da % 6] * 0.2 + rng.normal(size=240) * 0.5
    b = rng.normal(size=6)[db % 6] * 0.2 + rng.normal(size=240) * 0.5
    low, high = m.bootstrap_diff_ci(a, b, units_a=da, units_b=db)
    assert 0 < low < a.mean() - b.mean() < high
    assert m.bootstrap_diff_ci(a, b, units_a=da, units_b=db) == (low, high)
    low0, high0 = m.bootstrap_diff_ci(a, a + 0.0)
    assert low0 < 0 < high0


def test_empirical_p_exact_values():
    null = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert m.empirical_p(4.0, null, "greater") == pytest.approx(3 / 6)
    assert m.empirical_p(4.0, null, "less") == pytest.approx(5 / 6)
    assert m.empirical_p(4.0, null, "two-sided") == pytest.approx(5 / 6)  # |null - 3| >= 1: 1, 2, 4, 5
    assert m.empirical_p(10.0, null, "greater") == pytest.approx(1 / 6)
    assert m.empirical_p(10.0, null, "two-sided") == pytest.approx(1 / 6)
    assert m.empirical_p(-10.0, null, "two-sided") == pytest.approx(1 / 6)
    assert m.empirical_p(0.0, null, "less") == pytest.approx(1 / 6)
    assert m.empirical_p(3.0, null, "two-sided") == 1.0
    assert m.empirical_p(5.0, null) == pytest.approx(3 / 6)  # default two-sided: 1 and 5
    # a tie by rounding noise still counts as a tie
    assert m.empirical_p(0.1 + 0.2, [0.3, 0.0], "greater") == pytest.approx(2 / 3)


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, y, lab: m.knn_preservation(x, y[:-1]), "same cells"),
        (lambda x, y, lab: m.cpd(x, y[:10]), "same cells"),
        (lambda x, y, lab: m.knn_label_correct(x, lab[:-1]), "40 cells"),
        (lambda x, y, lab: m.knn_label_correct(np.where(x > 2, np.nan, x), lab), "NaN"),
        (lambda x, y, lab: m.knn_label_correct(x[:, 0], lab), "2-D"),
        (lambda x, y, lab: m.knn_accuracy(x, np.r_[lab[:-3], [7, 7, 7]]), "at least 5 cells.*7 \\(3\\)"),
        (lambda x, y, lab: m.knn_accuracy(x, np.zeros(40)), "at least 2 labels"),
        (lambda x, y, lab: m.knn_label_correct(x, np.r_[lab[:-1].astype(object), None]), "missing"),
        (lambda x, y, lab: m.leiden_ari_nmi(x, lab, resolution=0), "resolution"),
        (lambda x, y, lab: m.knn_preservation(x, y, metric="manhattan"), "metric"),
        (lambda x, y, lab: m.cpd(x, y, n_pairs=1), "n_pairs"),
        (lambda x, y, lab: m.mean_pairwise_cosine(x[:1]), "at least 2 cells"),
        (lambda x, y, lab: m.bootstrap_ci(x[:, 0], units=lab[:-1]), "units"),
        (lambda x, y, lab: m.bootstrap_ci(x[:, 0], units=np.zeros(40)), "at least 2 distinct units"),
        (lambda x, y, lab: m.bootstrap_ci([1.0, np.nan]), "NaN"),
        (lambda x, y, lab: m.bootstrap_ci(x[:, 0], alpha=1.5), "alpha"),
        (lambda x, y, lab: m.bootstrap_indices(-3, 10, 0), ">= 1"),
        (lambda x, y, lab: m.empirical_p(1.0, [0.0, 1.0], "bigger"), "alternative"),
        (lambda x, y, lab: m.empirical_p(1.0, [0.0, np.nan]), "NaN"),
        (lambda x, y, lab: m.empirical_p(1.0, []), "non-empty"),
    ],
)
def test_bad_input_raises_data_error(call, match):
    rng = np.random.default_rng(15)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    labels = np.repeat(np.arange(4), 10)
    with pytest.raises(DataError, match=match):
        call(x, y, labels)


# issue 16: a group too small for a metric degrades (a neighbour count lowered, or NaN) with a SmallDataWarning
# saying which and why, where these raised before
@pytest.mark.parametrize(
    ("call", "match", "check"),
    [
        (lambda x, y, lab: m.knn_label_correct(x, lab, k=40), r"k=39 \(asked 40\): only 40 cells",
         lambda got, x, y, lab: np.array_equal(got, m.knn_label_correct(x, lab, k=39))),
        (lambda x, y, lab: m.knn_label_correct(x, np.r_[lab[:-1], 99]), "label.*99.*single cell",
         lambda got, x, y, lab: not got[-1] and got.shape == (40,)),
        (lambda x, y, lab: m.silhouette_labels(x, np.zeros(40)), "2 and n_cells",
         lambda got, x, y, lab: np.isnan(got)),
        (lambda x, y, lab: m.knc_preservation(x, y, np.zeros(40)), "at least 2 labels",
         lambda got, x, y, lab: np.isnan(got)),
        (lambda x, y, lab: m.knc_preservation(x, y, lab, k=5), r"k=3 \(asked 5\): only 4 labels",
         lambda got, x, y, lab: got == m.knc_preservation(x, y, lab, k=3)),
    ],
)
def test_small_input_degrades_with_a_warning(call, match, check):
    from scsuperweight.errors import SmallDataWarning

    rng = np.random.default_rng(15)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 3))
    labels = np.repeat(np.arange(4), 10)
    with pytest.warns(SmallDataWarning, match=match):
        got = call(x, y, labels)
    assert check(got, x, y, labels)


def test_data_error_is_a_value_error():
    with pytest.raises(ValueError):
        m.cpd(np.zeros((5, 2)), np.zeros((4, 2)))


# ------------------------------------------------------------------------------------- speed and imports


def test_all_metrics_run_on_2000_cells():
    """Every metric on an atlas-sized input returns finite values (speed is measured in benchmarks/, not here)."""
    x, labels = _clusters(n_per=250, n_clusters=8, dim=64, spread=2.0, seed=16)
    rng = np.random.default_rng(16)
    y = x + rng.normal(size=x.shape)
    donors = rng.integers(0, 10, x.shape[0])
    values = [
        m.knn_label_correct(y, labels).mean(), m.knn_accuracy(y, labels), *m.leiden_ari_nmi(y, labels),
        m.silhouette_labels(y, labels), m.silhouette_per_cell(y, labels).mean(), m.knn_preservation(x, y).mean(),
        m.knc_preservation(x, y, labels), m.cpd(x, y), m.mean_pairwise_cosine(y), m.effective_rank(y),
        *m.bootstrap_ci(y[:, 0], units=donors),
        *m.bootstrap_diff_ci(y[:1000, 0], y[1000:, 0], donors[:1000], donors[1000:]),
    ]
    assert all(np.isfinite(np.asarray(v, dtype=float)).all() for v in values)


def test_metrics_module_stays_a_torch_free_leaf():
    imported = set()
    for path in Path(m.__file__).parent.glob("*.py"):  # every module of the package
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: import absolutely, so this test sees where from"
                imported.add(node.module)
    roots = {name.split(".")[0] for name in imported}
    assert roots <= {
        "__future__",
        "collections",
        "dataclasses",
        "numbers",
        "warnings",
        "numpy",
        "scipy",
        "sklearn",
        "igraph",
        "leidenalg",
        "scsuperweight",
    }
    ours = {name for name in imported if name.startswith("scsuperweight") and not name.startswith(m.__name__)}
    assert ours <= {"scsuperweight._log", "scsuperweight.errors"}


def test_cpd_reference_equals_spearman_with_ties_and_subsample():
    """The cached-reference CPD equals scipy's Spearman on the same pairs, with bootstrap duplicates (tied zero
    distances) and with the 1000-cell subsample."""
    rng = np.random.default_rng(0)
    for n in (40, 1100):
        a = rng.normal(size=(n, 6))
        b = a + rng.normal(size=(n, 6)) * 0.7
        idx = rng.integers(0, n, n)  # a bootstrap resample: duplicated cells
        ra, rb = a[idx], b[idx]
        if n > 1000:
            keep = np.sort(np.random.default_rng(4).choice(n, size=1000, replace=False))
            ra, rb = ra[keep], rb[keep]
        expect = spearmanr(pdist(ra), pdist(rb)).statistic
        ref = m.CPDReference(a[idx], seed=4)
        assert ref(b[idx]) == pytest.approx(expect, abs=1e-12)
        assert m.cpd(a[idx], b[idx], seed=4) == pytest.approx(expect, abs=1e-12)
        assert ref(a[idx]) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ the registry


def test_registry_entries_are_consistent():
    from scsuperweight.metrics import registry as R

    assert set(R.per_cell()) | set(R.set_level()) == set(R.METRICS)
    assert not set(R.per_cell()) & set(R.set_level())
    for name, s in R.METRICS.items():
        assert s.name == name and s.direction in (1, -1) and s.level in ("cell", "set") and s.label and s.doc
        assert set(s.primary_for) <= set(s.families), name  # primary only for a family that measures it
    # one primary per family, the one the report has always judged on
    assert R.primary_metric("scgpt") == "gepc_mse" and R.primary_metric("bert") == "mlm_loss"
    # a scGPT model without the MVC decoder: the per-position decoder's error, never a higher-is-better stand-in
    assert R.primary_metric("scgpt", ["gep_mse", "gep_pearson", "knn_accuracy"]) == "gep_mse"
    assert R.primary_metric("scgpt", ["gep_pearson"]) == "gepc_mse"
    with pytest.raises(KeyError, match="llama"):
        R.primary_metric("llama")
    assert R.reconstruction("bert") == ("mlm_loss", "mlm_accuracy")
    # directions: a collapse raises mean cosine and the errors, lowers everything else
    assert R.worse(0.2, "mean_cosine") == pytest.approx(0.2) and R.worse(0.2, "knn_accuracy") == pytest.approx(-0.2)
    assert R.worse(-0.3, "not_registered") == pytest.approx(0.3) and R.label("not_registered") == "not_registered"
    assert R.default_metric(["cpd", "knn_accuracy", "gep_mse"]) == "gep_mse" and R.default_metric(["zz"]) is None


def test_readme_metric_table_is_the_registry():
    from scsuperweight.metrics import registry as R

    readme = (Path(m.__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    start, end = "<!-- metrics-table", "<!-- /metrics-table -->"
    assert start in readme and end in readme, "README.md lost its metric table markers"
    block = readme[readme.index(start):readme.index(end)]
    block = block[block.index("\n") + 1:].strip()
    names = re.findall(r"^\| `([a-z_0-9]+)` \|", block, flags=re.M)
    assert sorted(names) == sorted(R.METRICS), "README metric table and registry differ in their metrics"
    assert block == R.markdown_table(), (
        "README.md's metric table is out of date: paste the output of "
        "`python -c 'from scsuperweight.metrics import registry; print(registry.markdown_table())'` "
        "between its markers")


def test_prune_computes_only_registered_metrics():
    from scsuperweight.metrics import registry as R
    from scsuperweight.prune import per_cell_metrics, set_metrics

    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 12)
    res = {"gepc_mse": rng.random(36), "cls": rng.normal(size=(36, 8)) + np.repeat(np.eye(8)[:3] * 4, 12, axis=0)}
    pc = per_cell_metrics(res, res, labels, k=5)
    sm = set_metrics(res["cls"], res["cls"], labels, True, 0)
    assert set(pc) <= set(R.per_cell()) and set(sm) <= set(R.set_level())
    assert {n for n in pc if R.needs_labels(n)} == {"knn_accuracy", "silhouette"}
    assert set(sm) == set(R.set_level())  # several labels: every set-level metric is computed
