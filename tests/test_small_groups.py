"""Small data degrade, never crash (issue 16, req 4): each test reproduces a crash of today's metrics on a group
too small for a fixed neighbour count, and states the wanted behaviour (neighbour counts adapt to the group, or the
value is NaN with a reason). The reason is a `SmallDataWarning`, which prune records in collapse.tsv's `note`."""

from __future__ import annotations

import numpy as np
import pytest

from scsuperweight import metrics as M
from scsuperweight.errors import SmallDataWarning


def planted(n_per: int, n_labels: int = 3, d: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.array([f"t{i}" for i in range(n_labels)]), n_per)
    x = 20 * np.eye(n_labels, d)[np.repeat(np.arange(n_labels), n_per)] + rng.normal(size=(n_labels * n_per, d))
    return x, labels


def test_leiden_on_a_group_smaller_than_its_neighbours():
    # --max-cells-per-label 5 with 3 labels: the 'all' group has 15 cells, Leiden asks for 15 neighbours
    x, labels = planted(5)
    with pytest.warns(SmallDataWarning, match=r"n_neighbors=4 \(asked 15\)"):
        ari, nmi = M.leiden_ari_nmi(x, labels)  # 15 neighbours of 15 cells: a complete graph; 4 keeps the types apart
    assert ari == pytest.approx(1.0, abs=0.3) and 0.5 < nmi <= 1.0


def test_knn_vote_with_k_above_n_minus_1():
    x, labels = planted(3)  # 9 cells, prune's k=10
    with pytest.warns(SmallDataWarning, match=r"k=8 \(asked 10\)"):
        got = M.knn_label_correct(x, labels, k=10)
    # k adapts to 8: every other cell votes, so each cell's own type (2 others) loses to each other type (3 cells):
    # the leave-one-out vote over a whole group is always wrong on balanced types; the value is defined, not a crash
    assert got.shape == (9,) and not got.any()
    assert np.array_equal(got, M.knn_label_correct(x, labels, k=8))
    # with a k the group allows, the planted types win
    assert M.knn_label_correct(x, labels, k=2).all()


def test_knn_vote_with_a_single_cell_label():
    # max_cells_per_label=1, or a rare type: that cell cannot be voted on; the others still can
    x, labels = planted(4)
    labels = labels.astype(object)
    labels[0] = "rare"
    with pytest.warns(SmallDataWarning, match="'rare'"):
        got = np.asarray(M.knn_label_correct(x, labels, k=3), dtype=float)
    assert got.shape == (12,) and (np.isnan(got[0]) or got[0] == 0) and np.nanmean(got[1:]) > 0.8


def test_knn_preservation_with_k_above_n_minus_1():
    x, _ = planted(2)  # 6 cells, prune's k=10
    with pytest.warns(SmallDataWarning, match=r"k=5 \(asked 10\)"):
        got = M.knn_preservation(x, x, k=10)
    assert np.all(got == 1.0)


def test_silhouette_of_a_group_with_one_label():
    # a label|condition group holds one label: the silhouette is undefined there, NaN with a reason, not an error
    x, _ = planted(6)
    with pytest.warns(SmallDataWarning, match="silhouette is NaN"):
        got = M.silhouette_per_cell(x, np.array(["astro"] * len(x)))
    assert got.shape == (len(x),) and np.isnan(got).all()


def test_prune_set_metrics_on_a_small_multi_label_group():
    from scsuperweight.prune import set_metrics

    x, labels = planted(4)  # a condition group of 12 cells with 3 labels
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = set_metrics(x, x, labels, True, 0)
    assert {"leiden_ari", "leiden_nmi", "cpd", "mean_cosine", "effective_rank"} <= set(out)
    assert out["cpd"] == pytest.approx(1.0)


def test_prune_per_cell_metrics_on_few_cells():
    from scsuperweight.prune import per_cell_metrics

    x, labels = planted(3)  # 9 cells evaluated in all, k=10
    res = {"cls": x, "gep_mse": np.ones(len(x))}
    out = per_cell_metrics(res, None, labels, k=10)
    assert out["knn_preservation"].shape == (9,) and np.all(out["knn_preservation"] == 1.0)
    assert out["knn_accuracy"].shape == (9,)


def test_leiden_on_two_cells_is_nan_with_a_reason():
    x, labels = planted(1, n_labels=2)
    with pytest.warns(SmallDataWarning, match="Leiden skipped: 2 cell"):
        ari, nmi = M.leiden_ari_nmi(x, labels)
    assert np.isnan(ari) and np.isnan(nmi)


def test_knc_with_one_label_is_nan_and_k_adapts_to_the_labels():
    x, labels = planted(4)
    with pytest.warns(SmallDataWarning, match="at least 2 labels"):
        assert np.isnan(M.knc_preservation(x, x, np.zeros(len(x))))
    with pytest.warns(SmallDataWarning, match=r"k=2 \(asked 5\): only 3 labels"):
        assert M.knc_preservation(x, x, labels, k=5) == 1.0


def test_knn_accuracy_k_adapts_to_the_smallest_training_fold():
    x, labels = planted(5)  # 15 cells, 5 folds: 12 train cells at least
    with pytest.warns(SmallDataWarning, match=r"k=12 \(asked 14\)"):
        acc = M.knn_accuracy(x, labels, k=14)
    assert acc == M.knn_accuracy(x, labels, k=12)


def test_prune_records_why_a_metric_adapted_instead_of_warning():
    import warnings

    from scsuperweight.prune import _note, per_cell_metrics, set_metrics

    x, labels = planted(4)  # 12 cells, 3 labels
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    notes: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallDataWarning)  # recorded for the note column, never raised
        set_metrics(x, x, labels, True, 0, notes=notes)
        per_cell_metrics({"cls": x}, None, labels, k=20, notes=notes)
    assert _note(notes, "leiden") == "n_neighbors=3 (asked 15): on 12 cells more neighbours would join every cluster"
    assert _note(notes, "knn_accuracy").startswith("k=11 (asked 20)")
    assert _note(notes, "knn_preservation").startswith("k=11 (asked 20)")
    assert _note(notes, "cpd") == ""
