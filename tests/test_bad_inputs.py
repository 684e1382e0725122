"""The bad-input table (issue 16, req 5): each row runs the CLI in-process on one bad or awkward input and asserts
exit 2, exactly one line on stderr, no traceback, and that nothing was left that looks like a finished output
(no results.h5ad, report.html, collapse.tsv or output .h5ad; a run.json only if it says the run failed).

Every broken checkpoint and data file is built once per module, and every check fails before a forward pass, so
a row costs milliseconds to a few hundred (the model loads that find a broken checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tl import synthetic_model

import scsuperweight as ssw
from scsuperweight import results as R
from scsuperweight.cli import main
from scsuperweight.errors import OptionError, SSWError
from scsuperweight.models import save_scgpt

COMPLETE = {R.RESULTS.file, R.REPORT.file, R.spec("collapse").file}


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _broken_model(src: Path, dst: Path, how) -> str:
    shutil.copytree(src, dst)
    how(dst)
    return str(dst)


def _nan_weight(d: Path) -> None:
    state = torch.load(d / "best_model.pt", weights_only=True)
    key = next(k for k in state if k.endswith("linear2.weight"))
    state[key][0, 0] = float("nan")
    torch.save(state, d / "best_model.pt")


def _vocab_beyond(d: Path) -> None:
    vocab = json.loads((d / "vocab.json").read_text())
    vocab[next(iter(vocab))] = 10_000
    (d / "vocab.json").write_text(json.dumps(vocab))


def _vocab_duplicate(d: Path) -> None:
    vocab = json.loads((d / "vocab.json").read_text())
    a, b = list(vocab)[:2]
    vocab[b] = vocab[a]
    (d / "vocab.json").write_text(json.dumps(vocab))


def _bert_more_layers(d: Path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    d.rmdir() if d.is_dir() and not any(d.iterdir()) else None
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32)
    BertForMaskedLM(cfg).save_pretrained(d)
    _edit_json(d / "config.json", num_hidden_layers=3)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = tmp_path_factory.mktemp("bad")
    adata = ssw.datasets.synthetic_ad(n_cells=60, n_donors=4, seed=3)
    model = synthetic_model(adata, seed=3)
    good = save_scgpt(model, d / "model")
    adata.write_h5ad(d / "data.h5ad")
    p = {"model": str(good), "data": str(d / "data.h5ad"), "dir": str(d)}

    def variant(name, change):
        a = adata.copy()
        change(a)
        a.write_h5ad(d / f"{name}.h5ad")
        p[name] = str(d / f"{name}.h5ad")

    variant("data_cd", lambda a: a.obs.__setitem__("condition", a.obs["condition"].map(
        {"AD": "disease", "control": "control"}).astype("category")))
    variant("data_xy", lambda a: a.obs.__setitem__("condition", a.obs["condition"].map(
        {"AD": "x", "control": "y"}).astype("category")))
    variant("data_one_level", lambda a: a.obs.__setitem__("condition", "AD"))
    variant("data_nan_label", lambda a: a.obs.__setitem__("cell_type", a.obs["cell_type"].astype(object).where(
        np.arange(a.n_obs) != 4, None)))

    def no_vocab_genes(a):
        X = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
        X[:3] = 0
        a.X = X

    variant("data_empty_cells", no_vocab_genes)
    # per-donor files, one of which shares only 5 genes with the vocab (the others renamed)
    (d / "donors_few").mkdir()
    for donor in ("D01", "D02"):
        part = adata[adata.obs["donor"] == donor].copy()
        part.uns = {}
        if donor == "D02":
            part.var_names = [*part.var_names[:5], *(f"NOVOCAB{i}" for i in range(part.n_vars - 5))]
        part.write_h5ad(d / "donors_few" / f"{donor}.h5ad")
    p["donors_few"] = str(d / "donors_few")
    adata[:10].copy().write_h5ad(d / "data_tiny.h5ad")
    p["data_tiny"] = str(d / "data_tiny.h5ad")
    (d / "data.csv").write_text("cell,gene\n")
    p["csv"] = str(d / "data.csv")
    (d / "corrupt.h5ad").write_bytes(b"not an hdf5 file at all")
    p["corrupt"] = str(d / "corrupt.h5ad")

    p["nan_model"] = _broken_model(good, d / "nan_model", _nan_weight)
    p["dup_vocab"] = _broken_model(good, d / "dup_vocab", _vocab_duplicate)
    p["beyond_vocab"] = _broken_model(good, d / "beyond_vocab", _vocab_beyond)
    p["nheads_eight"] = _broken_model(good, d / "nheads_eight", lambda m: _edit_json(m / "args.json", nheads="eight"))
    p["bad_vocab_json"] = _broken_model(good, d / "bad_vocab_json",
                                        lambda m: (m / "vocab.json").write_text('{"G0": 0,'))
    p["no_weights"] = _broken_model(good, d / "no_weights", lambda m: (m / "best_model.pt").unlink())
    _bert_more_layers(d / "bert3")
    p["bert3"] = str(d / "bert3")
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "notes.txt").write_text("hello")
    p["not_a_model"] = str(d / "not_a_model")

    (d / "sets_bad.gmt").write_text("just one field\n")
    p["bad_gmt"] = str(d / "sets_bad.gmt")
    (d / "a_file").write_text("x")
    p["a_file"] = str(d / "a_file")
    (d / "a_dir").mkdir()
    p["a_dir"] = str(d / "a_dir")
    prior = d / "prior_run"
    prior.mkdir()
    (prior / R.RUN.file).write_text(json.dumps({"status": "done", "run_id": "r-earlier"}))
    (prior / R.spec("superweights").file).write_text("candidate\n")
    p["prior_run"] = str(prior)
    return p


RUN = ["run", "--model", "{model}", "--data", "{data}", "--label-key", "cell_type", "--condition-key", "condition",
       "--donor-key", "donor", "--out", "{out}", "--no-progress"]


def run_with(**changes) -> list[str]:
    """The good `run` command line with options replaced (value None drops the option)."""
    argv = list(RUN)
    for opt, value in changes.items():
        flag = "--" + opt.replace("_", "-")
        if flag in argv:
            i = argv.index(flag)
            if value is None:
                del argv[i:i + 2]
            else:
                argv[i + 1] = value
        elif value is not None:
            argv += [flag, *([value] if isinstance(value, str) else value)]
    return argv


EMBED = ["embed", "--model", "{model}", "--data", "{data}", "--out", "{out}/emb.h5ad", "--no-progress"]
SCAN = ["scan", "--model", "{model}", "--data", "{data}", "--label-key", "cell_type", "--out", "{out}",
        "--no-progress"]
PRUNE = ["prune", "--model", "{model}", "--data", "{data}", "--label-key", "cell_type", "--condition-key",
         "condition", "--out", "{out}", "--no-progress"]

CASES = [
    # ---- checkpoints (issue examples first)
    ("config layers vs weights", run_with(model="{bert3}"), "does not match its config.json"),
    ("NaN weight", run_with(model="{nan_model}"), "non-finite"),
    ("duplicate vocab ids", run_with(model="{dup_vocab}"), "same id"),
    ("vocab id beyond the embedding", run_with(model="{beyond_vocab}"), "outside the gene embedding"),
    ("nheads 'eight'", run_with(model="{nheads_eight}"), "field 'nheads'"),
    ("model path missing", run_with(model="{dir}/no_such_model"), "model path not found"),
    ("model path is a file", run_with(model="{a_file}"), "is a file"),
    ("model dir of something else", run_with(model="{not_a_model}"), "neither an official scGPT"),
    ("vocab.json malformed", run_with(model="{bad_vocab_json}"), "vocab.json"),
    ("weights file missing", run_with(model="{no_weights}"), "best_model.pt"),
    ("embed: NaN weight", EMBED[:2] + ["{nan_model}"] + EMBED[3:], "non-finite"),
    # ---- data files
    ("data file missing", run_with(data="{dir}/nope.h5ad"), "data file not found"),
    ("data is a folder without .h5ad files", run_with(data="{a_dir}"), "matches no .h5ad file"),
    ("data not .h5ad", run_with(data="{csv}"), "not an .h5ad"),
    ("data corrupt", run_with(data="{corrupt}"), "could not be read as AnnData"),
    ("embed: data missing", EMBED[:4] + ["{dir}/nope.h5ad"] + EMBED[5:], "data file not found"),
    # ---- obs keys and levels
    ("label key typo", run_with(label_key="celltype"), "not a column of adata.obs"),
    ("condition key missing", run_with(condition_key="diagnosis"), "--condition-key 'diagnosis'"),
    ("donor key missing", run_with(donor_key="Donor ID"), "--donor-key 'Donor ID'"),
    ("label with a missing value", run_with(data="{data_nan_label}"), "missing values"),
    ("x/y levels without --case", run_with(data="{data_xy}"), "cannot tell which condition level"),
    ("x/y levels, --control only of 3", run_with(data="{data_xy}", control="z"), "--control 'z' is not a condition"),
    ("--case not a level", run_with(data="{data_cd}", case="AD"), "not a condition level"),
    ("--case equals --control", run_with(case="AD", control="AD"), "both 'AD'"),
    ("--case without --condition-key", run_with(condition_key=None, case="AD"), "without --condition-key"),
    ("one condition level", run_with(data="{data_one_level}"), "needs two"),
    ("prune: x/y levels without --case", [*PRUNE[:4], "{data_xy}", *PRUNE[5:]], "cannot tell which"),
    ("too few cells in the data", run_with(data="{data_tiny}"), "too few cells"),
    ("too few cells per label", run_with(max_cells_per_label="2"), "too few cells"),
    ("no vocab genes without --empty", EMBED[:4] + ["{data_empty_cells}"] + EMBED[5:], "--empty drop|keep"),
    ("run: no vocab genes without --empty", run_with(data="{data_empty_cells}"), "--empty drop|keep"),
    ("run: a donor file sharing 5 genes with the vocab", run_with(data="{donors_few}"), "D02: only 5 of"),
    ("scan: a donor file sharing 5 genes", [*SCAN[:4], "{donors_few}", *SCAN[5:]], "move this file out"),
    ("embed: a donor file sharing 5 genes", [*EMBED[:4], "{donors_few}", *EMBED[5:]], "D02: only 5 of"),
    # ---- gene sets
    ("GMT typo", run_with(gene_sets=["bundled", "{dir}/hallmark.gtm"]), "hallmark.gtm"),
    ("GMT malformed", run_with(gene_sets=["{bad_gmt}"]), "sets_bad.gmt"),
    # ---- numeric options
    ("--max-candidates 0", run_with(max_candidates="0"), "--max-candidates"),
    ("--max-cells-per-label 0", run_with(max_cells_per_label="0"), "--max-cells-per-label"),
    ("--n-random 0", run_with(n_random="0"), "--n-random"),
    ("--n-random -2", run_with(n_random="-2"), "--n-random"),
    ("--n-boot 0", run_with(n_boot="0"), "--n-boot"),
    ("--batch-size 0", run_with(batch_size="0"), "--batch-size"),
    ("--seed -1", run_with(seed="-1"), "--seed"),
    ("--max-candidates abc", run_with(max_candidates="abc"), "invalid int value"),
    ("unknown option", run_with(frobnicate="1"), "unrecognized arguments"),
    ("--empty bogus", run_with(empty="sometimes"), "invalid choice"),
    ("scan --max-cells 0", [*SCAN, "--max-cells", "0"], "--max-cells"),
    ("scan --min-ratio 0", [*SCAN, "--min-ratio", "0"], "--min-ratio"),
    ("genes --max-cells-per-label 0", ["genes", "--model", "{model}", "--data", "{data}", "--out", "{out}",
                                       "--max-cells-per-label", "0"], "--max-cells-per-label"),
    ("enrich --permutations 0", ["enrich", "--data", "{data}", "--out", "{out}", "--permutations", "0"],
     "--permutations"),
    # ---- outputs
    ("--out is an existing file", run_with(out="{a_file}"), "is an existing file"),
    ("--out under a file", run_with(out="{a_file}/sub"), "is a file, so no directory"),
    ("--out holds an earlier run", run_with(out="{prior_run}"), "already holds run r-earlier"),
    # (a directory as embed --out is a resumable store now, not an error)
    ("embed --out is an existing file", EMBED[:6] + ["{a_file}"] + EMBED[7:], "File exists"),
    ("embed --block-size 0", EMBED[:6] + ["{out}/store"] + EMBED[7:] + ["--block-size", "0"],
     "block_size must be >= 1"),
    ("--out where nothing can be created", run_with(out="/proc/ssw_cannot/out"), "/proc/ssw_cannot"),
    # ---- device
    ("--device cuda on CPU torch", run_with(device="cuda"), "--device 'cuda'"),
    ("--device nonsense", run_with(device="tpu9"), "--device 'tpu9'"),
    # ---- steps out of order
    ("prune before scan", PRUNE, "run ssw.tl.scan first"),
    ("report of a missing run", ["report", "--run", "{dir}/no_run"], "run directory not found"),
]


def _snapshot(path: Path) -> dict:
    if path.is_file():
        return {path: path.stat().st_mtime_ns}
    if not path.is_dir():
        return {}
    return {f: f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()}


@pytest.mark.parametrize(("name", "argv", "expect"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(env, tmp_path, capsys, name, argv, expect):
    if name == "--device cuda on CPU torch" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    argv = [a.format(out=out, **env) for a in argv]
    watched = [Path(a) for a in argv if a.startswith((str(tmp_path), env["dir"]))]
    before = {p: _snapshot(p) for p in watched}
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expect in lines[0], lines[0]
    # nothing new or changed that looks finished: no results.h5ad, report.html, collapse.tsv, output .h5ad
    for p in watched:
        now = _snapshot(p)
        changed = [f for f, t in now.items() if before[p].get(f) != t]
        for f in changed:
            assert f.name not in COMPLETE and not (f.suffix == ".h5ad" and "out" in f.parts), f
            if f.name == R.RUN.file:
                assert json.loads(f.read_text())["status"] == "failed", f


def test_the_table_is_long_enough():
    assert len(CASES) >= 40


def test_tl_embed_with_no_model_names_the_fix():
    adata = ssw.datasets.synthetic_ad(n_cells=30, seed=0)
    with pytest.raises(OptionError, match=r"model is None; pass a loaded model, e\.g\. model=ssw\.load_model") as info:
        ssw.tl.embed(adata, None)
    assert "\n" not in str(info.value)
    assert "X_scGPT" not in adata.obsm


@pytest.mark.parametrize(("call", "expect"), [
    (lambda a: ssw.tl.prune(a, None, label_key="cell_type"), "model is None"),
    (lambda a: ssw.tl.scan(a, "demo", label_key="celltype"), "not a column of adata.obs"),
    (lambda a: ssw.tl.prune(a, "demo", label_key="cell_type", condition_key="condition", max_candidates=0),
     "max_candidates"),
    (lambda a: ssw.tl.prune(a, "demo", label_key="cell_type", condition_key="condition", case="nope"),
     "not a condition level"),
    (lambda a: ssw.tl.embed(a, "demo", batch_size=0), "batch_size"),
    (lambda a: ssw.tl.embed(a, "demo", empty="sometimes"), "empty="),
    (lambda a: ssw.tl.genes(a, "demo", max_cells_per_label=0), "max_cells_per_label"),
])
def test_tl_checks_before_computing(call, expect):
    adata = ssw.datasets.synthetic_ad(n_cells=30, seed=0)
    with pytest.raises(SSWError, match=expect) as info:
        call(adata)
    assert "\n" not in str(info.value)
