"""AnnData of raw counts -> Geneformer input (rank-value encoding), batches as forward-kwargs dicts, and masking.

Geneformer's encoding, per cell: counts / total counts x 10,000, each gene divided by its non-zero median over a
reference corpus (the user's gene-median dictionary), genes ranked by that value (descending; ties by var order),
the top `model_input_size` kept as token ids from the user's token dictionary (Ensembl ID -> id), with ``<cls>``
first and ``<eos>`` last when the dictionary has them (Geneformer V2). The ranking runs as a few array passes over
the non-zeros of each block of CSR rows: no per-cell Python loop.

Dictionaries are read from JSON or pickle; pickles through a restricted unpickler that builds plain dicts of
strings and numbers only (never arbitrary objects). Batches are `CellBatch` dicts (``input_ids``,
``attention_mask``, and ``labels`` once masked) that remember their cells in ``.cells``; they feed
`scsuperweight.find_superweights`, `scsuperweight.runners.hf.evaluate_mlm` and
`scsuperweight.runners.hf.embed_cells` directly. torch is imported only where tensors are built.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .._log import logger
from ..errors import DataError

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
_ID_COLUMNS = ("ensembl_id", "gene_ids", "gene_id", "ensembl_gene_id", "feature_id")
SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
DEFAULT_INPUT_SIZE = 2048  # Geneformer V1; V2 models say 4096 in max_position_embeddings


# -- dictionaries ----------------------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Builds only containers, strings and numbers: numpy scalars are the one kind of global allowed."""

    _ALLOWED = {("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        msg = (f"refusing to unpickle {module}.{name}: gene dictionaries must be plain dicts of strings and numbers. "
               "Save it as JSON (json.dump(d, f)) or as a plain-dict pickle.")
        raise DataError(msg)


def read_gene_dictionary(source: str | os.PathLike | Mapping, *, what: str = "gene dictionary") -> dict:
    """A gene dictionary (token dictionary: Ensembl ID -> token id; or gene medians: Ensembl ID -> median).

    `source` is a mapping, or a ``.json`` / ``.pkl`` / ``.pickle`` file holding one (pickles are read with a
    restricted loader that accepts plain dicts of strings and numbers only).
    """
    if isinstance(source, Mapping):
        d = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            msg = f"{what} file not found: {path}."
            raise DataError(msg)
        if path.suffix.lower() == ".json":
            try:
                d = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                msg = f"{what} {path} is not valid JSON ({e})."
                raise DataError(msg) from None
        elif path.suffix.lower() in (".pkl", ".pickle"):
            with open(path, "rb") as fh:
                try:
                    d = _PlainUnpickler(fh).load()
                except (pickle.UnpicklingError, EOFError, ValueError) as e:
                    msg = f"{what} {path} is not a readable pickle ({e})."
                    raise DataError(msg) from None
        else:
            msg = f"{what} {path}: expected a .json, .pkl or .pickle file, got {path.suffix or 'no suffix'!r}."
            raise DataError(msg)
    if not isinstance(d, Mapping) or not d:
        msg = f"{what} must be a non-empty dict (Ensembl ID -> value); got {type(d).__name__}."
        raise DataError(msg)
    bad = [(k, v) for k, v in list(d.items())[:1000] if not isinstance(k, str) or isinstance(v, (bool, str))
           or not np.isscalar(v)]
    if bad:
        msg = f"{what} must map strings to numbers; e.g. {bad[0]!r} does not."
        raise DataError(msg)
    return {str(k): v.item() if isinstance(v, np.generic) else v for k, v in d.items()}


def check_token_dictionary(vocab: Mapping, n_embeddings: int | None = None, *, source=None) -> None:
    """Token ids that can index the embedding: whole numbers, each used by one gene only, in
    ``[0, n_embeddings)``. Two genes on one id would read as one gene, and an id past the embedding fails deep
    inside the forward, so both stop here with the entries named."""
    where = "" if source is None or isinstance(source, Mapping) else f" {os.fspath(source)}"
    ids = {}
    for gene, tid in vocab.items():
        if not float(tid).is_integer() or tid < 0:
            msg = (f"token dictionary{where}: {gene!r} has id {tid!r}; ids must be whole numbers >= 0. Pass the "
                   "Geneformer token dictionary (Ensembl ID -> token id).")
            raise DataError(msg)
        ids.setdefault(int(tid), []).append(gene)
    shared = {t: g for t, g in ids.items() if len(g) > 1}
    if shared:
        t, genes = next(iter(shared.items()))
        msg = (f"token dictionary{where}: {len(shared)} id(s) are given to more than one entry, e.g. id {t} to "
               f"{genes[:3]}; each gene needs its own id. Pass the dictionary the model was trained with.")
        raise DataError(msg)
    if n_embeddings is not None:
        beyond = sorted(t for t in ids if t >= n_embeddings)
        if beyond:
            msg = (f"token dictionary{where}: {len(beyond)} id(s) are beyond the model's embedding of "
                   f"{n_embeddings} rows (largest {beyond[-1]}, for {ids[beyond[-1]][0]!r}); pass the dictionary "
                   "that belongs to this model.")
            raise DataError(msg)


def _n_embeddings(model) -> int | None:
    net = getattr(model, "model", model)  # an adapter passes its model
    get = getattr(net, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    n = getattr(emb, "num_embeddings", None)
    if n is None:
        n = getattr(getattr(net, "config", None), "vocab_size", None)
    return int(n) if n else None


def _strip_version(ids: np.ndarray) -> np.ndarray:
    return np.array([s.split(".", 1)[0] if _ENSEMBL.match(s) else s for s in ids], dtype=object)


def gene_ids(adata, gene_id_key: str | None = None) -> np.ndarray:
    """Ensembl IDs of `adata`'s genes: the var names when they are Ensembl IDs, else the var column `gene_id_key`
    (by default the first of ``ensembl_id``, ``gene_ids``, ``gene_id``, ... that holds Ensembl IDs)."""
    def looks_ensembl(v: np.ndarray) -> bool:
        sample = [s for s in v[:500] if s and s != "nan"]
        return bool(sample) and np.mean([bool(_ENSEMBL.match(s)) for s in sample]) > 0.5

    if gene_id_key is not None:
        if gene_id_key not in adata.var.columns:
            msg = (f"gene_id_key={gene_id_key!r} is not a column of adata.var; columns are "
                   f"{list(adata.var.columns)}. Pass the column with Ensembl IDs (Geneformer uses 'ensembl_id').")
            raise DataError(msg)
        ids = adata.var[gene_id_key].astype(str).to_numpy()
        if not looks_ensembl(ids):
            msg = (f"adata.var[{gene_id_key!r}] does not hold Ensembl IDs (e.g. {list(ids[:3])}); Geneformer's "
                   "dictionaries are keyed by Ensembl gene IDs (ENSG...).")
            raise DataError(msg)
        return ids
    names = np.asarray(adata.var_names, dtype=str)
    if looks_ensembl(names):
        return names
    for col in _ID_COLUMNS:
        if col in adata.var.columns:
            ids = adata.var[col].astype(str).to_numpy()
            if looks_ensembl(ids):
                logger.info("using adata.var[%r] as Ensembl gene IDs", col)
                return ids
    msg = (f"adata.var_names look like gene symbols (e.g. {list(names[:3])}) and no var column holds Ensembl IDs; "
           "Geneformer's dictionaries are keyed by Ensembl IDs. Add one (e.g. adata.var['ensembl_id'] from a "
           f"symbol -> Ensembl table) and pass gene_id_key=; columns now: {list(adata.var.columns)}.")
    raise DataError(msg)


# -- rank-value encoding ---------------------------------------------------------------------------------------
def rank_value_encode(X: sp.spmatrix | np.ndarray, token_ids: np.ndarray, medians: np.ndarray, *,
                      n_counts: np.ndarray | None = None, target_sum: float = 10_000.0, max_genes: int = 2048,
                      block_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Rank-value encode a (cells x genes) count matrix; returns ragged ``(indptr, tokens)``.

    Cell i's tokens are ``tokens[indptr[i]:indptr[i+1]]``: `token_ids` of its non-zero genes ordered by
    ``X / n_counts * target_sum / medians`` descending (ties by gene position), at most `max_genes` of them.
    `n_counts` defaults to the row sums of `X` (pass the cells' total counts when `X` holds only some genes).
    """
    X = sp.csr_matrix(X, dtype=np.float64)
    X.sum_duplicates()
    X.eliminate_zeros()
    n_cells, n_genes = X.shape
    token_ids = np.asarray(token_ids, dtype=np.int64)
    medians = np.asarray(medians, dtype=np.float64)
    if token_ids.shape != (n_genes,) or medians.shape != (n_genes,):
        msg = f"token_ids and medians need one entry per gene ({n_genes}); got {token_ids.shape}, {medians.shape}."
        raise ValueError(msg)
    if n_counts is None:
        n_counts = np.asarray(X.sum(1)).ravel()
    n_counts = np.asarray(n_counts, dtype=np.float64)
    lengths = np.minimum(np.diff(X.indptr), max_genes)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.empty(indptr[-1], dtype=np.int64)
    for s in range(0, n_cells, block_size):
        e = min(s + block_size, n_cells)
        lo, hi = X.indptr[s], X.indptr[e]
        cols = X.indices[lo:hi]
        counts = np.diff(X.indptr[s:e + 1])
        row = np.repeat(np.arange(e - s), counts)
        with np.errstate(divide="ignore", invalid="ignore"):
            val = X.data[lo:hi] / n_counts[s:e][row] * target_sum / medians[cols]
        order = np.lexsort((cols, -val, row))  # by cell, then value descending, then gene position
        rank = np.arange(hi - lo) - np.repeat(X.indptr[s:e] - lo, counts)
        keep = rank < max_genes  # rows stay in place under the sort, so rank is the within-cell rank
        tokens[indptr[s]:indptr[e]] = token_ids[cols[order][keep]]
    return indptr, tokens


@dataclass
class GeneformerTokens:
    """Rank-value encoded cells, flat: cell i owns ``tokens[indptr[i]:indptr[i+1]]`` (specials included)."""

    indptr: np.ndarray
    tokens: np.ndarray  # int64 token ids
    pad_token_id: int
    cls_token_id: int | None
    eos_token_id: int | None
    mask_token_id: int | None
    var_index: np.ndarray  # positions in adata.var of the genes used
    gene_ids: np.ndarray  # their Ensembl IDs
    symbols: np.ndarray  # their names in adata.var_names
    token_names: dict[int, str] = field(default_factory=dict)  # token id -> symbol (else Ensembl ID), specials
    model_input_size: int = DEFAULT_INPUT_SIZE

    @property
    def n_cells(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    @property
    def special_token_ids(self) -> set[int]:
        return {t for t in (self.pad_token_id, self.cls_token_id, self.eos_token_id, self.mask_token_id)
                if t is not None}

    def cell(self, i: int) -> np.ndarray:
        return self.tokens[self.indptr[i]:self.indptr[i + 1]]


def _model_input_size(model) -> int | None:
    if model is None:
        return None
    net = getattr(model, "model", model)  # an adapter passes its model
    size = getattr(getattr(net, "config", None), "max_position_embeddings", None)
    return int(size) if size else None


def tokenize_geneformer(adata, token_dictionary: str | os.PathLike | Mapping, gene_medians: str | os.PathLike
                        | Mapping, *, gene_id_key: str | None = None, layer: str | None = None,
                        model_input_size: int | None = None, model=None, special_tokens: bool | None = None,
                        n_counts_key: str | None = None, symbol_key: str | None = None,
                        target_sum: float = 10_000.0, block_size: int = 4096) -> GeneformerTokens:
    """Tokenise an AnnData of raw counts for a Geneformer-style model (rank-value encoding).

    Parameters
    ----------
    adata
        Cells x genes, raw counts in ``X`` or `layer`.
    token_dictionary
        Ensembl ID -> token id (with ``<pad>``, ``<mask>`` and, for V2, ``<cls>``, ``<eos>``); a dict, JSON or pickle.
    gene_medians
        Ensembl ID -> non-zero median of normalised expression over the reference corpus; a dict, JSON or pickle.
    gene_id_key
        var column with Ensembl IDs when ``adata.var_names`` are symbols (see `gene_ids`).
    layer
        Layer with raw counts; default ``X``.
    model_input_size
        Longest sequence, specials included; default the model's ``max_position_embeddings`` when `model` is
        given, else 2048.
    model
        The model (or its adapter), only to read ``max_position_embeddings``.
    special_tokens
        Add ``<cls>`` first and ``<eos>`` last (each when the dictionary has it); default: when it has ``<cls>``.
    n_counts_key
        obs column of total counts per cell (Geneformer's ``n_counts``); default: the sum over all genes of the
        counts matrix.
    symbol_key
        var column of gene symbols for `GeneformerTokens.token_names` (e.g. ``feature_name`` in CELLxGENE files);
        default ``adata.var_names``.
    target_sum
        Counts per cell after normalisation (10,000).

    Returns
    -------
    `GeneformerTokens`; feed it to `geneformer_batches`.

    Examples
    --------
    >>> tok = tokenize_geneformer(adata, "token_dictionary.pkl", "gene_median_dictionary.pkl", gene_id_key="ensembl_id")
    >>> batches = geneformer_batches(tok, batch_size=16)
    """
    from .tokenize import get_counts

    if adata.n_obs == 0 or adata.n_vars == 0:
        msg = f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)."
        raise DataError(msg)
    if symbol_key is not None and symbol_key not in adata.var.columns:
        msg = f"symbol_key={symbol_key!r} is not a column of adata.var; columns are {list(adata.var.columns)}."
        raise DataError(msg)
    vocab = read_gene_dictionary(token_dictionary, what="token dictionary")
    check_token_dictionary(vocab, None if model is None else _n_embeddings(model), source=token_dictionary)
    medians = read_gene_dictionary(gene_medians, what="gene-median dictionary")
    if "<pad>" not in vocab:
        msg = "the token dictionary has no '<pad>' entry; is it a Geneformer token dictionary?"
        raise DataError(msg)
    size = model_input_size or _model_input_size(model) or DEFAULT_INPUT_SIZE
    ids = _strip_version(gene_ids(adata, gene_id_key))
    med = np.array([float(medians.get(g, np.nan)) for g in ids])
    tid = np.array([int(vocab.get(g, -1)) if g not in SPECIAL_TOKENS else -1 for g in ids], dtype=np.int64)
    usable = (tid >= 0) & np.isfinite(med) & (med > 0)
    _, first = np.unique(ids, return_index=True)  # a duplicated ID counts once
    once = np.zeros(len(ids), dtype=bool)
    once[first] = True
    var_index = np.flatnonzero(usable & once)
    logger.info("%d of %d genes are in both the token and the median dictionary", len(var_index), len(ids))
    if len(var_index) == 0:
        msg = (f"none of the {len(ids)} genes (e.g. {list(ids[:3])}) is in both the token dictionary "
               f"({len(vocab)} entries, e.g. {list(vocab)[:3]}) and the gene-median dictionary ({len(medians)}).")
        raise DataError(msg)
    X_all = get_counts(adata, None, layer=layer)
    if n_counts_key is not None:
        if n_counts_key not in adata.obs.columns:
            msg = f"n_counts_key={n_counts_key!r} is not an obs column; columns are {list(adata.obs.columns)}."
            raise DataError(msg)
        n_counts = adata.obs[n_counts_key].to_numpy(dtype=np.float64)
    else:
        n_counts = np.asarray(X_all.sum(1), dtype=np.float64).ravel()
    add = ("<cls>" in vocab) if special_tokens is None else bool(special_tokens)
    cls_id = int(vocab["<cls>"]) if add and "<cls>" in vocab else None
    eos_id = int(vocab["<eos>"]) if add and "<eos>" in vocab else None
    n_special = (cls_id is not None) + (eos_id is not None)
    if size <= n_special:
        msg = f"model_input_size={size} leaves no room for genes next to {n_special} special token(s)."
        raise DataError(msg)
    X = X_all[:, var_index]
    gi, gt = rank_value_encode(X, tid[var_index], med[var_index], n_counts=n_counts, target_sum=target_sum,
                               max_genes=size - n_special, block_size=block_size)
    n_genes = np.diff(gi)
    if np.any(n_genes == 0):
        logger.warning("%d cells have no counts in any dictionary gene; they get no batch", int((n_genes == 0).sum()))
    if n_special:
        lengths = np.where(n_genes > 0, n_genes + n_special, 0)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.empty(indptr[-1], dtype=np.int64)
        starts, ends = indptr[:-1][n_genes > 0], indptr[1:][n_genes > 0]
        body = np.ones(len(tokens), dtype=bool)
        if cls_id is not None:
            tokens[starts] = cls_id
            body[starts] = False
        if eos_id is not None:
            tokens[ends - 1] = eos_id
            body[ends - 1] = False
        tokens[body] = gt
    else:
        indptr, tokens = gi, gt
    names = {int(v): str(k) for k, v in vocab.items()}
    all_symbols = adata.var_names if symbol_key is None else adata.var[symbol_key].astype(str)
    symbols = np.asarray(all_symbols, dtype=str)[var_index]
    names.update({int(t): str(s) for t, s in zip(tid[var_index], symbols)})
    return GeneformerTokens(indptr, tokens, int(vocab["<pad>"]), cls_id, eos_id,
                            int(vocab["<mask>"]) if "<mask>" in vocab else None, var_index,
                            np.asarray(ids[var_index], dtype=str), symbols, names, int(size))


# -- batches ---------------------------------------------------------------------------------------------------
class CellBatch(dict):
    """A dict of forward kwargs (``input_ids``, ``attention_mask``, maybe ``labels``) that knows its cells.

    ``model(**batch)`` works as for any tokenizer output; ``batch.cells`` holds the global cell index of each row,
    which the adapters read so that statistics and results land on the right cells.
    """

    def __init__(self, *args, cells: np.ndarray | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.cells = None if cells is None else np.asarray(cells, dtype=np.int64)

    def __repr__(self) -> str:
        shapes = {k: tuple(getattr(v, "shape", ())) for k, v in self.items()}
        n = None if self.cells is None else len(self.cells)
        return f"CellBatch({shapes}, cells={n})"


def _bucket(lengths: np.ndarray, batch_size: int, cells: np.ndarray, shuffle: bool, seed: int) -> list[np.ndarray]:
    from .batches import bucket_batches

    return bucket_batches(lengths, batch_size, shuffle=shuffle, seed=seed, cells=cells)


def geneformer_batches(tok: GeneformerTokens, batch_size: int = 16, *, cells: Sequence[int] | None = None,
                       shuffle: bool = False, seed: int = 0, mask_ratio: float | None = None) -> list[CellBatch]:
    """Length-bucketed `CellBatch`es (``input_ids``, ``attention_mask``; right padding with ``<pad>``).

    Cells without tokens are left out. With `mask_ratio`, the batches are masked by `mask_batches` (seeded) and
    carry ``labels``.
    """
    import torch

    lengths = tok.lengths
    cells = np.arange(tok.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)
    cells = cells[lengths[cells] > 0]
    if len(cells) == 0:
        msg = "no cell has any token: nothing to batch."
        raise DataError(msg)
    out = []
    for idx in _bucket(lengths, batch_size, cells, shuffle, seed):
        lens = lengths[idx]
        B, L = len(idx), int(lens.max())
        ids = np.full((B, L), tok.pad_token_id, dtype=np.int64)
        pos = np.arange(L)[None, :] < lens[:, None]  # (B, L) True on tokens
        starts = tok.indptr[idx]
        flat = np.repeat(starts, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))
        ids[pos] = tok.tokens[flat]
        out.append(CellBatch(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(pos.astype(np.int64)),
                             cells=idx))
    if mask_ratio:
        if tok.mask_token_id is None:
            msg = "the token dictionary has no '<mask>' token; masking needs one."
            raise DataError(msg)
        out = mask_batches(out, mask_token_id=tok.mask_token_id, special_token_ids=tok.special_token_ids,
                           mask_ratio=mask_ratio, seed=seed)
    return out


def mask_batches(batches: Iterable[Mapping], *, mask_token_id: int, special_token_ids: Iterable[int] = (),
                 mask_ratio: float = 0.15, seed: int = 0) -> list[CellBatch]:
    """Masked-LM versions of `batches`: ``input_ids`` with ``<mask>`` at the chosen positions, ``labels`` holding
    the original ids there and -100 elsewhere (the transformers convention).

    Per sequence, ``max(1, round(mask_ratio x n))`` of its n eligible tokens (not padding, not special) are chosen
    without replacement, from a generator seeded by `seed` and the batch's position, so the same batches always
    get the same masks and every edit condition is scored on the same tokens.
    """
    import torch

    if not 0.0 < mask_ratio < 1.0:
        msg = f"mask_ratio must be in (0, 1), got {mask_ratio}."
        raise ValueError(msg)
    specials = torch.tensor(sorted(int(i) for i in special_token_ids), dtype=torch.long)
    out = []
    for i, b in enumerate(batches):
        ids = torch.as_tensor(np.asarray(b["input_ids"])) if not isinstance(b["input_ids"], torch.Tensor) \
            else b["input_ids"]
        ids = ids[None] if ids.dim() == 1 else ids
        am = b.get("attention_mask")
        eligible = ~torch.isin(ids, specials) & ids.ne(mask_token_id)
        if am is not None:
            am_t = torch.as_tensor(np.asarray(am)) if not isinstance(am, torch.Tensor) else am
            eligible &= am_t.reshape(ids.shape).bool()
        n = eligible.sum(1)
        k = torch.where(n > 0, torch.clamp((n.double() * mask_ratio).round().long(), min=1), torch.zeros_like(n))
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        scores = torch.rand(ids.shape, generator=gen).masked_fill(~eligible, 2.0)
        rank = scores.argsort(1).argsort(1)
        chosen = rank < k[:, None]
        labels = torch.full_like(ids, -100)
        labels[chosen] = ids[chosen]
        new = CellBatch(b, cells=getattr(b, "cells", None))
        new["input_ids"] = ids.masked_fill(chosen, mask_token_id)
        new["labels"] = labels
        out.append(new)
    return out


__all__ = ["CellBatch", "GeneformerTokens", "SPECIAL_TOKENS", "gene_ids", "geneformer_batches", "mask_batches",
           "rank_value_encode", "read_gene_dictionary", "tokenize_geneformer"]
