"""Dataset manifests: what each Alzheimer's dataset is, where it lives, and how its columns read.

One JSON file per dataset sits in ``data_manifests/`` (checked against ``data_manifests/schema.json``
by a small validator here, so no jsonschema dependency). On top of the manifests this module

- lists them (:func:`list_manifests`) and loads one by name (:func:`load_manifest`);
- downloads the open files (:func:`fetch`): streamed, resumable with an HTTP Range request,
  checked against a sha256 when the manifest knows it, renamed into place atomically, never
  written outside the destination folder; controlled-access data is never downloaded, the
  manifest's access instructions are raised instead;
- reads a local copy and copies the manifest's source columns onto the standard obs names
  ``cell_type``, ``condition`` (mapped to ``AD`` / ``control``), ``donor``, ``braak``, ``sex``,
  ``age``, checking that raw counts are where the manifest says (:func:`validate`,
  :func:`harmonize`).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scsuperweight._log import logger
from scsuperweight.errors import DataError

if TYPE_CHECKING:  # anndata is imported lazily: listing manifests should not pay for it
    from anndata import AnnData

__all__ = [
    "CONDITION_LABELS",
    "ENV_VAR",
    "STANDARD_COLUMNS",
    "ControlledAccessError",
    "fetch",
    "fetch_all",
    "harmonize",
    "list_manifests",
    "load_manifest",
    "manifest_dir",
    "read_source",
    "validate",
    "validate_manifest",
]

ENV_VAR = "SSW_MANIFESTS"
# the repository's data_manifests/, next to the package (repo/scsuperweight/data/manifests.py)
_REPO_MANIFESTS = Path(__file__).resolve().parents[2] / "data_manifests"
_SCHEMA_FILE = "schema.json"

STANDARD_COLUMNS = ("cell_type", "condition", "donor", "braak", "sex", "age")
CONDITION_LABELS = ("AD", "control")

_CHUNK = 1 << 20  # 1 MiB per read while streaming
_N_CHECK = 2000  # cells read to check that counts are integers (enough to catch normalised data)
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
_LAYER = re.compile(r"""^layers\[(['"])(.+)\1\]$""")
# query parameters that carry secrets in signed or token URLs; a manifest must never hold one
_SECRET_QUERY = re.compile(r"(token|signature|sig|key|password|passwd|secret|credential|auth|x-amz-)", re.I)


class ControlledAccessError(DataError):
    """The dataset needs an account and a data-use agreement, so :func:`fetch` does not download it.

    ``instructions`` holds the manifest's ``access_instructions``.
    """

    def __init__(self, message: str, instructions: str):
        super().__init__(message)
        self.instructions = instructions


# --------------------------------------------------------------------------------------------------
# where manifests live


def manifest_dir() -> Path:
    """The folder holding the manifests.

    ``$SSW_MANIFESTS`` when set, else the repository's ``data_manifests/`` next to the package.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            msg = (
                f"{ENV_VAR}={env!r} is not a folder; point it at a folder of <name>.json manifests "
                f"or unset it to use the bundled ones"
            )
            raise DataError(msg)
        return path
    if _REPO_MANIFESTS.is_dir():
        return _REPO_MANIFESTS
    msg = (
        f"no manifest folder found: {_REPO_MANIFESTS} does not exist (the package seems to be installed "
        f"without the repository's data_manifests/); set {ENV_VAR}=/path/to/data_manifests"
    )
    raise DataError(msg)


def _schema_path() -> Path:
    # the repository's schema wins, so a user folder cannot loosen the rules by shipping its own
    for folder in (_REPO_MANIFESTS, manifest_dir()):
        path = folder / _SCHEMA_FILE
        if path.is_file():
            return path
    msg = f"no {_SCHEMA_FILE} found in {_REPO_MANIFESTS} or {manifest_dir()}; restore data_manifests/{_SCHEMA_FILE}"
    raise DataError(msg)


@functools.lru_cache(maxsize=4)
def _load_schema(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _manifest_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json") if p.name != _SCHEMA_FILE)


# --------------------------------------------------------------------------------------------------
# the schema validator: the subset of JSON Schema that schema.json uses


def _ref(root: dict, schema: dict) -> dict:
    while "$ref" in schema:
        ref = schema["$ref"]
        if not ref.startswith("#/"):
            msg = f"schema: only local references are supported, got {ref!r}"
            raise DataError(msg)
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_ok(value: Any, types: str | list[str]) -> bool:
    name = _type_name(value)
    for t in [types] if isinstance(types, str) else types:
        if t == name or (t == "number" and name == "integer"):
            return True
    return False


def _describe(root: dict, schema: dict) -> str:
    schema = _ref(root, schema)
    if "anyOf" in schema:
        return " or ".join(_describe(root, s) for s in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    types = schema.get("type", "any")
    words = {"null": "null", "string": "a string", "array": "a list", "object": "an object",
             "integer": "an integer", "number": "a number", "boolean": "true or false"}
    names = [types] if isinstance(types, str) else types
    return " or ".join(words.get(t, t) for t in names)


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _where(path: str) -> str:
    return path or "(top level)"


def _schema_errors(value: Any, schema: dict, path: str, root: dict) -> list[str]:
    schema = _ref(root, schema)
    if "anyOf" in schema:
        branches = [_ref(root, s) for s in schema["anyOf"]]
        results = [_schema_errors(value, b, path, root) for b in branches]
        if not any(not r for r in results):
            # when exactly one branch accepts the value's type, its errors are the useful ones
            typed = [r for b, r in zip(branches, results) if "type" not in b or _type_ok(value, b["type"])]
            if len(typed) == 1:
                return typed[0]
            return [f"{_where(path)}: expected {_describe(root, schema)}, got {_short(value)}"]
    if "type" in schema and not _type_ok(value, schema["type"]):
        return [f"{_where(path)}: expected {_describe(root, {'type': schema['type']})}, got {_short(value)}"]
    if "enum" in schema and not any(value == v and type(value) is type(v) for v in schema["enum"]):
        allowed = ", ".join(json.dumps(v) for v in schema["enum"])
        return [f"{_where(path)}: {_short(value)} is not allowed; use one of {allowed}"]
    errors: list[str] = []
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{_where(path)}: must not be empty")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{_where(path)}: {_short(value)} does not match {schema['pattern']}")
    if _type_name(value) in ("integer", "number") and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{_where(path)}: {value} is below the minimum {schema['minimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{_where(path)}: needs at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += _schema_errors(item, schema["items"], f"{path}[{i}]", root)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{_join(path, key)}: missing required field")
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                errors += _schema_errors(item, props[key], _join(path, key), root)
            elif extra is False:
                close = difflib.get_close_matches(key, list(props), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                errors.append(f"{_join(path, key)}: unknown field{hint}")
            elif isinstance(extra, dict):
                errors += _schema_errors(item, extra, _join(path, key), root)
    return errors


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot be a file name inside a destination folder, or None when it can."""
    if not name or name in (".", ".."):
        return "it is empty or a folder reference"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    if "\x00" in name:
        return "it contains a NUL byte"
    if os.path.isabs(name) or PureWindowsPath(name).drive:
        return "it is an absolute path"
    return None


def _url_secret(url: str) -> str | None:
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        return "it embeds a user name or password"
    for key, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY.search(key):
            return f"its query parameter {key!r} looks like a credential"
    return None


def _semantic_errors(m: dict, stem: str | None) -> list[str]:
    """Rules JSON Schema cannot express (or expresses badly)."""
    errors = []
    if stem is not None and m.get("name") != stem:
        errors.append(f"name: {m.get('name')!r} must equal the file name {stem!r}")
    if m.get("access") == "controlled" and not (m.get("access_instructions") or "").strip():
        errors.append("access_instructions: required for a controlled dataset (say how to obtain it)")
    homepage = m.get("homepage")
    if isinstance(homepage, str) and (why := _url_secret(homepage)):
        errors.append(f"homepage: refused because {why}")
    seen = set()
    for i, f in enumerate(m.get("files") or []):
        if not isinstance(f, dict):
            continue
        where = f"files[{i}]"
        name = f.get("name")
        if isinstance(name, str):
            if why := _unsafe_name(name):
                errors.append(f"{where}.name: {name!r} is refused because {why}; use a bare file name")
            if name in seen:
                errors.append(f"{where}.name: {name!r} appears twice")
            seen.add(name)
            looks_pattern = any(c in name for c in "<>*?")
            if looks_pattern and not f.get("pattern"):
                errors.append(f"{where}.name: {name!r} looks like a pattern; set \"pattern\": true")
        if f.get("pattern") and f.get("url"):
            errors.append(f"{where}.url: a pattern entry stands for unknown names, so it cannot have one URL")
        if f.get("pattern") and f.get("sha256"):
            errors.append(f"{where}.sha256: a pattern entry cannot have one checksum")
        url = f.get("url")
        if isinstance(url, str) and (why := _url_secret(url)):
            errors.append(f"{where}.url: refused because {why}")
    for std, spec in (m.get("columns") or {}).items():
        for cand in spec if isinstance(spec, list) else []:
            if isinstance(cand, dict) and isinstance(cand.get("index_regex"), str):
                try:
                    rx = re.compile(cand["index_regex"])
                except re.error as err:
                    errors.append(f"columns.{std}: index_regex does not compile ({err})")
                    continue
                if rx.groups < 1:
                    errors.append(f"columns.{std}: index_regex needs a capture group, e.g. _(\\w+)$")
    return errors


def validate_manifest(manifest: Mapping, *, source: str | os.PathLike | None = None) -> dict:
    """Check a manifest against ``schema.json`` and the rules beyond it.

    Parameters
    ----------
    manifest
        The parsed JSON.
    source
        Where it came from, for the error message; a ``<name>.json`` path also checks that ``name``
        matches the file name.

    Returns
    -------
    The manifest as a plain dict.

    Raises
    ------
    DataError
        Naming the file and every offending field, on one line.
    """
    label = str(source) if source is not None else "<manifest>"
    if not isinstance(manifest, Mapping):
        msg = f"{label}: a manifest must be a JSON object, got {_type_name(manifest)}"
        raise DataError(msg)
    manifest = dict(manifest)
    root = _load_schema(str(_schema_path()))
    errors = _schema_errors(manifest, root, "", root)
    stem = Path(source).stem if source is not None and str(source).endswith(".json") else None
    errors += _semantic_errors(manifest, stem)
    if errors:
        msg = f"{label}: invalid manifest: " + "; ".join(errors)
        raise DataError(msg)
    return manifest


# --------------------------------------------------------------------------------------------------
# listing and loading


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


# --------------------------------------------------------------------------------------------------
# download


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


def _safe_target(dest_dir: str | os.PathLike, filename: str) -> Path:
    dest = Path(dest_dir).expanduser().resolve()
    why = _unsafe_name(filename)
    target = dest / filename if why is None else None
    if target is not None and target.resolve().parent != dest:
        why = "it resolves outside the destination (a link?)"
    if why is not None:
        msg = f"refusing to write {filename!r}: {why}; files are only written as bare names inside {dest}"
        raise DataError(msg)
    return target


def _url_filename(url: str) -> str:
    # the last segment is taken before unquoting, so '..%2Fx' stays one (refused) name instead of 'x'
    path = urllib.parse.urlsplit(url).path
    segment = path.rsplit("/", 1)[-1]
    if not segment:
        msg = f"cannot tell a file name from {url!r} (it names a folder); pass the file's own URL"
        raise DataError(msg)
    return urllib.parse.unquote(segment)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


def _no_url_message(manifest: dict, entry: dict | None) -> str:
    where = manifest.get("homepage") or manifest["accession"]
    what = f"file {entry['name']!r} of {manifest['name']}" if entry else manifest["name"]
    extra = f" (files sit under {entry['remote_pattern']})" if entry and entry.get("remote_pattern") else ""
    return (
        f"no download URL is recorded for {what}{extra}; find the file at {where}, then run "
        f"`scsuperweight data fetch {manifest['name']} --url URL`"
    )


def fetch(
    name: str | os.PathLike | Mapping,
    dest_dir: str | os.PathLike = ".",
    *,
    file: str | None = None,
    url: str | None = None,
    progress: bool = True,
    timeout: float = 30,
    overwrite: bool = False,
) -> Path:
    """Download one file of an open dataset into ``dest_dir``.

    The file streams to ``<target>.part``; an existing ``.part`` is resumed with an HTTP Range request
    (and restarted when the server answers 200, i.e. ignores Range). When the manifest records a
    sha256 the result must match it, else the download is deleted. The finished file is renamed into
    place atomically, so ``<target>`` is either absent or complete.

    Parameters
    ----------
    name
        Manifest name, path to a manifest ``.json``, or a manifest dict.
    dest_dir
        Folder to write into (created if needed). Nothing is written outside it.
    file
        Which file entry (its ``name``); needed when the manifest lists several downloadable files.
    url
        Download from this URL instead (for entries whose URL the manifest does not know, e.g. one
        SEA-AD donor file). The local name is ``file``'s name, or the URL's last path segment.
    progress
        Show a tqdm progress bar.
    timeout
        Seconds to wait for the server to answer or send data.
    overwrite
        Download again even if the target exists.

    Returns
    -------
    Path of the downloaded file.

    Raises
    ------
    ControlledAccessError
        For a controlled-access dataset, with its access instructions; no network is touched.
    DataError
        Unknown file, no URL known, unsafe file name, server unreachable, HTTP error, interrupted
        transfer (the ``.part`` is kept: run again to resume) or checksum mismatch.

    Examples
    --------
    >>> fetch("grubman2019", "data/", file="GSE138852_covariates.csv.gz")  # doctest: +SKIP
    PosixPath('data/GSE138852_covariates.csv.gz')
    """
    manifest = _as_manifest(name)
    if manifest["access"] == "controlled":
        instructions = _one_line(manifest["access_instructions"])
        msg = (
            f"{manifest['name']} is controlled-access ({manifest['accession']}); `scsuperweight data fetch` "
            f"does not download it. {instructions}"
        )
        raise ControlledAccessError(msg, manifest["access_instructions"])
    entry = _find_entry(manifest, file) if file is not None else None
    if url is not None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "ftp"):
            msg = f"unsupported URL {url!r}: use an http://, https:// or ftp:// address"
            raise DataError(msg)
        filename = entry["name"] if entry is not None and not entry.get("pattern") else _url_filename(url)
        if entry is None:
            entry = _match_entry(manifest, filename, renamed=False)
    else:
        if entry is None:
            downloadable = [e for e in manifest["files"] if e.get("url")]
            if not downloadable:
                raise DataError(_no_url_message(manifest, None))
            if len(downloadable) > 1:
                names = ", ".join(e["name"] for e in downloadable)
                msg = (
                    f"{manifest['name']} has {len(downloadable)} downloadable files ({names}); choose one with "
                    f"file=... (CLI: --file NAME), or use fetch_all"
                )
                raise DataError(msg)
            entry = downloadable[0]
        if not entry.get("url"):
            raise DataError(_no_url_message(manifest, entry))
        url, filename = entry["url"], entry["name"]
    target = _safe_target(dest_dir, filename)
    known = entry if entry is not None and not entry.get("pattern") else {}
    return _download(
        url, target, sha256=known.get("sha256"), size=known.get("size"), dataset=manifest["name"],
        progress=progress, timeout=timeout, overwrite=overwrite,
    )


def fetch_all(name: str | os.PathLike | Mapping, dest_dir: str | os.PathLike = ".", **kwargs) -> list[Path]:
    """Download every file that has a URL in the manifest; keyword arguments go to :func:`fetch`."""
    manifest = _as_manifest(name)
    entries = [e for e in manifest["files"] if e.get("url")]
    if manifest["access"] == "controlled" or not entries:
        return [fetch(manifest, dest_dir, **kwargs)]  # raises the access or no-URL message
    return [fetch(manifest, dest_dir, file=e["name"], **kwargs) for e in entries]


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


def _download(
    url: str, target: Path, *, sha256: str | None, size: int | None, dataset: str,
    progress: bool, timeout: float, overwrite: bool, _retried: bool = False,
) -> Path:
    from tqdm.auto import tqdm

    host = urllib.parse.urlsplit(url).hostname or url
    by_hand = f"download it by hand to {target} and run `scsuperweight data validate {dataset} {target}`"
    if target.exists() and not overwrite:
        if sha256 is None:
            logger.info("%s exists and no checksum is known; not downloading again (overwrite=True to)", target)
            return target
        if _sha256_file(target) == sha256:
            logger.info("%s exists and matches its sha256", target)
            return target
        logger.warning("%s exists but its sha256 differs from the manifest; downloading again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    headers = {"User-Agent": "scsuperweight", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset and not _retried:
            # nothing left to send: the .part may already be whole, else start over once
            if sha256 is not None and _sha256_file(part) == sha256:
                os.replace(part, target)
                return target
            part.unlink()
            return _download(url, target, sha256=sha256, size=size, dataset=dataset, progress=progress,
                             timeout=timeout, overwrite=overwrite, _retried=True)
        msg = f"{host} answered HTTP {err.code} ({_one_line(err.reason)}) for {url}; check the URL, or {by_hand}"
        raise DataError(msg) from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        msg = f"could not reach {host}: {_one_line(reason)}; {by_hand}"
        raise DataError(msg) from err

    with response:
        status = getattr(response, "status", 200)
        if offset and status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                if _retried:
                    msg = f"{host} answered a resume request with the wrong byte range; {by_hand}"
                    raise DataError(msg)
                part.unlink()
                return _download(url, target, sha256=sha256, size=size, dataset=dataset, progress=progress,
                                 timeout=timeout, overwrite=overwrite, _retried=True)
            mode = "ab"
            logger.info("resuming %s at byte %d", target.name, offset)
        else:
            if offset:
                logger.info("%s ignored the Range request; downloading %s from the start", host, target.name)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else size
        digest = hashlib.sha256()
        if offset:
            with open(part, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        received = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=target.name, disable=not progress)
        try:
            with open(part, mode) as fh:
                while chunk := response.read(_CHUNK):
                    fh.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            msg = (
                f"download of {url} stopped after {received} bytes ({_one_line(err)}); run the same command "
                f"again to resume from {part}"
            )
            raise DataError(msg) from err
        finally:
            bar.close()

    if total is not None and received < total:
        msg = (
            f"download of {url} stopped after {received} of {total} bytes; run the same command again to resume "
            f"from {part}"
        )
        raise DataError(msg)
    got = digest.hexdigest()
    if (sha256 is not None and got != sha256) or (size is not None and received != size):
        part.unlink()
        expected = f"sha256 {sha256}" if sha256 is not None else f"{size} bytes"
        msg = (
            f"checksum mismatch for {target.name}: expected {expected}, got sha256 {got} ({received} bytes); "
            f"the download was deleted. The file at {host} may have changed: check it, then update the manifest"
        )
        raise DataError(msg)
    os.replace(part, target)
    logger.info("downloaded %s (%d bytes, sha256 %s)", target, received, got)
    return target


# --------------------------------------------------------------------------------------------------
# reading a local copy and harmonising it


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
