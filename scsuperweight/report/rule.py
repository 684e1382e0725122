"""The verdicts the page states, as data: one `_Verdict` per candidate read from the prune step's verdicts table
(`scsuperweight.judge` owns the rule and the p-values; the same function is applied here only to a run without
the table or at another level), the candidates' order and their short descriptions.

What belongs here: turning the judge's rows into what the page needs. Not here: computing a p-value (judge) or
the sentences about a verdict (`hypotheses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from scsuperweight import _keys
from scsuperweight import pl as _pl
from scsuperweight._fmt import finite as _finite
from scsuperweight.judge import verdicts
from scsuperweight.report.record import _step_param
from scsuperweight.report.words import _e


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
