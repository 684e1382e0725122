"""Manifest validation: the subset of JSON Schema that ``schema.json`` uses, plus the rules beyond it.

A small validator here, so no jsonschema dependency; every offending field is named on one line.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path, PureWindowsPath
from typing import Any

from scsuperweight.errors import DataError

from .paths import _load_schema, _schema_path

# query parameters that carry secrets in signed or token URLs; a manifest must never hold one
_SECRET_QUERY = re.compile(r"(token|signature|sig|key|password|passwd|secret|credential|auth|x-amz-)", re.I)


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


# JSON Schema's name for each Python type a parsed manifest holds, tried in this order: bool before int, since a
# bool is an int in Python
_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))


def _type_name(value: Any) -> str:
    for py, name in _JSON_TYPES:
        if isinstance(value, py):
            return name
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
