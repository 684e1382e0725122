"""Atlas scale: peak memory and speed of `scsuperweight embed` over per-donor files, a small atlas vs one 10x larger.

A synthetic atlas (`datasets.synthetic_ad`, written as per-donor .h5ad files, 20 donors) of 20,000 and 200,000
cells (``--quick``: 2,000 and 20,000; ``--sizes`` for others) is embedded with the demo model by
`atlas.embed_store` (what `scsuperweight embed --data FOLDER --out STORE` runs: blocks of ``--block`` cells read
and tokenised one at a time, a zarr store, the .h5ad written at the end by `atlas.finalize_store`). Each size runs
in its own process, so its peak RSS is its own: the child's ``VmHWM`` (the high-water mark of its own address
space), not ``ru_maxrss``, which Linux carries over a fork+exec from the parent (the parent's ~1.06 GB peak from
writing the 200,000-cell atlas was reported as the large embed's peak before). Streaming works when the large
atlas's peak is about the small one's (aim <= 1.2x): what grows with the cells is obs (names, a few columns),
not the counts, the tokens or the embeddings (the .h5ad is written block by block). The block (default 500) is
at most one donor file of the smaller atlas, so both sizes hold chunks of the same size and the ratio measures
growth with the cells alone (``--quick``: 50).

One torch thread by default: the tiny model's matrices are too small to share, and on a busy machine a second
intra-op thread that has to wait for a core made the whole run about 10x slower (measured on 2 loaded cores:
3,000 cells in 53 s with 2 threads, 4.4 s with 1).

Usage: python benchmarks/bench_atlas.py [--quick] [--sizes 20000 200000] [--block 500] [--threads 1]
       [--max-seq-len N] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
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


def peak_rss_mb() -> float:
    """This process's own peak resident memory: ``VmHWM`` (reset at exec), else ``ru_maxrss`` (which may include
    the parent's peak at the fork)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(folder: str, store: str, block: int, threads: int, max_seq_len: int | None) -> None:
    """Embed the atlas into a store as `scsuperweight embed` does; print cells, seconds and peak RSS as JSON."""
    import torch

    from scsuperweight import atlas
    from scsuperweight.loading import load_model

    torch.set_num_threads(threads)
    model = load_model("demo")
    t0, c0 = time.perf_counter(), time.process_time()
    st = atlas.embed_store(folder, model, store, block_size=block, max_seq_len=max_seq_len, progress=False)
    embedded, cpu = time.perf_counter() - t0, time.process_time() - c0
    atlas.finalize_store(st, folder, params={"gene_overlap": st.gene_overlap})
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    print(json.dumps({"cells": st.n, "seconds": seconds, "embed_seconds": embedded, "embed_cpu_seconds": cpu,
                      "peak_rss_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 and 20,000 cells (max_seq_len 32)")
    ap.add_argument("--sizes", type=int, nargs=2, default=None, metavar=("SMALL", "LARGE"),
                    help="the two atlas sizes (default 20,000 and 200,000)")
    ap.add_argument("--block", type=int, default=None,
                    help="cells per block (default 500, --quick 50: at most one donor file of the small atlas)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the docstring)")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="shorter inputs for a faster run (default the model's; --quick 32); memory is what this "
                         "measures")
    ap.add_argument("--tmp", default=None, help="where the atlases and stores are written (removed at the end)")
    ap.add_argument("--child", nargs=2, metavar=("ATLAS", "STORE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.block or 500, args.threads, args.max_seq_len)
        return
    sizes = args.sizes or ((2_000, 20_000) if args.quick else (20_000, 200_000))
    max_len = args.max_seq_len or (32 if args.quick else None)
    args.block = args.block or (50 if args.quick else 500)
    results = []
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
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
                  f"{r['embed_seconds']:.1f} s = {r['cells'] / r['embed_seconds']:.0f} cells/s ("
                  f"{r['cells'] / r['embed_cpu_seconds']:.0f} per CPU second; with the .h5ad "
                  f"{r['seconds']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(folder)  # the disk holds one atlas at a time
    small, large = results
    print(f"peak RSS large/small: {large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x for "
          f"{large['cells'] / small['cells']:.0f}x the cells (aim <= 1.2x); block {args.block}, max_seq_len "
          f"{max_len or 'of the model'}, {args.threads} threads")


if __name__ == "__main__":
    main()
