"""The issue's must-show on real cells: `scsuperweight scan` on a planted official-format scGPT checkpoint and the
Darmanis et al. (2015) cells from ../shared ranks the planted scalar first, with its kind, layer, row, col and the
`<cls>` token."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from _plant import plant_cls_superweight

from scsuperweight import _keys as K
from scsuperweight.cli import main
from scsuperweight.models import ScGPTConfig, ScGPTModel, save_scgpt
from scsuperweight.runners import get_runner


@pytest.fixture(scope="module")
def planted_on_darmanis(darmanis_path, tmp_path_factory):
    import anndata as ad

    d = tmp_path_factory.mktemp("real")
    full = ad.read_h5ad(darmanis_path)
    rng = np.random.default_rng(0)
    keep = np.concatenate([rng.choice(np.flatnonzero(full.obs["cell_type"].to_numpy() == t), 16, replace=False)
                           for t in ("neurons", "astrocytes", "oligodendrocytes", "microglia")])
    adata = full[np.sort(keep)].copy()
    X = adata.X.tocsc() if sp.issparse(adata.X) else sp.csc_matrix(adata.X)
    detected = np.asarray((X > 0).sum(0)).ravel()
    genes = list(adata.var_names[np.argsort(-detected, kind="stable")[:400]])  # the 400 most often detected
    adata = adata[:, genes].copy()  # a small model's vocab: the data restricted to it, as a user would
    vocab = {g: i for i, g in enumerate(genes)}
    n = len(vocab)
    vocab.update({"<pad>": n, "<cls>": n + 1, "<eoc>": n + 2})
    torch.manual_seed(5)
    cfg = ScGPTConfig(ntoken=len(vocab), d_model=32, nhead=4, d_hid=64, nlayers=3, dropout=0.0, pad_token_id=n)
    model = ScGPTModel(cfg, vocab=vocab, args={"nheads": 4, "max_seq_len": 256}).eval()
    plain = get_runner(model).prepare(adata, gene_key=None, layer=None, max_seq_len=None, seed=0,
                                      batch_size=32).plain
    plant_cls_superweight(model, plain, 2, 9, 21, magnitude=300.0)
    save_scgpt(model, d / "model")  # official layout: args.json, vocab.json, best_model.pt (Wqkv names)
    adata.write_h5ad(d / "darmanis_subset.h5ad")
    return d


def test_scan_ranks_the_planted_scalar_first_on_real_cells(planted_on_darmanis, capsys):
    d = planted_on_darmanis
    assert {p.name for p in (d / "model").iterdir()} >= {"args.json", "vocab.json", "best_model.pt"}
    state = torch.load(d / "model" / "best_model.pt", map_location="cpu", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in state  # the official (flash) key names
    out = d / "scan"
    rc = main(["scan", "--model", str(d / "model"), "--data", str(d / "darmanis_subset.h5ad"), "--label-key",
               "cell_type", "--out", str(out), "--no-progress"])
    assert rc == 0
    sw = pd.read_csv(out / K.FILE_SUPERWEIGHTS, sep="\t")
    top = sw.iloc[0]
    assert (top["kind"], int(top["layer"]), int(top["row"]), int(top["col"]), top["token"]) == \
        ("ffn_down", 2, 9, 21, "<cls>")
    assert top["param"] == "transformer_encoder.layers.2.linear2.weight"
    assert bool(top["above_threshold"])
    # every cell type sees it on <cls>: stability 1 overall and per group
    assert float(top["stability"]) == pytest.approx(1.0)
    groups = json.loads(top["stability_by_group"])
    assert set(groups) == {"neurons", "astrocytes", "oligodendrocytes", "microglia"}
    assert min(groups.values()) == pytest.approx(1.0)
    act = pd.read_csv(out / K.FILE_ACTIVATIONS, sep="\t")
    spike = act[(act["layer"] == 2) & (act["site"] == "ffn_out")].iloc[0]
    assert int(spike["channel"]) == 9 and spike["token"] == "<cls>"
    assert "L2.linear2.w[9,21]" in capsys.readouterr().out
