"""A calibrated null for the spike detector: how large do spikes get when the weights carry no learned structure?

The detector's threshold (a spike 20x the site's typical magnitude) is hand-set. Here the same trace is run on K
null copies of the checkpoint. ``method="permute"`` shuffles every parameter tensor's entries within the tensor
(seeded): each tensor keeps its value distribution (its scale, its outliers) and loses every arrangement learned in
training. That null keeps a lone huge scalar too, and a huge scalar placed at random still writes a spike, so it asks
"is this spike larger than these weights make in any arrangement?", not "is there an outlier?".
``method="gaussian"`` draws each tensor iid from a normal with its median and robust scale: an untrained model of
the same shape and typical scale, with no outlier; it answers "how often would a model without learned structure or
outliers pass the threshold?". Per site, the K largest spike ratios form the null distribution; an observed ratio
gets the empirical p-value ``(1 + #{null >= observed}) / (K + 1)`` (so the smallest attainable p is 1/(K+1)),
Benjamini-Hochberg q-values over sites, and ``pass_rate`` says how often a null copy passes the fixed threshold.

By default the inputs are data-free (the adapter's synthetic batch, as `detect.scan(mode="data_free")`); given
batches are used as they are. Observed ratios should come from the same inputs as the null: the unpermuted model
traced the same way is stored as `DetectionNull.observed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import metrics as M
from ._log import logger
from .adapters import get_adapter
from .detect import PRODUCING_KINDS
from .enrich import _bh
from .instrument import Trace, swapped

NULL_COLUMNS = ["perm", "site", "layer", "kind", "max_abs", "median_abs", "ratio", "channel", "token"]


@dataclass(frozen=True)
class DetectionNull:
    """Per permuted copy and site, the largest spike (``null``), and the unpermuted model traced alike
    (``observed``); ``params`` records K, seed, inputs and which tensors were shuffled."""

    null: pd.DataFrame
    observed: pd.DataFrame
    params: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.null

    @property
    def k(self) -> int:
        return int(self.params["k"])

    def ratios(self, site: str) -> np.ndarray:
        """The K null ratios of `site`."""
        return self.null.loc[self.null["site"] == site, "ratio"].to_numpy(float)

    def max_ratios(self) -> np.ndarray:
        """Per permuted copy, the largest ratio over the producing sites (the null of "the top spike")."""
        prod = self.null[self.null["kind"].isin(self.params.get("producing", PRODUCING_KINDS))]
        return prod.groupby("perm")["ratio"].max().to_numpy(float)

    def pass_rate(self, min_ratio: float = 20.0, min_abs: float = 0.0) -> float:
        """Fraction of permuted copies where some producing site passes the detector's fixed thresholds."""
        prod = self.null[self.null["kind"].isin(self.params.get("producing", PRODUCING_KINDS))]
        ok = (prod["ratio"] >= min_ratio) & (prod["max_abs"] >= min_abs)
        return float(ok.groupby(prod["perm"]).any().reindex(range(self.k), fill_value=False).mean())


METHODS = ("permute", "gaussian")


def null_tensors(model, seed: int, method: str = "permute", which: str = "all") -> dict[str, torch.Tensor]:
    """Replacement values for every parameter (``which="all"``) or every matrix (``"matrices"``).

    ``"permute"``: the tensor's own entries shuffled (seeded), so its value distribution, outliers included, is
    kept and only their arrangement is lost. ``"gaussian"``: iid normal draws with the tensor's median and robust
    scale (1.4826 x the median absolute deviation), an untrained model of the same shape and typical scale with no
    outlier at all. Tensors of one entry are left alone.
    """
    if which not in ("all", "matrices"):
        msg = f"which must be 'all' or 'matrices', got {which!r}."
        raise ValueError(msg)
    if method not in METHODS:
        msg = f"method must be one of {METHODS}, got {method!r}."
        raise ValueError(msg)
    net = get_adapter(model).model
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, p in net.named_parameters():
        if p.numel() < 2 or (which == "matrices" and p.dim() < 2):
            continue
        flat = p.detach().reshape(-1).cpu()
        if method == "permute":
            new = flat[torch.randperm(flat.numel(), generator=gen)]
        else:
            x = flat.double()
            loc = x.median()
            scale = 1.4826 * (x - loc).abs().median()
            new = (loc + scale * torch.randn(flat.numel(), generator=gen, dtype=torch.float64)).to(flat.dtype)
        out[name] = new.reshape(p.shape).to(p.device)
    return out


def permuted_tensors(model, seed: int, which: str = "all") -> dict[str, torch.Tensor]:
    """Every parameter (or matrix) with its entries shuffled within the tensor (`null_tensors`, "permute")."""
    return null_tensors(model, seed, "permute", which)


def _producing(adapter) -> list[str]:
    """The sites the detector takes spikes from (down/out projections, every norm output with a gain or bias)."""
    return [s.name for s in adapter.sites.values()
            if s.kind in PRODUCING_KINDS or (s.kind.endswith("_out") and (s.norm_weight or s.norm_bias))]


def site_spikes(model, batches: list) -> pd.DataFrame:
    """Per detector site (down/out projections, norm outputs): the largest |activation| over `batches`, its
    channel and token, the site's typical magnitude and their ratio (what the detector thresholds)."""
    adapter = get_adapter(model)
    with torch.no_grad(), Trace(adapter, _producing(adapter)) as tr:
        for b in batches:
            tr.run(b)
    rows = []
    for s in tr.sites:
        if s.name not in tr.stats or not tr.stats[s.name].calls:
            continue
        d = tr.summary(s.name)
        rows.append({"site": s.name, "layer": s.layer, "kind": s.kind, "max_abs": d["max_abs"],
                     "median_abs": d["median_abs"], "ratio": d["ratio"], "channel": d["channel"],
                     "token": d["token"]})
    return pd.DataFrame(rows)


def detection_null(model, batches: Sequence | None = None, *, k: int = 20, seed: int = 0, method: str = "permute",
                   which: str = "all", n_tokens: int = 256, data_seed: int = 0, progress: bool = False
                   ) -> DetectionNull:
    """Trace `k` null copies of `model` (weights restored bit for bit after each) and the model itself.

    Parameters
    ----------
    model
        A model with an adapter.
    batches
        Inputs; default one synthetic batch of `n_tokens` tokens (data-free, as the detector's data-free mode).
    k
        Permuted copies; the smallest p-value is 1/(k+1).
    seed
        Copy i is drawn with seed ``seed + i``.
    method
        ``"permute"`` (each tensor's entries shuffled: tests the arrangement, keeps every outlier value, so a single
        huge scalar still makes spikes in the null) or ``"gaussian"`` (no outlier: tests whether the checkpoint
        spikes more than an untrained model of its shape and per-tensor scale). See `null_tensors`.
    which
        ``"all"`` parameters (default: LayerNorm gains and biases too, so a learned LN outlier dimension does not
        survive into the null) or ``"matrices"`` only.

    Examples
    --------
    >>> null = detection_null(model, k=20)
    >>> permutation_pvalues(find_superweights(model, mode="data_free"), null)
    """
    if int(k) < 1:
        msg = f"k must be >= 1 permuted copies (20 gives p down to 1/21), got {k!r}."
        raise ValueError(msg)
    adapter = get_adapter(model)
    inputs = "data_free" if batches is None else "batches"
    batches = [adapter.synthetic_batch(n_tokens=n_tokens, seed=data_seed)] if batches is None else list(batches)
    observed = site_spikes(adapter, batches)
    frames = []
    for i in tqdm(range(int(k)), desc="permuted copies", disable=not progress, leave=False):
        with swapped(adapter, null_tensors(adapter, seed + i, method, which)):
            f = site_spikes(adapter, batches)
        f.insert(0, "perm", i)
        frames.append(f)
    null = pd.concat(frames, ignore_index=True)[NULL_COLUMNS]
    producing = sorted({adapter.sites[n].kind for n in _producing(adapter)})
    params = {"k": int(k), "seed": int(seed), "method": method, "which": which, "inputs": inputs,
              "n_tokens": n_tokens, "data_seed": data_seed, "producing": producing}
    logger.info("detection null (%s): %d copies, largest null ratio %.3g", method, k, float(null["ratio"].max()))
    return DetectionNull(null, observed, params)


def empirical_p(observed: float, null: np.ndarray) -> float:
    """(1 + #{null >= observed}) / (K + 1) (`metrics.empirical_p`, one-sided); an infinite ratio (a site whose
    typical magnitude is 0) ties only with infinite null ratios; NaN without a null or an observation."""
    null = np.asarray(null, float)
    if not len(null) or observed is None or np.isnan(observed):
        return float("nan")
    if np.isinf(observed) or not np.isfinite(null).all():
        return float((1 + np.sum(null >= observed)) / (len(null) + 1))
    return M.empirical_p(float(observed), null, "greater")


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg q-values (NaNs kept, left out of the count)."""
    p = np.asarray(p, float)
    q = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    q[ok] = _bh(p[ok])
    return q


def site_pvalues(null: DetectionNull, observed: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per site: the observed ratio (default `null.observed`), its permutation p, BH q over all sites, the p of the
    same ratio against the null of the largest ratio over producing sites (``p_max``, family-wise)."""
    obs = null.observed if observed is None else observed
    mx = null.max_ratios()
    rows = []
    for _, r in obs.iterrows():
        rows.append({"site": r["site"], "ratio": float(r["ratio"]), "p": empirical_p(float(r["ratio"]),
                                                                                       null.ratios(r["site"])),
                     "p_max": empirical_p(float(r["ratio"]), mx)})
    df = pd.DataFrame(rows)
    df["q"] = bh_qvalues(df["p"].to_numpy()) if len(df) else []
    return df


def permutation_pvalues(superweights: pd.DataFrame, null: DetectionNull) -> pd.DataFrame:
    """Per row of a superweights table: ``perm_p`` (its ``spike_ratio`` against the null of its ``site``),
    ``perm_q`` (BH over sites: each site's largest observed ratio, from the table where it has rows, else from
    `null.observed`) and ``perm_p_max`` (against the null of the largest ratio anywhere). Rows without a site or
    ratio (the weight-only screen) get NaN. Same index as `superweights`."""
    df = superweights
    has = df["site"].notna() & df["spike_ratio"].notna() if {"site", "spike_ratio"} <= set(df.columns) \
        else pd.Series(False, index=df.index)
    obs = null.observed.set_index("site")["ratio"].to_dict()
    for site, ratio in df[has].groupby("site")["spike_ratio"].max().items():
        obs[site] = float(ratio)
    per_site = site_pvalues(null, pd.DataFrame({"site": list(obs), "ratio": list(obs.values())}))
    q = per_site.set_index("site")["q"]
    mx = null.max_ratios()
    out = pd.DataFrame(index=df.index, columns=["perm_p", "perm_q", "perm_p_max"], dtype=float)
    for i in df.index[has]:
        site, ratio = df.at[i, "site"], float(df.at[i, "spike_ratio"])
        out.at[i, "perm_p"] = empirical_p(ratio, null.ratios(site))
        out.at[i, "perm_q"] = float(q.get(site, np.nan))
        out.at[i, "perm_p_max"] = empirical_p(ratio, mx)
    return out


NULL_METHODS = ("gaussian", "permute", "both")


def _null_batches(batches: Sequence, n_cells: int) -> list:
    """Batches spread over `batches` (they come in length order) holding at least `n_cells` cells."""
    batches = list(batches)
    sizes = [len(getattr(b, "cells", ())) or 1 for b in batches]
    n = 1
    while n < len(batches) and sum(sizes[i] for i in _spread(len(batches), n)) < n_cells:
        n += 1
    return [batches[i] for i in _spread(len(batches), n)]


def _spread(n_total: int, n: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n_total - 1, n)})


def scan_null(model, superweights: pd.DataFrame, batches: Sequence | None = None, *, k: int = 20,
              method: str = "both", seed: int = 0, n_tokens: int = 256, data_seed: int = 0, null_cells: int = 64,
              min_ratio: float = 20.0, min_abs: float = 0.0, progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """The detection null of a scan: `superweights` with ``perm_p``, ``perm_q`` and ``perm_p_max`` added, and a
    summary for the scan's params (K, method, inputs, how often the null copies pass the fixed threshold, the top
    spike's p).

    Each row's p is its site's: the site's largest spike ratio on the null's inputs, traced on the unedited model,
    against the same site in `k` null copies traced alike. The inputs are data-free (one synthetic cell of
    `n_tokens`, seed `data_seed`, as a data-free scan) when `batches` is None, else batches spread over `batches`
    holding at least `null_cells` cells (tracing K copies over every scanned cell would cost K scans).
    ``method="both"`` runs the Gaussian null into ``perm_*`` and the permutation null into ``perm_*_permute``: a
    lone huge scalar survives shuffling and keeps spiking wherever it lands, so only the Gaussian null can call a
    single planted super weight; the permutation null asks whether the arrangement matters (see the module
    docstring).
    """
    if method not in NULL_METHODS:
        msg = f"null method must be one of {NULL_METHODS}, got {method!r}; 'both' reports the two nulls side by side."
        raise ValueError(msg)
    inputs = None if batches is None else _null_batches(batches, null_cells)
    methods = ("gaussian", "permute") if method == "both" else (method,)
    out = superweights.copy()
    summary: dict = {"k": int(k), "method": method, "seed": int(seed), "min_ratio": min_ratio, "min_abs": min_abs,
                     "inputs": "data_free" if inputs is None else "cells",
                     "n_tokens": n_tokens if inputs is None else None,
                     "n_cells": None if inputs is None else int(sum(len(getattr(b, "cells", ())) for b in inputs))}
    for i, m in enumerate(methods):
        null = detection_null(model, inputs, k=k, seed=seed, method=m, n_tokens=n_tokens, data_seed=data_seed,
                              progress=progress)
        site_ratio = null.observed.set_index("site")["ratio"]
        # the observed ratio of a row's site on the null's own inputs, so that both sides saw the same cells
        obs = out.copy()
        if "site" in obs.columns:
            obs["spike_ratio"] = obs["site"].map(site_ratio).where(obs["site"].notna() & (obs["site"] != ""))
        pv = permutation_pvalues(obs, null)
        suffix = "" if i == 0 else f"_{m}"
        for c in pv.columns:
            out[f"{c}{suffix}"] = pv[c].astype(float)
        top = null.observed.sort_values("ratio", ascending=False).iloc[0] if len(null.observed) else None
        summary[m] = {"pass_rate": null.pass_rate(min_ratio, min_abs),
                      "null_max_ratio_median": float(np.median(null.max_ratios())) if null.k else np.nan,
                      "null_max_ratio_max": float(np.max(null.max_ratios())) if null.k else np.nan,
                      "top_site": None if top is None else str(top["site"]),
                      "top_channel": None if top is None else int(top["channel"]),
                      "top_ratio": None if top is None else float(top["ratio"]),
                      "top_p": None if top is None else empirical_p(float(top["ratio"]), null.ratios(top["site"])),
                      "top_p_max": None if top is None else empirical_p(float(top["ratio"]), null.max_ratios())}
        logger.info("detection null (%s, K=%d): %.0f%% of null copies pass ratio >= %g; top spike %s p = %.3g",
                    m, k, 100 * summary[m]["pass_rate"], min_ratio, summary[m]["top_site"], summary[m]["top_p"]
                    if summary[m]["top_p"] is not None else np.nan)
    return out, summary
