"""Sources: per-donor files read lazily, genes matched per file, samples from obs alone."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scsuperweight.data.sources import FILE_COLUMN, Source, open_source, stratified_sample
from scsuperweight.data.tokenize import tokenize_anndata
from scsuperweight.errors import DataError

N_GENES = 60
VOCAB = {"<pad>": 0, "<cls>": 1, **{f"G{i}": i + 2 for i in range(N_GENES)}}


def _donor(d: int, n_cells: int, rng: np.random.Generator, layer: str | None) -> ad.AnnData:
    """One donor's cells: each expresses 25-40 vocab genes with distinct counts (so binning has no random ties),
    over that donor's own gene list (a subset, plus genes the vocab lacks) in its own order."""
    own = np.sort(rng.choice(N_GENES, 50, replace=False))
    rows, cols, vals = [], [], []
    for c in range(n_cells):
        k = int(rng.integers(25, 41))
        genes = rng.choice(len(own), k, replace=False)
        rows += [c] * k
        cols += genes.tolist()
        vals += rng.permutation(np.arange(1, k + 1) * 3).tolist()
    X = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(n_cells, len(own)))
    var_names = [f"G{g}" for g in own]
    extra = [f"NOVOCAB{d}_{i}" for i in range(5)]
    X = sp.hstack([X, sp.csr_matrix((n_cells, len(extra)), dtype=np.float32)]).tocsr()
    perm = rng.permutation(len(var_names) + len(extra))
    X = X[:, perm]
    names = np.array(var_names + extra)[perm]
    obs = pd.DataFrame({"donor": f"D{d}", "cell_type": rng.choice(["Astro", "Micro", "Oligo"], n_cells),
                        "condition": "AD" if d % 2 else "control"},
                       index=[f"d{d}_c{i}" for i in range(n_cells)])
    a = ad.AnnData(X=None if layer else X, obs=obs, var=pd.DataFrame(index=names))
    if layer:
        a.layers[layer] = X
    return a


@pytest.fixture
def donors(tmp_path):
    rng = np.random.default_rng(7)
    parts = [_donor(d, n, rng, "UMIs") for d, n in enumerate([23, 31, 17])]
    for d, a in enumerate(parts):
        a.write_h5ad(tmp_path / f"donor{d}.h5ad")
    return tmp_path, parts


def _cell_tokens(tok, i):
    """Cell i's (gene id, bin) pairs in gene-id order (within a cell the order follows the file's var order)."""
    s, e = tok.indptr[i], tok.indptr[i + 1]
    ids, vals = tok.gene_ids[s:e], tok.values[s:e]
    o = np.argsort(ids, kind="stable")
    return ids[o], vals[o]


def test_chunked_tokens_equal_whole(donors):
    folder, parts = donors
    whole = ad.concat(parts, join="outer", fill_value=0)  # the same cells in one AnnData, genes unioned
    ref = tokenize_anndata(whole, VOCAB, layer="UMIs", seed=3)
    src = open_source(folder, layer="UMIs")
    assert src.n_obs == whole.n_obs == 71
    assert list(src.obs_names) == list(whole.obs_names)
    assert src.obs[FILE_COLUMN].tolist() == ["donor0"] * 23 + ["donor1"] * 31 + ["donor2"] * 17
    seen = []
    for cells, chunk in src.iter_chunks(chunk_size=10):
        assert chunk.n_obs <= 10 and len(set(chunk.obs[FILE_COLUMN])) == 1
        tok = tokenize_anndata(chunk, VOCAB, layer="UMIs", seed=3)
        for j, c in enumerate(cells):
            for got, want in zip(_cell_tokens(tok, j), _cell_tokens(ref, c), strict=True):
                np.testing.assert_array_equal(got, want)
        seen.extend(cells.tolist())
    assert seen == list(range(71))  # every cell once, in order
    src.close()


def test_genes_shared_per_file(donors):
    folder, parts = donors
    table = open_source(str(folder / "donor*.h5ad"), layer="UMIs").genes_shared_with(VOCAB)
    assert table["file"].tolist() == ["donor0", "donor1", "donor2"]
    assert table["n_genes"].tolist() == [55, 55, 55]  # 50 vocab genes + 5 the vocab lacks
    assert table["n_shared"].tolist() == [50, 50, 50]


def test_sample_reads_only_sampled_rows(donors, monkeypatch):
    folder, parts = donors
    # poison every cell of donor1 except the sampled ones: negative counts would make the tokeniser raise
    src = open_source(folder, layer="UMIs")
    sample = stratified_sample(src.obs, "cell_type", "donor", max_per_donor=2, seed=0)
    poisoned = parts[1].copy()
    keep_local = sample[(sample >= 23) & (sample < 54)] - 23
    bad = np.setdiff1d(np.arange(31), keep_local)
    M = poisoned.layers["UMIs"].tolil()
    M[bad, 0] = -5.0
    poisoned.layers["UMIs"] = M.tocsr()
    poisoned.write_h5ad(folder / "donor1.h5ad")
    src = open_source(folder, layer="UMIs")
    asked = []
    real_read = Source._read
    monkeypatch.setattr(Source, "_read", lambda self, k, rows: asked.append(self.files[k].start + rows)
                        or real_read(self, k, rows))
    got = [c for cells, chunk in src.iter_chunks(sample, chunk_size=4)
           for c in cells if tokenize_anndata(chunk, VOCAB, layer="UMIs").n_cells]
    assert got == sample.tolist()
    np.testing.assert_array_equal(np.concatenate(asked), sample)
    with pytest.raises(DataError, match="negative"):  # the poison is real: reading all cells hits it
        for _, chunk in src.iter_chunks(chunk_size=100):
            tokenize_anndata(chunk, VOCAB, layer="UMIs")


def test_stratified_sample_caps():
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"label": rng.choice(list("ABC"), 600, p=[0.7, 0.2, 0.1]),
                        "donor": rng.choice(["d1", "d2", "d3", "d4"], 600),
                        "cond": rng.choice(["AD", "ctrl"], 600)})
    s = stratified_sample(obs, "label", "donor", "cond", max_per_label=40, max_per_donor=15,
                          max_per_condition=25, seed=1)
    sub = obs.iloc[s]
    assert np.all(np.diff(s) > 0)
    assert sub.groupby("label").size().max() <= 40
    assert sub.groupby(["label", "donor"]).size().max() <= 15
    assert sub.groupby(["label", "cond"]).size().max() <= 25
    assert sub.groupby("label").size()["A"] == 40  # plenty of A: the label cap binds
    np.testing.assert_array_equal(s, stratified_sample(obs, "label", "donor", "cond", max_per_label=40,
                                                       max_per_donor=15, max_per_condition=25, seed=1))
    assert len(stratified_sample(obs, max_cells=50, seed=2)) == 50


def test_in_memory_and_backed(donors):
    folder, parts = donors
    mem = open_source(parts[0], layer="UMIs")
    backed = open_source(ad.read_h5ad(folder / "donor0.h5ad", backed="r"), layer="UMIs")
    for src in (mem, backed):
        cells, chunk = next(src.iter_chunks([5, 1, 3]))
        assert cells.tolist() == [1, 3, 5]
        np.testing.assert_array_equal(chunk.layers["UMIs"].toarray(), parts[0].layers["UMIs"][[1, 3, 5]].toarray())


def test_duplicate_names_prefixed_and_errors(tmp_path):
    a = ad.AnnData(sp.csr_matrix(np.eye(3, dtype=np.float32)), obs=pd.DataFrame(index=["x", "y", "z"]))
    a.write_h5ad(tmp_path / "a.h5ad")
    a.write_h5ad(tmp_path / "b.h5ad")
    src = open_source(tmp_path)
    assert list(src.obs_names) == ["a:x", "a:y", "a:z", "b:x", "b:y", "b:z"]
    with pytest.raises(DataError, match="no such file"):
        open_source(tmp_path / "missing.h5ad")
    with pytest.raises(DataError, match="matches no"):
        open_source(str(tmp_path / "zz*.h5ad"))
    with pytest.raises(DataError, match="layers"):
        next(open_source(tmp_path, layer="UMIs").iter_chunks())


def test_row_ranges_read_from_disk_equal_the_files_rows(donors):
    """Consecutive rows (every embedding block) are read as slices of the on-disk CSR arrays: the same matrix as
    anndata's own rows, for runs at the start, middle and end of a file, one row, and scattered rows."""
    folder, parts = donors
    src = open_source(folder, layer="UMIs")
    for k, part in enumerate(parts):
        full = sp.csr_matrix(part.layers["UMIs"])
        n = part.n_obs
        for rows in (np.arange(0, 5), np.arange(4, n - 3), np.arange(n - 2, n), np.array([n // 2]),
                     np.array([0, 3, n - 1])):
            got = src._rows(k, rows)
            want = full[rows]
            assert got.shape == want.shape
            assert (got != want).nnz == 0
            assert np.array_equal(got.toarray(), want.toarray())
    assert set(src._indptrs) == {0, 1, 2}  # each file's indptr read once, then reused
    src.close()
    assert not src._elements and not src._indptrs


def test_obs_string_columns_stay_categorical_across_files(tmp_path):
    """A column naming one donor per file is categorical across files (1 byte a cell, not an object column), its
    values the strings the files hold, its categories the values present natural-sorted as anndata writes them;
    a column with the same categories in every file, with all values distinct, or missing in a file, is left as
    pandas concatenates it. The .h5ad written from the
    source's obs equals the one written from the plain concatenation."""
    files = []
    for d, n in ((10, 4), (2, 3), (1, 5)):  # natural order D1 < D2 < D10, not the file order nor plain sort
        obs = pd.DataFrame({"donor": pd.Categorical([f"D{d}"] * n),
                            "cell_type": pd.Categorical(["Astro", "Micro"] * (n // 2) + ["Astro"] * (n % 2),
                                                        categories=["Oligo", "Micro", "Astro"]),
                            "barcode": pd.Categorical([f"bc{d}_{i}" for i in range(n)])},
                           index=[f"d{d}_c{i}" for i in range(n)])
        if d != 2:
            obs["batch"] = pd.Categorical([f"b{d}"] * n)
        a = ad.AnnData(X=sp.csr_matrix(np.ones((n, 3), np.float32)), obs=obs)
        a.write_h5ad(tmp_path / f"f{len(files)}.h5ad")
        files.append(ad.read_h5ad(tmp_path / f"f{len(files)}.h5ad").obs)
    obs = open_source(tmp_path).obs
    plain = pd.concat(files, axis=0, join="outer")
    assert plain["donor"].dtype == object  # what pandas does with differing categories
    assert obs["donor"].dtype == "category" and list(obs["donor"].cat.categories) == ["D1", "D2", "D10"]
    assert obs["donor"].tolist() == plain["donor"].tolist() == ["D10"] * 4 + ["D2"] * 3 + ["D1"] * 5
    assert list(obs["cell_type"].cat.categories) == ["Oligo", "Micro", "Astro"]  # the same in every file: kept
    assert obs["cell_type"].tolist() == plain["cell_type"].tolist()
    assert obs["barcode"].dtype == object and obs["barcode"].tolist() == plain["barcode"].tolist()
    assert obs["batch"].dtype == object and obs["batch"].isna().sum() == 3
    ad.AnnData(obs=obs.drop(columns=FILE_COLUMN)).write_h5ad(tmp_path / "new.h5ad")
    ad.AnnData(obs=plain).write_h5ad(tmp_path / "old.h5ad")
    pd.testing.assert_frame_equal(ad.read_h5ad(tmp_path / "new.h5ad").obs, ad.read_h5ad(tmp_path / "old.h5ad").obs)
