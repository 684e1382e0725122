"""The Hypotheses section, written from the tables: the rule, one judgement sentence per candidate, and for
each passing candidate (or the strongest, flagged exploratory) the follow-ups: cell types, disease vs control,
restoring the activation, the dose-response curve, genes and terms; and the note on the random draws counted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scsuperweight import _keys
from scsuperweight import pl as _pl
from scsuperweight._fmt import ci as _ci
from scsuperweight._fmt import finite as _finite
from scsuperweight._fmt import num as _num
from scsuperweight._fmt import p as _p
from scsuperweight.judge import random_pools
from scsuperweight.report.contrasts import _contrast_text
from scsuperweight.report.record import _ci_label, _param
from scsuperweight.report.rule import _candidate_order, _describe, _random_deltas, _row, _Verdict, _verdict_table
from scsuperweight.report.words import _e, _pair, _pct


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
