"""Length-bucketed, seeded batches and a seeded masking collator over `TokenizedCells`.

Cells of similar length go together so padding stays small; the same seed gives the same batches and masks,
which is what lets every pruning condition be compared on identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tokenize import TokenizedCells, ragged_take


@dataclass
class Batch:
    """One padded batch: model inputs plus the cell indices they came from."""

    cells: np.ndarray  # (B,) indices into the TokenizedCells
    src: torch.Tensor  # (B, L) token ids
    values: torch.Tensor  # (B, L) bins, pad_value at <cls> and padding
    padding_mask: torch.Tensor  # (B, L) True at padding
    target: torch.Tensor | None = None  # (B, L) unmasked values when masked
    mask: torch.Tensor | None = None  # (B, L) True at masked positions

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"src": self.src, "values": self.values, "src_key_padding_mask": self.padding_mask}

    def to(self, device) -> Batch:
        """The batch on `device`. Host tensors bound for a GPU are pinned and copied without blocking, so the
        copy overlaps the work already queued (the first kernel that reads them waits for it, not the host)."""
        dev = torch.device(device)
        gpu = dev.type == "cuda"

        def move(t):
            if t is None or t.device == dev:
                return t
            if gpu and t.device.type == "cpu":
                return t.pin_memory().to(dev, non_blocking=True)
            return t.to(dev)

        return Batch(self.cells, move(self.src), move(self.values), move(self.padding_mask), move(self.target),
                     move(self.mask))


def bucket_batches(lengths: np.ndarray, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                   cells: np.ndarray | None = None) -> list[np.ndarray]:
    """Group cell indices into batches of similar length.

    Without shuffling, batches are in length order (deterministic). With shuffling, cells are sorted by length
    with a random tie order, chunked, and the batch order is permuted, all from `seed`.
    """
    if batch_size < 1:
        msg = f"batch_size must be >= 1, got {batch_size}."
        raise ValueError(msg)
    cells = np.arange(len(lengths)) if cells is None else np.asarray(cells)
    lens = np.asarray(lengths)[cells]
    rng = np.random.default_rng(seed)
    tie = rng.random(len(cells)) if shuffle else np.arange(len(cells))
    order = cells[np.lexsort((tie, lens))]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(tok: TokenizedCells, cells: np.ndarray) -> Batch:
    """Pad the chosen cells into (B, L) tensors; L is the longest of them."""
    cells = np.asarray(cells)
    lengths = tok.lengths[cells]
    B, L = len(cells), int(lengths.max())
    src = np.full((B, L), tok.pad_token_id, dtype=np.int64)
    values = np.full((B, L), tok.pad_value, dtype=np.float32)
    rows = np.repeat(np.arange(B), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    take = ragged_take(tok.indptr, cells)
    src[rows, cols] = tok.gene_ids[take]
    values[rows, cols] = tok.values[take]
    pad = np.arange(L)[None, :] >= lengths[:, None]
    return Batch(cells, torch.from_numpy(src), torch.from_numpy(values), torch.from_numpy(pad))


def mask_batch(batch: Batch, mask_ratio: float, *, mask_value: float = -1.0, pad_value: float = -2.0,
               seed: int = 0) -> Batch:
    """Replace a fraction `mask_ratio` of each cell's gene positions (not <cls>, not padding) by `mask_value`.

    As in the official collator, int(n_genes * mask_ratio) positions per cell are chosen without replacement.
    The choice depends only on `seed` and the batch's contents, so it is identical across edit conditions.
    """
    if not 0.0 < mask_ratio < 1.0:
        msg = f"mask_ratio must be in (0, 1), got {mask_ratio}."
        raise ValueError(msg)
    values = batch.values
    eligible = (values != pad_value) & ~batch.padding_mask
    eligible[:, 0] = False  # <cls>
    n_mask = (eligible.sum(1).double() * mask_ratio).floor().long()  # (B,)
    gen = torch.Generator().manual_seed(int(seed))
    scores = torch.rand(values.shape, generator=gen)
    scores[~eligible] = 2.0  # never chosen
    rank = scores.argsort(dim=1).argsort(dim=1)
    mask = rank < n_mask[:, None]
    masked = values.masked_fill(mask, mask_value)
    return Batch(batch.cells, batch.src, masked, batch.padding_mask, target=values, mask=mask)


def iter_batches(tok: TokenizedCells, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0,
                 mask_ratio: float | None = None, mask_value: float = -1.0, cells: np.ndarray | None = None):
    """Yield `Batch`es (masked when `mask_ratio` is given) over all or the chosen cells."""
    for i, idx in enumerate(bucket_batches(tok.lengths, batch_size, shuffle=shuffle, seed=seed, cells=cells)):
        batch = collate(tok, idx)
        if mask_ratio:
            batch = mask_batch(batch, mask_ratio, mask_value=mask_value, pad_value=tok.pad_value,
                               seed=seed * 1_000_003 + i)
        yield batch
