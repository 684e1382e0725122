"""Property tests (issue 16, req 7) for the metrics: bounds, invariances (cell order, rotation, scale, label
names) and agreement with brute-force implementations written from each metric's definition.

Embeddings are drawn from a seeded generator whose seed, size and dimension hypothesis chooses: points in
general position, so that neighbour orders have no ties and the invariances hold exactly up to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist, pdist
from scipy.stats import ortho_group, spearmanr

from scsuperweight import metrics as M

SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def embedded(draw, min_cells=6, max_cells=40, max_labels=4):
    n = draw(st.integers(min_cells, max_cells))
    d = draw(st.integers(2, 8))
    n_labels = draw(st.integers(2, max_labels))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    labels = np.concatenate([np.arange(n_labels), np.arange(n_labels),  # every label at least twice
                             rng.integers(0, n_labels, n - 2 * n_labels)]) if n >= 2 * n_labels else None
    if labels is None:
        labels = np.arange(n) % 2
    centres = rng.normal(0, draw(st.sampled_from([0.0, 1.0, 5.0])), (labels.max() + 1, d))
    x = centres[labels] + rng.normal(size=(n, d))
    return x, rng.permutation(labels), rng


def cos_dist(x):
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 1 - u @ u.T


def brute_knn(d: np.ndarray, k: int) -> list[list[int]]:
    d = d.copy()
    np.fill_diagonal(d, np.inf)
    return [list(np.argsort(row, kind="stable")[:k]) for row in d]


# ---------------------------------------------------------------- kNN label vote

@SETTINGS
@given(data=embedded(), k=st.integers(1, 6))
def test_knn_label_correct_brute_force_and_invariances(data, k):
    x, labels, rng = data
    k = min(k, len(x) - 1)
    got = M.knn_label_correct(x, labels, k=k)
    expect = []
    for i, nb in enumerate(brute_knn(cos_dist(x), k)):
        votes = {lab: 0 for lab in labels[nb]}
        for lab in labels[nb]:
            votes[lab] += 1
        best = max(votes.values())
        # a tie goes to the label of the nearest tied neighbour
        pred = next(lab for lab in labels[nb] if votes[lab] == best)
        expect.append(pred == labels[i])
    assert np.array_equal(got, expect)
    perm = rng.permutation(len(x))
    q = ortho_group.rvs(x.shape[1], random_state=rng.integers(1 << 31)) if x.shape[1] > 1 else np.eye(1)
    assert np.array_equal(M.knn_label_correct(x[perm], labels[perm], k=k), got[perm])  # cell order
    assert np.array_equal(M.knn_label_correct(x @ q * 3.7, labels, k=k), got)  # rotation and scale
    renamed = np.array([f"type {v}" for v in labels])
    assert np.array_equal(M.knn_label_correct(x, renamed, k=k), got)  # label names


# ---------------------------------------------------------------- neighbourhood preservation

@SETTINGS
@given(data=embedded(), k=st.integers(1, 6), metric=st.sampled_from(["euclidean", "cosine"]))
def test_knn_preservation_brute_force_bounds_and_invariances(data, k, metric):
    x, _, rng = data
    k = min(k, len(x) - 1)
    y = x + rng.normal(0, 0.5, x.shape)
    got = M.knn_preservation(x, y, k=k, metric=metric)
    dist = cos_dist if metric == "cosine" else (lambda a: cdist(a, a))
    nx, ny = brute_knn(dist(x), k), brute_knn(dist(y), k)
    expect = [len(set(a) & set(b)) / k for a, b in zip(nx, ny, strict=True)]
    np.testing.assert_allclose(got, expect)
    assert np.all((got >= 0) & (got <= 1)) and np.allclose(got * k, np.round(got * k))
    assert np.all(M.knn_preservation(x, x, k=k, metric=metric) == 1)
    perm = rng.permutation(len(x))
    np.testing.assert_allclose(M.knn_preservation(x[perm], y[perm], k=k, metric=metric), got[perm])
    q = ortho_group.rvs(x.shape[1], random_state=rng.integers(1 << 31))
    np.testing.assert_allclose(M.knn_preservation(x, 2.5 * y @ q, k=k, metric=metric), got)


@SETTINGS
@given(data=embedded(min_cells=10, max_labels=6), metric=st.sampled_from(["euclidean", "cosine"]))
def test_knc_preservation_identity_and_bounds(data, metric):
    x, labels, rng = data
    assert M.knc_preservation(x, x, labels, metric=metric) == 1.0
    v = M.knc_preservation(x, rng.normal(size=x.shape), labels, metric=metric)
    assert 0.0 <= v <= 1.0
    q = ortho_group.rvs(x.shape[1], random_state=rng.integers(1 << 31))
    assert M.knc_preservation(x, x @ q + 4.0, labels, metric="euclidean") == 1.0  # a rigid motion keeps it all


@SETTINGS
@given(data=embedded(), metric=st.sampled_from(["euclidean", "cosine"]))
def test_cpd_brute_force_and_invariances(data, metric):
    x, _, rng = data
    y = x + rng.normal(0, 1.0, x.shape)
    got = M.cpd(x, y, metric=metric)
    dist = (lambda a: pdist(a, "cosine")) if metric == "cosine" else pdist
    # cosine ranking equals Euclidean ranking of unit rows, which is what cpd compares
    unit = (lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)) if metric == "cosine" else (lambda a: a)
    expect = spearmanr(pdist(unit(x)), pdist(unit(y))).statistic
    assert np.isclose(got, expect) and -1 <= got <= 1
    assert np.isclose(spearmanr(dist(x), dist(y)).statistic, expect)  # the same ranks either way
    assert np.isclose(M.cpd(x, x, metric=metric), 1.0)
    perm = rng.permutation(len(x))
    assert np.isclose(M.cpd(x[perm], y[perm], metric=metric), got)
    q = ortho_group.rvs(x.shape[1], random_state=rng.integers(1 << 31))
    assert np.isclose(M.cpd(x, 3.0 * y @ q, metric=metric), got)
    assert M.CPDReference(x, metric=metric)(y) == pytest.approx(got)


# ---------------------------------------------------------------- silhouettes and collapse

@SETTINGS
@given(data=embedded())
def test_silhouette_brute_force_bounds_and_row_scale(data):
    x, labels, rng = data
    if len(np.unique(labels)) > len(x) - 1:
        return
    got = M.silhouette_per_cell(x, labels)
    d = cos_dist(x)
    expect = []
    for i in range(len(x)):
        same = (labels == labels[i]) & (np.arange(len(x)) != i)
        if not same.any():
            expect.append(0.0)
            continue
        a = d[i, same].mean()
        b = min(d[i, labels == other].mean() for other in np.unique(labels) if other != labels[i])
        expect.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    np.testing.assert_allclose(got, expect, atol=1e-9)
    assert np.all((got >= -1) & (got <= 1))
    # cosine distance ignores each cell's length
    scaled = x * rng.uniform(0.1, 10, (len(x), 1))
    np.testing.assert_allclose(M.silhouette_per_cell(scaled, labels), got, atol=1e-9)
    assert M.silhouette_labels(x, labels) == pytest.approx(np.mean(got))


@SETTINGS
@given(data=embedded())
def test_mean_pairwise_cosine_brute_force_and_invariances(data):
    x, _, rng = data
    got = M.mean_pairwise_cosine(x)
    sim = 1 - cos_dist(x)
    n = len(x)
    assert got == pytest.approx((sim.sum() - np.trace(sim)) / (n * (n - 1)))
    assert -1 <= got <= 1
    q = ortho_group.rvs(x.shape[1], random_state=rng.integers(1 << 31))
    assert M.mean_pairwise_cosine(x @ q * rng.uniform(0.1, 10, (n, 1))) == pytest.approx(got)
    assert M.mean_pairwise_cosine(np.tile(x[:1], (n, 1))) == pytest.approx(1.0)


@SETTINGS
@given(data=embedded())
def test_effective_rank_bounds_and_invariances(data):
    x, _, rng = data
    n, d = x.shape
    got = M.effective_rank(x)
    assert 1 - 1e-9 <= got <= min(n - 1, d) + 1e-9
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s[s > 0] / s.sum()
    assert got == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    q = ortho_group.rvs(d, random_state=rng.integers(1 << 31))
    assert M.effective_rank(x @ q + rng.normal(size=d)) == pytest.approx(got)  # rotation and translation
    assert M.effective_rank(5 * x) == pytest.approx(got)
    line = np.outer(rng.normal(size=n), rng.normal(size=d))
    assert M.effective_rank(line) == pytest.approx(1.0)


# ---------------------------------------------------------------- clustering agreement

@settings(max_examples=15, deadline=None)
@given(n_per=st.integers(6, 15), n_labels=st.integers(2, 4), d=st.integers(2, 6), seed=st.integers(0, 1000))
def test_leiden_recovers_planted_clusters_and_ignores_label_names(n_per, n_labels, d, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_labels), n_per)
    centres = np.eye(n_labels, d) * 100 if d >= n_labels else 100 * np.eye(n_labels)[:, :d] + 100 * np.arange(
        n_labels)[:, None]
    x = centres[labels] + rng.normal(size=(len(labels), d))
    k = min(5, n_per - 1)
    # groups far apart with k < group size give a kNN graph whose components are the groups; Leiden's communities
    # are connected, and at a low resolution each component is one community
    kw = dict(n_neighbors=k, metric="euclidean", resolution=0.01)
    ari, nmi = M.leiden_ari_nmi(x, labels, **kw)
    assert ari == pytest.approx(1.0) and nmi == pytest.approx(1.0)
    shuffled = rng.permutation(labels)
    ari2, nmi2 = M.leiden_ari_nmi(x, shuffled, **kw)
    assert -1 <= ari2 < 1 and 0 <= nmi2 < 1
    names = np.array(["astro", "micro", "oligo", "opc"])[labels]
    assert M.leiden_ari_nmi(x, names, **kw) == pytest.approx((ari, nmi))


# ---------------------------------------------------------------- statistics

@SETTINGS
@given(null=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=50),
       value=st.floats(-1e3, 1e3, allow_nan=False), alternative=st.sampled_from(["greater", "less", "two-sided"]))
def test_empirical_p_brute_force_and_bounds(null, value, alternative):
    z = np.asarray(null)
    got = M.empirical_p(value, z, alternative=alternative)
    tol = 1e-12 * max(1.0, abs(value))
    if alternative == "greater":
        count = sum(v >= value - tol for v in z)
    elif alternative == "less":
        count = sum(v <= value + tol for v in z)
    else:
        c = float(np.median(z))
        tol = 1e-12 * max(1.0, abs(value - c))
        count = sum(abs(v - c) >= abs(value - c) - tol for v in z)
    assert got == (1 + count) / (1 + len(z))
    assert 1 / (len(z) + 1) <= got <= 1
    assert M.empirical_p(value, z[::-1], alternative=alternative) == got  # order of the null is irrelevant


@SETTINGS
@given(values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=2, max_size=40),
       seed=st.integers(0, 1000), alpha=st.sampled_from([0.05, 0.1, 0.5]))
def test_bootstrap_ci_contains_the_range_it_should(values, seed, alpha):
    v = np.asarray(values)
    low, high = M.bootstrap_ci(v, n_boot=50, seed=seed, alpha=alpha)
    assert v.min() - 1e-9 <= low <= high <= v.max() + 1e-9
    c = M.bootstrap_ci(np.full(5, 3.25), n_boot=20, seed=seed)
    assert c == pytest.approx((3.25, 3.25))
