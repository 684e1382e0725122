"""Batches built to a token budget rather than a fixed cell count.

A forward's memory and time follow the padded tokens of a batch (B x L, and L² in attention), not its cell count:
64 cells of 1,200 tokens cost 40 times what 64 cells of 30 tokens do. Cells are sorted by length and packed while
the padded size ``n_cells x longest`` stays within `max_tokens`, so short cells go many to a batch and long ones
few. A cell longer than the budget gets a batch of its own (never dropped). Same inputs and seed, same batches and
masks, which every pruning condition needs.
"""

from __future__ import annotations

import numpy as np

from .batches import collate, mask_batch
from .tokenize import TokenizedCells


def token_budget_batches(lengths: np.ndarray, max_tokens: int, *, cells: np.ndarray | None = None,
                         max_cells: int | None = None) -> list[np.ndarray]:
    """Cell indices grouped so each batch's padded size (cells x longest length) is at most `max_tokens`.

    Deterministic: cells sorted by length (ties by index), packed greedily in that order. `max_cells` also caps
    the cells per batch.
    """
    if int(max_tokens) < 1:
        msg = f"`max_tokens` must be >= 1; got {max_tokens!r}. Try the model's max_seq_len times a batch size."
        raise ValueError(msg)
    cells = np.arange(len(lengths)) if cells is None else np.asarray(cells)
    lens = np.asarray(lengths)[cells]
    order = cells[np.lexsort((cells, lens))]
    sorted_lens = np.sort(lens, kind="stable")
    batches, start = [], 0
    for i in range(1, len(order) + 1):
        # lengths are ascending, so the newest cell is the longest: the padded size is count x its length
        over = i < len(order) and ((i - start + 1) * sorted_lens[i] > max_tokens
                                   or (max_cells is not None and i - start + 1 > max_cells))
        if i == len(order) or over:
            batches.append(order[start:i])
            start = i
    return batches


def iter_token_batches(tok: TokenizedCells, max_tokens: int, *, seed: int = 0, mask_ratio: float | None = None,
                       mask_value: float = -1.0, cells: np.ndarray | None = None, max_cells: int | None = None):
    """Yield `Batch`es of at most `max_tokens` padded tokens (masked when `mask_ratio` is given), as
    `iter_batches` does for a fixed cell count (same per-batch mask seeds)."""
    for i, idx in enumerate(token_budget_batches(tok.lengths, max_tokens, cells=cells, max_cells=max_cells)):
        batch = collate(tok, idx)
        if mask_ratio:
            batch = mask_batch(batch, mask_ratio, mask_value=mask_value, pad_value=tok.pad_value,
                               seed=seed * 1_000_003 + i)
        yield batch
