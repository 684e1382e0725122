"""Atlas-scale steps over a `Source`: embed into a resumable store, read a design-respecting sample, on N processes.

The `tl` functions and the CLI call these when the data is a file, a folder or glob of per-donor files, or a
backed AnnData: counts are read and tokenised one chunk at a time (tokens are drawn per cell, so a chunk's tokens
do not depend on the chunking), the scan and prune read only a stratified sample drawn from obs, and under
torchrun the work is split across ranks with rank 0 writing every output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import _keys as K
from . import dist
from ._log import logger
from .data.sources import Source, is_soma, open_source, stratified_sample
from .embedstore import EmbeddingStore, trim_heap
from .errors import DataError
from .progress import Progress

DEFAULT_BLOCK = 2048  # cells per store block: the unit of work, of writing, and of what a crash can lose


def is_streamed(data) -> bool:
    """True when `data` is read from disk in chunks (a path, a glob, a folder, a backed AnnData, a TileDB-SOMA
    experiment or a Source)."""
    if isinstance(data, Source | str | Path) or is_soma(data):
        return True
    return bool(getattr(data, "isbacked", False))


LOG_EACH_FILE = 8  # up to this many files get a log line each; more get one summary line


def gene_overlap(source: Source, model, gene_key: str | None = None) -> list[dict]:
    """Per file: cells, genes, and genes the model's vocab knows (plain values for params and run.json).

    Counted for a model with an scGPT vocab; a BERT-family model matches genes through its own rules (Ensembl IDs
    found in a var column, versions stripped; its tokeniser logs the count), so ``n_shared`` is None there.
    """
    vocab = getattr(model, "vocab", None)
    table = source.genes_shared_with(vocab or {}, gene_key=gene_key if vocab is not None else None)
    rows = [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in table.to_dict("records")]
    if vocab is None:
        for r in rows:
            r["n_shared"] = r["fraction"] = None
    return rows


def file_overlap(data, model, gene_key: str | None = None) -> list[dict]:
    """How many genes each file shares with the model's vocab: logged, checked, and returned for the record.

    The one source of every command's ``gene_overlap`` (run.json, and the step's params): a list of ``{file,
    n_cells, n_genes, n_shared, fraction}``. A file sharing too few genes (`scsuperweight.data.tokenize.
    too_few_genes`, the tokeniser's own rule) is refused now, in one line naming the file and the fix, before any
    cell is read. `data`: a `Source`, anything `open_source` opens, or a sample read by `sample` (its files'
    record, made when it was drawn, is returned as is).
    """
    from .data.tokenize import too_few_genes, too_few_genes_message

    stored = _stored_overlap(data)
    if stored is not None:
        return stored
    source = open_source(data)
    rows = gene_overlap(source, model, gene_key)
    known = [r for r in rows if r["n_shared"] is not None]
    if len(known) <= LOG_EACH_FILE:
        for r in known:
            logger.info("%s: %d of %d genes in the vocab (%.1f%%)", r["file"], r["n_shared"], r["n_genes"],
                        100 * r["fraction"])
    else:
        shared = np.array([r["n_shared"] for r in known])
        fewest = sorted(known, key=lambda r: r["n_shared"])[:3]
        logger.info("%d files share %d to %d genes with the vocab (median %d); fewest: %s", len(known),
                    shared.min(), shared.max(), int(np.median(shared)),
                    ", ".join(f"{r['file']} ({r['n_shared']})" for r in fewest))
    for r, f in zip(rows, source.files, strict=True):
        if r["n_shared"] is not None and too_few_genes(r["n_shared"], r["n_genes"]):
            names = f.var.index if gene_key is None else f.var[gene_key]
            on_disk = f.adata is None
            fix = (" Pass gene_key= (--gene-key) a var column of gene symbols the vocab knows, or move this file "
                   "out of the data." if on_disk else "")
            raise DataError(too_few_genes_message(r["n_shared"], names, where=f"{r['file']}: " if on_disk else "",
                                                  fix=fix))
    return rows


def _stored_overlap(data) -> list[dict] | None:
    """The record a sample carries (`read_sample`), or None."""
    uns = getattr(data, "uns", None)
    text = uns.get(K.UNS_SOURCE, {}).get("gene_overlap") if uns is not None else None
    return None if text is None else json.loads(str(text))


def source_hash(source) -> str:
    """A hash of a Source cheap enough for an atlas: obs names, and per file its label, genes and size in bytes
    (the counts themselves are not read: a file rewritten with other counts but the same size and names is
    not told apart)."""
    h = hashlib.sha256()
    h.update("\n".join(map(str, source.obs_names)).encode())
    for f in source.files:
        h.update(f"\0{f.label}\0{f.n_obs}\0".encode())
        h.update("\n".join(map(str, f.var.index)).encode())
        if f.path is not None:
            h.update(str(Path(f.path).stat().st_size).encode())
    return h.hexdigest()


def read_sample(source: Source, cells: np.ndarray, *, overlap: list[dict] | None = None):
    """The chosen cells as one in-memory AnnData: obs from the source, genes the union over their files (a gene a
    file lacks counts 0 there, so each cell is tokenised with its own file's genes). Only these rows are read.
    `overlap` (`file_overlap`'s record of the source) travels with the sample, for the steps' records."""
    import anndata as ad

    parts = [chunk for _, chunk in source.read(cells)]
    if not parts:
        msg = "the sample is empty: no cell passed the sampling caps; loosen max_per_label / max_cells."
        raise DataError(msg)
    adata = parts[0] if len(parts) == 1 else ad.concat(parts, join="outer", fill_value=0, merge="first")
    adata.obs = source.obs.iloc[np.sort(np.asarray(cells))].copy()
    adata.uns[K.UNS_SOURCE] = {"sha256": source_hash(source), "n_cells": int(source.n_obs),
                               "files": [f.label for f in source.files]}
    if overlap is not None:  # JSON: a list of records is not an h5ad element
        adata.uns[K.UNS_SOURCE]["gene_overlap"] = json.dumps(overlap)
    return adata


def sample(data, *, label_key: str | None = None, donor_key: str | None = None, condition_key: str | None = None,
           max_per_label: int | str | None = None, max_per_donor: int | None = None,
           max_per_condition: int | None = None, max_cells: int | None = None, seed: int = 0,
           layer: str | None = None, model=None, gene_key: str | None = None):
    """A stratified sample drawn from obs alone (`stratified_sample`), then read: (AnnData of the sample, cells).

    `cells` are the sample's global indices in the source. Nothing but obs and the sampled rows is read.
    ``max_per_label="share"`` shares `max_cells` equally among the labels (the scan's balance). With `model`,
    each file's genes are matched to its vocab first (`file_overlap`: a file sharing too few is refused before
    a row is read) and the record travels with the sample.
    """
    source = open_source(data, layer=layer)
    overlap = None if model is None else file_overlap(source, model, gene_key)
    if max_per_label == "share":  # the scan's balance: max_cells shared equally by the labels
        max_per_label = per_label_cap(source.obs, label_key, max_cells)
    cells = stratified_sample(source.obs, label_key, donor_key, condition_key, max_per_label=max_per_label,
                              max_per_donor=max_per_donor, max_per_condition=max_per_condition,
                              max_cells=max_cells, seed=seed)
    logger.info("sampled %d of %d cells from obs (caps: label %s, donor %s, condition %s, all %s)", len(cells),
                source.n_obs, max_per_label, max_per_donor, max_per_condition, max_cells)
    return read_sample(source, cells, overlap=overlap), cells


def per_label_cap(obs, label_key: str | None, max_cells: int | None) -> int | None:
    """The scan's label balance: `max_cells` shared equally by the labels (as `tl.scan` does in memory)."""
    if label_key is None or max_cells is None:
        return None
    if label_key not in obs.columns:
        msg = f"label_key={label_key!r} is not a column of adata.obs; columns are {list(obs.columns)}."
        raise DataError(msg)
    return max(1, max_cells // max(obs[label_key].nunique(), 1))


def embed_anndata(data, model, store, *, key_added: str = "X_scGPT", **kwargs):
    """`embed_store`, then the store as an AnnData (obs of every cell, ``obsm[key_added]``) written to
    ``store/embeddings.h5ad`` and read back: what `tl.embed` returns for data on disk."""
    import anndata as ad

    st = embed_store(data, model, store, **kwargs)
    ctx = kwargs.get("ctx") or dist.context()
    path = dist.on_rank0(ctx, finalize_store, st, data, None, key_added=key_added, layer=kwargs.get("layer"),
                         params={**{k: kwargs.get(k) for k in ("gene_key", "layer", "batch_size", "max_seq_len",
                                                                "seed", "block_size")},
                                 "gene_overlap": st.gene_overlap})
    path = dist.gather_objects(path, ctx)[0]
    return ad.read_h5ad(path)


def store_key(model, params: dict) -> str:
    """What an embedding store must match to be resumed: the model's weights and the tokenisation parameters."""
    from .pipeline import model_hash

    text = json.dumps({"model": model_hash(model), **params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def embed_store(data, model, store, *, gene_key: str | None = None, layer: str | None = None,
                batch_size: int = 64, max_seq_len: int | None = None, seed: int = 0,
                block_size: int = DEFAULT_BLOCK, token_dictionary=None, gene_medians=None,
                symbol_key: str | None = None, ctx: dist.DistContext | None = None, progress: bool = True,
                writer: Callable[[dict], None] | None = None) -> EmbeddingStore:
    """Embed every cell of `data` into the on-disk store `store`, block by block; resumes a killed run.

    A block is read, tokenised and embedded on its own (never all cells' counts or tokens at once), written with
    its finished marker, and skipped by a later call with the same data, model and parameters: a run killed at
    any point loses at most the blocks in flight, and the resumed store is identical to an uninterrupted one.
    With several processes (`ctx`, torchrun) each round gives every rank one pending block; rank 0 gathers and
    writes them (the embeddings do not depend on which rank computed a block). `writer` receives the progress
    record (e.g. `scsuperweight.results.RunLog.progress`). Returns the store; ``store.finalize(obs, out)`` writes
    the .h5ad.
    """
    from . import tl

    ctx = ctx or dist.context()
    model = tl._resolve_model(model)
    runner, described = tl._runner(model, "embed", token_dictionary=token_dictionary, gene_medians=gene_medians,
                                   symbol_key=symbol_key)
    source = open_source(data, layer=layer)
    overlap = dist.on_rank0(ctx, file_overlap, source, model, gene_key)  # a file sharing too few: refused now
    params = dict(gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed, batch_size=batch_size,
                  family=runner.family, **described)
    key = dist.gather_objects(store_key(model, params) if ctx.is_main else None, ctx)[0]
    # rank 0 makes (or checks) the store first; the others then only read its layout
    st = dist.on_rank0(ctx, EmbeddingStore, store, source.obs_names, block_size=block_size, key=key)
    if not ctx.is_main:
        st = EmbeddingStore(store, source.obs_names, block_size=block_size, key=key)
    pending = dist.gather_objects(st.pending() if ctx.is_main else None, ctx)[0]

    def embed_block(b: int) -> np.ndarray:
        parts = []
        sl = st.block(b)
        for _, chunk in source.iter_chunks(np.arange(sl.start, sl.stop), chunk_size=block_size):
            inputs = runner.prepare(chunk, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                                    batch_size=batch_size)
            parts.append(np.asarray(runner.embed(inputs), dtype=np.float32))
        return np.concatenate(parts)  # iter_chunks yields a block's cells in order

    bar = Progress(st.n_blocks, initial=st.n_blocks - len(pending), desc="embed", unit="block", enabled=progress,
                   is_main=ctx.is_main, writer=writer)
    def after(blocks: list[int]) -> None:
        trim_heap()  # freed block buffers back to the OS: without it a long run's RSS grows block by block
        bar.update(len(blocks), block=int(blocks[-1]))

    with bar:
        dist.run_in_rounds(pending, embed_block, st.write, ctx, after=after)
    st.gene_overlap = overlap
    return st


def finalize_store(st: EmbeddingStore, data, out=None, *, key_added: str = "X_scGPT", layer: str | None = None,
                   params: dict | None = None) -> Path:
    """Write the finished store as an .h5ad: obs of every cell, ``obsm[key_added]``, and `params` (with the per-file
    gene overlap) under ``uns["ssw"]["params"]["embed"]`` as `tl.embed` records them."""
    obs = open_source(data, layer=layer).obs
    uns = None if params is None else {"ssw": {"params": {"embed": json.dumps(params, sort_keys=True, default=str)}}}
    return st.finalize(obs, out, key_added=key_added, uns=uns)
