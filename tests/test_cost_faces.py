"""Cost controls through the faces (tl, pipeline, CLI) on a small planted model: the plan comes before the work and
is recorded, --dry-run stops after it, a plan above one hour asks for --budget or --yes (CLI: exit 2, one line;
Python: a warning), a budget's choices are the parameters actually used and never cross the validity floors, a
bf16 forward ranks candidates as fp32 does, and scan offers the gradient screen."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from _plant import plant_cls_superweight
from test_tl import synthetic_model

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight import plan as P
from scsuperweight.cli import main
from scsuperweight.models import save_scgpt
from scsuperweight.runners import get_runner

PLANTED = "transformer_encoder.layers.0.linear2.weight"


@pytest.fixture(scope="module")
def small():
    adata = ssw.datasets.synthetic_ad(n_cells=120, n_donors=4, seed=1)
    model = synthetic_model(adata, seed=1)
    plain = get_runner(model).prepare(adata, max_seq_len=None, seed=0, batch_size=32).plain
    plant_cls_superweight(model, plain, 0, 5, 11, magnitude=300.0)
    cands = pd.DataFrame([{"candidate": "planted", "param": PLANTED, "row": 5, "col": 11, "screen": "activation",
                           "above_threshold": True},
                          {"candidate": "null", "param": "transformer_encoder.layers.1.linear1.weight", "row": 3,
                           "col": 4, "screen": "activation", "above_threshold": True}])
    return adata, model, cands


def _prune(small, **kw):
    adata, model, cands = small
    a = adata.copy()
    kw = {"max_cells_per_label": 6, "n_random": 20, "n_boot": 20, "first_order": False, "mean_ablation": False,
          "granularities": ("scalar",), "joint": False, "n_matched": 0, **kw}
    ssw.tl.prune(a, model, label_key="cell_type", candidates=cands, progress=False, **kw)
    return a


def test_plan_is_recorded_before_the_work_and_dry_run_stops(small):
    a = _prune(small, dry_run=True)
    p = ssw.get.params(a, "prune")
    assert p["dry_run"] and "collapse" not in a.uns["ssw"]
    plan = p["plan"]
    assert plan["conditions_by_kind"]["random"] == 2 * 20  # two parameters, draws counted at their maximum
    assert plan["conditions_by_kind"]["prune"] == 2 and plan["n_cells"] == 6 * 7 - 2  # endothelial 4 < 6
    assert plan["flop_rate"] > 0 and 0 < plan["est_seconds"] < 3600 and plan["total_flops"] > 0
    assert any("sequential nulls" in n for n in plan["notes"])
    seen = []
    _prune(small, dry_run=True, on_plan=seen.append)  # the CLI's hook gets the Plan itself
    assert isinstance(seen[0], P.Plan) and seen[0].n_conditions == plan["n_conditions"]


def test_long_plan_warns_in_python_unless_confirmed(small, monkeypatch):
    monkeypatch.setattr(P, "LONG_RUN_SECONDS", 1e-6)
    with pytest.warns(P.LongRunWarning, match=r"budget='15m'.*yes=True"):
        _prune(small, dry_run=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", P.LongRunWarning)
        _prune(small, dry_run=True, yes=True)
        _prune(small, dry_run=True, budget="10h")


def test_budget_choices_are_the_params_used_and_keep_the_floors(small):
    adata = small[0]
    counts = adata.obs["cell_type"].value_counts()
    with pytest.warns(P.OverBudgetWarning, match="cannot be met"):  # below every floor and lever here
        a = _prune(small, budget="1s", max_cells_per_label=40, n_random=40, n_boot=200)
    p = ssw.get.params(a, "prune")
    b = p["budget"]
    assert b["budget_seconds"] == 1.0 and b["reasons"] and not b["feasible"]
    # validity floors: the smallest attainable p stays below alpha; every label keeps 20 cells or all it has
    assert b["n_random"] >= 20 and 1 / (b["n_random"] + 1) < 0.05
    assert b["cells_per_label"] >= 20
    # honoured: the run used exactly the chosen values
    assert (p["n_random"], p["n_boot"], p["max_cells_per_label"], p["max_seq_len"]) == \
        (b["n_random"], b["n_boot"], b["cells_per_label"], b["max_seq_len"])
    assert p["n_cells_evaluated"] == int(np.minimum(counts, b["cells_per_label"]).sum())
    col = ssw.get.collapse(a)
    assert col.loc[col["condition"].str.startswith("random:"), "null_draws"].max() <= b["n_random"]
    # every floor still exceeds 1 s, so the structural levers were pulled, in their order, and used as chosen
    assert b["pulled"] == [x for x in P.LEVER_ORDER if x in b["pulled"]] and b["pulled"][-1] == "max_candidates"
    for k in ("max_candidates", "n_restore", "n_scale", "n_matched", "mean_ablation", "joint", "embed_all",
              "first_order", "draw_embeddings"):
        assert p[k] == b[k], k
    assert b["draw_embeddings"] is False and p["embedding_metrics_judged"] is False  # pulled, and the run says so
    assert set(col.loc[col["condition"].str.startswith("random:"), "metric"]) <= {"gep_mse", "gep_pearson",
                                                                                   "gepc_mse", "gepc_pearson"}
    assert list(p["granularities"]) == list(b["granularities"])
    assert b["max_candidates"] == 1 and p["candidates"] == ["planted"] and not b["embed_all"]
    assert not any(c.startswith(("restore:", "scale:")) for c in col["condition"])  # top's too: every lever pulled
    # obsm only for the evaluated cells (from the conditions already run), NaN rows elsewhere
    nan_rows = np.isnan(a.obsm[K.OBSM_EMB]).any(axis=1)
    assert (~nan_rows).sum() == p["n_cells_evaluated"] and (~np.isnan(a.obsm[K.OBSM_EMB_PRUNED]).any(axis=1)).sum() \
        == p["n_cells_evaluated"]
    # a generous budget changes nothing that was asked for
    big = ssw.get.params(_prune(small, dry_run=True, budget="10h", max_cells_per_label=40), "prune")["budget"]
    assert big["feasible"] and (big["n_random"], big["n_boot"], big["cells_per_label"]) == (20, 20, 40)


def test_bf16_through_tl_prune_ranks_candidates_as_fp32(small):
    ver = {}
    for dt in ("fp32", "bf16"):
        a = _prune(small, dtype=dt, max_cells_per_label=4, n_boot=10)
        assert ssw.get.params(a, "prune")["dtype"] == dt
        v = ssw.get.verdicts(a)
        ver[dt] = v[v["ablation"] == "prune"].set_index("candidate")
    order = {dt: list(v["delta"].abs().sort_values(ascending=False).index) for dt, v in ver.items()}
    assert order["bf16"] == order["fp32"] == ["planted", "null"]
    assert ver["bf16"]["passes"].to_dict() == ver["fp32"]["passes"].to_dict()


def test_pipeline_dry_run_writes_only_run_json_with_plan_and_budget(small, tmp_path):
    adata, model, _ = small
    info = ssw.pipeline.run_pipeline(adata.copy(), model, tmp_path / "run", label_key="cell_type", dry_run=True,
                                     budget="20s", progress=False)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == [K.FILE_RUN]
    run = json.loads((tmp_path / "run" / K.FILE_RUN).read_text())
    assert run["status"] == "dry-run" and info["status"] == "dry-run"
    assert run["plan"]["scan_cells"] > 0 and "scan" in run["plan"]["flops_by_stage"]
    assert run["budget"]["reasons"] and run["budget"]["budget_seconds"] == 20.0
    # the run's every stage is planned, the scan's detection null included, and each lever is recorded
    full = ssw.pipeline.run_pipeline(adata.copy(), model, tmp_path / "full", label_key="cell_type", dry_run=True,
                                     progress=False, yes=True)["plan"]
    assert {"scan", "scan_null", "genes", "first_order", "embed"} <= set(full["flops_by_stage"])
    b = run["budget"]
    assert b["pulled"] == [x for x in P.LEVER_ORDER if x in b["pulled"]]
    if "detection_null" in b["pulled"]:
        assert b["null_k"] == 0 and "scan_null" not in run["plan"]["flops_by_stage"]
        assert run["params"]["max_candidates"] == b["max_candidates"]
    assert run["params"]["budget"] == "20s"
    # the report's cost section is read from the record, never recomputed
    from html import escape

    from scsuperweight.report import _cost

    page = _cost({K.UNS_RUN: run})
    assert "Planned before the work" in page and "Budget 20s" in page
    assert all(escape(r) in page for r in run["budget"]["reasons"])


@pytest.fixture(scope="module")
def cli_dir(small, tmp_path_factory):
    adata, model, _ = small
    d = tmp_path_factory.mktemp("cost_cli")
    save_scgpt(model, d / "model")
    adata.write_h5ad(d / "data.h5ad")
    assert main(["scan", "--model", str(d / "model"), "--data", str(d / "data.h5ad"), "--label-key", "cell_type",
                 "--out", str(d / "out"), "--max-cells", "60", "--screen", "activation", "gradient",
                 "--max-seq-len", "64", "--no-progress"]) == 0
    return d


def test_scan_gradient_screen_from_the_cli(cli_dir):
    sw = pd.read_csv(cli_dir / "out" / K.FILE_SUPERWEIGHTS, sep="\t")
    assert set(sw["screen"]) >= {"gradient"} and "weight_only" not in set(sw["screen"])
    g = sw[sw["screen"] == "gradient"]
    assert (np.diff(g["effect"].abs().to_numpy()) <= 0).all()
    params = json.loads((cli_dir / "out" / K.FILE_RUN).read_text())
    assert params["status"] == "partial"


def _prune_argv(d, *extra):
    return ["prune", "--model", str(d / "model"), "--out", str(d / "out"), "--label-key", "cell_type",
            "--max-cells-per-label", "6", "--n-random", "20", "--n-boot", "20", "--no-progress", *extra]


def test_cli_prune_dry_run_prints_the_plan_and_stops(cli_dir, capsys):
    assert main(_prune_argv(cli_dir, "--dry-run")) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan: ") and "conditions:random" in text and "dry run: nothing computed" in text
    assert not (cli_dir / "out" / K.FILE_COLLAPSE).exists()
    run = json.loads((cli_dir / "out" / K.FILE_RUN).read_text())
    assert run["plan"]["n_cells"] > 0 and run["dry_run_of"] == "prune"


def test_cli_long_plan_exits_2_naming_budget_and_yes(cli_dir, capsys, monkeypatch):
    monkeypatch.setattr(P, "LONG_RUN_SECONDS", 1e-6)
    assert main(_prune_argv(cli_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget" in err and "--yes" in err and "estimated at about" in err
    assert not (cli_dir / "out" / K.FILE_COLLAPSE).exists()


def test_cli_budget_below_the_smallest_run_exits_2_unless_yes(cli_dir, capsys):
    assert main(_prune_argv(cli_dir, "--budget", "1s")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be met" in err and "--yes" in err
    assert not (cli_dir / "out" / K.FILE_COLLAPSE).exists()
    assert main(_prune_argv(cli_dir, "--budget", "1s", "--dry-run")) == 0  # a dry run only prints it
    assert "cannot be met" in capsys.readouterr().out


def test_cli_run_dry_run(cli_dir, capsys):
    out = cli_dir / "dry"
    assert main(["run", "--model", str(cli_dir / "model"), "--data", str(cli_dir / "data.h5ad"), "--label-key",
                 "cell_type", "--out", str(out), "--dry-run", "--no-progress"]) == 0
    assert "plan: " in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [K.FILE_RUN]
    assert json.loads((out / K.FILE_RUN).read_text())["status"] == "dry-run"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cli_device_cuda_on_cpu_torch_is_one_line(cli_dir, capsys):
    assert main(_prune_argv(cli_dir, "--device", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cpu" in err
