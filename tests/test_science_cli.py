"""The detection null in scan, `quantize` and `census` end to end through the CLI, on a planted super weight whose
answers are known: its p is the smallest the null allows, holding it out rescues large quantisation blocks, and two
copies of it coincide in a census."""

import copy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from _plant import plant_cls_superweight, tiny_batches, tiny_model

from scsuperweight import results as R
from scsuperweight.cli import main
from scsuperweight.models.checkpoint import save_scgpt

PLANTED = "L1.linear2.w[5,10]"


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    m = tiny_model(3)
    plant_cls_superweight(m, tiny_batches(m, 12, 3, 6), 1, 5, 10)
    root = tmp_path_factory.mktemp("planted")
    save_scgpt(m, root / "a")
    save_scgpt(copy.deepcopy(m), root / "b")
    save_scgpt(tiny_model(8), root / "clean")
    return root


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = sp.random(40, 120, density=0.25, random_state=0, data_rvs=lambda n: rng.poisson(4, n) + 1)
    a = ad.AnnData(X.tocsr().astype(np.float32))
    a.var_names = [f"GENE{i}" for i in range(120)]
    a.obs["cell_type"] = pd.Categorical(np.where(np.arange(40) % 2, "A", "B"))
    path = tmp_path_factory.mktemp("cells") / "cells.h5ad"
    a.write_h5ad(path)
    return path


def test_scan_null_gives_the_planted_spike_the_smallest_p_and_the_report_says_how_often_nulls_pass(
        planted_dir, tmp_path):
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(planted_dir / "a"), "--data-free", "--null-k", "9", "--null-method",
                 "gaussian", "--max-rounds", "1", "--no-progress", "--out", str(out)]) == 0
    sw, _ = R.read_table(out / "superweights.tsv", "superweights")
    row = sw[sw["candidate"] == PLANTED].iloc[0]
    assert row["perm_p"] == pytest.approx(1 / 10) and row["perm_p_max"] == pytest.approx(1 / 10)
    assert sw["perm_p"].dtype == float and "perm_p_permute" not in sw.columns
    assert sw.loc[sw["screen"].astype(str).str.startswith("weight"), "perm_p"].isna().all()
    null = R.read_run_json(out)["scan"]["null"]
    assert null["k"] == 9 and null["gaussian"]["pass_rate"] == 0.0 and null["gaussian"]["top_channel"] == 5
    assert main(["report", "--run", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "0 of 9 Gaussian copies" in page and "p = 0.1" in page


def test_scan_null_both_reports_the_permutation_null_beside(planted_dir, tmp_path):
    out = tmp_path / "scan"
    assert main(["scan", "--model", str(planted_dir / "a"), "--data-free", "--null-k", "5", "--max-rounds", "1",
                 "--no-progress", "--out", str(out)]) == 0
    sw, _ = R.read_table(out / "superweights.tsv", "superweights")
    row = sw[sw["candidate"] == PLANTED].iloc[0]
    assert row["perm_p"] == pytest.approx(1 / 6)
    # shuffling keeps the lone huge scalar, which spikes wherever it lands: the permutation null cannot call it
    assert row["perm_p_permute"] > 0.3
    null = R.read_run_json(out)["scan"]["null"]
    assert null["permute"]["pass_rate"] > 0.5 and null["gaussian"]["pass_rate"] == 0.0


def test_quantize_cli_holding_out_the_planted_weight_helps_at_large_blocks(planted_dir, cells, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(planted_dir / "a"), "--data", str(cells), "--label-key", "cell_type",
                 "--bits", "4", "--granularity", "block", "--block-sizes", "64", "4096", "--clip", "none",
                 "--max-candidates", "1", "--max-cells", "16", "--no-progress", "--out", str(out)]) == 0
    q, rid = R.read_table(out / "quantize.tsv", "quantize")
    assert rid == R.read_run_json(out)["run_id"]
    assert list(q.columns) == list(R.spec("quantize").contract)
    assert (q["n_held_out"] == np.where(q["holdout"], 1, 0)).all()  # the scan's top candidate: the planted scalar
    loss = q.set_index("setting")["cls_cosine"].rsub(1.0)
    assert loss["int4/block4096/holdout"] < 0.5 * loss["int4/block4096"]
    assert loss["int4/block4096"] > loss["int4/block64"]
    assert (out / "quantize.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "Holding out the 1 candidate scalar(s) helps" in page
    # the run directory is one run: a second quantize is refused without --overwrite, and kept with it
    assert main(["quantize", "--model", str(planted_dir / "a"), "--data", str(cells), "--bits", "4",
                 "--granularity", "tensor", "--clip", "none", "--no-progress", "--out", str(out)]) == 2
    assert main(["quantize", "--model", str(planted_dir / "a"), "--data", str(cells), "--bits", "4",
                 "--granularity", "tensor", "--clip", "none", "--max-cells", "8", "--no-progress", "--overwrite",
                 "--out", str(out)]) == 0
    assert R.load_run(out).quantize["granularity"].tolist()[1:] == ["tensor", "tensor"]


def test_run_quantize_adds_the_sweep_to_the_same_run(planted_dir, cells, tmp_path):
    out, gmt = tmp_path / "run", tmp_path / "sets.gmt"  # gene sets over the cells' own names, for the enrich step
    gmt.write_text("".join(f"SET{k}\tna\t" + "\t".join(f"GENE{i}" for i in range(k, 120, 4)) + "\n"
                           for k in range(4)))
    assert main(["run", "--model", str(planted_dir / "a"), "--data", str(cells), "--label-key", "cell_type",
                 "--max-cells-per-label", "12", "--n-random", "19", "--n-boot", "20", "--max-candidates", "1",
                 "--granularities", "scalar", "--no-mean-ablation", "--n-matched", "0", "--gene-sets", str(gmt),
                 "--quantize", "--no-progress", "--yes", "--out", str(out)]) == 0
    run = R.read_run_json(out)
    q, rid = R.read_table(out / "quantize.tsv", "quantize")
    assert rid == run["run_id"] and run["status"] == "done" and "quantize" in run["steps_done"]
    assert run["quantize"]["held_out"] == [PLANTED]
    rounded = q[q["bits"] < 32]  # beside the full-precision reference row: quantize's default settings
    assert set(rounded["bits"]) == {8, 4} and set(rounded["clip"]) == {"none", "mse"}
    assert set(rounded["granularity"]) == {"tensor", "row", "block"} and len(rounded) == 2 * 6 * 2 * 2
    loss = q.set_index("setting")["cls_cosine"].rsub(1.0)
    assert loss["int4/block4096/holdout"] < 0.5 * loss["int4/block4096"]
    assert "Holding out the 1 candidate scalar(s) helps" in (out / "report.html").read_text()


def test_census_cli_two_planted_copies_coincide(planted_dir, tmp_path):
    out = tmp_path / "census"
    assert main(["census", "--models", *(str(planted_dir / n) for n in ("a", "b", "clean")), "--top", "3",
                 "--n-tokens", "40", "--null-k", "4", "--no-candidates", "--no-progress", "--out", str(out)]) == 0
    c, _ = R.read_table(out / "census.tsv", "census")
    top = c[c["rank"] == 1].set_index("model")
    for name in ("a", "b"):
        assert (top.loc[name, "layer"], top.loc[name, "kind"], top.loc[name, "channel"]) == (1, "ffn_out", 5)
        assert bool(top.loc[name, "coincides"]) and top.loc[name, "models_sharing"] == "a;b"
        assert top.loc[name, "perm_p"] == pytest.approx(1 / 5)
    assert not c.loc[c["model"] == "clean", "coincides"].any()
    page = (out / "census.html").read_text()
    assert "1 recur in more than one" in page and (out / "census.png").is_file()


def test_census_cli_data_mode_finds_the_planted_spike_on_real_cells(planted_dir, cells, tmp_path):
    out = tmp_path / "census_cells"
    assert main(["census", "--models", str(planted_dir / "a"), str(planted_dir / "clean"), "--data", str(cells),
                 "--label-key", "cell_type", "--max-cells", "12", "--batch-size", "6", "--top", "3", "--null-k", "4",
                 "--no-candidates", "--no-progress", "--out", str(out)]) == 0
    c, _ = R.read_table(out / "census.tsv", "census")
    top = c[c["rank"] == 1].set_index("model")
    assert (top.loc["a", "layer"], top.loc["a", "kind"], top.loc["a", "channel"]) == (1, "ffn_out", 5)
    assert bool(top.loc["a", "above_threshold"]) and top.loc["a", "token"] == "<cls>"
    assert top.loc["a", "perm_p"] == pytest.approx(1 / 5)
    assert not c.loc[c["model"] == "clean", "above_threshold"].any()
    params = R.read_run_json(out)["census"]
    assert params["inputs"] == "batches" and params["n_cells"] == 12
    # the cell options without cells are one clear refusal
    assert main(["census", "--models", str(planted_dir / "a"), "--label-key", "cell_type", "--no-progress",
                 "--out", str(tmp_path / "refused")]) == 2


def test_quantize_and_census_have_help_with_examples():
    from scsuperweight.cli import build_parser

    cmds = build_parser()._subparsers._group_actions[0].choices
    for name in ("quantize", "census"):
        assert "examples:" in cmds[name].format_help(), name
    assert "--null-k" in cmds["scan"].format_help() and "--null-method" in cmds["scan"].format_help()
