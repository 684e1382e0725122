"""Property tests (issue 16, req 7) for binning and tokenisation: random shapes, dtypes, sparsity and layouts
(CSR, CSC, non-canonical CSR, dense), duplicate, unknown and special gene names. Each property is checked against a
brute-force reading of the official semantics or against the same input in another form."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from scsuperweight.data.tokenize import bin_matrix, tokenize_anndata
from tests.test_tokenize import ref_bin_dense

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
N_VOCAB = 24  # vocab genes: match_genes needs at least 20


@st.composite
def counts(draw, min_rows=1, max_rows=12, min_cols=1, max_cols=40):
    """A dense count matrix whose sparsity and value range hypothesis chooses (ties and single values included)."""
    n = draw(st.integers(min_rows, max_rows))
    g = draw(st.integers(min_cols, max_cols))
    high = draw(st.sampled_from([1, 2, 3, 10, 1000, 100_000]))
    values = draw(hnp.arrays(np.int64, (n, g), elements=st.integers(0, high)))
    keep = draw(hnp.arrays(np.bool_, (n, g)))  # extra zeros: anything from all-zero to dense
    return values * keep


def messy_csr(X: np.ndarray) -> sp.csr_matrix:
    """The same matrix as a non-canonical CSR: each count split over two entries, stored zeros, columns reversed."""
    rows, data, cols = [], [], []
    for row in X:
        nz = np.flatnonzero(row)[::-1]
        half = row[nz] // 2
        cols.append(np.concatenate([nz, nz, [0]]))
        data.append(np.concatenate([half, row[nz] - half, [0]]))
        rows.append(len(cols[-1]))
    indptr = np.concatenate([[0], np.cumsum(rows)])
    return sp.csr_matrix((np.concatenate(data).astype(X.dtype), np.concatenate(cols), indptr), shape=X.shape)


def layout(X: np.ndarray, kind: str, dtype):
    X = X.astype(dtype)
    return {"dense": lambda: X, "csr": lambda: sp.csr_matrix(X), "csc": lambda: sp.csc_matrix(X),
            "messy_csr": lambda: messy_csr(X)}[kind]()


@SETTINGS
@given(X=counts(), n_bins=st.integers(2, 60), seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([3, 1 << 18]))
def test_bin_matrix_equals_row_by_row_reference(X, n_bins, seed, chunk):
    ours = bin_matrix(sp.csr_matrix(X.astype(np.float64)), n_bins=n_bins, rng=np.random.default_rng(seed),
                      chunk=chunk)
    ref = ref_bin_dense(X.astype(np.float64), n_bins, seed)
    np.testing.assert_array_equal(ours.toarray(), ref)
    # bins live in 1..n_bins-1 exactly where the counts are non-zero, and order within a row is kept
    B = ours.toarray()
    assert np.array_equal(B > 0, X > 0)
    if B.any():
        assert B[B > 0].min() >= 1 and B.max() <= n_bins - 1
    for row, brow in zip(X, B, strict=True):
        a, b = row[row > 0], brow[row > 0]
        # a larger count never gets a lower bin (ties are split at random only among the bins their value spans)
        larger = a[:, None] > a[None, :]
        assert np.all((b[:, None] >= b[None, :])[larger])


def _vocab() -> dict[str, int]:
    names = [f"G{i}" for i in range(N_VOCAB)] + ["<pad>", "<cls>", "<eoc>"]
    return {g: i for i, g in enumerate(names)}


def _adata(X, names) -> ad.AnnData:
    a = ad.AnnData(X, var=pd.DataFrame(index=pd.Index(names, dtype=str)))
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    return a


def _same_tokens(a, b) -> None:
    for f in ("indptr", "gene_ids", "values", "empty_mask", "source_index"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@SETTINGS
@given(X=counts(min_cols=N_VOCAB, max_cols=N_VOCAB), kind=st.sampled_from(["dense", "csr", "csc", "messy_csr"]),
       dtype=st.sampled_from([np.int32, np.int64, np.uint16, np.float32, np.float64]),
       seed=st.integers(0, 1000), max_seq_len=st.integers(2, 30), n_bins=st.integers(3, 51))
def test_every_layout_and_dtype_tokenises_identically(X, kind, dtype, seed, max_seq_len, n_bins):
    X = np.minimum(X, np.iinfo(np.uint16).max)  # what uint16 can hold
    names = [f"G{i}" for i in range(N_VOCAB)]
    kw = dict(seed=seed, max_seq_len=max_seq_len, n_bins=n_bins, empty="keep")
    ref = tokenize_anndata(_adata(sp.csr_matrix(X.astype(np.float32)), names), _vocab(), **kw)
    got = tokenize_anndata(_adata(layout(X, kind, dtype), names), _vocab(), **kw)
    _same_tokens(ref, got)

    # structure: <cls> first with pad_value; each cell's genes are its non-zero vocab genes (all of them when
    # they fit, a subset otherwise), each once, in var order, with bins in 1..n_bins-1
    vocab = _vocab()
    nnz = (X > 0).sum(1)
    assert np.array_equal(ref.lengths, np.minimum(nnz, max_seq_len - 1) + 1)
    assert np.array_equal(ref.empty_mask, nnz == 0) and ref.n_empty == int((nnz == 0).sum())
    for i in range(ref.n_cells):
        ids = ref.gene_ids[ref.indptr[i]:ref.indptr[i + 1]]
        vals = ref.values[ref.indptr[i]:ref.indptr[i + 1]]
        assert ids[0] == vocab["<cls>"] and vals[0] == -2.0
        body = ids[1:]
        expressed = np.flatnonzero(X[i] > 0)  # vocab id == column here
        assert np.all(np.diff(body) > 0) and np.isin(body, expressed).all()
        if nnz[i] <= max_seq_len - 1:
            assert np.array_equal(body, expressed)
        assert np.all((vals[1:] >= 1) & (vals[1:] <= n_bins - 1))


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@SETTINGS
@given(X=counts(min_rows=2, min_cols=N_VOCAB, max_cols=N_VOCAB), data=st.data(), seed=st.integers(0, 1000))
def test_unknown_duplicate_and_special_genes_change_nothing(X, data, seed):
    """Columns the vocab does not know, later duplicates of a known gene and special-token names are ignored:
    the tokens equal those of the clean matrix, wherever the extra columns sit."""
    X[:, 0] = np.maximum(X[:, 0], 1)  # no empty cells: both sides would refuse them the same way anyway
    names = [f"G{i}" for i in range(N_VOCAB)]
    n_extra = data.draw(st.integers(1, 8))
    extra_names = data.draw(st.lists(
        st.one_of(st.sampled_from(["<pad>", "<cls>", "<eoc>", "<mask>", "", " ", "nan", "G1 ", "g2", "ÄBC-1",
                                   "MT-CO1", "HLA-A", "1", "ENSG00000000003"]),
                  st.sampled_from(names)),  # a duplicate of a vocab gene, placed after its first occurrence below
        min_size=n_extra, max_size=n_extra))
    extra = data.draw(hnp.arrays(np.int64, (X.shape[0], n_extra), elements=st.integers(0, 50)))
    # duplicates go after the originals so that the first occurrence is the clean column
    full = np.hstack([X, extra])
    full_names = names + extra_names
    kw = dict(seed=seed, max_seq_len=12)
    clean = tokenize_anndata(_adata(sp.csr_matrix(X.astype(np.float32)), names), _vocab(), **kw)
    noisy = tokenize_anndata(_adata(sp.csr_matrix(full.astype(np.float32)), full_names), _vocab(), **kw)
    _same_tokens(clean, noisy)
    assert not np.isin(noisy.gene_ids, [_vocab()["<pad>"], _vocab()["<eoc>"]]).any()
    assert (noisy.gene_ids == _vocab()["<cls>"]).sum() == noisy.n_cells


@SETTINGS
@given(X=counts(min_rows=2, min_cols=N_VOCAB, max_cols=N_VOCAB), seed=st.integers(0, 1000),
       perm_seed=st.integers(0, 1000))
def test_column_order_does_not_change_bins_of_a_tie_free_cell(X, seed, perm_seed):
    """Shuffling the var order of a cell whose counts are all distinct only reorders its tokens: with more bins than
    genes no count spans two quantile edges, so the random tie draws (taken in var order) decide nothing."""
    rng = np.random.default_rng(perm_seed)
    # distinct positive values per row: a permutation of 1..G scaled, so no two genes of a cell tie
    X = np.vstack([rng.permutation(N_VOCAB) + 1 for _ in range(X.shape[0])])
    names = np.array([f"G{i}" for i in range(N_VOCAB)])
    perm = rng.permutation(N_VOCAB)
    kw = dict(seed=seed, max_seq_len=N_VOCAB + 1, n_bins=N_VOCAB + 2)  # more bins than genes: no tie spans edges
    a = tokenize_anndata(_adata(sp.csr_matrix(X.astype(np.float32)), names), _vocab(), **kw)
    b = tokenize_anndata(_adata(sp.csr_matrix(X[:, perm].astype(np.float32)), names[perm]), _vocab(), **kw)
    for i in range(a.n_cells):
        sl = slice(a.indptr[i], a.indptr[i + 1])
        da = dict(zip(a.gene_ids[sl], a.values[sl], strict=True))
        db = dict(zip(b.gene_ids[sl], b.values[sl], strict=True))
        assert da == db
