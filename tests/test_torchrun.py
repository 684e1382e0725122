"""Two CPU processes under torchrun (gloo) give the one-process answer, and rank 0 alone writes.

The one-process reference runs with one thread, as torchrun's ranks do (OMP_NUM_THREADS=1): a matmul's rounding
depends on the thread count, so only equal thread counts can be compared bit for bit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from _plant import plant_cls_superweight
from test_tl import synthetic_model

import scsuperweight as ssw
from scsuperweight.models import save_scgpt

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun")
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not on PATH (it ships with torch)")

SCAN = textwrap.dedent("""
    import sys
    import anndata as ad
    import torch
    from scsuperweight import dist, tl
    from scsuperweight.loading import load_model

    torch.set_num_threads(1)
    ctx = dist.context()
    model = load_model(sys.argv[1])
    adata = ad.read_h5ad(sys.argv[2])
    tl.scan(adata, model, label_key="cell_type", max_cells=96, batch_size=8, progress=False)
    if ctx.is_main:
        ssw_ns = adata.uns["ssw"]
        ssw_ns["superweights"].to_csv(sys.argv[3] + "/superweights.tsv", sep="\\t", index=False)
        ssw_ns["activations"].to_csv(sys.argv[3] + "/activations.tsv", sep="\\t", index=False)
""")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrun")
    adata = ssw.datasets.synthetic_ad(n_cells=120, n_donors=4, seed=3)
    model = synthetic_model(adata, seed=3)
    _, plain, _ = ssw.tl._inputs(adata, model, gene_key=None, layer=None, max_seq_len=None, seed=0, batch_size=32)
    plant_cls_superweight(model, plain, 1, 3, 7, magnitude=300.0)
    save_scgpt(model, d / "model")
    adata.write_h5ad(d / "data.h5ad")
    (d / "scan.py").write_text(SCAN)
    return d


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], cwd: Path) -> None:
    p = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]


def test_two_rank_scan_equals_one_process(files, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    args = [str(files / "model"), str(files / "data.h5ad")]
    _run([sys.executable, str(files / "scan.py"), *args, str(one)], files)
    _run([TORCHRUN, "--standalone", "--nproc-per-node", "2", str(files / "scan.py"), *args, str(two)], files)
    for name in ("superweights.tsv", "activations.tsv"):
        a, b = pd.read_csv(one / name, sep="\t"), pd.read_csv(two / name, sep="\t")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    sw = pd.read_csv(two / "superweights.tsv", sep="\t")
    assert "L1.linear2.w[3,7]" in set(sw["candidate"])  # the planted super weight is found
