"""Pruning conditions: cached reruns from the first edited block against naive full forwards, same conditions.

Model and data as in bench_trace.py (a randomly initialised 4-layer, d=64 scGPT on `synthetic_ad` cells, or the
Darmanis cells with ``--darmanis``). Two super weights are planted with tests/_plant.py (a hidden unit that fires
only on <cls> and writes a spike of ~200 into one FFN output channel) in two different blocks (``--plant-layers``,
default 1 and 3); `scsuperweight.detect.scan` finds them and their LayerNorm companions (a planted weight the
iterative scan does not reach, because removing an earlier one silenced it, is added as a hand-made candidate row),
and `prune.select_candidates` + `prune.build_conditions` (default `PruneOptions`) turn them into the conditions
`prune` runs: baseline, prune:<cand>, random:<k>, top_outliers, restore:<cand>, scale:<cand>:<f>.

(a) cached: `ScGPTEvaluator(model, masked, plain)` (caches every block's input once, unedited) then `.run(cond)`
    for every condition: each reruns only blocks >= its first edited block, from the cached input;
(b) naive: for every condition, ``model(src, values, padding_mask)`` on every masked and plain batch under
    ``edit(model, cond.edits)`` (restore conditions: with the same `ActivationPatch`, its baseline values captured
    by an unedited full forward once per batch and (site, channel), as the evaluator caches them), and the same
    per-cell metrics (`reconstruction_from_outputs`, the <cls> embedding).

Printed: both outputs' max abs difference over every condition, metric and cell (they must agree: bitwise here);
the transformer blocks each side ran (counted by forward hooks on the blocks, cache construction and restore
captures included) and the fraction the cached path recomputes; times of (a) and (b) alternating (ABBA) for
``--reps`` repetitions, as medians and the median per-repetition speed ratio naive / cached, wall-clock and
process CPU time (the machine is shared: the ratios are the figures).

Usage: python benchmarks/bench_prune.py [--cells 128] [--reps 3] [--threads 1] [--darmanis] [--n-random 10]
           [--plant-layers 1 3]

Cost (issue 14), see `bench_cost` and `bench_standin`:
       python benchmarks/bench_prune.py cost [--quick] [--cells N]      old defaults vs the new default plan
       python benchmarks/bench_prune.py standin [--quick] [--budget 15m]  human-sized stand-in under a budget
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_trace as bt  # noqa: E402

sys.path.insert(0, str(bt.ROOT / "tests"))
from _plant import plant_cls_superweight  # noqa: E402

from scsuperweight.adapters import get_adapter  # noqa: E402
from scsuperweight.data import iter_batches, tokenize_anndata  # noqa: E402
from scsuperweight.detect import scan  # noqa: E402
from scsuperweight.instrument import ActivationPatch, edit  # noqa: E402
from scsuperweight.prune import PruneOptions, build_conditions, select_candidates  # noqa: E402
from scsuperweight.runners.scgpt import ScGPTEvaluator, reconstruction_from_outputs  # noqa: E402


class BlockCounter:
    """Counts transformer-block calls (one per block per batch) through forward hooks, which leave outputs alone."""

    def __init__(self, model):
        self.n = 0
        self.handles = [blk.register_forward_hook(self._hook) for blk in model.transformer_encoder.layers]

    def _hook(self, *args):
        self.n += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def run_cached(model, masked, plain, n_cells, conds) -> tuple[dict, ScGPTEvaluator]:
    ev = ScGPTEvaluator(model, masked, plain, n_cells)
    return {c.name: ev.run(c) for c in conds}, ev


@torch.no_grad()
def run_naive(model, masked, plain, n_cells, conds) -> dict:
    adapter = get_adapter(model)
    baseline: dict = {}  # (site, channel, which, batch index) -> (B, L) values of the unedited model

    def capture(site: str, channel: int, batch) -> torch.Tensor:
        got = {}
        mod = model.get_submodule(adapter.sites[site].module)

        def hook(m, a, out):
            x = out[0] if isinstance(out, tuple) else out
            got["x"] = x[..., channel].detach().clone()

        h = mod.register_forward_hook(hook)
        try:
            model(batch.src, batch.values, batch.padding_mask)
        finally:
            h.remove()
        return got["x"]

    results = {}
    for cond in conds:
        if cond.restore is not None:  # before any edit, as the evaluator does
            site, channel, _ = cond.restore
            for which, batches in (("masked", masked), ("plain", plain)):
                for i, b in enumerate(batches):
                    key = (site, channel, which, i)
                    if key not in baseline:
                        baseline[key] = capture(site, channel, b)
        out: dict[str, np.ndarray] = {}
        with edit(model, cond.edits, verify=False):
            for which, batches in (("masked", masked), ("plain", plain)):
                for i, b in enumerate(batches):
                    patch = nullcontext()
                    if cond.restore is not None:
                        site, channel, token_id = cond.restore
                        p = ActivationPatch(site, channel, baseline[(site, channel, which, i)], b.src.eq(token_id))
                        patch = edit(model, patches=[p], verify=False)
                    with patch:
                        o = model(b.src, b.values, b.padding_mask)
                    if which == "masked":
                        for k, v in reconstruction_from_outputs(o, b).items():
                            out.setdefault(k, np.full(n_cells, np.nan))[b.cells] = v
                    else:
                        emb = o["cell_emb"].double().cpu().numpy()
                        out.setdefault("cls", np.full((n_cells, emb.shape[1]), np.nan))[b.cells] = emb
        results[cond.name] = out
    return results


def compare(a: dict, b: dict) -> tuple[float, int, int]:
    """Max abs difference over all conditions, metrics and cells; mismatched NaN patterns; values compared."""
    worst, nan_mismatch, n = 0.0, 0, 0
    for name in a:
        for k in a[name]:
            x, y = a[name][k], b[name][k]
            nan_mismatch += int(np.sum(np.isnan(x) != np.isnan(y)))
            ok = ~np.isnan(x) & ~np.isnan(y)
            n += int(ok.sum())
            if ok.any():
                worst = max(worst, float(np.max(np.abs(x[ok] - y[ok]))))
    return worst, nan_mismatch, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bt.add_common_args(parser, cells=128)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of each timing")
    parser.add_argument("--mask-ratio", type=float, default=0.25, help="scGPT's pretraining mask ratio (as tl.prune)")
    parser.add_argument("--n-random", type=int, default=PruneOptions.n_random,
                        help="random same-parameter controls per candidate parameter")
    parser.add_argument("--plant-layers", type=int, nargs="+", default=[1, 3])
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    adata, genes, label = bt.load_cells(opts)
    model = bt.build_model(genes, opts)
    tok = tokenize_anndata(adata, model.vocab, max_seq_len=opts.max_seq_len, seed=opts.seed)
    plain = list(iter_batches(tok, opts.batch_size))
    masked = list(iter_batches(tok, opts.batch_size, mask_ratio=opts.mask_ratio,
                               mask_value=model.config.mask_value, seed=opts.seed))
    n_cells = tok.n_cells
    print(f"data: {label}: {n_cells} cells, {len(plain)} plain + {len(masked)} masked batches of "
          f"{opts.batch_size}, mean {tok.lengths.mean():.0f} tokens/cell")
    print(f"model: {bt.describe_model(model)}")
    print(bt.machine_line())

    # planted super weights in different blocks, found by the scan
    adapter = get_adapter(model)
    planted = []
    for i, layer in enumerate(opts.plant_layers):
        row, hidden = (5 + 11 * i) % opts.d_model, (3 + 7 * i) % opts.d_hid
        plant_cls_superweight(model, plain, layer=layer, row=row, hidden=hidden)
        planted.append((layer, row, hidden))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = scan(model, plain)
    cands = found.candidates
    cands = cands[cands["above_threshold"].astype(bool)] if len(cands) else cands
    # a later planted unit reads the earlier spike through the residual stream, so removing the earlier super weight
    # can silence it and the iterative scan stops before reaching it: add such planted weights as hand-made rows
    missing = []
    for layer, row, hidden in planted:
        param = f"{adapter.block_name(layer)}.linear2.weight"
        cid = adapter.candidate_id(param, (row, hidden))
        if cid not in set(cands["candidate"]):
            missing.append({"candidate": cid, "kind": "ffn_down", "layer": layer, "param": param, "row": row,
                            "col": hidden, "primary": True, "site": f"L{layer}.ffn_out", "channel": row,
                            "token": "<cls>", "above_threshold": True, "screen": "activation:planted (hand-made)",
                            "spike": float("nan"), "spike_ratio": float("nan")})
    if missing:
        cands = pd.concat([cands, pd.DataFrame(missing)], ignore_index=True)
    popts = PruneOptions(n_random=opts.n_random)
    cands = select_candidates(cands, popts.max_candidates + len(missing))
    conds = build_conditions(model, cands, popts)
    first = [min([adapter.first_layer_of(e.param) for e in c.edits]
                 + ([adapter.sites[c.restore[0]].layer] if c.restore else []), default=adapter.n_layers)
             for c in conds]  # as ScGPTEvaluator.first_layer
    print(f"\nplanted (block, row, col) {planted}; scan: {len(found.candidates)} candidate rows "
          f"({found.stop_reason}); {len(missing)} planted weight(s) the scan did not reach added by hand; "
          f"pruning {len(cands)}:")
    for _, r in cands.iterrows():
        col = "" if pd.isna(r["col"]) else f", {int(r['col'])}"
        how = "hand-made" if "hand" in str(r.get("screen", "")) else \
            f"scan: spike {r['spike']:.1f} ({r['spike_ratio']:.0f}x typical)"
        print(f"  {r['candidate']:<24} {r['kind']:<10} block {adapter.first_layer_of(r['param'])}  "
              f"[{int(r['row'])}{col}]  {how}")
    by_first = {k: first.count(k) for k in sorted(set(first))}
    kinds = {}
    for c in conds:
        kinds[c.name.split(":")[0]] = kinds.get(c.name.split(":")[0], 0) + 1
    print(f"{len(conds)} conditions {kinds}; first recomputed block -> conditions: {by_first} "
          f"({adapter.n_layers} = decoders only)")

    # correctness and blocks, once
    counter = BlockCounter(model)
    cached, ev = run_cached(model, masked, plain, n_cells, conds)
    blocks_cached = counter.n
    counter.n = 0
    naive = run_naive(model, masked, plain, n_cells, conds)
    blocks_naive = counter.n
    counter.remove()
    worst, nan_mismatch, n = compare(cached, naive)
    exact = worst == 0.0 and nan_mismatch == 0
    print(f"\noutputs, cached vs naive: max |diff| = {worst:.3g} over {n} values (per-cell GEP/GEPC MSE and "
          f"Pearson, <cls> embeddings) of {len(conds)} conditions, {nan_mismatch} NaN mismatches -> "
          f"{'identical' if exact else 'DIFFERENT'}")
    print(f"blocks run (one block on one batch = 1): cached {blocks_cached} (cache construction "
          f"{adapter.n_layers * (len(plain) + len(masked))}, evaluator's own count of reruns {ev.forwards}), naive "
          f"{blocks_naive}: the cached path recomputes {blocks_cached / blocks_naive:.1%} of the blocks")

    res = bt.interleaved(lambda: run_naive(model, masked, plain, n_cells, conds),
                      lambda: run_cached(model, masked, plain, n_cells, conds), opts.reps)
    print(f"\ntime for all {len(conds)} conditions, {opts.reps} interleaved repetitions (ABBA)")
    print("  rep   naive wall   cached wall   naive/cached    naive cpu   cached cpu   naive/cached")
    for i, (ta, tb) in enumerate(zip(res["a"], res["b"])):
        print(f"  {i:>3}   {ta[0]:9.2f} s   {tb[0]:9.2f} s   {ta[0] / tb[0]:11.2f}x   {ta[1]:8.2f} s  {tb[1]:8.2f} s  "
              f"{ta[1] / tb[1]:11.2f}x")
    for kind in ("cpu", "wall"):
        speed = statistics.median(1 / r for r in res[f"ratios_{kind}"])
        print(f"  speed-up naive / cached, median of per-repetition ratios ({kind:>4}): {speed:.2f}x  "
              f"(medians: naive {res[f'a_{kind}']:.2f} s, cached {res[f'b_{kind}']:.2f} s)")


# ---------------------------------------------------------------------------------------------------------------
# cost (issue 14): `python benchmarks/bench_prune.py cost ...` and `... standin ...`
# ---------------------------------------------------------------------------------------------------------------
def _darmanis(n_cells: int | None, seed: int = 0):
    """The Darmanis cells (all 466, or a label-stratified, seeded subsample of `n_cells`)."""
    import anndata as ad

    from scsuperweight.tl import stratified_subsample

    if not bt.DARMANIS.is_file():
        sys.exit(f"{bt.DARMANIS} is missing: these benchmarks run on the real Darmanis cells")
    adata = ad.read_h5ad(bt.DARMANIS)
    if n_cells and n_cells < adata.n_obs:
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        per = max(1, -(-n_cells // len(set(labels))))  # ceil: small labels leave room for the others
        idx = stratified_subsample(labels, adata.n_obs, per, seed, max_cells=n_cells)
        adata = adata[idx].copy()
    return adata


def _official(model, out: Path):
    """Save `model` in the official format and load it back as a user would (a directory, not an object)."""
    from scsuperweight.loading import load_model
    from scsuperweight.models import save_scgpt

    save_scgpt(model, out)
    return load_model(str(out))


def _planted(model, adata, layer: int, row: int, col: int, n_cells: int = 64):
    """Plant one super weight calibrated on real cells (`scsuperweight.standin.plant_superweight`)."""
    from scsuperweight.runners import get_runner
    from scsuperweight.standin import plant_superweight

    plain = get_runner(model).prepare(adata[: min(n_cells, adata.n_obs)], seed=0, batch_size=16).plain
    return plant_superweight(model, layer=layer, row=row, col=col, batches=plain)


# the issue-time defaults (issue 14): fixed draws, full length (the model's 1,200 tokens), no #17 ablations, no
# first-order null, every top candidate restored and scaled
FULL_LEN = 1200
OLD = dict(sequential=False, first_order=False, mean_ablation=False, granularities=("scalar",), joint=False,
           n_matched=0, characterise="all", max_seq_len=FULL_LEN)
# the new defaults restricted to the same condition kinds (the #17 ablations off)
NEW_SAME = dict(mean_ablation=False, granularities=("scalar",), joint=False, n_matched=0)


def bench_cost(argv) -> None:
    """(a) The planted 4-layer official-format model over the Darmanis cells, through `tl.prune` after one shared
    `tl.scan`, three arms: ``old`` (the issue-time defaults: fixed 40 draws, full length 1,200 tokens, no #17
    ablations, no first-order null, every top candidate restored and scaled), ``new-same`` (the new defaults,
    512 tokens per cell among them, restricted to the old condition kinds) and ``new`` (the full new default
    plan): wall times, tokens per cell, conditions run per kind, ratios, and whether the verdicts are identical
    (zeroing across all arms; every verdict between old and new-same). The shared scan reads full length (the
    issue-time scan), so every arm judges the same candidates."""
    import tempfile
    import time
    from collections import Counter

    import scsuperweight as ssw
    from scsuperweight.plan import condition_kind
    from scsuperweight.runners import get_runner

    ap = argparse.ArgumentParser(prog="bench_prune.py cost", description=bench_cost.__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 cells, 10 per label, 20 draws: minutes")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="the new arms (default: the new default, 512); old is always full length (1200)")
    ap.add_argument("--n-random", type=int, default=40, help="draws per parameter, every arm (default 40)")
    ap.add_argument("--cells", type=int, default=None, help="subsample the 466 cells (label-stratified)")
    ap.add_argument("--max-cells-per-label", type=int, default=200, help="as tl.prune (default 200)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plant-layer", type=int, default=1)
    ap.add_argument("--arms", nargs="+", default=["old", "new-same", "new"], choices=["old", "new-same", "new"])
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cells = a.cells or (40 if a.quick else None)
    per_label = 10 if a.quick else a.max_cells_per_label
    max_len = a.max_seq_len  # None: the new default (PRUNE_MAX_SEQ_LEN)
    n_random = 20 if a.quick else a.n_random
    adata = _darmanis(cells)
    opts = argparse.Namespace(d_model=64, d_hid=128, layers=4, heads=4, seed=0, max_seq_len=1200)
    with tempfile.TemporaryDirectory() as tmp:
        model = bt.build_model(adata.var_names.tolist(), opts)
        pw = _planted(model, adata, a.plant_layer, 9, 21)
        model = _official(model, Path(tmp) / "model")
        new_len = get_runner(model).analysis_seq_len(max_len)
        n_genes = np.asarray((adata.X > 0).sum(1)).ravel()
        print(f"{bt.machine_line()}\n{bt.describe_model(model)}, planted {pw.candidate} = {pw.value:.3g}; "
              f"{adata.n_obs} Darmanis cells ({np.median(n_genes):.0f} counted genes per cell, median), at most "
              f"{per_label} per label, {n_random} draws per parameter at most; tokens per cell: old "
              f"{FULL_LEN} (full length), new-same and new {new_len}"
              f"{' (the new default)' if max_len is None else ''}; the shared scan at {FULL_LEN}")
        ssw.tl.scan(adata, model, label_key="cell_type", max_seq_len=FULL_LEN, progress=False)
        arms = {"old": OLD, "new-same": {**NEW_SAME, "max_seq_len": max_len}, "new": {"max_seq_len": max_len}}
        out, wall, cpu = {}, {}, {}
        for name in a.arms:
            b = adata.copy()
            t0, c0 = time.perf_counter(), time.process_time()
            ssw.tl.prune(b, model, label_key="cell_type", max_cells_per_label=per_label, n_random=n_random,
                         yes=True, progress=False, **arms[name])
            # process CPU time beside the wall: on a shared machine it moves less with the other processes' load
            wall[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
            out[name] = b
    verdict = {}
    for name, b in out.items():
        col = ssw.get.collapse(b)
        ran = Counter(condition_kind(c) for c in set(col["condition"]))
        p = ssw.get.params(b, "prune")
        plan = p["plan"]
        print(f"\n{name}: {wall[name]:.1f} s wall, {cpu[name]:.1f} s CPU; "
              f"max_seq_len {p['max_seq_len']} ({plan['tokens_per_cell']:.0f} "
              f"tokens per cell, mean); {sum(ran.values())} conditions run {dict(ran)}")
        print(f"  planned at most {plan['n_conditions']} ({plan['est_seconds']:.0f} s estimated), expected "
              f"{sum(plan.get('expected_by_kind', {}).values()) or plan['n_conditions']}; draws per pool "
              f"{p.get('null_draws') or 'all'}; not characterised: {p.get('not_characterised') or 'none'}")
        v = ssw.get.verdicts(b)
        print(v[["candidate", "ablation", "delta", "p_value", "passes"]].to_string(index=False))
        verdict[name] = v.set_index(["candidate", "ablation"])["passes"].to_dict()
    zeroing = {k: {c: ok for (c, ab), ok in v.items() if ab == "prune"} for k, v in verdict.items()}
    if "new" in out:
        fo = ssw.get.firstorder(out["new"])
        if len(fo):
            print("\nfirst-order null (new):\n" + fo[["candidate", "rank", "percentile", "rank_correlation",
                                                      "n_draws"]].to_string(index=False))
    print()
    n_run = {name: len(set(ssw.get.collapse(b)["condition"])) for name, b in out.items()}
    for name in [n for n in ("new-same", "new") if n in wall and "old" in wall]:
        print(f"wall-time ratio old / {name}: {wall['old'] / wall[name]:.2f}x (CPU time {cpu['old'] / cpu[name]:.2f}x) "
              f"(conditions {n_run['old']} vs {n_run[name]}: {n_run['old'] / n_run[name]:.2f}x)")
    same_zero = len({tuple(sorted(z.items())) for z in zeroing.values()}) == 1
    print(f"verdicts on zeroing across {', '.join(out)}: {'identical' if same_zero else 'DIFFERENT'}")
    if "old" in verdict and "new-same" in verdict:
        print(f"every verdict old vs new-same: {'identical' if verdict['old'] == verdict['new-same'] else 'DIFFERENT'}")
    last = list(zeroing)[-1]
    print(f"planted {pw.candidate} passes ({last}): {bool(zeroing[last].get(pw.candidate, False))}")


def _print_choice(b: dict, budget: str) -> None:
    """What a budget chose (run.json's ``budget``): the knobs, the structural levers pulled, and why."""
    from scsuperweight.plan import BUDGET_ORDER, LEVER_ORDER

    levers = ("embed_all", "genes_candidates", "n_matched", "n_restore", "n_scale", "mean_ablation",
              "granularities", "joint", "first_order", "max_candidates", "null_method", "null_k")
    print(f"\nbudget {budget} chose: " + ", ".join(f"{k} {b[k]}" for k in BUDGET_ORDER)
          + "; " + ", ".join(f"{k} {b[k]}" for k in levers if b.get(k) is not None))
    print(f"levers pulled (in the order {', '.join(LEVER_ORDER)}): {', '.join(b['pulled']) or 'none'}; "
          f"estimated {b['est_seconds']:.0f} s of {b['budget_seconds']:.0f} s; feasible {b['feasible']}")
    for r in b["reasons"]:
        print(f"  - {r}")


def bench_standin(argv) -> None:
    """(b) The planted whole-human-sized stand-in (official format) over the Darmanis cells with a budget: the
    plan `run` prints, what the budget chose and why, wall time against the budget, and whether the planted
    scalar is ranked first and passes the controls."""
    import json
    import tempfile
    import time

    import scsuperweight as ssw
    from scsuperweight.plan import format_plan
    from scsuperweight.standin import parameter_count, standin_model

    ap = argparse.ArgumentParser(prog="bench_prune.py standin", description=bench_standin.__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny stand-in, 60 cells, budget 90s")
    ap.add_argument("--budget", default=None, help="default 15m (quick: 90s)")
    ap.add_argument("--cells", type=int, default=None, help="subsample the 466 cells (label-stratified)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plant", type=int, nargs=3, default=(2, 9, 21), metavar=("LAYER", "ROW", "COL"))
    ap.add_argument("--plan-only", action="store_true",
                    help="print the plan and what the budget chose (one calibration forward) and stop: no run")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    budget = a.budget or ("90s" if a.quick else "15m")
    adata = _darmanis(a.cells or (60 if a.quick else None))
    with tempfile.TemporaryDirectory() as tmp:
        model = standin_model("tiny" if a.quick else "human", genes=adata.var_names.tolist())
        # the plan does not depend on the weights' values: a plan-only call skips the planting forwards
        pw = None if a.plan_only else _planted(model, adata, *a.plant)
        model = _official(model, Path(tmp) / "model")
        planted = "nothing planted (plan only)" if pw is None else f"planted {pw.candidate} = {pw.value:.3g}"
        print(f"{bt.machine_line()}\nstand-in {'tiny' if a.quick else 'human'}: {parameter_count(model) / 1e6:.1f} M "
              f"parameters, {planted}; {adata.n_obs} Darmanis cells; budget {budget}")
        t0 = time.perf_counter()
        info = ssw.pipeline.run_pipeline(adata, model, Path(tmp) / "run", label_key="cell_type", budget=budget,
                                         progress=False, on_plan=lambda p: print(format_plan(p)),
                                         dry_run=a.plan_only)
        wall = time.perf_counter() - t0
        run = json.loads((Path(tmp) / "run" / "run.json").read_text())
        if a.plan_only:
            _print_choice(run["budget"], budget)
            print(f"planning took {wall:.0f} s; {run['calibration']}")
            return
        sw = pd.read_csv(Path(tmp) / "run" / "superweights.tsv", sep="\t")
        ver = pd.read_csv(Path(tmp) / "run" / "verdicts.tsv", sep="\t").query("ablation == 'prune'")
        fo_path = Path(tmp) / "run" / "firstorder.tsv"
        fo = pd.read_csv(fo_path, sep="\t") if fo_path.is_file() else pd.DataFrame()
    b = run["budget"]
    _print_choice(b, budget)
    limit = b["budget_seconds"] * 1.1
    print(f"wall time {wall:.0f} s of {b['budget_seconds']:.0f} s budget (+10%: {limit:.0f} s): "
          f"{'within' if wall <= limit else 'OVER'}; step timings {info['timings']}")
    top = sw.iloc[0]["candidate"] if len(sw) else None
    passes = bool(ver.set_index("candidate")["passes"].get(pw.candidate, False)) if len(ver) else False
    print(f"planted {pw.candidate}: ranked first {top == pw.candidate} (top: {top}); passes the controls {passes}")
    if len(fo):
        print("first-order null (rank among all scalars of the matrix; Spearman with the exact draws):\n"
              + fo[["candidate", "rank", "percentile", "rank_correlation", "n_draws"]].to_string(index=False))
    else:
        print("first-order null: no firstorder.tsv in the run")
    pp = run.get("prune_conditions") or {}
    if pp.get("conditions_by_kind"):
        print(f"conditions run {pp['conditions_by_kind']}; not characterised: {pp.get('not_characterised')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("cost", "standin"):
        {"cost": bench_cost, "standin": bench_standin}[sys.argv[1]](sys.argv[2:])
    else:
        main()
