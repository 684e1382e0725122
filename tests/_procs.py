"""The command line as a subprocess, killed part-way and resumed: what the kill-and-resume tests
(test_resume_cli.py) and the distributed benchmark (benchmarks/bench_dist.py) share, written once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env() -> dict:
    """The environment for ``python -m scsuperweight`` from this checkout: one thread (as a torchrun rank), and
    no inherited WORLD_SIZE, so the child never believes it is a rank of a launch it is not part of."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    return env


def kill_when(p: subprocess.Popen, ready, what: str, timeout: float | None = 240.0) -> None:
    """SIGKILL `p` once ``ready()`` is true, and reap it. RuntimeError when `p` ends first (nothing to resume) or,
    with a `timeout`, when that many seconds pass."""
    deadline = None if timeout is None else time.time() + timeout
    while not ready():
        if p.poll() is not None:
            msg = f"the command ended before {what}: nothing to resume"
            raise RuntimeError(msg)
        if deadline is not None and time.time() >= deadline:
            msg = f"timed out waiting for {what}"
            raise RuntimeError(msg)
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


def finished_blocks(out: Path) -> int:
    """Embed blocks an `embed --out out` has finished (its ``done/<block>`` entries); 0 before the first."""
    done = Path(out) / "done"
    return sum(n.isdigit() for n in os.listdir(done)) if done.is_dir() else 0


def saved_conditions(out: Path) -> int:
    """Prune conditions a `prune --out out` has saved (its condition store's manifest); 0 before the first, and
    while the manifest is being replaced."""
    try:
        return len(json.loads((Path(out) / ".conditions" / "manifest.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def write_donor_files(adata, folder: Path) -> None:
    """One .h5ad per donor (``obs["donor"]``) under `folder`, each without the parent's uns: a per-donor atlas."""
    folder = Path(folder)
    folder.mkdir()
    for donor in adata.obs["donor"].cat.categories:
        part = adata[adata.obs["donor"] == donor].copy()
        part.uns = {}
        part.write_h5ad(folder / f"{donor}.h5ad")
