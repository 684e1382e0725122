"""Run an scGPT model over tokenised cells: cell embeddings and masked-expression reconstruction.

Both primitives take fixed, seeded batches and masks, so that every pruning condition is measured on exactly the
same inputs. They are torch + numpy only; the AnnData-aware wrappers live in `tl`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.batches import Batch, iter_batches
from .data.tokenize import TokenizedCells


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


@torch.no_grad()
def embed(model, tok: TokenizedCells, *, batch_size: int = 64, normalise: bool = True,
          progress: bool = False) -> np.ndarray:
    """`<cls>` embeddings (n_cells, d), L2-normalised as the official embedding task does, in cell order."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    out = np.zeros((tok.n_cells, model.config.d_model), dtype=np.float32)
    batches = list(iter_batches(tok, batch_size))
    for batch in tqdm(batches, desc="embed", disable=not progress, leave=False):
        b = batch.to(device)
        # a batch without padding needs no mask, and without one attention takes torch's fused SDPA kernel
        mask = b.padding_mask if bool(b.padding_mask.any()) else None
        hidden = model._encode(b.src, b.values, mask)
        out[batch.cells] = hidden[:, 0, :].float().cpu().numpy()
    model.train(was_training)
    return l2_normalise(out) if normalise else out


def masked_batches(tok: TokenizedCells, *, mask_ratio: float = 0.25, mask_value: float = -1.0, seed: int = 0,
                   batch_size: int = 64, cells: np.ndarray | None = None) -> list[Batch]:
    """Fixed, seeded masked batches: build once, share across every condition."""
    return list(iter_batches(tok, batch_size, mask_ratio=mask_ratio, mask_value=mask_value, seed=seed, cells=cells))


def _per_cell_mse_pearson(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[np.ndarray, np.ndarray]:
    m = mask.float()
    n = m.sum(1).clamp(min=1)
    mse = (((pred - target) ** 2) * m).sum(1) / n
    pm = (pred * m).sum(1) / n
    tm = (target * m).sum(1) / n
    pc = (pred - pm[:, None]) * m
    tc = (target - tm[:, None]) * m
    denom = torch.sqrt((pc ** 2).sum(1) * (tc ** 2).sum(1))
    r = torch.where(denom > 0, (pc * tc).sum(1) / denom.clamp(min=1e-12), torch.full_like(denom, float("nan")))
    return mse.double().cpu().numpy(), r.double().cpu().numpy()


def reconstruction_from_outputs(outputs: dict, batch: Batch) -> dict[str, np.ndarray]:
    """Per-cell masked MSE and Pearson of GEP (`mlm_output`) and, when present, GEPC (`mvc_output`)."""
    res = {}
    target, mask = batch.target.to(outputs["mlm_output"].device), batch.mask.to(outputs["mlm_output"].device)
    res["gep_mse"], res["gep_pearson"] = _per_cell_mse_pearson(outputs["mlm_output"].float(), target, mask)
    if "mvc_output" in outputs:
        res["gepc_mse"], res["gepc_pearson"] = _per_cell_mse_pearson(outputs["mvc_output"].float(), target, mask)
    return res


@torch.no_grad()
def reconstruction(model, batches: Iterable[Batch], n_cells: int | None = None, *, progress: bool = False
                   ) -> dict[str, np.ndarray]:
    """Per-cell masked reconstruction metrics over fixed masked batches (see `masked_batches`).

    Returns a dict of arrays indexed by cell: ``gep_mse``, ``gep_pearson``, ``gepc_mse``, ``gepc_pearson`` and
    ``cls_emb`` (raw `<cls>` output). Cells not in any batch hold NaN.
    """
    batches = list(batches)
    if n_cells is None:
        n_cells = int(max(b.cells.max() for b in batches)) + 1
    was_training = model.training
    model.eval()
    device = _device_of(model)
    res: dict[str, np.ndarray] = {}
    for batch in tqdm(batches, desc="reconstruct", disable=not progress, leave=False):
        b = batch.to(device)
        out = model(b.src, b.values, b.padding_mask)
        per = reconstruction_from_outputs(out, b)
        per["cls_emb"] = out["cell_emb"].double().cpu().numpy()
        for k, v in per.items():
            if k not in res:
                res[k] = np.full((n_cells, *v.shape[1:]), np.nan)
            res[k][batch.cells] = v
    model.train(was_training)
    return res
