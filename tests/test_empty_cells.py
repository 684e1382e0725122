"""Cells with no counts in any vocab gene (issue 16, last bullet): refuse, drop or keep-and-mask, always counted."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scsuperweight.data.tokenize import tokenize_anndata
from scsuperweight.errors import DataError
from tests.test_tokenize import make_adata, make_vocab

EMPTY = [2, 7, 11]


@pytest.fixture
def adata():
    a = make_adata(n_cells=20)
    X = a.X.toarray()
    X[EMPTY] = 0
    a.X = sp.csr_matrix(X)
    return a


def test_error_names_both_options(adata):
    with pytest.raises(DataError) as e:
        tokenize_anndata(adata, make_vocab())
    msg = str(e.value)
    assert "3 of 20 cells have no counts in any vocab gene (e.g. c2, c7, c11)" in msg
    assert "empty='drop'" in msg and "empty='keep'" in msg and "\n" not in msg


def test_drop_removes_counts_and_maps_back(adata):
    tok = tokenize_anndata(adata, make_vocab(), empty="drop")
    kept = np.setdiff1d(np.arange(20), EMPTY)
    assert tok.n_cells == 17 and tok.n_empty == 3
    assert np.array_equal(tok.source_index, kept)
    assert tok.lengths.min() > 1 and not tok.empty_mask.any()
    assert tok.empty_summary() == {"empty": "drop", "n_empty": 3, "n_cells_in": 20, "n_cells_out": 17}


def test_keep_flags_and_masks_and_matches_drop_elsewhere(adata):
    keep = tokenize_anndata(adata, make_vocab(), empty="keep")
    drop = tokenize_anndata(adata, make_vocab(), empty="drop")
    assert keep.n_cells == 20 and np.flatnonzero(keep.empty_mask).tolist() == EMPTY
    assert keep.lengths[EMPTY].tolist() == [1, 1, 1]  # <cls> alone
    assert keep.empty_summary() == {"empty": "keep", "n_empty": 3, "n_cells_in": 20, "n_cells_out": 20}
    # the other cells tokenise exactly as when the empty ones are dropped (same seed, same draws)
    same = keep.subset(drop.source_index)
    assert np.array_equal(same.indptr, drop.indptr) and np.array_equal(same.gene_ids, drop.gene_ids)
    assert np.array_equal(same.values, drop.values)
    emb = np.arange(40, dtype=np.float32).reshape(20, 2)
    masked = keep.mask_embeddings(emb)
    assert np.isnan(masked[EMPTY]).all() and np.array_equal(masked[drop.source_index], emb[drop.source_index])
    assert not np.isnan(emb).any()  # the input is untouched
    assert keep.subset(np.array([7, 0])).empty_mask.tolist() == [True, False]


def test_no_empty_cells_records_zero(adata):
    full = make_adata(n_cells=20)
    tok = tokenize_anndata(full, make_vocab(), empty="drop")
    assert tok.n_empty == 0 and tok.n_cells == 20 and np.array_equal(tok.source_index, np.arange(20))


def test_all_empty_and_bad_policy(adata):
    none = adata.copy()
    none.X = sp.csr_matrix(none.shape, dtype=np.float32)
    with pytest.raises(DataError, match="all 20 cells have no counts"):
        tokenize_anndata(none, make_vocab(), empty="drop")
    with pytest.raises(DataError, match=r"empty='skip' is not a policy.*'drop', 'keep'"):
        tokenize_anndata(adata, make_vocab(), empty="skip")


def test_allow_empty_is_keep(adata):
    tok = tokenize_anndata(adata, make_vocab(), allow_empty=True)
    assert tok.empty_policy == "keep" and tok.empty_mask.sum() == 3
