"""Checks that run before any expensive work, so a bad input costs seconds, not a run.

Each validator looks at one kind of input (an output path, the device, an obs key, a numeric option, gene-set files,
the number of cells, the case and control levels) and either returns the value the run will use or raises the
`SSWError` subclass that fits, with one line naming the problem, the value received and the fix.
`validate_run_inputs` runs them all in the order a user would fix them; the CLI and `tl` call it first.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import pandas as pd

from ._log import logger
from .errors import DataError, OptionError, OutputError

# the smallest number of cells a whole run can say anything about (kNN and Leiden on fewer are noise)
MIN_CELLS_RUN = 20


# ---------------------------------------------------------------- output paths

def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_writable_parent(path: Path, option: str) -> None:
    base = _nearest_existing(path.parent if path.parent != Path("") else Path("."))
    if not base.is_dir():
        msg = (f"{option} {str(path)!r}: {str(base)!r} is a file, so no directory can be made under it; pass a path "
               "whose parent is a directory.")
        raise OutputError(msg)
    if not os.access(base, os.W_OK | os.X_OK):
        msg = (f"{option} {str(path)!r}: no permission to write in {str(base)!r}; pass a path in a directory you can "
               "write to.")
        raise OutputError(msg)


def check_out_dir(path: str | os.PathLike, *, option: str = "--out") -> Path:
    """An output directory: absent (creatable) or an existing writable directory; never an existing file."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        msg = (f"{option} {str(p)!r} is an existing file, not a directory; pass a directory (it is created if "
               "absent), e.g. a new folder name.")
        raise OutputError(msg)
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            msg = f"{option} {str(p)!r}: no permission to write in this directory; pass one you can write to."
            raise OutputError(msg)
        return p
    _check_writable_parent(p, option)
    return p


def check_out_file(path: str | os.PathLike, *, option: str = "--out",
                   suffixes: Iterable[str] | None = None) -> Path:
    """An output file: not a directory, in a writable (or creatable) directory, with one of `suffixes` if given."""
    p = Path(path).expanduser()
    if p.is_dir():
        msg = f"{option} {str(p)!r} is a directory, not a file; pass a file path inside it, e.g. {str(p / 'out')!r}."
        raise OutputError(msg)
    if suffixes is not None:
        allowed = tuple(suffixes)
        if not p.name.lower().endswith(allowed):
            msg = f"{option} {str(p)!r} does not end with {' or '.join(allowed)}; pass e.g. {str(p) + allowed[0]!r}."
            raise OutputError(msg)
    if p.exists() and not os.access(p, os.W_OK):
        msg = f"{option} {str(p)!r} exists and is read-only; pass another path or make it writable."
        raise OutputError(msg)
    _check_writable_parent(p, option)
    return p


def check_run_dir(path: str | os.PathLike, *, overwrite: bool = False, option: str = "--out") -> Path:
    """An output directory for a new run, checked without touching it: writable, and not holding another run's
    outputs unless `overwrite` (`results.prepare_run_dir` clears them later, once every other check passed)."""
    from .errors import RunDirError
    from .results import existing_outputs, read_run_json

    p = check_out_dir(path, option=option)
    found = existing_outputs(p) if p.is_dir() else []
    if found and not overwrite:
        prev = read_run_json(p) or {}
        what = f"run {prev['run_id']}" if prev.get("run_id") else "an earlier run"
        msg = (f"{option} {str(p)!r} already holds {what} ({', '.join(found)}); pass --overwrite (overwrite=True) "
               "to replace it, or choose another output directory.")
        raise RunDirError(msg)
    return p


# ---------------------------------------------------------------- input files

def check_data_file(path, *, option: str = "--data") -> Path:
    """An existing, readable ``.h5ad`` file."""
    if path is None:
        msg = f"no data: pass {option} FILE.h5ad."
        raise DataError(msg)
    p = Path(path).expanduser()
    if p.is_dir():
        msg = f"{option} {str(p)!r} is a directory; pass an .h5ad file."
        raise DataError(msg)
    if not p.is_file():
        msg = f"{option} {str(p)!r}: data file not found; check the path."
        raise DataError(msg)
    if p.suffix != ".h5ad":
        msg = (f"{option} {str(p)!r} is not an .h5ad file; convert it with anndata/scanpy first "
               "(e.g. sc.read_10x_mtx(...).write_h5ad('data.h5ad')).")
        raise DataError(msg)
    if not os.access(p, os.R_OK):
        msg = f"{option} {str(p)!r}: no permission to read it."
        raise DataError(msg)
    return p


def read_obs(path, *, option: str = "--data"):
    """The cells' annotations of an ``.h5ad`` without its matrix: an AnnData with ``obs`` only (n_obs rows, no
    genes), enough for every check on keys, levels and cell counts before the full load."""
    import anndata as ad
    import h5py

    p = check_data_file(path, option=option)
    try:
        with h5py.File(p, "r") as f:
            obs = ad.io.read_elem(f["obs"])
    except Exception as exc:  # not HDF5, truncated, no obs group: the file is not an AnnData we can read
        msg = f"{option} {str(p)!r} could not be read as AnnData ({type(exc).__name__}: {exc}); check the file."
        raise DataError(msg.splitlines()[0]) from None
    return ad.AnnData(obs=obs)


def check_model_path(path, *, option: str = "--model") -> None:
    """'demo', or an existing model directory (its contents are checked when it loads)."""
    if str(path) == "demo":
        return
    p = Path(path).expanduser()
    if not p.exists():
        msg = (f"{option} {str(p)!r}: model path not found. Pass an official scGPT directory, a transformers "
               "directory, or 'demo'.")
        raise DataError(msg)
    if not p.is_dir():
        msg = f"{option} {str(p)!r} is a file; pass the model's directory (args.json, vocab.json, best_model.pt)."
        raise DataError(msg)


# ---------------------------------------------------------------- device

def check_device(device, *, option: str = "--device") -> str:
    """The torch device string the run will use ('cpu' for None); refuses unknown and unavailable devices."""
    import torch

    if device is None:
        return "cpu"
    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        msg = (f"{option} {text!r} is not a torch device; pass cpu, cuda, cuda:N or mps (default cpu).")
        raise OptionError(msg) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "torch without a usable GPU"
            msg = (f"{option} {text!r} but this is {build} (torch {torch.__version__}); pass --device cpu, or install "
                   "a CUDA build of torch on a machine with a GPU.")
            raise OptionError(msg)
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            msg = f"{option} {text!r} but only {n} GPU(s) are visible (cuda:0..cuda:{n - 1}); pass one of those."
            raise OptionError(msg)
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            msg = f"{option} {text!r} but MPS (Apple GPU) is not available here; pass --device cpu."
            raise OptionError(msg)
    elif dev.type != "cpu":
        msg = f"{option} {text!r}: device type {dev.type!r} is not supported; pass cpu, cuda, cuda:N or mps."
        raise OptionError(msg)
    return str(dev)


# ---------------------------------------------------------------- model argument

def check_model(model, *, argument: str = "model") -> None:
    """A loaded model, not None or a path string passed where the model object belongs."""
    if model is None:
        msg = (f"{argument} is None; pass a loaded model, e.g. {argument}=ssw.load_model('demo') or "
               "ssw.load_model('path/to/scGPT_brain').")
        raise OptionError(msg)
    if isinstance(model, str | os.PathLike):
        msg = (f"{argument} is the path {os.fspath(model)!r}, not a model; load it first: "
               f"{argument}=ssw.load_model({os.fspath(model)!r}).")
        raise OptionError(msg)
    if not callable(getattr(model, "forward", None)) or not callable(getattr(model, "state_dict", None)):
        msg = (f"{argument} is a {type(model).__name__}, not a torch model; pass what ssw.load_model(...) returns.")
        raise OptionError(msg)


# ---------------------------------------------------------------- obs keys

def check_obs_key(adata, key: str, *, option: str = "--label-key", allow_missing: bool = False) -> pd.Series:
    """The obs column `key`, which must exist and (unless `allow_missing`) hold no missing values."""
    if not isinstance(key, str) or not key:
        msg = f"{option} must name an obs column; got {key!r}. Columns: {list(adata.obs.columns)[:20]}."
        raise DataError(msg)
    if key not in adata.obs.columns:
        close = difflib.get_close_matches(key, [str(c) for c in adata.obs.columns], n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        msg = (f"{option} {key!r} is not a column of adata.obs; columns are {list(adata.obs.columns)[:20]}.{hint}")
        raise DataError(msg)
    col = adata.obs[key]
    missing = np.asarray(pd.isna(col))
    if missing.any() and not allow_missing:
        names = ", ".join(map(str, adata.obs_names[np.flatnonzero(missing)[:3]]))
        msg = (f"{option} {key!r} has {int(missing.sum())} missing values (NaN) of {len(col)} (e.g. cells {names}); "
               f"fill them or subset first, e.g. adata = adata[adata.obs[{key!r}].notna()].copy().")
        raise DataError(msg)
    return col


# ---------------------------------------------------------------- numeric options

@dataclass(frozen=True)
class _Rule:
    kind: type  # Integral or Real
    low: float  # inclusive lower bound unless `open_low`
    what: str  # what the option counts, for the message
    open_low: bool = False
    high: float | None = None  # exclusive upper bound


# python name -> rule; the CLI flag is the name with dashes
OPTION_RULES: dict[str, _Rule] = {
    "max_cells_per_label": _Rule(Integral, 1, "cells per label evaluated"),
    "max_cells": _Rule(Integral, 1, "cells scanned"),
    "max_cells_scan": _Rule(Integral, 1, "cells scanned"),
    "max_candidates": _Rule(Integral, 1, "candidates pruned"),
    "n_random": _Rule(Integral, 1, "random-weight controls per candidate"),
    "n_boot": _Rule(Integral, 1, "bootstrap resamples"),
    "batch_size": _Rule(Integral, 1, "cells per forward pass"),
    "permutations": _Rule(Integral, 1, "enrichment permutations"),
    "top_n": _Rule(Integral, 1, "top genes for over-representation"),
    "max_rounds": _Rule(Integral, 1, "detection rounds"),
    "max_seq_len": _Rule(Integral, 2, "tokens per cell, <cls> included"),
    "n_bins": _Rule(Integral, 2, "expression bins"),
    "seed": _Rule(Integral, 0, "the random seed"),
    "min_ratio": _Rule(Real, 0, "spike / typical magnitude threshold", open_low=True),
    "min_abs": _Rule(Real, 0, "absolute spike threshold"),
    "alpha": _Rule(Real, 0, "significance level", open_low=True, high=1),
}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')} ({name}=)"


def check_option(name: str, value):
    """Check one numeric option against `OPTION_RULES`; None means 'not given' and passes."""
    if value is None or (name == "max_seq_len" and value == "full"):  # "full": the model's own length
        return value
    rule = OPTION_RULES[name]
    is_int = isinstance(value, Integral) and not isinstance(value, bool)
    is_num = isinstance(value, Real) and not isinstance(value, bool)
    kind = "an integer" if rule.kind is Integral else "a number"
    if not (is_int if rule.kind is Integral else is_num) or (is_num and not math.isfinite(value)):
        msg = f"{_flag(name)} is {value!r} ({type(value).__name__}); it must be {kind} ({rule.what})."
        raise OptionError(msg)
    bad_low = value <= rule.low if rule.open_low else value < rule.low
    bad_high = rule.high is not None and value >= rule.high
    if bad_low or bad_high:
        rng = f"{'>' if rule.open_low else '>='} {rule.low:g}"
        if rule.high is not None:
            rng += f" and < {rule.high:g}"
        msg = f"{_flag(name)} is {value!r}; it must be {kind} {rng} ({rule.what}). Pass a value in that range."
        raise OptionError(msg)
    return value


def check_options(**values) -> dict:
    """Check every numeric option given (unknown names are a bug of the caller, not of the user) and their joint rule:
    with `n_random` random controls the smallest empirical p-value is 1/(n_random+1), which must be below `alpha` or
    no candidate can ever pass."""
    unknown = sorted(set(values) - set(OPTION_RULES))
    if unknown:
        msg = f"check_options got options it has no rule for: {unknown}"
        raise TypeError(msg)
    for name, value in values.items():
        check_option(name, value)
    n_random, alpha = values.get("n_random"), values.get("alpha")
    if n_random is not None and alpha is not None and 1 / (n_random + 1) >= alpha:
        need = math.floor(1 / alpha)
        p_min = 1 / (n_random + 1)
        msg = (f"--n-random {n_random} gives a smallest possible p-value of 1/{n_random + 1} = {p_min:.3g}, "
               f"not below alpha={alpha:g}, so no candidate could pass; pass --n-random {need} or more.")
        raise OptionError(msg)
    return values


# ---------------------------------------------------------------- gene sets

def check_gene_sets(sources) -> dict[str, int]:
    """Resolve and parse every gene-set source now (a typo in a GMT path must not wait for the end of the run).

    Returns ``{library: number of sets}``.
    """
    from .enrich import load_gene_sets

    if sources is None:
        return {}
    libs = load_gene_sets(sources)  # raises DataError naming the file, line and fix
    return {lib: len(sets) for lib, sets in libs.items()}


# ---------------------------------------------------------------- cells

def cells_used(labels, max_cells_per_label: int | None) -> int:
    """How many cells a run evaluates when it takes at most `max_cells_per_label` of each label."""
    counts = pd.Series(np.asarray(labels)).value_counts(dropna=True).to_numpy()
    if max_cells_per_label is None:
        return int(counts.sum())
    return int(np.minimum(counts, max_cells_per_label).sum())


def check_enough_cells(adata, label_key: str | None, max_cells_per_label: int | None = None, *,
                       min_cells: int = MIN_CELLS_RUN) -> int:
    """Refuse a run that would evaluate fewer than `min_cells` cells; returns the number it will evaluate."""
    if label_key is None:
        n = adata.n_obs
        where = f"the data has {adata.n_obs} cells"
    else:
        labels = adata.obs[label_key]
        n = cells_used(labels, max_cells_per_label)
        n_labels = int(pd.Series(np.asarray(labels)).nunique(dropna=True))
        where = (f"the run would evaluate {n} cells ({n_labels} labels of {label_key!r}, at most "
                 f"{max_cells_per_label} each)" if max_cells_per_label is not None
                 else f"{label_key!r} labels {n} cells")
    if n < min_cells:
        fix = ("raise --max-cells-per-label or " if max_cells_per_label is not None and n < adata.n_obs else "")
        msg = (f"too few cells: {where}; at least {min_cells} are needed for the metrics to mean anything; {fix}use "
               "more data.")
        raise DataError(msg)
    return n


# ---------------------------------------------------------------- case and control

def _norm(level: str) -> str:
    text = str(level).lower().replace("'", "").replace("’", "")
    return re.sub(r"[\s_\-./]+", " ", text).strip()


CASE_SPELLINGS = frozenset({
    "ad", "alzheimer", "alzheimers", "alzheimer disease", "alzheimers disease", "alzheimer s disease",
    "alzheimers dementia", "alzheimer dementia", "ad dementia", "dementia", "case", "cases", "load", "eoad",
    "late onset ad", "early onset ad", "sporadic ad", "familial ad", "fad", "ad case", "ad patient",
})
CONTROL_SPELLINGS = frozenset({
    "control", "controls", "ctrl", "ctl", "ct", "con", "normal", "healthy", "healthy control", "hc", "nci",
    "no cognitive impairment", "no dementia", "non demented", "nondemented", "not demented", "non ad", "nonad",
    "not ad", "no ad", "cognitively normal", "cn", "normal control", "nc", "age matched control", "wt", "wild type",
    "wildtype",
})


def _matches(levels: list, spellings: frozenset) -> list:
    return [lv for lv in levels if _norm(lv) in spellings]


def resolve_case_control(levels, case=None, control=None) -> tuple:
    """Which condition level is the case (AD) and which the control, never by alphabetical accident.

    Explicit `case` / `control` win and must be levels. Otherwise the common spellings of AD (AD, Alzheimer's
    disease, dementia, case, ...) and of control (control, ctrl, CT, normal, healthy, NCI, no dementia, ...) are
    recognised, case-insensitively; with exactly two levels, recognising one side names the other. Anything else is
    refused with one line listing the levels.

    Returns
    -------
    ``(case, control)``, two distinct members of `levels`.
    """
    if isinstance(levels, pd.Series | pd.Categorical | pd.Index | np.ndarray):
        levels = list(pd.unique(pd.Series(np.asarray(levels)).dropna()))
    else:
        levels = list(dict.fromkeys(lv for lv in levels if not pd.isna(lv)))
    shown = ", ".join(map(repr, levels[:10])) + (" ..." if len(levels) > 10 else "")
    fix = "pass --case LEVEL --control LEVEL (case=, control= in Python)"
    for name, value in (("case", case), ("control", control)):
        if value is not None and value not in levels:
            # a level given as text for categories of numbers (or the reverse) still names the same level
            same = [lv for lv in levels if str(lv) == str(value)]
            if len(same) != 1:
                msg = f"--{name} {value!r} is not a condition level; the levels are {shown}; {fix}."
                raise OptionError(msg)
            if name == "case":
                case = same[0]
            else:
                control = same[0]
    if len(levels) < 2:
        msg = f"the condition has {len(levels)} level(s) ({shown}); an AD-vs-control contrast needs two."
        raise DataError(msg)
    if case is not None and control is not None and case == control:
        msg = f"--case and --control are both {case!r}; name two different levels of {shown}."
        raise OptionError(msg)
    if case is None:
        found = _matches([lv for lv in levels if lv != control], CASE_SPELLINGS)
        case = found[0] if len(found) == 1 else None
    if control is None:
        found = _matches([lv for lv in levels if lv != case], CONTROL_SPELLINGS)
        control = found[0] if len(found) == 1 else None
    if len(levels) == 2:  # one side known: the other level is the other side
        if case is None and control is not None:
            case = next(lv for lv in levels if lv != control)
        elif control is None and case is not None:
            control = next(lv for lv in levels if lv != case)
    if case is None or control is None:
        msg = (f"cannot tell which condition level is the case (AD) and which the control among {shown}; "
               f"{fix}.")
        raise OptionError(msg)
    others = [lv for lv in levels if lv not in (case, control)]
    if others:
        logger.info("condition levels %s are neither case %r nor control %r; their cells enter no contrast",
                    others, case, control)
    return case, control


# ---------------------------------------------------------------- everything, in order

@dataclass(frozen=True)
class RunInputs:
    """What the checks resolved: the values the run will use."""

    device: str
    n_cells: int  # cells the run evaluates
    case: object = None
    control: object = None
    gene_sets: Mapping[str, int] = field(default_factory=dict)  # library -> number of sets

    def to_dict(self) -> dict:
        return {"device": self.device, "n_cells": self.n_cells, "case": self.case, "control": self.control,
                "gene_sets": dict(self.gene_sets)}


def validate_run_inputs(adata, *, label_key: str | None, condition_key: str | None = None,
                        donor_key: str | None = None, case=None, control=None, gene_sets=None,
                        out_dir: str | os.PathLike | None = None, out_file: str | os.PathLike | None = None,
                        device=None, min_cells: int = MIN_CELLS_RUN, **options) -> RunInputs:
    """Every check a run needs, cheapest and most likely first; nothing expensive may start before it returns.

    `options` are the numeric options (names of `OPTION_RULES`: max_cells_per_label, n_random, alpha, ...).
    `adata` may be backed: only obs is read.
    """
    if adata is None:
        msg = "adata is None; pass an AnnData (e.g. sc.read_h5ad('data.h5ad')) or --data a .h5ad file."
        raise DataError(msg)
    check_options(**options)
    if out_dir is not None:
        check_out_dir(out_dir)
    if out_file is not None:
        check_out_file(out_file)
    dev = check_device(device)
    if label_key is not None:
        check_obs_key(adata, label_key, option="--label-key")
    if donor_key is not None:
        check_obs_key(adata, donor_key, option="--donor-key")
    resolved = (None, None)
    if condition_key is not None:
        col = check_obs_key(adata, condition_key, option="--condition-key")
        resolved = resolve_case_control(col, case, control)
    elif case is not None or control is not None:
        msg = f"--case/--control given ({case!r}, {control!r}) without --condition-key; pass the obs column too."
        raise OptionError(msg)
    n = check_enough_cells(adata, label_key, options.get("max_cells_per_label"), min_cells=min_cells)
    libs = check_gene_sets(gene_sets)
    return RunInputs(device=dev, n_cells=n, case=resolved[0], control=resolved[1], gene_sets=libs)
