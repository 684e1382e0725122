"""Stored results back as tidy DataFrames (scanpy's `get` convention)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from . import _keys as K
from .errors import DataError

_NUMERIC = {"layer", "row", "col", "value", "spike", "spike_ratio", "stability", "rank", "delta", "ci_low", "ci_high",
            "p_value", "score", "nes", "odds_ratio", "fdr", "max_abs", "median_abs", "channel", "factor"}
_STEP = {K.UNS_SUPERWEIGHTS: "scan", K.UNS_ACTIVATIONS: "scan", K.UNS_COLLAPSE: "prune", "contrasts": "prune",
         K.UNS_VERDICTS: "prune",
         "conditions": "prune", K.UNS_GENES: "genes", K.UNS_ENRICHMENT: "enrich"}


def _table(adata, name: str, key: str) -> pd.DataFrame:
    ns = adata.uns.get(key)
    if not isinstance(ns, dict) or name not in ns:
        step = _STEP.get(name, name)
        msg = f"no {name!r} results under adata.uns[{key!r}]: run ssw.tl.{step} first."
        raise DataError(msg)
    df = pd.DataFrame(ns[name]).copy()
    for c in df.columns:
        if c in _NUMERIC or c.startswith(("act_mean", "recon_delta", "delta_")):
            conv = pd.to_numeric(df[c].replace("", np.nan), errors="coerce")
            df[c] = conv.astype("Int64") if c in {"layer", "row", "col", "rank", "channel"} else conv
        elif c in ("above_threshold", "primary") and df[c].dtype == object:
            df[c] = df[c].astype(str).str.lower().isin(["true", "1"])
    return df.reset_index(drop=True)


def superweights(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
    """Candidates (the `superweights.tsv` table), best first."""
    return _table(adata, K.UNS_SUPERWEIGHTS, key)


def activations(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
    """Per layer and site: largest |activation|, its channel and token, typical magnitude, stability."""
    return _table(adata, K.UNS_ACTIVATIONS, key)


def collapse(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
    """The long `collapse.tsv` table: condition, metric, group, value, delta, interval, p-value."""
    return _table(adata, K.UNS_COLLAPSE, key)


def verdicts(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
    """Per candidate: passes the controls on the primary metric or not, each condition met, and why in words
    (`scsuperweight.judge.verdicts`)."""
    df = _table(adata, K.UNS_VERDICTS, key)
    for c in ("control_delta", "baseline", "n_random", "alpha"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    # h5ad keeps a condition that could not be checked as "": back to True / False / <NA>
    for c in ("cond_p", "cond_control", "cond_interval", "harmful"):
        if c in df and df[c].dtype == object:
            df[c] = df[c].astype(str).str.lower().map({"true": True, "false": False}).astype("boolean")
    if "passes" in df:
        df["passes"] = df["passes"].astype(str).str.lower().isin(["true", "1"])
    return df


def contrasts(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
    """Per cell type: collapse in AD minus collapse in control, with a bootstrap interval."""
    return _table(adata, "contrasts", key)


def genes(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
    """Gene scores per candidate with their evidence columns (the `genes.tsv` table)."""
    return _table(adata, K.UNS_GENES, key)


def enrichment(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
    """Enrichment results (the `enrichment.tsv` table)."""
    return _table(adata, K.UNS_ENRICHMENT, key)


def params(adata, step: str | None = None, key: str = K.UNS_KEY) -> dict:
    """The recorded parameters of one step (or of all steps) as dicts."""
    stored = adata.uns.get(key, {}).get(K.UNS_PARAMS, {})
    parsed = {s: json.loads(v) if isinstance(v, str) else dict(v) for s, v in stored.items()}
    if step is None:
        return parsed
    if step not in parsed:
        msg = f"no parameters recorded for step {step!r}; recorded steps: {sorted(parsed)}."
        raise DataError(msg)
    return parsed[step]
