"""The "Zero vs mean, and granularity" section: each candidate's other ablations (mean, mean activation,
neuron, channel, joint) from the verdicts table, judged by the same rule, in words and as one table.
Presentation only.
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
from scsuperweight.judge import verdicts
from scsuperweight.report.page import _html_table
from scsuperweight.report.record import _step_param
from scsuperweight.report.words import _e

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
