"""Pretrain a small scGPT from scratch on an AnnData of raw counts, and measure whether it learned.

This is what builds the shipped demo model (``recipes/demo.json``) and what ``scsuperweight pretrain`` runs.
The model and checkpoints are the official scGPT ones (``models.scgpt``, ``models.checkpoint``) and so is the
data path (per-cell binning of the counted genes, ``<cls>`` first with ``pad_value``). Choices, all in the recipe:

- **genes**: the vocab is the data's genes (those counted in ``genes.min_cells`` cells; the
  ``genes.n_top_genes`` most variable when there are more) plus ``<pad>``, ``<cls>``, ``<eoc>`` at the end;
- **tokens**: at every step each cell's counted genes are freshly subsampled to ``tokens.max_seq_len`` - 1 (a
  new random view of the cell per step, not one fixed subsample). ``tokens.zero_fraction`` > 0 also puts genes
  with zero counts (bin 0) into the sequences; the shipped recipe keeps it at 0, the official view, because that
  is what embedding and pruning feed the model (a model trained with zeros predicts badly without them);
- **real data**: ``recipes/darmanis.json`` (2000 HVGs, 256 tokens, ``zero_fraction`` 0.5, GEPC weight 2, d=64) is
  for user-supplied cells (``--data``). Measured on Darmanis 2015 (94 held-out cells, k=15): ``<cls>`` kNN 0.43,
  against 0.755 for PCA of log1p counts under the same evaluation; it does not fix the collapse. Why: with counted
  genes only, per-cell binning leaves no cell-type signal in the bins (predicting each gene's mean bin within the
  true cell type is no better than its overall mean), so GEP/GEPC do not reward a ``<cls>`` that carries the cell;
  only zeros in the sequences do (about 10% of the MSE), and a few thousand CPU steps do not learn it;
- **init**: ``train.init_output_bias`` starts the GEP decoder's output bias at the mean training bin instead of 0
  (an initial value for an MSE head, not something planted: training moves it like any other parameter).

The objective (``train.loss`` holds the weights):

- ``gep``: masked gene-expression prediction, MSE of ``mlm_output`` against the true bins at masked positions;
- ``gepc``: the same MSE on ``mvc_output``, which predicts every masked gene from the ``<cls>`` embedding alone,
  so that the cell embedding has to carry the cell; GEP + GEPC is the scGPT pretraining objective;
- ``ecs`` (weight 0 unless a recipe says otherwise): scGPT's elastic cell similarity,
  mean(1 - (relu(cos) - threshold)^2) over pairs of distinct ``<cls>`` embeddings in the batch.

The mask ratio of each step is drawn from ``train.mask_ratio``. AdamW (no decay on embeddings, biases, norms),
linear warmup then cosine decay to ``min_lr_ratio`` x lr, gradient-norm clipping, dropout 0 (attention dropout
forces torch's slow attention path on CPU). Every random draw of a step (its cells, their gene subsample, the mask
ratio, the mask) is a function of (seed, step) only, so a run resumed from its training state continues exactly
as an uninterrupted one.

Evaluation, every ``eval.every`` steps, on a seeded held-out split (stratified by the label when there is one):
per token view ("official": counted genes only; "train": the training sampling, when it differs) the masked MSE
of GEP and GEPC against the baseline "predict each gene's mean bin over the training cells", the 5-fold CV kNN
accuracy of the L2-normalised ``<cls>`` embeddings of the held-out cells and their mean pairwise cosine
(1 = collapsed); and per layer the largest |output| of the FFN down-projection (``linear2``) over its median
|output|, with the channel and the token (``<cls>`` or which gene) that carried it. All of it goes to
``training_log.json``.

Files in ``out_dir``: the official checkpoint (``args.json`` with the whole recipe under ``recipe``,
``vocab.json``, ``best_model.pt``: the model at the latest checkpoint), ``train_state.pt`` (model, optimizer,
scheduler, step, RNG state; written atomically) and ``training_log.json``. Nothing is ever planted in the
weights: the model is what training made it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ._io import atomic_torch_save, atomic_write_text
from ._log import logger
from .data.batches import Batch, collate, mask_batch
from .data.tokenize import TokenizedCells, tokenize_anndata
from .errors import DataError
from .models._torch import no_fastpath
from .models.checkpoint import save_scgpt
from .models.scgpt import ScGPTConfig, ScGPTModel

__all__ = ["DEFAULT_RECIPE", "PreparedData", "evaluate", "ffn_activation_ratios", "load_recipe", "prepare_data",
           "pretrain", "recipe_adata", "resolve_device"]

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
STATE_FILE = "train_state.pt"
LOG_FILE = "training_log.json"

# Every key a recipe may hold, with its default; a recipe file overrides any subset of it.
DEFAULT_RECIPE: dict = {
    "name": "custom",
    "seed": 0,  # model init, split, batches, masks
    "data": {  # only used when no AnnData is passed (`pretrain --synthetic`, `recipe_adata`)
        "generator": "synthetic_ad",
        "args": {"n_cells": 3000, "n_donors": 8, "seed": 0},
        "label_key": "cell_type",  # default label for the held-out kNN evaluation
    },
    "genes": {
        "n_top_genes": 2000,  # the most variable genes when there are more; None: all
        "flavor": "seurat",  # scanpy highly_variable_genes flavour on log1p-normalised counts ('cell_ranger'...)
        "min_cells": 3,  # drop genes counted in fewer cells
    },
    "tokens": {
        "n_bins": 51,
        "max_seq_len": 256,  # tokens per cell per step, <cls> included
        # share of each training sequence given to genes with zero counts (bin 0), when the cell has enough
        # counted genes to fill the rest; 0 = the official view (counted genes only)
        "zero_fraction": 0.0,
    },
    "model": {"d_model": 128, "nhead": 4, "d_hid": 256, "nlayers": 4, "dropout": 0.0},
    "train": {
        "steps": 2000,
        "batch_size": 32,
        "lr": 2e-3,
        "weight_decay": 0.01,
        "betas": [0.9, 0.98],
        "warmup_steps": 100,
        "min_lr_ratio": 0.05,
        "grad_clip": 1.0,
        "log_every": 50,  # training-loss averages in training_log.json
        "init_output_bias": True,  # start the GEP decoder's output bias at the training cells' mean bin
        "mask_ratio": [0.25, 0.5, 0.75],  # one drawn per step
        "loss": {"gep": 1.0, "gepc": 1.0, "ecs": 0.0, "ecs_threshold": 0.6},
    },
    "eval": {
        "heldout_fraction": 0.2,
        "every": 500,
        "max_cells": 1000,  # held-out cells used (a seeded stratified subset when there are more)
        "mask_ratio": 0.5,
        "batch_size": 64,
        "knn_k": 15,
        "knn_folds": 5,
        "activation_cells": 256,  # held-out cells the FFN-output spike scan runs on
    },
    "checkpoint": {"every": 500},
}


# ------------------------------------------------------------------------------------------------ recipes


def _merge(base: dict, over: dict, where: str = "recipe") -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if key not in base:
            msg = f"unknown key {where}.{key}; valid keys there: {sorted(base)}."
            raise ValueError(msg)
        if isinstance(base[key], dict) and key != "args":
            if not isinstance(value, dict):
                msg = f"{where}.{key} must be an object, got {value!r}."
                raise ValueError(msg)
            out[key] = _merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_recipe(recipe: str | Path | dict = "demo") -> dict:
    """A complete recipe: a shipped name (``"demo"``), a JSON file, or a dict, merged over `DEFAULT_RECIPE`."""
    if isinstance(recipe, dict):
        given = recipe
    else:
        text = str(recipe)
        path = Path(text)
        if not text.endswith(".json") and not path.is_file():
            ref = resources.files("scsuperweight.recipes").joinpath(f"{text}.json")
            if not ref.is_file():
                names = sorted(p.name[:-5] for p in resources.files("scsuperweight.recipes").iterdir()
                               if p.name.endswith(".json"))
                msg = f"recipe {text!r} is neither a shipped recipe ({names}) nor an existing .json file."
                raise ValueError(msg)
            given = json.loads(ref.read_text())
        elif not path.is_file():
            msg = f"recipe file not found: {path}."
            raise ValueError(msg)
        else:
            try:
                given = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                msg = f"recipe {path} is not valid JSON ({exc.msg} at line {exc.lineno})."
                raise ValueError(msg) from None
    if not isinstance(given, dict):
        msg = f"a recipe must be a JSON object, got {type(given).__name__}."
        raise ValueError(msg)
    return _merge(DEFAULT_RECIPE, given)


def recipe_adata(recipe: str | Path | dict = "demo", **overrides):
    """The AnnData a recipe's ``data`` section describes (the seeded synthetic AD-like set); `overrides` win."""
    rec = load_recipe(recipe)
    data = rec["data"]
    if data["generator"] != "synthetic_ad":
        msg = (f"recipe data.generator={data['generator']!r} is unknown; the only generator is 'synthetic_ad' "
               "(a recipe for user-supplied data needs the AnnData: `pretrain --data FILE.h5ad`).")
        raise ValueError(msg)
    from .datasets import synthetic_ad  # lazy: anndata-side module

    return synthetic_ad(**{**data["args"], **overrides})


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={str(device)!r} was asked for but CUDA is not available here; use device='cpu'."
        raise ValueError(msg)
    return dev


# --------------------------------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """Everything training and evaluation need from the AnnData, derived once and deterministically."""

    vocab: dict[str, int]
    genes: list[str]  # vocab genes, in vocab order
    tok: TokenizedCells  # every cell with all its candidate training tokens (<cls> first; zeros too if sampled)
    tok_nonzero: TokenizedCells  # every cell, counted genes only: the official view
    train_idx: np.ndarray
    test_idx: np.ndarray  # the held-out cells evaluated (already capped to eval.max_cells)
    labels: np.ndarray | None  # per cell, or None
    label_key: str | None
    baselines: dict[str, np.ndarray]  # view -> per token id: mean bin over the training cells in that view
    constants: dict[str, float] = field(default_factory=dict)  # view -> mean bin over all training tokens


def select_genes(adata, n_top_genes: int | None, min_cells: int = 3, flavor: str = "seurat") -> list[str]:
    """Genes to build the vocab from: counted in >= `min_cells` cells, then the most variable if asked."""
    import scipy.sparse as sp

    X = adata.X
    n_cells_per_gene = np.asarray((X > 0).sum(0)).ravel() if sp.issparse(X) else (np.asarray(X) > 0).sum(0)
    names = np.asarray(adata.var_names, dtype=str)
    keep = n_cells_per_gene >= min_cells
    special = np.isin(names, list(SPECIAL_TOKENS) + ["<mask>"])
    _, first = np.unique(names, return_index=True)
    unique = np.zeros(len(names), dtype=bool)
    unique[first] = True
    keep &= unique & ~special
    if not keep.any():
        msg = f"no gene is counted in at least {min_cells} cells; lower genes.min_cells or check adata.X."
        raise DataError(msg)
    if n_top_genes is None or n_top_genes >= keep.sum():
        return names[keep].tolist()
    import anndata as ad
    import scanpy as sc

    sub = ad.AnnData(sp.csr_matrix(X[:, np.flatnonzero(keep)], dtype=np.float32))
    sub.var_names = names[keep]
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    if flavor not in ("seurat", "cell_ranger"):
        msg = f"genes.flavor={flavor!r} is not supported; use 'seurat' or 'cell_ranger' (log-normalised data)."
        raise ValueError(msg)
    sc.pp.highly_variable_genes(sub, n_top_genes=int(n_top_genes), flavor=flavor)
    chosen = set(sub.var_names[sub.var["highly_variable"].to_numpy()])
    return [g for g in names[keep] if g in chosen]  # data order


def data_fingerprint(adata) -> str:
    """sha256 of the counts, gene names and cell names: tells whether a data generator still gives the same data."""
    import hashlib

    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X)
    h = hashlib.sha256()
    for arr in (X.indptr, X.indices, X.data.astype(np.float64)):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(map(str, adata.var_names)).encode())
    h.update("\n".join(map(str, adata.obs_names)).encode())
    return h.hexdigest()


def build_vocab(genes: list[str]) -> dict[str, int]:
    """Genes first, then the specials, as in the official vocabs (``<pad>``, ``<cls>``, ``<eoc>`` at the end)."""
    vocab = {g: i for i, g in enumerate(genes)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return vocab


def split_cells(n: int, fraction: float, seed: int, labels: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / held-out split, stratified by `labels` when every label has at least two cells."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < fraction < 1.0:
        msg = f"eval.heldout_fraction must be in (0, 1), got {fraction}."
        raise ValueError(msg)
    idx = np.arange(n)
    stratify = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        if counts.min() >= 2:
            stratify = labels
        else:
            logger.warning("some labels have a single cell; the held-out split is not stratified")
    train, test = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(test)


def prepare_data(adata, recipe: dict, *, label_key: str | None = None, seed: int = 0,
                 vocab: dict[str, int] | None = None) -> PreparedData:
    """Select genes, build the vocab (or use `vocab`), tokenise every cell, split, and compute the baseline."""
    tk, ev = recipe["tokens"], recipe["eval"]
    if vocab is None:
        g = recipe["genes"]
        genes = select_genes(adata, g["n_top_genes"], g["min_cells"], g["flavor"])
        vocab = build_vocab(genes)
    else:
        genes = [g for g in vocab if g not in SPECIAL_TOKENS]
    names = set(map(str, adata.var_names))
    present = [g for g in genes if g in names]
    if len(present) < 2:
        msg = f"only {len(present)} vocab genes are in adata.var_names; the data and the vocab do not match."
        raise DataError(msg)
    sub = adata[:, present]
    n_genes = len(present)
    common = dict(n_bins=tk["n_bins"], max_seq_len=n_genes + 1, seed=seed, allow_empty=True)
    tok_nz = tokenize_anndata(sub, vocab, include_zero_genes=False, **common)
    tok = tok_nz
    if tk["zero_fraction"] > 0:
        # the same bins with the zero genes added: the zeros tokenise identically whatever the seed
        tok = tokenize_anndata(sub, vocab, include_zero_genes=True, **common)
    labels = None
    if label_key is not None:
        if label_key not in adata.obs.columns:
            msg = (f"label_key={label_key!r} is not a column of adata.obs; columns are "
                   f"{list(adata.obs.columns)}.")
            raise DataError(msg)
        labels = adata.obs[label_key].astype(str).to_numpy()
    usable = np.flatnonzero(tok_nz.lengths > 1)  # cells with at least one counted vocab gene
    if len(usable) < adata.n_obs:
        logger.warning("%d cells have no counts in the vocab genes and are left out", adata.n_obs - len(usable))
    train_u, test_u = split_cells(len(usable), ev["heldout_fraction"], seed,
                                  None if labels is None else labels[usable])
    train_idx, test_idx = usable[train_u], usable[test_u]
    if len(test_idx) > ev["max_cells"]:
        keep, _ = split_cells(len(test_idx), 1 - ev["max_cells"] / len(test_idx), seed + 1,
                              None if labels is None else labels[test_idx])
        test_idx = test_idx[keep]
    data = PreparedData(vocab, genes, tok, tok_nz, train_idx, test_idx, labels, label_key, {})
    # baselines: each gene's mean bin over the training cells, in the view evaluated (two sampled passes for the
    # training view, whose sampling changes the share of zeros)
    for view in views(recipe):
        sums = np.zeros(len(vocab))
        counts = np.zeros(len(vocab))
        for rep in range(1 if view == "official" else 2):
            v = view_cells(data, recipe, view, train_idx, np.random.default_rng([int(seed), 13, rep]))
            gene_tok = v.gene_ids != v.cls_token_id
            ids = v.gene_ids[gene_tok]
            sums += np.bincount(ids, weights=v.values[gene_tok].astype(np.float64), minlength=len(vocab))
            counts += np.bincount(ids, minlength=len(vocab))
        overall = sums.sum() / max(counts.sum(), 1)
        data.baselines[view] = np.where(counts > 0, sums / np.maximum(counts, 1), overall)
        data.constants[view] = float(overall)
    return data


def _mean_bin(data: PreparedData, recipe: dict, view: str) -> float:
    v = view_cells(data, recipe, view, data.train_idx, np.random.default_rng([int(recipe["seed"]), 17]))
    return float(v.values[v.gene_ids != v.cls_token_id].mean())


def views(recipe: dict) -> list[str]:
    """Evaluation views: 'official' (counted genes only), plus 'train' when training also samples zeros."""
    return ["official", "train"] if recipe["tokens"]["zero_fraction"] > 0 else ["official"]


def view_cells(data: PreparedData, recipe: dict, view: str, cells: np.ndarray,
               rng: np.random.Generator) -> TokenizedCells:
    """`cells` as the model sees them in `view`, subsampled to the recipe's max_seq_len with `rng`."""
    tk = recipe["tokens"]
    if view == "official":
        return subsample_cells(data.tok_nonzero, cells, tk["max_seq_len"], rng)
    return subsample_cells(data.tok, cells, tk["max_seq_len"], rng, zero_fraction=tk["zero_fraction"])


def subsample_cells(tok: TokenizedCells, cells: np.ndarray, max_seq_len: int, rng: np.random.Generator,
                    zero_fraction: float | None = None) -> TokenizedCells:
    """`cells` with each cell's genes randomly subsampled to `max_seq_len` - 1 (<cls> kept, gene order kept).

    Without `zero_fraction` every gene token is equally likely. With it, counted genes (bin > 0) get up to
    1 - `zero_fraction` of the positions and zero genes the rest; either fills what the other cannot.
    """
    cells = np.asarray(cells)
    sub = tok.subset(cells)
    n_gene = sub.lengths - 1
    n_tok = max_seq_len - 1
    if np.all(n_gene <= n_tok):
        return sub
    gene_pos = np.ones(len(sub.gene_ids), dtype=bool)
    gene_pos[sub.indptr[:-1]] = False
    flat = np.flatnonzero(gene_pos)  # gene positions, row after row
    row = np.repeat(np.arange(len(cells)), n_gene)
    if zero_fraction is None:
        group = np.zeros(len(flat), dtype=np.int64)
        quota = np.minimum(n_gene, n_tok)[:, None]  # (C, 1)
    else:
        group = (sub.values[flat] == 0).astype(np.int64)  # 0 counted, 1 zero
        n_nz = np.bincount(row, weights=1 - group, minlength=len(cells)).astype(np.int64)
        n_z = n_gene - n_nz
        want_nz = int(round((1 - zero_fraction) * n_tok))
        k_nz = np.minimum(n_nz, np.maximum(want_nz, n_tok - n_z))
        k_z = np.minimum(n_z, n_tok - k_nz)
        quota = np.stack([k_nz, k_z], axis=1)  # (C, 2)
    key = rng.random(len(flat))
    order = np.lexsort((key, group, row))  # by row, then group, then random
    grp_sorted, row_sorted = group[order], row[order]
    run_start = np.r_[0, np.flatnonzero((np.diff(row_sorted) != 0) | (np.diff(grp_sorted) != 0)) + 1]
    run_len = np.diff(np.r_[run_start, len(order)])
    rank = np.arange(len(order)) - np.repeat(run_start, run_len)
    chosen = order[rank < quota[row_sorted, grp_sorted]]
    keep = np.zeros(len(sub.gene_ids), dtype=bool)
    keep[sub.indptr[:-1]] = True
    keep[flat[chosen]] = True
    new_len = np.bincount(np.repeat(np.arange(len(cells)), sub.lengths)[keep], minlength=len(cells))
    indptr = np.concatenate([[0], np.cumsum(new_len)]).astype(np.int64)
    return TokenizedCells(indptr, sub.gene_ids[keep], sub.values[keep], tok.pad_token_id, tok.pad_value,
                          tok.cls_token_id, tok.genes)


def _step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(step), 7])


def train_batch(data: PreparedData, recipe: dict, seed: int, step: int, mask_value: float) -> Batch:
    """The masked batch of training step `step` (0-based): a pure function of (seed, step)."""
    tr = recipe["train"]
    bs = tr["batch_size"]
    n = len(data.train_idx)
    rng = _step_rng(seed, step)
    # cells: epoch-wise permutations, so that every training cell is seen once per epoch
    start = step * bs
    picked = []
    while len(picked) < bs:
        epoch, pos = divmod(start + len(picked), n)
        perm = np.random.default_rng([int(seed), int(epoch), 11]).permutation(n)
        take = min(bs - len(picked), n - pos)
        picked.extend(perm[pos:pos + take].tolist())
    cells = data.train_idx[np.asarray(picked)]
    tk = recipe["tokens"]
    sub = subsample_cells(data.tok, cells, tk["max_seq_len"], rng,
                          zero_fraction=tk["zero_fraction"] if tk["zero_fraction"] > 0 else None)
    ratios = tr["mask_ratio"] if isinstance(tr["mask_ratio"], list) else [tr["mask_ratio"]]
    ratio = float(ratios[rng.integers(len(ratios))])
    batch = collate(sub, np.arange(sub.n_cells))
    batch = mask_batch(batch, ratio, mask_value=mask_value, pad_value=sub.pad_value,
                       seed=int(rng.integers(2**62)))
    batch.cells = cells
    return batch


# --------------------------------------------------------------------------------------------------- loss


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    mask = mask.float()
    return ((pred - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def ecs_loss(cell_emb: Tensor, threshold: float) -> Tensor:
    """scGPT's elastic cell similarity on the batch's <cls> embeddings."""
    u = nn.functional.normalize(cell_emb, p=2, dim=1)
    cos = u @ u.t()
    cos = cos.masked_fill(torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device), 0.0)
    return torch.mean(1 - (torch.relu(cos) - threshold) ** 2)


def compute_loss(model: ScGPTModel, batch: Batch, weights: dict) -> tuple[Tensor, dict[str, float]]:
    out = model(batch.src, batch.values, batch.padding_mask, MVC=True)
    parts = {"gep": masked_mse(out["mlm_output"], batch.target, batch.mask),
             "gepc": masked_mse(out["mvc_output"], batch.target, batch.mask)}
    if weights.get("ecs", 0.0):
        parts["ecs"] = ecs_loss(out["cell_emb"], weights.get("ecs_threshold", 0.6))
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def lr_lambda_factory(steps: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:  # step = number of optimizer steps taken so far
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


# ------------------------------------------------------------------------------------------------- evaluate


def knn_cv_accuracy(emb: np.ndarray, labels: np.ndarray, k: int = 15, n_folds: int = 5, seed: int = 0) -> float:
    """Pooled accuracy of a `k`-NN vote under stratified `n_folds`-fold CV on L2-normalised rows, with folds and
    `k` lowered to what a small held-out set allows (NaN when no CV is possible): `metrics.knn_accuracy`."""
    from .metrics import knn_accuracy  # scikit-learn loads only when an evaluation runs

    if not np.isfinite(emb).all():  # a diverged model is logged as NaN, not an error mid-training
        return float("nan")
    return knn_accuracy(emb, labels, k, n_folds, seed, adapt=True)


def mean_pairwise_cosine(emb: np.ndarray) -> float:
    """`metrics.mean_pairwise_cosine`, NaN for a diverged model's non-finite embeddings."""
    from .metrics import mean_pairwise_cosine as mpc

    return mpc(emb) if np.isfinite(emb).all() else float("nan")


def ffn_activation_ratios(model: ScGPTModel, batches: list[Batch], genes_by_id: dict[int, str] | None = None
                          ) -> list[dict]:
    """Per layer: max |linear2 output| over non-padding tokens and channels, over its median |output|.

    The median is the median over batches of each batch's median. The fused eval fast path of
    ``TransformerEncoderLayer`` never calls submodules, so it is switched off here (and restored); every hook
    must fire or this raises.
    """
    from .errors import HookError

    layers = model.transformer_encoder.layers
    stats = [{"max_abs": -1.0, "medians": [], "cls_max_abs": -1.0} for _ in layers]
    current: dict = {}

    def make_hook(i):
        def hook(_mod, _inp, output):
            a = output.detach().abs().float()  # (B, L, d)
            valid = ~current["pad"]
            vals = a[valid]  # (N, d)
            st = stats[i]
            st["medians"].append(float(vals.median()))
            flat = int(torch.argmax(a.masked_fill(~valid[..., None], -1.0)))
            b, pos, ch = np.unravel_index(flat, a.shape)
            m = float(a[b, pos, ch])
            if m > st["max_abs"]:
                gid = int(current["src"][b, pos])
                st.update(max_abs=m, channel=int(ch),
                          token="<cls>" if pos == 0 else "gene",
                          gene=None if pos == 0 else (genes_by_id or {}).get(gid, str(gid)))
            cls = a[:, 0, :]
            cm, cch = cls.max(dim=0)
            j = int(torch.argmax(cm))
            if float(cm[j]) > st["cls_max_abs"]:
                st.update(cls_max_abs=float(cm[j]), cls_channel=j)
            st["fired"] = True
        return hook

    handles = [layer.linear2.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        with no_fastpath(), torch.no_grad():
            for b in batches:
                current.update(pad=b.padding_mask, src=b.src)
                model(b.src, b.values, b.padding_mask, MVC=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, st in enumerate(stats):
        if not st.get("fired"):
            msg = f"the forward hook on transformer_encoder.layers[{i}].linear2 never fired."
            raise HookError(msg)
        med = float(np.median(st["medians"]))
        out.append({"layer": i, "max_abs": st["max_abs"], "median_abs": med,
                    "ratio": st["max_abs"] / max(med, 1e-12), "channel": st["channel"], "token": st["token"],
                    "gene": st["gene"], "cls_max_abs": st["cls_max_abs"], "cls_channel": st["cls_channel"],
                    "cls_ratio": st["cls_max_abs"] / max(med, 1e-12)})
    return out


def _view_metrics(model: ScGPTModel, sub: TokenizedCells, baseline: np.ndarray, const: float,
                  labels: np.ndarray | None, ev: dict, seed: int, device) -> dict:
    """Masked MSE of GEP and GEPC vs the baselines, and the <cls> embedding figures, on one view of the cells."""
    base = torch.as_tensor(baseline, dtype=torch.float32)
    sse = {"gep": 0.0, "gepc": 0.0, "baseline": 0.0, "constant": 0.0}
    n_masked = 0
    emb = np.zeros((sub.n_cells, model.config.d_model), dtype=np.float32)
    for i, s in enumerate(range(0, sub.n_cells, ev["batch_size"])):
        plain = collate(sub, np.arange(s, min(s + ev["batch_size"], sub.n_cells)))
        b = mask_batch(plain, ev["mask_ratio"], mask_value=model.config.mask_value, pad_value=sub.pad_value,
                       seed=int(seed) * 1_000_003 + i)
        out = model(b.src.to(device), b.values.to(device), b.padding_mask.to(device), MVC=True)
        m = b.mask
        tgt = b.target[m]
        sse["gep"] += float(((out["mlm_output"].float().cpu()[m] - tgt) ** 2).sum())
        sse["gepc"] += float(((out["mvc_output"].float().cpu()[m] - tgt) ** 2).sum())
        sse["baseline"] += float(((base[b.src[m]] - tgt) ** 2).sum())
        sse["constant"] += float(((const - tgt) ** 2).sum())
        n_masked += int(m.sum())
        cell = model(plain.src.to(device), plain.values.to(device), plain.padding_mask.to(device), MVC=False)
        emb[s:s + len(plain.cells)] = cell["cell_emb"].float().cpu().numpy()
    mse = {k: v / max(n_masked, 1) for k, v in sse.items()}
    res = {"gep_mse": mse["gep"], "gepc_mse": mse["gepc"], "baseline_mse": mse["baseline"],
           "constant_mse": mse["constant"], "gep_vs_baseline": mse["gep"] / mse["baseline"],
           "gepc_vs_baseline": mse["gepc"] / mse["baseline"],
           "n_masked": n_masked, "mean_tokens": float(np.mean(sub.lengths)), "mean_cosine": mean_pairwise_cosine(emb)}
    if labels is not None:
        res["knn_accuracy"] = knn_cv_accuracy(emb, labels, ev["knn_k"], ev["knn_folds"], seed)
    return res


def evaluate(model: ScGPTModel, data: PreparedData, recipe: dict, *, seed: int = 0, device=None,
             activations: bool = True) -> dict:
    """Held-out figures per view, the official view's copied to the top level; plus the FFN-output spikes.

    Per view: GEP and GEPC masked MSE against the per-gene mean-bin baseline (``baseline_mse``; and against one
    mean bin for every gene, ``constant_mse``, which is the better of the two when genes are many and cells few),
    5-fold CV kNN accuracy of the L2-normalised <cls> embeddings (when there are labels) and their mean pairwise
    cosine.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    ev = recipe["eval"]
    was_training = model.training
    model.eval()
    cells = data.test_idx
    labels = None if data.labels is None else data.labels[cells]
    t0 = time.time()
    result: dict = {"n_heldout": len(cells), "label_key": data.label_key if labels is not None else None,
                    "views": {}}
    subs = {}
    with torch.no_grad():
        for view in views(recipe):
            subs[view] = view_cells(data, recipe, view, cells, np.random.default_rng([int(seed), 5]))
            result["views"][view] = _view_metrics(model, subs[view], data.baselines[view], data.constants[view],
                                                  labels, ev, seed, device)
    result.update(result["views"]["official"])
    if activations:
        sub = subs["official"]
        n_act = min(ev["activation_cells"], len(cells))
        batches = [collate(sub, np.arange(s, min(s + ev["batch_size"], n_act))).to(device)
                   for s in range(0, n_act, ev["batch_size"])]
        genes_by_id = {i: g for g, i in data.vocab.items()}
        result["ffn_output"] = ffn_activation_ratios(model, batches, genes_by_id)
    result["eval_seconds"] = time.time() - t0
    model.train(was_training)
    return result


# ------------------------------------------------------------------------------------------------- training


def _official_args(recipe: dict, seed: int, n_genes: int) -> dict:
    """args.json fields in the official names where they exist, plus the whole recipe."""
    tr, tk = recipe["train"], recipe["tokens"]
    return {"pad_token": "<pad>", "max_seq_len": tk["max_seq_len"], "include_zero_gene": tk["zero_fraction"] > 0,
            "zero_fraction": tk["zero_fraction"],
            "mask_ratio": tr["mask_ratio"], "lr": tr["lr"], "batch_size": tr["batch_size"], "seed": seed,
            "GEPC": recipe["train"]["loss"]["gepc"] > 0, "ecs_thres": tr["loss"]["ecs_threshold"],
            "USE_GENERATIVE_TRAINING": False, "n_hvg": recipe["genes"]["n_top_genes"], "n_genes": n_genes,
            "fast_transformer": False, "recipe": recipe}


def build_model(recipe: dict, vocab: dict[str, int], seed: int) -> ScGPTModel:
    m = recipe["model"]
    config = ScGPTConfig(ntoken=len(vocab), d_model=m["d_model"], nhead=m["nhead"], d_hid=m["d_hid"],
                         nlayers=m["nlayers"], dropout=m["dropout"], pad_token_id=vocab["<pad>"],
                         n_bins=recipe["tokens"]["n_bins"], mvc=True)
    torch.manual_seed(seed)
    return ScGPTModel(config, vocab=vocab)


def pretrain(adata, *, recipe: str | Path | dict = "demo", out_dir: str | Path, steps: int | None = None,
             seed: int | None = None, device: str | torch.device | None = None, resume: bool = False,
             progress: bool = True, label_key: str | None = None, stop_after: int | None = None,
             save_every: int | None = None) -> ScGPTModel:
    """Pretrain a small scGPT on `adata` (raw counts) with the scGPT objective; see the module docstring.

    Parameters
    ----------
    adata
        Cells x genes, raw counts in ``X``, gene symbols as ``var_names``.
    recipe
        ``"demo"``, a recipe JSON path, or a dict (merged over `DEFAULT_RECIPE`).
    out_dir
        Where the official checkpoint, ``train_state.pt`` and ``training_log.json`` go.
    steps
        Optimizer steps; default the recipe's ``train.steps``. The LR schedule spans them.
    seed
        Seed of initialisation, split, batches and masks; default the recipe's ``seed``.
    device
        ``"cpu"``, ``"cuda"``...; default CUDA when available, else CPU.
    resume
        Continue from ``out_dir/train_state.pt`` (same data, recipe and seed): the result is identical to an
        uninterrupted run.
    progress
        Show a tqdm progress bar.
    label_key
        ``adata.obs`` column for the held-out kNN accuracy (and the stratified split); default the recipe's
        ``data.label_key`` when that column exists.
    stop_after
        Stop (with a resumable state) after this many steps, as if interrupted; the schedule still spans `steps`.
    save_every
        Also keep an official-format snapshot every this many steps (and of the initial weights) under
        ``out_dir/steps/step_NNNNNN``, for a census of when spikes emerge (`scsuperweight.census`).

    Returns
    -------
    The trained model (eval mode, on CPU), with ``.vocab``, ``.args`` and ``.training_log``.

    Examples
    --------
    >>> from scsuperweight.train import pretrain, recipe_adata
    >>> adata = recipe_adata("demo", n_cells=300)
    >>> model = pretrain(adata, recipe="demo", out_dir="pretrain_out", steps=20)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    rec = load_recipe(recipe)
    seed = int(rec["seed"] if seed is None else seed)
    steps = int(rec["train"]["steps"] if steps is None else steps)
    rec["seed"], rec["train"]["steps"] = seed, steps
    if steps < 1:
        msg = f"steps must be >= 1, got {steps}."
        raise ValueError(msg)
    if label_key is None and rec["data"]["label_key"] in adata.obs.columns:
        label_key = rec["data"]["label_key"]
    dev = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t_prep = time.time()
    data = prepare_data(adata, rec, label_key=label_key, seed=seed)
    logger.info("pretrain: %d genes, %d training / %d held-out cells (%.1fs to prepare)", len(data.genes),
                len(data.train_idx), len(data.test_idx), time.time() - t_prep)
    model = build_model(rec, data.vocab, seed)
    model.args = _official_args(rec, seed, len(data.genes))
    if rec["train"]["init_output_bias"]:
        # a better starting point than 0 for an MSE head (the first steps otherwise only learn the mean)
        train_view = "train" if "train" in data.baselines else "official"
        with torch.no_grad():
            model.decoder.fc[-1].bias.fill_(float(_mean_bin(data, rec, train_view)))
    model.to(dev)
    tr = rec["train"]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tr["lr"], betas=tuple(tr["betas"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(steps, tr["warmup_steps"],
                                                                     tr["min_lr_ratio"]))
    log = {"recipe": rec, "seed": seed, "data_sha256": data_fingerprint(adata), "n_cells": int(adata.n_obs),
           "n_genes": len(data.genes), "n_train": int(len(data.train_idx)),
           "n_heldout": int(len(data.test_idx)), "label_key": label_key, "device": str(dev),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "train": [], "eval": []}
    start = 0
    state_path = out / STATE_FILE
    if resume:
        if not state_path.is_file():
            msg = f"resume=True but there is no training state at {state_path}; start without --resume."
            raise FileNotFoundError(msg)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["recipe"])
        if {**saved, "train": {**saved["train"], "steps": 0}} != {**rec, "train": {**rec["train"], "steps": 0}}:
            msg = (f"the training state in {out} was written with another recipe or seed; resume with the same "
                   "recipe and seed, or start a fresh out_dir.")
            raise ValueError(msg)
        if saved["train"]["steps"] != steps:
            logger.warning("resuming with steps=%d instead of %d: the LR schedule changes, so the run is no longer "
                           "identical to an uninterrupted one", steps, saved["train"]["steps"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        log = json.loads(state["log"])
        log["recipe"]["train"]["steps"] = steps
        logger.info("resumed from step %d", start)

    def save_state(step: int) -> None:
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "step": step, "torch_rng": torch.get_rng_state(), "recipe": json.dumps(rec),
                 "log": json.dumps(log)}
        atomic_torch_save(state, state_path)

    def checkpoint(step: int) -> None:
        model.args["trained_steps"] = step
        save_scgpt(model, out)
        save_state(step)
        atomic_write_text(out / LOG_FILE, json.dumps(log, indent=1))

    def snapshot(step: int) -> None:
        if save_every and step % int(save_every) == 0:
            model.args["trained_steps"] = step
            save_scgpt(model, out / "steps" / f"step_{step:06d}")

    def run_eval(step: int) -> None:
        res = evaluate(model, data, rec, seed=seed, device=dev)
        res["step"] = step
        log["eval"].append(res)
        knn = res.get("knn_accuracy", float("nan"))
        logger.info("step %d: GEP %.3f / GEPC %.3f vs baseline %.3f, kNN %.3f, cosine %.3f", step, res["gep_mse"],
                    res["gepc_mse"], res["baseline_mse"], knn, res["mean_cosine"])

    ev_every, ck_every = rec["eval"]["every"], rec["checkpoint"]["every"]
    end = steps if stop_after is None else min(steps, int(stop_after))
    if start == 0 and not log["eval"]:
        run_eval(0)
    if start == 0:
        snapshot(0)
    model.train()
    bar = tqdm(total=end, initial=start, desc="pretrain", disable=not progress, unit="step")
    # wall-clock seconds of training (evaluation included), cumulative over resumes
    t0, window = time.time() - (log["train"][-1]["seconds"] if log["train"] else 0.0), []
    for step in range(start, end):
        batch = train_batch(data, rec, seed, step, model.config.mask_value).to(dev)
        loss, parts = compute_loss(model, batch, tr["loss"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(nn.utils.clip_grad_norm_(model.parameters(), tr["grad_clip"]))
        opt.step()
        sched.step()
        window.append({**parts, "loss": float(loss.detach()), "grad_norm": gnorm})
        done = step + 1
        if done <= 5:  # exact losses of the first steps: what a reproduction check compares
            log.setdefault("first_steps", []).append({"step": done, **window[-1]})
        bar.update(1)
        if done % tr["log_every"] == 0 or done == end:
            avg = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            log["train"].append({"step": done, "lr": sched.get_last_lr()[0], "seconds": time.time() - t0, **avg})
            bar.set_postfix(gep=f"{avg['gep']:.2f}", gepc=f"{avg['gepc']:.2f}")
            window = []
        if done % ev_every == 0 or done == steps:
            run_eval(done)
        if done % ck_every == 0 or done == end:
            checkpoint(done)
        snapshot(done)
    bar.close()
    if start >= end:  # nothing to do (already trained that far): still leave the files in place
        checkpoint(start)
    model.eval()
    model.cpu()
    model.training_log = log
    return model
