"""Atomic writes of every kind of file we produce: text, TSV, JSON, .h5ad, figures, torch checkpoints (a reader,
or a killed run, never sees half a file), over `_atomic`'s fsynced temporary-then-rename in the destination's own
directory. Temporaries are hidden dot-files (``.NAME.tmpPID``), so no reader mistakes one for a table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._atomic import atomic_write_bytes, fsync_dir


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


def _replace_from_temp(path, write) -> Path:
    """Call ``write(tmp)`` on a hidden temporary next to `path`, fsync it and rename it over `path`; the temporary
    is removed when `write` fails, so an error leaves the old file (or none), never a half one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_h5ad(adata, path) -> Path:
    """``adata.write_h5ad(path)``, atomically: a killed run leaves the previous file or none, never a torn one."""
    return _replace_from_temp(path, adata.write_h5ad)


def atomic_savefig(fig, path, **kwargs) -> Path:
    """``fig.savefig(path, **kwargs)``, atomically (the format from `path`'s suffix unless given)."""
    kwargs.setdefault("format", Path(path).suffix.lstrip(".").lower() or None)
    return _replace_from_temp(path, lambda tmp: fig.savefig(tmp, **kwargs))


def atomic_torch_save(obj, path) -> Path:
    """``torch.save(obj, path)``, atomically."""
    import torch

    return _replace_from_temp(path, lambda tmp: torch.save(obj, tmp))
