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
