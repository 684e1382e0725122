"""Atlas steps: a per-donor folder embedded block by block (resumable, equal to one in-memory pass), samples read
from obs alone, and prune conditions skipped when finished, persisted as they finish, returned in plan order."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from scsuperweight import atlas, tl
from scsuperweight.condstore import ConditionStore, execute, persisting
from scsuperweight.data.sources import open_source
from scsuperweight.datasets import synthetic_ad
from scsuperweight.embedstore import EmbeddingStore
from scsuperweight.results import RunLog


@pytest.fixture(scope="module")
def demo():
    from scsuperweight.loading import load_model

    return load_model("demo")


@pytest.fixture
def donors(tmp_path):
    """32 AD-like cells as per-donor files; each file drops a different tenth of the genes."""
    a = synthetic_ad(n_cells=32, n_donors=4, seed=2)
    rng = np.random.default_rng(0)
    folder = tmp_path / "donors"
    folder.mkdir()
    for d in a.obs["donor"].cat.categories:
        part = a[a.obs["donor"] == d].copy()
        part.uns = {}
        keep = np.sort(rng.choice(part.n_vars, int(0.9 * part.n_vars), replace=False))
        part[:, keep].copy().write_h5ad(folder / f"{d}.h5ad")
    return folder


def test_embed_store_streams_resumes_and_equals_one_pass(donors, demo, tmp_path):
    src = open_source(donors)
    st = atlas.embed_store(donors, demo, tmp_path / "store", block_size=8, batch_size=16, progress=False)
    assert st.n_blocks == 4 and st.pending() == []
    emb = st.read()
    # one in-memory pass over the same cells (genes a file lacks are zeros there): the same embeddings
    whole = atlas.read_sample(src, np.arange(src.n_obs))
    tl.embed(whole, demo, batch_size=16, progress=False)
    np.testing.assert_allclose(emb, whole.obsm["X_scGPT"], atol=2e-5)
    # per-file gene overlap is recorded: every file shares its own genes with the vocab, fewer than it has
    ov = st.gene_overlap
    assert [o["file"] for o in ov] == [f.label for f in src.files] and len(ov) == 4
    assert all(0 < o["n_shared"] <= o["n_genes"] == src.files[i].var.shape[0] for i, o in enumerate(ov))
    # a resume after losing two blocks recomputes just those, bit for bit
    for b in (1, 3):
        (tmp_path / "store" / "done" / f"{b:08d}").unlink()
    log = RunLog(tmp_path / "store", {"command": "embed"})
    again = atlas.embed_store(donors, demo, tmp_path / "store", block_size=8, batch_size=16, progress=False,
                              writer=log.progress)
    np.testing.assert_array_equal(again.read(), emb)
    rec = json.loads((tmp_path / "store" / "run.json").read_text())["progress"]
    assert rec["done"] == rec["total"] == 4 and rec["rate_per_s"] > 0
    out = atlas.finalize_store(again, donors, tmp_path / "emb.h5ad", params={"gene_overlap": ov})
    import anndata as ad

    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.obsm["X_scGPT"], emb)
    assert json.loads(back.uns["ssw"]["params"]["embed"])["gene_overlap"][0]["file"] == ov[0]["file"]


def test_sample_reads_only_the_sampled_cells(donors, monkeypatch):
    src = open_source(donors)
    read_rows = []
    real = type(src)._read

    def spy(self, k, rows):
        read_rows.append(len(rows))
        return real(self, k, rows)

    monkeypatch.setattr(type(src), "_read", spy)
    adata, cells = atlas.sample(src, label_key="cell_type", donor_key="donor", max_per_donor=3, seed=1)
    assert sum(read_rows) == len(cells) == adata.n_obs  # nothing but the sample was read
    per = adata.obs.groupby(["cell_type", "donor"], observed=True).size()
    assert per.max() <= 3 and len(per) > 4
    assert list(adata.obs_names) == list(src.obs_names[cells])
    # each sampled cell's counts are its file's row (union genes; a gene its file lacks is 0)
    for name in adata.obs_names[:5]:
        f = src.obs.loc[name, "ssw_file"]
        row = src.read([int(np.flatnonzero(src.obs_names == name)[0])])[0][1]
        sub = adata[name, list(row.var_names)].X.toarray().ravel()
        np.testing.assert_array_equal(sub, row.X.toarray().ravel())
        assert f in {fl.label for fl in src.files}


@dataclass(frozen=True)
class _Cond:
    name: str
    factor: float


def test_execute_skips_finished_persists_each_and_keeps_plan_order(tmp_path):
    conds = [_Cond(f"c{i}", i / 2) for i in range(7)]
    calls = []

    def run(c):
        calls.append(c.name)
        if len(calls) == 4 and fail[0]:
            raise RuntimeError("killed")
        return {"v": np.full(3, c.factor), "w": np.arange(2) * c.factor}

    fail = [True]
    store = ConditionStore(tmp_path, inputs="h1")
    with persisting(store), pytest.raises(RuntimeError, match="killed"):
        execute(run, conds)
    assert calls == ["c0", "c1", "c2", "c3"]
    fail[0] = False
    calls.clear()
    with persisting(ConditionStore(tmp_path, inputs="h1")):
        got = execute(run, conds)
    assert calls == ["c3", "c4", "c5", "c6"]  # the three finished conditions were not recomputed
    assert list(got) == [c.name for c in conds]  # plan order
    for c in conds:
        np.testing.assert_array_equal(got[c.name]["v"], np.full(3, c.factor))
    # a changed definition under the same name is recomputed; outside `persisting` nothing is stored
    calls.clear()
    with persisting(ConditionStore(tmp_path, inputs="h1")):
        execute(run, [_Cond("c0", 9.0), *conds[1:]])
    assert calls == ["c0"]
    # other inputs (another model or data): nothing is reused
    calls.clear()
    with persisting(ConditionStore(tmp_path, inputs="h2")):
        execute(run, conds)
    assert len(calls) == 7
    before = sorted(p.name for p in (tmp_path / ".conditions").iterdir())
    execute(run, [_Cond("new", 1.0)])
    assert sorted(p.name for p in (tmp_path / ".conditions").iterdir()) == before


def test_embed_store_refuses_a_store_of_other_inputs(donors, demo, tmp_path):
    EmbeddingStore(tmp_path / "s", open_source(donors).obs_names, block_size=32, key="another model")
    with pytest.raises(Exception, match="other inputs"):
        atlas.embed_store(donors, demo, tmp_path / "s", block_size=32, batch_size=16, progress=False)


# -- genes shared per file, for every command ----------------------------------------------------------------
def _planted_genes(folder, demo, bad: bool = False):
    """Per-donor files with planted gene lists: A keeps 600 vocab genes and gets 20 the vocab lacks, B keeps 300
    vocab genes and gets 100 it lacks; with `bad`, C keeps 10 vocab genes and gets 300 it lacks (too few)."""
    a = synthetic_ad(n_cells=60, n_donors=3, seed=1)
    in_vocab = np.flatnonzero([g in demo.vocab for g in a.var_names])
    plan = {"A": (in_vocab[:600], 20), "B": (in_vocab[200:500], 100)}
    if bad:
        plan["C"] = (in_vocab[:10], 300)
    others = np.flatnonzero([g not in demo.vocab for g in a.var_names])
    folder.mkdir(exist_ok=True)
    for (name, (keep, n_extra)), donor in zip(plan.items(), a.obs["donor"].cat.categories, strict=False):
        extra = np.setdiff1d(np.arange(a.n_vars), keep)[:n_extra]  # any genes, renamed so the vocab lacks them
        part = a[a.obs["donor"] == donor][:, np.concatenate([keep, extra])].copy()
        part.var_names = [*part.var_names[:len(keep)], *(f"NOVOCAB{i}" for i in range(n_extra))]
        part.uns = {}
        part.write_h5ad(folder / f"donor{name}.h5ad")
    assert len(others) < 100  # the renamed genes, not the synthetic set, are what the vocab lacks
    return {"donorA": (620, 600), "donorB": (400, 300), "donorC": (310, 10)}


def test_file_overlap_counts_each_file_and_refuses_one_sharing_too_few(demo, tmp_path, caplog):
    want = _planted_genes(tmp_path / "ok", demo)
    rows = atlas.file_overlap(tmp_path / "ok", demo)
    assert [(r["file"], r["n_genes"], r["n_shared"]) for r in rows] == \
        [(f, *want[f]) for f in ("donorA", "donorB")]
    assert [r["n_cells"] for r in rows] == [int((open_source(tmp_path / "ok").obs["ssw_file"] == f).sum())
                                            for f in ("donorA", "donorB")]
    # a sample carries its files' record, so the step after it reports the same counts without the files
    adata, _ = atlas.sample(tmp_path / "ok", label_key="cell_type", max_cells=20, model=demo)
    assert atlas.file_overlap(adata, demo) == rows
    # one file with 10 shared genes (fewer than the tokeniser's 20) is refused before any cell is read
    _planted_genes(tmp_path / "bad", demo, bad=True)
    with pytest.raises(Exception, match=r"donorC: only 10 of 310 genes .* gene_key= .* move this file out"):
        atlas.sample(tmp_path / "bad", label_key="cell_type", max_cells=20, model=demo)
    with pytest.raises(Exception, match="donorC: only 10 of 310"):
        atlas.embed_store(tmp_path / "bad", demo, tmp_path / "store", progress=False)


@pytest.mark.slow  # the CLI's scan and prune in process: ~45 s on a busy 2-core machine
def test_scan_and_prune_record_each_files_genes_in_run_json(demo, tmp_path, capsys):
    import anndata as ad

    from scsuperweight.cli import main

    want = _planted_genes(tmp_path / "donors", demo)
    out, data = tmp_path / "out", str(tmp_path / "donors")
    rc = main(["scan", "--model", "demo", "--data", data, "--label-key", "cell_type", "--max-cells", "30",
               "--null-k", "0", "--out", str(out), "--no-progress"])
    assert rc == 0
    expected = [(f, *want[f]) for f in ("donorA", "donorB")]
    run = json.loads((out / "run.json").read_text())
    assert [(o["file"], o["n_genes"], o["n_shared"]) for o in run["gene_overlap"]] == expected
    rc = main(["prune", "--model", "demo", "--data", data, "--label-key", "cell_type", "--out", str(out),
               "--max-cells-per-label", "4", "--n-random", "2", "--n-boot", "10", "--max-candidates", "1",
               "--granularities", "scalar", "--no-mean-ablation", "--no-joint", "--n-matched", "0",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert [(o["file"], o["n_genes"], o["n_shared"]) for o in run["gene_overlap"]] == expected
    prm = json.loads(ad.read_h5ad(out / "results.h5ad").uns["ssw"]["params"]["prune"])
    assert [(o["file"], o["n_genes"], o["n_shared"]) for o in prm["gene_overlap"]] == expected
    # a folder with a file sharing too few genes: exit 2, one line naming the file and the fix
    _planted_genes(tmp_path / "bad", demo, bad=True)
    rc = main(["scan", "--model", "demo", "--data", str(tmp_path / "bad"), "--label-key", "cell_type",
               "--out", str(tmp_path / "out2"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "donorC: only 10 of 310 genes" in err and "--gene-key" in err and err.count("\n") == 1
