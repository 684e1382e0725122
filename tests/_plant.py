"""Small scGPT models and data for tests, and planting of known super weights (tests only: never in a trained model)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from scsuperweight.data import iter_batches, tokenize_counts
from scsuperweight.models import ScGPTConfig, ScGPTModel
from scsuperweight.standin import plant_superweight


def tiny_model(seed: int = 0, *, n_genes: int = 120, d_model: int = 32, nlayers: int = 3, nhead: int = 4,
               d_hid: int = 64) -> ScGPTModel:
    vocab = {f"GENE{i}": i for i in range(n_genes)}
    vocab.update({"<pad>": n_genes, "<cls>": n_genes + 1, "<eoc>": n_genes + 2})
    torch.manual_seed(seed)
    cfg = ScGPTConfig(ntoken=len(vocab), d_model=d_model, nhead=nhead, d_hid=d_hid, nlayers=nlayers, dropout=0.0,
                      pad_token_id=n_genes)
    return ScGPTModel(cfg, vocab=vocab, args={"nheads": nhead}).eval()


def tiny_tokens(model: ScGPTModel, n_cells: int = 24, seed: int = 0, density: float = 0.25):
    n_genes = model.config.ntoken - 3
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, random_state=seed,
                  data_rvs=lambda n: rng.poisson(4, n) + 1).tocsr().astype(np.float32)
    return tokenize_counts(X, np.arange(n_genes), cls_token_id=model.vocab["<cls>"],
                           pad_token_id=model.config.pad_token_id, max_seq_len=64, seed=seed)


def tiny_batches(model: ScGPTModel, n_cells: int = 24, seed: int = 0, batch_size: int = 8):
    return list(iter_batches(tiny_tokens(model, n_cells, seed), batch_size))


def plant_cls_superweight(model: ScGPTModel, batches, layer: int, row: int, hidden: int, magnitude: float = 200.0
                          ) -> None:
    """Make hidden unit `hidden` of block `layer` fire only on `<cls>`, and W2[row, hidden] write a spike of about
    `magnitude` into channel `row` of the FFN output there (`scsuperweight.standin.plant_superweight`)."""
    plant_superweight(model, layer=layer, row=row, col=hidden, batches=batches, magnitude=magnitude)
