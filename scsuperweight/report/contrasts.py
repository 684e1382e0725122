"""Disease vs control, read from the prune step's contrasts table (contrasts.tsv, or uns[...]["contrasts"]):
the case and control names, the interval label, why a run has no contrast, the sentences, and the table on the
page. Never approximated from per-group intervals.
"""

from __future__ import annotations

import pandas as pd

from scsuperweight import _keys
from scsuperweight import pl as _pl
from scsuperweight import results as R
from scsuperweight._fmt import ci as _ci
from scsuperweight._fmt import finite as _finite
from scsuperweight._fmt import num as _num
from scsuperweight.report.page import _html_table
from scsuperweight.report.record import _param, _step_param
from scsuperweight.report.words import _e

# The AD-vs-control contrasts the prune step computes (per cell type: Δ in case cells minus Δ in control cells, with
# a bootstrap interval): uns[key]["contrasts"] (tl.prune) and contrasts.tsv (cli prune, pipeline.run_pipeline).
UNS_CONTRASTS = R.spec("contrasts").uns_key
FILE_CONTRASTS = R.spec("contrasts").file


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
