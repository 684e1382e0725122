"""The verdict on each candidate: one rule, applied in one place, written as a table.

A candidate *passes the controls* when, on the primary metric over all cells, zeroing it gives

1. ``cond_p``: p < alpha against the random draws of the same parameter (the ``null_pool`` of its row);
2. ``cond_control``: a change beyond the largest-other-weights control (``top_outliers``): |Δ| larger than the
   control's |Δ| (``direction="harmful"`` also asks that the change make the model worse by the metric's
   registered direction; the ``harmful`` column records that direction either way);
3. ``cond_interval``: a bootstrap interval of the change that excludes 0.

The same rule judges every ablation of a candidate, one row per candidate and ablation (column ``ablation``):
``prune`` (zeroing), ``mean`` and ``mean_activation`` (against the same parameter's draws, as zeroing), ``neuron``
and ``channel`` (against random neurons / channels of the same block) and ``joint`` (the passing candidates
together, against random sets of as many scalars of the same parameters). Each row also carries ``p_matched``, the
p against random scalars from the candidate's own |w| quantile bin (``matched:<cand>:<k>``): information beside
the rule, which keeps the uniform draws (a super weight is by definition in the top bin, so matched draws ask a
different question: is it special among the largest weights, not among its parameter's weights).

A condition that cannot be checked (no p-value and no draws, no control, no interval) is missing, not failed: the
candidate is then "not evaluable" unless another condition fails. The prune step calls `verdicts` and stores the
table (``uns["ssw"]["verdicts"]``, ``verdicts.tsv``); the report and the CLI summary only read it. p-values come
from the prune step's collapse table; only a table without them (an older run) has them computed here, from the
same draws and with the same `metrics.empirical_p`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import _keys as K
from ._fmt import ci as _ci
from ._fmt import finite as _finite
from ._fmt import num as _num
from ._fmt import p as _p
from .metrics import empirical_p
from .metrics import registry as R

__all__ = ["verdicts", "random_pools", "pool_labels", "VERDICT_COLUMNS", "ABLATIONS", "DRAW_PREFIXES"]

# contract columns first; n_random, null_pool and p_source say what the p-value was taken against; ablation and
# condition which ablation of the candidate the row judges; p_matched / n_matched the magnitude-matched draws
VERDICT_COLUMNS = [
    "candidate", "metric", "delta", "ci_low", "ci_high", "p_value", "control_delta", "cond_p", "cond_control",
    "cond_interval", "passes", "reason", "status", "group", "baseline", "value", "harmful", "null_pool", "n_random",
    "p_source", "alpha", "direction", "ablation", "condition", "p_matched", "n_matched", "rel_effect",
]
# below this relative change (|Δ| / |baseline|) a pass is flagged in words as a tiny effect; the rule itself has
# no effect-size floor (a mean ablation can pass at Δ 2e-5 when its null moves 1e-7), so the reason says it
TINY_EFFECT = 0.01
# the ablations judged, in row order (a candidate's zeroing first: the rows the report and CLI lead with)
ABLATIONS = ("prune", "mean", "mean_activation", "neuron", "channel", "joint")
# the control draws: each row names its pool in control_for (a parameter, neuron:L<l>, channel:L<l>, joint, or a
# candidate for its |w|-matched draws)
DRAW_PREFIXES = ("random:", "random_neuron:", "random_channel:", "random_joint:", "matched:")
PASSES, FAILS, NOT_EVALUABLE = "passes", "fails", "not evaluable"
_DIRECTIONS = ("two-sided", "harmful")


def _row(col: pd.DataFrame, cond: str, metric: str, group: str) -> pd.Series | None:
    r = col[(col["condition"] == cond) & (col["metric"] == metric) & (col["group"] == group)]
    return r.iloc[0] if len(r) else None


def pool_labels(rand: pd.DataFrame) -> pd.Series | None:
    """Which parameter each random row was drawn from (``control_for``), or None when the table does not say for
    every row."""
    if "control_for" not in rand.columns or rand.empty:
        return None
    cf = rand["control_for"]
    ok = cf.notna() & (cf.astype(str).str.strip() != "")
    return cf.astype(str) if bool(ok.all()) else None


def random_pools(col: pd.DataFrame, metric: str, group: str = K.GROUP_ALL, *, prefixes: tuple = ("random:",)
                 ) -> dict[str | None, np.ndarray]:
    """The random draws' finite Δ per pool: one pool per parameter (``control_for``), or one pool under the key
    None when the table does not say for every draw which parameter it belongs to. `prefixes`: which draws
    (default the uniform scalar draws; `DRAW_PREFIXES` for every control draw, keyed by its pool)."""
    rand = col["condition"].astype(str).str.startswith(prefixes)
    r = col[(col["metric"] == metric) & (col["group"] == group) & rand]
    if r.empty:
        return {}

    def finite(d: pd.DataFrame) -> np.ndarray:
        v = d.drop_duplicates("condition")["delta"].to_numpy(dtype=float)
        return v[np.isfinite(v)]

    lab = pool_labels(r)
    if lab is None:
        return {None: finite(r)}
    return {str(k): finite(g) for k, g in r.groupby(lab, sort=False)}


def _own_pool(row: pd.Series | None, cand: str, pools: dict, superweights: pd.DataFrame | None
              ) -> tuple[str | None, np.ndarray | None]:
    """(parameter, draws) the candidate's p-value is taken against; draws None when no pool matches it."""
    if not pools:
        return None, None
    if None in pools:
        return None, pools[None]
    param = None
    if row is not None and isinstance(row.get("null_pool"), str) and row.get("null_pool"):
        param = row["null_pool"]
    elif superweights is not None and {"candidate", "param"} <= set(superweights.columns):
        p = superweights.loc[superweights["candidate"].astype(str) == cand, "param"]
        param = str(p.iloc[0]) if len(p) and isinstance(p.iloc[0], str) and p.iloc[0] else None
    if param is not None:
        return param, pools.get(param)
    if len(pools) == 1:  # one pool: every candidate edits the same parameter
        k = next(iter(pools))
        return k, pools[k]
    return None, None


def _harmful(d: float, metric: str) -> bool | None:
    """Whether a change makes the model worse by the registry's direction of `metric` (None: unknown or 0)."""
    sign = R.direction(metric)
    return None if sign is None or d == 0 else bool(-sign * d > 0)


def _control_check(d: float, top_d: float, metric: str, direction: str) -> tuple[bool, str, str]:
    """(met, why not, why) of condition 2."""
    harmful = _harmful(d, metric)
    if direction == "harmful" and harmful is False:
        better = "higher" if R.direction(metric) > 0 else "lower"
        return (False, f"Δ {_num(d, signed=True)} goes the harmless way ({better} is better for {metric}), so it does "
                       f"not exceed the top-outliers control", "")
    return (abs(d) > abs(top_d),
            f"|Δ| {_num(abs(d))} does not exceed the top-outliers control's |Δ| {_num(abs(top_d))}",
            f"|Δ| {_num(abs(d))} beyond the top-outliers control's |Δ| {_num(abs(top_d))}")


def _judge(col, cand, metric, group, alpha, pools, superweights, ci_name, direction, ablation="prune",
           cond=None, all_pools=None) -> dict:
    cond = cond or K.cond_prune(cand)
    r = _row(col, cond, metric, group)
    if ablation == "prune":
        pool, draws = _own_pool(r, cand, pools, superweights)
    else:  # the new ablations always name their pool
        pool = str(r["null_pool"]) if r is not None and isinstance(r.get("null_pool"), str) else ""
        draws = (all_pools or {}).get(pool)
    matched = (all_pools or {}).get(cand) if ablation != "joint" else None
    n_rand = 0 if draws is None else int(draws.size)
    top = _row(col, K.COND_TOP_OUTLIERS, metric, group)
    top_d = float(top["delta"]) if top is not None and _finite(top["delta"]) else np.nan
    out = {"candidate": cand, "metric": metric, "group": group, "delta": np.nan, "ci_low": np.nan, "ci_high": np.nan,
           "p_value": np.nan, "control_delta": top_d, "cond_p": None, "cond_control": None, "cond_interval": None,
           "baseline": np.nan, "value": np.nan, "null_pool": pool or "", "n_random": n_rand, "p_source": "",
           "alpha": float(alpha), "direction": direction, "harmful": None, "ablation": ablation, "condition": cond,
           "p_matched": np.nan, "n_matched": 0 if matched is None else int(matched.size), "rel_effect": np.nan}
    if r is None or not _finite(r["delta"]):
        return {**out, "passes": False, "status": NOT_EVALUABLE, "reason": f"no {ablation} row for {metric} on "
                f"{group if group != K.GROUP_ALL else 'all'} cells"}
    d = float(r["delta"])
    pm = r.get("p_matched")
    if _finite(pm):
        out["p_matched"] = float(pm)
    elif matched is not None and matched.size:
        out["p_matched"] = empirical_p(d, matched, alternative="two-sided")
    p, source = (float(r["p_value"]), "collapse") if _finite(r.get("p_value")) else (np.nan, "")
    if not _finite(p) and n_rand:
        p, source = empirical_p(d, draws, alternative="two-sided"), "draws"
    lo, hi = float(r["ci_low"]), float(r["ci_high"])
    checks: dict[str, tuple[bool | None, str, str]] = {}
    if _finite(p):
        checks["cond_p"] = (p < alpha, f"{_p(p)} is not below {alpha:g}", f"{_p(p)} < {alpha:g}")
    elif pools and draws is None:
        checks["cond_p"] = (None, "no p-value, and no random draws of its own pool to compute one", "")
    else:
        checks["cond_p"] = (None, "no p-value and no random draws to compute one", "")
    checks["cond_control"] = _control_check(d, top_d, metric, direction) if _finite(top_d) else \
        (None, "the top-outliers control was not run", "")
    if _finite(lo) and _finite(hi):
        checks["cond_interval"] = (lo > 0 or hi < 0, f"the {ci_name} ({_ci(lo, hi)}) includes 0",
                                   f"the {ci_name} ({_ci(lo, hi)}) excludes 0")
    else:
        checks["cond_interval"] = (None, "no confidence interval", "")
    met = [ok for ok, _, _ in checks.values()]
    status = PASSES if all(m is True for m in met) else FAILS if any(m is False for m in met) else NOT_EVALUABLE
    reason = "; ".join(yes for _, _, yes in checks.values()) if status == PASSES else \
        "; ".join(no for ok, no, _ in checks.values() if ok is not True)
    value = float(r["value"])
    base = value - d if _finite(value) else np.nan
    rel = abs(d) / abs(base) if _finite(base) and base != 0 else np.nan
    if status == PASSES and _finite(rel) and rel < TINY_EFFECT:
        reason += f"; passes, but changes {metric} by only {100 * rel:.2g}% of its baseline"
    return {**out, "rel_effect": rel, "delta": d, "ci_low": lo, "ci_high": hi, "p_value": p, "p_source": source,
            **{k: v[0] for k, v in checks.items()}, "passes": status == PASSES, "status": status, "reason": reason,
            "baseline": base, "value": value, "harmful": _harmful(d, metric)}


def verdicts(collapse: pd.DataFrame, *, primary_metric: str, alpha: float = 0.05,
             candidates: list[str] | None = None, group: str = K.GROUP_ALL, ci_level: float | None = None,
             superweights: pd.DataFrame | None = None, direction: str = "two-sided",
             ablations: tuple | list | None = None) -> pd.DataFrame:
    """Judge every pruned candidate on `primary_metric` against the controls (the rule in the module docstring).

    Parameters
    ----------
    collapse
        The prune step's long table (`collapse.tsv`): rows ``prune:<cand>``, ``random:<k>`` (with ``control_for``),
        ``top_outliers``; ``null_pool`` names each row's draws.
    primary_metric
        The metric to judge on (``params["primary_metric"]``; `metrics.registry.primary_metric` of the family).
        Its direction (registry) decides which way is harmful; unknown metrics count |Δ|.
    alpha
        Level of the p-value test.
    candidates
        Which candidates, in this order; default every ``prune:`` condition of the table, in table order.
    group
        Which cells (``"all"``).
    ci_level
        Coverage of the collapse table's intervals (0.95), named in the reasons; None says "CI".
    superweights
        The candidates table, only for tables without ``null_pool``: it names each candidate's parameter.
    direction
        ``"two-sided"`` (the rule the report has always stated: |Δ| beyond the control's |Δ|, whichever way) or
        ``"harmful"`` (a change that makes the model better by the metric's registered direction fails condition
        2). Either way the ``harmful`` column says which way each candidate moved the metric.
    ablations
        Which ablations to judge besides zeroing (``prune``, always): default every one of `ABLATIONS` the table
        has a row for (``mean:<cand>``, ``mean_activation:<cand>``, ``neuron:<cand>``, ``channel:<cand>``,
        ``joint``); ``()`` for zeroing only.

    Returns
    -------
    One row per candidate and ablation (all zeroing rows first, in candidate order; then each other ablation's):
    ``candidate``, ``metric``, ``delta``, ``ci_low``, ``ci_high``, ``p_value``,
    ``control_delta`` (the top-outliers control's Δ), ``cond_p``, ``cond_control``, ``cond_interval`` (True, False,
    or None when it cannot be checked), ``passes``, ``reason`` (in words: what fails or is missing; for a pass,
    each condition met), then ``status`` ("passes", "fails", "not evaluable"), ``group``, ``baseline``,
    ``value``, ``harmful`` (the change makes the model worse by the metric's direction; None if unknown),
    ``null_pool`` and ``n_random`` (the draws the p-value is against), ``p_source`` ("collapse":
    the prune step's; "draws": computed here for an older table), ``alpha``, ``direction``, ``ablation``,
    ``condition`` (the collapse condition judged), ``p_matched`` and ``n_matched`` (the p against the candidate's
    |w|-matched draws and their number: information, not part of the rule), ``rel_effect`` (|Δ| / |baseline|
    of the metric: no part of the rule either; a pass below 1% says so in its reason).

    Examples
    --------
    >>> v = verdicts(ssw.get.collapse(adata), primary_metric="gepc_mse", alpha=0.05)  # doctest: +SKIP
    >>> v.loc[v["passes"], "candidate"]  # doctest: +SKIP
    """
    if direction not in _DIRECTIONS:
        msg = f"direction must be one of {_DIRECTIONS}; got {direction!r}."
        raise ValueError(msg)
    if not 0 < alpha < 1:
        msg = f"alpha must lie strictly between 0 and 1; got {alpha!r}. Pass e.g. alpha=0.05."
        raise ValueError(msg)
    if collapse is None or collapse.empty:
        return pd.DataFrame(columns=VERDICT_COLUMNS)
    col = collapse.assign(condition=collapse["condition"].astype(str), metric=collapse["metric"].astype(str),
                          group=collapse["group"].astype(str))
    if candidates is None:
        pre = "prune:"
        conds = col.loc[(col["metric"] == primary_metric) & col["condition"].str.startswith(pre), "condition"]
        candidates = [c[len(pre):] for c in dict.fromkeys(conds)]
    ci_name = f"{100 * ci_level:g}% CI" if _finite(ci_level) and 0 < float(ci_level) < 1 else "CI"
    pools = random_pools(col, primary_metric, group)
    all_pools = random_pools(col, primary_metric, group, prefixes=DRAW_PREFIXES)
    rows = [_judge(col, str(c), primary_metric, group, alpha, pools, superweights, ci_name, direction,
                   all_pools=all_pools) for c in candidates]
    measured = set(col.loc[col["metric"] == primary_metric, "condition"])
    for ablation in ABLATIONS[1:] if ablations is None else [a for a in ablations if a != "prune"]:
        if ablation == "joint":
            if K.COND_JOINT in measured:
                j = col.loc[col["condition"] == K.COND_JOINT, "candidate"]
                who = str(j.iloc[0]) if len(j) and isinstance(j.iloc[0], str) else ""
                rows.append(_judge(col, who, primary_metric, group, alpha, pools, superweights, ci_name, direction,
                                   "joint", K.COND_JOINT, all_pools))
            continue
        for c in candidates:
            cond = f"{ablation}:{c}"
            if cond in measured:
                rows.append(_judge(col, str(c), primary_metric, group, alpha, pools, superweights, ci_name,
                                   direction, ablation, cond, all_pools))
    out = pd.DataFrame(rows, columns=VERDICT_COLUMNS)
    for c in ("cond_p", "cond_control", "cond_interval", "harmful"):
        out[c] = out[c].astype(object)
    out["passes"] = out["passes"].astype(bool)
    return out
