"""`scsuperweight data list | fetch | validate`: the command-line face of scsuperweight.data.manifests.

The main CLI adds this with ``add_data_parser(subparsers)`` and calls ``args.func(args)``, which returns
an exit code. Bad input raises DataError; the main CLI prints it as one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from scsuperweight._io import atomic_write_h5ad, atomic_write_text
from scsuperweight.data import manifests
from scsuperweight.errors import DataError

_RAW = argparse.RawDescriptionHelpFormatter

_DATA_EPILOG = """\
examples:
  scsuperweight data list                       # every dataset, its access and what can be downloaded
  scsuperweight data list grubman2019           # one dataset in full: files, columns, access
  scsuperweight data fetch grubman2019 --dest data/
  scsuperweight data validate grubman2019 data/GSE138852_covariates.csv.gz

Manifests are read from $SSW_MANIFESTS, else from the repository's data_manifests/.
"""

_LIST_EPILOG = """\
examples:
  scsuperweight data list
  scsuperweight data list seaad_mtg
  scsuperweight data list --json > manifests.json
"""

_FETCH_EPILOG = """\
examples:
  scsuperweight data fetch grubman2019 --dest data/            # every file with a known URL
  scsuperweight data fetch grubman2019 --file GSE138852_covariates.csv.gz --dest data/
  scsuperweight data fetch seaad_mtg --dest data/ \\
      --url https://sea-ad-single-cell-profiling.s3.amazonaws.com/MTG/RNAseq/donors_objects/DONOR.h5ad

An interrupted download leaves DEST/FILE.part; run the same command again to resume it.
Controlled-access datasets (e.g. mathys2019) are never downloaded: the command prints how to
obtain them. Offline? Download the file by hand and run `scsuperweight data validate`.
"""

_VALIDATE_EPILOG = """\
examples:
  scsuperweight data validate grubman2019 grubman2019_GSE138852_small48.h5ad --out grubman.h5ad
  scsuperweight data validate grubman2019 GSE138852_counts.csv.gz --obs GSE138852_covariates.csv.gz
  scsuperweight data validate seaad_mtg donor.h5ad --condition-value Low=none --report report.json
  scsuperweight data validate lau2020 lau.h5ad --map condition=diagnosis --map cell_type=my_labels

Writes the standard obs columns cell_type, condition (AD / control), donor, braak, sex, age
and checks that raw integer counts are where the manifest says.
"""


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command (with ``list``, ``fetch``, ``validate``) to a subparsers object."""
    data = subparsers.add_parser(
        "data",
        help="list, download and validate Alzheimer's datasets (data_manifests/)",
        description="Work with the dataset manifests in data_manifests/: list them, download open files, "
                    "and check and harmonise a local copy.",
        epilog=_DATA_EPILOG,
        formatter_class=_RAW,
    )
    sub = data.add_subparsers(dest="data_command", metavar="{list,fetch,validate}", required=True)

    p = sub.add_parser("list", help="list the datasets, or show one in full",
                       description="List the dataset manifests, or show one in full.",
                       epilog=_LIST_EPILOG, formatter_class=_RAW)
    p.add_argument("name", nargs="?", metavar="NAME", help="show this dataset in full")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("fetch", help="download the open files of a dataset",
                       description="Download a dataset's files (resumable, checksummed when the sha256 is known).",
                       epilog=_FETCH_EPILOG, formatter_class=_RAW)
    p.add_argument("name", metavar="NAME", help="dataset name (see `scsuperweight data list`)")
    p.add_argument("--file", metavar="F", help="only this file entry (default: every file with a known URL)")
    p.add_argument("--dest", metavar="DIR", default=".", help="folder to write into (default: .)")
    p.add_argument("--url", metavar="URL", help="download from this URL (for files the manifest has no URL for)")
    p.add_argument("--timeout", type=float, default=30, metavar="S", help="seconds to wait for the server (30)")
    p.add_argument("--overwrite", action="store_true", help="download again even if the file exists")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("validate", help="check a local copy and write the standard obs columns",
                       description="Read a local copy of a dataset, map its columns to cell_type / condition / "
                                   "donor / braak / sex / age, and check its raw counts.",
                       epilog=_VALIDATE_EPILOG, formatter_class=_RAW)
    p.add_argument("name", metavar="NAME", help="dataset name (see `scsuperweight data list`)")
    p.add_argument("path", metavar="PATH", help=".h5ad, 10x .h5 or folder, or a CSV/TSV the manifest lists")
    p.add_argument("--out", metavar="FILE.h5ad", help="write the harmonised AnnData here")
    p.add_argument("--report", metavar="FILE.json", help="write the full report as JSON here")
    p.add_argument("--obs", metavar="TABLE", help="per-cell table to join onto obs first (first column: cell names)")
    p.add_argument("--map", action="append", default=[], metavar="NAME=COLUMN",
                   help="take standard column NAME from COLUMN (repeat; repeating a NAME adds fallbacks)")
    p.add_argument("--condition-value", action="append", default=[], metavar="VALUE=LABEL",
                   help="map source VALUE to AD, control or none (left out); repeat for several")
    p.add_argument("--counts", metavar="LOCATION", help="where raw counts are: X, raw.X or layers['NAME']")
    p.add_argument("--lenient", action="store_true", help="report missing columns or non-integer counts "
                                                           "as warnings instead of failing")
    p.add_argument("--backed", action="store_true", help="open an .h5ad backed (for files larger than memory)")
    p.set_defaults(func=_cmd_validate)
    return data


# --------------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    if args.name:
        m = manifests.load_manifest(args.name)
        print(json.dumps(m, indent=2, ensure_ascii=False) if args.json else _describe_manifest(m))
        return 0
    table = manifests.list_manifests()
    if args.json:
        print(table.to_json(orient="records", indent=2, force_ascii=False))
        return 0
    shown = table[["name", "species", "access", "n_downloadable", "n_files", "accession"]].copy()
    shown["accession"] = shown["accession"].str.slice(0, 48)
    shown = shown.rename(columns={"n_downloadable": "urls", "n_files": "files"})
    print(shown.to_string(index=False))
    print(f"\n{len(table)} datasets in {manifests.manifest_dir()}; `scsuperweight data list NAME` shows one.")
    return 0


def _describe_manifest(m: dict) -> str:
    lines = [
        f"{m['name']}: {m['title']}",
        f"  citation   {m['citation']}" + (f" (doi:{m['doi']})" if m["doi"] else ""),
        f"  accession  {m['accession']}",
        f"  species    {m['species']}; tissue: {m['tissue']}",
        f"  access     {m['access']}; licence: {m['licence']}",
    ]
    if m.get("homepage"):
        lines.append(f"  homepage   {m['homepage']}")
    if m["access"] == "controlled" or m.get("access_instructions"):
        lines.append(f"  how to get {m['access_instructions']}")
    lines.append("  files:")
    for f in m["files"]:
        size = f"{f['size']} bytes" if f.get("size") is not None else f.get("approx_size", "size unknown")
        lines.append(f"    {f['name']}  ({size}; counts: {f['raw_counts_location'] or '-'})")
        lines.append(f"      {f['url'] or 'no direct URL: ' + f.get('remote_pattern', 'see the homepage')}")
    lines.append("  columns:")
    for std, spec in m["columns"].items():
        lines.append(f"    {std:<10} <- {json.dumps(spec, ensure_ascii=False)}")
    lines.append(f"  condition  {json.dumps(m['condition_values'], ensure_ascii=False)}")
    if m.get("unverified"):
        lines.append(f"  unverified {', '.join(m['unverified'])}")
    lines.append(f"  verified   {m['verified']}")
    return "\n".join(lines)


def _cmd_fetch(args: argparse.Namespace) -> int:
    kwargs = {"progress": args.progress, "timeout": args.timeout, "overwrite": args.overwrite}
    if args.file is None and args.url is None:
        paths = manifests.fetch_all(args.name, args.dest, **kwargs)
    else:
        paths = [manifests.fetch(args.name, args.dest, file=args.file, url=args.url, **kwargs)]
    for path in paths:
        print(path)
    return 0


def _parse_pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.rpartition("=") if what == "--condition-value" else item.partition("=")
        if not sep or not key or not value:
            example = "Low=control" if what == "--condition-value" else "condition=diagnosis"
            msg = f"{what} {item!r}: expected KEY=VALUE, e.g. {what} {example}"
            raise DataError(msg)
        pairs.append((key, value))
    return pairs


def _columns_arg(items: list[str]) -> dict[str, list[str]]:
    columns: dict[str, list[str]] = {}
    for key, value in _parse_pairs(items, "--map"):
        if key not in manifests.STANDARD_COLUMNS:
            msg = f"--map {key}={value}: {key!r} is not a standard column; use one of " + \
                  ", ".join(manifests.STANDARD_COLUMNS)
            raise DataError(msg)
        columns.setdefault(key, []).append(value)
    return columns


def _condition_arg(items: list[str]) -> dict[str, str | None]:
    labels = {"ad": "AD", "control": "control", "none": None, "null": None}
    values: dict[str, str | None] = {}
    for key, value in _parse_pairs(items, "--condition-value"):
        if value.lower() not in labels:
            msg = f"--condition-value {key}={value}: the label must be AD, control or none"
            raise DataError(msg)
        values[key] = labels[value.lower()]
    return values


def _cmd_validate(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).expanduser().resolve() == Path(args.path).expanduser().resolve():
        msg = f"--out {args.out} is the input file; write the harmonised copy somewhere else"
        raise DataError(msg)
    adata, report = manifests.validate(
        args.path, args.name, obs=args.obs, columns=_columns_arg(args.map),
        condition_values=_condition_arg(args.condition_value), counts_location=args.counts,
        strict=not args.lenient, backed=args.backed,
    )
    print(_summarize(report))
    if args.report:
        atomic_write_text(Path(args.report).expanduser(), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"report: {args.report}")
    if args.out:
        out = Path(args.out).expanduser()
        atomic_write_h5ad(adata, out)
        print(f"wrote {out}")
    return 0


def _summarize(report: dict) -> str:
    lines = [f"{report['manifest']}: {report['n_obs']} cells x {report['n_vars']} genes ({report['source']})"]
    for std, info in report["columns"].items():
        if info["status"] == "found":
            lines.append(f"  {std:<10} <- {info['source']} ({info['n_values']} values, {info['n_missing']} missing)")
        else:
            lines.append(f"  {std:<10}    {info['status']}")
    cond = report.get("condition")
    if cond:
        lines.append(f"  condition: AD {cond['AD']}, control {cond['control']}"
                     + (f", left out {cond['excluded']}" if cond["excluded"] else "")
                     + (f", unmapped {cond['unmapped']}" if cond["unmapped"] else ""))
    counts = report.get("counts") or {}
    if counts.get("checked"):
        state = "integer, non-negative" if counts["ok"] else "NOT raw counts"
        lines.append(f"  counts in {counts['location']}: {state} ({counts['checked_cells']} cells checked)")
    else:
        lines.append(f"  counts: not checked ({counts.get('reason', 'n/a')})")
    for warning in report["warnings"]:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)
