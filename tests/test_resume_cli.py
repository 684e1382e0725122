"""The command line killed with SIGKILL resumes: `embed` from its finished blocks, `prune` from its finished
conditions (not recomputed, counted in run.json), and both end with outputs identical to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _procs import cli_env, finished_blocks, kill_when, saved_conditions, write_donor_files
from test_cli import write_planted_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    write_donor_files(write_planted_files(d), d / "donors")
    return d


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scsuperweight", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


@pytest.mark.slow  # subprocess launches of the CLI
def test_embed_killed_resumes_identical(files, tmp_path):
    args = ["embed", "--model", str(files / "model"), "--data", str(files / "donors"), "--block-size", "4",
            "--batch-size", "4", "--no-progress"]
    _finish(_cli([*args, "--out", str(tmp_path / "clean")], files))
    killed = tmp_path / "killed"
    p = _cli([*args, "--out", str(killed)], files)
    kill_when(p, lambda: finished_blocks(killed) >= 3, "3 blocks")
    before = finished_blocks(killed)
    assert 3 <= before < 40 and not (killed / "embeddings.h5ad").exists()  # killed part-way
    _finish(_cli([*args, "--out", str(killed)], files))
    a = ad.read_h5ad(tmp_path / "clean" / "embeddings.h5ad")
    b = ad.read_h5ad(killed / "embeddings.h5ad")
    assert list(a.obs_names) == list(b.obs_names) and a.n_obs == 160
    np.testing.assert_array_equal(a.obsm["X_scGPT"], b.obsm["X_scGPT"])  # bit for bit
    run = json.loads((killed / "run.json").read_text())
    assert run["status"] == "done" and run["progress"]["total"] == 40
    assert [o["file"] for o in run["gene_overlap"]] == sorted(p.stem for p in (files / "donors").iterdir())


@pytest.mark.slow
def test_prune_killed_resumes_without_recomputing(files, tmp_path):
    base = tmp_path / "base"
    _finish(_cli(["scan", "--model", str(files / "model"), "--data", str(files / "data.h5ad"), "--label-key",
                  "cell_type", "--max-cells", "64", "--batch-size", "16", "--no-progress", "--out", str(base)],
                 files))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    shutil.copytree(base, ref)
    shutil.copytree(base, killed)
    args = ["prune", "--model", str(files / "model"), "--label-key", "cell_type", "--condition-key", "condition",
            "--donor-key", "donor", "--max-cells-per-label", "12", "--n-random", "10", "--n-boot", "20",
            "--max-candidates", "2", "--batch-size", "16", "--no-progress"]
    _finish(_cli([*args, "--out", str(ref)], files))
    p = _cli([*args, "--out", str(killed)], files)
    kill_when(p, lambda: saved_conditions(killed) >= 3, "3 conditions")
    saved = saved_conditions(killed)
    assert not (killed / "collapse.tsv").exists()
    _finish(_cli([*args, "--out", str(killed)], files))
    prog = json.loads((killed / "run.json").read_text())["progress"]
    every = json.loads((ref / "run.json").read_text())["progress"]  # the uninterrupted run computed them all
    assert every["finished_before"] == 0 and every["computed_now"] > saved
    assert prog["finished_before"] == saved  # read back, not recomputed ...
    assert prog["computed_now"] == every["computed_now"] - saved  # ... and only the others computed
    for name in ("collapse.tsv", "verdicts.tsv", "conditions.tsv", "contrasts.tsv"):
        a, b = ref / name, killed / name
        if a.stat().st_size == 0:
            assert b.stat().st_size == 0
            continue
        pd.testing.assert_frame_equal(pd.read_csv(a, sep="\t"), pd.read_csv(b, sep="\t"), check_exact=True,
                                      obj=name)
    assert not (killed / ".conditions").exists()
