"""Finished prune conditions kept in OUT, so a killed `prune` or `run` resumes without recomputing them.

Each condition's per-cell result arrays go to ``OUT/.conditions/<safe name>.npz`` (written to a temporary file,
fsynced, renamed), and a manifest maps the condition's name to the hash of its definition and of the run's
inputs. A result is reused only when both hashes match now: a changed plan, model, data or seed recomputes it
rather than mixing stale numbers into new tables. The hash is stored in the .npz too, so a file never speaks for
another definition even if the manifest is lost.

`execute` is the engine behind `scsuperweight.prune.run_conditions`: it skips the conditions the active store
(`persisting`) already holds, persists each one as it finishes, and under several processes runs them in rounds,
one condition per rank, rank 0 gathering and saving them; every rank gets every result, in plan order.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import dist
from ._atomic import atomic_write_bytes
from ._log import logger

DIRNAME = ".conditions"
MANIFEST = "manifest.json"
_KEY = "__condition_key__"


_F32 = "__f32"  # suffix of a float64 array stored as float32 because that loses nothing


def _compact(arrays: dict) -> dict:
    """float64 arrays that hold float32 values (a model's float32 outputs, widened) are stored as float32, halving
    the store; `get` widens them back, bit for bit."""
    out = {}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype == np.float64 and np.array_equal(a.astype(np.float32).astype(np.float64), a, equal_nan=True):
            out[k + _F32] = a.astype(np.float32)
        else:
            out[k] = a
    return out


def definition_hash(definition, inputs: str = "") -> str:
    """A stable hash of a condition's definition (JSON-able: dicts, lists, numbers, strings) and the run's inputs."""
    text = json.dumps({"definition": definition, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def safe_name(name: str) -> str:
    """A file name for a condition name: unsafe characters replaced, plus a short hash so two names never collide."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]
    return f"{stem}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class ConditionStore:
    """Per-condition result arrays of one run, in ``out/.conditions``.

    Parameters
    ----------
    out
        The run's output folder.
    inputs
        A hash (or any string) of everything the conditions' results depend on besides their own definitions:
        model, data, cells, seeds, metrics.
    """

    def __init__(self, out, inputs: str = ""):
        self.dir = Path(out) / DIRNAME
        self.inputs = inputs
        self._manifest_path = self.dir / MANIFEST
        self._manifest = json.loads(self._manifest_path.read_text()) if self._manifest_path.exists() else {}

    def save(self, name: str, definition, arrays: dict[str, np.ndarray]) -> Path:
        """Persist one finished condition (atomically), then record it in the manifest."""
        key = definition_hash(definition, self.inputs)
        if _KEY in arrays:
            msg = f"{_KEY!r} is reserved; rename that array of condition {name!r}."
            raise ValueError(msg)
        buf = io.BytesIO()
        np.savez(buf, **{_KEY: np.array(key)}, **_compact(arrays))
        self.dir.mkdir(parents=True, exist_ok=True)  # made by the first finished condition
        path = self.dir / f"{safe_name(name)}.npz"
        atomic_write_bytes(path, buf.getvalue())
        self._manifest[name] = {"hash": key, "file": path.name}
        atomic_write_bytes(self._manifest_path, json.dumps(self._manifest, indent=1, sort_keys=True).encode())
        return path

    def get(self, name: str, definition) -> dict[str, np.ndarray] | None:
        """The stored arrays of `name` if they were computed for this definition and these inputs, else None."""
        key = definition_hash(definition, self.inputs)
        entry = self._manifest.get(name)
        if entry is None or entry["hash"] != key:
            return None
        path = self.dir / entry["file"]
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            if str(z[_KEY]) != key:
                return None
            return {k.removesuffix(_F32): z[k].astype(np.float64) if k.endswith(_F32) else z[k]
                    for k in z.files if k != _KEY}

    def clear(self) -> None:
        """Remove the stored conditions (once the step's tables are written they are no longer needed)."""
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        self._manifest = {}

    def load_done(self, definitions: dict) -> dict[str, dict[str, np.ndarray]]:
        """Of `definitions` (name -> definition), the conditions already finished for them: name -> arrays."""
        done = {}
        for name, definition in definitions.items():
            arrays = self.get(name, definition)
            if arrays is not None:
                done[name] = arrays
        stale = [n for n in definitions if n in self._manifest and n not in done]
        if done or stale:
            logger.info("resuming: %d condition(s) finished before, %d stored for another plan (recomputed)",
                        len(done), len(stale))
        return done


# ------------------------------------------------------------------------------------------------------------
# running conditions: resume, persist, shard across ranks
# ------------------------------------------------------------------------------------------------------------
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("ssw_condition_store", default=(None, None, None))


@contextmanager
def persisting(store: ConditionStore | None, *, writer: Callable[[dict], None] | None = None):
    """Within the block, conditions run by `execute` (prune, run) are read from and saved to `store`, and progress
    records go to `writer` (``RunLog.progress``). The CLI and the pipeline open it around a prune; library calls
    without it persist nothing. The store is reset on exit, also on error."""
    # counts over every `execute` of the block (a prune runs conditions in several calls: sequential rounds of
    # random draws, the joint phase), so the progress record says how many were reused and computed in all
    token = _ACTIVE.set((store, writer, {"finished_before": 0, "computed_now": 0}))
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


def definition(cond) -> dict:
    """A condition's definition as plain values (every field of its dataclass, edits included), for its hash."""
    return dataclasses.asdict(cond) if dataclasses.is_dataclass(cond) else {"repr": repr(cond)}


def execute(run: Callable, conds: Sequence, *, progress: bool = False, ctx: dist.DistContext | None = None,
            store: ConditionStore | None = None, writer: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """``{cond.name: run(cond)}`` for `conds`, in plan order, skipping and persisting through the condition store.

    `store`/`writer` default to those of the enclosing `persisting` block. With several processes (`ctx`, default
    `scsuperweight.dist.context()`) the conditions not finished yet are dealt out in rounds (rank r runs the r-th
    of each round: a strided shard), rank 0 gathers each round, saves it and counts it; a failing rank ends every
    rank with its error (`dist.guard`). Every rank returns all results, identical to one process's.
    """
    from .progress import Progress

    active_store, active_writer, counts = _ACTIVE.get()
    counts = counts if counts is not None else {"finished_before": 0, "computed_now": 0}
    store = store if store is not None else active_store
    writer = writer if writer is not None else active_writer
    ctx = ctx or dist.context()
    defs = {c.name: definition(c) for c in conds}
    if len(defs) != len(conds):
        msg = "condition names repeat; each condition needs its own name (they key the stored results)."
        raise ValueError(msg)
    done: dict[str, dict] = {}
    with dist.guard(ctx):
        if ctx.is_main and store is not None:
            done = store.load_done(defs)
    names_done = set(dist.gather_objects(sorted(done) if ctx.is_main else None, ctx)[0])
    todo = [c for c in conds if c.name not in names_done]
    counts["finished_before"] += len(names_done)
    with Progress(len(conds), initial=len(names_done), desc="prune conditions", unit="condition",
                  enabled=progress, is_main=ctx.is_main, writer=writer) as bar:
        def keep(cond, arrays) -> None:
            if store is not None:
                store.save(cond.name, defs[cond.name], arrays)
            done[cond.name] = arrays

        def count(batch) -> None:
            counts["computed_now"] += len(batch)
            bar.update(len(batch), condition=batch[-1].name, **counts)

        dist.run_in_rounds(todo, run, keep, ctx, after=count)
    results = dist.gather_objects(done if ctx.is_main else None, ctx)[0] if ctx.active else done
    return {c.name: results[c.name] for c in conds}
