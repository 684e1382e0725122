"""AnnData face on synthetic AD-like data with a planted <cls> super weight: right answers, and every stored
result survives write_h5ad / read_h5ad and comes back through get.*."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from _plant import plant_cls_superweight

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight.data.tokenize import tokenize_anndata
from scsuperweight.errors import DataError
from scsuperweight.models import ScGPTConfig, ScGPTModel
from scsuperweight.runners import get_runner


def synthetic_model(adata, seed=0, nlayers=3):
    genes = list(adata.var_names)
    vocab = {g: i for i, g in enumerate(genes)}
    n = len(vocab)
    vocab.update({"<pad>": n, "<cls>": n + 1, "<eoc>": n + 2})
    torch.manual_seed(seed)
    cfg = ScGPTConfig(ntoken=len(vocab), d_model=32, nhead=4, d_hid=64, nlayers=nlayers, dropout=0.0, pad_token_id=n)
    return ScGPTModel(cfg, vocab=vocab, args={"nheads": 4, "max_seq_len": 128}).eval()


@pytest.fixture(scope="module")
def run():
    adata = ssw.datasets.synthetic_ad(n_cells=240, n_donors=4, seed=1)
    model = synthetic_model(adata)
    plain = get_runner(model).prepare(adata, gene_key=None, layer=None, max_seq_len=None, seed=0,
                                      batch_size=32).plain
    plant_cls_superweight(model, plain, 2, 5, 11, magnitude=300.0)
    ssw.tl.embed(adata, model, progress=False)
    ssw.tl.scan(adata, model, label_key="cell_type", max_cells=120, progress=False)
    ssw.tl.prune(adata, model, label_key="cell_type", condition_key="condition", donor_key="donor",
                 max_cells_per_label=12, n_random=10, n_boot=30, progress=False)
    ssw.tl.genes(adata, model, label_key="cell_type", max_cells_per_label=12, progress=False)
    ssw.tl.enrich(adata, gene_sets=["bundled"], permutations=100, progress=False)
    return adata, model


def test_embed_matches_primitive(run):
    adata, model = run
    emb = adata.obsm[K.OBSM_EMB]
    assert emb.shape == (adata.n_obs, 32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    tok = tokenize_anndata(adata, model.vocab, n_bins=model.config.n_bins, max_seq_len=128,
                           pad_value=model.config.pad_value, seed=0)
    from scsuperweight.runners.scgpt import embed

    assert np.allclose(embed(model, tok), emb, atol=1e-5)


def test_scan_finds_plant(run):
    adata, _ = run
    sw = ssw.get.superweights(adata)
    top = sw.iloc[0]
    assert (top["kind"], top["layer"], top["row"], top["col"], top["token"]) == ("ffn_down", 2, 5, 11, "<cls>")
    assert "weight_only" in set(sw["screen"])  # the weight-only screen rows come after, flagged
    assert list(sw.columns[: len(K.SUPERWEIGHT_COLUMNS)]) == K.SUPERWEIGHT_COLUMNS
    act = ssw.get.activations(adata)
    assert list(act.columns[: len(K.ACTIVATION_COLUMNS)]) == K.ACTIVATION_COLUMNS
    assert ssw.get.params(adata, "scan")["min_ratio"] == 20.0
    # per-cell-type stability was recorded for the spike
    assert "microglia" in top["stability_by_group"]


def test_prune_writes_table_and_embeddings(run):
    adata, _ = run
    col = ssw.get.collapse(adata)
    t = col[(col["group"] == "all") & (col["metric"] == "cls_cosine_to_baseline")].set_index("condition")
    assert t.loc["prune:L2.linear2.w[5,11]", "delta"] < -0.3
    assert adata.obsm[K.OBSM_EMB_PRUNED].shape == adata.obsm[K.OBSM_EMB].shape
    assert not np.allclose(adata.obsm[K.OBSM_EMB_PRUNED], adata.obsm[K.OBSM_EMB])
    assert ssw.get.params(adata, "prune")["pruned_embedding_of"] == "L2.linear2.w[5,11]"
    assert len(ssw.get.contrasts(adata))


def test_genes_and_enrichment(run):
    adata, _ = run
    g = ssw.get.genes(adata)
    assert list(g.columns[:4]) == K.GENE_COLUMNS
    assert (g.groupby("candidate")["rank"].min() == 1).all()
    assert {"act_mean", "recon_delta", "emb_alignment"} <= set(g.columns)
    assert any(c.startswith("act_mean:") for c in g.columns)
    e = ssw.get.enrichment(adata)
    assert set(K.ENRICHMENT_COLUMNS) <= set(e.columns)
    assert set(e["method"]) == {"prerank", "ora"}


def test_h5ad_round_trip(run, tmp_path):
    adata, _ = run
    p = tmp_path / "r.h5ad"
    adata.write_h5ad(p)
    back = ad.read_h5ad(p)
    for fn in (ssw.get.superweights, ssw.get.activations, ssw.get.collapse, ssw.get.contrasts, ssw.get.genes,
               ssw.get.enrichment):
        pd.testing.assert_frame_equal(fn(adata), fn(back), check_dtype=False)
    assert ssw.get.params(back) == ssw.get.params(adata)
    assert np.array_equal(back.obsm[K.OBSM_EMB_PRUNED], adata.obsm[K.OBSM_EMB_PRUNED])


def test_clear_errors(run):
    adata, model = run
    with pytest.raises(DataError, match="not a column of adata.obs"):
        ssw.tl.prune(adata, model, label_key="celltype", progress=False)
    fresh = ssw.datasets.synthetic_ad(n_cells=50, seed=2)
    with pytest.raises(DataError, match="run ssw.tl.scan first"):
        ssw.tl.prune(fresh, model, label_key="cell_type", progress=False)
    with pytest.raises(DataError, match="run ssw.tl.scan"):
        ssw.get.superweights(fresh)
    logn = fresh.copy()
    logn.X = np.log1p(logn.X.toarray())
    with pytest.raises(DataError, match="layer="):
        ssw.tl.embed(logn, model, progress=False)


def test_cells_without_vocab_counts_error_drop_or_keep(run):
    # issue 16: cells with no counts in any vocab gene are refused with the fix, or left out / kept with NaN
    # embeddings and an obs mask, counted in the params
    _, model = run
    adata = ssw.datasets.synthetic_ad(n_cells=40, seed=4)
    X = adata.X.toarray()
    X[[3, 17]] = 0
    adata.X = X
    with pytest.raises(DataError, match=r"2 of 40 cells have no counts in any vocab gene.*--empty drop\|keep"):
        ssw.tl.embed(adata, model, progress=False)
    assert K.OBSM_EMB not in adata.obsm
    ref = ssw.tl.embed(adata[np.setdiff1d(np.arange(40), [3, 17])].copy(), model, progress=False, copy=True)
    for policy in ("drop", "keep"):
        out = ssw.tl.embed(adata, model, empty=policy, progress=False, copy=True)
        emb = out.obsm[K.OBSM_EMB]
        assert np.isnan(emb[[3, 17]]).all() and not np.isnan(np.delete(emb, [3, 17], axis=0)).any()
        np.testing.assert_allclose(np.delete(emb, [3, 17], axis=0), ref.obsm[K.OBSM_EMB], atol=1e-5)
        assert out.obs[K.OBS_EMPTY].to_numpy().nonzero()[0].tolist() == [3, 17]
        assert ssw.get.params(out, "embed")["n_empty"] == 2 and ssw.get.params(out, "embed")["empty"] == policy
    # a scan with empty="drop" never evaluates them
    out = ssw.tl.scan(adata, model, label_key="cell_type", empty="drop", progress=False, copy=True)
    assert ssw.get.params(out, "scan")["n_empty"] == 2 and ssw.get.params(out, "scan")["n_cells_scanned"] == 38
