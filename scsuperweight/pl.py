"""Figures over the result tables (the DESIGN.md output contract), in a plain scanpy-like look.

Every function takes an AnnData with results under ``adata.uns[key]`` (or the table itself as a DataFrame, or
the dict that :func:`scsuperweight.report.load_results` returns), draws with matplotlib only (safe under Agg),
and returns the Figure, or the Axes it drew on when ``ax=`` is given. A missing table or column raises
:class:`~scsuperweight.errors.DataError` naming the step to run first.

The private table helpers here (metric names and directions, collapse-table normalisation, group parsing) are
shared with :mod:`scsuperweight.report`, so the figures and the written hypotheses read the tables the same way.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from scsuperweight import _keys
from scsuperweight import results as _results
from scsuperweight._log import logger
from scsuperweight.errors import DataError
from scsuperweight.metrics import registry as _registry

__all__ = [
    "spike_map",
    "candidate_effects",
    "collapse_by_celltype",
    "scaling_curve",
    "embedding_before_after",
    "enrichment_dotplot",
    "quantize",
    "census",
]

# ---------------------------------------------------------------------------------------------------------------
# Tables: where each comes from, and how to read it
# ---------------------------------------------------------------------------------------------------------------

# uns sub-key -> the step that writes it (named in every "missing" error)
_STEP = {s.uns_key: f"ssw.tl.{s.step} (CLI: scsuperweight {s.step})" for s in _results.TABLES.values()}

_COLLAPSE_NUMERIC = [c for c, t in _results.spec("collapse").columns.items() if t == _results.FLOAT]

_AD_RE = re.compile(r"(^|[^a-z])(ad|alzheimer\w*|case|disease\w*|dementia|patient)([^a-z]|$)")
_CONTROL_RE = re.compile(r"(control|ctrl|ctl|healthy|normal|^nci$|^hc$|^ct$|^nc$|non[-_ ]?ad|no[-_ ]?ad)")


def metric_label(metric: str) -> str:
    """The readable name of a metric (the metric itself when unknown)."""
    return _registry.label(metric)


def _higher_is_better(metric: str) -> bool | None:
    d = _registry.direction(metric)
    return None if d is None else d > 0


_worse = _registry.worse  # how much worse a change makes the model (positive = worse)


def _is_adata(obj) -> bool:
    return hasattr(obj, "uns") and hasattr(obj, "obsm") and hasattr(obj, "obs")


def _as_frame(obj) -> pd.DataFrame | None:
    if obj is None:
        return None
    if isinstance(obj, pd.DataFrame):
        return obj
    if isinstance(obj, Mapping):  # a table that went through a serialiser as a dict of columns
        try:
            return pd.DataFrame(dict(obj))
        except ValueError:
            return None
    return None


def _get_table(data, name: str, key: str = _keys.UNS_KEY, required: Sequence[str] = ()) -> pd.DataFrame:
    """Fetch result table ``name`` from an AnnData, a results dict or a DataFrame; check its columns."""
    step = _STEP.get(name, "the pipeline")
    if isinstance(data, _results.RunResults):
        data = data.as_dict()
    if isinstance(data, pd.DataFrame):
        table, where = data, "the DataFrame passed"
    elif _is_adata(data):
        store = data.uns.get(key)
        if store is None:
            msg = f"adata.uns[{key!r}] is missing: no scsuperweight results on this AnnData; run {step} first."
            raise DataError(msg)
        table, where = _as_frame(store.get(name)), f"adata.uns[{key!r}][{name!r}]"
        if table is None:
            msg = f"No {name} table at {where}; run {step} first."
            raise DataError(msg)
        if name in _results.TABLES:  # stored as h5ad-safe strings: back to the schema's types
            table = _results.typed(table, name)
    elif isinstance(data, Mapping):
        table, where = _as_frame(data.get(name)), f"results[{name!r}]"
        if table is None:
            msg = f"No {name} table in the results ({name}.tsv missing?); run {step} first."
            raise DataError(msg)
    else:
        msg = (f"Expected an AnnData, a results dict or a DataFrame, got {type(data).__name__}; "
               f"pass adata after {step}, or the {name} table itself.")
        raise DataError(msg)
    missing = [c for c in required if c not in table.columns]
    if missing:
        msg = (f"{where} lacks column(s) {missing} needed here (it has {list(table.columns)}); "
               f"expected the {name} table written by {step}.")
        raise DataError(msg)
    if table.empty:
        msg = f"{where} is empty; run {step} first (or check that it found anything)."
        raise DataError(msg)
    return table


def _prepare_collapse(df: pd.DataFrame) -> pd.DataFrame:
    """Normalise a collapse table: numeric columns, `delta` filled from baseline, CIs on the delta scale.

    The contract's CI is on the effect (delta vs baseline). A pipeline that reported it on the value scale is
    recognised row by row (the interval holds the value, not the delta) and shifted by the baseline.
    """
    df = df.copy()
    for c in _COLLAPSE_NUMERIC:
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df.columns else np.nan
    if "group" not in df.columns:
        df["group"] = _keys.GROUP_ALL
    for c in ("condition", "metric", "group"):
        df[c] = df[c].where(df[c].notna(), _keys.GROUP_ALL if c == "group" else "").astype(str)
    base = df[df["condition"] == _keys.COND_BASELINE].groupby(["metric", "group"])["value"].first()
    if len(base):
        idx = pd.MultiIndex.from_arrays([df["metric"], df["group"]])
        base_v = pd.Series(base.reindex(idx).to_numpy(), index=df.index)
    else:
        base_v = pd.Series(np.nan, index=df.index)
    fill = df["delta"].isna() & df["value"].notna()
    df.loc[fill, "delta"] = df.loc[fill, "value"] - base_v[fill]
    df.loc[df["condition"] == _keys.COND_BASELINE, "delta"] = df["delta"].fillna(0.0)
    offset = df["value"] - df["delta"]
    lo, hi, d, v = df["ci_low"], df["ci_high"], df["delta"], df["value"]
    shift = ~((lo <= d) & (d <= hi)) & (lo <= v) & (v <= hi) & offset.notna()
    if shift.any():
        logger.debug("collapse: %d CI(s) were on the value scale; shifted to the delta scale", int(shift.sum()))
        df.loc[shift, "ci_low"] = lo[shift] - offset[shift]
        df.loc[shift, "ci_high"] = hi[shift] - offset[shift]
    df["baseline_value"] = df["value"] - df["delta"]
    df["baseline_value"] = df["baseline_value"].fillna(base_v)
    return df


def _collapse(data, key: str) -> pd.DataFrame:
    return _prepare_collapse(
        _get_table(data, _keys.UNS_COLLAPSE, key, required=["condition", "metric", "group", "value"])
    )


def _resolve_metric(col: pd.DataFrame, metric: str | None) -> str:
    present = list(dict.fromkeys(col["metric"]))
    if metric is not None:
        if metric not in present:
            msg = f"metric={metric!r} is not in the collapse table; metrics present: {present}."
            raise DataError(msg)
        return metric
    preferred = _registry.default_metric(present)
    if preferred is not None:
        return preferred
    if not present:
        msg = "The collapse table has no metrics; run ssw.tl.prune first."
        raise DataError(msg)
    return present[0]


def _prune_candidates(col: pd.DataFrame) -> list[str]:
    pre = "prune:"
    conds = col.loc[col["condition"].str.startswith(pre), "condition"]
    return [c[len(pre):] for c in dict.fromkeys(conds)]


def _top_candidate(col: pd.DataFrame, metric: str) -> str:
    """The candidate whose zeroing moves `metric` most (on all cells, else averaged over groups)."""
    sub = col[(col["metric"] == metric) & col["condition"].str.startswith("prune:")]
    if sub.empty:
        msg = f"The collapse table has no prune:<candidate> rows for {metric!r}; run ssw.tl.prune first."
        raise DataError(msg)
    allg = sub[sub["group"] == _keys.GROUP_ALL]
    use = allg if allg["delta"].notna().any() else sub
    eff = use.assign(w=np.abs(use["delta"].to_numpy(dtype=float))).groupby("condition")["w"].mean()
    if eff.notna().any():
        return str(eff.idxmax())[len("prune:"):]
    return str(use["condition"].iloc[0])[len("prune:"):]


def _split_groups(groups: Sequence[str]) -> dict[str, tuple[str, str | None, tuple[str, str] | None]]:
    """group -> (label, condition, contrast).

    ``label|cond`` gives (label, cond, None); a plain group equal to a condition value gives ("all cells", value,
    None); a plain label gives (label, None, None). A condition part made of two condition values joined by
    ``-``, ``_vs_``, `` vs `` or ``/`` (``Microglia|AD-control``) is a contrast: (label, None, (a, b)).
    """
    sep = _keys.GROUP_SEP
    pair_conds = {g.split(sep, 1)[1] for g in groups if sep in g}
    candidates = pair_conds | {g for g in groups if sep not in g}
    contrasts = {c: p for c in candidates if (p := _contrast_parts(c, pair_conds)) is not None}
    cond_values = pair_conds - set(contrasts)
    out: dict[str, tuple[str, str | None, tuple[str, str] | None]] = {}
    for g in groups:
        if g == _keys.GROUP_ALL:
            continue
        lab, cond = g.split(sep, 1) if sep in g else ("all cells", g)
        if cond in contrasts:
            out[g] = (lab, None, contrasts[cond])
        elif sep in g:
            out[g] = (lab, cond, None)
        elif g in cond_values:
            out[g] = ("all cells", g, None)
        else:
            out[g] = (g, None, None)
    return out


def _contrast_parts(cond: str, values) -> tuple[str, str] | None:
    for sep in ("_vs_", " vs ", " - ", "-", "/"):
        if sep in cond:
            a, _, b = cond.partition(sep)
            if a in values and b in values and a != b:
                return a, b
    return None


def _order_conditions(conds) -> list[str]:
    """Disease-like condition values first, control-like last, the rest in between (stable)."""

    def rank(c: str) -> int:
        low = str(c).lower()
        if _CONTROL_RE.search(low):
            return 2
        if _AD_RE.search(low):
            return 0
        return 1

    return sorted(dict.fromkeys(conds), key=lambda c: (rank(c), str(c)))


def _condition_role(c: str) -> str:
    low = str(c).lower()
    if _CONTROL_RE.search(low):
        return "control"
    if _AD_RE.search(low):
        return "disease"
    return "other"


def _scale_points(col: pd.DataFrame, metric: str, group: str = _keys.GROUP_ALL) -> pd.DataFrame:
    """Rows candidate, factor, value, lo, hi (value scale) from scale:<cand>:<factor> (+ prune as factor 0)."""
    sub = col[(col["metric"] == metric) & (col["group"] == group)]
    rows = []
    for r in sub.itertuples(index=False):
        cond = r.condition
        if not cond.startswith("scale:"):
            continue
        cand, _, fac = cond[len("scale:"):].rpartition(":")
        try:
            f = float(fac)
        except ValueError:
            continue
        if not cand:
            continue
        rows.append((cand, f, r.value, r.ci_low + r.value - r.delta, r.ci_high + r.value - r.delta))
    pts = pd.DataFrame(rows, columns=["candidate", "factor", "value", "lo", "hi"])
    # zeroing is scaling by 0: add the prune row when the sweep did not include 0
    for cand in pts["candidate"].unique():
        if not (np.isclose(pts.loc[pts["candidate"] == cand, "factor"], 0.0)).any():
            pr = sub[sub["condition"] == _keys.cond_prune(cand)]
            if len(pr):
                r = pr.iloc[0]
                off = r["value"] - r["delta"]
                pts.loc[len(pts)] = [cand, 0.0, r["value"], r["ci_low"] + off, r["ci_high"] + off]
    return pts.sort_values(["candidate", "factor"], kind="stable").reset_index(drop=True)


def _baseline_value(col: pd.DataFrame, metric: str, group: str = _keys.GROUP_ALL) -> float:
    b = col[(col["condition"] == _keys.COND_BASELINE) & (col["metric"] == metric) & (col["group"] == group)]
    if len(b) and np.isfinite(b["value"].iloc[0]):
        return float(b["value"].iloc[0])
    others = col[(col["metric"] == metric) & (col["group"] == group)]["baseline_value"].dropna()
    return float(others.iloc[0]) if len(others) else float("nan")


def _short(s, n: int = 40, keep_end: bool = False) -> str:
    """A data string as a matplotlib label: truncated (its start kept, or its end with `keep_end`: the part that
    tells parameter names apart), and '$' escaped so a name never starts mathtext."""
    s = str(s)
    if len(s) > n:
        s = "…" + s[len(s) - n + 1:] if keep_end else s[: n - 1] + "…"
    return s.replace("$", r"\$")


# ---------------------------------------------------------------------------------------------------------------
# Look and plumbing
# ---------------------------------------------------------------------------------------------------------------

_RC = {
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "axes.edgecolor": "#333333",
    "axes.linewidth": 0.8,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "font.size": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.dpi": 100,
    "savefig.dpi": 150,
}

_C_CAND = "#1f4e79"
_C_TOP = "#e08214"
_C_RESTORE = "#1b7837"
_C_RANDOM = "#9e9e9e"
_C_ROLE = {"disease": "#c0392b", "control": "#2e75b6"}


def _styled(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(_RC):
            return fn(*args, **kwargs)

    return wrapper


def _new_axes(ax: Axes | None, figsize) -> tuple[Figure, Axes, bool]:
    if ax is not None:
        return ax.figure, ax, False
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax, True


def _finish(fig: Figure, ret, own: bool, save, show: bool):
    if save is not None:
        from ._io import atomic_savefig

        save = atomic_savefig(fig, save, bbox_inches="tight", facecolor="white")
        logger.info("saved figure to %s", save)
    if show:
        plt.show()
    return fig if own else ret


def _fmt_channel(ch) -> str:
    try:
        f = float(ch)
    except (TypeError, ValueError):
        return str(ch)
    if not np.isfinite(f):
        return ""
    return str(int(f)) if f == int(f) else f"{f:g}"


def _layer_sort_key(x):
    try:
        return (0, float(x), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(x))


# canonical reading order of sites inside a block
_SITE_ORDER = ["norm1_in", "attn_out", "norm1_out", "ffn_in", "ffn_hidden", "ffn_out", "norm2_in", "norm2_out",
               "block_out"]


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


@_styled
def spike_map(
    data,
    *,
    value: str = "max_abs",
    annotate: bool = True,
    cmap: str = "viridis",
    key: str = _keys.UNS_KEY,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Heatmap of the largest activation per layer (rows) and site (columns), log colour scale.

    Parameters
    ----------
    data
        AnnData after ``ssw.tl.scan``, the activations table, or a results dict.
    value
        ``"max_abs"`` (largest |activation|) or ``"spike_ratio"`` (max / median |activation| of that site).
    annotate
        Write the channel that carries the maximum in each cell.
    cmap, key, ax, save, show
        Colour map; results key; Axes to draw on; file to save to; call ``plt.show()``.

    Returns
    -------
    The Figure, or ``ax`` when it was given.

    Examples
    --------
    >>> fig = ssw.pl.spike_map(adata, value="spike_ratio")  # doctest: +SKIP
    """
    need = ["layer", "site", "max_abs", "channel"] + (["median_abs"] if value == "spike_ratio" else [])
    if value not in ("max_abs", "spike_ratio"):
        msg = f"value={value!r} is not one of 'max_abs', 'spike_ratio'."
        raise ValueError(msg)
    act = _get_table(data, _keys.UNS_ACTIVATIONS, key, required=need).copy()
    mx = pd.to_numeric(act["max_abs"], errors="coerce")
    if value == "spike_ratio":
        med = pd.to_numeric(act["median_abs"], errors="coerce")
        act["val_"] = mx / med.where(med > 0)
        label = "spike ratio (max / median |activation|)"
    else:
        act["val_"] = mx.abs()
        label = "max |activation|"
    act = act[np.isfinite(act["val_"].to_numpy(dtype=float))]
    if act.empty:
        msg = f"The activations table has no finite {value} values; run ssw.tl.scan first."
        raise DataError(msg)
    act["layer_"] = act["layer"].astype(str)
    act["site_"] = act["site"].astype(str)
    best = act.loc[act.groupby(["layer_", "site_"])["val_"].idxmax()]
    layers = sorted(best["layer_"].unique(), key=_layer_sort_key)
    sites_present = list(dict.fromkeys(act["site_"]))
    sites = [s for s in _SITE_ORDER if s in sites_present] + [s for s in sites_present if s not in _SITE_ORDER]
    li, si = {v: i for i, v in enumerate(layers)}, {v: i for i, v in enumerate(sites)}
    mat = np.full((len(layers), len(sites)), np.nan)
    chans = np.full((len(layers), len(sites)), "", dtype=object)
    for r in best.itertuples(index=False):
        mat[li[r.layer_], si[r.site_]] = r.val_
        chans[li[r.layer_], si[r.site_]] = _fmt_channel(r.channel)

    fig, ax, own = _new_axes(ax, (1.6 + 0.75 * len(sites), 1.2 + 0.38 * len(layers)))
    pos = mat[np.isfinite(mat) & (mat > 0)]
    vmin, vmax = (float(pos.min()), float(pos.max())) if pos.size else (1.0, 10.0)
    if vmax <= vmin:
        vmin, vmax = vmin / 2, vmax * 2
    cm = plt.get_cmap(cmap).with_extremes(bad="#eeeeee")
    norm = LogNorm(vmin=vmin, vmax=vmax)
    im = ax.imshow(np.ma.masked_invalid(np.where(mat > 0, mat, np.nan)), cmap=cm, norm=norm, aspect="auto")
    ax.set_xticks(range(len(sites)), [_short(s, 14) for s in sites], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [_short(la, 12) for la in layers])
    ax.set_xlabel("site")
    ax.set_ylabel("layer")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    if annotate:
        fs = max(5.0, min(8.0, 90.0 / max(len(layers), len(sites))))
        for i in range(len(layers)):
            for j in range(len(sites)):
                if not chans[i, j] or not np.isfinite(mat[i, j]) or mat[i, j] <= 0:
                    continue
                r, g, b, _ = cm(norm(mat[i, j]))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(j, i, _short(chans[i, j], 8), ha="center", va="center", fontsize=fs,
                        color="white" if dark else "black")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(label)
    ax.set_title("Largest activation per layer and site" + (" (numbers: channel)" if annotate else ""))
    return _finish(fig, ax, own, save, show)


@_styled
def candidate_effects(
    data,
    *,
    metric: str | None = None,
    group: str = _keys.GROUP_ALL,
    band: tuple[float, float] = (2.5, 97.5),
    key: str = _keys.UNS_KEY,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Each candidate's effect (Δ metric vs baseline) against the random-control band.

    Candidates, the largest-other-weights control (``top_outliers``) and activation restores are points with CI
    whiskers. Each candidate is tested against random scalars of its own parameter: behind each row a shaded bar
    spans the ``band`` percentiles of those draws, and each parameter's draws are shown as a strip of their own
    (results without a ``null_pool`` column, from older runs, get one pooled strip and band).

    Parameters
    ----------
    data
        AnnData after ``ssw.tl.prune``, the collapse table, or a results dict.
    metric
        Metric to show; default: the first of gepc_mse, gep_mse, knn_accuracy, ... present.
    group
        ``"all"``, a cell-type label, or ``label|condition``.
    band
        Percentiles of the random deltas drawn as the shaded band.
    key, ax, save, show
        Results key; Axes to draw on; file to save to; call ``plt.show()``.

    Returns
    -------
    The Figure, or ``ax`` when it was given.
    """
    col = _collapse(data, key)
    metric = _resolve_metric(col, metric)
    sub = col[(col["metric"] == metric) & (col["group"] == group)]
    if sub.empty:
        groups = list(dict.fromkeys(col.loc[col["metric"] == metric, "group"]))[:10]
        msg = f"No collapse rows for metric {metric!r} and group {group!r}; groups present include {groups}."
        raise DataError(msg)
    cands = sub[sub["condition"].str.startswith("prune:")].copy()
    if cands.empty:
        msg = f"No prune:<candidate> rows for {metric!r} / {group!r}; run ssw.tl.prune first."
        raise DataError(msg)
    cands["_w"] = _worse(cands["delta"], metric)
    cands = cands.sort_values("_w", ascending=False, kind="stable")
    order = [c[len("prune:"):] for c in cands["condition"]]
    rand_rows = sub[sub["condition"].str.startswith("random:")]
    top = sub[sub["condition"] == _keys.COND_TOP_OUTLIERS]
    rest = sub[sub["condition"].str.startswith("restore:")]
    rest = rest.assign(_c=rest["condition"].str[len("restore:"):])
    rest = rest.assign(_o=rest["_c"].map({c: i for i, c in enumerate(order)}).fillna(len(order)))
    rest = rest.sort_values("_o", kind="stable")
    # the random draws per null pool (the parameter a candidate is tested against), in the candidates' order
    per_pool = "null_pool" in sub.columns
    pool_of = (lambda r: str(r["null_pool"])) if per_pool else (lambda r: "")
    rand_pool = rand_rows["null_pool"].astype(str) if per_pool else pd.Series("", index=rand_rows.index)
    pools: dict[str, np.ndarray] = {}
    for _, r in cands.iterrows():
        pools.setdefault(pool_of(r), np.array([]))
    for name in dict.fromkeys(rand_pool):
        pools.setdefault(name, np.array([]))
    for name in pools:
        pools[name] = rand_rows.loc[rand_pool == name, "delta"].dropna().to_numpy(dtype=float)
    pools = {name: v for name, v in pools.items() if v.size}

    rows: list[tuple[str, pd.Series | None, str]] = []
    rows += [(f"zero {_short(c, 34)}", r, _C_CAND) for c, (_, r) in zip(order, cands.iterrows())]
    rows += [("top outliers (control)", r, _C_TOP) for _, r in top.iterrows()]
    rows += [(f"restore {_short(r['_c'], 31)}", r, _C_RESTORE) for _, r in rest.iterrows()]
    n_rows = len(rows) + len(pools)
    fig, ax, own = _new_axes(ax, (7.0, 1.6 + 0.36 * n_rows))
    band_label = (f"random scalars of the same parameter, {band[0]:g}–{band[1]:g}th pct" if per_pool else
                  f"random controls, all parameters, {band[0]:g}–{band[1]:g}th pct")
    for y, (_, r, c) in enumerate(rows):  # each candidate's own null band behind its row
        null = pools.get(pool_of(r)) if c != _C_TOP else None
        if null is not None and null.size:
            lo, hi = np.percentile(null, band)
            ax.add_patch(Rectangle((lo, y - 0.4), hi - lo, 0.8, color=_C_RANDOM, alpha=0.22, lw=0, zorder=0,
                                   label=band_label))
            band_label = "_nolegend_"
    rng = np.random.default_rng(0)
    for k, v in enumerate(pools.values()):
        y_r = len(rows) + k
        ax.scatter(v, y_r + rng.uniform(-0.18, 0.18, v.size), s=10, color=_C_RANDOM, alpha=0.8, lw=0, zorder=2)
    ax.axvline(0, color="#444444", lw=0.8, zorder=1)
    seen = set()
    for y, (_, r, c) in enumerate(rows):
        d = float(r["delta"])
        lo_, hi_ = float(r["ci_low"]), float(r["ci_high"])
        xerr = None
        if np.isfinite(lo_) and np.isfinite(hi_):
            xerr = [[max(d - lo_, 0.0)], [max(hi_ - d, 0.0)]]
        kind = {_C_CAND: "candidate zeroed", _C_TOP: "largest other weights zeroed",
                _C_RESTORE: "zeroed, activation restored"}[c]
        ax.errorbar([d], [y], xerr=xerr, fmt="o", color=c, ms=6, capsize=2.5, lw=1.2, zorder=3,
                    label=None if kind in seen else kind)
        seen.add(kind)
        p = float(r["p_value"])
        if np.isfinite(p):
            ax.annotate(f"p={p:.2g}", xy=(1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7, color="#555555")
    labels = [lab for lab, _, _ in rows] + [f"random: {_short(name, 26, keep_end=True)} (n={v.size})" if name else
                                             f"random draws, all parameters (n={v.size})" for name, v in pools.items()]
    ax.set_yticks(range(n_rows), labels)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_xlabel(f"Δ {_short(metric_label(metric), 80)} vs baseline")
    where = "" if group == _keys.GROUP_ALL else f" ({_short(group)})"
    ax.set_title(f"Candidate effects on {_short(metric, 60)}{where}")
    if own:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2)
    else:
        ax.legend(loc="best")
    return _finish(fig, ax, own, save, show)


@_styled
def collapse_by_celltype(
    data,
    *,
    metric: str | None = None,
    candidate: str | None = None,
    max_groups: int = 30,
    key: str = _keys.UNS_KEY,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Δ metric per cell type when a candidate is zeroed, disease and control cells side by side, CI whiskers.

    Parameters
    ----------
    data
        AnnData after ``ssw.tl.prune``, the collapse table, or a results dict.
    metric
        Metric to show; default as in :func:`candidate_effects`.
    candidate
        Candidate id; default: the one whose zeroing moves the metric most on all cells.
    max_groups
        Show at most this many cell types (the most affected).
    key, ax, save, show
        Results key; Axes to draw on; file to save to; call ``plt.show()``.

    Returns
    -------
    The Figure, or ``ax`` when it was given.
    """
    col = _collapse(data, key)
    metric = _resolve_metric(col, metric)
    if candidate is None:
        candidate = _top_candidate(col, metric)
    cond = _keys.cond_prune(candidate)
    sub = col[(col["condition"] == cond) & (col["metric"] == metric) & (col["group"] != _keys.GROUP_ALL)]
    if sub.empty:
        msg = (f"No per-cell-type rows for {cond!r} on {metric!r}; run ssw.tl.prune with a label key "
               f"(and a condition key for disease vs control) first.")
        raise DataError(msg)
    split = _split_groups(list(sub["group"]))
    sub = sub[sub["group"].map(lambda g: split[g][2] is None)]
    sub = sub.assign(_label=sub["group"].map(lambda g: split[g][0]), _cond=sub["group"].map(lambda g: split[g][1]))
    paired = sub["_cond"].notna().any()
    if paired:
        sub = sub[sub["_cond"].notna()]
        conds = _order_conditions(sub["_cond"])
    else:
        conds = [None]
    sub = sub.assign(_w=_worse(sub["delta"], metric))
    order = sub.groupby("_label")["_w"].max().sort_values(ascending=False, kind="stable").index.tolist()
    if "all cells" in order:
        order = ["all cells"] + [o for o in order if o != "all cells"]
    order = order[:max_groups]
    allrow = col[(col["condition"] == cond) & (col["metric"] == metric) & (col["group"] == _keys.GROUP_ALL)]

    fig, ax, own = _new_axes(ax, (6.2, 1.2 + 0.3 * len(order) * max(1, len(conds)) ** 0.6))
    height = 0.8 / len(conds)
    palette = iter(plt.get_cmap("tab10").colors[2:])
    for k, c in enumerate(conds):
        part = sub[sub["_cond"] == c] if c is not None else sub
        part = part.drop_duplicates("_label").set_index("_label")
        ys, xs, errs = [], [], [[], []]
        for i, lab in enumerate(order):
            if lab not in part.index:
                continue
            r = part.loc[lab]
            d = float(r["delta"])
            ys.append(i - 0.4 + height * (k + 0.5))
            xs.append(d)
            lo, hi = float(r["ci_low"]), float(r["ci_high"])
            errs[0].append(max(d - lo, 0.0) if np.isfinite(lo) else 0.0)
            errs[1].append(max(hi - d, 0.0) if np.isfinite(hi) else 0.0)
        role = _condition_role(c) if c is not None else "other"
        color = _C_ROLE.get(role) or (next(palette) if c is not None else _C_CAND)
        ax.barh(ys, xs, height=height * 0.92, color=color, alpha=0.85,
                label=_short(c, 30) if c is not None else None)
        ax.errorbar(xs, ys, xerr=errs, fmt="none", ecolor="#222222", elinewidth=0.9, capsize=2)
    if len(allrow) and np.isfinite(allrow["delta"].iloc[0]):
        ax.axvline(float(allrow["delta"].iloc[0]), color="#555555", ls="--", lw=0.9, label="all cells")
    ax.axvline(0, color="#222222", lw=0.8)
    ax.set_yticks(range(len(order)), [_short(o, 32) for o in order])
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlabel(f"Δ {_short(metric_label(metric), 80)} vs baseline")
    ax.set_title(f"Zeroing {_short(candidate, 40)}: effect by cell type")
    if paired or len(allrow):
        ax.legend(loc="lower right")
    return _finish(fig, ax, own, save, show)


@_styled
def scaling_curve(
    data,
    *,
    metric: str | None = None,
    candidates: Sequence[str] | None = None,
    group: str = _keys.GROUP_ALL,
    key: str = _keys.UNS_KEY,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Metric vs scale factor per candidate (dose–response), baseline at factor 1 as a dashed line.

    Zeroing (``prune:<candidate>``) is used as factor 0 when the sweep itself did not include 0.

    Parameters
    ----------
    data
        AnnData after ``ssw.tl.prune`` with scaling, the collapse table, or a results dict.
    metric
        Metric to show; default as in :func:`candidate_effects`.
    candidates
        Candidates to draw; default: all with ``scale:`` rows.
    group, key, ax, save, show
        Group of cells; results key; Axes to draw on; file to save to; call ``plt.show()``.

    Returns
    -------
    The Figure, or ``ax`` when it was given.
    """
    col = _collapse(data, key)
    metric = _resolve_metric(col, metric)
    pts = _scale_points(col, metric, group)
    if pts.empty:
        msg = (f"No scale:<candidate>:<factor> rows for {metric!r} / {group!r}; run ssw.tl.prune with scale "
               f"factors first.")
        raise DataError(msg)
    if candidates is not None:
        unknown = sorted(set(candidates) - set(pts["candidate"]))
        if unknown:
            msg = f"No scaling rows for candidate(s) {unknown}; present: {sorted(set(pts['candidate']))}."
            raise DataError(msg)
        pts = pts[pts["candidate"].isin(list(candidates))]
    fig, ax, own = _new_axes(ax, (5.6, 3.8))
    colors = plt.get_cmap("tab10").colors
    for i, (cand, part) in enumerate(pts.groupby("candidate", sort=False)):
        f, v = part["factor"].to_numpy(float), part["value"].to_numpy(float)
        lo, hi = part["lo"].to_numpy(float), part["hi"].to_numpy(float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        c = colors[i % len(colors)]
        ax.plot(f, v, "-o", color=c, ms=4.5, lw=1.4, label=_short(cand, 36))
        if ok.any():
            ax.errorbar(f[ok], v[ok], yerr=[np.clip(v[ok] - lo[ok], 0, None), np.clip(hi[ok] - v[ok], 0, None)],
                        fmt="none", ecolor=c, elinewidth=0.9, capsize=2)
    base = _baseline_value(col, metric, group)
    if np.isfinite(base):
        ax.axhline(base, color="#555555", ls="--", lw=0.9, label="baseline (×1)")
    ax.axvline(1.0, color="#999999", ls=":", lw=0.9)
    ax.set_xlabel("scale factor on the candidate (0 = zeroed, 1 = unchanged)")
    ax.set_ylabel(_short(metric_label(metric), 80))
    ax.set_title("Dose–response: scaling each candidate")
    ax.legend(loc="best")
    return _finish(fig, ax, own, save, show)


def _pca2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components (deterministic signs) and their explained-variance fractions."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    cov = x.T @ x / max(len(x) - 1, 1)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1][:2]
    v = v[:, order]
    v = v * np.sign(v[np.abs(v).argmax(axis=0), range(v.shape[1])])
    tot = float(w.clip(min=0).sum()) or 1.0
    pcs = x @ v
    if pcs.shape[1] < 2:
        pcs = np.column_stack([pcs, np.zeros(len(pcs))])
    return pcs, w[order].clip(min=0) / tot


def _obsm(adata, k: str, step: str) -> np.ndarray:
    if k not in adata.obsm:
        msg = f"adata.obsm[{k!r}] is missing (obsm has {list(adata.obsm.keys())}); {step}."
        raise DataError(msg)
    x = adata.obsm[k]
    x = x.to_numpy() if isinstance(x, pd.DataFrame) else np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 1:
        msg = f"adata.obsm[{k!r}] has shape {x.shape}; expected (n_cells, n_dims)."
        raise DataError(msg)
    return x


@_styled
def embedding_before_after(
    adata,
    *,
    color: str | None = None,
    basis: str | tuple[str, str] | None = None,
    before: str = _keys.OBSM_EMB,
    after: str = _keys.OBSM_EMB_PRUNED,
    point_size: float | None = None,
    key: str = _keys.UNS_KEY,
    ax: Sequence[Axes] | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Cells before and after pruning the top candidate, side by side, coloured by an obs column.

    By default ``obsm[before]`` and ``obsm[after]`` are each reduced to 2-D with PCA. With ``basis`` (e.g.
    ``"X_umap"``), precomputed 2-D coordinates are used instead: ``obsm[basis]`` and ``obsm[basis + "_pruned"]``,
    or a pair of obsm keys.

    Parameters
    ----------
    adata
        AnnData after ``ssw.tl.embed`` and ``ssw.tl.prune``.
    color
        obs column to colour by (categorical: legend; numeric: colour bar). Colours in
        ``adata.uns[color + "_colors"]`` are reused.
    basis
        Precomputed coordinates instead of PCA (see above).
    before, after
        obsm keys of the two embeddings.
    point_size, key, ax, save, show
        Marker size; results key (unused, for symmetry); a pair of Axes to draw on; file; ``plt.show()``.

    Returns
    -------
    The Figure, or the pair of Axes when ``ax`` was given.
    """
    del key
    if not _is_adata(adata):
        msg = (f"embedding_before_after needs an AnnData with obsm[{before!r}] and obsm[{after!r}], got "
               f"{type(adata).__name__}; run ssw.tl.embed and ssw.tl.prune first.")
        raise DataError(msg)
    if basis is None:
        xa = _obsm(adata, before, "run ssw.tl.embed first")
        xb = _obsm(adata, after, "run ssw.tl.prune first (it stores the embedding with the top candidate zeroed)")
        (ca, va), (cb, vb) = _pca2(xa), _pca2(xb)
        names = (f"PC1 ({va[0]:.0%})", f"PC2 ({va[1]:.0%})"), (f"PC1 ({vb[0]:.0%})", f"PC2 ({vb[1]:.0%})")
        how = "PCA"
    else:
        if isinstance(basis, str):
            kb = basis if basis in adata.obsm else f"X_{basis}"
            ka = f"{kb}_pruned"
        else:
            kb, ka = basis
        hint = (f"compute it first, e.g. sc.pp.neighbors(adata, use_rep={after!r}, key_added='pruned'); "
                f"sc.tl.umap(adata, neighbors_key='pruned', key_added={ka!r})")
        ca = _obsm(adata, kb, f"compute it first, e.g. sc.pp.neighbors(adata, use_rep={before!r}); sc.tl.umap(adata)")
        cb = _obsm(adata, ka, hint)
        base = kb[2:] if kb.startswith("X_") else kb
        names = ((_short(f"{base}1", 20), _short(f"{base}2", 20)),) * 2
        how = base.upper() if len(base) <= 5 else base
    ca, cb = ca[:, :2], cb[:, :2]
    n = adata.n_obs
    s = point_size if point_size is not None else float(np.clip(12000.0 / max(n, 1), 0.5, 25.0))
    perm = np.random.default_rng(0).permutation(n)  # no category is always drawn on top

    own = ax is None
    if own:
        fig, axs = plt.subplots(1, 2, figsize=(10.5, 4.4), layout="constrained")
    else:
        if len(ax) != 2:
            msg = f"ax must be a pair of Axes, got {len(ax)}."
            raise ValueError(msg)
        axs = list(ax)
        fig = axs[0].figure
    colors = None
    handles = None
    cont = None
    if color is not None:
        if color not in adata.obs.columns:
            msg = f"color={color!r} is not an obs column; available: {list(adata.obs.columns)}."
            raise DataError(msg)
        vals = adata.obs[color]
        if pd.api.types.is_numeric_dtype(vals) and not pd.api.types.is_bool_dtype(vals):
            cont = vals.to_numpy(dtype=float)
        else:
            cat = vals.astype("category")
            cats = list(cat.cat.categories)
            pal = adata.uns.get(f"{color}_colors")
            if pal is None or len(pal) < len(cats):
                base_cm = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
                pal = [base_cm(i % base_cm.N) for i in range(len(cats))]
            codes = cat.cat.codes.to_numpy()
            colors = np.array([pal[c] if c >= 0 else "#cccccc" for c in codes], dtype=object)
            handles = [Line2D([], [], ls="", marker="o", ms=5, color=pal[i], label=_short(c, 28))
                       for i, c in enumerate(cats)]
    for a, coords, (xl, yl), title in zip(axs, (ca, cb), names, ("baseline", "top candidate zeroed")):
        if cont is not None:
            sc = a.scatter(coords[perm, 0], coords[perm, 1], c=cont[perm], s=s, lw=0, cmap="viridis",
                           rasterized=True)
        else:
            c = list(colors[perm]) if colors is not None else "#4d4d4d"
            a.scatter(coords[perm, 0], coords[perm, 1], c=c, s=s, lw=0, rasterized=True)
        a.set_xlabel(xl)
        a.set_ylabel(yl)
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(f"{title} ({_short(how, 30)})")
    if cont is not None:
        fig.colorbar(sc, ax=axs[1], label=_short(color, 30))
    elif handles:
        axs[1].legend(handles=handles[:40], loc="center left", bbox_to_anchor=(1.01, 0.5), title=_short(color, 30),
                      markerscale=1.0)
    return _finish(fig, tuple(axs), own, save, show)


@_styled
def enrichment_dotplot(
    data,
    *,
    n_terms: int = 15,
    color: str | None = None,
    candidates: Sequence[str] | None = None,
    fdr_cap: float = 10.0,
    key: str = _keys.UNS_KEY,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Dot plot of enriched terms (rows) × candidates (columns): size = −log10 FDR, colour = NES or odds ratio.

    Parameters
    ----------
    data
        AnnData after ``ssw.tl.enrich``, the enrichment table, or a results dict.
    n_terms
        Number of terms (those with the smallest FDR in any candidate).
    color
        ``"nes"`` or ``"odds_ratio"``; default: NES when present, else the odds ratio.
    candidates
        Columns to show; default all.
    fdr_cap
        −log10 FDR above this is drawn at the largest size.
    key, ax, save, show
        Results key; Axes to draw on; file to save to; call ``plt.show()``.

    Returns
    -------
    The Figure, or ``ax`` when it was given.
    """
    enr = _get_table(data, _keys.UNS_ENRICHMENT, key, required=["candidate", "term", "fdr"]).copy()
    enr["fdr"] = pd.to_numeric(enr["fdr"], errors="coerce")
    enr = enr[enr["fdr"].notna()]
    if color is None:
        color = next((c for c in ("nes", "odds_ratio") if c in enr.columns
                      and pd.to_numeric(enr[c], errors="coerce").notna().any()), None)
    if color is not None:
        if color not in enr.columns:
            msg = f"color={color!r} is not a column of the enrichment table ({list(enr.columns)})."
            raise DataError(msg)
        enr["_c"] = pd.to_numeric(enr[color], errors="coerce")
    if candidates is not None:
        enr = enr[enr["candidate"].astype(str).isin([str(c) for c in candidates])]
    if enr.empty:
        msg = "No enrichment rows with an FDR to plot; run ssw.tl.enrich first."
        raise DataError(msg)
    enr["candidate"] = enr["candidate"].astype(str)
    enr["term"] = enr["term"].astype(str)
    if "gene_set" in enr.columns:  # the same term name in two libraries stays two rows
        dup = enr.groupby("term")["gene_set"].transform("nunique") > 1
        enr.loc[dup, "term"] = enr.loc[dup, "term"] + " (" + enr.loc[dup, "gene_set"].astype(str) + ")"
    best = enr.groupby("term")["fdr"].min().sort_values(kind="stable")
    terms = best.index[:n_terms].tolist()
    enr = enr[enr["term"].isin(terms)].sort_values("fdr", kind="stable").drop_duplicates(["term", "candidate"])
    cands = list(dict.fromkeys(enr["candidate"]))
    ti, ci = {t: i for i, t in enumerate(terms)}, {c: i for i, c in enumerate(cands)}
    cap = max(1.0, float(fdr_cap))
    score = np.clip(-np.log10(enr["fdr"].clip(lower=1e-300).to_numpy(float)), 0, cap)

    def size(v):
        return 12.0 + 220.0 * np.asarray(v, dtype=float) / cap

    fig, ax, own = _new_axes(ax, (2.8 + 0.9 * len(cands) + 0.045 * max(len(t) for t in terms),
                                  1.4 + 0.32 * len(terms)))
    x = enr["candidate"].map(ci).to_numpy(float)
    y = enr["term"].map(ti).to_numpy(float)
    if color is not None:
        cv = enr["_c"].to_numpy(float)
        if color == "nes":
            m = float(np.nanmax(np.abs(cv))) if np.isfinite(cv).any() else 1.0
            norm = TwoSlopeNorm(0.0, -m or -1.0, m or 1.0)
            cmap = "RdBu_r"
        else:
            fin = cv[np.isfinite(cv) & (cv > 0)]
            lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (1.0, 10.0)
            cv = np.clip(cv, lo, hi)
            norm = LogNorm(lo, hi) if hi > lo else Normalize(lo * 0.5, hi * 2)
            cmap = "Reds"
        sc = ax.scatter(x, y, s=size(score), c=cv, cmap=cmap, norm=norm, edgecolors="#333333", linewidths=0.4)
        fig.colorbar(sc, ax=ax, fraction=0.05, pad=0.02, label="NES" if color == "nes" else "odds ratio")
    else:
        ax.scatter(x, y, s=size(score), color=_C_CAND, edgecolors="#333333", linewidths=0.4)
    ref = sorted({v for v in (1.0, 2.0, round(cap)) if v <= cap})
    hs = [Line2D([], [], ls="", marker="o", ms=float(np.sqrt(size(v))), color="#bbbbbb", mec="#333333", mew=0.4)
          for v in ref]
    labels = [f"{v:g}" + ("+" if v == cap else "") for v in ref]
    if own:
        fig.legend(hs, labels, title="−log10 FDR", loc="outside right upper", labelspacing=1.2, borderpad=0.8)
    else:
        ax.legend(hs, labels, title="−log10 FDR", loc="best", labelspacing=1.2)
    ax.set_xticks(range(len(cands)), [_short(c, 24) for c in cands], rotation=40, ha="right")
    ax.set_yticks(range(len(terms)), [_short(t, 55) for t in terms])
    ax.set_xlim(-0.6, len(cands) - 0.4)
    ax.set_ylim(len(terms) - 0.5, -0.5)
    ax.set_title("Enriched terms per candidate")
    ax.grid(True, color="#eeeeee", lw=0.6)
    ax.set_axisbelow(True)
    return _finish(fig, ax, own, save, show)


@_styled
def quantize(
    data,
    *,
    metric: str = "cls_cosine",
    clip: str = "none",
    key: str = _keys.UNS_KEY,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """`<cls>` cosine to full precision (or another quantize.tsv column) vs block size, one panel per bit width,
    with the candidates held out (solid) and not (dashed); per-row and per-tensor scales at the right.

    Parameters
    ----------
    data
        AnnData after ``ssw.tl.quantize``, the quantize table, or a results dict.
    metric
        Column to draw (``cls_cosine``, ``recon_delta``, ``knn_accuracy``, ``weight_rel_error``).
    clip
        Which clipping's rows to draw (``none``, ``percentile`` or ``mse``).
    key, ax, save, show
        Results key; Axes to draw on (one panel only: the first bit width); file to save to; call ``plt.show()``.

    Returns
    -------
    The Figure, or ``ax`` when it was given.

    Examples
    --------
    >>> fig = ssw.pl.quantize(adata)  # doctest: +SKIP
    """
    df = _get_table(data, "quantize", key, required=["setting", "bits", "granularity", "block_size", "holdout",
                                                     "clip", metric])
    df = _results.typed(df, "quantize")
    q = df[(df["setting"] != "full_precision") & (df["clip"] == clip)]
    if q.empty:
        msg = f"the quantize table has no rows with clip={clip!r}; it has {sorted(set(df['clip']))}."
        raise DataError(msg)
    bits = sorted(set(q["bits"].astype(int)), reverse=True)
    if ax is not None:
        fig, axes, own = ax.figure, [ax], False
        bits = bits[:1]
    else:
        fig, axs = plt.subplots(1, len(bits), figsize=(4.2 * len(bits), 3.4), layout="constrained", squeeze=False)
        axes, own = list(axs[0]), True
    blocks = sorted(set(q.loc[q["granularity"] == "block", "block_size"].dropna().astype(int)))
    pos = {b: i for i, b in enumerate(blocks)}
    extra = [g for g in ("row", "tensor") if (q["granularity"] == g).any()]
    for g in extra:
        pos[g] = len(pos)
    for a, b in zip(axes, bits):
        part = q[q["bits"].astype(int) == b]
        for hold, style, colour in ((True, "-o", _C_CAND), (False, "--s", _C_TOP)):
            sub = part[part["holdout"].astype(bool) == hold]
            blk = sub[sub["granularity"] == "block"].sort_values("block_size")
            label = "candidates held out" if hold else "all rounded"
            a.plot([pos[int(x)] for x in blk["block_size"]], blk[metric], style, color=colour, ms=4, lw=1.3,
                   label=label)
            for g in extra:
                v = sub.loc[sub["granularity"] == g, metric]
                if len(v):
                    a.plot([pos[g]], [float(v.iloc[0])], style[-1], color=colour, ms=5)
        a.set_xticks(range(len(pos)), [str(k) for k in pos], rotation=0)
        a.set_xlabel("block size (then one scale per row / per tensor)")
        a.set_ylabel(metric if metric != "cls_cosine" else "<cls> cosine to full precision")
        a.set_title(f"INT{b}" + ("" if clip == "none" else f", clip {clip}"))
        if metric == "cls_cosine":
            a.axhline(1.0, color="#999999", ls=":", lw=0.8)
        a.legend(loc="best")
    return _finish(fig, axes[0], own, save, show)


@_styled
def census(
    data,
    *,
    top: int = 8,
    min_ratio: float | None = None,
    key: str = _keys.UNS_KEY,
    ax: Axes | None = None,
    save: str | Path | None = None,
    show: bool = False,
):
    """Spike ratio per coordinate (layer, site kind, channel) across the models of a census, in their order (the
    training step when every model has one), log scale; the fixed threshold as a dashed line.

    Parameters
    ----------
    data
        The census table (`census.tsv`, ``CensusResult.spikes``) or a results dict holding it.
    top
        Coordinates drawn: those with the largest ratio anywhere.
    min_ratio
        Threshold line (default: none drawn unless given).
    key, ax, save, show
        Results key; Axes to draw on; file to save to; call ``plt.show()``.

    Returns
    -------
    The Figure, or ``ax`` when it was given.

    Examples
    --------
    >>> fig = ssw.pl.census(res.spikes, min_ratio=20)  # doctest: +SKIP
    """
    df = _results.typed(_get_table(data, "census", key, required=["model", "order", "step", "layer", "kind",
                                                                  "channel", "ratio"]), "census")
    by_step = df["step"].notna().all()
    df = df.assign(x=df["step"] if by_step else df["order"])
    coord = df["layer"].astype(str) + "·" + df["kind"].astype(str) + "·ch" + df["channel"].astype(str)
    df = df.assign(coord=coord)
    keep = df.groupby("coord")["ratio"].max().sort_values(ascending=False).head(top).index
    fig, ax, own = _new_axes(ax, (6.2, 3.8))
    colors = plt.get_cmap("tab10").colors
    for i, c in enumerate(keep):
        part = df[df["coord"] == c].groupby("x")["ratio"].max().sort_index()
        ax.plot(part.index, part.to_numpy(float), "-o", color=colors[i % len(colors)], ms=4, lw=1.2,
                label=f"L{c}")
    if min_ratio is not None:
        ax.axhline(min_ratio, color="#555555", ls="--", lw=0.9, label=f"threshold ×{min_ratio:g}")
    ax.set_yscale("log")
    models = df.drop_duplicates("order").sort_values("order")
    if not by_step:
        ax.set_xticks(models["order"], [_short(m, 14) for m in models["model"]], rotation=30, ha="right")
    ax.set_xlabel("training step" if by_step else "model")
    ax.set_ylabel("spike ratio (max / median |activation|)")
    ax.set_title("Spikes across checkpoints (a point: the coordinate is among that model's top spikes)")
    ax.legend(loc="best", fontsize=7)
    return _finish(fig, ax, own, save, show)
