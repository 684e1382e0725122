"""Atomic text, TSV and JSON writes (a reader, or a killed run, never sees half a file), over `_atomic`'s
fsynced temporary-then-rename in the destination's own directory."""

from __future__ import annotations

import json
from pathlib import Path

from ._atomic import atomic_write_bytes


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (its folder created when absent); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode(encoding))
    return path


def atomic_write_tsv(df, path, header_comment: str | None = None) -> Path:
    """A DataFrame as a plain tab-separated file (no index), atomically; `header_comment` lines go first as
    ``# ...`` (readers then need ``comment="#"``, so prefer a column for anything a reader must see)."""
    body = df.to_csv(sep="\t", index=False)
    if header_comment:
        body = "".join(f"# {line}\n" for line in header_comment.splitlines()) + body
    return atomic_write_text(path, body)


def atomic_write_json(obj, path, *, indent: int = 2, sort_keys: bool = True) -> Path:
    """`obj` as JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))
