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

This module holds the entry point, :func:`report`, which assembles the page from one builder per section; the
rooms it reads from (presentation only, every number comes from `scsuperweight.results` and `scsuperweight.judge`):

- ``record``: loading the run (directory, AnnData, results dict), its state, its recorded parameters;
- ``rule``: the verdicts read from the judge's table; ``contrasts``: disease vs control from contrasts.tsv;
- ``hypotheses``, ``ablations``, ``sections`` (summary, figures, tables, caveats, cost, provenance),
  ``analyses`` (detection null, quantisation): the sections;
- ``census``: the census page; ``page``: CSS, tables, embedded figures; ``words``: escaping and number formats.
"""

from __future__ import annotations

import datetime as _dt
import sys
import types
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from scsuperweight import _keys
from scsuperweight import pl as _pl
from scsuperweight import results as R
from scsuperweight._fmt import finite as _finite
from scsuperweight._io import atomic_write_text
from scsuperweight._log import logger
from scsuperweight.report.ablations import _ablations_section
from scsuperweight.report.analyses import _analyses
from scsuperweight.report.census import census_page as census_page
from scsuperweight.report.contrasts import FILE_CONTRASTS as FILE_CONTRASTS
from scsuperweight.report.contrasts import UNS_CONTRASTS as UNS_CONTRASTS
from scsuperweight.report.hypotheses import _hypotheses
from scsuperweight.report.page import _CSS
from scsuperweight.report.record import _gather, _param, _run_state
from scsuperweight.report.record import load_results as load_results
from scsuperweight.report.sections import _caveats, _cost, _figures, _provenance, _summary, _tables
from scsuperweight.report.words import _e

__all__ = ["report", "load_results", "census_page"]


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


class _CallableReport(types.ModuleType):
    """`ssw.report(...)` keeps working once this package has been imported: importing a submodule rebinds the
    parent's attribute of the same name to the module, so the package forwards calls to `report`."""

    def __call__(self, *args, **kwargs):
        return report(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableReport
