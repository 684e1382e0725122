"""Crash-safe outputs (issue 16, req 6): a `run` killed with SIGKILL at seeded random moments never leaves a torn
table, a torn results.h5ad or a run.json that says "done" over missing tables, and a rerun with --overwrite in the
killed directory gives the tables of an uninterrupted run.

The runs are forked from this process after everything is imported (a fresh interpreter costs seconds), on a tiny
scGPT-format model (2 layers, 32 dims, 32 tokens per cell) and 80 synthetic cells, so that one run takes seconds
and the kills land in every step: scan, prune, genes, enrich, the h5ad, the report."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_tl import synthetic_model

import scsuperweight as ssw
from scsuperweight import pipeline, report, tl  # noqa: F401 - imported here, before the runs fork
from scsuperweight import results as R
from scsuperweight.cli import main
from scsuperweight.models import save_scgpt

pytestmark = pytest.mark.slow

N_KILLS = 20
RERUN_EVERY = 5  # a rerun costs a whole run: check the rerun after every fifth kill
TABLE_OF = {s.file: s.name for s in R.TABLES.values()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)  # one thread: nothing of a thread pool is inherited half-way by the forked runs
    d = tmp_path_factory.mktemp("kill")
    adata = ssw.datasets.synthetic_ad(n_cells=80, n_donors=4, seed=0)
    model = synthetic_model(adata, seed=0, nlayers=2)
    model.args["max_seq_len"] = 32
    save_scgpt(model, d / "model")
    adata.write_h5ad(d / "data.h5ad")
    return d


def argv(d: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(d / "model"), "--data", str(d / "data.h5ad"), "--label-key", "cell_type",
            "--condition-key", "condition", "--donor-key", "donor", "--out", str(out), "--max-cells-per-label", "8",
            "--n-random", "20", "--n-boot", "10", "--max-candidates", "1", "--no-progress",
            "--no-mean-ablation", "--granularities", "scalar", "--no-joint", "--n-matched", "0",
            *extra]


def fork_run(args: list[str], log: Path) -> int:
    """Fork a child that runs the CLI with `args` (its output into `log`) and leaves without pytest's exit
    handlers; returns its pid."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            with open(log, "w") as fh:
                sys.stdout = sys.stderr = fh
                try:
                    code = main(args)
                except BaseException:
                    traceback.print_exc(file=fh)
                fh.flush()
        finally:
            os._exit(code)
    return pid


def wait_ok(pid: int, log: Path, what: str) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"{what} failed:\n{log.read_text()[-3000:]}"


def tables(out: Path) -> dict[str, pd.DataFrame]:
    got = {}
    for f in sorted(out.glob("*.tsv")):
        assert f.name in TABLE_OF, f"{f.name}: a file that looks like a table but is none of the run's"
        spec = R.spec(TABLE_OF[f.name])
        text = f.read_text()
        if not text.strip():
            assert spec.empty_means_no_rows, f"{f.name} is empty"
            got[f.name] = pd.DataFrame()
            continue
        df, _ = R.read_table(f, spec.name)
        assert set(spec.contract) <= set(df.columns), f"{f.name} lacks {set(spec.contract) - set(df.columns)}"
        assert text.endswith("\n"), f"{f.name} ends mid-line"
        got[f.name] = df
    return got


def check_after_kill(out: Path) -> None:
    if not out.exists():
        return
    tabs = tables(out)
    visible = {f.name for f in out.iterdir() if not f.name.startswith(".")}
    assert visible <= set(R.output_files()), f"unexpected files {visible - set(R.output_files())}"
    if (out / R.RESULTS.file).exists():
        import anndata as ad

        ad.read_h5ad(out / R.RESULTS.file)  # complete, or it would not read
    if (out / R.RUN.file).exists():
        run = json.loads((out / R.RUN.file).read_text())  # never torn
        if run.get("status") == "done":
            want = {s.file for s in R.TABLES.values() if s.in_run}
            assert want <= set(tabs), f"run.json says done without {want - set(tabs)}"


def same_tables(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=False, obj=name)


def test_kill_at_random_points_leaves_no_torn_output(setup, tmp_path):
    ref_out = tmp_path / "ref"
    t0 = time.perf_counter()
    pid = fork_run(argv(setup, ref_out), tmp_path / "ref.log")
    wait_ok(pid, tmp_path / "ref.log", "the uninterrupted run")
    duration = time.perf_counter() - t0
    ref = tables(ref_out)
    assert R.spec("collapse").file in ref and len(ref[R.spec("collapse").file])
    assert json.loads((ref_out / R.RUN.file).read_text())["status"] == "done"

    rng = np.random.default_rng(16)
    kill_at = np.sort(rng.uniform(0.02, 0.98, N_KILLS)) * duration
    states = []
    for i, t in enumerate(kill_at):
        out = tmp_path / f"k{i}"
        pid = fork_run(argv(setup, out), tmp_path / f"k{i}.log")
        time.sleep(t)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        check_after_kill(out)
        states.append(sorted(f.name for f in out.iterdir()) if out.exists() else [])
        if i % RERUN_EVERY == RERUN_EVERY - 1:
            pid = fork_run(argv(setup, out, "--overwrite"), tmp_path / f"r{i}.log")
            wait_ok(pid, tmp_path / f"r{i}.log", f"the rerun after a kill at {t:.2f}s of {duration:.2f}s")
            same_tables(tables(out), ref)
    # the kills spread over the run: some before any table, some with part of the tables, some late
    n_files = [len([f for f in s if f.endswith(".tsv")]) for s in states]
    assert min(n_files) < max(n_files), states
