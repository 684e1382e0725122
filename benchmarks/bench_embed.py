"""Cell-embedding speed and agreement: our vectorised path against the official scGPT 0.2.4 `embed_data`.

The 466 Darmanis et al. (2015) cells are embedded with one randomly initialised 4-layer, d=64 scGPT (vocab = the
file's genes + <pad>/<cls>/<eoc>), saved once in the official format (flash-attention key names) so that both sides
read the same weights:

(a) ours: `load_model` -> `tokenize_anndata` -> `runners.scgpt.embed(model, tok, batch_size=64)`;
(b) official: `scgpt.tasks.embed_data(..., use_fast_transformer=False)`, which loads the same directory with the
    official loader and runs `get_batch_cell_embeddings` (timed on its own too).

Both bin and subsample at random (ties, cells with > 1199 genes), so the embeddings agree closely, not exactly; the
median cosine between each cell's two embeddings is printed next to two yardsticks: our path run again with another
seed, and different cells (what this random model gives unrelated inputs); raw and without the mean embedding.
The official package needs the torchtext stand-in in tests/_official (put on sys.path for its import only).

Usage: python benchmarks/bench_embed.py [--official-cells N] [--threads T]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import torch

import scsuperweight as ssw
from scsuperweight.data import tokenize_anndata
from scsuperweight.models import ScGPTConfig, ScGPTModel, save_scgpt
from scsuperweight.runners.scgpt import embed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "darmanis2015_GSE67835.h5ad"
STANDIN = ROOT / "tests" / "_official"


def import_official():
    sys.path.insert(0, str(STANDIN))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import scgpt.tasks.cell_emb as cell_emb
    finally:
        sys.path.remove(str(STANDIN))
        for name in [m for m in sys.modules if m == "torchtext" or m.startswith("torchtext.")]:
            del sys.modules[name]
    return cell_emb


def build_model(genes, seed: int = 0) -> ScGPTModel:
    vocab = {g: i for i, g in enumerate([*genes, "<pad>", "<cls>", "<eoc>"])}
    torch.manual_seed(seed)
    config = ScGPTConfig(ntoken=len(vocab), d_model=64, nhead=4, d_hid=128, nlayers=4, dropout=0.0,
                         pad_token_id=vocab["<pad>"])
    return ScGPTModel(config, vocab=vocab, args={"max_seq_len": 1200}).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--official-cells", type=int, default=None,
                        help="embed only the first N cells with the official code (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both paths")
    parser.add_argument("--batch-size", type=int, default=64)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)

    adata = ad.read_h5ad(opts.data)
    n = adata.n_obs
    print(f"data: {opts.data.name}, {n} cells x {adata.n_vars} genes; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    model = build_model(adata.var_names.tolist())
    workdir = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    model_dir = save_scgpt(model, workdir / "model")  # official format, Wqkv keys
    c = model.config
    print(f"model: scGPT {c.nlayers} layers, d={c.d_model}, {c.nhead} heads, d_hid={c.d_hid}, "
          f"vocab {c.ntoken}; random init; saved in official format (Wqkv keys) to a temporary directory")

    # (a) ours, end to end from the directory
    t0 = time.perf_counter()
    ours_model = ssw.load_model(model_dir)
    t1 = time.perf_counter()
    tok = tokenize_anndata(adata, ours_model.vocab, max_seq_len=1200, seed=0)
    t2 = time.perf_counter()
    ours = embed(ours_model, tok, batch_size=opts.batch_size)
    t3 = time.perf_counter()
    ours_total = t3 - t0
    print(f"\n(a) ours, all {n} cells: load {t1 - t0:.2f} s + tokenize {t2 - t1:.2f} s + embed {t3 - t2:.2f} s "
          f"= {ours_total:.2f} s -> {n / ours_total:.1f} cells/s (mean {tok.lengths.mean():.0f} tokens/cell)")

    # (b) official
    cell_emb = import_official()
    m = n if opts.official_cells is None else min(opts.official_cells, n)
    sub = adata[:m].copy()
    inner = {}
    original = cell_emb.get_batch_cell_embeddings

    def timed(*args, **kwargs):  # embed_data looks the function up in its module at call time
        s = time.perf_counter()
        out = original(*args, **kwargs)
        inner["s"] = time.perf_counter() - s
        return out

    cell_emb.get_batch_cell_embeddings = timed
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            res = cell_emb.embed_data(sub, model_dir, gene_col="index", max_length=1200,
                                      batch_size=opts.batch_size, device="cpu", use_fast_transformer=False,
                                      return_new_adata=True)
            official_total = time.perf_counter() - t0
    finally:
        cell_emb.get_batch_cell_embeddings = original
    official = np.asarray(res.X, dtype=np.float32)
    what = "all" if m == n else f"the first {m} of"
    print(f"(b) official embed_data, {what} {n} cells: {official_total:.2f} s end to end "
          f"({inner['s']:.2f} s in get_batch_cell_embeddings) -> {m / official_total:.1f} cells/s "
          f"({m / inner['s']:.1f} cells/s embedding only)")

    ratio = (n / ours_total) / (m / official_total)
    ratio_inner = ((n / (t3 - t2)) / (m / inner["s"]))
    print(f"\nspeed ratio (cells/s, ours / official): {ratio:.1f}x end to end, {ratio_inner:.1f}x embedding step "
          "only (ours: embed; official: get_batch_cell_embeddings, which also bins and pads)")

    # the yardstick: our own path again with another seed (other tie splits, other gene subsamples)
    reseeded = embed(ours_model, tokenize_anndata(sub, ours_model.vocab, max_seq_len=1200, seed=1),
                     batch_size=opts.batch_size)
    other = (np.arange(m) + np.random.default_rng(0).integers(1, m, m)) % m  # a different cell for each
    mu = (ours[:m].mean(0) + official.mean(0)) / 2
    print(f"\ncosine over {m} cells, median (5th percentile)   raw               without the mean embedding")
    for label, x, y in (("ours vs official, same cell", ours[:m], official),
                        ("ours seed 0 vs ours seed 1, same cell", ours[:m], reseeded),
                        ("ours vs official, different cells", ours[:m], official[other])):
        # a random model maps every cell near one direction, so also compare what distinguishes cells
        xc, yc = x - mu, y - mu
        raw = np.sum(x * y, axis=1)  # both sides are L2-normalised
        cen = np.sum(xc * yc, axis=1) / np.linalg.norm(xc, axis=1) / np.linalg.norm(yc, axis=1)
        print(f"  {label:<40} {np.median(raw):.4f} ({np.percentile(raw, 5):.4f})   "
              f"{np.median(cen):.4f} ({np.percentile(cen, 5):.4f})")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
