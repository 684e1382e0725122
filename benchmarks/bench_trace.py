"""Trace overhead and memory: plain forward passes against a full `Trace` over the same batches, in one run.

Model: a randomly initialised scGPT (default 4 layers, d=64, 4 heads, d_hid=128; vocab = the data's genes +
<pad>/<cls>/<eoc>) on `synthetic_ad` cells, or on the 466 Darmanis et al. (2015) cells with ``--darmanis``.

Time. (a) plain: ``adapter.run(batch)`` (= ``model(src, values, padding_mask)``) for every batch under
``torch.no_grad()``; (b) trace: the same calls inside ``Trace(model, "all")`` (streaming reductions on every site),
plus ``to_frame()``. Both run on torch's regular encoder path: ``ScGPTModel.run_encoder`` always switches the fused
fast path off and `Trace` does too; a probe prints which path the plain run took (a forward hook on a block's
``self_attn`` fires only on the regular path). (a) and (b) alternate (ABBA order) for ``--reps`` repetitions; each
repetition gives a ratio trace / plain, and the medians of those ratios are printed, for wall-clock time and for
process CPU time (with one thread the CPU time is what the run itself consumed, the robust figure on a shared
machine; the wall-clock figure also counts time spent descheduled), each with a 95% bootstrap interval: on a
shared VM single repetitions spread over about +-15%, so the interval says how far that noise moves the median.

Memory. Each scan runs in its own subprocess (clean peaks): the cells tokenised once, the model built, one
warm-up trace over two batches, then the peak-RSS counter is reset (``/proc/self/clear_refs``) and a full trace
runs over lazily collated batches (`iter_batches`, nothing materialised). Printed per scan: the growth of the
peak RSS above the RSS just before the scan (the scan's working memory: activations of one batch, the
reductions, the batch being collated), the peak of Python-heap allocations (`tracemalloc`, numpy included, torch
tensors not), the bytes held in the Trace's reductions, and the whole process's peak RSS. The 10x scan runs over
the same cells ten times over, so that the batch shapes, and with them the per-batch activation memory, are the
same and only the number of cells grows.

With ``--reference-trace FILE`` another version of trace.py (e.g. the committed one) is timed as a third arm in the
same interleaving, so that a change to the reductions is measured against its predecessor on the same batches.

Usage: python benchmarks/bench_trace.py [--cells 256] [--reps 41] [--threads 1] [--darmanis]
           [--d-model 64 --d-hid 128 --layers 4 --heads 4] [--memory-cells 256] [--memory-reps 3]
           [--reference-trace FILE] [--no-memory] [--no-time]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

import scsuperweight
from scsuperweight.adapters import get_adapter
from scsuperweight.data import iter_batches, tokenize_anndata
from scsuperweight.instrument import Trace
from scsuperweight.models import ScGPTConfig, ScGPTModel

ROOT = Path(__file__).resolve().parents[1]
DARMANIS = ROOT.parent / "shared" / "data" / "darmanis2015_GSE67835.h5ad"


# ---------------------------------------------------------------------------------------------------------------
# shared with bench_prune.py
# ---------------------------------------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser, cells: int) -> None:
    parser.add_argument("--cells", type=int, default=cells, help="cells to run (synthetic: generated; Darmanis: "
                        "the first N of 466)")
    parser.add_argument("--darmanis", action="store_true", help=f"use {DARMANIS.name} instead of synthetic_ad")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine a second thread makes "
                             "every op wait for a descheduled sibling)")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-hid", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


def load_cells(opts):
    """(adata, genes, label) for the chosen data set."""
    if opts.darmanis:
        import anndata as ad

        adata = ad.read_h5ad(DARMANIS)
        adata = adata[: min(opts.cells, adata.n_obs)].copy()
        label = f"Darmanis 2015 ({DARMANIS.name})"
    else:
        from scsuperweight.datasets import synthetic_ad

        adata = synthetic_ad(n_cells=opts.cells, seed=opts.seed)
        label = f"synthetic_ad(n_cells={opts.cells}, seed={opts.seed})"
    return adata, adata.var_names.tolist(), label


def build_model(genes, opts) -> ScGPTModel:
    vocab = {g: i for i, g in enumerate([*genes, "<pad>", "<cls>", "<eoc>"])}
    torch.manual_seed(opts.seed)
    config = ScGPTConfig(ntoken=len(vocab), d_model=opts.d_model, nhead=opts.heads, d_hid=opts.d_hid,
                         nlayers=opts.layers, dropout=0.0, pad_token_id=vocab["<pad>"])
    return ScGPTModel(config, vocab=vocab, args={"max_seq_len": opts.max_seq_len}).eval()


def describe_model(model: ScGPTModel) -> str:
    c = model.config
    return (f"scGPT {c.nlayers} layers, d={c.d_model}, {c.nhead} heads, d_hid={c.d_hid}, vocab {c.ntoken}, "
            "random init")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def interleaved(a, b, reps: int) -> dict:
    """Run `a` and `b` alternately (ABBA: a-b, b-a, ...) `reps` times each; per-rep times and the median ratios b/a."""
    times = interleaved_arms({"a": a, "b": b}, reps)
    out = {"a": times["a"], "b": times["b"]}
    for i, kind in enumerate(("wall", "cpu")):
        ratios = [tb[i] / ta[i] for ta, tb in zip(times["a"], times["b"])]
        out[f"ratio_{kind}"] = statistics.median(ratios)
        out[f"ratios_{kind}"] = ratios
        out[f"a_{kind}"] = statistics.median(t[i] for t in times["a"])
        out[f"b_{kind}"] = statistics.median(t[i] for t in times["b"])
    return out


def interleaved_arms(arms: dict, reps: int) -> dict:
    """(wall, cpu) per repetition of every arm; the arms run in turn, in reversed order every other repetition."""
    times = {name: [] for name in arms}
    items = list(arms.items())
    for r in range(reps):
        for name, fn in (items if r % 2 == 0 else items[::-1]):
            times[name].append(timed(fn))
    return times


def median_ci(ratios: list[float], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of per-repetition ratios (how far noise can move it)."""
    rng = np.random.default_rng(seed)
    r = np.asarray(ratios)
    meds = np.median(r[rng.integers(0, len(r), size=(n_boot, len(r)))], axis=1)
    return float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def machine_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s), {os.cpu_count()} CPUs "
            f"visible, load average {load:.1f} at start (shared machine: absolute times are noisy, ratios are "
            "the figures)")


# ---------------------------------------------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------------------------------------------
def load_reference_trace(path: str):
    """Another version of scsuperweight/instrument/trace.py (e.g. `git show REV:...`), to time as a third arm."""
    import importlib.util

    name = "scsuperweight.instrument._reference_trace"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def probe_path(model: ScGPTModel, batch) -> str:
    """Which encoder path a plain forward takes: the fused fast path skips the blocks' submodules."""
    fired = []
    attn = model.transformer_encoder.layers[0].self_attn
    h = attn.register_forward_hook(lambda *a: fired.append(1))
    try:
        with torch.no_grad():
            model(batch.src, batch.values, batch.padding_mask)
    finally:
        h.remove()
    default = torch.backends.mha.get_fastpath_enabled()
    path = "regular path (per-module, scaled_dot_product_attention)" if fired else "FUSED fast path"
    return (f"plain forward ran the {path}; torch's global fast-path flag is {default} outside the call "
            "(ScGPTModel.run_encoder switches it off for the call); Trace switches it off too: same path")


def reduction_path() -> str:
    """Which implementation of the per-activation reductions Trace uses here (float32 CPU activations)."""
    from scsuperweight.instrument import trace as T

    if T._native is not None and T.NATIVE:
        return f"reductions: the one-pass C extension ({Path(T._native.__file__).name})"
    why = "SCSUPERWEIGHT_NATIVE=0" if T._native is not None else "the C extension is not built"
    return f"reductions: the torch path ({why})"


def run_time(opts) -> None:
    adata, genes, label = load_cells(opts)
    model = build_model(genes, opts)
    adapter = get_adapter(model)
    tok = tokenize_anndata(adata, model.vocab, max_seq_len=opts.max_seq_len, seed=opts.seed)
    batches = list(iter_batches(tok, opts.batch_size))
    n_tok = int(sum(int((~b.padding_mask).sum()) for b in batches))
    n_pad = int(sum(b.padding_mask.numel() for b in batches))
    print(f"data: {label}: {tok.n_cells} cells, {len(batches)} batches of {opts.batch_size}, mean "
          f"{tok.lengths.mean():.0f} tokens/cell (max {tok.lengths.max()}), {n_tok} tokens ({n_pad} with padding)")
    print(f"model: {describe_model(model)}")
    print(machine_line())
    print(probe_path(model, batches[0]))
    print(reduction_path())
    with Trace(model, "all") as tr_probe, torch.no_grad():
        tr_probe.run(batches[0])
    n_sites = len(tr_probe.sites)

    def plain():
        with torch.no_grad():
            for b in batches:
                adapter.run(b)

    def traced():
        with torch.no_grad(), Trace(model, "all") as tr:
            for b in batches:
                tr.run(b)
        tr.to_frame()

    arms = {"plain": plain, "trace": traced}
    if opts.reference_trace:
        ref = load_reference_trace(opts.reference_trace)

        def traced_ref():
            with torch.no_grad(), ref.Trace(model, "all") as tr:
                for b in batches:
                    tr.run(b)
            tr.to_frame()

        arms["reference"] = traced_ref
    for fn in arms.values():  # warm-up (lazy initialisation, allocator pools)
        fn()
    times = interleaved_arms(arms, opts.reps)
    res = {"a": times["plain"], "b": times["trace"]}
    for i, kind in enumerate(("wall", "cpu")):
        res[f"ratio_{kind}"] = statistics.median(tb[i] / ta[i] for ta, tb in zip(res["a"], res["b"]))
        res[f"a_{kind}"] = statistics.median(t[i] for t in res["a"])
        res[f"b_{kind}"] = statistics.median(t[i] for t in res["b"])
    print(f"\ntime over {len(batches)} batches, {opts.reps} interleaved repetitions (ABBA), {n_sites} sites traced")
    print("  rep   plain wall   trace wall   ratio    plain cpu   trace cpu   ratio")
    for i, (ta, tb) in enumerate(zip(res["a"], res["b"])):
        print(f"  {i:>3}   {ta[0]:9.3f} s  {tb[0]:9.3f} s  {tb[0] / ta[0]:6.3f}   {ta[1]:8.3f} s  {tb[1]:8.3f} s  "
              f"{tb[1] / ta[1]:6.3f}")
    print(f"  median plain {res['a_wall']:.3f} s wall / {res['a_cpu']:.3f} s cpu; trace {res['b_wall']:.3f} s wall / "
          f"{res['b_cpu']:.3f} s cpu")
    for i, kind in ((1, "cpu"), (0, "wall")):
        r = res[f"ratio_{kind}"]
        lo, hi = median_ci([tb[i] / ta[i] for ta, tb in zip(res["a"], res["b"])])
        print(f"  trace / plain, median of per-repetition ratios ({kind:>4}): {r:.3f} (95% bootstrap CI {lo:.3f} to "
              f"{hi:.3f}) -> overhead {100 * (r - 1):+.1f}% (target <= +10%: {'met' if r <= 1.10 else 'NOT met'})")
    if opts.reference_trace:
        for kind, j in (("cpu", 1), ("wall", 0)):
            rr = statistics.median(tr_[j] / ta[j] for ta, tr_ in zip(times["plain"], times["reference"]))
            rt = statistics.median(tt[j] / tr_[j] for tt, tr_ in zip(times["trace"], times["reference"]))
            print(f"  reference trace ({opts.reference_trace}) / plain ({kind:>4}): {rr:.3f} -> overhead "
                  f"{100 * (rr - 1):+.1f}%; this trace / reference: {rt:.3f}")


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    """A /proc/self/status field in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _trim() -> None:
    gc.collect()
    try:  # hand freed heap back to the OS, so that reuse of earlier garbage does not hide the scan's growth
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_worker(opts) -> None:
    """One scan in this process; prints one JSON line."""
    adata, genes, _ = load_cells(opts)
    model = build_model(genes, opts)
    tok = tokenize_anndata(adata, model.vocab, max_seq_len=opts.max_seq_len, seed=opts.seed)
    base = tok.n_cells
    tok = tok.subset(np.tile(np.arange(base), opts.repeat))  # the same cells, `repeat` times over
    del adata
    with torch.no_grad(), Trace(model, "all") as warm:  # warm-up: first-call costs are not the scan's
        for i, b in enumerate(iter_batches(tok, opts.batch_size)):
            warm.run(b)
            if i == 1:
                break
    del warm
    _trim()
    rss_before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    tracemalloc.start()
    t0 = time.perf_counter()
    n_batches = 0
    with torch.no_grad(), Trace(model, "all") as tr:
        for b in iter_batches(tok, opts.batch_size):
            tr.run(b)
            n_batches += 1
    frame = tr.to_frame()
    seconds = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    hwm = _status("VmHWM")
    state = sum(t.numel() * t.element_size() for st in tr.stats.values()
                for t in (st.max_abs, st.arg_cell, st.arg_pos, st.arg_token, st.sum_abs, st.top_count, st.hist))
    print(json.dumps({"cells": tok.n_cells, "batches": n_batches, "sites": len(frame), "rss_before": rss_before,
                      "peak_growth": hwm - rss_before, "peak_rss": hwm, "py_peak": py_peak, "state": state,
                      "seconds": seconds, "n_cells_seen": int(frame["n_cells"].iloc[0])}))


def run_memory(opts) -> None:
    common = ["--cells", str(opts.memory_cells), "--batch-size", str(opts.batch_size), "--max-seq-len",
              str(opts.max_seq_len), "--threads", str(opts.threads), "--d-model", str(opts.d_model), "--d-hid",
              str(opts.d_hid), "--layers", str(opts.layers), "--heads", str(opts.heads), "--seed", str(opts.seed)]
    if opts.darmanis:
        common.append("--darmanis")
    script = str(Path(__file__).resolve())
    mib = 1 / 2**20
    print("\nmemory: a full trace (all sites) over N and 10N cells (the same cells 10 times over), each scan in its "
          "own subprocess")
    # glibc's default malloc raises its mmap threshold as large blocks are freed and then keeps freed memory in the
    # heap, so a peak RSS also counts garbage it has not handed back, and varies by +-15% from run to run; with the
    # threshold fixed at its initial value (128 KiB) large blocks are unmapped when freed and the peak RSS follows
    # the memory actually in use
    modes = (("fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072): memory in use",
              {"MALLOC_MMAP_THRESHOLD_": "131072"}, 1),
             ("glibc default malloc: in use + retained free heap", {}, opts.memory_reps))
    for title, env, reps in modes:
        rows = {1: [], 10: []}
        for _ in range(reps):
            for repeat in (1, 10):
                cmd = [sys.executable, script, "--memory-worker", "--repeat", str(repeat), *common]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env})
                rows[repeat].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  {title}" + (f", median of {reps} runs each" if reps > 1 else ""))
        print("    cells   batches   scan peak growth   Python-heap peak   Trace reductions   process peak RSS   time")
        med = {}
        for repeat in (1, 10):
            rs = rows[repeat]
            med[repeat] = {k: statistics.median(r[k] for r in rs) for k in ("peak_growth", "py_peak", "state",
                                                                           "peak_rss", "seconds")}
            r, m = rs[0], med[repeat]
            runs = ", ".join(f"{x['peak_growth'] * mib:.1f}" for x in rs)
            spread = f"  (runs: {runs} MiB)" if len(rs) > 1 else ""
            print(f"    {r['cells']:>5}   {r['batches']:>7}   {m['peak_growth'] * mib:12.1f} MiB   "
                  f"{m['py_peak'] * mib:12.2f} MiB   {m['state'] * mib:12.2f} MiB   {m['peak_rss'] * mib:12.1f} MiB   "
                  f"{m['seconds']:.1f} s{spread}")
        a, b = med[1], med[10]
        g = b["peak_growth"] / a["peak_growth"]
        print(f"    scan peak growth 10N / N: {g:.3f} (target <= 1.2: {'met' if g <= 1.2 else 'NOT met'}); "
              f"Python-heap peak {b['py_peak'] / a['py_peak']:.3f}; Trace reductions {b['state'] / a['state']:.3f}; "
              f"whole-process peak RSS {b['peak_rss'] / a['peak_rss']:.3f} (it includes the tokenised cells, "
              "which grow with N by construction)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, cells=256)
    parser.add_argument("--reps", type=int, default=41, help="interleaved repetitions of each timing (per-repetition "
                        "ratios on this shared VM spread over about +-15%%: the median needs many; its bootstrap "
                        "interval is printed)")
    parser.add_argument("--memory-cells", type=int, default=256, help="N for the N vs 10N memory comparison")
    parser.add_argument("--memory-reps", type=int, default=3,
                        help="runs of each memory scan under glibc's default malloc (its peaks vary from run to run)")
    parser.add_argument("--reference-trace", metavar="FILE",
                        help="another trace.py to time as a third arm, e.g. the committed one: git show "
                             "HEAD:scsuperweight/instrument/trace.py > /tmp/trace_head.py")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.memory_worker:
        memory_worker(opts)
        return
    print(f"scsuperweight {getattr(scsuperweight, '__version__', '?')}")
    if not opts.no_time:
        run_time(opts)
    if not opts.no_memory:
        opts.cells = opts.memory_cells
        run_memory(opts)


if __name__ == "__main__":
    main()
