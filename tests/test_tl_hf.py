"""The AnnData face and the whole pipeline on a transformers masked LM: a tiny Geneformer-like BertForMaskedLM with a
planted super weight, over real cells (Darmanis 2015) read through a token dictionary and gene medians made here.

The output directory must hold every DESIGN.md file with the same contract columns as an scGPT run, the planted
scalar ranked first at its exact coordinates, the control conditions in collapse.tsv with the masked-LM metrics,
genes named by symbol, and a report with every section.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from test_hf import plant_first_token, tiny_llama
from transformers import BertConfig, BertForMaskedLM, BertModel

from scsuperweight import _keys as K
from scsuperweight import get, tl
from scsuperweight.adapters import get_adapter
from scsuperweight.data.geneformer import geneformer_batches, tokenize_geneformer
from scsuperweight.errors import DataError
from scsuperweight.pipeline import run_pipeline
from scsuperweight.runners import get_runner

DARMANIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "darmanis2015_GSE67835.h5ad"
LAYER, ROW, HIDDEN = 0, 6, 40  # the planted super weight: bert.encoder.layer.0.output.dense.weight[6, 40]
PARAM = f"bert.encoder.layer.{LAYER}.output.dense.weight"
N_GENES, INPUT_SIZE = 2000, 96


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: threads cost more than they save
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def cells():
    """About 120 Darmanis cells, stratified by cell type, with made-up Ensembl IDs and Geneformer dictionaries."""
    if not DARMANIS.is_file():
        pytest.skip(f"the real-cell test needs {DARMANIS} (the shared data folder beside the repo)")
    full = ad.read_h5ad(DARMANIS)
    labels = full.obs["cell_type"].astype(str).to_numpy()
    adata = full[tl.stratified_subsample(labels, full.n_obs, 14, seed=0)].copy()
    X = sp.csc_matrix(adata.X)
    n_expr = np.diff(X.indptr)
    genes = np.flatnonzero(n_expr >= 5)
    genes = genes[np.argsort(-n_expr[genes], kind="stable")][:N_GENES]
    fake = np.array([f"ENSG{i:011d}" for i in range(adata.n_vars)])  # symbol -> made-up Ensembl-style ID
    adata.var["ensembl_id"] = fake
    vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{fake[g]: 4 + i for i, g in enumerate(genes)}}
    norm = sp.csc_matrix(sp.diags(10_000 / np.asarray(adata.X.sum(1)).ravel()) @ adata.X)
    medians = {fake[g]: float(np.median(norm.data[norm.indptr[g]:norm.indptr[g + 1]])) for g in genes}
    return adata, vocab, medians


@torch.no_grad()
def plant_attention_sink(model, head: int = 0, strength: float = 4.0) -> None:
    """Give the planted super activation a job: the unit fires on <cls> only (sharpened, GELU(<= -10) ~ 0 on every
    gene), and one head of the next block attends to wherever channel `ROW` is large, which is then <cls> (an
    attention sink, the role massive activations play in trained transformers). Zeroing the scalar frees the head,
    so the genes' states, and the cells' mean embeddings, move; putting the activation back at <cls> undoes it."""
    block = model.bert.encoder.layer[LAYER]
    block.intermediate.dense.weight[HIDDEN] *= 5
    block.intermediate.dense.bias[HIDDEN] *= 5
    block.output.dense.weight[ROW, HIDDEN] /= 5
    att = model.bert.encoder.layer[LAYER + 1].attention.self
    hd = att.attention_head_size
    rows = slice(head * hd, (head + 1) * hd)
    u = torch.full((hd,), strength / hd ** 0.5)
    att.key.weight[rows] = 0.0
    att.key.weight[rows, ROW] = u  # key of a token = its (normalised) channel ROW along u
    att.key.bias[rows] = 0.0
    att.query.weight[rows] = 0.0
    att.query.bias[rows] = u  # every query looks along u


def geneformer_like(vocab: dict, seed: int = 7, head: bool = True):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=INPUT_SIZE, pad_token_id=0)
    return (BertForMaskedLM(cfg) if head else BertModel(cfg)).eval()


@pytest.fixture(scope="module")
def run(cells, tmp_path_factory):
    """The whole pipeline once, on the planted model; the token dictionary as a JSON file, the medians as a dict."""
    adata, vocab, medians = cells
    adata = adata.copy()
    model = geneformer_like(vocab)
    tok = tokenize_geneformer(adata, vocab, medians, model=model)
    get_adapter(model).id_to_token = tok.token_names
    plant_first_token(model, geneformer_batches(tok, batch_size=32), LAYER, ROW, HIDDEN)
    plant_attention_sink(model)
    out = tmp_path_factory.mktemp("bert_run")
    (out.parent / "token_dictionary.json").write_text(json.dumps(vocab))
    get_adapter(model).id_to_token = None  # the pipeline must name the tokens itself
    info = run_pipeline(adata, model, out, label_key="cell_type", token_dictionary=out.parent /
                        "token_dictionary.json", gene_medians=medians, batch_size=32, max_cells_per_label=14,
                        n_random=5, n_boot=50, permutations=100, sequential=False, progress=False,
                        # 5 draws cannot give p < 0.05, so the default (characterise passing candidates only) would
                        # skip restore and scaling; this run checks that every control kind works for this family
                        prune_options={"characterise": "all"})
    return out, info, adata, model


def _tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", keep_default_na=True)


def test_pipeline_writes_every_design_file(run):
    out, info, adata, _ = run
    for f in (K.FILE_SUPERWEIGHTS, K.FILE_ACTIVATIONS, K.FILE_COLLAPSE, K.FILE_GENES, K.FILE_ENRICHMENT,
              K.FILE_RESULTS, K.FILE_REPORT, K.FILE_RUN):
        assert (out / f).is_file(), f
    run_json = json.loads((out / K.FILE_RUN).read_text())
    assert run_json["status"] == "done" and info["status"] == "done"
    assert run_json["model"]["family"] == "bert" and run_json["model"]["d_model"] == 32
    assert run_json["params"]["token_dictionary"].endswith("token_dictionary.json")
    assert run_json["params"]["gene_medians"].startswith("<dict of")  # the dictionary itself is never dumped
    assert run_json["params"]["primary_metric"] == "mlm_loss"
    assert list(_tsv(out / K.FILE_ACTIVATIONS).columns[:len(K.ACTIVATION_COLUMNS)]) == K.ACTIVATION_COLUMNS
    assert list(_tsv(out / K.FILE_ENRICHMENT).columns[:8]) == K.ENRICHMENT_COLUMNS


def test_superweights_rank_the_planted_scalar_first(run, tiny_scgpt_columns):
    out, *_ = run
    sw = _tsv(out / K.FILE_SUPERWEIGHTS)
    assert list(sw.columns[:len(K.SUPERWEIGHT_COLUMNS)]) == K.SUPERWEIGHT_COLUMNS
    assert list(sw.columns) == [*tiny_scgpt_columns, "run_id"]  # the same table as from scGPT, column for column,
    # then the run id every written table carries
    top = sw.iloc[0]
    assert (top["kind"], top["layer"], top["param"], top["row"], top["col"]) == (K.KIND_FFN_DOWN, LAYER, PARAM,
                                                                                   ROW, HIDDEN)
    assert top["candidate"] == f"L{LAYER}.output.dense.w[{ROW},{HIDDEN}]"
    assert top["token"] == "<cls>" and top["stability"] == 1.0 and top["spike_ratio"] > 20
    act = _tsv(out / K.FILE_ACTIVATIONS)
    ffn = act[act["site_name"] == f"L{LAYER}.ffn_out"].iloc[0]
    assert (ffn["channel"], ffn["token"]) == (ROW, "<cls>")


def test_collapse_has_every_control_and_the_masked_lm_metrics(run):
    out, _, _, model = run
    col = _tsv(out / K.FILE_COLLAPSE)
    assert list(col.columns[:len(K.COLLAPSE_COLUMNS)]) == K.COLLAPSE_COLUMNS
    top = _tsv(out / K.FILE_SUPERWEIGHTS).iloc[0]["candidate"]
    conds = set(col["condition"])
    assert {K.COND_BASELINE, K.cond_prune(top), K.COND_TOP_OUTLIERS, K.cond_restore(top),
            K.cond_scale(top, 0.0), K.cond_scale(top, 3.0)} <= conds
    rand_conds = set(col.loc[col["condition"].str.startswith("random:"), "condition"])
    assert len(rand_conds) >= 5 and len(rand_conds) % 5 == 0  # 5 draws per edited parameter
    same_matrix = set(col.loc[col["control_for"] == PARAM, "condition"])
    assert len(same_matrix) == 5 and same_matrix <= rand_conds
    assert {"mlm_loss", "mlm_accuracy", "cls_cosine_to_baseline", "knn_accuracy", "effective_rank"} <= set(
        col["metric"])
    assert not any(m.startswith("gep") for m in col["metric"])  # scGPT's decoders do not exist here
    assert set(col["group"]) >= {K.GROUP_ALL, "neurons", "astrocytes"}

    def delta(cond: str, metric: str) -> float:
        r = col[(col["condition"] == cond) & (col["metric"] == metric) & (col["group"] == K.GROUP_ALL)]
        return float(r["delta"].iloc[0])

    # zeroing the planted scalar moves the cell embeddings far more than any random scalar of its matrix (a
    # random-init model predicts almost uniformly, so the embedding, not the loss, shows it)
    rand = [delta(c, "cls_cosine_to_baseline") for c in same_matrix]
    cut = delta(K.cond_prune(top), "cls_cosine_to_baseline")
    assert cut < 0 and abs(cut) > 20 * max(abs(d) for d in rand)
    assert delta(K.cond_scale(top, 0.0), "cls_cosine_to_baseline") == cut
    assert delta(K.cond_scale(top, 1.0), "cls_cosine_to_baseline") == 0.0
    # the planted unit fires on <cls> only: putting its activation back there undoes the cut
    assert abs(delta(K.cond_restore(top), "cls_cosine_to_baseline")) < 0.05 * abs(cut)
    p = col[(col["condition"] == K.cond_prune(top)) & (col["group"] == K.GROUP_ALL)]
    assert p["p_value"].notna().any()
    res = ad.read_h5ad(out / K.FILE_RESULTS)
    params = get.params(res, "prune")
    assert params["primary_metric"] == "mlm_loss" and params["family"] == "bert" and params["mask_ratio"] == 0.15
    assert res.obsm[K.OBSM_EMB].shape == res.obsm[K.OBSM_EMB_PRUNED].shape == (res.n_obs, 32)
    assert np.allclose(np.linalg.norm(res.obsm[K.OBSM_EMB], axis=1), 1.0, atol=1e-5)


def test_genes_are_symbols_with_masked_lm_evidence(run):
    out, _, adata, _ = run
    g = _tsv(out / K.FILE_GENES)
    assert list(g.columns[:len(K.GENE_COLUMNS)]) == K.GENE_COLUMNS
    assert {"act_mean", "recon_delta", "emb_alignment", "act_mean:neurons", "recon_delta:neurons"} <= set(g.columns)
    top = _tsv(out / K.FILE_SUPERWEIGHTS).iloc[0]["candidate"]
    mine = g[g["candidate"] == top]
    assert len(mine) > 100 and set(mine["gene"]) <= set(adata.var_names)  # symbols, never token ids or specials
    assert mine["rank"].tolist() == list(range(1, len(mine) + 1))
    assert mine["score"].is_monotonic_decreasing
    for c in ("act_mean", "recon_delta", "emb_alignment"):
        assert mine[c].notna().mean() > 0.5, c
    assert (mine["channel"] == ROW).all()


def test_report_renders_every_section_from_the_bert_run(run):
    out, *_ = run
    html = (out / K.FILE_REPORT).read_text()
    for section in ("summary", "hypotheses", "figures", "tables", "caveats", "provenance"):
        assert f"<section id='{section}'>" in html, section
    assert PARAM in html and "<cls>" in html
    assert "(<code>mlm_loss</code>, all cells)" in html  # judged on the masked-LM loss, as recorded by prune
    assert "Zeroing ffn_down L0[6, 40] (<code>L0.output.dense.w[6,40]</code>)" in html  # judged, by its name
    assert "<img" in html and "data:image/png;base64" in html


def test_steps_remember_the_dictionaries_and_missing_ones_fail_clearly(cells, run):
    adata, vocab, medians = cells
    _, _, _, model = run
    sub = adata[:20].copy()
    tl.embed(sub, model, batch_size=16, progress=False)  # remembered from the pipeline run on this model
    assert sub.obsm[K.OBSM_EMB].shape == (20, 32)
    fresh = geneformer_like(vocab, seed=1)
    with pytest.raises(DataError, match="token_dictionary=.*gene_medians="):
        tl.scan(sub, fresh, progress=False)
    with pytest.raises(DataError, match="without gene_medians"):
        tl.embed(sub, fresh, token_dictionary=vocab)
    tl.scan(sub, fresh, mode="data_free", weight_only=False, progress=False)  # no cells, no dictionaries needed
    assert get.params(sub, "scan")["mode"] == "data_free" and get.params(sub, "scan")["n_cells_scanned"] == 1
    with pytest.raises(DataError, match="scGPT and BERT-family"):
        tl.embed(sub, tiny_llama(), token_dictionary=vocab, gene_medians=medians)
    with pytest.raises(DataError, match="masked-LM head"):
        tl.prune(sub, geneformer_like(vocab, head=False), label_key="cell_type", token_dictionary=vocab,
                 gene_medians=medians, progress=False)


@pytest.fixture(scope="module")
def tiny_scgpt_columns():
    """superweights.tsv columns of tl.scan on a tiny scGPT with a planted super weight (the reference table)."""
    from _plant import plant_cls_superweight, tiny_model

    model = tiny_model(0, n_genes=120)
    rng = np.random.default_rng(0)
    X = sp.random(40, 120, density=0.3, random_state=0, data_rvs=lambda n: rng.poisson(4, n) + 1).tocsr()
    adata = ad.AnnData(X.astype(np.float32), var=pd.DataFrame(index=[f"GENE{i}" for i in range(120)]))
    adata.obs["cell_type"] = np.repeat(["a", "b"], 20)
    batches = get_runner(model).prepare(adata, gene_key=None, layer=None, max_seq_len=64, seed=0,
                                        batch_size=16).plain
    plant_cls_superweight(model, batches, 1, 5, 17)
    tl.scan(adata, model, label_key="cell_type", max_seq_len=64, progress=False)
    return list(get.superweights(adata).columns)
