"""The command line on a tiny official-format model and synthetic data: every step writes its file, bad input
gives a one-line reason and a non-zero exit."""

import json

import pandas as pd
import pytest
from _plant import plant_cls_superweight
from test_tl import synthetic_model

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight.cli import build_parser, main
from scsuperweight.models import save_scgpt
from scsuperweight.runners import get_runner


def write_planted_files(d, n_cells: int = 160):
    """`d/model` (a small scGPT with a planted <cls> super weight, official format) and `d/data.h5ad`; the data."""
    adata = ssw.datasets.synthetic_ad(n_cells=n_cells, n_donors=4, seed=3)
    model = synthetic_model(adata, seed=3)
    plain = get_runner(model).prepare(adata, gene_key=None, layer=None, max_seq_len=None, seed=0,
                                      batch_size=32).plain
    plant_cls_superweight(model, plain, 1, 3, 7, magnitude=300.0)
    save_scgpt(model, d / "model")
    adata.write_h5ad(d / "data.h5ad")
    return adata


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_planted_files(d)
    return d


def test_help_has_examples_for_every_command(capsys):
    parser = build_parser()
    cmds = parser._subparsers._group_actions[0].choices
    for name in ("demo", "run", "embed", "scan", "prune", "genes", "enrich", "report", "pretrain", "data"):
        assert name in cmds
        help_text = cmds[name].format_help()
        assert "example" in help_text.lower(), name


def test_run_writes_every_output(files, capsys):
    out = files / "run"
    rc = main(["run", "--model", str(files / "model"), "--data", str(files / "data.h5ad"), "--label-key",
               "cell_type", "--condition-key", "condition", "--donor-key", "donor", "--out", str(out),
               "--max-cells-per-label", "8", "--n-random", "10", "--n-boot", "20", "--no-progress",
               "--n-unit-random", "5", "--n-matched", "5", "--n-joint", "5", "--granularities", "scalar", "neuron"])
    assert rc == 0
    for f in (K.FILE_SUPERWEIGHTS, K.FILE_ACTIVATIONS, K.FILE_COLLAPSE, K.FILE_VERDICTS, K.FILE_GENES,
              K.FILE_ENRICHMENT, K.FILE_RESULTS, K.FILE_REPORT, K.FILE_RUN):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    run = json.loads((out / K.FILE_RUN).read_text())
    assert run["status"] == "done" and run["seed"] == 0 and run["data"]["sha256"]
    assert {"scan", "prune", "genes", "enrich"} <= set(run["timings"])
    text = capsys.readouterr().out
    assert "report:" in text and "prune:L1.linear2.w[3,7]" in text
    # the summary prints each candidate's verdict as verdicts.tsv holds it
    ver = pd.read_csv(out / K.FILE_VERDICTS, sep="\t")
    assert f"pruned candidate(s) pass the controls on {ver['metric'].iloc[0]}" in text
    zero = ver[ver["ablation"] == "prune"]
    for r in zero.head(5).itertuples():
        assert f"prune:{r.candidate}: {r.status} (delta {r.delta:+.3g}" in text
    # and each other ablation's, against its own null; the flags reached prune
    other = ver[ver["ablation"] != "prune"]
    assert {"mean", "neuron"} <= set(other["ablation"]) and "channel" not in set(other["ablation"])
    for r in other.head(12).itertuples():
        assert f"{r.condition}: {r.status} (delta {r.delta:+.3g}" in text
    assert run["params"]["prune_options"]["n_matched"] == 5
    col = pd.read_csv(out / K.FILE_COLLAPSE, sep="\t")
    assert col["condition"].str.startswith("random_neuron:").any() and "p_matched" in col.columns


def test_step_commands(files, capsys):
    out = files / "steps"
    m, d = str(files / "model"), str(files / "data.h5ad")
    assert main(["scan", "--model", m, "--data", d, "--label-key", "cell_type", "--out", str(out),
                 "--no-progress"]) == 0
    assert "L1.linear2.w[3,7]" in capsys.readouterr().out
    assert main(["genes", "--model", m, "--out", str(out), "--max-cells-per-label", "8", "--no-progress"]) == 0
    assert main(["enrich", "--out", str(out), "--permutations", "100"]) == 0
    assert main(["report", "--run", str(out)]) == 0
    assert (out / K.FILE_REPORT).is_file()
    assert main(["embed", "--model", m, "--data", d, "--out", str(out / "e.h5ad"), "--no-progress"]) == 0


@pytest.mark.parametrize("argv, expect", [
    (["run", "--model", "/no/such/model", "--data", "DATA", "--label-key", "cell_type", "--out", "OUT"],
     "model path not found"),
    (["run", "--model", "MODEL", "--data", "/no/such.h5ad", "--label-key", "cell_type", "--out", "OUT"],
     "data file not found"),
    (["run", "--model", "MODEL", "--data", "DATA", "--label-key", "celltype", "--out", "OUT"],
     "not a column of adata.obs"),
    (["prune", "--model", "MODEL", "--data", "DATA", "--label-key", "cell_type", "--out", "OUT"],
     "run ssw.tl.scan first"),
    (["report", "--run", "/no/such/dir"], "run directory not found"),
])
def test_bad_input_one_line(files, capsys, argv, expect):
    argv = [a.replace("MODEL", str(files / "model")).replace("DATA", str(files / "data.h5ad"))
            .replace("OUT", str(files / "bad")) for a in argv]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error:") and expect in err and len(err.splitlines()) == 1
