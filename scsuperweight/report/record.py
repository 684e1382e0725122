"""What the page reads: a run (directory, AnnData or results dict) loaded through `scsuperweight.results`, the
warning when the run failed or is partial, and the parameters the run recorded (top-level or per step, and the
interval level they imply).

What belongs here: getting numbers and settings out of the run. Not here: judging them (`rule`,
`scsuperweight.judge`) or wording them (`hypotheses`, `sections`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from scsuperweight import _keys
from scsuperweight import pl as _pl
from scsuperweight import results as R
from scsuperweight._fmt import finite as _finite
from scsuperweight._log import logger
from scsuperweight.errors import DataError


def load_results(run_dir) -> dict[str, pd.DataFrame | dict]:
    """Read a run directory's tables and provenance.

    Parameters
    ----------
    run_dir
        Directory written by ``scsuperweight run`` / ``demo`` (or the steps on their own).

    Returns
    -------
    Dict with ``superweights``, ``activations``, ``collapse``, ``contrasts``, ``genes``, ``enrichment`` (and the
    other tables of `scsuperweight.results.TABLES`; DataFrames typed by that schema) and ``run`` (the parsed
    run.json), each present only when its file exists and can be read. An empty ``contrasts.tsv`` (what the prune
    step writes when there is nothing to contrast) gives an empty DataFrame, so that "computed, no rows" stays
    distinct from "absent". Tables of different runs raise MixedRunError.

    Examples
    --------
    >>> res = load_results("out/")  # doctest: +SKIP
    >>> res["collapse"].query("condition == 'baseline'")  # doctest: +SKIP
    """
    return R.load_run(Path(run_dir)).as_dict()


_plain = R._plain


def _gather(obj, key: str):
    """(results dict, AnnData or None, where it came from)."""
    if isinstance(obj, Mapping):
        return dict(obj), None, "results dict"
    if _pl._is_adata(obj) or (isinstance(obj, (str, Path)) and Path(obj).is_file() and Path(obj).suffix == ".h5ad"):
        got = R.load_run(obj, key=key)
        return got.as_dict(), (obj if _pl._is_adata(obj) else None), got.source
    if isinstance(obj, R.RunResults):
        return obj.as_dict(), None, obj.source or "run results"
    if isinstance(obj, (str, Path)):
        p = Path(obj)
        got = R.load_run(p, key=key)
        res = got.as_dict()
        adata = None
        h5 = p / R.RESULTS.file
        if h5.is_file():
            try:
                import anndata as ad

                adata = ad.read_h5ad(h5, backed="r")
            except Exception as err:  # noqa: BLE001 - the page says why the embedding figure is missing
                logger.warning("could not read %s for the embedding figure: %s", h5, err)
        if adata is not None:  # each step's options (prune: n_random, alpha, n_cells, ...) live in its uns
            stored = R.run_record(adata, key)
            R.check_same_run([R.RunStamp.of({**got.run, R.RUN_ID: got.run_id}, str(p / R.RUN.file)),
                              R.RunStamp.of(stored, str(h5))], "report")
            params = R.step_params(adata, key)
            if params:
                res[_keys.UNS_RUN] = R._merge_params(res.get(_keys.UNS_RUN) or {}, params)
        return res, adata, str(p)
    msg = (f"report() takes an AnnData, a run directory or a results dict, got {type(obj).__name__}; "
           f"pass adata after the ssw.tl steps or the --out directory of a run.")
    raise DataError(msg)


def _run_state(res: dict) -> str | None:
    """A warning for the top of the page when the run failed, is still running, or lacks steps; else None."""
    run = res.get(_keys.UNS_RUN) or {}
    status = run.get("status")
    done = run.get("steps_done")
    missing = [s for s in R.STEPS if isinstance(done, list) and s not in done]
    if status in ("failed", "running"):
        what = ("incomplete: its run.json says it is still running" if status == "running"
                else "a failed run" + (f" ({run['error']})" if run.get("error") else ""))
        return (f"This run is {what}. Steps done: {', '.join(done or []) or 'none'}; what follows shows only what "
                "those steps wrote.")
    if missing:
        return (f"This is a partial run: steps done {', '.join(done) or 'none'}; missing {', '.join(missing)}. "
                "What follows shows only what those steps wrote.")
    return None


def _param(res: dict, *names: str):
    """A recorded parameter, top-level or nested per step (params.prune.label_key), first name found wins."""
    params = (res.get(_keys.UNS_RUN) or {}).get("params") or {}
    flat = _flatten_raw(params)
    for n in names:
        if n in params and not isinstance(params[n], Mapping):
            return params[n]
        for k, v in flat:
            if k.rsplit(".", 1)[-1] == n:
                return v
    return None


def _step_param(res: dict, step: str, name: str):
    """A parameter of one step (``params.<step>.<name>``, or run.json's ``<step>.<name>``), else None."""
    run = res.get(_keys.UNS_RUN) or {}
    params = run.get("params") if isinstance(run.get("params"), Mapping) else {}
    for holder in (params.get(step), run.get(step)):
        if isinstance(holder, Mapping) and name in holder:
            return holder[name]
    return None


def _ci_label(res: dict) -> str:
    """'95% CI' from the prune step's recorded alpha (its intervals are the alpha/2, 1 - alpha/2 quantiles),
    plain 'CI' when the run does not record it."""
    a = _step_param(res, "prune", "alpha")
    if _finite(a) and 0 < float(a) < 1:
        return f"{100 * (1 - float(a)):g}% CI"
    return "CI"


def _flatten_raw(d, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for k, v in (d or {}).items():
        if isinstance(v, Mapping):
            rows += _flatten_raw(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows
