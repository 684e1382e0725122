"""Atlas scale: peak memory and speed of chunked embedding from per-donor files, small atlas vs one 10x larger.

A synthetic atlas (`datasets.synthetic_ad`, written as per-donor .h5ad files, 20 donors) of 20,000 and 200,000
cells (``--quick``: 2,000 and 20,000) is embedded with the demo model through `open_source` -> `embed_to_store`
(blocks of ``--block`` cells, zarr store, .h5ad at the end). Each size runs in its own process, so its peak RSS
(`ru_maxrss`) is its own. Streaming works when the large atlas's peak is about the small one's (aim <= 1.2x): what
grows with the cells is obs (names, a few columns) and the final obsm, not the counts or the tokens.

Usage: python benchmarks/bench_atlas.py [--quick] [--block 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_DONORS = 20


def write_atlas(folder: Path, n_cells: int) -> None:
    """Per-donor files: `synthetic_ad` makes donor pairs (it needs an AD and a control donor), split by donor."""
    from scsuperweight.datasets import synthetic_ad

    folder.mkdir(parents=True, exist_ok=True)
    per_pair = 2 * n_cells // N_DONORS
    for p in range(N_DONORS // 2):
        a = synthetic_ad(n_cells=per_pair, n_donors=2, seed=p)
        a.obs_names = [f"p{p}_{n}" for n in a.obs_names]
        for k, donor in enumerate(a.obs["donor"].cat.categories):
            part = a[a.obs["donor"] == donor].copy()
            part.uns = {}
            part.obs["donor"] = f"D{2 * p + k:02d}"
            part.write_h5ad(folder / f"donor{2 * p + k:02d}.h5ad")


def child(folder: str, store: str, block: int, threads: int, max_seq_len: int | None) -> None:
    """Embed the atlas into a store; print cells, seconds and this process's peak RSS as JSON."""
    import numpy as np
    import torch

    from scsuperweight import tl
    from scsuperweight.data.sources import open_source
    from scsuperweight.embedstore import EmbeddingStore, embed_to_store
    from scsuperweight.loading import load_model

    torch.set_num_threads(threads)
    model = load_model("demo")

    def embed_fn(chunk):
        tl.embed(chunk, model, progress=False, max_seq_len=max_seq_len)
        return np.asarray(chunk.obsm["X_scGPT"])

    t0 = time.perf_counter()
    src = open_source(folder)
    st = EmbeddingStore(store, src.obs_names, block_size=block)
    embed_to_store(src, embed_fn, st)
    st.finalize(src.obs)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"cells": src.n_obs, "seconds": seconds, "peak_rss_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 and 20,000 cells instead of 20,000 and 200,000")
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="shorter inputs for a faster run (--quick: 64); memory is what this measures")
    ap.add_argument("--child", nargs=2, metavar=("ATLAS", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.block, args.threads, args.max_seq_len)
        return
    sizes = (2_000, 20_000) if args.quick else (20_000, 200_000)
    max_len = args.max_seq_len or (64 if args.quick else None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            folder = Path(tmp) / f"atlas{n}"
            t0 = time.perf_counter()
            write_atlas(folder, n)
            written = time.perf_counter() - t0
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(Path(tmp) / f"store{n}"),
                                  "--block", str(args.block), "--threads", str(args.threads)]
                                 + (["--max-seq-len", str(max_len)] if max_len else []),
                                 check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{r['cells']:>8,} cells in {N_DONORS} files (written in {written:.0f} s): embedded in "
                  f"{r['seconds']:.1f} s = {r['cells'] / r['seconds']:.0f} cells/s, peak RSS {r['peak_rss_mb']:.0f} MB")
    small, large = results
    print(f"peak RSS large/small: {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x for "
          f"{large['cells'] / small['cells']:.0f}x the cells (aim <= 1.2x)")


if __name__ == "__main__":
    main()
