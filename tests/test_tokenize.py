"""AnnData -> tokens -> batches: official binning semantics (exactly), gene matching, validation, batching, masking."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scsuperweight.data import (
    TokenizedCells,
    bin_matrix,
    bucket_batches,
    collate,
    iter_batches,
    mask_batch,
    match_genes,
    tokenize_anndata,
)
from scsuperweight.data.tokenize import DRAW_BIN, cell_keys, cell_uniforms
from scsuperweight.errors import DataError

N_GENES = 60


# ---------------------------------------------------------------- reference binning
# Step by step the official scgpt 0.2.4 `preprocess.binning` / `_digitize`, with the uniform draws passed in
# instead of taken from np.random.rand, so that both sides consume the same stream.

def ref_digitize(x: np.ndarray, bins: np.ndarray, rands: np.ndarray) -> np.ndarray:
    assert x.ndim == 1 and bins.ndim == 1
    left_digits = np.digitize(x, bins)
    right_digits = np.digitize(x, bins, right=True)
    digits = rands * (right_digits - left_digits) + left_digits
    return np.ceil(digits).astype(np.int64)


def ref_binning(row: np.ndarray, n_bins: int, rands: np.ndarray) -> np.ndarray:
    if row.max() == 0:
        return np.zeros_like(row)
    if row.min() <= 0:
        non_zero_ids = row.nonzero()
        non_zero_row = row[non_zero_ids]
        bins = np.quantile(non_zero_row, np.linspace(0, 1, n_bins - 1))
        non_zero_digits = ref_digitize(non_zero_row, bins, rands)
        binned_row = np.zeros_like(row, dtype=np.int64)
        binned_row[non_zero_ids] = non_zero_digits
    else:
        bins = np.quantile(row, np.linspace(0, 1, n_bins - 1))
        binned_row = ref_digitize(row, bins, rands)
    return binned_row.astype(row.dtype)


def ref_bin_dense(dense: np.ndarray, n_bins: int, seed: int) -> np.ndarray:
    """Row by row, drawing one uniform per non-zero from a single stream in row-major (CSR) order."""
    return ref_bin_dense_with(dense, n_bins, np.random.default_rng(seed).random(int((dense != 0).sum())))


def ref_bin_dense_with(dense: np.ndarray, n_bins: int, rands: np.ndarray) -> np.ndarray:
    """`ref_bin_dense` with the uniforms given (one per non-zero, row-major)."""
    out, pos = np.zeros_like(dense), 0
    for i, row in enumerate(dense):
        n = int((row != 0).sum())
        if n:
            out[i] = ref_binning(row, n_bins, rands[pos:pos + n])
        pos += n
    return out


def tricky_counts(seed: int = 0) -> np.ndarray:
    """Rows covering the edge cases of quantile binning: heavy ties, one value, one gene, wide ranges, empty."""
    rng = np.random.default_rng(seed)
    n_genes = 400
    rows = [
        rng.poisson(0.3, n_genes),  # sparse, almost all ones: ties across many edges
        np.where(rng.random(n_genes) < 0.5, 1, 0) * rng.choice([1, 2], n_genes, p=[0.9, 0.1]),
        np.where(rng.random(n_genes) < 0.3, 7, 0),  # a single value repeated
        np.eye(1, n_genes, 17, dtype=np.int64)[0] * 42,  # a single gene
        rng.negative_binomial(0.5, 0.01, n_genes),  # long tail, large counts
        np.arange(n_genes) % 5,  # few distinct values, evenly spread
        np.zeros(n_genes, dtype=np.int64),  # empty
        rng.poisson(20, n_genes),  # dense, all non-zero
        np.r_[np.ones(n_genes - 1, dtype=np.int64), 10_000],  # ties plus one outlier
        rng.integers(0, 3, n_genes) * rng.integers(1, 1000, n_genes),
    ]
    return np.vstack(rows).astype(np.float64)


@pytest.mark.parametrize("n_bins", [51, 11])
@pytest.mark.parametrize("chunk", [1 << 18, 7])
def test_bin_matrix_equals_official_reference(n_bins, chunk):
    dense = tricky_counts()
    for seed in (0, 1):
        ours = bin_matrix(sp.csr_matrix(dense), n_bins=n_bins, rng=np.random.default_rng(seed), chunk=chunk)
        ref = ref_bin_dense(dense, n_bins, seed)
        np.testing.assert_array_equal(ours.toarray(), ref)
    # the cases are really there: ties split over several bins, the single gene and single value rows spread
    assert len(np.unique(ref[0][ref[0] > 0])) > 3
    assert ref[3][17] in range(1, n_bins) and ref[6].sum() == 0
    assert ours.data.min() >= 1 and ours.data.max() <= n_bins - 1


def test_bin_matrix_reference_on_random_counts():
    rng = np.random.default_rng(5)
    dense = rng.negative_binomial(1, 0.3, (50, 300)).astype(np.float64) * (rng.random((50, 300)) < 0.4)
    ours = bin_matrix(sp.csr_matrix(dense), rng=np.random.default_rng(9))
    np.testing.assert_array_equal(ours.toarray(), ref_bin_dense(dense, 51, 9))


def test_bin_matrix_matches_official_code_when_installed(monkeypatch):
    """The same check against the installed scgpt `binning` itself, its np.random.rand fed from our stream."""
    # the import helper lives in the parity test; load it by path so that any pytest import mode works
    spec = importlib.util.spec_from_file_location("_ssw_test_parity", Path(__file__).with_name("test_parity.py"))
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    scgpt, reason = helper.import_official_scgpt()
    if scgpt is None:
        pytest.skip(f"official scgpt 0.2.4 cannot be imported ({reason})")
    import scgpt.preprocess as official

    dense = tricky_counts(1)
    stream = np.random.default_rng(3).random(int((dense != 0).sum()))
    pos = [0]

    def rand(n):
        pos[0] += n
        return stream[pos[0] - n:pos[0]]

    monkeypatch.setattr(official.np.random, "rand", rand)
    monkeypatch.setattr(official.logger, "disabled", True)  # it warns on the empty row
    ref = np.vstack([official.binning(row, n_bins=51) for row in dense])
    ours = bin_matrix(sp.csr_matrix(dense), rng=np.random.default_rng(3))
    np.testing.assert_array_equal(ours.toarray(), ref)


# ---------------------------------------------------------------- AnnData helpers

def make_vocab(n_genes: int = N_GENES) -> dict[str, int]:
    names = [f"G{i}" for i in range(n_genes)] + ["<pad>", "<cls>", "<eoc>"]
    return {g: i for i, g in enumerate(names)}


def make_adata(n_cells: int = 30, n_genes: int = N_GENES, seed: int = 0, density: float = 0.5) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(3, (n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < density)
    X[:, 0] = np.maximum(X[:, 0], 1)  # no empty cells
    var = pd.DataFrame({"symbol": [f"G{i}" for i in range(n_genes)]},
                       index=[f"ENSG{i:011d}" for i in range(n_genes)])
    adata = ad.AnnData(sp.csr_matrix(X.astype(np.float32)), var=var)
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = var["symbol"].to_numpy()
    adata.var["ensembl"] = var.index.to_numpy()
    return adata


def cells_of(tok):
    return [(tok.gene_ids[a:b], tok.values[a:b]) for a, b in zip(tok.indptr[:-1], tok.indptr[1:])]


# ---------------------------------------------------------------- tokenisation

@pytest.mark.parametrize("pad_value", [-2.0, -5.0])
def test_cls_first_then_binned_nonzero_genes(pad_value):
    adata, vocab = make_adata(), make_vocab()
    tok = tokenize_anndata(adata, vocab, pad_value=pad_value, seed=4)
    X = adata.X.toarray()
    # the official binning, its tie-breaking uniforms drawn per (cell, gene) from the cell's own key
    csr = sp.csr_matrix(X)
    nz_row = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    rand = cell_uniforms(cell_keys(adata.obs_names)[nz_row], [vocab[f"G{j}"] for j in csr.indices], 4, DRAW_BIN)
    bins = bin_matrix(csr, rand=rand).toarray()
    np.testing.assert_array_equal(bins, ref_bin_dense_with(X, 51, rand))
    assert tok.n_cells == adata.n_obs and tok.pad_value == pad_value
    assert tok.cls_token_id == vocab["<cls>"] and tok.pad_token_id == vocab["<pad>"]
    for i, (genes, values) in enumerate(cells_of(tok)):
        assert genes[0] == vocab["<cls>"] and values[0] == pad_value
        nz = np.flatnonzero(X[i])
        np.testing.assert_array_equal(genes[1:], [vocab[f"G{j}"] for j in nz])
        np.testing.assert_array_equal(values[1:], bins[i, nz])


def test_subsampling_is_seeded_and_keeps_cls():
    adata, vocab = make_adata(density=0.9), make_vocab()
    full = tokenize_anndata(adata, vocab, seed=1)
    max_len = 20
    a = tokenize_anndata(adata, vocab, max_seq_len=max_len, seed=1)
    b = tokenize_anndata(adata, vocab, max_seq_len=max_len, seed=1)
    c = tokenize_anndata(adata, vocab, max_seq_len=max_len, seed=2)
    assert (full.lengths > max_len).all()  # every cell needs subsampling
    np.testing.assert_array_equal(a.lengths, np.minimum(full.lengths, max_len))
    np.testing.assert_array_equal(a.gene_ids, b.gene_ids)
    np.testing.assert_array_equal(a.values, b.values)
    differ = [not np.array_equal(x[0], y[0]) for x, y in zip(cells_of(a), cells_of(c))]
    assert sum(differ) >= adata.n_obs - 1
    for (g, v), (fg, fv) in zip(cells_of(a), cells_of(full)):
        assert g[0] == vocab["<cls>"] and v[0] == -2.0
        assert len(set(g[1:])) == len(g) - 1  # no gene twice
        assert np.all(np.diff(g[1:]) > 0)  # kept in gene order
        lookup = dict(zip(fg[1:], fv[1:]))  # binned before subsampling: each kept gene keeps its bin
        assert all(lookup[gene] == val for gene, val in zip(g[1:], v[1:]))


def test_short_cells_are_not_subsampled():
    adata, vocab = make_adata(), make_vocab()
    full = tokenize_anndata(adata, vocab, seed=3)
    cap = int(np.median(full.lengths))
    capped = tokenize_anndata(adata, vocab, max_seq_len=cap, seed=3)
    for (g, v), (fg, fv) in zip(cells_of(capped), cells_of(full)):
        if len(fg) <= cap:
            np.testing.assert_array_equal(g, fg)
            np.testing.assert_array_equal(v, fv)
        else:
            assert len(g) == cap


def test_include_zero_genes():
    adata, vocab = make_adata(n_cells=4), make_vocab()
    tok = tokenize_anndata(adata, vocab, include_zero_genes=True)
    assert (tok.lengths == N_GENES + 1).all()
    X = adata.X.toarray()
    for i, (g, v) in enumerate(cells_of(tok)):
        np.testing.assert_array_equal(g[1:], np.arange(N_GENES))
        np.testing.assert_array_equal(v[1:] == 0, X[i] == 0)


# ---------------------------------------------------------------- gene matching

def test_match_by_index_and_by_column():
    adata = make_adata()
    vocab = make_vocab(40)  # only G0..G39 known
    by_index = match_genes(adata, vocab)
    assert by_index.fraction == pytest.approx(40 / N_GENES) and by_index.n_total == N_GENES
    np.testing.assert_array_equal(by_index.var_index, np.arange(40))
    np.testing.assert_array_equal(by_index.token_ids, np.arange(40))
    adata.var_names = adata.var["ensembl"].to_numpy()
    by_col = match_genes(adata, vocab, gene_key="symbol")
    np.testing.assert_array_equal(by_col.var_index, by_index.var_index)
    np.testing.assert_array_equal(by_col.genes, by_index.genes)
    tok = tokenize_anndata(adata, vocab, gene_key="symbol")
    assert tok.gene_ids.max() < 40 or tok.gene_ids.max() == vocab["<cls>"]


def test_duplicates_and_special_names_are_not_matched_twice():
    adata = make_adata()
    names = adata.var_names.to_numpy().copy()
    names[5], names[6] = "G4", "<cls>"
    adata.var_names = names
    m = match_genes(adata, make_vocab())
    assert list(m.genes).count("G4") == 1 and m.var_index[list(m.genes).index("G4")] == 4
    assert "<cls>" not in set(m.genes) and len(m.genes) == N_GENES - 2


def test_ensembl_ids_give_a_hint():
    adata = make_adata()
    adata.var_names = adata.var["ensembl"].to_numpy()
    with pytest.raises(DataError) as info:
        tokenize_anndata(adata, make_vocab())
    msg = str(info.value)
    assert "only 0 of 60 genes" in msg and "Ensembl" in msg and "gene_key=" in msg and "feature_name" in msg


def test_unknown_gene_key_lists_columns():
    with pytest.raises(DataError, match=r"gene_key='feature_name'.*\['symbol', 'ensembl'\]"):
        match_genes(make_adata(), make_vocab(), gene_key="feature_name")


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("bad, expected", [
    (-1.0, "negative values"),
    (np.nan, "NaN"),
    (0.5, "non-integer"),
])
def test_bad_values_are_refused(bad, expected):
    adata = make_adata()
    X = adata.X.toarray()
    X[3, 2] = bad
    adata.X = sp.csr_matrix(X)
    with pytest.raises(DataError) as info:
        tokenize_anndata(adata, make_vocab())
    msg = str(info.value)
    assert expected in msg and "adata.X" in msg and "layer=" in msg


def test_empty_cells_and_allow_empty():
    adata = make_adata()
    X = adata.X.toarray()
    X[[2, 7]] = 0
    adata.X = sp.csr_matrix(X)
    with pytest.raises(DataError, match=r"2 of \d+ cells have no counts in any vocab gene \(e.g. c2, c7\)"):
        tokenize_anndata(adata, make_vocab())
    tok = tokenize_anndata(adata, make_vocab(), allow_empty=True)
    assert tok.lengths[2] == tok.lengths[7] == 1
    assert tok.gene_ids[tok.indptr[2]] == make_vocab()["<cls>"]


def test_empty_anndata_and_missing_special_tokens():
    with pytest.raises(DataError, match=r"empty \(0 cells"):
        tokenize_anndata(make_adata()[:0], make_vocab())
    vocab = make_vocab()
    del vocab["<cls>"]
    with pytest.raises(DataError, match="'<cls>' is not in the model vocab"):
        tokenize_anndata(make_adata(), vocab)


def test_views_dense_sparse_and_layers_agree():
    adata, vocab = make_adata(), make_vocab()
    keep = np.arange(adata.n_obs) % 3 != 0
    view = adata[keep]
    assert view.is_view
    before = view.X.copy()
    from_view = tokenize_anndata(view, vocab, seed=2)
    assert view.is_view and (view.X != before).nnz == 0  # the input is left alone
    copy = adata[keep].copy()
    dense = copy.copy()
    dense.X = copy.X.toarray()
    layered = copy.copy()
    layered.layers["counts"] = layered.X.copy()
    layered.X = sp.csr_matrix(np.log1p(layered.X.toarray()))  # X is normalised: must not be used
    for other in (tokenize_anndata(copy, vocab, seed=2), tokenize_anndata(dense, vocab, seed=2),
                  tokenize_anndata(layered, vocab, layer="counts", seed=2)):
        np.testing.assert_array_equal(other.indptr, from_view.indptr)
        np.testing.assert_array_equal(other.gene_ids, from_view.gene_ids)
        np.testing.assert_array_equal(other.values, from_view.values)
    with pytest.raises(DataError, match="non-integer.*layer="):
        tokenize_anndata(layered, vocab)


def test_missing_layer_lists_available_ones():
    adata = make_adata()
    adata.layers["counts"] = adata.X.copy()
    adata.layers["spliced"] = adata.X.copy()
    with pytest.raises(DataError, match=r"layer='raw' not found; available layers: \['counts', 'spliced'\]"):
        tokenize_anndata(adata, make_vocab(), layer="raw")


# ---------------------------------------------------------------- batches

def toy_tokens(lengths, seed: int = 0):
    """Tokenised cells of the given lengths (<cls> included): distinct genes, bins 1..50."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    gene_ids = np.concatenate([np.r_[201, rng.permutation(200)[: n - 1]] for n in lengths]).astype(np.int64)
    values = np.concatenate([np.r_[-2.0, rng.integers(1, 51, n - 1)] for n in lengths]).astype(np.float32)
    return TokenizedCells(indptr, gene_ids, values, pad_token_id=200, pad_value=-2.0, cls_token_id=201)


def padding_of(batches, lengths) -> int:
    return int(sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches))


def test_bucketing_reduces_padding():
    lengths = np.random.default_rng(0).permutation(np.arange(1, 101))  # 100 cells of lengths 1..100
    bucketed = bucket_batches(lengths, 10)
    shuffled = bucket_batches(lengths, 10, shuffle=True, seed=3)
    # sorted chunks of 10 consecutive lengths: each batch pads 0+1+...+9 = 45
    assert padding_of(bucketed, lengths) == 450
    assert padding_of(shuffled, lengths) == 450  # shuffling permutes batches, not their contents
    assert [len(b) for b in bucketed] == [10] * 10
    order = np.random.default_rng(1).permutation(100)  # random order, as a plain DataLoader batches
    naive = [order[i:i + 10] for i in range(0, 100, 10)]
    assert padding_of(naive, lengths) == 4190  # 9.3x the padding of length buckets
    for batches in (bucketed, shuffled):
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(100))
    assert [list(b) for b in shuffled] != [list(b) for b in bucketed]
    assert [list(b) for b in bucket_batches(lengths, 10, shuffle=True, seed=3)] == [list(b) for b in shuffled]


def test_collate_round_trip():
    tok = toy_tokens([5, 17, 2, 9, 17, 30])
    cells = np.array([3, 0, 5, 2])
    batch = collate(tok, cells)
    assert batch.src.shape == (4, 30) and batch.values.shape == (4, 30)
    np.testing.assert_array_equal(batch.cells, cells)
    for row, cell in enumerate(cells):
        a, b = tok.indptr[cell], tok.indptr[cell + 1]
        keep = ~batch.padding_mask[row]
        assert keep.sum() == b - a and keep[: b - a].all()  # padding only at the end
        np.testing.assert_array_equal(batch.src[row][keep].numpy(), tok.gene_ids[a:b])
        np.testing.assert_array_equal(batch.values[row][keep].numpy(), tok.values[a:b])
        assert (batch.src[row][~keep] == 200).all() and (batch.values[row][~keep] == -2.0).all()
    assert batch.src.dtype == torch.long and batch.values.dtype == torch.float32


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.3])
def test_masking_counts_and_positions(ratio):
    lengths = [1, 2, 5, 11, 30, 64]
    tok = toy_tokens(lengths)
    batch = mask_batch(collate(tok, np.arange(len(lengths))), ratio, mask_value=-1.0, pad_value=-2.0, seed=7)
    n_genes = np.array(lengths) - 1
    np.testing.assert_array_equal(batch.mask.sum(1).numpy(), [int(n * ratio) for n in n_genes])
    assert not batch.mask[:, 0].any()  # never <cls>
    assert not (batch.mask & batch.padding_mask).any()  # never padding
    assert (batch.values[batch.mask] == -1.0).all()
    assert torch.equal(batch.values[~batch.mask], batch.target[~batch.mask])
    assert (batch.target[batch.mask] >= 1).all()  # the targets are the true bins


def test_masking_is_seeded():
    tok = toy_tokens([40] * 8)
    plain = collate(tok, np.arange(8))
    a, b = mask_batch(plain, 0.5, seed=1), mask_batch(plain, 0.5, seed=1)
    c = mask_batch(plain, 0.5, seed=2)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.values, b.values)
    assert not torch.equal(a.mask, c.mask)
    assert torch.equal(plain.values, a.target)  # the unmasked batch is left alone
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        mask_batch(plain, 1.0)


def test_iter_batches_masks_reproducibly():
    tok = toy_tokens(np.random.default_rng(2).integers(2, 50, 37))
    runs = [list(iter_batches(tok, 8, shuffle=True, seed=5, mask_ratio=0.25)) for _ in range(2)]
    assert len(runs[0]) == 5
    np.testing.assert_array_equal(np.sort(np.concatenate([b.cells for b in runs[0]])), np.arange(37))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.cells, b.cells)
        assert torch.equal(a.mask, b.mask) and torch.equal(a.values, b.values)
        np.testing.assert_array_equal(a.mask.sum(1).numpy(), (tok.lengths[a.cells] - 1) * 25 // 100)
    other = list(iter_batches(tok, 8, shuffle=True, seed=6, mask_ratio=0.25))
    assert any(not np.array_equal(a.cells, b.cells) for a, b in zip(runs[0], other))


def test_a_cells_tokens_do_not_depend_on_its_chunk_or_neighbours():
    """Draws are keyed by the cell (its obs name), not by a stream over the matrix: tokenising any chunk, in any
    order, next to any other cells gives each cell the tokens of one pass over everything (ties and subsampling
    both exercised: heavy ties, cells longer than max_seq_len)."""
    adata, vocab = make_adata(n_cells=40, density=0.9, seed=3), make_vocab()
    kw = dict(seed=7, max_seq_len=15, n_bins=11)
    whole = cells_of(tokenize_anndata(adata, vocab, **kw))
    order = np.random.default_rng(0).permutation(adata.n_obs)
    for part in (order[:7], order[7:8], order[8:], np.arange(0, 40, 3)):
        got = cells_of(tokenize_anndata(adata[part].copy(), vocab, **kw))
        for i, (g, v) in zip(part, got):
            np.testing.assert_array_equal(g, whole[i][0])
            np.testing.assert_array_equal(v, whole[i][1])
    # the key is the name: the same counts under another name (or another seed) draw differently
    other = adata.copy()
    other.obs_names = [f"x{i}" for i in range(adata.n_obs)]
    renamed = cells_of(tokenize_anndata(other, vocab, **kw))
    reseeded = cells_of(tokenize_anndata(adata, vocab, **{**kw, "seed": 8}))
    assert sum(not np.array_equal(a[0], b[0]) for a, b in zip(whole, renamed)) > 30
    assert sum(not np.array_equal(a[0], b[0]) for a, b in zip(whole, reseeded)) > 30


def test_cell_uniforms_are_uniform_and_independent_of_neighbours():
    keys = cell_keys([f"cell{i}" for i in range(2000)])
    u = cell_uniforms(np.repeat(keys, 50), np.tile(np.arange(50), 2000), 0, DRAW_BIN)
    assert u.min() >= 0 and u.max() < 1
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(counts - 10_000) < 500)  # ~5 sd of a binomial(100k, 0.1)
    np.testing.assert_array_equal(cell_uniforms(keys[5:6], [3], 0, DRAW_BIN), u[5 * 50 + 3:5 * 50 + 4])


def test_a_remembered_gene_match_is_reused_only_for_the_same_vocab_and_genes():
    """match_genes remembers a gene list's match per vocab object: the same vocab and genes give the very same
    match; another vocab (same genes) or a vocab that changed size is matched afresh."""
    from scsuperweight.data.tokenize import match_genes

    names = [f"G{i}" for i in range(30)]
    adata = ad.AnnData(sp.csr_matrix((2, 30), dtype=np.float32), var=pd.DataFrame(index=names))
    vocab_a = {"<pad>": 0, "<cls>": 1, **{g: i + 2 for i, g in enumerate(names)}}
    vocab_b = {"<pad>": 0, "<cls>": 1, **{g: 100 + i for i, g in enumerate(reversed(names))}}
    first = match_genes(adata, vocab_a)
    assert match_genes(adata[:1], vocab_a) is first  # a chunk of the same file: remembered
    b = match_genes(adata, vocab_b)
    assert b.token_ids.tolist() == [129 - i for i in range(30)]
    vocab_a["EXTRA"] = 999  # the vocab changed: matched again, and still right
    again = match_genes(adata, vocab_a)
    assert again is not first and again.token_ids.tolist() == list(range(2, 32))
    other = ad.AnnData(sp.csr_matrix((2, 25), dtype=np.float32), var=pd.DataFrame(index=names[5:]))
    assert match_genes(other, vocab_a).token_ids.tolist() == list(range(7, 32))
