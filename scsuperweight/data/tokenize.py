"""AnnData of raw counts -> scGPT input with the official semantics, vectorised.

Per cell: the non-zero genes that are in the vocab, `<cls>` first with `pad_value`, each value binned into
`n_bins` using quantile edges of that cell's own non-zero values (ties split at random, as the official
`_digitize` does), a seeded random subsample down to `max_seq_len` tokens. The whole matrix is binned in a few
array passes over the non-zeros; there is no per-cell Python loop.

Randomness is drawn per cell, not from one stream over the matrix: each draw is a hash of (seed, the cell's key,
the gene's token id, what the draw is for). The cell's key is a hash of its obs name, so a cell gets the same
tokens whether it is tokenised alone, in any chunk of an atlas, or next to any other cells (chunked, resumed and
multi-process runs equal one in-memory pass).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .._log import logger
from ..errors import DataError

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")


@dataclass(frozen=True)
class GeneMatch:
    """Which AnnData genes the vocab knows: their var positions, token ids and symbols."""

    var_index: np.ndarray  # positions in adata.var
    token_ids: np.ndarray  # vocab ids of those genes
    genes: np.ndarray  # their symbols
    n_total: int  # genes in the AnnData

    @property
    def fraction(self) -> float:
        return len(self.var_index) / max(self.n_total, 1)


MIN_GENES, MIN_FRACTION = 20, 0.05  # fewer genes in the vocab than this and a cell's tokens say too little


def too_few_genes(n_shared: int, n_genes: int, min_genes: int = MIN_GENES, min_fraction: float = MIN_FRACTION
                  ) -> bool:
    """Does a gene list sharing `n_shared` of its `n_genes` genes with the vocab share too few to use?"""
    return n_shared < min_genes or n_shared / max(n_genes, 1) < min_fraction


def too_few_genes_message(n_shared: int, names, *, where: str = "", fix: str = "", min_genes: int = MIN_GENES,
                          min_fraction: float = MIN_FRACTION) -> str:
    """The one-line refusal of a gene list (`names`) that shares too few genes with the vocab: the counts, the
    first names, the Ensembl-ID hint when the names look like Ensembl IDs, then `fix`."""
    names = np.asarray(names, dtype=str)
    hint = ""
    if len(names) and np.mean([bool(_ENSEMBL.match(n)) for n in names[:200]]) > 0.5:
        hint = (" The gene names look like Ensembl IDs while the vocab holds symbols: pass gene_key= a var "
                "column of symbols (CELLxGENE files call it 'feature_name').")
    return (f"{where}only {n_shared} of {len(names)} genes ({100 * n_shared / max(len(names), 1):.1f}%) are in the "
            f"model vocab (need at least {min_genes} and {100 * min_fraction:.0f}%); first names: "
            f"{', '.join(names[:3])}.{hint}{fix}")


_MATCHES: OrderedDict = OrderedDict()  # (id(vocab), gene list digest, limits) -> (vocab, its size, GeneMatch)
_MATCHES_KEPT = 16  # gene lists remembered: an atlas's chunks share their file's genes


def match_genes(adata, vocab: dict[str, int], *, gene_key: str | None = None, min_genes: int = MIN_GENES,
                min_fraction: float = MIN_FRACTION) -> GeneMatch:
    """Match `adata.var_names` (or `adata.var[gene_key]`) to the model vocab; errors say why too few match.

    The match of a gene list is remembered for the same vocab object (a streamed atlas tokenises every chunk of a
    file against that file's genes: matched once, logged once).
    """
    if gene_key is None:
        names = np.asarray(adata.var_names, dtype=str)
    elif gene_key in adata.var.columns:
        names = adata.var[gene_key].astype(str).to_numpy()
    else:
        msg = (f"gene_key={gene_key!r} is not a column of adata.var; columns are {list(adata.var.columns)}. "
               "Pass one that holds gene symbols, or gene_key=None to use adata.var_names.")
        raise DataError(msg)
    key = (id(vocab), hashlib.sha256("\0".join(names).encode()).hexdigest(), min_genes, min_fraction)
    hit = _MATCHES.get(key)
    if hit is not None and hit[0] is vocab and hit[1] == len(vocab):  # `is`: the entry's reference keeps the id
        _MATCHES.move_to_end(key)
        return hit[2]
    special = {"<pad>", "<cls>", "<eoc>", "<mask>"}
    ids = np.fromiter((vocab.get(g, -1) if g not in special else -1 for g in names), dtype=np.int64,
                      count=len(names))
    # keep the first occurrence of duplicated symbols so that each token appears once per cell
    _, first = np.unique(names, return_index=True)
    keep = np.zeros(len(names), dtype=bool)
    keep[first] = True
    var_index = np.flatnonzero((ids >= 0) & keep)
    match = GeneMatch(var_index, ids[var_index], names[var_index], len(names))
    logger.info("matched %d of %d genes to the vocab (%.1f%%)", len(var_index), len(names), 100 * match.fraction)
    if too_few_genes(len(var_index), len(names), min_genes, min_fraction):
        raise DataError(too_few_genes_message(len(var_index), names, min_genes=min_genes, min_fraction=min_fraction))
    _MATCHES[key] = (vocab, len(vocab), match)
    while len(_MATCHES) > _MATCHES_KEPT:
        _MATCHES.popitem(last=False)
    return match


def get_counts(adata, genes: GeneMatch | None = None, *, layer: str | None = None) -> sp.csr_matrix:
    """Validated raw counts (cells x matched genes) as float32 CSR; never modifies `adata` (views are fine)."""
    if layer is None:
        X = adata.X
        where = "adata.X"
    elif layer in adata.layers:
        X = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    else:
        msg = f"layer={layer!r} not found; available layers: {list(adata.layers.keys())}, or layer=None for X."
        raise DataError(msg)
    if X is None:
        msg = f"{where} is empty; load the counts or pass layer= the layer that holds them."
        raise DataError(msg)
    if hasattr(X, "to_memory"):  # backed sparse dataset
        X = X.to_memory()
    if genes is not None:
        X = X[:, genes.var_index]
    X = sp.csr_matrix(X, dtype=np.float32) if not sp.issparse(X) else sp.csr_matrix(X).astype(np.float32)
    X.sum_duplicates()
    data = X.data
    if data.size:
        if not np.all(np.isfinite(data)):
            msg = (f"{where} contains NaN or infinite values; scGPT needs raw counts. Pass layer= the layer with raw "
                   "counts, or clean the matrix first.")
            raise DataError(msg)
        if data.min() < 0:
            msg = (f"{where} contains negative values (min {data.min():g}): it looks scaled or centred, not raw "
                   "counts. Pass layer= the layer with raw counts (often 'counts').")
            raise DataError(msg)
        if not np.all(data == np.round(data)):
            msg = (f"{where} has non-integer values (e.g. {data[data != np.round(data)][0]:g}): it looks "
                   "log-normalised. Pass layer= the layer with raw counts (e.g. 'counts' or 'UMIs').")
            raise DataError(msg)
    X.eliminate_zeros()
    return X


def _quantile_edges(sorted_vals: np.ndarray, starts: np.ndarray, lengths: np.ndarray, n_edges: int) -> np.ndarray:
    """np.quantile(v, linspace(0, 1, n_edges)) for every cell at once (linear method, numpy's own lerp)."""
    p = np.linspace(0, 1, n_edges)
    h = p[None, :] * (lengths[:, None] - 1).astype(np.float64)  # (C, E) virtual index
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, lengths[:, None] - 1)
    t = h - lo
    a = sorted_vals[starts[:, None] + lo]
    b = sorted_vals[starts[:, None] + hi]
    diff = b - a
    out = a + diff * t
    upper = t >= 0.5  # numpy's _lerp computes the upper half from b for symmetry
    out[upper] = (b - diff * (1 - t))[upper]
    return out


_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
DRAW_BIN, DRAW_SUBSAMPLE = 1, 2  # what a draw is for: splitting a tie between bins, choosing genes to keep


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that scatters nearby inputs over the whole range."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def cell_keys(obs_names) -> np.ndarray:
    """A stable uint64 key per cell from its obs name (pandas' fixed-key hash: same on every run and machine)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(obs_names, dtype=str).astype(object)).astype(np.uint64)


def cell_uniforms(keys: np.ndarray, genes: np.ndarray, seed: int, purpose: int) -> np.ndarray:
    """Uniform [0, 1) draws, one per (cell key, gene token id) pair, for `seed` and `purpose`.

    Counter-based (a hash, not a stream), so a draw depends on nothing but its own cell, gene, seed and purpose.
    """
    with np.errstate(over="ignore"):
        x = _mix(np.asarray(keys, dtype=np.uint64) ^ _mix(np.uint64(seed) * _GOLDEN + np.uint64(purpose)))
        x = _mix(x + np.asarray(genes, dtype=np.int64).astype(np.uint64) * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def bin_matrix(X: sp.csr_matrix, n_bins: int = 51, rng: np.random.Generator | None = None,
               chunk: int = 1 << 18, *, rand: np.ndarray | None = None) -> sp.csr_matrix:
    """Bin each row's non-zeros into 1..n_bins-1 by that row's quantiles (official scGPT semantics).

    Ties spanning several edges are split uniformly at random among the bins they cover: with `rand` (one uniform
    per stored non-zero, in CSR order) when given, else with draws from `rng` in CSR order (the official stream).
    """
    rng = np.random.default_rng(0) if rng is None else rng
    X = sp.csr_matrix(X)
    n_cells = X.shape[0]
    lengths = np.diff(X.indptr)
    row = np.repeat(np.arange(n_cells), lengths)
    data = X.data.astype(np.float64)
    order = np.lexsort((data, row))  # sort values within each row
    sorted_vals = data[order]
    nonempty = lengths > 0
    edges = np.zeros((n_cells, n_bins - 1))
    edges[nonempty] = _quantile_edges(sorted_vals, X.indptr[:-1][nonempty], lengths[nonempty], n_bins - 1)
    digits = np.empty(data.size, dtype=np.float64)
    if rand is None:
        rand = rng.random(data.size)
    elif len(rand) != data.size:
        msg = f"rand needs one draw per stored non-zero ({data.size}), got {len(rand)}."
        raise ValueError(msg)
    for s in range(0, data.size, chunk):
        e = min(s + chunk, data.size)
        ed = edges[row[s:e]]  # (n, E)
        x = data[s:e, None]
        left = (ed <= x).sum(1)  # np.digitize(x, edges)
        right = (ed < x).sum(1)  # np.digitize(x, edges, right=True)
        digits[s:e] = np.ceil(rand[s:e] * (right - left) + left)
    out = sp.csr_matrix((digits.astype(np.float32), X.indices.copy(), X.indptr.copy()), shape=X.shape)
    return out


def ragged_take(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat positions of `rows` in a ragged array described by `indptr`, row after row."""
    starts = indptr[:-1][rows]
    lengths = indptr[1:][rows] - starts
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


@dataclass
class TokenizedCells:
    """Ragged token sequences, flat: cell i owns gene_ids/values[indptr[i]:indptr[i+1]], `<cls>` first."""

    indptr: np.ndarray
    gene_ids: np.ndarray  # int64 vocab ids
    values: np.ndarray  # float32 bins; `<cls>` carries pad_value
    pad_token_id: int
    pad_value: float
    cls_token_id: int
    genes: GeneMatch | None = None
    # cells with no counted vocab gene (see `tokenize_anndata`'s `empty`): with "keep" they are here as `<cls>` alone
    # and flagged, so their embeddings can be set to NaN; with "drop" they are gone and `source_index` says which
    # input rows the remaining cells are
    empty_mask: np.ndarray | None = None  # (n_cells,) bool, True for a kept empty cell
    source_index: np.ndarray | None = None  # (n_cells,) positions of these cells in the tokenised AnnData
    n_empty: int = 0  # empty cells found in the input, whatever the policy
    empty_policy: str = "error"

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def subset(self, cells: np.ndarray) -> TokenizedCells:
        cells = np.asarray(cells)
        lengths = self.lengths[cells]
        take = ragged_take(self.indptr, cells)
        return TokenizedCells(np.concatenate([[0], np.cumsum(lengths)]), self.gene_ids[take], self.values[take],
                              self.pad_token_id, self.pad_value, self.cls_token_id, self.genes,
                              empty_mask=None if self.empty_mask is None else self.empty_mask[cells],
                              source_index=None if self.source_index is None else self.source_index[cells],
                              n_empty=self.n_empty, empty_policy=self.empty_policy)

    def empty_summary(self) -> dict:
        """What happened to cells without counts, as plain values for ``uns[...]["params"]`` and run.json."""
        n_in = self.n_cells + (self.n_empty if self.empty_policy == "drop" else 0)
        return {"empty": self.empty_policy, "n_empty": int(self.n_empty), "n_cells_in": int(n_in),
                "n_cells_out": int(self.n_cells)}

    def mask_embeddings(self, emb: np.ndarray) -> np.ndarray:
        """`emb` (n_cells x d) with the rows of kept empty cells set to NaN: `<cls>` alone is no measurement."""
        emb = np.asarray(emb)
        if self.empty_mask is None or not self.empty_mask.any():
            return emb
        out = emb.astype(np.result_type(emb.dtype, np.float32))  # a copy, and a dtype that holds NaN
        out[self.empty_mask] = np.nan
        return out


def tokenize_counts(X: sp.csr_matrix, token_ids: np.ndarray, *, cls_token_id: int, pad_token_id: int,
                    pad_value: float = -2.0, n_bins: int = 51, max_seq_len: int = 1200,
                    include_zero_genes: bool = False, seed: int = 0, genes: GeneMatch | None = None,
                    keys: np.ndarray | None = None) -> TokenizedCells:
    """Bin and tokenise a (cells x matched genes) count matrix; see module docstring for the semantics.

    `keys`: one uint64 per row (`cell_keys` of the obs names) keying that cell's random draws; default the row
    numbers, which makes a cell's tokens depend on its position in `X` (pass keys when tokenising in chunks).
    """
    X = sp.csr_matrix(X)
    n_rows = X.shape[0]
    keys = np.arange(n_rows, dtype=np.uint64) if keys is None else np.asarray(keys, dtype=np.uint64)
    if len(keys) != n_rows:
        msg = f"keys needs one entry per cell ({n_rows}), got {len(keys)}."
        raise ValueError(msg)
    token_ids = np.asarray(token_ids, dtype=np.int64)
    nz_row = np.repeat(np.arange(n_rows), np.diff(X.indptr))
    B = bin_matrix(X, n_bins=n_bins, rand=cell_uniforms(keys[nz_row], token_ids[X.indices], seed, DRAW_BIN))
    if include_zero_genes:
        dense = B.toarray()
        n_cells, n_genes = dense.shape
        indptr = np.arange(0, n_cells * n_genes + 1, n_genes)
        cols = np.tile(np.arange(n_genes), n_cells)
        vals = dense.ravel()
    else:
        indptr, cols, vals = B.indptr, B.indices.astype(np.int64), B.data
    n_cells = len(indptr) - 1
    lengths = np.diff(indptr)
    keep_n = np.minimum(lengths, max_seq_len - 1)
    row = np.repeat(np.arange(n_cells), lengths)
    if np.any(lengths > keep_n):
        # seeded subsample of genes for long cells: random keys, keep the smallest keep_n per row
        key = cell_uniforms(keys[row], token_ids[cols], seed, DRAW_SUBSAMPLE)
        order = np.lexsort((key, row))
        rank = np.arange(len(cols)) - np.repeat(indptr[:-1], lengths)
        chosen = order[rank < np.repeat(keep_n, lengths)]
        chosen.sort()  # back to gene order within each row
        cols, vals, row = cols[chosen], vals[chosen], row[chosen]
    seq_len = keep_n + 1
    new_indptr = np.concatenate([[0], np.cumsum(seq_len)]).astype(np.int64)
    gene_ids = np.empty(new_indptr[-1], dtype=np.int64)
    values = np.empty(new_indptr[-1], dtype=np.float32)
    cls_pos = new_indptr[:-1]
    gene_ids[cls_pos] = cls_token_id
    values[cls_pos] = pad_value
    body = np.ones(new_indptr[-1], dtype=bool)
    body[cls_pos] = False
    gene_ids[body] = token_ids[cols]
    values[body] = vals
    return TokenizedCells(new_indptr, gene_ids, values, pad_token_id, float(pad_value), cls_token_id, genes)


EMPTY_POLICIES = ("error", "drop", "keep")


def empty_cells_message(n_empty: int, n_obs: int, names: str, where: str = "") -> str:
    """The one-line refusal of cells without counts in any vocab gene, naming both ways out."""
    return (f"{where}{n_empty} of {n_obs} cells have no counts in any vocab gene (e.g. {names}); pass "
            "empty='drop' to leave them out or empty='keep' to keep them with NaN embeddings and a mask "
            "(--empty drop|keep), or filter them first.")


def tokenize_anndata(adata, vocab: dict[str, int], *, gene_key: str | None = None, layer: str | None = None,
                     n_bins: int = 51, max_seq_len: int = 1200, pad_value: float = -2.0,
                     pad_token: str = "<pad>", cls_token: str = "<cls>", include_zero_genes: bool = False,
                     seed: int = 0, empty: str = "error", allow_empty: bool | None = None) -> TokenizedCells:
    """Validate an AnnData of raw counts and tokenise it for an scGPT model with vocab `vocab`.

    Parameters
    ----------
    empty
        What to do with cells that have no counts in any vocab gene (common when a panel shares few genes with the
        vocab): ``"error"`` refuses, naming how many; ``"drop"`` leaves them out (``source_index`` maps the rest
        back to `adata`); ``"keep"`` keeps them as ``<cls>`` alone, flagged in ``empty_mask`` so their embeddings
        can be set to NaN (`TokenizedCells.mask_embeddings`). The count is in ``n_empty`` either way.
    allow_empty
        Older spelling: True is ``empty="keep"``.
    """
    if allow_empty:
        empty = "keep"
    if empty not in EMPTY_POLICIES:
        msg = f"empty={empty!r} is not a policy for cells without counts; pass one of {EMPTY_POLICIES}."
        raise DataError(msg)
    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
        raise DataError(msg)
    for tok in (pad_token, cls_token):
        if tok not in vocab:
            msg = f"special token {tok!r} is not in the model vocab; is this an scGPT vocab.json?"
            raise DataError(msg)
    genes = match_genes(adata, vocab, gene_key=gene_key)
    X = get_counts(adata, genes, layer=layer)
    is_empty = np.diff(X.indptr) == 0
    n_empty = int(is_empty.sum())
    keys = cell_keys(adata.obs_names)
    source_index = None
    if n_empty:
        if empty == "error":
            names = ", ".join(map(str, adata.obs_names[np.flatnonzero(is_empty)[:5]]))
            raise DataError(empty_cells_message(n_empty, adata.n_obs, names))
        if empty == "drop":
            if n_empty == adata.n_obs:
                msg = (f"all {adata.n_obs} cells have no counts in any vocab gene, so empty='drop' leaves nothing; "
                       "check layer= (raw counts) and gene_key= (symbols the vocab knows).")
                raise DataError(msg)
            source_index = np.flatnonzero(~is_empty)
            X, keys = X[source_index], keys[source_index]
        logger.warning("%d of %d cells have no counts in any vocab gene; empty=%r: %s", n_empty, adata.n_obs, empty,
                       "left out" if empty == "drop" else "kept with NaN embeddings")
    tok = tokenize_counts(X, genes.token_ids, cls_token_id=vocab[cls_token], pad_token_id=vocab[pad_token],
                          pad_value=pad_value, n_bins=n_bins, max_seq_len=max_seq_len,
                          include_zero_genes=include_zero_genes, seed=seed, genes=genes, keys=keys)
    tok.empty_mask = is_empty if empty == "keep" else np.zeros(tok.n_cells, dtype=bool)
    tok.source_index = np.arange(adata.n_obs) if source_index is None else source_index
    tok.n_empty = n_empty
    tok.empty_policy = empty
    return tok
