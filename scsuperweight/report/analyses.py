"""The "Detection null and quantisation" section: how often null copies of the checkpoint pass the scan's
fixed threshold (run.json's scan.null) and whether holding the candidates out helps quantisation (quantize.tsv).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from scsuperweight import pl as _pl
from scsuperweight import results as R
from scsuperweight._fmt import num as _num
from scsuperweight._fmt import p as _p
from scsuperweight.errors import DataError
from scsuperweight.report.page import _fig_html, _html_table
from scsuperweight.report.record import _step_param
from scsuperweight.report.words import _e


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
