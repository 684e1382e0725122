"""Find super-weight-like parameters: activation spikes -> exact parameter coordinates, iteratively.

Method (Yu et al. 2024, adapted to post-norm encoders):
1. Trace every site over the batches (streaming reductions): per site the largest |activation|, its channel,
   token and cell, and the site's typical magnitude (median |x|).
2. Among the sites that a parameter writes directly (FFN down-projection output, attention output projection,
   LayerNorm outputs), take the strongest spike above both thresholds (absolute `min_abs` and relative
   `min_ratio` x typical). Turn it into candidates:
   - `ffn_down`: ``W[row=channel, col]`` of the down-projection, the column chosen as argmax |x_c * W[row, c]| on
     the input activation of the cell and position that carried the spike (re-run with that site kept);
   - `attn_out`: the same for the attention output projection (its input recovered by least squares when the
     projection is not called as a module);
   - `ln_weight` / `ln_bias`: the gain and bias entries at the spike channel of the norm that receives the write
     (post-norm) or whose output spikes.
3. Edit the primary candidate out (zero the scalar; zero gain and bias for a norm), re-trace, repeat. Stop when the
   strongest spike falls below `stop_fraction` x the first one, when a coordinate repeats, when nothing passes the
   thresholds, or after `max_rounds`.
Spikes between `near_miss` (0.25) x and 1 x the thresholds are reported as near-misses (``above_threshold=False``).
A weight-only screen (no forward pass) ranks outlier scalars and LN dimensions as a cheap first pass.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import _keys as K
from . import dist
from ._log import logger
from .adapters import Adapter, Site, get_adapter
from .instrument import ScalarEdit, Trace, edit

PRODUCING_KINDS = ("ffn_out", "attn_out", "norm1_out", "norm2_out", "gene_norm_out", "value_norm_out")


@dataclass
class ScanResult:
    """Candidates (superweights.tsv), per-site activations of the first round (activations.tsv), and how it ran."""

    candidates: pd.DataFrame
    activations: pd.DataFrame
    rounds: list[dict] = field(default_factory=list)
    stop_reason: str = ""
    params: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.candidates


def _materialise(batches) -> list:
    if isinstance(batches, Mapping) or hasattr(batches, "model_inputs"):  # one batch (e.g. a BatchEncoding)
        return [batches]
    return list(batches)


def _trace_round(adapter: Adapter, batches: list, sites: list[Site], edits: list[ScalarEdit],
                 groups: np.ndarray | None, progress: bool, desc: str,
                 ctx: dist.DistContext) -> tuple[Trace, list[np.ndarray]]:
    """Trace `batches` (under `edits`); with several processes (`ctx`), each traces a contiguous shard and every
    rank gets the merged trace, equal to one process's to the last bit (so every rank takes the same decisions)."""
    names = [s.name for s in sites]
    active = ctx.active
    mine = range(len(batches)) if not active else dist.shard(len(batches), ctx.rank, ctx.world)
    cells_per_batch = []
    state: dict = {}
    with dist.guard(ctx):
        if len(mine):
            with torch.no_grad(), edit(adapter, edits, verify=False), Trace(adapter, names, groups=groups) as tr:
                tr.keep_sums = active
                for i in tqdm(mine, desc=desc, disable=not progress, leave=False):
                    tr.run(batches[i])
                    cells_per_batch.append(np.asarray(tr._ctx.cells))
            state = tr.state() if active else {}
    if not active:
        return tr, cells_per_batch
    merged = Trace(adapter, names, groups=groups)  # never entered: holds the merged reductions only
    parts = dist.gather_objects((state, cells_per_batch), ctx)
    for st, _ in parts:
        merged.merge_state(st)
    return merged, [c for _, cells in parts for c in cells]


def _one_cell(batch, row: int) -> tuple[object, int]:
    """The cell at `row` of `batch` as a batch of one, and its row there (0); a batch type not known here (a dict
    of forward arguments) whole, and `row`.

    A capture needs one cell: its activations do not depend on the other cells of its batch (padding is masked),
    and a batch of one costs 1 / batch_size of the forward (the scan runs up to two captures per site).
    """
    if not dataclasses.is_dataclass(batch) or isinstance(batch, type):
        return batch, row
    n = len(np.asarray(getattr(batch, "cells", [])))
    if n <= 1:
        return batch, row
    cut = {f.name: (v[row:row + 1] if isinstance(v, torch.Tensor | np.ndarray) and v.ndim and v.shape[0] == n
                   else v)
           for f in dataclasses.fields(batch) for v in (getattr(batch, f.name),)}
    return dataclasses.replace(batch, **cut), 0


def _capture(adapter: Adapter, batch, site: str, edits: list[ScalarEdit], row: int, pos: int) -> torch.Tensor:
    """The full activation vector of `site` at (row, pos) of `batch`, under `edits` (one cell's forward)."""
    batch, row = _one_cell(batch, row)
    with torch.no_grad(), edit(adapter, edits, verify=False), Trace(adapter, [site], keep=[site],
                                                                    reductions=False) as tr:
        tr.run(batch)
    x = tr.full[site][0]
    x = x[None] if x.dim() == 2 else x
    return x[row, pos].double()


def _locate(cells_per_batch: list[np.ndarray], cell: int) -> tuple[int, int]:
    for i, cells in enumerate(cells_per_batch):
        hit = np.flatnonzero(cells == cell)
        if len(hit):
            return i, int(hit[0])
    msg = f"cell {cell} not found in the traced batches"
    raise RuntimeError(msg)


def _choose_col(adapter: Adapter, site: Site, W: torch.Tensor, row: int, batch, brow: int, pos: int,
                edits: list[ScalarEdit]) -> tuple[int, float, str]:
    """Input column of W[row, :] that contributes most to the spike: argmax |x_c * W[row, c]|."""
    if site.proj_input_site is not None:
        x = _capture(adapter, batch, site.proj_input_site, edits, brow, pos)
        how = "input activation"
    else:
        y = _capture(adapter, batch, site.name, edits, brow, pos)
        bias_name = site.proj_param.rsplit(".", 1)[0] + ".bias"
        try:
            y = y - adapter.param(bias_name).detach().double().cpu()
        except AttributeError:
            pass
        # numpy's LAPACK, not torch's: torch's (MKL) lstsq differed in the last bits between runs of the same
        # process (its kernels depend on memory alignment), so the table was not reproducible, nor equal across ranks
        x = torch.from_numpy(np.linalg.lstsq(W.double().cpu().numpy(), y.numpy(), rcond=None)[0])
        how = "input recovered by least squares"
    contrib = (x * W[row].double().cpu()).abs()
    col = int(contrib.argmax())
    return col, float(contrib[col]), how


def _norm_for(adapter: Adapter, norm_module: str) -> tuple[str | None, str | None]:
    weight, bias = f"{norm_module}.weight", f"{norm_module}.bias"
    names = dict(adapter.model.named_parameters())
    return (weight if weight in names else None), (bias if bias in names else None)


def scan(model, batches: Iterable | None = None, *, mode: str = "data", min_ratio: float = 20.0,
         min_abs: float = 0.0, near_miss: float = 0.25, max_rounds: int = 10, stop_fraction: float = 0.1,
         include_ln: bool = True, include_attn: bool = True, groups: np.ndarray | None = None,
         group_names: Sequence[str] | None = None, n_tokens: int = 256, seed: int = 0,
         progress: bool = False, ctx=None) -> ScanResult:
    """Iterative activation-spike search; see the module docstring. Returns a `ScanResult`.

    `ctx` (a `scsuperweight.dist.DistContext`; default `scsuperweight.dist.context()`: torchrun's ranks, or one
    process): with several processes every rank holds the same `batches`, traces a contiguous shard of them each
    round, and all ranks merge the reductions exactly, so every rank returns the one-process result (rank 0
    writes it).
    """
    adapter = get_adapter(model)
    ctx = dist.context() if ctx is None else ctx  # under torchrun: this rank's place; else one process
    if mode == "data_free":
        batches = [adapter.synthetic_batch(n_tokens=n_tokens, seed=seed)]
    elif mode == "data":
        if batches is None:
            msg = "mode='data' needs batches (e.g. from ssw.data.iter_batches); or use mode='data_free'."
            raise ValueError(msg)
        batches = _materialise(batches)
        if not batches:
            msg = "no batches to scan: the data produced no input."
            raise ValueError(msg)
    else:
        msg = f"mode must be 'data' or 'data_free', got {mode!r}."
        raise ValueError(msg)
    # every norm output with a gain/bias is an LN source (block norms, embedding norms, a final norm)
    ln_kinds = {s.kind for s in adapter.sites.values()
                if s.kind.endswith("_out") and (s.norm_weight or s.norm_bias)}
    allowed = {"ffn_out"} | ({"attn_out"} if include_attn else set()) | (ln_kinds if include_ln else set())
    producing = [s for s in adapter.sites.values() if s.kind in allowed]
    trace_sites = list(adapter.sites.values())
    params = dict(mode=mode, min_ratio=min_ratio, min_abs=min_abs, near_miss=near_miss, max_rounds=max_rounds,
                  stop_fraction=stop_fraction, include_ln=include_ln, include_attn=include_attn, n_tokens=n_tokens,
                  seed=seed, n_batches=len(batches))
    edits: list[ScalarEdit] = []
    rows: list[dict] = []
    rounds: list[dict] = []
    seen: set[str] = set()
    activations = pd.DataFrame()
    first_spike = None
    ran: Counter = Counter()  # cell forwards beside the rounds' traces (`scsuperweight.plan.scan_forwards`)
    stop_reason = f"round limit ({max_rounds}) reached"
    for rnd in range(max_rounds):
        tr, cells_per_batch = _trace_round(adapter, batches, trace_sites if rnd == 0 else producing, edits, groups,
                                           progress and ctx.is_main, f"scan round {rnd + 1}", ctx)
        ran["rounds"] += 1
        if rnd == 0:
            activations = tr.to_frame()
        spikes = [tr.summary(s.name) for s in producing if s.name in tr.stats]
        spikes.sort(key=lambda r: r["ratio"], reverse=True)
        passing = [s for s in spikes if s["ratio"] >= min_ratio and s["max_abs"] >= min_abs]
        if not passing:
            for s in spikes:
                if s["ratio"] >= near_miss * min_ratio and s["max_abs"] >= near_miss * min_abs:
                    rows.extend(_candidates_for(adapter, tr, s, batches, cells_per_batch, edits, rnd,
                                                above=False, seen=seen, group_names=group_names, ran=ran))
            stop_reason = "no spike passes the thresholds" if rnd == 0 else \
                f"no remaining spike passes the thresholds after {rnd} removal(s)"
            break
        best = passing[0]
        if first_spike is None:
            first_spike = best["max_abs"]
        elif best["max_abs"] < stop_fraction * first_spike:
            stop_reason = (f"strongest spike {best['max_abs']:.3g} fell below {stop_fraction} x the first "
                           f"({first_spike:.3g})")
            break
        new = _candidates_for(adapter, tr, best, batches, cells_per_batch, edits, rnd, above=True,
                              seen=seen, group_names=group_names, ran=ran)
        rounds.append({"round": rnd, "site": best["site_name"], "channel": best["channel"],
                       "spike": best["max_abs"], "ratio": best["ratio"], "token": best["token"]})
        if not new:
            stop_reason = f"coordinate repeated in round {rnd + 1}"
            break
        rows.extend(new)
        primary = [r for r in new if r["primary"]]
        for r in primary:
            idx = (r["row"],) if r["col"] is None else (r["row"], r["col"])
            edits.append(ScalarEdit(r["param"], idx, 0.0))
        # near-misses of the first round are worth reporting too
        if rnd == 0:
            for s in spikes:
                if s is best or s in passing:
                    continue
                if s["ratio"] >= near_miss * min_ratio:
                    rows.extend(_candidates_for(adapter, tr, s, batches, cells_per_batch, edits[:0], rnd,
                                                above=False, seen=seen, group_names=group_names, ran=ran))
        logger.info("round %d: %s channel %d spike %.3g (%.1fx typical) on %s", rnd + 1, best["site_name"],
                    best["channel"], best["max_abs"], best["ratio"], best["token"])
    frame = _finish(adapter, rows, min_abs, min_ratio, mode)
    params.update(n_rounds_traced=int(ran["rounds"]), n_captures=int(ran["captures"]), n_solves=int(ran["solves"]))
    return ScanResult(frame, activations, rounds, stop_reason, params)


def _candidates_for(adapter: Adapter, tr: Trace, spike: dict, batches: list, cells_per_batch, edits,
                    rnd: int, *, above: bool, seen: set[str], group_names, ran: Counter | None = None) -> list[dict]:
    site = adapter.sites[spike["site_name"]]
    st = tr.stats[site.name]
    ch = spike["channel"]
    gstab = st.group_stability(ch)
    if group_names is not None:
        gstab = {str(group_names[g]): v for g, v in gstab.items()}
    base = {"layer": site.layer, "spike": spike["max_abs"], "spike_ratio": spike["ratio"], "token": spike["token"],
            "stability": spike["stability"], "site": site.name, "channel": ch, "cell": spike["cell"],
            "position": spike["position"], "round": rnd, "above_threshold": above,
            "stability_by_group": json.dumps(gstab, sort_keys=True) if gstab else ""}
    out: list[dict] = []

    def add(kind: str, param: str, row: int, col: int | None, primary: bool, **extra) -> None:
        idx = (row,) if col is None else (row, col)
        cid = adapter.candidate_id(param, idx)
        if cid in seen:
            return
        seen.add(cid)
        out.append({**base, "candidate": cid, "kind": kind, "param": param, "row": row, "col": col,
                    "primary": primary, **extra})

    if site.kind in ("ffn_out", "attn_out") and site.proj_param:
        W = adapter.param(site.proj_param).detach().clone()
        for e in edits:  # the weight as the traced model saw it
            if e.param == site.proj_param:
                W[e.index] *= e.factor
        bi, brow = _locate(cells_per_batch, spike["cell"])
        if ran is not None:  # what the plan counts: one cell's forward per capture, a least-squares solve or not
            ran["captures"] += 1
            ran["solves"] += site.proj_input_site is None
        col, contrib, how = _choose_col(adapter, site, W, ch, batches[bi], brow, spike["position"], edits)
        kind = K.KIND_FFN_DOWN if site.kind == "ffn_out" else K.KIND_ATTN_OUT
        add(kind, site.proj_param, ch, col, True, contribution=contrib, col_from=how)
        if site.next_norm and adapter.post_norm:
            w, b = _norm_for(adapter, site.next_norm)
            for kind2, p in ((K.KIND_LN_WEIGHT, w), (K.KIND_LN_BIAS, b)):
                if p:
                    add(kind2, p, ch, None, False)
    elif site.norm_weight or site.norm_bias:
        for kind2, p in ((K.KIND_LN_WEIGHT, site.norm_weight), (K.KIND_LN_BIAS, site.norm_bias)):
            if p:
                add(kind2, p, ch, None, True)
    if not above:
        for r in out:
            r["primary"] = False
    return out


def _finish(adapter: Adapter, rows: list[dict], min_abs: float, min_ratio: float, mode: str) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=[*K.SUPERWEIGHT_COLUMNS, "screen", "above_threshold", "threshold_abs",
                                     "threshold_ratio", "rank"])
    df = pd.DataFrame(rows)
    df["value"] = [float(adapter.param(p).detach()[(r,) if c is None or pd.isna(c) else (r, int(c))])
                   for p, r, c in zip(df["param"], df["row"], df["col"])]
    df["col"] = df["col"].astype("Int64")
    df["screen"] = f"activation:{mode}"
    df["threshold_abs"] = min_abs
    df["threshold_ratio"] = min_ratio
    df = df.sort_values(["above_threshold", "round", "primary", "spike_ratio"],
                        ascending=[False, True, False, False], kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    cols = [*K.SUPERWEIGHT_COLUMNS, "rank", "screen", "above_threshold", "threshold_abs", "threshold_ratio"]
    return df[cols + [c for c in df.columns if c not in cols]]


def find_superweights(model, batches: Iterable | None = None, **options) -> pd.DataFrame:
    """Super-weight-like candidates with the `superweights.tsv` columns (see DESIGN.md); model-agnostic.

    Parameters
    ----------
    model
        A model with an adapter (scGPT, or a transformers BERT/Llama-family model), or an adapter.
    batches
        Re-iterable batches: `scsuperweight.data.Batch` objects for scGPT, or dicts of forward keyword
        arguments (e.g. a tokenizer's output) for transformers models. Not needed with ``mode="data_free"``.
    **options
        See `scan`: ``mode`` ("data" | "data_free"), ``min_ratio`` (spike / typical, default 20), ``min_abs``,
        ``near_miss``, ``max_rounds``, ``stop_fraction``, ``include_ln``, ``include_attn``, ``groups``.

    Returns
    -------
    DataFrame, one row per candidate, best first; ``above_threshold`` is False for near-misses.

    Examples
    --------
    >>> cands = find_superweights(model, batches)
    >>> cands.loc[0, ["kind", "layer", "row", "col", "token"]]
    """
    return scan(model, batches, **options).candidates


def screen_targets(adapter: Adapter) -> list[tuple[Site, str, str]]:
    """(site, candidate kind, parameter) of every parameter a screen ranks, once each: the projections that write
    a site (FFN down-projection, attention output) and the gain and bias of the norms whose output is a site."""
    out, seen = [], set()
    for site in adapter.sites.values():
        targets = []
        if site.proj_param:
            kind = K.KIND_FFN_DOWN if site.kind == "ffn_out" else K.KIND_ATTN_OUT
            targets.append((kind, site.proj_param))
        if site.kind.endswith("_out") and (site.norm_weight or site.norm_bias):
            targets += [(K.KIND_LN_WEIGHT, site.norm_weight), (K.KIND_LN_BIAS, site.norm_bias)]
        for kind, pname in targets:
            if pname and pname not in seen:
                seen.add(pname)
                out.append((site, kind, pname))
    return out


def weight_screen(model, *, top_k: int = 3, min_ratio: float = 10.0) -> pd.DataFrame:
    """Weight-only first pass (no forward pass): outlier scalars of projections and outlier LN dimensions.

    Score = |w| / median |w| of that parameter. Rows carry ``screen="weight_only"``; they are leads to test, never
    a verdict (post-norm models and genomic LMs show weight outliers that do not matter causally).
    """
    adapter = get_adapter(model)
    rows = []
    for site, kind, pname in screen_targets(adapter):
        w = adapter.param(pname).detach().float().cpu()
        a = w.abs()
        med = float(a.median())
        if kind == K.KIND_LN_WEIGHT:  # gains sit around 1: deviation from the typical gain is the outlier
            a = (w - w.median()).abs()
            med = float(a.median())
        if med == 0:
            continue
        flat = a.reshape(-1)
        k = min(top_k, flat.numel())
        vals, idx = flat.topk(k)
        for v, i in zip(vals.tolist(), idx.tolist()):
            ratio = v / med
            coord = np.unravel_index(i, tuple(w.shape))
            row, col = int(coord[0]), (int(coord[1]) if len(coord) > 1 else None)
            rows.append({"candidate": adapter.candidate_id(pname, coord), "kind": kind, "layer": site.layer,
                         "param": pname, "row": row, "col": col, "value": float(w.reshape(-1)[i]),
                         "spike": np.nan, "spike_ratio": np.nan, "token": "", "stability": np.nan,
                         "weight_ratio": ratio, "above_threshold": ratio >= min_ratio,
                         "screen": "weight_only", "threshold_ratio": min_ratio})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["col"] = df["col"].astype("Int64")
    df = df.sort_values("weight_ratio", ascending=False, kind="stable").reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df
