"""The HTML report: one self-contained page over a run's tables, figures and provenance.

The Hypotheses section is written from the numbers in the tables, never from canned text: each candidate's verdict
against the controls is read from the prune step's verdicts table (`scsuperweight.judge`, which owns the rule and
the p-values; the page applies that same function only to a run without the table or at another level), and what
follows (cell types, disease vs control, restoring the
activation, the dose–response curve, genes, terms) is read off the same tables. Disease vs control comes from the
prune step's own contrasts (contrasts.tsv), never approximated from per-group intervals; every count and level the
page states (random draws per parameter's pool, the interval level, cells) is read from the tables or the recorded
parameters, never written in. Everything that comes from the
data is passed through :func:`html.escape`; figures are embedded as base64 PNG and the page loads nothing else.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from scsuperweight import _keys
from scsuperweight import pl as _pl
from scsuperweight import results as R
from scsuperweight._fmt import ci as _ci
from scsuperweight._fmt import finite as _finite
from scsuperweight._fmt import num as _num
from scsuperweight._fmt import p as _p
from scsuperweight._io import atomic_write_text
from scsuperweight._log import logger
from scsuperweight.errors import DataError
from scsuperweight.judge import pool_labels, random_pools, verdicts
from scsuperweight.report.page import _CSS, _fig_html, _flatten, _html_table, _kv_table
from scsuperweight.report.record import _ci_label, _gather, _param, _plain, _run_state, _step_param
from scsuperweight.report.record import load_results as load_results
from scsuperweight.report.words import _e, _pair, _pct

__all__ = ["report", "load_results", "census_page"]

# The AD-vs-control contrasts the prune step computes (per cell type: Δ in case cells minus Δ in control cells, with
# a bootstrap interval): uns[key]["contrasts"] (tl.prune) and contrasts.tsv (cli prune, pipeline.run_pipeline).
UNS_CONTRASTS = R.spec("contrasts").uns_key
FILE_CONTRASTS = R.spec("contrasts").file
# the tables the page lists as present or absent, by uns key
_TABLE_FILES = {s.uns_key: s.file for s in R.TABLES.values()}


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Numbers in words
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    candidate: str
    status: str  # "passes" | "fails" | "not evaluable"
    baseline: float
    value: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    p_computed: bool  # p taken from the random draws here, the table had none
    n_random: int  # draws in the pool the candidate's p-value is taken against
    pool: str | None  # the parameter whose draws those are; None when the table does not label draws by parameter
    top_delta: float
    reason: str  # why it fails / what is missing, in words ("" for a pass)

    @classmethod
    def of(cls, r: pd.Series) -> _Verdict:
        """One row of the verdicts table (`scsuperweight.judge.verdicts`)."""
        pool = r.get("null_pool")
        passes = r.get("status") == "passes"
        return cls(str(r["candidate"]), str(r["status"]), float(r["baseline"]), float(r["value"]), float(r["delta"]),
                   float(r["ci_low"]), float(r["ci_high"]), float(r["p_value"]), r.get("p_source") == "draws",
                   int(r["n_random"]) if _finite(r.get("n_random")) else 0,
                   str(pool) if isinstance(pool, str) and pool else None, float(r["control_delta"]),
                   "" if passes or not isinstance(r.get("reason"), str) else r["reason"])


def _row(col: pd.DataFrame, cond: str, metric: str, group: str = _keys.GROUP_ALL) -> pd.Series | None:
    r = col[(col["condition"] == cond) & (col["metric"] == metric) & (col["group"] == group)]
    return r.iloc[0] if len(r) else None


def _verdict_table(res: dict, col: pd.DataFrame, metric: str, alpha: float, cands: list[str],
                   sw: pd.DataFrame | None) -> pd.DataFrame:
    """The prune step's verdicts when they judge these candidates on `metric` at `alpha`; otherwise (an older run,
    another metric or level asked for) the same rule, `judge.verdicts`, applied to the collapse table here."""
    v = res.get(_keys.UNS_VERDICTS)
    if isinstance(v, pd.DataFrame) and not v.empty and {"candidate", "metric", "status", "alpha"} <= set(v.columns):
        v = _zeroing_rows(v).assign(candidate=lambda d: d["candidate"].astype(str))
        ok = (v["metric"].astype(str) == metric).all() and np.allclose(pd.to_numeric(v["alpha"]), alpha)
        if ok and set(cands) <= set(v["candidate"]):
            return v.set_index("candidate", drop=False).loc[cands].reset_index(drop=True)
    a = _step_param(res, "prune", "alpha")
    level = 1 - float(a) if _finite(a) and 0 < float(a) < 1 else None
    return verdicts(col, primary_metric=metric, alpha=alpha, candidates=cands, ci_level=level, superweights=sw,
                    ablations=())


def _zeroing_rows(v: pd.DataFrame) -> pd.DataFrame:
    """The verdicts on zeroing (``ablation`` prune; a table from before the other ablations has only those)."""
    if "ablation" not in v.columns:
        return v
    a = v["ablation"].astype(str)
    return v[a.isin(["prune", "", "nan", "<NA>"])]


def _random_deltas(col: pd.DataFrame, metric: str, group: str = _keys.GROUP_ALL) -> np.ndarray:
    """Every random draw's Δ, all parameters' pools together (for spreads, not for p-values)."""
    r = col[(col["metric"] == metric) & (col["group"] == group) & col["condition"].str.startswith("random:")]
    d = r["delta"].to_numpy(dtype=float)
    return d[np.isfinite(d)]


def _candidate_order(res: dict, col: pd.DataFrame | None) -> list[str]:
    cands: list[str] = []
    sw = res.get(_keys.UNS_SUPERWEIGHTS)
    if isinstance(sw, pd.DataFrame) and "candidate" in sw.columns:
        s = sw.sort_values("rank", kind="stable") if "rank" in sw.columns else sw
        cands += [str(c) for c in s["candidate"]]
    if col is not None:
        cands += _pl._prune_candidates(col)
    return list(dict.fromkeys(cands))


def _describe(cand: str, sw: pd.DataFrame | None) -> str:
    """'ln_weight L2[17]' from the candidate's row (already escaped), else the id itself."""
    if sw is None or "candidate" not in sw.columns:
        return f"<code>{_e(cand)}</code>"
    r = sw[sw["candidate"].astype(str) == cand]
    if r.empty:
        return f"<code>{_e(cand)}</code>"
    r = r.iloc[0]
    idx = [_pl._fmt_channel(r.get(c)) for c in ("row", "col") if _finite(r.get(c))]
    kind = r.get("kind")
    kind = kind if isinstance(kind, str) else ""
    layer = r.get("layer")
    layer = _pl._fmt_channel(layer) if _finite(layer) else (layer if isinstance(layer, str) else "")
    txt = " ".join(p for p in (kind, f"L{layer}" if layer != "" else "") if p) + (f"[{', '.join(idx)}]" if idx else "")
    if not txt.strip():
        return f"<code>{_e(cand)}</code>"
    return f"{_e(txt.strip())} (<code>{_e(cand)}</code>)"


# ---------------------------------------------------------------------------------------------------------------
# Hypotheses, from the tables
# ---------------------------------------------------------------------------------------------------------------


def _verb(delta: float, metric: str) -> str:
    if not _finite(delta) or delta == 0:
        return "leaves"
    return "raises" if delta > 0 else "lowers"


def _judgement_sentence(v: _Verdict, metric: str, desc: str, ci: str) -> str:
    if v.status == "not evaluable" and not _finite(v.delta):
        return f"{desc}: no measurement of {_e(_pl.metric_label(metric))} on all cells."
    ptxt = _p(v.p_value)
    if v.n_random:
        ptxt += f" vs {v.n_random} random draws" + (f" of <code>{_e(v.pool)}</code>" if v.pool else "")
    if v.p_computed:
        ptxt += ", computed here from the draws"
    top = (f"; the largest-other-weights control moves it by {_num(v.top_delta, signed=True)}"
           if _finite(v.top_delta) else "; the largest-other-weights control was not run")
    b, a = _pair(v.baseline, v.value)
    s = (f"Zeroing {desc} {_verb(v.delta, metric)} {_e(_pl.metric_label(metric))} from {b} "
         f"to {a} (Δ {_num(v.delta, signed=True)}, {ci} {_ci(v.ci_low, v.ci_high)}; {ptxt}){top}.")
    return s


def _cell_type_text(res: dict, col: pd.DataFrame, cand: str, metric: str, ci: str) -> list[str]:
    cond = _keys.cond_prune(cand)
    sub = col[(col["condition"] == cond) & (col["metric"] == metric) & (col["group"] != _keys.GROUP_ALL)]
    if sub.empty:
        return ["No per-cell-type measurements for this candidate (run ssw.tl.prune with a label key).",
                *_contrast_text(res, cand, metric)]
    split = _pl._split_groups(list(sub["group"]))
    rows = [(g, *split[g]) for g in sub["group"]]
    sub = sub.assign(_label=[r[1] for r in rows], _cond=[r[2] for r in rows], _contrast=[r[3] for r in rows])
    sub = sub.assign(_w=_pl._worse(sub["delta"], metric))
    out: list[str] = []
    # 1. which cell types collapse most: per-label rows if there are any, else the mean over conditions
    plain = sub[sub["_cond"].isna() & sub["_contrast"].isna() & (sub["_label"] != "all cells")]
    if plain.empty:
        paired = sub[sub["_cond"].notna() & (sub["_label"] != "all cells")]
        per = paired.groupby("_label").agg(delta=("delta", "mean"), _w=("_w", "mean"))
        per["ci_low"] = np.nan
        per["ci_high"] = np.nan
        how = " (mean over conditions)"
    else:
        per = plain.set_index("_label")[["delta", "_w", "ci_low", "ci_high"]]
        how = ""
    per = per[np.isfinite(per["_w"].to_numpy(float))].sort_values("_w", ascending=False, kind="stable")
    if len(per):
        worst = [f"{_e(lab)} (Δ {_num(r['delta'], signed=True)}"
                 + (f", {ci} {_ci(r['ci_low'], r['ci_high'])})" if _finite(r["ci_low"]) else ")")
                 for lab, r in per.head(3).iterrows()]
        txt = f"Cell types that move most{how}: " + "; ".join(worst) + "."
        if len(per) > 3:
            lab, r = per.index[-1], per.iloc[-1]
            txt += f" Least affected: {_e(lab)} (Δ {_num(r['delta'], signed=True)})."
        out.append(txt)
    # 2. disease vs control: the prune step's own contrasts, never an approximation from the groups above
    out.extend(_contrast_text(res, cand, metric))
    return out


def _contrast_names(con: pd.DataFrame) -> tuple[str, str]:
    """(case, control) as the contrasts table names them: its ``case`` / ``control`` columns, else its
    ``contrast`` column ("AD - control"), else its two ``delta_<condition>`` columns in order."""
    if {"case", "control"} <= set(con.columns):
        pairs = con[["case", "control"]].dropna().astype(str).drop_duplicates()
        if len(pairs) == 1 and all(pairs.iloc[0]):
            return pairs.iloc[0]["case"], pairs.iloc[0]["control"]
    if "contrast" in con.columns:
        for c in con["contrast"].dropna().astype(str):
            parts = c.split(" - ")
            if len(parts) == 2 and all(x.strip() for x in parts):
                return parts[0].strip(), parts[1].strip()
    deltas = [c[len("delta_"):] for c in con.columns if c.startswith("delta_")]
    if len(deltas) == 2:
        return deltas[0], deltas[1]
    return "case", "control"


def _contrast_ci(con: pd.DataFrame) -> str:
    """The contrasts' interval label: its level when the table records one (``ci_level`` or ``alpha``)."""
    for c, to_level in (("ci_level", lambda v: v if v > 1 else 100 * v), ("alpha", lambda v: 100 * (1 - v))):
        if c in con.columns:
            v = pd.to_numeric(con[c], errors="coerce").dropna().unique()
            if len(v) == 1 and 0 < to_level(float(v[0])) < 100:
                return f"{to_level(float(v[0])):g}% bootstrap CI"
    return "bootstrap CI"


def _contrast_title(res: dict, sep: str = "-vs-") -> str:
    """'<case>-vs-<control>' (or '<case> − <control>' with ``sep=" − "``) as the run named them: the contrasts
    table, else the case and control the prune step recorded; 'AD-vs-control' when neither says."""
    con = res.get(UNS_CONTRASTS)
    if isinstance(con, pd.DataFrame) and len(con):
        case, ctrl = _contrast_names(con)
    else:
        case, ctrl = _step_param(res, "prune", "case"), _step_param(res, "prune", "control")
        if case is None or ctrl is None:
            case, ctrl = _param(res, "case"), _param(res, "control")
        if case is None or ctrl is None:
            case, ctrl = "AD", "control"
    return f"{_e(str(case))}{sep}{_e(str(ctrl))}"


def _no_contrast_reason(res: dict) -> str | None:
    """Why there is no case-vs-control contrast to report, or None when the contrasts table has rows."""
    con = res.get(UNS_CONTRASTS)
    if isinstance(con, pd.DataFrame) and len(con):
        return None
    if not isinstance(con, pd.DataFrame):
        return (f"there is no contrasts table ({FILE_CONTRASTS}, written by the prune step, is absent from this run), "
                "and the report does not approximate one from the per-condition rows of collapse.tsv")
    ck = _param(res, "condition_key")
    if not ck:
        why = ("no condition column was given to the prune step (condition_key is not set in the run's "
               "parameters), so there are no disease and control cells to contrast")
    else:
        mg = _step_param(res, "prune", "min_group_cells")
        need = f"{int(mg)} cells" if _finite(mg) else "enough cells (min_group_cells)"
        why = (f"although condition_key <code>{_e(ck)}</code> was given, the prune step contrasts only when that "
               f"column has exactly two values and a cell type has at least {need} in each of them")
    return f"{FILE_CONTRASTS} has no rows: {why}"


def _contrast_text(res: dict, cand: str, metric: str) -> list[str]:
    """Sentences on whether disease cells lose more than control cells, read off the prune step's contrasts."""
    why = _no_contrast_reason(res)
    if why is not None:
        return [f"No {_contrast_title(res)} contrast: {why}."]
    con = res[UNS_CONTRASTS]
    lack = sorted({"condition", "metric", "group", "difference", "ci_low", "ci_high"} - set(con.columns))
    if lack:
        return [f"No {_contrast_title(res)} contrast: the contrasts table lacks column(s) {_e(', '.join(lack))}."]
    cond = _keys.cond_prune(cand)
    mine = con[con["condition"].astype(str) == cond]
    sub = mine[mine["metric"].astype(str) == metric]
    if sub.empty:
        have = list(dict.fromkeys(mine["metric"].astype(str)))
        where = (f"it has {_e(', '.join(have))} for this candidate, not {_e(metric)}" if have
                 else "this candidate is not in it")
        return [f"No {_contrast_title(res)} contrast on {_e(metric)}: {FILE_CONTRASTS} has {len(con)} row(s), but "
                f"{where}."]
    case, ctrl = _contrast_names(sub)
    ci = _contrast_ci(sub)
    hib = _pl._higher_is_better(metric)
    lose = "lose more" if hib is not None else "move more"
    rows = []
    for _, r in sub.iterrows():
        d, lo, hi = r["difference"], r["ci_low"], r["ci_high"]
        if not _finite(d):
            continue
        da, db = r.get(f"delta_{case}"), r.get(f"delta_{ctrl}")
        if hib is not None:
            wg = float(_pl._worse(float(d), metric))  # positive: case cells lose more
        elif _finite(da) and _finite(db):
            wg = abs(float(da)) - abs(float(db))
        else:
            wg = float("nan")
        resolved = _finite(lo) and _finite(hi) and (float(lo) > 0 or float(hi) < 0)
        rows.append((str(r["group"]), r, float(d), wg, resolved))
    if not rows:
        return [f"No {_contrast_title(res)} contrast: {FILE_CONTRASTS} has rows for this candidate on "
                f"{_e(metric)}, but none with a finite difference."]
    units = sorted({str(r["bootstrap_unit"]) for _, r, *_ in rows
                    if "bootstrap_unit" in sub.columns and isinstance(r["bootstrap_unit"], str)})
    over = f", resampling {' or '.join(_e(u) for u in units)}" if units else ""
    n = len(rows)
    n_more = sum(wg > 0 for *_, wg, _ in rows if _finite(wg))
    res_rows = sorted([x for x in rows if x[4]], key=lambda x: -abs(x[2]))
    txt = (f"{_e(case)} − {_e(ctrl)} contrasts from {FILE_CONTRASTS} (per cell type, Δ in {_e(case)} cells minus Δ "
           f"in {_e(ctrl)} cells, {ci}{over}): {_e(case)} cells {lose} than {_e(ctrl)} cells in {n_more} of {n} "
           f"cell types by the point estimate; the interval excludes 0 in {len(res_rows)} of {n}")
    if res_rows:
        txt += ": " + "; ".join(f"{_e(lab)} {_num(d, signed=True)} ({ci} {_ci(r['ci_low'], r['ci_high'])})"
                                for lab, r, d, _, _ in res_rows[:3])
        if len(res_rows) > 3:
            txt += f"; and {len(res_rows) - 3} more (see the contrasts table)"
    out = [txt + "."]
    lab, r, d, wg, resolved = max(rows, key=lambda x: abs(x[3]) if _finite(x[3]) else abs(x[2]))
    da, db = r.get(f"delta_{case}"), r.get(f"delta_{ctrl}")
    txt = f"The largest contrast is in {_e(lab)}: "
    if _finite(da) and _finite(db):
        txt += f"{_e(case)} Δ {_num(da, signed=True)} vs {_e(ctrl)} Δ {_num(db, signed=True)}, "
    txt += f"difference {_num(d, signed=True)}"
    if _finite(r["ci_low"]) and _finite(r["ci_high"]):
        txt += f" ({ci} {_ci(r['ci_low'], r['ci_high'])}"
    else:
        txt += " (no interval in the table"
    nc, nk = r.get("n_case"), r.get("n_control")
    if _finite(nc) and _finite(nk):
        txt += f"; {int(nc)} {_e(case)} and {int(nk)} {_e(ctrl)} cells"
    txt += ")"
    if _finite(r["ci_low"]) and _finite(r["ci_high"]):
        txt += ("; the interval includes 0, so the difference is not resolved" if not resolved
                else f"; {_e(case) if wg > 0 else _e(ctrl)} cells {lose}" if _finite(wg) else "")
    out.append(txt + ".")
    return out


def _restore_text(col: pd.DataFrame, cand: str, metric: str, v: _Verdict, ci: str) -> str:
    r = _row(col, _keys.cond_restore(cand), metric)
    if r is None or not _finite(r["delta"]):
        return "No restore control was run for this candidate (zero the weight, patch the activation back)."
    dr = float(r["delta"])
    txt = (f"Restoring the activation while the weight stays zeroed takes Δ from {_num(v.delta, signed=True)} "
           f"to {_num(dr, signed=True)}")
    if _finite(r["ci_low"]):
        txt += f" ({ci} {_ci(r['ci_low'], r['ci_high'])})"
    if _finite(v.delta) and abs(v.delta) > 0:
        frac = 1.0 - dr / v.delta
        txt += f": {_pct(frac)} of the effect recovered"
        if frac > 1.05:
            txt += " (it overshoots the baseline)"
        elif frac < 0:
            txt += " (restoring makes it worse: the effect does not run through that activation)"
        elif frac >= 0.5:
            txt += ", so the effect runs mostly through the activation"
        else:
            txt += ", so most of the effect does not run through that activation"
    return txt + "."


def _scaling_text(col: pd.DataFrame, cand: str, metric: str) -> str:
    pts = _pl._scale_points(col, metric)
    pts = pts[(pts["candidate"] == cand) & np.isfinite(pts["value"].to_numpy(float))]
    if len(pts) < 3:
        return "No scaling sweep (fewer than 3 scale factors) for this candidate."
    f, y = pts["factor"].to_numpy(float), pts["value"].to_numpy(float)
    base = _pl._baseline_value(col, metric)
    rand = _random_deltas(col, metric)
    tol = float(np.std(rand)) if rand.size >= 2 else 0.0
    tol = max(tol, 1e-9 + 1e-6 * (abs(base) if _finite(base) else 1.0))
    rng = float(y.max() - y.min())
    dy = np.diff(y)
    if rng <= tol:
        shape = "flat (every point within the random-control spread)"
    elif (dy >= -tol).all():
        shape = "rising with the factor"
    elif (dy <= tol).all():
        shape = "falling with the factor"
    elif 0 < int(y.argmin()) < len(y) - 1 and min(y[0], y[-1]) > y.min() + tol:
        shape = f"U-shaped, lowest at ×{f[y.argmin()]:g}"
    elif 0 < int(y.argmax()) < len(y) - 1 and max(y[0], y[-1]) < y.max() - tol:
        shape = f"inverted-U-shaped, highest at ×{f[y.argmax()]:g}"
    else:
        shape = "non-monotone"
    hib = _pl._higher_is_better(metric)
    txt = (f"Scaling it from ×{f.min():g} to ×{f.max():g} ({len(f)} points) gives a curve that is {shape}; "
           f"{_num(y[f.argmin()])} at ×{f.min():g}, {_num(y[f.argmax()])} at ×{f.max():g}"
           + (f", baseline {_num(base)} at ×1" if _finite(base) else "") + ".")
    if hib is not None and _finite(base):
        best = int(y.argmax() if hib else y.argmin())
        gain = (y[best] - base) if hib else (base - y[best])
        if gain > tol and not np.isclose(f[best], 1.0):
            txt += (f" The best value is at ×{f[best]:g} ({_num(y[best])}), better than baseline by {_num(gain)}: "
                    f"more than the random-control spread, worth a replicate.")
    return txt


def _genes_text(res: dict, cand: str, n: int = 8) -> str:
    g = res.get(_keys.UNS_GENES)
    if not isinstance(g, pd.DataFrame) or not {"candidate", "gene"} <= set(g.columns):
        return "Genes were not scored (run ssw.tl.genes)."
    g = g[g["candidate"].astype(str) == cand]
    if g.empty:
        return "No genes were scored for this candidate."
    if "rank" in g.columns and pd.to_numeric(g["rank"], errors="coerce").notna().any():
        g = g.assign(_r=pd.to_numeric(g["rank"], errors="coerce")).sort_values("_r", kind="stable")
    elif "score" in g.columns:
        g = g.assign(_s=pd.to_numeric(g["score"], errors="coerce")).sort_values("_s", ascending=False)
    items = [f"{_e(r['gene'])}" + (f" ({_num(r['score'])})" if _finite(r.get("score")) else "")
             for _, r in g.head(n).iterrows()]
    return f"Top genes riding on it (score): {', '.join(items)}."


def _terms_text(res: dict, cand: str, fdr_max: float = 0.05, n: int = 5) -> str:
    en = res.get(_keys.UNS_ENRICHMENT)
    if not isinstance(en, pd.DataFrame) or not {"candidate", "term", "fdr"} <= set(en.columns):
        return "No enrichment was run (run ssw.tl.enrich)."
    en = en[en["candidate"].astype(str) == cand].assign(_f=lambda d: pd.to_numeric(d["fdr"], errors="coerce"))
    en = en[en["_f"].notna()].sort_values("_f", kind="stable")
    if en.empty:
        return "No enrichment results for this candidate."

    def item(r) -> str:
        bits = []
        if "gene_set" in r and isinstance(r["gene_set"], str) and r["gene_set"]:
            bits.append(_e(r["gene_set"]))
        if _finite(r.get("nes")):
            bits.append(f"NES {_num(r['nes'], signed=True)}")
        elif _finite(r.get("odds_ratio")):
            bits.append(f"OR {_num(r['odds_ratio'])}")
        bits.append(f"FDR {_num(r['_f'])}")
        return f"{_e(r['term'])} ({'; '.join(bits)})"

    sig = en[en["_f"] < fdr_max]
    if len(sig):
        return (f"Enriched terms (FDR < {fdr_max:g}, {len(sig)} in all): "
                + ", ".join(item(r) for _, r in sig.head(n).iterrows()) + ".")
    return f"No term reaches FDR < {fdr_max:g}; the best is {item(en.iloc[0])}."


def _hypotheses(res: dict, metric: str | None, alpha: float) -> tuple[str, list[_Verdict], str | None]:
    col = res.get(_keys.UNS_COLLAPSE)
    if not isinstance(col, pd.DataFrame) or col.empty:
        return ("<p class='skip'>No hypotheses: the collapse table is absent (run ssw.tl.prune). Without ablation "
                "against controls no candidate can be judged.</p>", [], None)
    col = _pl._prepare_collapse(col)
    metric = _pl._resolve_metric(col, metric)
    sw = res.get(_keys.UNS_SUPERWEIGHTS)
    sw = sw if isinstance(sw, pd.DataFrame) else None
    cands = [c for c in _candidate_order(res, col) if _row(col, _keys.cond_prune(c), metric) is not None]
    ci = _ci_label(res)
    verdicts = [_Verdict.of(r) for _, r in _verdict_table(res, col, metric, alpha, cands, sw).iterrows()]
    level = "" if ci != "CI" else " (the interval's level is not recorded in the run's parameters)"
    parts = [
        f"<p class='rule'><b>Rule.</b> A candidate passes the controls when, on the primary metric "
        f"<b>{_e(_pl.metric_label(metric))}</b> (<code>{_e(metric)}</code>, all cells), zeroing it gives "
        f"(1) p &lt; {alpha:g} against the random draws of the same parameter, (2) an |Δ| larger than zeroing the "
        f"largest other weights (<code>top_outliers</code>), and (3) a {ci} of Δ that excludes 0{level}.</p>"
    ]
    passing = [v for v in verdicts if v.status == "passes"]
    if not verdicts:
        parts.append("<p class='verdict none'>No candidate was ablated on this metric, so none can be judged.</p>")
    elif not passing:
        parts.append(f"<p class='verdict none'><b>No candidate passes the controls</b> on {_e(metric)}: none of "
                     f"the {len(verdicts)} candidate(s) meets all three conditions.</p>")
    else:
        names = ", ".join(f"<code>{_e(v.candidate)}</code>" for v in passing)
        parts.append(f"<p class='verdict pass'><b>{len(passing)} of {len(verdicts)} candidate(s) pass the "
                     f"controls</b> on {_e(metric)}: {names}.</p>")
    parts.append("<ol class='hyp'>")
    for v in verdicts:
        desc = _describe(v.candidate, sw)
        badge = {"passes": "pass", "fails": "fail"}.get(v.status, "na")
        li = [f"<span class='badge {badge}'>{_e(v.status)}</span> {_judgement_sentence(v, metric, desc, ci)}"]
        if v.reason:
            li.append(f"<div class='why'>Does not pass because: {_e(v.reason)}.</div>" if v.status == "fails" else
                      f"<div class='why'>Cannot be judged: {_e(v.reason)}.</div>")
        parts.append("<li>" + "".join(li) + "</li>")
    parts.append("</ol>")

    # Follow-ups: for every passing candidate; when none passes, for the strongest one, flagged as exploratory.
    follow = passing
    if not passing and verdicts:
        meas = [v for v in verdicts if _finite(v.delta)]
        if meas:
            follow = [max(meas, key=lambda v: float(_pl._worse(v.delta, metric)))]
    for v in follow:
        head = ("What rides on" if v.status == "passes" else "Exploratory only (it did not pass): the largest "
                "effect,")
        parts.append(f"<h3>{head} <code>{_e(v.candidate)}</code></h3><ul class='follow'>")
        for s in _cell_type_text(res, col, v.candidate, metric, ci):
            parts.append(f"<li>{s}</li>")
        parts.append(f"<li>{_restore_text(col, v.candidate, metric, v, ci)}</li>")
        parts.append(f"<li>{_scaling_text(col, v.candidate, metric)}</li>")
        parts.append(f"<li>{_genes_text(res, v.candidate)}</li>")
        parts.append(f"<li>{_terms_text(res, v.candidate)}</li>")
        parts.append("</ul>")
    note = _random_note(res, random_pools(col, metric), metric)
    if note:
        parts.append(f"<p class='note'>{note}</p>")
    return "\n".join(parts), verdicts, metric


# ---------------------------------------------------------------------------------------------------------------
# Zero vs mean, and granularity (the verdicts table's other ablations; presentation only)
# ---------------------------------------------------------------------------------------------------------------
_ABLATION_WORDS = {
    "prune": "zeroed", "mean": "mean (its contribution replaced by its mean)",
    "mean_activation": "mean activation (the spike channel set to its mean at the spike token)",
    "neuron": "neuron (its FFN unit cut in and out)", "channel": "channel (every write to its residual channel "
    "in the block)", "joint": "joint (every passing candidate zeroed together)",
}


def _all_verdicts(res: dict, col: pd.DataFrame, metric: str, alpha: float) -> pd.DataFrame:
    """Every ablation's verdict: the prune step's table when it judges `metric` at `alpha`, else the same rule
    (`judge.verdicts`) over the collapse table."""
    v = res.get(_keys.UNS_VERDICTS)
    if isinstance(v, pd.DataFrame) and not v.empty and {"ablation", "metric", "alpha", "status"} <= set(v.columns):
        if (v["metric"].astype(str) == metric).all() and np.allclose(pd.to_numeric(v["alpha"]), alpha):
            return v
    a = _step_param(res, "prune", "alpha")
    level = 1 - float(a) if _finite(a) and 0 < float(a) < 1 else None
    return verdicts(col, primary_metric=metric, alpha=alpha, ci_level=level)


def _status(v: pd.DataFrame, cand: str, ablation: str) -> pd.Series | None:
    r = v[(v["candidate"].astype(str) == cand) & (v["ablation"].astype(str) == ablation)]
    return r.iloc[0] if len(r) else None


def _zero_vs_mean_text(cand: str, z: pd.Series | None, m: pd.Series | None) -> str | None:
    if z is None or m is None:
        return None
    zp, mp = z["status"] == "passes", m["status"] == "passes"
    d = f"Δ {_num(z['delta'], signed=True)} zeroed, {_num(m['delta'], signed=True)} at its mean"
    head = f"<code>{_e(cand)}</code>: "
    if zp and not mp:
        return (head + f"zeroing passes the controls but mean ablation does not ({d}): what breaks is the loss of "
                "its average contribution, an offset the model relies on, not its variation across cells; "
                "zeroing alone over-states what the weight does.")
    if zp and mp:
        return (head + f"zeroing and mean ablation both pass ({d}): its variation across cells and tokens carries "
                "the effect, not only its average.")
    if mp:
        return head + f"mean ablation passes where zeroing does not ({d})."
    return head + f"neither zeroing nor mean ablation passes ({d})."


def _granularity_text(cand: str, v: pd.DataFrame) -> str | None:
    got = [(a, _status(v, cand, a)) for a in ("prune", "neuron", "channel")]
    got = [(a, r) for a, r in got if r is not None]
    if len(got) < 2:
        return None
    words = {"prune": "the scalar", "neuron": "its neuron", "channel": "its channel"}
    parts = [f"{words[a]} {_e(r['status'])} (Δ {_num(r['delta'], signed=True)}, {_p(r['p_value'])} vs "
             f"{int(r['n_random']) if _finite(r['n_random']) else 0} draws of <code>{_e(r['null_pool'])}</code>)"
             for a, r in got]
    txt = f"<code>{_e(cand)}</code>: " + "; ".join(parts) + "."
    status = dict((a, r["status"]) for a, r in got)
    if status.get("prune") != "passes" and "passes" in (status.get("neuron"), status.get("channel")):
        txt += (" The larger unit matters where the single scalar does not: the effect is spread over the unit's "
                "weights, a claim about the unit rather than a super weight.")
    return txt


def _ablations_section(res: dict, metric: str | None, alpha: float) -> str:
    col = res.get(_keys.UNS_COLLAPSE)
    if not isinstance(col, pd.DataFrame) or col.empty or metric is None:
        return "<p class='skip'>No collapse table: nothing to compare.</p>"
    v = _all_verdicts(res, _pl._prepare_collapse(col), metric, alpha)
    if "ablation" not in v.columns or not (v["ablation"].astype(str) != "prune").any():
        return ("<p class='skip'>Only zeroing was run: the collapse table has no mean, mean-activation, neuron, "
                "channel or joint conditions (prune options <code>--granularities</code>, "
                "<code>--no-mean-ablation</code>).</p>")
    parts = [f"<p>Each candidate's ablations on <b>{_e(_pl.metric_label(metric))}</b> (<code>{_e(metric)}</code>, "
             "all cells), judged by the same rule as zeroing, each against its own null: the same parameter's "
             "random scalars for zero and mean, random neurons or channels of the same block for a neuron or a "
             "channel, random sets of as many scalars of the same parameters for the joint ablation. "
             "<i>p matched</i> is against random scalars from the candidate's own |w| quantile bin "
             "(information, not part of the rule).</p>"]
    order = list(dict.fromkeys(v.loc[v["ablation"].astype(str) == "prune", "candidate"].astype(str)))
    rows, zm, gr = [], [], []
    for cand in order:
        for a in ("prune", "mean", "mean_activation", "neuron", "channel"):
            r = _status(v, cand, a)
            if r is not None:
                rows.append({"candidate": cand, "ablation": _ABLATION_WORDS[a], "Δ": _num(r["delta"], signed=True),
                             "interval": _ci(r["ci_low"], r["ci_high"]), "p": _p(r["p_value"]),
                             "draws": f"{int(r['n_random']) if _finite(r['n_random']) else 0} of {r['null_pool']}",
                             "p matched": _p(r["p_matched"]) if _finite(r.get("p_matched")) else "",
                             "verdict": r["status"]})
        zm.append(_zero_vs_mean_text(cand, _status(v, cand, "prune"), _status(v, cand, "mean")))
        gr.append(_granularity_text(cand, v))
    j = v[v["ablation"].astype(str) == "joint"]
    for _, r in j.iterrows():
        rows.append({"candidate": str(r["candidate"]), "ablation": _ABLATION_WORDS["joint"],
                     "Δ": _num(r["delta"], signed=True), "interval": _ci(r["ci_low"], r["ci_high"]),
                     "p": _p(r["p_value"]), "draws": f"{int(r['n_random']) if _finite(r['n_random']) else 0} of "
                     f"{r['null_pool']}", "p matched": "", "verdict": r["status"]})
    zm, gr = [t for t in zm if t], [t for t in gr if t]
    if zm:
        parts.append("<h3>Zero vs mean</h3><ul>" + "".join(f"<li>{t}</li>" for t in zm) + "</ul>")
    if gr:
        parts.append("<h3>Granularity</h3><ul>" + "".join(f"<li>{t}</li>" for t in gr) + "</ul>")
    if len(j):
        r = j.iloc[0]
        parts.append(f"<p>Joint ablation of <code>{_e(r['candidate'])}</code>: {_e(r['status'])} "
                     f"(Δ {_num(r['delta'], signed=True)}, {_p(r['p_value'])}).</p>")
    parts.append(_html_table(pd.DataFrame(rows), max_rows=60, max_chars=60))
    return "\n".join(parts)


def _random_note(res: dict, pools: dict, metric: str) -> str:
    """How many random draws there are, per pool, counted in the collapse table (and checked against n_random)."""
    if not pools:
        return ""
    sizes = {k: int(v.size) for k, v in pools.items()}
    total = sum(sizes.values())
    where = f"counted in collapse.tsv on {_e(metric)}, all cells"
    if None in sizes:
        txt = (f"Random controls: {total} draws ({where}), each zeroing one random scalar of a candidate's parameter; "
               f"the table does not say which parameter each draw belongs to (no <code>control_for</code>), so every "
               f"candidate is compared with all {total}.")
    else:
        names = ", ".join(f"<code>{_e(k)}</code>" for k in sizes)
        uniq = sorted(set(sizes.values()))
        if len(uniq) == 1:
            per = (f"{uniq[0]} draws for each of {len(sizes)} parameter(s) ({names}; {total} in all)" if len(sizes) > 1
                   else f"{uniq[0]} draws of {names}")
        else:
            per = "; ".join(f"{n} of <code>{_e(k)}</code>" for k, n in sizes.items()) + f" ({total} in all)"
        txt = (f"Random controls ({where}): each draw zeroes one random scalar of the same parameter as a candidate; "
               f"{per}. Each candidate's p-value is taken against its own parameter's draws only.")
    rec = _param(res, "n_random")
    if _finite(rec) and any(n != int(rec) for n in sizes.values()) and None not in sizes:
        txt += (f" The run records n_random = {int(rec)} per parameter; the counts above are the draws collapse.tsv "
                f"holds with a finite {_e(metric)}, which the p-values were taken against.")
    elif _finite(rec) and None in sizes:
        txt += f" The run records n_random = {int(rec)}."
    return txt


def _caveats(res: dict, verdicts: list[_Verdict], metric: str | None, alpha: float) -> str:
    run = res.get(_keys.UNS_RUN) or {}
    params = run.get("params") or {}
    data = run.get("data") or {}
    items = []
    sw = res.get(_keys.UNS_SUPERWEIGHTS)
    kinds = sorted(set(sw["kind"].astype(str))) if isinstance(sw, pd.DataFrame) and "kind" in sw.columns else []
    items.append(
        "scGPT blocks are post-LayerNorm: a spike written by <code>linear2</code> is rescaled by the next norm, so "
        "zeroing an <code>ffn_down</code> scalar can be causally weak while LayerNorm gain/bias dimensions matter. "
        "A weak ffn_down effect is not evidence that the model has no super-weight-like parameter."
        + (f" Candidate kinds tested here: {', '.join(_e(k) for k in kinds)}." if kinds else ""))
    blob = json.dumps(_plain(data), default=str).lower() + json.dumps(_plain(params), default=str).lower()
    if re.search(r"(?<![a-z])(synthetic|demo)(?![a-z])", blob):
        items.append("The data are synthetic (the demo generator): cell types, the disease effect and marker genes "
                     "are planted, so these results test the pipeline, not biology.")
    else:
        src = data.get("path") or data.get("source") or "the input data"
        items.append(f"Data: {_e(src)}. Findings hold for this model on these cells; replicate on independent "
                     "donors before reading them as biology.")
    if not _param(res, "donor_key"):
        items.append("No donor key was recorded: if intervals resample cells rather than donors, they are too "
                     "narrow for claims about donors.")
    ns = sorted({v.n_random for v in verdicts if v.n_random})
    per = " per parameter" if any(v.pool for v in verdicts) else ""
    if ns:
        lo_n, hi_n = ns[0], ns[-1]
        floor_hi, floor_lo = 1.0 / (lo_n + 1), 1.0 / (hi_n + 1)
        if lo_n == hi_n:
            txt = f"With {lo_n} random draws{per} the smallest empirical p-value is 1/{lo_n + 1} = {floor_hi:.2g}"
        else:
            txt = (f"With {lo_n} to {hi_n} random draws{per} the smallest empirical p-value is 1/{lo_n + 1} = "
                   f"{floor_hi:.2g} to 1/{hi_n + 1} = {floor_lo:.2g}")
        if floor_lo >= alpha:
            txt += f": at α = {alpha:g} no candidate can pass on an empirical p; run more draws (n_random)."
        elif floor_hi >= alpha:
            txt += (f": at α = {alpha:g} a candidate whose parameter has the smaller pool cannot pass on an "
                    "empirical p; run more draws (n_random).")
        else:
            txt += "; rankings among candidates at that floor are not resolved."
        items.append(txt)
    elif verdicts:
        items.append("No random draws of the candidates' parameters were found, so the main control is missing.")
    col = res.get(_keys.UNS_COLLAPSE)
    if isinstance(col, pd.DataFrame) and {"metric", "group", "condition"} <= set(col.columns):
        nm, ng = col["metric"].nunique(), col["group"].nunique()
        items.append(f"Multiple testing: {len(verdicts)} candidate(s) were judged on one primary metric "
                     f"({_e(metric)}) without correction; the collapse table holds {nm} metric(s) × {ng} group(s), "
                     "so per-cell-type and secondary-metric effects are exploratory. Gene-set FDRs are corrected "
                     "within each enrichment run only.")
    items.append("Passing the rule shows a parameter this model depends on, on these cells; it does not show that "
                 "the genes or pathways on that channel are the cause.")
    return "<ul class='caveats'>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


# ---------------------------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------------------------


def _label_key(res: dict, adata) -> str | None:
    v = _param(res, "label_key", "cell_type_key")
    if isinstance(v, str) and v in adata.obs.columns:
        return v
    for c in adata.obs.columns:
        s = adata.obs[c]
        if (isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object) and 1 < s.nunique() <= 50:
            return c
    return None


def _figures(res: dict, adata, metric: str | None, top: str | None) -> str:
    ci = _ci_label(res)
    jobs = [
        ("Spike map", "Largest |activation| per layer and site (log colour); each cell names the channel that "
         "carries it.", lambda: _pl.spike_map(res)),
        ("Candidate effects vs controls", "Δ of the primary metric when each candidate is zeroed, against "
         "random scalars of the same parameter (the grey bar behind each row spans the 2.5–97.5th percentiles of "
         "that candidate's own parameter's draws, the null its p-value uses; the grey strips below are each "
         f"parameter's draws), the largest-other-weights control and activation restores; whiskers are {ci}s.",
         lambda: _pl.candidate_effects(res, metric=metric)),
        ("Collapse by cell type", "Δ per cell type when the "
         + ("top candidate" if top is None else f"candidate <code>{_e(top)}</code>")
         + " is zeroed, disease and control cells side by side; the dashed line is all cells.",
         lambda: _pl.collapse_by_celltype(res, metric=metric, candidate=top)),
        ("Dose–response", "Metric vs scale factor on each candidate; the dashed line is the baseline (×1).",
         lambda: _pl.scaling_curve(res, metric=metric)),
    ]
    if adata is not None:
        lk = _label_key(res, adata)
        jobs.append(("Embedding before and after", "Cells' <cls> embeddings before and after zeroing the top "
                     "candidate, each reduced to 2-D with PCA" + (f", coloured by {_e(lk)}." if lk else "."),
                     lambda: _pl.embedding_before_after(adata, color=lk)))
    else:
        jobs.append(("Embedding before and after", "", None))
    jobs.append(("Enriched terms", "Terms × candidates; dot size −log10 FDR, colour NES (or odds ratio).",
                 lambda: _pl.enrichment_dotplot(res)))
    out = []
    for title, caption, make in jobs:
        head = f"<figure><figcaption><b>{_e(title)}.</b> "
        if make is None:
            out.append(head + "Skipped: no AnnData with obsm embeddings was given (pass the AnnData, or keep "
                       "results.h5ad in the run directory).</figcaption></figure>")
            continue
        try:
            img = _fig_html(make())
        except DataError as err:
            out.append(head + f"Skipped: {_e(err)}</figcaption></figure>")
            continue
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the page; it says so loudly
            logger.exception("figure %r could not be drawn", title)
            plt.close("all")
            out.append(head + f"<span class='bad'>Could not be drawn ({_e(type(err).__name__)}: {_e(err)}).</span>"
                       "</figcaption></figure>")
            continue
        out.append(head + f"{caption}</figcaption>{img}</figure>")
    return "\n".join(out)


def _collapse_pivot(col: pd.DataFrame, alpha: float, ci: str) -> str:
    col = _pl._prepare_collapse(col)
    group = _keys.GROUP_ALL if (col["group"] == _keys.GROUP_ALL).any() else col["group"].iloc[0]
    sub = col[col["group"] == group]
    metrics = list(dict.fromkeys(sub["metric"]))
    conds = list(dict.fromkeys(sub["condition"]))

    def kind(c: str) -> int:
        for i, pre in enumerate(("baseline", "prune:", "top_outliers", "restore:")):
            if c.startswith(pre):
                return i
        return 9

    shown = sorted([c for c in conds if kind(c) < 9], key=lambda c: (kind(c), conds.index(c)))
    rows = []
    for c in shown:
        row = {"condition": c}
        for m in metrics:
            r = _row(sub, c, m, group)
            if r is None:
                row[m] = ""
            elif c == _keys.COND_BASELINE:
                row[m] = _num(r["value"])
            else:
                s = _num(r["delta"], signed=True)
                if _finite(r["ci_low"]):
                    s += f" [{_num(r['ci_low'])}, {_num(r['ci_high'])}]"
                if _finite(r["p_value"]) and r["p_value"] < alpha:
                    s += " *"
                row[m] = s
        rows.append(row)
    rand = sub[sub["condition"].str.startswith("random:")]
    per_param = False
    if len(rand):
        n = rand["condition"].nunique()
        lab = pool_labels(rand)
        name = f"random (n={n})"
        if lab is not None:
            per_param = True
            per = rand.groupby(lab, sort=False)["condition"].nunique()
            name = (f"random (n={n}: {len(per)} parameter(s) × {int(per.iloc[0])})" if per.nunique() == 1
                    else f"random (n={n} over {len(per)} parameters: {', '.join(str(int(x)) for x in per)})")
        row = {"condition": name}
        for m in metrics:
            d = rand.loc[rand["metric"] == m, "delta"].dropna()
            row[m] = (f"{_num(d.median(), signed=True)} [{_num(d.min())}, {_num(d.max())}]" if len(d) else "")
        rows.append(row)
    n_scale = sum(c.startswith("scale:") for c in conds)
    vs = "the random draws of the candidate's own parameter" if per_param else "random draws"
    cap = (f"Δ vs baseline on group <code>{_e(group)}</code> [{ci}]; * p &lt; {alpha:g} vs {vs}; the "
           f"baseline row holds absolute values; the random row: median [min, max] over all draws."
           + (f" {n_scale} scaling conditions are in the dose–response figure." if n_scale else "")
           + " Per-cell-type rows are in collapse.tsv.")
    return _html_table(pd.DataFrame(rows), max_rows=60, max_chars=40, caption=cap)


def _tables(res: dict, verdicts: list[_Verdict], metric: str | None, alpha: float, n_top: int) -> str:
    out = []
    sw = res.get(_keys.UNS_SUPERWEIGHTS)
    out.append("<h3>Candidates</h3>")
    if isinstance(sw, pd.DataFrame) and len(sw):
        s = sw.sort_values("rank", kind="stable") if "rank" in sw.columns else sw
        cols = [c for c in [*_keys.SUPERWEIGHT_COLUMNS, "rank", "screen", "above_threshold", "round"]
                if c in s.columns]
        s = s[cols].copy()
        if verdicts and metric:
            vmap = {v.candidate: v for v in verdicts}
            key = s["candidate"].astype(str)
            s[f"Δ {metric}"] = key.map(lambda c: vmap[c].delta if c in vmap else np.nan)
            s[_ci_label(res)] = key.map(lambda c: _ci(vmap[c].ci_low, vmap[c].ci_high) if c in vmap else "")
            s["p"] = key.map(lambda c: vmap[c].p_value if c in vmap else np.nan)
            s["verdict"] = key.map(lambda c: vmap[c].status if c in vmap else "not ablated")
        out.append(_html_table(s, max_rows=n_top))
    else:
        out.append("<p class='skip'>Skipped: no superweights table (run ssw.tl.scan).</p>")
    out.append("<h3>Collapse (summary pivot)</h3>")
    col = res.get(_keys.UNS_COLLAPSE)
    if isinstance(col, pd.DataFrame) and len(col):
        out.append(_collapse_pivot(col, alpha, _ci_label(res)))
    else:
        out.append("<p class='skip'>Skipped: no collapse table (run ssw.tl.prune).</p>")
    out.append(_contrasts_table(res, metric, n_top))
    out.append("<h3>Genes</h3>")
    g = res.get(_keys.UNS_GENES)
    if isinstance(g, pd.DataFrame) and len(g) and "candidate" in g.columns:
        g = g.copy()
        if "rank" in g.columns:
            g = g.assign(_r=pd.to_numeric(g["rank"], errors="coerce")).sort_values(["_r"], kind="stable")
            g = g.drop(columns="_r")
        order = {c: i for i, c in enumerate(_candidate_order(res, None) or list(dict.fromkeys(g["candidate"])))}
        g = g.assign(_o=g["candidate"].astype(str).map(order).fillna(len(order)))
        per, n_extra = 10, 4
        g = g.sort_values("_o", kind="stable").groupby("candidate", sort=False).head(per).drop(columns="_o")
        extra = [c for c in g.columns if c not in _keys.GENE_COLUMNS]
        g = g[[c for c in _keys.GENE_COLUMNS if c in g.columns] + extra[:n_extra]]
        cap = (f"Top {per} genes per candidate"
               + (f" (evidence columns: the first {n_extra} of {len(extra)})." if len(extra) > n_extra else "."))
        out.append(_html_table(g, max_rows=max(n_top, 30), caption=cap))
    else:
        out.append("<p class='skip'>Skipped: no genes table (run ssw.tl.genes).</p>")
    out.append("<h3>Enrichment</h3>")
    en = res.get(_keys.UNS_ENRICHMENT)
    if isinstance(en, pd.DataFrame) and len(en):
        en = en.copy()
        if "fdr" in en.columns:
            en = en.assign(_f=pd.to_numeric(en["fdr"], errors="coerce")).sort_values("_f", kind="stable")
            en = en.drop(columns="_f")
        cols = [c for c in [*_keys.ENRICHMENT_COLUMNS, "library"] if c in en.columns]
        out.append(_html_table(en[cols], max_rows=n_top, caption="Sorted by FDR."))
    else:
        out.append("<p class='skip'>Skipped: no enrichment table (run ssw.tl.enrich).</p>")
    return "\n".join(out)


def _contrasts_table(res: dict, metric: str | None, n_top: int) -> str:
    head = f"<h3>{_contrast_title(res, ' − ')} contrasts</h3>"
    why = _no_contrast_reason(res)
    if why is not None:
        return head + f"<p class='skip'>Skipped: {why}.</p>"
    con = res[UNS_CONTRASTS]
    if metric is None or "metric" not in con.columns:
        return head + "<p class='skip'>Skipped: no primary metric to select contrasts on.</p>"
    sub = con[con["metric"].astype(str) == metric].copy()
    if sub.empty:
        have = ", ".join(dict.fromkeys(con["metric"].astype(str)))
        return head + (f"<p class='skip'>Skipped: {FILE_CONTRASTS} has no rows on {_e(metric)} (it has "
                       f"{_e(have)}).</p>")
    case, ctrl = _contrast_names(sub)
    if "difference" in sub.columns:
        w = pd.to_numeric(sub["difference"], errors="coerce").abs()
        cond = sub["condition"].astype(str) if "condition" in sub.columns else pd.Series("", index=sub.index)
        kind = cond.map(lambda c: 0 if c.startswith("prune:") else 1 if c == _keys.COND_TOP_OUTLIERS else 2)
        first = cond.map({c: i for i, c in enumerate(dict.fromkeys(cond))})
        sub = sub.assign(_k=kind, _o=first, _w=w).sort_values(["_k", "_o", "_w"], ascending=[True, True, False],
                                                              kind="stable")
        sub = sub.drop(columns=["_k", "_o", "_w"])
    cols = [c for c in ("condition", "group", f"delta_{case}", f"delta_{ctrl}", "difference", "ci_low", "ci_high",
                        "n_case", "n_control", "bootstrap_unit") if c in sub.columns]
    cap = (f"From {FILE_CONTRASTS}, on <code>{_e(metric)}</code>: per cell type, Δ in {_e(case)} cells minus Δ in "
           f"{_e(ctrl)} cells (difference) with its {_contrast_ci(sub)} (ci_low, ci_high); {len(sub)} of the file's "
           f"{len(con)} rows, largest |difference| first within each condition.")
    return head + _html_table(sub[cols], max_rows=max(n_top, 30), caption=cap)


def _summary(res: dict, source: str, verdicts: list[_Verdict], metric: str | None) -> str:
    run = _plain(res.get(_keys.UNS_RUN) or {})
    model, data = run.get("model") or {}, run.get("data") or {}
    cards = []

    def card(label: str, value: str) -> None:
        cards.append(f"<div class='card'><div class='k'>{_e(label)}</div><div class='v'>{value}</div></div>")

    if model:
        h = str(model.get("hash") or "")
        card("model", _e(model.get("path") or model.get("name") or "?") + (f"<br><small>hash {_e(h[:16])}</small>"
                                                                           if h else ""))
    if data:
        shape = (f"{_e(data.get('n_cells', '?'))} cells × {_e(data.get('n_genes', '?'))} genes")
        card("data", _e(data.get("path") or data.get("name") or "?") + f"<br><small>{shape}</small>")
    if "seed" in run:
        card("seed", _e(run["seed"]))
    sw = res.get(_keys.UNS_SUPERWEIGHTS)
    if isinstance(sw, pd.DataFrame):
        card("candidates", _e(len(sw)))
    n_pr, per_lab = _step_param(res, "prune", "n_cells"), _param(res, "max_cells_per_label")
    if _finite(n_pr):
        card("cells pruned", f"{int(n_pr)}" + (f"<br><small>at most {int(per_lab)} per label</small>"
                                               if _finite(per_lab) else ""))
    if verdicts:
        n_pass = sum(v.status == "passes" for v in verdicts)
        card("pass the controls", f"{n_pass} of {len(verdicts)}" + (f"<br><small>on {_e(metric)}</small>"
                                                                     if metric else ""))
    present = [n + ("" if len(res[n]) else " (no rows)") for n in _TABLE_FILES if isinstance(res.get(n), pd.DataFrame)]
    missing = [n for n in _TABLE_FILES if not isinstance(res.get(n), pd.DataFrame)]
    txt = f"<p class='src'>Results from {_e(source)}. Tables present: {_e(', '.join(present) or 'none')}"
    txt += f"; absent: {_e(', '.join(missing))}.</p>" if missing else ".</p>"
    return "<div class='cards'>" + "".join(cards) + "</div>" + txt


def _cost(res: dict) -> str:
    """What the run planned and, with a budget, what it chose and why (run.json's ``plan`` and ``budget``); the
    draws each null pool used (collapse ``null_draws``) and the first-order null's agreement with the exact draws
    (firstorder.tsv). Presentation only: every figure is read from the run's record and tables."""
    from scsuperweight.plan import format_duration

    run = _plain(res.get(_keys.UNS_RUN) or {})
    plan, budget = run.get("plan"), run.get("budget")
    out = []
    if isinstance(plan, Mapping) and plan:
        kinds = ", ".join(f"{k} {v}" for k, v in (plan.get("conditions_by_kind") or {}).items())
        out.append(f"<p>Planned before the work: {_e(plan.get('n_conditions'))} conditions ({_e(kinds)}) over "
                   f"{_e(plan.get('n_cells'))} cells of about {float(plan.get('tokens_per_cell') or 0):.0f} tokens, "
                   f"estimated at {_e(format_duration(float(plan.get('est_seconds') or float('nan'))))} on "
                   f"{_e(plan.get('device') or 'this device')}.</p>")
    else:
        out.append("<p class='skip'>No plan recorded (a run made before plans, or a family without the time "
                   "model).</p>")
    if isinstance(budget, Mapping) and budget:
        chosen = {k: budget.get(k) for k in ("cells_per_label", "max_seq_len", "n_random", "n_boot", "scan_cells")}
        out.append(f"<p>Budget {_e(format_duration(float(budget.get('budget_seconds') or 0)))}: "
                   + ", ".join(f"{_e(k)} {_e(v)}" for k, v in chosen.items())
                   + ("" if budget.get("feasible", True) else " (<b>even the floors exceed it</b>)") + ".</p>")
        out.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in budget.get("reasons") or []) + "</ul>")
    col = res.get("collapse")
    if isinstance(col, pd.DataFrame) and "null_draws" in col.columns and len(col):
        rand = col[col["condition"].astype(str).str.startswith("random:")]
        if len(rand):
            per = rand.drop_duplicates("condition").groupby("control_for").size()
            out.append("<p>Random draws per parameter (sequential nulls stop once the decision is settled, Besag "
                       "&amp; Clifford 1991): " + ", ".join(f"{_e(k)} {int(v)}" for k, v in per.items()) + ".</p>")
    fo = res.get("firstorder")
    if isinstance(fo, pd.DataFrame) and len(fo):
        out.append(_html_table(fo, caption="First-order null: each candidate among all scalars of its matrix, "
                                           "and the rank correlation of first-order with exact draws"))
    return "\n".join(out)


def _provenance(res: dict) -> str:
    run = _plain(res.get(_keys.UNS_RUN) or {})
    if not run:
        return "<p class='skip'>No run.json / uns['run'] record: provenance unknown.</p>"
    out = ["<div class='grid'>"]
    for k, cap in (("versions", "Versions"), ("model", "Model"), ("data", "Data"), ("params", "Parameters")):
        out.append(_kv_table(run.get(k), cap))
    out.append(_kv_table({"seed": run.get("seed")}, "Seed"))
    t = run.get("timings") or {}
    if isinstance(t, Mapping) and t:
        rows = [(k, f"{float(v):.1f} s" if _finite(v) else str(v)) for k, v in _flatten(t)]
        out.append(_html_table(pd.DataFrame(rows, columns=["step", "time"]), max_rows=100, caption="Timings"))
    else:
        out.append(_kv_table(t, "Timings"))
    rest = {k: v for k, v in run.items() if k not in ("versions", "model", "data", "params", "seed", "timings",
                                                       "plan", "budget")}  # plan, budget: the cost section
    if rest:
        out.append(_kv_table(rest, "Other"))
    out.append("</div>")
    return "\n".join(out)


def _null_text(res: dict) -> str | None:
    """What the scan's detection null says: how often null copies pass the fixed threshold, the top spike's p."""
    null = _step_param(res, "scan", "null")
    if not isinstance(null, Mapping) or not null.get("k"):
        return None
    k = int(null["k"])
    where = (f"one synthetic cell of {null.get('n_tokens')} tokens" if null.get("inputs") == "data_free"
             else f"{null.get('n_cells')} of the scanned cells")
    thr = f"spike ratio ≥ {_num(null.get('min_ratio', 20))}"
    what = {"gaussian": "Gaussian copies (each tensor redrawn from a normal with its median and robust scale: an "
                        "untrained model of the same shape, with no outlier)",
            "permute": "permuted copies (each tensor's entries shuffled: same values, outliers included, no learned "
                       "arrangement)"}
    out = []
    for m in ("gaussian", "permute"):
        d = null.get(m)
        if not isinstance(d, Mapping):
            continue
        n_pass = int(round(float(d.get("pass_rate", 0)) * k))
        top = (f"the checkpoint's largest spike (<code>{_e(d.get('top_site'))}</code> channel "
               f"{_e(d.get('top_channel'))}, ratio {_num(d.get('top_ratio'))}) has p = {_p(d.get('top_p'))} against "
               f"that site's null and p = {_p(d.get('top_p_max'))} against the largest spike anywhere in a null "
               f"copy (smallest attainable p = 1/{k + 1})") if d.get("top_site") else "no spike was traced"
        out.append(f"<li>{n_pass} of {k} {what[m]} pass the fixed threshold ({thr}); the largest null spike ratio "
                   f"is {_num(d.get('null_max_ratio_max'))} (median over copies {_num(d.get('null_max_ratio_median'))}"
                   f"); {top}.</li>")
    if not out:
        return None
    cols = "<code>perm_p</code>, <code>perm_q</code> (BH over sites) and <code>perm_p_max</code>"
    both = " (<code>_permute</code> columns: the permutation null)" if "permute" in null and "gaussian" in null \
        else ""
    return (f"<h3>Detection null</h3><p>The scan's threshold is hand-set; here the same trace ran on {where} "
            f"through K = {k} null copies of the checkpoint. Each candidate's site gets {cols} in "
            f"superweights.tsv{both}.</p><ul class='follow'>" + "".join(out) + "</ul>"
            "<p class='note'>A lone huge scalar survives shuffling (it writes a spike wherever it lands), so the "
            "permutation null cannot call a single super weight; the Gaussian null can. The permutation null asks "
            "whether the arrangement matters.</p>")


def _quantize_text(res: dict) -> str | None:
    """The quantisation section: whether holding out the candidates helps, from quantize.tsv."""
    from scsuperweight.quantize import holdout_gain

    q = res.get("quantize")
    if not isinstance(q, pd.DataFrame) or q.empty:
        return None
    q = R.typed(q, "quantize")
    held = int(q["n_held_out"].max()) if "n_held_out" in q.columns and len(q) else 0
    gain = holdout_gain(q)
    parts = ["<h3>Quantisation with the candidates held out</h3>"]
    if gain.empty:
        parts.append("<p class='skip'>quantize.tsv has no setting both with and without holdout.</p>")
    else:
        tol = 1e-4
        helps, hurts = gain[gain["gain"] > tol], gain[gain["gain"] < -tol]
        best = gain.sort_values("gain", ascending=False).iloc[0]

        def name(r) -> str:
            g = f"block {int(r['block_size'])}" if r["granularity"] == "block" else f"per {r['granularity']}"
            return f"INT{int(r['bits'])}, {g}" + ("" if r["clip"] == "none" else f", clip {r['clip']}")

        if len(helps):
            verdict = (f"<b>Holding out the {held} candidate scalar(s) helps</b> in {len(helps)} of {len(gain)} "
                       f"settings (<code>&lt;cls&gt;</code> cosine to full precision up by more than {tol:g}); the "
                       f"largest gain is at {_e(name(best))}: {_num(best['without'])} → "
                       f"{_num(best['with_holdout'])}.")
        else:
            verdict = (f"<b>Holding out the {held} candidate scalar(s) does not help</b>: in none of {len(gain)} "
                       f"settings does it raise the <code>&lt;cls&gt;</code> cosine to full precision by more than "
                       f"{tol:g}.")
        if len(hurts):
            verdict += f" It lowers it in {len(hurts)} setting(s)."
        parts.append(f"<p class='verdict {'pass' if len(helps) else 'none'}'>{verdict}</p>")
        cols = ["bits", "granularity", "block_size", "clip", "without", "with_holdout", "gain"]
        parts.append(_html_table(gain.sort_values("gain", ascending=False)[cols], max_rows=12,
                                 caption="&lt;cls&gt; cosine to full precision without and with the candidates "
                                         "held out (from quantize.tsv), largest gain first."))
    try:
        parts.append("<figure><figcaption><b>Quantisation.</b> &lt;cls&gt; cosine to full precision vs block size, "
                     "per bit width; solid: candidates held out.</figcaption>"
                     + _fig_html(_pl.quantize(q)) + "</figure>")
    except DataError as err:
        parts.append(f"<p class='skip'>Quantisation figure skipped: {_e(err)}</p>")
    return "\n".join(parts)


def _analyses(res: dict) -> str | None:
    parts = [t for t in (_null_text(res), _quantize_text(res)) if t]
    return "\n".join(parts) if parts else None


def census_page(result, path, *, title: str = "scsuperweight census", min_ratio: float | None = None) -> Path:
    """One self-contained HTML page for a census (`scsuperweight.census.CensusResult`): what coincides across
    the models, the figure, the top spikes per model, the candidates, the parameters."""
    sp, co, ca, params = result.spikes, result.coincidences, result.candidates, dict(result.params)
    min_ratio = params.get("min_ratio", 20.0) if min_ratio is None else min_ratio
    n_models = sp["model"].nunique() if len(sp) else 0
    shared = co[co["n_models"] > 1] if len(co) else co
    steps = sp["step"].notna().all() and len(sp)
    if len(co):
        first = co.iloc[0]
        when = (f", first above threshold at step {int(first['first_step'])}" if steps and _finite(first["first_step"])
                else f", first in {_e(first['first_model'])}")
        lead = (f"<p class='verdict pass'>{len(co)} spike coordinate(s) pass the threshold (ratio ≥ {_num(min_ratio)}) "
                f"in at least one of {n_models} models; {len(shared)} recur in more than one. The strongest: layer "
                f"{_e(first['layer'])} {_e(first['kind'])} channel {_e(first['channel'])} in {int(first['n_models'])} "
                f"model(s){when}, ratio up to {_num(first['max_ratio'])}.</p>")
    else:
        lead = (f"<p class='verdict none'>No spike passes the threshold (ratio ≥ {_num(min_ratio)}) in any of "
                f"{n_models} models.</p>")
    try:
        fig = _fig_html(_pl.census(sp, min_ratio=min_ratio))
    except DataError as err:
        fig = f"<p class='skip'>Figure skipped: {_e(err)}</p>"
    body = [f"<h1>{_e(title)}</h1>", lead, "<h2>Spikes across the models</h2>", fig,
            "<h2>Shared coordinates</h2>",
            _html_table(co, max_rows=50) if len(co) else "<p class='skip'>None above threshold.</p>",
            "<h2>Top spikes per model</h2>", _html_table(sp, max_rows=200),
            "<h2>Candidates per model</h2>",
            _html_table(ca, max_rows=100) if len(ca) else "<p class='skip'>Not computed.</p>",
            "<h2>Parameters</h2>", _kv_table(params, "census")]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>\n"
            + "\n".join(body) + "\n</main></body></html>\n")
    out = Path(path)
    atomic_write_text(out, page)
    logger.info("wrote census page to %s", out)
    return out


def report(
    adata_or_run_dir,
    path,
    *,
    key: str = _keys.UNS_KEY,
    title: str | None = None,
    metric: str | None = None,
    alpha: float = 0.05,
    n_top: int = 20,
) -> Path:
    """Write one self-contained HTML page: summary, hypotheses from the results, figures, tables, provenance.

    Parameters
    ----------
    adata_or_run_dir
        AnnData with results under ``uns[key]``, a run directory (its TSVs, run.json and, for the embedding
        figure, results.h5ad), or the dict :func:`load_results` returns.
    path
        Output file (a directory gets ``report.html``).
    key
        Results key in ``adata.uns``.
    title
        Page title.
    metric
        Primary metric the hypotheses are judged on; default: ``params["primary_metric"]`` if recorded, else the
        first of gepc_mse, gep_mse, knn_accuracy, ... present.
    alpha
        Significance level of the rule.
    n_top
        Rows per table.

    Returns
    -------
    The path written.

    Examples
    --------
    >>> ssw.report(adata, "report.html")  # doctest: +SKIP
    """
    res, adata, source = _gather(adata_or_run_dir, key)
    problems = []
    col = res.get(_keys.UNS_COLLAPSE)
    if isinstance(col, pd.DataFrame):
        lack = [c for c in ("condition", "metric", "value") if c not in col.columns]
        if lack:
            problems.append(f"the collapse table lacks column(s) {lack} and was ignored")
            logger.warning("collapse table lacks %s; ignored in the report", lack)
            del res[_keys.UNS_COLLAPSE]
    if metric is None:
        m = _param(res, "primary_metric")
        metric = m if isinstance(m, str) else None
    col = res.get(_keys.UNS_COLLAPSE)
    if metric is not None and isinstance(col, pd.DataFrame) and "metric" in col.columns \
            and metric not in set(col["metric"].astype(str)):
        logger.warning("primary metric %r not in the collapse table; choosing another", metric)
        metric = None
    hyp_html, verdicts, metric = _hypotheses(res, metric, alpha)
    top = None
    if verdicts:
        meas = [v for v in verdicts if _finite(v.delta)]
        passing = [v for v in meas if v.status == "passes"] or meas
        if passing:
            top = max(passing, key=lambda v: float(_pl._worse(v.delta, metric))).candidate
    run = res.get(_keys.UNS_RUN) or {}
    title = title or "scsuperweight report"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    ver = ((run.get("versions") or {}).get("scsuperweight")) if isinstance(run.get("versions"), Mapping) else None
    state = _run_state(res)
    body = [
        f"<h1>{_e(title)}</h1>",
        *([f"<p class='bad verdict none' id='run-state'><b>{_e(state)}</b></p>"] if state else []),
        f"<p class='sub'>Generated {now}" + (f" by scsuperweight {_e(ver)}" if ver else "") + "</p>",
        "<nav><a href='#summary'>Summary</a><a href='#hypotheses'>Hypotheses</a><a href='#figures'>Figures</a>"
        "<a href='#ablations'>Zero vs mean</a><a href='#tables'>Tables</a><a href='#caveats'>Caveats</a>"
        "<a href='#cost'>Cost</a>"
        "<a href='#provenance'>Provenance</a></nav>",
        "<section id='summary'><h2>Run summary</h2>", _summary(res, source, verdicts, metric),
        "".join(f"<p class='bad'>Note: {_e(p)}.</p>" for p in problems), "</section>",
        "<section id='hypotheses'><h2>Hypotheses</h2>", hyp_html, "</section>",
        "<section id='ablations'><h2>Zero vs mean, and granularity</h2>", _ablations_section(res, metric, alpha),
        "</section>",
        *(["<section id='analyses'><h2>Detection null and quantisation</h2>", analyses, "</section>"]
          if (analyses := _analyses(res)) else []),
        "<section id='figures'><h2>Figures</h2>", _figures(res, adata, metric, top), "</section>",
        "<section id='tables'><h2>Tables</h2>", _tables(res, verdicts, metric, alpha, n_top), "</section>",
        "<section id='caveats'><h2>Caveats</h2>", _caveats(res, verdicts, metric, alpha), "</section>",
        "<section id='cost'><h2>Cost: plan and budget</h2>", _cost(res), "</section>",
        "<section id='provenance'><h2>Provenance</h2>", _provenance(res), "</section>",
    ]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>\n"
            + "\n".join(body) + "\n</main></body></html>\n")
    out = Path(path)
    if out.is_dir():
        out = out / R.REPORT.file
    atomic_write_text(out, page)
    logger.info("wrote report to %s", out)
    return out
