"""The results contract: one schema, typed round trips through AnnData, h5ad and a run directory, and a run
directory that holds one run (run ids, --overwrite, refusing mixes, a failed run that says so)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_report import EVIL_GENE, STRONG, fake_adata, fake_results

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight import results as R
from scsuperweight.cli import main
from scsuperweight.errors import MixedRunError, RunDirError
from scsuperweight.report import report


def _stored(tmp_path):
    """fake_results on an AnnData through `store` (plus a conditions table), written and read back."""
    res = fake_results()
    a = fake_adata()
    for name in ("superweights", "activations", "collapse", "contrasts", "genes", "enrichment"):
        R.store(a, name, res[name])
    R.store(a, "conditions", pd.DataFrame({"condition": ["baseline", f"prune:{STRONG}"], "candidate": ["", STRONG],
                                           "control_for": ["", ""], "factor": [np.nan, 0.0], "n_edits": [0, 1],
                                           "edits": ["", "w[17]"], "restore": ["", ""]}))
    # the analyses run on their own (quantize, census) round-trip like the rest
    R.store(a, "quantize", pd.DataFrame({"setting": ["full_precision", "int4/block64"], "bits": [32, 4],
                                         "granularity": ["", "block"], "block_size": [None, 64],
                                         "holdout": [False, True], "clip": ["none", "none"], "n_weights": [10, 10],
                                         "n_held_out": [0, 1], "weight_rel_error": [0.0, 0.1],
                                         "cls_cosine": [1.0, 0.9], "recon_metric": ["gepc_mse"] * 2,
                                         "recon": [1.0, 1.2], "recon_delta": [0.0, 0.2],
                                         "knn_accuracy": [np.nan, 0.5]}))
    R.store(a, "census", pd.DataFrame({"model": ["m0"], "order": [0], "step": [np.nan], "rank": [1], "layer": [1],
                                       "site": ["L1.ffn_out"], "kind": ["ffn_out"], "channel": [5], "token": ["NA"],
                                       "max_abs": [9.0], "median_abs": [0.1], "ratio": [90.0],
                                       "above_threshold": [True], "perm_p": [1 / 21], "n_models": [1],
                                       "coincides": [False], "models_sharing": ["m0"]}))
    R.store(a, "firstorder", pd.DataFrame({"candidate": [STRONG], "param": ["w"], "metric": ["gepc_mse"],
                                           "first_order": [0.5], "rank": [1], "percentile": [100.0],
                                           "n_scalars": [64], "exact_delta": [0.7], "rank_correlation": [0.6],
                                           "n_draws": [40]}))
    R.set_run_record(a, {**res[K.UNS_RUN], "run_id": "r1", "data_hash": "d1", "model_hash": "m1"})
    a.write_h5ad(tmp_path / "a.h5ad")
    return a, ad.read_h5ad(tmp_path / "a.h5ad"), res


def test_schema_names_each_table_and_file_once():
    files = R.output_files()
    assert len(files) == len(set(files)) == len(R.TABLES) + len(R.FILES)
    assert len({s.uns_key for s in R.TABLES.values()}) == len(R.TABLES)
    assert set(R.STEPS) == {"scan", "prune", "genes", "enrich"}
    # the old names still resolve, read from the schema
    assert (K.FILE_COLLAPSE, K.UNS_GENES, K.FILE_RUN) == ("collapse.tsv", "genes", "run.json")
    assert K.COLLAPSE_COLUMNS == ["condition", "metric", "group", "value", "delta", "ci_low", "ci_high", "p_value"]
    assert R.spec("verdicts.tsv").step == "prune" and R.spec("verdicts").dtype("passes") == R.BOOL
    assert set(R.RunResults.__dataclass_fields__) >= set(R.TABLES)
    with pytest.raises(KeyError, match="unknown results table"):
        R.spec("nope")


def test_store_h5ad_table_round_trip_is_typed_and_identical(tmp_path):
    a, b, res = _stored(tmp_path)
    for name in ("superweights", "activations", "collapse", "contrasts", "conditions", "genes", "enrichment",
                 "quantize", "census", "firstorder"):
        pd.testing.assert_frame_equal(R.table(b, name), R.table(a, name), obj=name)
    q = ssw.get.quantize(b)
    assert str(q["block_size"].dtype) == "Int64" and q["holdout"].tolist() == [False, True]
    assert ssw.get.census(b)["token"].tolist() == ["NA"] and ssw.get.census(b)["coincides"].dtype == bool
    sw = ssw.get.superweights(b)
    assert str(sw["col"].dtype) == "Int64" and sw["col"].isna().tolist() == [True, False]
    assert sw["above_threshold"].dtype == bool and sw["layer"].tolist() == [2, 5]
    g = ssw.get.genes(b)
    assert g["gene"].tolist()[1] == EVIL_GENE and g["gene"].tolist()[4] == "NA"  # a gene called NA stays a gene
    assert str(g["rank"].dtype) == "Int64"
    con = ssw.get.contrasts(b)
    assert con["delta_AD"].dtype == float and str(con["n_case"].dtype) == "Int64"
    assert ssw.get.conditions(b)["n_edits"].tolist() == [0, 1]
    with pytest.raises(ssw.errors.DataError, match="run ssw.tl.prune first"):
        ssw.get.verdicts(b)


def test_write_run_dir_then_load_run_equals_the_adata(tmp_path):
    _, b, _ = _stored(tmp_path)
    out = tmp_path / "run"
    written = R.write_run_dir(b, out, run_id="r1")
    assert sorted(p.name for p in written) == sorted(R.spec(n).file for n in R.TABLES if n != "verdicts")
    for p in written:  # every table carries the run id in a plain column
        assert pd.read_csv(p, sep="\t")["run_id"].eq("r1").all(), p.name
    (out / "run.json").write_text(json.dumps(R.run_record(b)))
    from_dir, from_adata = R.load_run(out), R.load_run(b)
    assert from_dir.run_id == from_adata.run_id == "r1" and from_dir.verdicts is None
    for name, t in from_adata.tables().items():
        pd.testing.assert_frame_equal(getattr(from_dir, name), t, check_exact=False, obj=name)
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporaries behind
    # the plotting side reads the same typed tables from a loaded run
    pd.testing.assert_frame_equal(ssw.pl._get_table(from_dir, "collapse"), from_dir.collapse)


def test_mixed_run_directory_is_refused(tmp_path, capsys):
    _, b, _ = _stored(tmp_path)
    out = tmp_path / "mixed"
    R.write_run_dir(b, out, run_id="aaaa1111")
    (out / "run.json").write_text(json.dumps({"run_id": "aaaa1111", "status": "done"}))
    R.write_table(out, "superweights", R.table(b, "superweights"), run_id="bbbb2222")  # a second run's scan
    with pytest.raises(MixedRunError, match="aaaa1111.*bbbb2222"):
        R.load_run(out)
    assert main(["report", "--run", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different runs" in err and "bbbb2222" in err and "--overwrite" in err
    assert not (out / "report.html").exists()
    # results.h5ad of another run beside consistent tables is refused too
    R.write_table(out, "superweights", R.table(b, "superweights"), run_id="aaaa1111")
    R.load_run(out)
    R.set_run_record(b, {"run_id": "cccc3333"})
    b.write_h5ad(out / "results.h5ad")
    with pytest.raises(MixedRunError, match="cccc3333"):
        report(out, out)


def test_step_refuses_data_of_another_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"run_id": "r1", "data_hash": "0" * 64, "status": "partial"}))
    a = ssw.datasets.synthetic_ad(n_cells=20, seed=1)
    a.write_h5ad(tmp_path / "other.h5ad")
    assert main(["enrich", "--out", str(out), "--data", str(tmp_path / "other.h5ad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "enrich:" in err and "data hash 000000000000" in err and "different runs" in err
    assert len(err.splitlines()) == 1


def test_prepare_run_dir_refuses_then_overwrite_clears_only_run_files(tmp_path):
    out = tmp_path / "run"
    R.prepare_run_dir(out)  # new directory: fine
    for f in ("collapse.tsv", "report.html", "run.json", "results.h5ad"):
        (out / f).write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="already holds an earlier run .*--overwrite"):
        R.prepare_run_dir(out)
    R.prepare_run_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    from scsuperweight.loading import load_model
    from scsuperweight.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("runs") / "out"
    adata = ssw.datasets.synthetic_ad(n_cells=150, seed=0)
    model = load_model("demo")
    kw = dict(label_key="cell_type", condition_key="condition", donor_key="donor", max_cells_scan=60,
              max_cells_per_label=8, n_random=2, max_candidates=1, n_boot=5, permutations=20, progress=False)
    info = run_pipeline(adata, model, out, **kw)
    return out, adata, model, kw, info


def test_second_run_refused_then_overwrite_that_fails_leaves_no_stale_outputs(first_run, monkeypatch, capsys):
    from scsuperweight import tl
    from scsuperweight.pipeline import run_pipeline

    out, adata, model, kw, info = first_run
    run1 = json.loads((out / "run.json").read_text())
    assert run1["status"] == "done" and run1["run_id"] == info["run_id"] and len(run1["run_id"]) == 32
    assert run1["data_hash"] == run1["data"]["sha256"] and run1["model_hash"] == run1["model"]["sha256_state"]
    assert R.load_run(out).run_id == run1["run_id"]
    assert "id='run-state'" not in (out / "report.html").read_text()  # a complete run: no warning
    with pytest.raises(RunDirError, match="already holds run " + run1["run_id"]):
        run_pipeline(adata.copy(), model, out, **kw)
    assert json.loads((out / "run.json").read_text()) == run1  # refused before touching anything

    def broken(*a, **k):
        raise RuntimeError("prune broke")

    monkeypatch.setattr(tl, "prune", broken)
    with pytest.raises(RuntimeError, match="prune broke"):
        run_pipeline(adata.copy(), model, out, overwrite=True, **kw)
    run2 = json.loads((out / "run.json").read_text())
    assert run2["status"] == "failed" and run2["run_id"] != run1["run_id"] and run2["steps_done"] == ["scan"]
    # the first run's complete-looking files are gone; what is left is all the second run's
    left = sorted(p.name for p in out.iterdir())
    assert left == ["activations.tsv", "run.json", "superweights.tsv"], left
    assert R.load_run(out).run_id == run2["run_id"]
    assert main(["report", "--run", str(out)]) == 0
    page = (out / "report.html").read_text()
    head = page[page.index("<h1>"):page.index("<nav>")]
    assert "a failed run (RuntimeError: prune broke)" in head and "Steps done: scan" in head
