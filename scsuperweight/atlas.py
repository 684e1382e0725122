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

from . import dist
from ._log import logger
from .data.sources import Source, open_source, stratified_sample
from .embedstore import EmbeddingStore
from .errors import DataError
from .progress import Progress

DEFAULT_BLOCK = 2048  # cells per store block: the unit of work, of writing, and of what a crash can lose


def is_streamed(data) -> bool:
    """True when `data` is read from disk in chunks (a path, a glob, a folder, a backed AnnData or a Source)."""
    if isinstance(data, Source | str | Path):
        return True
    return bool(getattr(data, "isbacked", False))


def gene_overlap(source: Source, model, gene_key: str | None = None) -> list[dict]:
    """Per file: cells, genes, and genes the model's vocab knows (plain values for params and run.json)."""
    vocab = getattr(model, "vocab", None)
    if vocab is None:  # a BERT-family model reads genes through its token dictionary (Ensembl IDs)
        from .adapters import get_adapter

        dicts = get_adapter(model).gene_dictionaries or {}
        vocab = dicts.get("token_dictionary") or {}
    table = source.genes_shared_with(vocab, gene_key=gene_key)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in table.to_dict("records")]


def read_sample(source: Source, cells: np.ndarray):
    """The chosen cells as one in-memory AnnData: obs from the source, genes the union over their files (a gene a
    file lacks counts 0 there, so each cell is tokenised with its own file's genes). Only these rows are read."""
    import anndata as ad

    parts = [chunk for _, chunk in source.read(cells)]
    if not parts:
        msg = "the sample is empty: no cell passed the sampling caps; loosen max_per_label / max_cells."
        raise DataError(msg)
    adata = parts[0] if len(parts) == 1 else ad.concat(parts, join="outer", fill_value=0, merge="first")
    adata.obs = source.obs.iloc[np.sort(np.asarray(cells))].copy()
    return adata


def sample(data, *, label_key: str | None = None, donor_key: str | None = None, condition_key: str | None = None,
           max_per_label: int | None = None, max_per_donor: int | None = None,
           max_per_condition: int | None = None, max_cells: int | None = None, seed: int = 0,
           layer: str | None = None):
    """A stratified sample drawn from obs alone (`stratified_sample`), then read: (AnnData of the sample, cells).

    `cells` are the sample's global indices in the source. Nothing but obs and the sampled rows is read.
    """
    source = open_source(data, layer=layer)
    cells = stratified_sample(source.obs, label_key, donor_key, condition_key, max_per_label=max_per_label,
                              max_per_donor=max_per_donor, max_per_condition=max_per_condition,
                              max_cells=max_cells, seed=seed)
    logger.info("sampled %d of %d cells from obs (caps: label %s, donor %s, condition %s, all %s)", len(cells),
                source.n_obs, max_per_label, max_per_donor, max_per_condition, max_cells)
    return read_sample(source, cells), cells


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
    family = tl._family(model, "embed")
    dicts = tl._gene_dictionaries(model, token_dictionary, gene_medians, symbol_key, "embed") \
        if family == "bert" else None
    source = open_source(data, layer=layer)
    params = dict(gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed, batch_size=batch_size,
                  family=family, **tl._dict_params(dicts))
    key = dist.gather_objects(store_key(model, params) if ctx.is_main else None, ctx)[0]
    # rank 0 makes (or checks) the store first; the others then only read its layout
    st = dist.on_rank0(ctx, EmbeddingStore, store, source.obs_names, block_size=block_size, key=key)
    if not ctx.is_main:
        st = EmbeddingStore(store, source.obs_names, block_size=block_size, key=key)
    pending = dist.gather_objects(st.pending() if ctx.is_main else None, ctx)[0]
    overlap = gene_overlap(source, model, gene_key) if ctx.is_main else None

    def embed_block(b: int) -> np.ndarray:
        parts = []
        for _, chunk in source.iter_chunks(np.arange(st.n)[st.block(b)], chunk_size=block_size):
            tok = tl._tokenize(chunk, model, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                               dictionaries=dicts)
            parts.append(np.asarray(tl._embed_cells(model, tok, batch_size=batch_size), dtype=np.float32))
        return np.concatenate(parts)  # iter_chunks yields a block's cells in order

    bar = Progress(st.n_blocks, initial=st.n_blocks - len(pending), desc="embed", unit="block", enabled=progress,
                   is_main=ctx.is_main, writer=writer)
    with bar:
        dist.run_in_rounds(pending, embed_block, st.write, ctx,
                           after=lambda blocks: bar.update(len(blocks), block=int(blocks[-1])))
    st.gene_overlap = overlap
    return st


def finalize_store(st: EmbeddingStore, data, out=None, *, key_added: str = "X_scGPT", layer: str | None = None,
                   params: dict | None = None) -> Path:
    """Write the finished store as an .h5ad: obs of every cell, ``obsm[key_added]``, and `params` (with the per-file
    gene overlap) under ``uns["ssw"]["params"]["embed"]`` as `tl.embed` records them."""
    obs = open_source(data, layer=layer).obs
    uns = None if params is None else {"ssw": {"params": {"embed": json.dumps(params, sort_keys=True, default=str)}}}
    return st.finalize(obs, out, key_added=key_added, uns=uns)
