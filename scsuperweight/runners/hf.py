"""Evaluations of transformers models under edits, shared by the BERT and Llama runners.

`evaluate_mlm`: per-sequence masked- or causal-LM loss and top-1 accuracy; `embed_cells`: cell embeddings from the
final hidden states (Geneformer's mean over genes, or the start token). Both take batches of forward kwargs (a
batch's ``.cells`` gives its rows' global cell indices) and run under `scsuperweight.instrument.edit`, which is why
they live here and not with the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

from .._log import logger
from ..adapters import Adapter, get_adapter
from ..adapters.hf import cells_of, lm_head
from ..errors import HookError
from ..instrument import edit
from .base import Inputs, Runner


def _cell_index(batches: list, n_cells: int | None) -> tuple[list[np.ndarray], int]:
    """Global cell indices per batch (a batch's ``.cells``, else running sequence numbers) and their count."""
    out, nxt = [], 0
    for b in batches:
        cells = cells_of(b)
        if cells is None:
            ids = b["input_ids"]
            B = 1 if np.ndim(ids) == 1 else len(ids)
            cells = np.arange(nxt, nxt + B)
        cells = np.asarray(cells, dtype=np.int64)
        nxt = max(nxt, int(cells.max()) + 1 if len(cells) else nxt)
        out.append(cells)
    return out, (nxt if n_cells is None else int(n_cells))


@contextmanager
def _batch_loop(adapter: Adapter, batches: list, cells: list[np.ndarray], *, edits, factor: float, patches,
                desc: str, progress: bool):
    """Yields an iterator of (forward kwargs, cell indices) per batch with the model in eval mode under the edits;
    a context manager rather than a plain generator so that the edits are undone and the training mode restored
    as soon as the loop ends, also when its body raises."""
    net = adapter.model
    was_training = net.training
    net.eval()
    try:
        with edit(adapter, edits, factor=factor, patches=patches):
            yield ((adapter.forward_kwargs(batch), idx)
                   for batch, idx in tqdm(list(zip(batches, cells)), desc=desc, disable=not progress, leave=False))
    finally:
        net.train(was_training)


@torch.no_grad()
def evaluate_mlm(model, batches: Iterable[Mapping], *, edits=None, factor: float = 0.0, patches=None,
                 n_cells: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Per-sequence language-modelling loss and top-1 accuracy, optionally under edits and activation patches.

    Masked LMs (``...ForMaskedLM``, e.g. Geneformer): cross-entropy of the tokens whose ``labels`` are not -100
    (the transformers convention; see `scsuperweight.data.geneformer.mask_batches`). Causal LMs: next-token
    cross-entropy, with ``labels`` defaulting to ``input_ids`` outside padding. The head is applied only at the
    scored positions, so memory stays (tokens scored x vocabulary).

    Parameters
    ----------
    model
        A transformers model with an LM head (or its adapter).
    batches
        Dicts of forward kwargs with ``labels``; a batch's ``.cells`` gives the cell indices of its rows.
    edits, factor, patches
        As for `scsuperweight.instrument.edit`: scalars to scale by `factor` (0 zeroes them), activation patches.
    n_cells
        Length of the returned arrays; default one past the largest cell index.

    Returns
    -------
    Dict of arrays indexed by cell (NaN for cells not in any batch or without a scored token): ``loss`` (mean
    cross-entropy, nats), ``accuracy`` (top-1), ``n_masked`` (tokens scored).

    Examples
    --------
    >>> base = evaluate_mlm(model, masked)
    >>> pruned = evaluate_mlm(model, masked, edits=[("bert.encoder.layer.1.output.dense.weight", (3, 7))])
    >>> np.nanmean(pruned["loss"] - base["loss"])
    """
    adapter = get_adapter(model)
    net = adapter.model
    name = type(net).__name__
    head = lm_head(net)
    causal = name.endswith("ForCausalLM")
    if head is None or net.base_model is net or not (causal or name.endswith("ForMaskedLM")):
        msg = (f"evaluate_mlm needs a model with a language-modelling head (e.g. BertForMaskedLM, LlamaForCausalLM); "
               f"got {type(net).__name__}. Load the directory with its head (architectures in config.json).")
        raise HookError(msg)
    batches = list(batches)
    cells, n = _cell_index(batches, n_cells)
    res = {k: np.full(n, np.nan) for k in ("loss", "accuracy")}
    res["n_masked"] = np.zeros(n, dtype=np.int64)
    with _batch_loop(adapter, batches, cells, edits=edits, factor=factor, patches=patches, desc="evaluate",
                     progress=progress) as loop:
        for kw, idx in loop:
            labels = kw.pop("labels", None)
            if labels is None:
                if not causal:
                    msg = ("masked-LM evaluation needs batches with 'labels' (-100 where not masked); build them "
                           "with scsuperweight.data.geneformer.mask_batches.")
                    raise ValueError(msg)
                labels = kw["input_ids"].clone()
                if "attention_mask" in kw:
                    labels[kw["attention_mask"] == 0] = -100
            hidden = net.base_model(**kw)[0]  # (B, L, d)
            if causal:
                hidden, labels = hidden[:, :-1], labels[:, 1:]
            scored = labels != -100  # (B, L)
            logits = head(hidden[scored]).float()  # (N, V)
            target = labels[scored]
            ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").double()
            hit = (logits.argmax(-1) == target).double()
            row = scored.nonzero()[:, 0]
            B = labels.shape[0]
            cnt = torch.bincount(row, minlength=B).double()
            loss = torch.zeros(B, dtype=torch.float64, device=ce.device).index_add_(0, row, ce) / cnt
            acc = torch.zeros(B, dtype=torch.float64, device=ce.device).index_add_(0, row, hit) / cnt
            res["loss"][idx] = loss.cpu().numpy()
            res["accuracy"][idx] = acc.cpu().numpy()
            res["n_masked"][idx] = cnt.long().cpu().numpy()
    return res


@torch.no_grad()
def embed_cells(model, batches: Iterable[Mapping], *, emb: str = "mean", n_cells: int | None = None, edits=None,
                factor: float = 0.0, patches=None, normalise: bool = False,
                special_token_ids: Iterable[int] | None = None, progress: bool = False) -> np.ndarray:
    """Cell embeddings from the final hidden states, optionally under edits (Geneformer convention by default).

    Parameters
    ----------
    model
        A transformers model of a supported family (or its adapter).
    batches
        Dicts with ``input_ids`` and ``attention_mask``; a batch's ``.cells`` gives its rows' cell indices. Masked
        batches are fine only if that is intended: the embedding sees the masked input.
    emb
        ``"mean"``: the mean over non-padding, non-special tokens (genes; ``<cls>``/``<eos>`` excluded);
        ``"cls"``: the first position, which must hold the start token (``<cls>``).
    n_cells
        Rows of the result; default one past the largest cell index. Rows of cells not in any batch are NaN.
    edits, factor, patches
        As for `scsuperweight.instrument.edit`.
    normalise
        L2-normalise each row (as the scGPT embedding does).
    special_token_ids
        Tokens left out of the mean; default the adapter's (config, tokenizer and ``<...>``/``[...]`` names of an
        attached ``id_to_token``).

    Returns
    -------
    (n_cells, d) float32 array.
    """
    if emb not in ("mean", "cls"):
        msg = f"emb must be 'mean' or 'cls', got {emb!r}."
        raise ValueError(msg)
    adapter = get_adapter(model)
    net = adapter.model
    batches = list(batches)
    cells, n = _cell_index(batches, n_cells)
    specials = adapter.special_token_ids() if special_token_ids is None else special_token_ids
    specials = torch.tensor(sorted(int(i) for i in specials), dtype=torch.long)
    out: np.ndarray | None = None
    with _batch_loop(adapter, batches, cells, edits=edits, factor=factor, patches=patches, desc="embed",
                     progress=progress) as loop:
        for kw, idx in loop:
            kw.pop("labels", None)
            hidden = net.base_model(**kw)[0].float()  # (B, L, d)
            ids = kw["input_ids"]
            if emb == "cls":
                start = adapter.start_token_id
                if start is None or not bool((ids[:, 0] == start).all()):
                    msg = ("emb='cls' needs every sequence to start with the start token (<cls>); these do not "
                           f"(first tokens {ids[:, 0].unique().tolist()[:5]}, start token {start}). Use "
                           "emb='mean', or tokenise with the <cls> token.")
                    raise ValueError(msg)
                e = hidden[:, 0]
            else:
                keep = ~torch.isin(ids, specials.to(ids.device))
                if "attention_mask" in kw:
                    keep &= kw["attention_mask"].bool()
                w = keep.float()[..., None]
                e = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
                e[~keep.any(1)] = float("nan")
            if out is None:
                out = np.full((n, e.shape[-1]), np.nan, dtype=np.float32)
            out[idx] = e.cpu().numpy()
    if out is None:
        msg = "no batches to embed."
        raise ValueError(msg)
    if normalise:
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.where(norm == 0, 1.0, norm)
    return out


class HFRunner(Runner):
    """What the transformers families share: cell embeddings (the mean over genes) from batches of forward kwargs."""

    def embed(self, inputs: Inputs, *, edits=None, progress: bool = False) -> np.ndarray:
        emb = embed_cells(self.model, inputs.plain, emb="mean", n_cells=inputs.n_cells, edits=edits,
                          normalise=True, progress=progress)
        n_bad = int(np.isnan(emb).any(1).sum())
        if n_bad:
            logger.warning("%d cells have no gene in the token dictionary: their embedding rows are NaN", n_bad)
        return emb


__all__ = ["HFRunner", "embed_cells", "evaluate_mlm"]
