"""The command line killed with SIGKILL resumes: `embed` from its finished blocks, `prune` from its finished
conditions (not recomputed, counted in run.json), and both end with outputs identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_cli import write_planted_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    adata = write_planted_files(d)
    (d / "donors").mkdir()
    for donor in adata.obs["donor"].cat.categories:
        part = adata[adata.obs["donor"] == donor].copy()
        part.uns = {}
        part.write_h5ad(d / "donors" / f"{donor}.h5ad")
    return d


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    return subprocess.Popen([sys.executable, "-m", "scsuperweight", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


def _kill_when(p: subprocess.Popen, ready, what: str) -> None:
    deadline = time.time() + 240
    while not ready():
        assert p.poll() is None, f"the command ended before {what}: nothing to resume"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()


@pytest.mark.slow  # subprocess launches of the CLI
def test_embed_killed_resumes_identical(files, tmp_path):
    args = ["embed", "--model", str(files / "model"), "--data", str(files / "donors"), "--block-size", "4",
            "--batch-size", "4", "--no-progress"]
    _finish(_cli([*args, "--out", str(tmp_path / "clean")], files))
    killed = tmp_path / "killed"
    done = killed / "done"
    p = _cli([*args, "--out", str(killed)], files)
    _kill_when(p, lambda: done.is_dir() and sum(n.isdigit() for n in os.listdir(done)) >= 3, "3 blocks")
    before = sum(n.isdigit() for n in os.listdir(done))
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
    manifest = killed / ".conditions" / "manifest.json"

    def n_saved() -> int:
        try:
            return len(json.loads(manifest.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    p = _cli([*args, "--out", str(killed)], files)
    _kill_when(p, lambda: n_saved() >= 3, "3 conditions")
    saved = n_saved()
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
