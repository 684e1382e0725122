"""The command line at atlas scale: `embed` into a resumable store, --data as a folder or glob, torchrun ranks.

`scsuperweight embed --data ATLAS --out STORE` reads ATLAS (one .h5ad, a folder or glob of per-donor .h5ad files)
block by block into STORE (a folder: zarr blocks, run.json, and embeddings.h5ad at the end; or ``--out X.h5ad``,
the store then being scratch space next to it, removed once X.h5ad is written). Killed, the same command resumes.
The step commands (scan, prune, run) read a large file, a folder or a glob as a sample drawn from obs alone.
Under ``torchrun --nproc-per-node N -m scsuperweight ...`` every rank runs the command, the work is split across
ranks, and only rank 0 writes and prints.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from . import dist
from . import results as R
from .errors import SSWError

STREAM_ABOVE_BYTES = 2 << 30  # a single .h5ad larger than this is sampled from disk rather than read whole


def add_embed_args(p) -> None:
    p.add_argument("--block-size", type=int, default=2048,
                   help="cells per store block: the unit of work, of writing and of what a kill can lose "
                        "(default 2048)")
    p.add_argument("--h5ad", default=None, help="also write the embeddings to this .h5ad (default: STORE/"
                                                "embeddings.h5ad; with --out X.h5ad, X.h5ad)")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest input (default: the model's)")


def streamed(path) -> bool:
    """Is `path` read from disk as a sample (a folder, a glob, or a single file above STREAM_ABOVE_BYTES)?"""
    p = Path(str(path))
    if any(c in str(path) for c in "*?[") or p.is_dir():
        return True
    return p.is_file() and p.stat().st_size > STREAM_ABOVE_BYTES


def cmd_embed(args, say_fn) -> int:
    from . import atlas
    from .loading import load_model

    ctx = dist.context()
    out = Path(args.out)
    scratch = out.suffix == ".h5ad"
    store = out.with_name(f".{out.name}.store") if scratch else out
    final = Path(args.h5ad) if args.h5ad else (out if scratch else store / "embeddings.h5ad")
    if ctx.is_main and not Path(args.data).exists() and not any(c in args.data for c in "*?["):
        raise SSWError(f"data file not found: {args.data}")
    model = load_model(args.model, device=args.device or (ctx.device if ctx.backend == "nccl" else None))
    from .data.sources import open_source

    source = open_source(args.data, layer=args.layer)
    log = None
    if ctx.is_main:
        store.mkdir(parents=True, exist_ok=True)
        log = R.RunLog.resume(store, {"command": "embed", "data": {"path": str(args.data), "n_cells": source.n_obs,
                                                                  "sha256": atlas.source_hash(source)},
                                      "world_size": ctx.world})
    t0 = time.perf_counter()
    gf = {k: getattr(args, k) for k in ("token_dictionary", "gene_medians", "symbol_key")
          if getattr(args, k, None) is not None}
    st = atlas.embed_store(source, model, store, gene_key=args.gene_key, layer=args.layer,
                           batch_size=args.batch_size, max_seq_len=args.max_seq_len, seed=args.seed,
                           block_size=args.block_size, ctx=ctx, progress=not args.no_progress,
                           writer=None if log is None else log.progress, **gf)
    if ctx.is_main:
        params = dict(gene_key=args.gene_key, layer=args.layer, batch_size=args.batch_size, seed=args.seed,
                      max_seq_len=args.max_seq_len, block_size=args.block_size, gene_overlap=st.gene_overlap,
                      data=str(args.data), model=str(args.model))
        log.info["params"] = params
        log.info["gene_overlap"] = st.gene_overlap
        path = atlas.finalize_store(st, source, final, params=params)
        log.info["status"] = "done"
        log.step("embed", time.perf_counter() - t0)
        if scratch:
            shutil.rmtree(store)
        for o in st.gene_overlap:
            say_fn(f"  {o['file']}: {o['n_shared']} of {o['n_genes']} genes in the vocab")
        say_fn(f"wrote obsm['X_scGPT'] for {st.n} cells to {path}")
    dist.check(ctx)
    return 0
