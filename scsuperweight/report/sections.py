"""The page's other sections, one builder each: the run summary cards, the figures, the tables (candidates,
collapse pivot, genes, enrichment), the caveats generated from the run, the cost (plan and budget, read from the
record, never recomputed) and the provenance.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from scsuperweight import _keys
from scsuperweight import pl as _pl
from scsuperweight import results as R
from scsuperweight._fmt import ci as _ci
from scsuperweight._fmt import finite as _finite
from scsuperweight._fmt import num as _num
from scsuperweight._log import logger
from scsuperweight.errors import DataError
from scsuperweight.judge import pool_labels
from scsuperweight.report.contrasts import _contrasts_table
from scsuperweight.report.page import _fig_html, _flatten, _html_table, _kv_table
from scsuperweight.report.record import _ci_label, _param, _plain, _step_param
from scsuperweight.report.rule import _candidate_order, _row, _Verdict
from scsuperweight.report.words import _e

# the tables the page lists as present or absent, by uns key
_TABLE_FILES = {s.uns_key: s.file for s in R.TABLES.values()}


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
        chosen = {k: budget.get(k) for k in ("cells_per_label", "max_seq_len", "n_random", "n_boot", "scan_cells",
                                             "embed_all", "genes_candidates", "n_matched", "draw_embeddings",
                                             "n_restore", "n_scale", "mean_ablation", "granularities", "joint",
                                             "first_order", "max_candidates", "null_method", "null_k")
                  if budget.get(k) is not None}  # the knobs, then the structural levers (their reasons below)
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
