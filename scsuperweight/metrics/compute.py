"""The computations: metrics that compare embeddings of the same cells under different weight edits.

The prune step embeds one set of cells with the intact model and again with a candidate super weight
(or a control) removed, and asks three questions of each embedding:

- is cell identity still there? (kNN label agreement, Leiden ARI/NMI, silhouette);
- is the geometry of the intact embedding kept? (kNN / kNC preservation and the correlation of pairwise
  distances, after Kobak & Berens 2019, "The art of using t-SNE for single-cell transcriptomics");
- has the embedding collapsed? (mean pairwise cosine, effective rank);

and then how sure we are (cluster bootstrap over donors, empirical p-values against random controls).

Small groups degrade rather than fail: a neighbour count larger than the group allows is lowered to ``n - 1`` and a
value the group cannot define (a silhouette with one label, Leiden on fewer than 3 cells) is NaN; either way a
``SmallDataWarning`` says which and why, so that a caller (prune) can record it next to the value.

Leaf module: numpy, scipy, scikit-learn, igraph and leidenalg only; no torch, nothing else of ours but the
logger and the error and warning types. Per-cell variants (``knn_label_correct``, ``silhouette_per_cell``,
``knn_preservation``) exist so that callers can slice one computation by cell type or condition.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from numbers import Integral

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
)
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from scsuperweight._log import logger
from scsuperweight.errors import DataError, SmallDataWarning

__all__ = [
    "knn_label_correct",
    "knn_accuracy",
    "leiden_ari_nmi",
    "silhouette_labels",
    "silhouette_per_cell",
    "knn_preservation",
    "knc_preservation",
    "cpd",
    "CPDReference",
    "mean_pairwise_cosine",
    "effective_rank",
    "bootstrap_ci",
    "bootstrap_indices",
    "bootstrap_diff_ci",
    "empirical_p",
]

_METRICS = ("cosine", "euclidean")
_ALTERNATIVES = ("two-sided", "greater", "less")
# Kobak & Berens compute CPD on 1000 random cells (about 500k pairs): enough for a stable Spearman rho.
_CPD_MAX_CELLS = 1000


# --------------------------------------------------------------------------------------------- validation


def _as_matrix(x, name: str, *, min_rows: int = 2) -> np.ndarray:
    """Return ``x`` as a finite float64 (cells x dims) array or raise ``DataError`` saying what is wrong."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        msg = f"`{name}` must be a numeric (cells x dims) array; could not convert it: {err}"
        raise DataError(msg) from err
    if arr.ndim != 2:
        msg = (
            f"`{name}` must be 2-D (cells x dims); got shape {arr.shape}. "
            "Reshape a single-feature vector with `x.reshape(-1, 1)`."
        )
        raise DataError(msg)
    if arr.shape[0] < min_rows or arr.shape[1] < 1:
        msg = f"`{name}` needs at least {min_rows} cells and 1 dimension; got shape {arr.shape}."
        raise DataError(msg)
    if not np.isfinite(arr).all():
        bad = np.unique(np.nonzero(~np.isfinite(arr))[0])
        msg = (
            f"`{name}` contains NaN or infinite values in {bad.size} of {arr.shape[0]} cells "
            f"(first rows: {bad[:5].tolist()}); drop those cells or check the model output for overflow."
        )
        raise DataError(msg)
    return arr


def _same_cells(ref: np.ndarray, emb: np.ndarray) -> None:
    if ref.shape[0] != emb.shape[0]:
        msg = (
            f"`ref` and `emb` must hold the same cells in the same order; got {ref.shape[0]} and "
            f"{emb.shape[0]} rows. Embed the same AnnData (same obs order) with both models."
        )
        raise DataError(msg)


def _is_missing(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in "fc":
        return np.isnan(a)
    if a.dtype.kind == "O":
        return np.array([v is None or (isinstance(v, float) and v != v) for v in a], dtype=bool)
    return np.zeros(a.shape, dtype=bool)


def _encode(x, name: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (unique values, integer codes) of a 1-D categorical vector; check length and missing values."""
    a = np.asarray(x)
    if a.ndim != 1:
        msg = f"`{name}` must be 1-D (one entry per cell); got shape {a.shape}."
        raise DataError(msg)
    if n is not None and a.shape[0] != n:
        msg = f"`{name}` has {a.shape[0]} entries but the embedding has {n} cells; pass one entry per cell."
        raise DataError(msg)
    if a.shape[0] == 0:
        msg = f"`{name}` is empty."
        raise DataError(msg)
    missing = _is_missing(a)
    if missing.any():
        msg = (
            f"`{name}` has {int(missing.sum())} missing values (NaN/None); "
            "drop those cells or fill them with an explicit category such as 'unknown'."
        )
        raise DataError(msg)
    try:
        uniques, codes = np.unique(a, return_inverse=True)
    except TypeError:  # mixed types in an object array
        uniques, codes = np.unique(a.astype(str), return_inverse=True)
    return uniques, codes.reshape(-1)


def _plain(v):
    """A numpy scalar as the Python value, so messages read 'B cell' rather than np.str_('B cell')."""
    return v.item() if isinstance(v, np.generic) else v


def _check_min_per_label(uniques: np.ndarray, codes: np.ndarray, minimum: int, why: str) -> None:
    counts = np.bincount(codes, minlength=uniques.size)
    small = np.nonzero(counts < minimum)[0]
    if small.size:
        shown = ", ".join(f"{_plain(uniques[i])!r} ({counts[i]})" for i in small[:5])
        more = f" and {small.size - 5} more" if small.size > 5 else ""
        msg = (
            f"every label needs at least {minimum} cells {why}; too few in: {shown}{more}. "
            "Drop or merge those labels before computing this metric."
        )
        raise DataError(msg)


def _positive_int(k, name: str) -> int:
    if not isinstance(k, Integral) or isinstance(k, bool) or k < 1:
        msg = f"`{name}` must be a positive integer; got {k!r}."
        raise DataError(msg)
    return int(k)


def _check_k(k, n: int, name: str = "k", unit: str = "cells") -> int:
    """`k` as an int, lowered to ``n - 1`` (with a ``SmallDataWarning``) when the group has no more cells to
    choose from; a non-positive or non-integer `k` is the caller's error."""
    k = _positive_int(k, name)
    if k > n - 1:
        _small(f"{name}={n - 1} (asked {k}): only {n} {unit}, so {n - 1} neighbours at most")
        return int(n - 1)
    return k


def _small(reason: str) -> None:
    """Say that a small group changed a metric (a lowered neighbour count, a NaN) and why."""
    warnings.warn(reason, SmallDataWarning, stacklevel=3)


def _check_metric(metric: str) -> str:
    if metric not in _METRICS:
        msg = f"`metric` must be one of {_METRICS}; got {metric!r}."
        raise DataError(msg)
    return metric


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    # an all-zero row has no direction; keep it at the origin rather than dividing by zero
    return x / np.where(norms > 0, norms, 1.0)


def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """Rows ready for Euclidean neighbour search; cosine ranking equals Euclidean ranking of unit rows."""
    return _l2_normalise(x) if _check_metric(metric) == "cosine" else x


def _knn(x: np.ndarray, k: int) -> np.ndarray:
    """(cells, k) indices of each row's k nearest other rows, nearest first; never the row itself."""
    n = x.shape[0]
    if n > 4096:
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(x)
        # kneighbors() without a query leaves each point out of its own list, also when it has exact duplicates
        return nn.kneighbors(return_distance=False)
    # small n: one GEMM and a partial sort in numpy, free of the thread-pool start-up that dominates sklearn here
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d, np.inf)
    part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < n - 1 else np.argsort(d, axis=1)[:, :k]
    rows = np.arange(n)[:, None]
    # nearest first; equal distances in index order (stable), as sklearn's brute force does
    order = np.lexsort((part, d[rows, part]), axis=1)
    return part[rows, order]


# ------------------------------------------------------------------------------------- label structure


def knn_label_correct(emb, labels, k: int = 15, *, metric: str = "cosine") -> np.ndarray:
    """Whether each cell's leave-one-out kNN majority vote recovers its own label.

    Measures how well cell identity is kept locally: for each cell, the label most common among its ``k``
    nearest other cells. A tie between labels goes to the one held by the nearest of the tied neighbours.

    Parameters
    ----------
    emb
        Embedding, cells x dims.
    labels
        One label per cell (e.g. cell type). A cell whose label no other cell holds can never be voted right
        (``False``, with a ``SmallDataWarning``).
    k
        Number of neighbours that vote; lowered to ``n - 1`` (with a ``SmallDataWarning``) on fewer cells.
    metric
        ``"cosine"`` (Euclidean on L2-normalised rows) or ``"euclidean"``.

    Returns
    -------
    Boolean array, one per cell: ``True`` where the vote equals the cell's label. Its mean is the
    leave-one-out kNN accuracy in [0, 1]; higher is better.
    """
    x = _prepare(_as_matrix(emb, "emb"), metric)
    n = x.shape[0]
    uniques, codes = _encode(labels, "labels", n)
    counts = np.bincount(codes, minlength=uniques.size)
    if (counts < 2).any():
        alone = ", ".join(repr(_plain(uniques[i])) for i in np.flatnonzero(counts < 2)[:5])
        _small(f"label(s) {alone} have a single cell, which no neighbour can vote right")
    k = _check_k(k, n)

    neigh = codes[_knn(x, k)]  # (n, k) neighbour labels, nearest first
    n_labels = uniques.size
    rows = np.arange(n)[:, None]
    votes = np.zeros((n, n_labels), dtype=np.int64)
    np.add.at(votes, (np.broadcast_to(rows, neigh.shape), neigh), 1)
    # rank of the nearest neighbour carrying each label; writing from the farthest column to the nearest
    # leaves the smallest rank in place
    first = np.full((n, n_labels), k, dtype=np.int64)
    for j in range(k - 1, -1, -1):
        first[np.arange(n), neigh[:, j]] = j
    tied = votes == votes.max(axis=1, keepdims=True)
    pred = np.argmin(np.where(tied, first, k + 1), axis=1)
    return pred == codes


def knn_accuracy(emb, labels, k: int = 15, n_folds: int = 5, seed: int = 0, *, metric: str = "cosine",
                 adapt: bool = False) -> float:
    """Cross-validated accuracy of a kNN classifier predicting labels from the embedding.

    Stratified ``n_folds``-fold cross-validation (shuffled with ``seed``); each cell is predicted once by a
    ``k``-neighbour majority vote fitted on the other folds, and the accuracy is pooled over all cells.

    Parameters
    ----------
    emb
        Embedding, cells x dims.
    labels
        One label per cell; every label needs at least ``n_folds`` cells.
    k
        Number of neighbours; lowered to the smallest training fold (with a ``SmallDataWarning``) on fewer cells.
    n_folds
        Number of cross-validation folds (at least 2).
    seed
        Seed of the fold assignment.
    metric
        ``"cosine"`` (Euclidean on L2-normalised rows) or ``"euclidean"``.
    adapt
        For small held-out sets (the pretraining evaluation) rather than a fixed protocol: fewer folds when no
        label has ``n_folds`` cells, labels with fewer cells than folds allowed (scikit-learn's stratification
        then spreads them as it can), ``k`` lowered to one less than the smallest training fold, and NaN instead
        of an error when fewer than 2 labels or 2 folds remain.

    Returns
    -------
    Fraction of cells classified correctly, in [0, 1]; higher is better, chance is about the largest label's
    share.
    """
    x = _prepare(_as_matrix(emb, "emb"), metric)
    n = x.shape[0]
    uniques, codes = _encode(labels, "labels", n)
    if adapt:
        n_folds = int(min(n_folds, np.bincount(codes).max()))
        if n_folds < 2 or uniques.size < 2:
            return float("nan")
        k = int(min(k, n - int(np.ceil(n / n_folds)) - 1))
        with warnings.catch_warnings():  # labels smaller than the folds: sklearn warns, the CV is still valid
            warnings.simplefilter("ignore", UserWarning)
            return _knn_cv(x, codes, k, n_folds, seed)
    if not isinstance(n_folds, Integral) or n_folds < 2:
        msg = f"`n_folds` must be an integer >= 2; got {n_folds!r}."
        raise DataError(msg)
    if uniques.size < 2:
        msg = f"`labels` has a single value ({_plain(uniques[0])!r}); accuracy needs at least 2 labels."
        raise DataError(msg)
    _check_min_per_label(uniques, codes, int(n_folds), f"for {n_folds}-fold stratified cross-validation")
    smallest_train = n - int(np.ceil(n / n_folds))
    k = _check_k(k, n)
    if k > smallest_train:
        _small(f"k={smallest_train} (asked {k}): the smallest training fold of {n_folds} has {smallest_train} cells")
        k = smallest_train

    return _knn_cv(x, codes, k, int(n_folds), seed)


def _knn_cv(x: np.ndarray, codes: np.ndarray, k: int, n_folds: int, seed: int) -> float:
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="euclidean")
    pred = cross_val_predict(clf, x, codes, cv=folds)
    return float(np.mean(pred == codes))


def _knn_graph_edges(x: np.ndarray, k: int) -> np.ndarray:
    """Undirected edges (i < j) of the symmetrised kNN graph, sorted, without duplicates."""
    n = x.shape[0]
    neigh = _knn(x, k)
    src = np.repeat(np.arange(n), k)
    dst = neigh.reshape(-1)
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    keys = np.unique(lo.astype(np.int64) * n + hi)
    return np.column_stack([keys // n, keys % n])


def leiden_ari_nmi(
    emb,
    labels,
    n_neighbors: int = 15,
    resolution: float = 1.0,
    seed: int = 0,
    *,
    metric: str = "cosine",
    n_iterations: int = 2,
) -> tuple[float, float]:
    """Agreement between Leiden clusters of the embedding and the given labels.

    Builds the symmetrised, unweighted ``n_neighbors``-nearest-neighbour graph of the cells, finds
    communities with Leiden (RB-configuration quality at ``resolution``, seeded) and compares them with
    ``labels``. Deterministic for a given seed.

    Parameters
    ----------
    emb
        Embedding, cells x dims.
    labels
        One label per cell.
    n_neighbors
        Neighbours per cell in the graph; on fewer than ``3 * n_neighbors + 1`` cells lowered to a third of the
        other cells (at least 2), with a ``SmallDataWarning``, so that the graph stays sparse enough for clusters.
    resolution
        Leiden resolution; higher gives more, smaller clusters.
    seed
        Leiden's random seed.
    metric
        ``"cosine"`` (Euclidean on L2-normalised rows) or ``"euclidean"``.
    n_iterations
        Leiden passes (as scanpy's igraph flavour); -1 iterates until no improvement, which costs several
        times more on weakly structured embeddings for little change in the partition.

    Returns
    -------
    ``(ari, nmi)``: adjusted Rand index (1 = identical partitions, about 0 = chance, can be negative) and
    normalised mutual information (arithmetic normalisation, in [0, 1]). Higher is better for both.
    ``(nan, nan)`` with a ``SmallDataWarning`` on fewer than 3 cells, where no graph has a community structure.
    """
    import igraph as ig
    import leidenalg

    x = _prepare(_as_matrix(emb, "emb", min_rows=1), metric)
    n = x.shape[0]
    _, codes = _encode(labels, "labels", n)
    if not np.isfinite(resolution) or resolution <= 0:
        msg = f"`resolution` must be a positive number; got {resolution!r}."
        raise DataError(msg)
    if n < 3:
        _small(f"Leiden skipped: {n} cell(s), at least 3 are needed for clusters to mean anything")
        return float("nan"), float("nan")
    k = _positive_int(n_neighbors, "n_neighbors")
    # a graph whose neighbourhoods cover most of the group is nearly complete and holds no communities: on small
    # groups keep each cell's neighbours to a third of the others (n >= 3 * n_neighbors + 1 is left as asked)
    sparse = max(2, (n - 1) // 3)
    if k > sparse:
        _small(f"n_neighbors={sparse} (asked {n_neighbors}): on {n} cells more neighbours would join every cluster")
        k = sparse

    graph = ig.Graph(n=n, edges=_knn_graph_edges(x, k).tolist(), directed=False)
    partition = leidenalg.find_partition(
        graph,
        leidenalg.RBConfigurationVertexPartition,
        resolution_parameter=float(resolution),
        n_iterations=int(n_iterations),
        seed=int(seed),
    )
    clusters = np.asarray(partition.membership)
    logger.debug("leiden: %d clusters on %d cells (%d labels)", clusters.max() + 1, n, codes.max() + 1)
    ari = adjusted_rand_score(codes, clusters)
    nmi = normalized_mutual_info_score(codes, clusters)
    return float(ari), float(nmi)


def _silhouette_inputs(emb, labels) -> tuple[np.ndarray, np.ndarray | None]:
    """The matrix and label codes, or codes None (with a ``SmallDataWarning``) when no silhouette is defined."""
    x = _as_matrix(emb, "emb")
    n = x.shape[0]
    uniques, codes = _encode(labels, "labels", n)
    if not 2 <= uniques.size <= n - 1:
        _small(f"silhouette is NaN: it needs between 2 and n_cells - 1 = {n - 1} distinct labels; got "
               f"{uniques.size}")
        return x, None
    return x, codes


def silhouette_per_cell(emb, labels) -> np.ndarray:
    """Silhouette width of each cell under its label, with cosine distance.

    ``(b - a) / max(a, b)``, where ``a`` is the cell's mean cosine distance to the other cells of its label
    and ``b`` the smallest mean distance to the cells of another label (0 for a label with one cell).

    Returns
    -------
    Array of floats in [-1, 1], one per cell; higher means the cell sits more clearly within its label. All NaN
    (with a ``SmallDataWarning``) when the labels do not define a silhouette: fewer than 2 distinct labels, or
    every cell its own label.
    """
    x, codes = _silhouette_inputs(emb, labels)
    if codes is None:
        return np.full(x.shape[0], np.nan)
    return silhouette_samples(x, codes, metric="cosine")


def silhouette_labels(emb, labels) -> float:
    """Mean silhouette width over all cells, with cosine distance.

    Measures how well the labels separate in the embedding as a whole; the mean of ``silhouette_per_cell``.

    Returns
    -------
    Float in [-1, 1]; higher is better separated, about 0 means overlapping labels; NaN (with a
    ``SmallDataWarning``) where the labels define no silhouette.
    """
    return float(np.mean(silhouette_per_cell(emb, labels)))


# ------------------------------------------------------------------ faithfulness (Kobak & Berens 2019)


def knn_preservation(ref, emb, k: int = 10, *, metric: str = "euclidean") -> np.ndarray:
    """Per-cell kNN preservation: the share of a cell's neighbours in ``ref`` that stay neighbours in ``emb``.

    For each cell, the fraction of its ``k`` nearest neighbours in ``ref`` (e.g. the intact model's
    embedding) that are also among its ``k`` nearest neighbours in ``emb`` (e.g. after pruning); the "KNN"
    of Kobak & Berens 2019. Rows of ``ref`` and ``emb`` are the same cells; their dimensions may differ.

    Parameters
    ----------
    ref, emb
        Reference and compared embeddings, cells x dims.
    k
        Neighbourhood size; lowered to ``n - 1`` (with a ``SmallDataWarning``) on fewer cells.
    metric
        ``"euclidean"`` (as in the paper) or ``"cosine"``.

    Returns
    -------
    Array of floats in [0, 1] (multiples of ``1 / k``), one per cell; 1 = neighbourhood fully kept, about
    ``k / (n - 1)`` = no better than random.
    """
    r = _prepare(_as_matrix(ref, "ref"), metric)
    e = _prepare(_as_matrix(emb, "emb"), metric)
    _same_cells(r, e)
    k = _check_k(k, r.shape[0])
    nr, ne = _knn(r, k), _knn(e, k)
    # neighbours within a row are distinct, so the count of equal pairs is the size of the intersection
    shared = (nr[:, :, None] == ne[:, None, :]).sum(axis=(1, 2))
    return shared / k


def knc_preservation(ref, emb, labels, k: int | None = None, *, metric: str = "euclidean") -> float:
    """kNC preservation: how well the arrangement of class means is kept (Kobak & Berens 2019, "KNC").

    Computes each label's mean in ``ref`` and in ``emb``; for each label, the fraction of its ``k`` nearest
    other class means in ``ref`` that are also among its ``k`` nearest in ``emb``; averaged over labels.

    Parameters
    ----------
    ref, emb
        Reference and compared embeddings, cells x dims (same cells, same order).
    labels
        One label per cell; with fewer than 2 distinct labels the value is NaN (with a ``SmallDataWarning``).
    k
        Number of neighbouring classes; default ``min(10, max(1, n_classes // 4))``, lowered to ``n_classes - 1``
        (with a ``SmallDataWarning``) when there are fewer classes.
    metric
        ``"euclidean"`` (as in the paper) or ``"cosine"``, between class means.

    Returns
    -------
    Float in [0, 1]; 1 = the global arrangement of classes is kept, higher is better.
    """
    r = _as_matrix(ref, "ref")
    e = _as_matrix(emb, "emb")
    _same_cells(r, e)
    uniques, codes = _encode(labels, "labels", r.shape[0])
    n_classes = uniques.size
    if n_classes < 2:
        _small(f"knc_preservation is NaN: it needs at least 2 labels; the group has {n_classes}")
        return float("nan")
    if k is None:
        k = min(10, max(1, n_classes // 4))
    k = _check_k(k, n_classes, unit="labels")

    means_r = _prepare(_class_means(r, codes, n_classes), metric)
    means_e = _prepare(_class_means(e, codes, n_classes), metric)
    nr, ne = _knn(means_r, k), _knn(means_e, k)
    shared = (nr[:, :, None] == ne[:, None, :]).sum(axis=(1, 2))
    return float(np.mean(shared / k))


def _class_means(x: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    sums = np.zeros((n_classes, x.shape[1]))
    np.add.at(sums, codes, x)
    return sums / np.bincount(codes, minlength=n_classes)[:, None]


def cpd(ref, emb, n_pairs: int | None = None, seed: int = 0, *, metric: str = "euclidean") -> float:
    """Correlation of pairwise distances (Kobak & Berens 2019, "CPD").

    Spearman correlation between the distances of the same cell pairs in ``ref`` and in ``emb``. With
    ``n_pairs=None`` it uses all pairs when there are at most 1000 cells and otherwise all pairs among
    1000 cells drawn with ``seed`` (as in the paper); an integer ``n_pairs`` instead draws that many
    distinct random pairs from all cells (all pairs if there are fewer).

    Parameters
    ----------
    ref, emb
        Reference and compared embeddings, cells x dims (same cells, same order).
    n_pairs
        Number of random pairs, or ``None`` for the cell-subsample rule above.
    seed
        Seed of the subsample.
    metric
        ``"euclidean"`` (as in the paper) or ``"cosine"``.

    Returns
    -------
    Float in [-1, 1]; 1 = distances in the same rank order, higher is better. If either embedding has all
    sampled distances equal (e.g. fully collapsed), the correlation is undefined and 0.0 is returned.
    """
    if n_pairs is None:
        return CPDReference(ref, seed=seed, metric=metric)(emb)
    r = _prepare(_as_matrix(ref, "ref"), metric)
    e = _prepare(_as_matrix(emb, "emb"), metric)
    _same_cells(r, e)
    n = r.shape[0]
    rng = np.random.default_rng(seed)
    total = n * (n - 1) // 2
    if not isinstance(n_pairs, Integral) or n_pairs < 2:
        msg = f"`n_pairs` must be None or an integer >= 2; got {n_pairs!r}."
        raise DataError(msg)
    if n_pairs >= total:
        dr, de = pdist(r), pdist(e)
    else:
        i, j = _pairs_from_condensed(rng.choice(total, size=int(n_pairs), replace=False), n)
        dr = np.linalg.norm(r[i] - r[j], axis=1)
        de = np.linalg.norm(e[i] - e[j], axis=1)
    if np.ptp(dr) == 0 or np.ptp(de) == 0:
        logger.warning("cpd: all pairwise distances are equal in one embedding; returning 0.0")
        return 0.0
    return float(spearmanr(dr, de).statistic)


class CPDReference:
    """The reference side of `cpd` (``n_pairs=None``) computed once, for many compared embeddings.

    ``CPDReference(ref, seed)(emb) == cpd(ref, emb, seed=seed)``: the same cells (all, or 1000 drawn with `seed`),
    the same pairs, Spearman's rho as the Pearson correlation of average ranks. The reference distances are ranked
    once here instead of once per call: when one baseline is compared with many pruned models, half the sorting.
    """

    def __init__(self, ref, seed: int = 0, *, metric: str = "euclidean"):
        from scipy.stats import rankdata

        r = _prepare(_as_matrix(ref, "ref"), metric)
        self.metric, self.n = metric, r.shape[0]
        self.keep = None
        if self.n > _CPD_MAX_CELLS:
            rng = np.random.default_rng(seed)
            self.keep = np.sort(rng.choice(self.n, size=_CPD_MAX_CELLS, replace=False))
            r = r[self.keep]
        dr = pdist(r)
        self.constant = bool(np.ptp(dr) == 0)
        rank = rankdata(dr)
        self._centred = rank - rank.mean()
        self._norm = float(np.sqrt(self._centred @ self._centred))

    def __call__(self, emb) -> float:
        from scipy.stats import rankdata

        e = _prepare(_as_matrix(emb, "emb"), self.metric)
        if e.shape[0] != self.n:
            _same_cells(np.empty((self.n, 1)), e)
        de = pdist(e if self.keep is None else e[self.keep])
        if self.constant or np.ptp(de) == 0:
            logger.warning("cpd: all pairwise distances are equal in one embedding; returning 0.0")
            return 0.0
        rank = rankdata(de)
        c = rank - rank.mean()
        return float(np.clip(self._centred @ c / (self._norm * np.sqrt(c @ c)), -1.0, 1.0))


def _pairs_from_condensed(idx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map condensed (pdist-order) indices to row pairs (i < j)."""
    idx = idx.astype(np.int64)
    # row i starts at offset i*n - i*(i+1)/2; invert the quadratic, then fix any off-by-one from rounding
    i = np.floor((2 * n - 1 - np.sqrt((2 * n - 1) ** 2 - 8 * idx)) / 2).astype(np.int64)
    start = i * n - i * (i + 1) // 2
    over = idx < start
    i[over] -= 1
    start = i * n - i * (i + 1) // 2
    under = idx >= start + (n - 1 - i)
    i[under] += 1
    start = i * n - i * (i + 1) // 2
    j = idx - start + i + 1
    return i, j


# ------------------------------------------------------------------------------------------ collapse


def mean_pairwise_cosine(emb) -> float:
    """Mean cosine similarity over all pairs of distinct cells.

    A collapse diagnostic: 1 when every cell points the same way, about 0 for isotropic random
    embeddings. An all-zero row has no direction and counts as cosine 0 with every other cell.

    Returns
    -------
    Float in [-1, 1]; higher means more collapsed.
    """
    x = _as_matrix(emb, "emb")
    n = x.shape[0]
    u = _l2_normalise(x)
    # sum over all ordered pairs of u_i.u_j = |sum_i u_i|^2; subtract the diagonal (|u_i|^2 = 1, or 0)
    s = u.sum(axis=0)
    off = float(s @ s) - float(np.einsum("ij,ij->", u, u))
    return off / (n * (n - 1))


def effective_rank(emb) -> float:
    """Effective rank of the centred embedding (Roy & Vetterli 2007).

    ``exp(H(p))`` where ``p`` are the singular values of the column-centred cells x dims matrix divided by
    their sum and ``H`` is the Shannon entropy. Measures how many directions the spread of cells really uses.
    Note that centring removes a shared offset: cells collapsed onto one line give about 1, cells collapsed
    onto one point plus isotropic noise still give a high value (use ``mean_pairwise_cosine`` for that).

    Returns
    -------
    Float in [1, min(n_cells - 1, n_dims)]; 0.0 when all cells are identical. Lower means more collapsed.
    """
    x = _as_matrix(emb, "emb")
    centred = x - x.mean(axis=0, keepdims=True)
    if centred.shape[0] > 2 * centred.shape[1]:
        # tall matrix: R of a QR has the same singular values, and the (d x d) SVD is much cheaper than the tall
        # one (QR is backward stable, unlike forming the Gram matrix)
        s = np.linalg.svd(np.linalg.qr(centred, mode="r"), compute_uv=False)
    else:
        s = np.linalg.svd(centred, compute_uv=False)
    # identical cells leave only rounding noise after centring; call that rank 0 rather than noise's rank
    if s[0] <= 1e-10 * np.abs(x).max() * np.sqrt(x.shape[0]):
        logger.debug("effective_rank: all cells are identical; returning 0.0")
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


# -------------------------------------------------------------------------------------------- statistics


def _check_boot(n_boot, alpha=None) -> int:
    if not isinstance(n_boot, Integral) or n_boot < 1:
        msg = f"`n_boot` must be a positive integer; got {n_boot!r}."
        raise DataError(msg)
    if alpha is not None and not 0 < alpha < 1:
        msg = f"`alpha` must lie strictly between 0 and 1 (0.05 gives a 95% interval); got {alpha!r}."
        raise DataError(msg)
    return int(n_boot)


def _as_values(values, name: str) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        msg = f"`{name}` must be numeric; could not convert it: {err}"
        raise DataError(msg) from err
    if v.ndim != 1 or v.size == 0:
        msg = f"`{name}` must be a non-empty 1-D array (one value per cell); got shape {v.shape}."
        raise DataError(msg)
    if not np.isfinite(v).all():
        msg = (
            f"`{name}` contains {int((~np.isfinite(v)).sum())} NaN or infinite values; "
            "drop them first (e.g. `v[np.isfinite(v)]` together with their units)."
        )
        raise DataError(msg)
    return v


def bootstrap_indices(units_or_n, n_boot: int, seed: int) -> list[np.ndarray]:
    """Cell indices of bootstrap resamples, for recomputing any statistic on each resample.

    Parameters
    ----------
    units_or_n
        An integer ``n``: resample ``n`` cells with replacement. Or one unit (e.g. donor) per cell: resample
        the distinct units with replacement, each drawn unit bringing all its cells (cluster bootstrap).
    n_boot
        Number of resamples.
    seed
        Seed; the same seed gives the same resamples.

    Returns
    -------
    List of ``n_boot`` integer arrays indexing the original cells (with repeats). With units, lengths vary
    with the sizes of the drawn units.
    """
    n_boot = _check_boot(n_boot)
    rng = np.random.default_rng(seed)
    if isinstance(units_or_n, Integral) and not isinstance(units_or_n, bool):
        n = int(units_or_n)
        if n < 1:
            msg = f"`units_or_n` as a cell count must be >= 1; got {n}."
            raise DataError(msg)
        return list(rng.integers(0, n, size=(n_boot, n)))
    if np.ndim(units_or_n) == 0:
        msg = f"`units_or_n` must be a cell count (int) or one unit per cell (1-D); got {units_or_n!r}."
        raise DataError(msg)
    uniques, codes = _encode(units_or_n, "units")
    if uniques.size < 2:
        msg = (
            f"a cluster bootstrap needs at least 2 distinct units; got {uniques.size} "
            f"({_plain(uniques[0])!r}). "
            "Pass units=None to resample cells instead (this ignores donor effects)."
        )
        raise DataError(msg)
    order = np.argsort(codes, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(codes))[:-1])
    drawn = rng.integers(0, uniques.size, size=(n_boot, uniques.size))
    return [np.concatenate([members[u] for u in row]) for row in drawn]


def _boot_stats(values: np.ndarray, units, n_boot: int, seed, stat: Callable) -> np.ndarray:
    if units is not None:
        _encode(units, "units", values.size)  # length and missing-value check with a clear message
    idx = bootstrap_indices(values.size if units is None else units, n_boot, seed)
    return np.array([stat(values[i]) for i in idx], dtype=np.float64)


def bootstrap_ci(
    values,
    units: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(values)``.

    Resamples cells with replacement, or, when ``units`` (e.g. donor per cell) is given, resamples units
    with replacement, each bringing all its cells (cluster bootstrap). Use units whenever cells of one
    donor are not independent; the interval is then honest about donor-to-donor variation.

    Parameters
    ----------
    values
        One value per cell (e.g. ``knn_label_correct`` or ``silhouette_per_cell`` output).
    units
        Optional unit per cell; at least 2 distinct units.
    n_boot
        Number of resamples.
    alpha
        ``1 - alpha`` is the coverage (0.05 gives a 95% interval).
    seed
        Seed; the same seed gives the same interval.
    stat
        Statistic of a 1-D array, default the mean.

    Returns
    -------
    ``(low, high)``: the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of the bootstrap distribution.
    """
    v = _as_values(values, "values")
    n_boot = _check_boot(n_boot, alpha)
    boots = _boot_stats(v, units, n_boot, seed, stat)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_diff_ci(
    values_a,
    values_b,
    units_a: Sequence | np.ndarray | None = None,
    units_b: Sequence | np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``stat(values_a) - stat(values_b)``.

    For a contrast of two independent groups, e.g. a collapse score in AD minus control cells of one cell
    type. Each group is resampled on its own (by units when given, otherwise by cells), from independent
    streams derived from ``seed``.

    Parameters
    ----------
    values_a, values_b
        One value per cell in each group.
    units_a, units_b
        Optional unit (donor) per cell of each group.
    n_boot, alpha, seed, stat
        As in ``bootstrap_ci``.

    Returns
    -------
    ``(low, high)`` of the difference a - b; an interval excluding 0 means a and b differ at level ``alpha``.
    """
    a = _as_values(values_a, "values_a")
    b = _as_values(values_b, "values_b")
    n_boot = _check_boot(n_boot, alpha)
    seed_a, seed_b = np.random.SeedSequence(seed).spawn(2)
    boots = _boot_stats(a, units_a, n_boot, seed_a, stat) - _boot_stats(b, units_b, n_boot, seed_b, stat)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def empirical_p(value: float, null, alternative: str = "two-sided") -> float:
    """Empirical p-value of an observed statistic against a null sample (e.g. random-weight controls).

    ``(1 + #null at least as extreme as value) / (1 + len(null))``, never 0. ``"greater"`` counts null
    values >= ``value``, ``"less"`` counts values <= ``value``, ``"two-sided"`` counts null values at least
    as far from the null's median as ``value`` is. Comparisons allow a relative tolerance of 1e-12 so that
    a tie by floating-point noise still counts as a tie.

    Returns
    -------
    Float in (0, 1]; smaller means ``value`` is more unusual under the null.
    """
    if alternative not in _ALTERNATIVES:
        msg = f"`alternative` must be one of {_ALTERNATIVES}; got {alternative!r}."
        raise DataError(msg)
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        msg = f"`value` must be a number; got {value!r}."
        raise DataError(msg) from err
    if not np.isfinite(v):
        msg = f"`value` must be finite; got {value!r}."
        raise DataError(msg)
    z = _as_values(null, "null")
    if alternative == "two-sided":
        centre = float(np.median(z))
        z, v = np.abs(z - centre), abs(v - centre)
        alternative = "greater"
    tol = 1e-12 * max(1.0, abs(v))
    extreme = z >= v - tol if alternative == "greater" else z <= v + tol
    return float((1 + np.count_nonzero(extreme)) / (1 + z.size))
