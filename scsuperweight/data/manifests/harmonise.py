"""Read a local copy of a dataset and copy its source columns onto the standard obs names."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scsuperweight._log import logger
from scsuperweight.errors import DataError

from .registry import _as_manifest, _match_entry

if TYPE_CHECKING:  # anndata is imported lazily: listing manifests should not pay for it
    from anndata import AnnData

STANDARD_COLUMNS = ("cell_type", "condition", "donor", "braak", "sex", "age")
CONDITION_LABELS = ("AD", "control")

_N_CHECK = 2000  # cells read to check that counts are integers (enough to catch normalised data)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
_LAYER = re.compile(r"""^layers\[(['"])(.+)\1\]$""")


def _sep_for(name: str) -> str:
    return "," if ".csv" in name else "\t"


def read_source(path: str | os.PathLike, manifest: str | Mapping | None = None, *, backed: bool = False) -> AnnData:
    """Read a dataset file as AnnData, whatever form the manifest says it comes in.

    ``.h5ad`` (optionally backed), 10x ``.h5`` or a 10x folder, and tables: a ``counts_matrix`` entry
    (oriented per the manifest) becomes ``X``; any other table is read as per-cell metadata (an
    AnnData with obs and no genes).
    """
    import anndata as ad

    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{p} does not exist; get it with `scsuperweight data fetch NAME --dest DIR` or by hand"
        raise DataError(msg)
    m = _as_manifest(manifest) if manifest is not None else None
    lower = p.name.lower()
    if p.is_dir():
        if any((p / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
            import scanpy as sc

            return sc.read_10x_mtx(p)
        msg = f"{p} is a folder without a 10x matrix.mtx(.gz); pass a file (.h5ad, .h5, .csv/.tsv/.txt[.gz])"
        raise DataError(msg)
    if lower.endswith(".h5ad"):
        return ad.read_h5ad(p, backed="r" if backed else None)
    if lower.endswith(".h5"):
        import scanpy as sc

        return sc.read_10x_h5(p)
    if lower.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        entry = _match_entry(m, p.name)
        table = pd.read_csv(p, sep=_sep_for(lower), index_col=0)
        table.index = table.index.astype(str)
        if entry is not None and entry.get("role") == "counts_matrix":
            from scipy import sparse

            if entry.get("orientation", "cells_x_genes") == "genes_x_cells":
                table = table.T
            matrix = sparse.csr_matrix(table.to_numpy(dtype=np.float32))
            return ad.AnnData(X=matrix, obs=pd.DataFrame(index=table.index.astype(str)),
                              var=pd.DataFrame(index=table.columns.astype(str)))
        if entry is None:
            logger.info("%s matches no file of the manifest; reading it as a per-cell table", p.name)
        return ad.AnnData(obs=table)
    if lower.endswith((".mtx", ".mtx.gz")):
        msg = (
            f"{p.name}: a bare Matrix Market file has no gene or cell names; build an AnnData (see the "
            f"manifest notes), save it with .write_h5ad and validate that"
        )
        raise DataError(msg)
    msg = f"{p.name}: unsupported format; use .h5ad, 10x .h5 or folder, or .csv/.tsv/.txt[.gz]"
    raise DataError(msg)


def _candidates(spec: Any) -> list:
    if spec is None:
        return []
    return [spec] if isinstance(spec, str | dict) else list(spec)


def _describe_candidate(cand: Any) -> str:
    return repr(cand) if isinstance(cand, str) else f"index_regex {cand['index_regex']!r}"


def _resolve_column(obs: pd.DataFrame, spec: Any) -> tuple[pd.Series | None, str | None]:
    for cand in _candidates(spec):
        if isinstance(cand, str):
            if cand in obs.columns:
                return obs[cand], cand
            continue
        extracted = obs.index.to_series().astype(str).str.extract(cand["index_regex"], expand=True).iloc[:, 0]
        if extracted.notna().any():
            return extracted, f"index_regex:{cand['index_regex']}"
    return None, None


def _norm_value(value: Any) -> str | None:
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return None
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _map_condition(series: pd.Series, mapping: Mapping[str, str | None]) -> tuple[pd.Series, dict]:
    folded = {str(k).casefold(): v for k, v in mapping.items()}
    labels: dict[Any, str | None] = {}
    unmapped, excluded = {}, {}
    counts = series.value_counts(dropna=True)
    for value, n in counts.items():
        key = _norm_value(value)
        if key is None:
            continue
        if key in mapping:
            label = mapping[key]
        elif key.casefold() in folded:
            label = folded[key.casefold()]
        else:
            unmapped[key] = int(n)
            continue
        if label is None:
            excluded[key] = int(n)
        labels[value] = label
    mapped = series.map(labels)
    out = pd.Categorical(mapped.where(mapped.isin(CONDITION_LABELS)), categories=["control", "AD"])
    values = pd.Series(out, index=series.index)
    summary = {
        "AD": int((values == "AD").sum()),
        "control": int((values == "control").sum()),
        "excluded": excluded,
        "unmapped": unmapped,
        "missing": int(series.isna().sum()),
    }
    return values, summary


def _same(a: pd.Series, b: pd.Series) -> bool:
    return a.astype(str).reset_index(drop=True).equals(b.astype(str).reset_index(drop=True))


def _counts_matrix(adata: AnnData, location: str):
    if location == "X":
        return adata.X
    if location == "raw.X":
        return adata.raw.X if adata.raw is not None else None
    match = _LAYER.match(location)
    if match is None:
        msg = f"counts location {location!r} is not understood; use X, raw.X or layers['NAME']"
        raise DataError(msg)
    key = match.group(2)
    return adata.layers[key] if key in adata.layers else None


def _locations(adata: AnnData) -> list[str]:
    found = ["X"] if adata.X is not None else []
    if adata.raw is not None:
        found.append("raw.X")
    found += [f"layers['{k}']" for k in adata.layers.keys()]
    return found


def _check_counts(matrix, n_check: int) -> dict:
    from scipy import sparse

    rows = matrix[: min(n_check, matrix.shape[0])]
    if sparse.issparse(rows):
        values = np.asarray(rows.tocsr().data)
    else:
        values = np.asarray(rows)
    values = values.ravel()
    finite = bool(np.isfinite(values).all())
    integer = finite and bool(np.all(values == np.round(values)))
    nonneg = finite and bool((values >= 0).all())
    example = None
    if not integer:
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        example = float(bad[0]) if bad.size else None
    return {
        "checked_cells": int(rows.shape[0]),
        "dtype": str(values.dtype),
        "integer": integer,
        "non_negative": nonneg,
        "max": float(values.max()) if values.size and finite else None,
        "example_non_integer": example,
        "ok": integer and nonneg,
    }


def _counts_entry(manifest: dict, source: str | None) -> dict | None:
    entry = _match_entry(manifest, Path(source).name) if source else None
    if entry is not None:
        return entry
    with_counts = [e for e in manifest["files"] if e.get("raw_counts_location")]
    return with_counts[0] if with_counts else None


def harmonize(
    adata: AnnData,
    manifest: str | os.PathLike | Mapping,
    *,
    columns: Mapping[str, Any] | None = None,
    condition_values: Mapping[str, str | None] | None = None,
    counts_location: str | None = None,
    strict: bool = True,
    source: str | os.PathLike | None = None,
    n_check: int = _N_CHECK,
) -> dict:
    """Copy a dataset's source columns onto the standard obs names, in place, and check its counts.

    Writes ``adata.obs[name]`` for each of ``cell_type``, ``condition``, ``donor``, ``braak``,
    ``sex``, ``age`` the manifest maps. ``condition`` is categorical with ``control`` / ``AD`` (cells
    whose value maps to null or to nothing are NaN). ``cell_type`` and ``donor`` become categorical
    text; the others are copied as they are. A standard column that already existed with other
    content is kept as ``<name>_orig``.

    Parameters
    ----------
    adata
        The dataset, as read by :func:`read_source` (may be backed).
    manifest
        Manifest name, path or dict.
    columns
        Overrides of the manifest's ``columns``: standard name -> source column (or list of candidates).
    condition_values
        Extra or replacing entries of the manifest's ``condition_values``: value -> ``"AD"``,
        ``"control"`` or None (leave those cells out).
    counts_location
        Where integer counts sit (``X``, ``raw.X``, ``layers['NAME']``); default: the manifest's.
    strict
        Raise when a mapped column is missing, no condition value maps, or counts are not integers;
        with False these become warnings in the report.
    source
        The file ``adata`` was read from, to pick the manifest's file entry.
    n_check
        Cells read to check the counts.

    Returns
    -------
    A report (plain dict): ``manifest``, ``n_obs``, ``n_vars``, ``columns`` (per standard name: ``source``
    and ``status``: ``found`` / ``missing`` / ``not in manifest``, ``n_values``, ``n_missing``),
    ``condition`` (counts of AD / control, ``excluded`` and ``unmapped`` source values, ``missing``),
    ``counts`` (location and what was found), ``gene_ids``, ``warnings``.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> obs = pd.DataFrame({"diagnosis": ["AD", "ct", "ct"], "cell_type": ["astro", "oligo", "astro"],
    ...                     "library": ["AD1_AD2", "Ct1_Ct2", "Ct1_Ct2"]}, index=["a", "b", "c"])
    >>> adata = ad.AnnData(np.ones((3, 2), dtype=np.float32), obs=obs)
    >>> report = harmonize(adata, "grubman2019")
    >>> adata.obs["condition"].tolist(), report["condition"]["control"]
    (['AD', 'control', 'control'], 2)
    """
    m = _as_manifest(manifest)
    spec = dict(m["columns"])
    for key, value in (columns or {}).items():
        if key not in STANDARD_COLUMNS:
            msg = f"columns: {key!r} is not a standard column; use one of {', '.join(STANDARD_COLUMNS)}"
            raise DataError(msg)
        spec[key] = value
    mapping = dict(m["condition_values"])
    for key, value in (condition_values or {}).items():
        if value not in (*CONDITION_LABELS, None):
            msg = f"condition_values: {key!r} -> {value!r}; map a value to 'AD', 'control' or None"
            raise DataError(msg)
        mapping[str(key)] = value

    obs = adata.obs
    label = f"{source}" if source is not None else "the data"
    report: dict[str, Any] = {
        "manifest": m["name"],
        "source": str(source) if source is not None else None,
        "n_obs": int(adata.n_obs),
        "n_vars": int(adata.n_vars),
        "columns": {},
        "condition": None,
        "counts": None,
        "gene_ids": None,
        "warnings": [],
    }
    warnings: list[str] = report["warnings"]

    missing = []
    resolved: dict[str, tuple[pd.Series, str]] = {}
    for std in STANDARD_COLUMNS:
        if not _candidates(spec.get(std)):
            report["columns"][std] = {"source": None, "status": "not in manifest"}
            continue
        series, found_as = _resolve_column(obs, spec[std])
        if series is None:
            tried = ", ".join(_describe_candidate(c) for c in _candidates(spec[std]))
            missing.append(f"{std} (looked for {tried})")
            report["columns"][std] = {"source": None, "status": "missing", "looked_for": tried}
            continue
        resolved[std] = (series, found_as)
    if missing:
        shown = list(map(str, obs.columns[:40]))
        more = f" and {len(obs.columns) - 40} more" if len(obs.columns) > 40 else ""
        msg = (
            f"{label}: columns missing for manifest {m['name']}: {'; '.join(missing)}. obs has: "
            f"{', '.join(shown) or 'no columns'}{more}. Point at the right column with "
            f"columns={{'NAME': 'COLUMN'}} (CLI: --map NAME=COLUMN)"
        )
        if strict:
            raise DataError(msg + " or pass strict=False (CLI: --lenient) to skip them")
        warnings.append(msg)

    for std, (series, found_as) in resolved.items():
        if std == "condition":
            values, summary = _map_condition(series, mapping)
            report["condition"] = {"source": found_as, **summary}
            if summary["AD"] + summary["control"] == 0:
                found = dict(list(summary["unmapped"].items())[:10])
                msg = (
                    f"{label}: no value of {found_as!r} maps to AD or control (values: {found}; manifest "
                    f"{m['name']} maps {sorted(mapping)}); add one with condition_values={{'VALUE': 'AD'}} "
                    f"(CLI: --condition-value VALUE=AD)"
                )
                if strict:
                    raise DataError(msg)
                warnings.append(msg)
            elif summary["unmapped"]:
                warnings.append(
                    f"condition: values not in the manifest left as NaN: {summary['unmapped']} "
                    f"(map them with --condition-value VALUE=AD|control|none)"
                )
        elif std in ("cell_type", "donor"):
            values = pd.Series(pd.Categorical(series.astype(str).where(series.notna())), index=obs.index)
        else:
            values = series.copy()
        values.index = obs.index
        # never lose what was there: a standard column that existed with other content is kept aside
        if std in obs.columns and f"{std}_orig" not in obs.columns and not _same(obs[std], values):
            obs[f"{std}_orig"] = obs[std]
            warnings.append(f"obs[{std!r}] existed with other content; kept as {std}_orig")
        obs[std] = values
        report["columns"][std] = {
            "source": found_as,
            "status": "found",
            "n_values": int(values.nunique(dropna=True)),
            "n_missing": int(values.isna().sum()),
        }

    report["columns"] = {k: report["columns"][k] for k in STANDARD_COLUMNS}
    report["counts"] = _report_counts(adata, m, counts_location, source, strict, n_check, label, warnings)
    report["gene_ids"] = _report_gene_ids(adata, m, warnings)
    return report


def _report_counts(adata, m, counts_location, source, strict, n_check, label, warnings) -> dict:
    entry = _counts_entry(m, str(source) if source is not None else None)
    location = counts_location or (entry or {}).get("raw_counts_location")
    if adata.n_vars == 0:
        return {"location": location, "checked": False, "reason": "no expression matrix (a per-cell table)"}
    if location is None:
        return {"location": None, "checked": False, "reason": "the manifest does not say where counts are"}
    matrix = _counts_matrix(adata, location)
    if matrix is None:
        msg = (
            f"{label}: raw counts expected in {location} (manifest {m['name']}) but it is absent; "
            f"this AnnData has {', '.join(_locations(adata)) or 'no matrix'}"
        )
        if strict:
            raise DataError(msg + "; pass counts_location=... (CLI: --counts LOCATION)")
        warnings.append(msg)
        return {"location": location, "checked": False, "reason": "absent"}
    result = {"location": location, "checked": True, **_check_counts(matrix, n_check)}
    if not result["ok"]:
        alternatives = []
        for other in _locations(adata):
            if other != location:
                mat = _counts_matrix(adata, other)
                if mat is not None and _check_counts(mat, n_check)["ok"]:
                    alternatives.append(other)
        problem = "non-integer" if not result["integer"] else "negative"
        hint = (
            f"integer counts found in {', '.join(alternatives)}: pass counts_location=\"{alternatives[0]}\" "
            f"(CLI: --counts \"{alternatives[0]}\")"
            if alternatives
            else "no integer counts found elsewhere: this file looks normalised; the tool needs raw counts"
        )
        example = f" (e.g. {result['example_non_integer']:g})" if result["example_non_integer"] is not None else ""
        msg = (
            f"{label}: {location} holds {problem} values{example} in the first {result['checked_cells']} cells, "
            f"not raw counts; {hint}"
        )
        result["alternatives"] = alternatives
        if strict:
            raise DataError(msg)
        warnings.append(msg)
    return result


def _report_gene_ids(adata, m, warnings) -> dict | None:
    if adata.n_vars == 0:
        return None
    names = pd.Index(adata.var_names[:2000]).astype(str)
    frac = float(np.mean([bool(_ENSEMBL.match(n)) for n in names]))
    looks = "ensembl" if frac > 0.5 else "symbol"
    if looks != m["gene_ids"]:
        warnings.append(
            f"var_names look like {looks} ids but manifest {m['name']} says {m['gene_ids']}; "
            f"matching genes to a model vocabulary may fail"
        )
    return {"expected": m["gene_ids"], "looks_like": looks, "example": list(map(str, names[:3]))}


def _join_obs(adata: AnnData, path: str | os.PathLike) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        msg = f"obs table {p} does not exist"
        raise DataError(msg)
    table = pd.read_csv(p, sep=_sep_for(p.name.lower()), index_col=0)
    table.index = table.index.astype(str)
    common = adata.obs_names.intersection(table.index)
    if len(common) == 0:
        msg = (
            f"{p.name}: no row name matches a cell name (cells look like {list(adata.obs_names[:2])}, "
            f"rows like {list(table.index[:2])}); the first column must hold the cell barcodes"
        )
        raise DataError(msg)
    added, skipped = [], []
    for col in table.columns:
        if col in adata.obs.columns:
            skipped.append(col)
            continue
        adata.obs[col] = table[col].reindex(adata.obs_names).to_numpy()
        added.append(col)
    return {"file": str(p), "matched": int(len(common)), "unmatched": int(adata.n_obs - len(common)),
            "added": added, "skipped_existing": skipped}


def validate(
    path: str | os.PathLike,
    name: str | os.PathLike | Mapping,
    *,
    obs: str | os.PathLike | None = None,
    columns: Mapping[str, Any] | None = None,
    condition_values: Mapping[str, str | None] | None = None,
    counts_location: str | None = None,
    strict: bool = True,
    backed: bool = False,
) -> tuple[AnnData, dict]:
    """Read a local copy of a dataset, harmonise its obs and check its counts.

    Parameters
    ----------
    path
        The file (``.h5ad``, 10x ``.h5`` or folder, or a CSV / TSV the manifest lists, e.g. Grubman's
        covariates table).
    name
        Manifest name, path or dict.
    obs
        An extra per-cell table (first column: cell names) joined onto obs before harmonising, e.g.
        Grubman's covariates onto its counts.
    columns, condition_values, counts_location, strict
        As in :func:`harmonize`.
    backed
        Open an ``.h5ad`` backed (read-only matrix on disk) for files too large for memory.

    Returns
    -------
    ``(adata, report)``: the AnnData with the standard obs columns, and the report of
    :func:`harmonize` (plus ``obs_join`` when ``obs`` was given).

    Examples
    --------
    >>> adata, report = validate("GSE138852_covariates.csv.gz", "grubman2019")  # doctest: +SKIP
    >>> report["condition"]["AD"], report["condition"]["control"]  # doctest: +SKIP
    (6673, 6541)
    """
    m = _as_manifest(name)
    adata = read_source(path, m, backed=backed)
    joined = _join_obs(adata, obs) if obs is not None else None
    report = harmonize(adata, m, columns=columns, condition_values=condition_values,
                       counts_location=counts_location, strict=strict, source=path)
    if joined is not None:
        report["obs_join"] = joined
    return adata, report
