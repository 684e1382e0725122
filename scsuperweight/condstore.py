"""Finished prune conditions kept in OUT, so a killed `prune` or `run` resumes without recomputing them.

Each condition's per-cell result arrays go to ``OUT/.conditions/<safe name>.npz`` (written to a temporary file,
fsynced, renamed), and a manifest maps the condition's name to the hash of its definition and of the run's
inputs. A result is reused only when both hashes match now: a changed plan, model, data or seed recomputes it
rather than mixing stale numbers into new tables. The hash is stored in the .npz too, so a file never speaks for
another definition even if the manifest is lost.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np

from ._atomic import atomic_write_bytes
from ._log import logger

DIRNAME = ".conditions"
MANIFEST = "manifest.json"
_KEY = "__condition_key__"


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
        self.dir.mkdir(parents=True, exist_ok=True)
        self._manifest_path = self.dir / MANIFEST
        self._manifest = json.loads(self._manifest_path.read_text()) if self._manifest_path.exists() else {}

    def save(self, name: str, definition, arrays: dict[str, np.ndarray]) -> Path:
        """Persist one finished condition (atomically), then record it in the manifest."""
        key = definition_hash(definition, self.inputs)
        if _KEY in arrays:
            msg = f"{_KEY!r} is reserved; rename that array of condition {name!r}."
            raise ValueError(msg)
        buf = io.BytesIO()
        np.savez(buf, **{_KEY: np.array(key)}, **{k: np.asarray(v) for k, v in arrays.items()})
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
            return {k: z[k] for k in z.files if k != _KEY}

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
