"""The census page: one self-contained HTML page over a `scsuperweight.census.CensusResult` (what coincides
across models, the figure, the top spikes and candidates per model, the parameters).
"""

from __future__ import annotations

from pathlib import Path

from scsuperweight import pl as _pl
from scsuperweight._fmt import finite as _finite
from scsuperweight._fmt import num as _num
from scsuperweight._io import atomic_write_text
from scsuperweight._log import logger
from scsuperweight.errors import DataError
from scsuperweight.report.page import _CSS, _fig_html, _html_table, _kv_table
from scsuperweight.report.words import _e


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
