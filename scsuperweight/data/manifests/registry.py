"""The manifests as a registry: list them, load one by name or path, find a file entry."""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from scsuperweight.errors import DataError

from .paths import _SCHEMA_FILE, _manifest_names, manifest_dir
from .schema import validate_manifest


def load_manifest(name: str | os.PathLike) -> dict:
    """Load and validate one manifest.

    Parameters
    ----------
    name
        A manifest name (``"grubman2019"``, see :func:`list_manifests`) or a path to a ``.json`` file.

    Returns
    -------
    The manifest as a dict.

    Examples
    --------
    >>> m = load_manifest("grubman2019")
    >>> m["columns"]["condition"]
    ['oupSample.batchCond', 'diagnosis']
    """
    text_name = os.fspath(name)
    as_path = Path(text_name).expanduser()
    if text_name.endswith(".json") and as_path.is_file():
        path = as_path
    else:
        folder = manifest_dir()
        path = folder / f"{text_name}.json"
        if text_name == Path(_SCHEMA_FILE).stem or not path.is_file():
            known = _manifest_names(folder)
            close = difflib.get_close_matches(text_name, known, n=3, cutoff=0.5)
            close += [k for k in known if text_name.lower() in k and k not in close]
            hint = f"did you mean {', '.join(close[:3])}? " if close else ""
            msg = (
                f"no manifest named {text_name!r} in {folder}; {hint}known: {', '.join(known) or 'none'} "
                f"(see `scsuperweight data list`)"
            )
            raise DataError(msg)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        msg = f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        raise DataError(msg) from err
    return validate_manifest(data, source=path)


def _as_manifest(name: str | os.PathLike | Mapping) -> dict:
    if isinstance(name, Mapping):
        return validate_manifest(name, source=f"<manifest {name.get('name', '?')}>")
    return load_manifest(name)


def list_manifests() -> pd.DataFrame:
    """One row per manifest in :func:`manifest_dir`, validated.

    Returns
    -------
    DataFrame with columns ``name``, ``citation``, ``species``, ``tissue``, ``access``, ``accession``,
    ``n_files``, ``n_downloadable`` (entries with a direct URL), ``gene_ids``, ``licence``, ``doi``,
    ``unverified`` (comma-separated fields not confirmed).
    """
    folder = manifest_dir()
    rows = []
    for name in _manifest_names(folder):
        m = load_manifest(folder / f"{name}.json")
        rows.append({
            "name": m["name"],
            "citation": m["citation"],
            "species": m["species"],
            "tissue": m["tissue"],
            "access": m["access"],
            "accession": m["accession"],
            "n_files": len(m["files"]),
            "n_downloadable": sum(1 for f in m["files"] if f.get("url")),
            "gene_ids": m["gene_ids"],
            "licence": m["licence"],
            "doi": m["doi"],
            "unverified": ", ".join(m.get("unverified", [])),
        })
    columns = ["name", "citation", "species", "tissue", "access", "accession", "n_files", "n_downloadable",
               "gene_ids", "licence", "doi", "unverified"]
    return pd.DataFrame(rows, columns=columns)


def _find_entry(manifest: dict, file: str) -> dict:
    for entry in manifest["files"]:
        if entry["name"] == file:
            return entry
    names = [e["name"] for e in manifest["files"]]
    close = difflib.get_close_matches(file, names, n=2, cutoff=0.4)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    msg = f"manifest {manifest['name']} has no file {file!r}; {hint}its files: {', '.join(names)}"
    raise DataError(msg)


def _match_entry(manifest: dict | None, filename: str, *, renamed: bool = True) -> dict | None:
    """The file entry a local file corresponds to: exact name, then a renamed copy, then a pattern."""
    if manifest is None:
        return None
    entries = manifest["files"]
    for e in entries:
        if e["name"] == filename:
            return e
    for e in entries if renamed else []:  # e.g. grubman2019_GSE138852_covariates.csv.gz
        if not e.get("pattern") and filename.endswith(e["name"]):
            return e
    for e in entries:
        if e.get("pattern"):
            glob = re.sub(r"<[^>]*>", "*", e["name"])
            if fnmatch.fnmatch(filename, glob):
                return e
    return None
