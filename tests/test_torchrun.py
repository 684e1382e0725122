"""Two CPU processes under torchrun (gloo) give the one-process answer, and rank 0 alone writes.

The one-process reference runs with one thread, as torchrun's ranks do (OMP_NUM_THREADS=1): a matmul's rounding
depends on the thread count, so only equal thread counts can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from test_cli import write_planted_files

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on PATH (it ships with torch)")

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    write_planted_files(d, n_cells=120)
    return d


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], cwd: Path) -> None:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]


def _tables(out: Path) -> dict[str, pd.DataFrame]:
    """Every table of a run directory, without the run id (each run has its own)."""
    def read(p: Path) -> pd.DataFrame:
        try:
            return pd.read_csv(p, sep="\t").drop(columns="run_id", errors="ignore")
        except pd.errors.EmptyDataError:  # a table with nothing to say (e.g. no contrasts)
            return pd.DataFrame()

    return {p.name: read(p) for p in sorted(out.glob("*.tsv"))}


@pytest.mark.slow  # four launches of the CLI, two of them torchrun: ~2 min on a busy 2-core machine
def test_torchrun_two_ranks_scan_and_prune_equal_one_process(files, tmp_path):
    """`torchrun --nproc-per-node 2 -m scsuperweight scan|prune` (gloo): the same tables as one process, written by
    rank 0 alone, with conditions really split (each rank computed some)."""
    model, data = str(files / "model"), str(files / "data.h5ad")
    scan = ["scan", "--model", model, "--data", data, "--label-key", "cell_type", "--max-cells", "96",
            "--batch-size", "8", "--no-progress"]
    prune = ["prune", "--model", model, "--label-key", "cell_type", "--condition-key", "condition", "--donor-key",
             "donor", "--max-cells-per-label", "10", "--n-random", "6", "--n-boot", "20", "--max-candidates", "2",
             "--batch-size", "8", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, launcher in ((one, [sys.executable, "-m", "scsuperweight"]),
                          (two, [TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "scsuperweight"])):
        _run([*launcher, *scan, "--out", str(out)], files)
        _run([*launcher, *prune, "--out", str(out)], files)
    a, b = _tables(one), _tables(two)
    assert set(a) == set(b) >= {"superweights.tsv", "activations.tsv", "collapse.tsv", "verdicts.tsv"}
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
    assert "L1.linear2.w[3,7]" in set(b["superweights.tsv"]["candidate"])  # the planted super weight
    assert len(set(b["collapse.tsv"]["condition"])) > 10
    assert not (two / ".conditions").exists()  # the finished prune cleared its kept conditions


@pytest.mark.slow  # two launches of the whole pipeline, one of them torchrun: ~2 min on a busy 2-core machine
def test_torchrun_two_ranks_run_equals_one_process(files, tmp_path):
    """`torchrun ... run`: rank 0 alone computes prune's tables, genes and enrich; the tables equal one process's."""
    run = ["run", "--model", str(files / "model"), "--data", str(files / "data.h5ad"), "--label-key", "cell_type",
           "--condition-key", "condition", "--donor-key", "donor", "--max-cells-per-label", "8", "--n-random", "4",
           "--n-boot", "10", "--max-candidates", "1", "--batch-size", "8", "--granularities", "scalar",
           "--no-mean-ablation", "--no-joint", "--n-matched", "0", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "scsuperweight", *run, "--out", str(one)], files)
    _run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "scsuperweight", *run, "--out", str(two)], files)
    a, b = _tables(one), _tables(two)
    assert set(a) == set(b) >= {"collapse.tsv", "genes.tsv", "enrichment.tsv"}
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
    assert len(b["genes.tsv"]) > 0
    # run.json says how many genes the data shares with the vocab (one file read whole: one record)
    vocab = json.loads((files / "model" / "vocab.json").read_text())
    genes = ad.read_h5ad(files / "data.h5ad", backed="r").var_names
    (rec,) = json.loads((two / "run.json").read_text())["gene_overlap"]
    assert (rec["n_cells"], rec["n_genes"], rec["n_shared"]) == (120, len(genes), sum(g in vocab for g in genes))
