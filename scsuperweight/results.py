"""The results contract and its one owner: every output table named once, and the code that stores, writes and
loads them.

`TABLES` is the schema: per table its uns key, its file in a run directory, the step that writes it, its column
types and what it holds. Everything else reads names and types from here: `store` puts a table on an AnnData in a
form `write_h5ad` accepts, `table` gives it back typed, `write_table` / `write_run_dir` are the only TSV writers
(atomic, each row stamped with the run id), and `load_run` reads an AnnData or a run directory into one typed
`RunResults`. Adding an output table means adding one `TableSpec` here and calling `store` in the step that
computes it; `get`, the run directory, `load_run` and the report's table listing follow.

A run directory holds one run: `run.json` carries a ``run_id`` and the data and model hashes, every TSV carries
the run id in a ``run_id`` column, `prepare_run_dir` refuses a directory that already holds outputs (or clears
exactly the files named here when asked to), and `check_same_run` refuses to combine pieces of different runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pandas as pd

from . import _keys as K
from ._io import atomic_write_json, atomic_write_tsv
from ._log import logger
from .errors import DataError, MixedRunError, RunDirError

# column types: "str" (missing is ""), "int" (pandas nullable Int64), "float", "bool", and "maybe" (nullable
# boolean: True / False / <NA> for a condition that could not be checked)
STR, INT, FLOAT, BOOL, MAYBE = "str", "int", "float", "bool", "maybe"
RUN_ID = "run_id"  # the column every written table carries


def _frozen(d: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class TableSpec:
    """One output table: where it lives and what its columns are."""

    name: str  # attribute of RunResults, function of `ssw.get`
    uns_key: str  # adata.uns[key][uns_key]
    file: str  # file in a run directory
    step: str  # the step that writes it: ssw.tl.<step>, `scsuperweight <step>`
    columns: Mapping[str, str]  # the contract columns, in order, with their types
    doc: str
    extra: Mapping[str, str] = field(default_factory=_frozen)  # known optional columns and their types
    prefixes: tuple[tuple[str, str], ...] = ()  # (name prefix, type) for families like act_mean:<label>
    empty_means_no_rows: bool = False  # an empty file is "computed, no rows", not "unreadable"
    in_run: bool = True  # a step of a whole run (`scsuperweight run`); False: an analysis run on its own

    @property
    def contract(self) -> tuple[str, ...]:
        return tuple(self.columns)

    def dtype(self, column: str) -> str | None:
        """The declared type of `column`, or None when the schema does not know it."""
        t = self.columns.get(column) or self.extra.get(column)
        if t is None:
            t = next((t for p, t in self.prefixes if column.startswith(p)), None)
        return t


@dataclass(frozen=True)
class FileSpec:
    """A file of a run directory that is not a table."""

    name: str
    file: str
    doc: str


def _spec(name: str, file: str, step: str, columns: dict, doc: str, **kw) -> TableSpec:
    if "extra" in kw:
        kw["extra"] = _frozen(kw["extra"])
    return TableSpec(name=name, uns_key=name, file=file, step=step, columns=_frozen(columns), doc=doc, **kw)


TABLES: Mapping[str, TableSpec] = MappingProxyType({s.name: s for s in (
    _spec("superweights", "superweights.tsv", "scan",
          {"candidate": STR, "kind": STR, "layer": INT, "param": STR, "row": INT, "col": INT, "value": FLOAT,
           "spike": FLOAT, "spike_ratio": FLOAT, "token": STR, "stability": FLOAT},
          "Candidates, best first: activation candidates, then the weight-only screen.",
          extra={"rank": INT, "screen": STR, "above_threshold": BOOL, "threshold_abs": FLOAT,
                 "threshold_ratio": FLOAT, "site": STR, "channel": INT, "cell": INT, "position": INT, "round": INT,
                 "stability_by_group": STR, "primary": BOOL, "contribution": FLOAT, "col_from": STR,
                 "weight_ratio": FLOAT,
                 # the detection null (scan null_k > 0): empirical p of the row's site against K null copies, BH q
                 # over sites, p against the null of the largest spike anywhere; `_permute` when both nulls ran
                 "perm_p": FLOAT, "perm_q": FLOAT, "perm_p_max": FLOAT, "perm_p_permute": FLOAT,
                 "perm_q_permute": FLOAT, "perm_p_max_permute": FLOAT, "effect": FLOAT, "effect_ratio": FLOAT,
                 "percentile": FLOAT, "metric": STR}),
    _spec("activations", "activations.tsv", "scan",
          {"layer": INT, "site": STR, "max_abs": FLOAT, "median_abs": FLOAT, "channel": INT, "token": STR,
           "stability": FLOAT},
          "Per layer and site: largest |activation|, its channel and token, typical magnitude, stability.",
          extra={"site_name": STR, "ratio": FLOAT, "cell": INT, "position": INT, "mean_abs_channel": FLOAT,
                 "n_cells": INT}),
    _spec("collapse", "collapse.tsv", "prune",
          {"condition": STR, "metric": STR, "group": STR, "value": FLOAT, "delta": FLOAT, "ci_low": FLOAT,
           "ci_high": FLOAT, "p_value": FLOAT},
          "Long table: each condition's metric per group, its change from baseline, interval and p vs random "
          "scalars.",
          extra={"ci_of": STR, "bootstrap_unit": STR, "candidate": STR, "control_for": STR, "null_pool": STR,
                 "factor": FLOAT, "p_matched": FLOAT, "note": STR, "null_draws": INT, "null_stopped_early": BOOL,
                 "p_sequential": FLOAT}),
    _spec("contrasts", "contrasts.tsv", "prune",
          {"condition": STR, "metric": STR, "group": STR, "difference": FLOAT, "ci_low": FLOAT, "ci_high": FLOAT},
          "Per cell type: the change in case cells minus the change in control cells, with a bootstrap interval.",
          extra={"contrast": STR, "case": STR, "control": STR, "n_case": INT, "n_control": INT,
                 "bootstrap_unit": STR, "ci_level": FLOAT},
          prefixes=(("delta_", FLOAT),), empty_means_no_rows=True),
    _spec("conditions", "conditions.tsv", "prune",
          {"condition": STR, "candidate": STR, "control_for": STR, "factor": FLOAT, "n_edits": INT, "edits": STR,
           "restore": STR},
          "What each pruning condition edited (parameters and indices, the activation restored).",
          extra={"kind": STR, "null_pool": STR, "patch": STR}),
    _spec("firstorder", "firstorder.tsv", "prune",
          {"candidate": STR, "param": STR, "metric": STR, "first_order": FLOAT, "rank": INT, "percentile": FLOAT,
           "n_scalars": INT, "exact_delta": FLOAT, "rank_correlation": FLOAT, "n_draws": INT},
          "First-order null (gradient x weight, one backward pass): each candidate's predicted change when zeroed, "
          "its rank (1 = largest) and percentile among all scalars of its matrix, its exact change, and the "
          "Spearman correlation of first-order with exact changes over that matrix's random draws. It informs; "
          "the exact draws decide.",
          empty_means_no_rows=True),
    _spec("genes", "genes.tsv", "genes",
          {"candidate": STR, "gene": STR, "score": FLOAT, "rank": INT},
          "Gene scores per candidate with the evidence behind each score.",
          extra={"act_mean": FLOAT, "recon_delta": FLOAT, "emb_alignment": FLOAT, "n_positions": INT,
                 "n_masked": INT, "channel": INT, "site": STR, "label": STR},
          prefixes=(("act_mean", FLOAT), ("recon_delta", FLOAT))),
    _spec("enrichment", "enrichment.tsv", "enrich",
          {"candidate": STR, "gene_set": STR, "term": STR, "nes": FLOAT, "odds_ratio": FLOAT, "p_value": FLOAT,
           "fdr": FLOAT, "genes": STR},
          "Pathway enrichment of each candidate's gene ranking (prerank and over-representation).",
          extra={"method": STR, "es": FLOAT, "n_genes": INT, "set_size": INT, "overlap": INT, "library": STR}),
    _spec("verdicts", "verdicts.tsv", "prune",
          {"candidate": STR, "metric": STR, "delta": FLOAT, "ci_low": FLOAT, "ci_high": FLOAT, "p_value": FLOAT,
           "control_delta": FLOAT, "cond_p": MAYBE, "cond_control": MAYBE, "cond_interval": MAYBE, "passes": BOOL,
           "reason": STR},
          "Per candidate, the rule applied on the primary metric (scsuperweight.judge): each condition met or not "
          "(<NA>: could not be checked), passes, and why in words.",
          extra={"status": STR, "group": STR, "baseline": FLOAT, "value": FLOAT, "harmful": MAYBE, "null_pool": STR,
                 "n_random": FLOAT, "p_source": STR, "alpha": FLOAT, "direction": STR, "ablation": STR,
                 "condition": STR, "p_matched": FLOAT, "n_matched": FLOAT, "rel_effect": FLOAT}),
    _spec("quantize", "quantize.tsv", "quantize",
          {"setting": STR, "bits": INT, "granularity": STR, "block_size": INT, "holdout": BOOL, "clip": STR,
           "n_weights": INT, "n_held_out": INT, "weight_rel_error": FLOAT, "cls_cosine": FLOAT, "recon_metric": STR,
           "recon": FLOAT, "recon_delta": FLOAT, "knn_accuracy": FLOAT},
          "Round-to-nearest quantisation of every linear weight, per setting, with and without the candidates held "
          "out in full precision: <cls> cosine to full precision, reconstruction error and kNN accuracy.",
          in_run=False),
    _spec("census", "census.tsv", "census",
          {"model": STR, "order": INT, "step": FLOAT, "rank": INT, "layer": INT, "site": STR, "kind": STR,
           "channel": INT, "token": STR, "max_abs": FLOAT, "median_abs": FLOAT, "ratio": FLOAT,
           "above_threshold": BOOL, "perm_p": FLOAT, "n_models": INT, "coincides": BOOL, "models_sharing": STR},
          "Per model (or training checkpoint, in step order): its strongest spikes, their detection-null p, and "
          "how many models share each spike coordinate (layer, site kind, channel).",
          in_run=False),
)})

RESULTS = FileSpec("results", "results.h5ad", "the input cells with embeddings and every table under uns[key]")
REPORT = FileSpec("report", "report.html", "one self-contained HTML page")
RUN = FileSpec("run", "run.json", "versions, run id, data and model hashes, parameters, seed, timings, status")
FILES: Mapping[str, FileSpec] = MappingProxyType({f.name: f for f in (RESULTS, REPORT, RUN)})
# the steps of a whole run, in order (the report names those a partial run lacks); quantize and census are
# analyses of their own, never missing from a run
STEPS = tuple(dict.fromkeys(s.step for s in TABLES.values() if s.in_run))


def spec(name: str) -> TableSpec:
    """The spec of table `name` (its uns key or its file name also work)."""
    if name in TABLES:
        return TABLES[name]
    for s in TABLES.values():
        if name in (s.uns_key, s.file):
            return s
    msg = f"unknown results table {name!r}; the tables are {list(TABLES)}."
    raise KeyError(msg)


# ---------------------------------------------------------------------------------------------------------------
# Typing
# ---------------------------------------------------------------------------------------------------------------


def _as_str(s: pd.Series) -> pd.Series:
    return s.astype(object).where(s.notna(), "").astype(str)


def _as_float(s: pd.Series) -> pd.Series:
    if s.dtype == object:
        s = s.replace("", np.nan)
    return pd.to_numeric(s, errors="coerce").astype(float)


def _as_int(s: pd.Series) -> pd.Series:
    f = _as_float(s)
    whole = f.dropna()
    if len(whole) and not np.all(np.isfinite(whole) & (whole == np.round(whole))):
        return f  # not whole numbers after all: keep them rather than fail
    return f.astype("Int64")


def _as_bool(s: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(s):
        return s.astype(bool)
    return s.astype(str).str.lower().isin(["true", "1", "1.0"])


def _as_maybe(s: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(s):
        return s.astype("boolean")
    return s.map(lambda v: {"true": True, "false": False}.get(str(v).lower(), pd.NA)).astype("boolean")


_CAST = {STR: _as_str, FLOAT: _as_float, INT: _as_int, BOOL: _as_bool, MAYBE: _as_maybe}


def _guess(s: pd.Series) -> pd.Series:
    """A text column the schema does not declare: booleans or numbers when every filled cell reads as one."""
    filled = s.dropna()
    if not len(filled):
        return s
    low = filled.astype(str).str.lower()
    if low.isin(["true", "false"]).all():
        return s.map(lambda v: None if pd.isna(v) else str(v).lower() == "true")
    if pd.to_numeric(filled, errors="coerce").notna().all():
        return pd.to_numeric(s, errors="coerce")
    return s


def typed(df: pd.DataFrame, name: str, *, from_text: bool = False) -> pd.DataFrame:
    """`df` with each column the type the schema gives it; undeclared columns are kept as they are (or, for a
    table read as text, read as booleans or numbers when every filled cell is one)."""
    s = spec(name)
    df = df.copy()
    for c in df.columns:
        t = s.dtype(str(c))
        if t is not None:
            df[c] = _CAST[t](df[c])
        elif from_text and df[c].dtype == object:
            df[c] = _guess(df[c])
    return df.reset_index(drop=True)


def h5ad_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A copy that `write_h5ad` accepts: object columns as strings ('' for missing), nullable ints kept."""
    out = df.copy()
    for c in out.columns:
        s = out[c]
        if s.dtype == object or isinstance(s.dtype, pd.CategoricalDtype):
            out[c] = _as_str(s)
        elif pd.api.types.is_bool_dtype(s):
            out[c] = s.astype(bool)
    out.columns = [str(c) for c in out.columns]
    out.index = out.index.astype(str)
    return out


# ---------------------------------------------------------------------------------------------------------------
# AnnData
# ---------------------------------------------------------------------------------------------------------------


def namespace(adata, key: str = K.UNS_KEY) -> dict:
    """adata.uns[key], created (with its params dict) when absent."""
    ns = adata.uns.get(key)
    if not isinstance(ns, dict):
        ns = {}
        adata.uns[key] = ns
    ns.setdefault(K.UNS_PARAMS, {})
    return ns


def store(adata, name: str, df: pd.DataFrame, key: str = K.UNS_KEY) -> None:
    """Put table `name` under ``adata.uns[key]`` in a form `write_h5ad` accepts."""
    namespace(adata, key)[spec(name).uns_key] = h5ad_safe(df)


def table(adata, name: str, key: str = K.UNS_KEY) -> pd.DataFrame:
    """Table `name` from ``adata.uns[key]``, typed by the schema; DataError naming the step when absent."""
    s = spec(name)
    ns = adata.uns.get(key)
    if not isinstance(ns, Mapping) or s.uns_key not in ns:
        msg = f"no {s.name!r} results under adata.uns[{key!r}]: run ssw.tl.{s.step} first."
        raise DataError(msg)
    return typed(pd.DataFrame(ns[s.uns_key]), s.name)


def run_record(adata, key: str = K.UNS_KEY) -> dict:
    """The run record (run.json's content) stored on `adata`, or {}."""
    ns = adata.uns.get(key)
    rec = ns.get(K.UNS_RUN) if isinstance(ns, Mapping) else None
    if isinstance(rec, str):  # stored as JSON text so that write_h5ad keeps nested dicts and None
        try:
            rec = json.loads(rec)
        except json.JSONDecodeError:
            return {}
    return _plain(rec) if isinstance(rec, Mapping) else {}


def set_run_record(adata, info: Mapping, key: str = K.UNS_KEY) -> None:
    namespace(adata, key)[K.UNS_RUN] = json.dumps(_plain(info), sort_keys=True)


def step_params(adata, key: str = K.UNS_KEY) -> dict:
    """Each step's recorded parameters (``uns[key]["params"]``, JSON text per step) as dicts."""
    ns = adata.uns.get(key)
    stored = _plain(ns.get(K.UNS_PARAMS) or {}) if isinstance(ns, Mapping) else {}
    out = {}
    for step, v in (stored.items() if isinstance(stored, Mapping) else ()):
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                continue
        out[str(step)] = dict(v) if isinstance(v, Mapping) else v
    return out


def _plain(obj):
    """JSON-safe plain values (numpy scalars and arrays, tuples, paths, h5ad round-trip leftovers)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


# ---------------------------------------------------------------------------------------------------------------
# Run directory
# ---------------------------------------------------------------------------------------------------------------


def new_run_id() -> str:
    return uuid.uuid4().hex


def write_table(out_dir, name: str, df: pd.DataFrame, *, run_id: str | None = None) -> Path:
    """Write table `name` into `out_dir` (atomically), each row stamped with `run_id` in a ``run_id`` column."""
    s = spec(name)
    df = df.copy()
    if run_id is not None and len(df.columns):
        df[RUN_ID] = run_id
    return atomic_write_tsv(df, Path(out_dir) / s.file)


def write_run_dir(adata, out_dir, *, steps: Iterable[str] | None = None, run_id: str | None = None,
                  key: str = K.UNS_KEY) -> list[Path]:
    """Write every table of `steps` (default: all) that `adata` holds into `out_dir`; returns the paths."""
    steps = {s.step for s in TABLES.values()} if steps is None else set(steps)
    ns = adata.uns.get(key) or {}
    return [write_table(out_dir, s.name, table(adata, s.name, key), run_id=run_id)
            for s in TABLES.values() if s.step in steps and s.uns_key in ns]


def output_files() -> list[str]:
    """Every file name a run writes (tables, results.h5ad, report.html, run.json)."""
    return [*(s.file for s in TABLES.values()), *(f.file for f in FILES.values())]


def existing_outputs(out_dir) -> list[str]:
    out = Path(out_dir)
    return [f for f in output_files() if (out / f).is_file()]


def clear_outputs(out_dir) -> list[str]:
    """Remove the files a run writes (only those the schema names); returns their names."""
    gone = existing_outputs(out_dir)
    for f in gone:
        (Path(out_dir) / f).unlink()
    return gone


def prepare_run_dir(out_dir, *, overwrite: bool = False, inputs: str | None = None, resume: bool = False) -> Path:
    """`out_dir` ready for a new run: created if absent; refused when it holds outputs unless `overwrite`, which
    removes them first (and nothing else). A directory holding an unfinished run of the same `inputs`
    (`inputs_hash` of data, model and parameters, as run.json records it) is kept as it is, to be resumed;
    `resume` makes anything else an error."""
    out = Path(out_dir)
    found = existing_outputs(out) if out.is_dir() else []
    prev = (read_run_json(out) or {}) if out.is_dir() else {}
    if resumable(prev, inputs) and not overwrite:
        logger.info("resuming the unfinished run %s in %s", prev.get(RUN_ID), out)
        return out
    if resume and not overwrite:
        why = ("it holds no run" if not prev else "its run finished" if prev.get("status") == "done" else
               "its run was made from other data, model or parameters")
        msg = f"cannot resume in {out}: {why}; rerun without --resume (resume=False), or with --overwrite."
        raise RunDirError(msg)
    if found and not overwrite:
        what = f"run {prev['run_id']}" if prev.get(RUN_ID) else "an earlier run"
        msg = (f"{out} already holds {what} ({', '.join(found)}); pass --overwrite (overwrite=True) to replace it, "
               "or choose another output directory (an unfinished run of the same data, model and parameters "
               "resumes by itself).")
        raise RunDirError(msg)
    if found:
        logger.info("overwrite: removing %s from %s", ", ".join(found), out)
        clear_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resumable(prev: Mapping | None, inputs: str | None) -> bool:
    """Is `prev` (a run.json record) an unfinished run of these `inputs`?"""
    return bool(inputs and prev and prev.get("inputs") == inputs and prev.get("status") != "done")


def inputs_hash(*parts) -> str:
    """A hash of everything a run's results depend on (data and model hashes, parameters: JSON-able values); the
    key under which unfinished work (conditions, blocks) is resumed."""
    import hashlib

    text = json.dumps(_plain(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def read_run_json(out_dir) -> dict | None:
    f = Path(out_dir) / RUN.file
    if not f.is_file():
        return None
    try:
        rec = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        logger.warning("skipping unreadable %s: %s", f, err)
        return None
    return rec if isinstance(rec, dict) else None


class RunLog:
    """run.json, rewritten atomically after every step: status, steps done, timings, run id and hashes."""

    def __init__(self, out_dir, info: Mapping, *, write: bool = True, main: bool = True):
        self.main = main  # under torchrun only rank 0 writes; the others keep the record in memory
        self.path = Path(out_dir) / RUN.file
        self.info = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "timings": {},
                     "steps_done": [], **info}
        self.info[RUN_ID] = self.info.get(RUN_ID) or new_run_id()
        if write:
            self.write()

    @classmethod
    def resume(cls, out_dir, info: Mapping, *, main: bool = True) -> RunLog:
        """The run.json already in `out_dir` (its run id and steps kept; `info` fills what it lacks), or a new
        record from `info`; written at the next `step`, so a step that fails first leaves no record behind."""
        prev = read_run_json(out_dir) or {}
        return cls(out_dir, {**info, **prev}, write=False, main=main)

    @property
    def run_id(self) -> str:
        return self.info[RUN_ID]

    def step(self, name: str, seconds: float, **extra) -> None:
        self.info["timings"][name] = round(seconds, 2)
        if name not in self.info["steps_done"]:
            self.info["steps_done"].append(name)
        self.info.update(extra)
        self.write()

    def progress(self, record: Mapping) -> None:
        """How far a long step got (`scsuperweight.progress.Progress` calls this as chunks and conditions finish):
        kept under ``progress`` and written at once, so a watcher or a resume reads it from run.json."""
        self.info["progress"] = dict(record)
        self.write()

    def write(self) -> None:
        if self.main:
            atomic_write_json(_plain(self.info), self.path)


# ---------------------------------------------------------------------------------------------------------------
# One run, not a mix
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStamp:
    """What identifies a run's pieces: the run id and the hashes of the data and the model it ran on."""

    where: str
    run_id: str | None = None
    data_hash: str | None = None
    model_hash: str | None = None

    @classmethod
    def of(cls, record: Mapping | None, where: str) -> RunStamp:
        rec = record or {}
        return cls(where, rec.get(RUN_ID), rec.get("data_hash"), rec.get("model_hash"))


def check_same_run(stamps: Iterable[RunStamp], step: str) -> None:
    """MixedRunError when two stamps disagree on the run id, the data hash or the model hash (missing fields
    match anything, so directories written before run ids existed still load)."""
    stamps = list(stamps)
    for what in ("run_id", "data_hash", "model_hash"):
        seen = [(s, getattr(s, what)) for s in stamps if getattr(s, what)]
        for s, v in seen[1:]:
            first, v0 = seen[0]
            if v != v0:
                label = what.replace("_", " ")
                msg = (f"{step}: {first.where} has {label} {v0[:12]} but {s.where} has {label} {v[:12]}; these "
                       "come from different runs. Rerun into a fresh directory, or `scsuperweight run --overwrite`.")
                raise MixedRunError(msg)


def _table_run_ids(df: pd.DataFrame, where: str, step: str) -> tuple[pd.DataFrame, str | None]:
    if RUN_ID not in df.columns:
        return df, None
    ids = sorted({str(v) for v in df[RUN_ID].dropna() if str(v)})
    if len(ids) > 1:
        msg = (f"{step}: {where} mixes rows of runs {ids[0][:12]} and {ids[1][:12]}; rerun into a fresh directory, "
               "or `scsuperweight run --overwrite`.")
        raise MixedRunError(msg)
    return df.drop(columns=RUN_ID), (ids[0] if ids else None)


def read_table(path, name: str) -> tuple[pd.DataFrame, str | None]:
    """A table file typed by the schema, without its ``run_id`` column, and that run id."""
    # Only empty cells are missing: a gene or token called "NA" or "None" must survive the round trip.
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    df, rid = _table_run_ids(df, str(path), "load")
    return typed(df, name, from_text=True), rid


# ---------------------------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------------------------


def _results_methods():
    def tables(self) -> dict[str, pd.DataFrame]:
        """The tables present, by name."""
        return {n: getattr(self, n) for n in TABLES if getattr(self, n) is not None}

    def as_dict(self) -> dict:
        """{uns key: table} for the tables present, plus ``run`` (the run record) when there is one."""
        out: dict = {TABLES[n].uns_key: t for n, t in self.tables().items()}
        if self.run:
            out[K.UNS_RUN] = self.run
        return out

    return {"tables": tables, "as_dict": as_dict}


RunResults = dataclasses.make_dataclass(
    "RunResults",
    [*((n, pd.DataFrame | None, None) for n in TABLES),
     ("run", dict, field(default_factory=dict)), ("params", dict, field(default_factory=dict)),
     ("run_id", str | None, None), ("source", str, "")],
    frozen=True, namespace=_results_methods())
RunResults.__module__ = __name__
RunResults.__doc__ = (
    "One run's results: one attribute per table of `TABLES` (a typed DataFrame, None when absent), `run` (the run "
    "record: run.json, with each step's parameters merged under ``params``), `params` (each step's recorded "
    "parameters), `run_id` and `source` (where it was read from).")


def _merge_params(run: Mapping, params: Mapping) -> dict:
    """The run record with each step's parameters merged in under ``params.<step>``; the record's own wins."""
    run = dict(run)
    if params:
        own = run.get("params") if isinstance(run.get("params"), Mapping) else {}
        run["params"] = {**params, **own}
    return run


def load_run(path_or_adata, *, key: str = K.UNS_KEY, check: bool = True) -> RunResults:
    """A run's tables, run record and parameters from an AnnData (``uns[key]``), an ``.h5ad`` file or a run
    directory. From a directory, pieces of different runs (a table whose run id, or whose run.json's hashes,
    differ from the rest) raise MixedRunError unless ``check=False``."""
    if hasattr(path_or_adata, "uns") and hasattr(path_or_adata, "obs"):
        adata = path_or_adata
        ns = adata.uns.get(key)
        if not isinstance(ns, Mapping):
            msg = f"adata.uns[{key!r}] is missing: no scsuperweight results on this AnnData; run ssw.tl.scan first."
            raise DataError(msg)
        tabs = {s.name: table(adata, s.name, key) for s in TABLES.values() if s.uns_key in ns}
        params = step_params(adata, key)
        run = _merge_params(run_record(adata, key), params)
        return RunResults(**tabs, run=run, params=params, run_id=run.get(RUN_ID),
                          source=f"AnnData ({adata.n_obs} cells × {adata.n_vars} genes), uns[{key!r}]")
    p = Path(path_or_adata)
    if p.is_file() and p.suffix == ".h5ad":
        import anndata as ad

        return dataclasses.replace(load_run(ad.read_h5ad(p), key=key), source=str(p))
    if not p.is_dir():
        msg = f"{str(p)!r} is not a directory or an .h5ad file; pass the --out directory of a scsuperweight run."
        raise DataError(msg)
    run = read_run_json(p) or {}
    stamps = [RunStamp.of(run, RUN.file)]
    tabs: dict = {}
    for s in TABLES.values():
        f = p / s.file
        if not f.is_file():
            continue
        try:
            tabs[s.name], rid = read_table(f, s.name)
        except pd.errors.EmptyDataError as err:
            if s.empty_means_no_rows:
                tabs[s.name] = pd.DataFrame()
            else:
                logger.warning("skipping unreadable %s: %s", f, err)
            continue
        except (pd.errors.ParserError, UnicodeDecodeError) as err:
            logger.warning("skipping unreadable %s: %s", f, err)
            continue
        stamps.append(RunStamp(s.file, rid))
    if check:
        check_same_run(stamps, f"load {p}")
    rid = next((s.run_id for s in stamps if s.run_id), None)
    params = run.get("params") if isinstance(run.get("params"), Mapping) else {}
    return RunResults(**tabs, run=run, params=dict(params), run_id=rid, source=str(p))
