"""From a candidate's channel to genes: three kinds of evidence, each kept, combined into one rank.

For a candidate that writes channel `c` at site `s`:
- ``act_mean``: mean |activation| at (s, c) over the positions where a gene's token stands (which genes carry
  the channel), overall and per group (``act_mean:<group>``);
- ``recon_delta``: mean change of the squared masked-reconstruction error (GEP) at a gene's masked positions when
  the candidate is zeroed (signed: > 0 means the gene is reconstructed worse), overall and per group;
- ``emb_alignment``: the gene token embedding's (after the encoder norm) z-scored value at channel c.
``score`` is the mean of the three evidence columns' percentile ranks (absolute values; a missing evidence column is
left out), so a gene scores high when it carries the channel, loses most when it is cut, and points along it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import _keys as K
from .adapters import get_adapter
from .data.batches import Batch
from .instrument import ScalarEdit, edit, no_fastpath


def _edit_of(row) -> ScalarEdit:
    col = row["col"]
    idx = (int(row["row"]),) if col is None or pd.isna(col) else (int(row["row"]), int(col))
    return ScalarEdit(str(row["param"]), idx, 0.0)


def _group_codes(groups, n_cells) -> tuple[np.ndarray, list[str]]:
    if groups is None:
        return np.zeros(n_cells, dtype=np.int64), []
    names, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes.astype(np.int64), list(names)


@torch.no_grad()
def channel_by_token(model, batches: list[Batch], site: str, channel: int, groups=None, n_cells: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sum and count of |activation| at (site, channel) per (group, token id): arrays (G+1, vocab)."""
    adapter = get_adapter(model)
    n_cells = n_cells or int(max(int(b.cells.max()) for b in batches)) + 1
    codes, names = _group_codes(groups, n_cells)
    G = len(names) + 1  # last row: all cells
    V = adapter.model.config.ntoken
    sums = torch.zeros(G, V, dtype=torch.float64)
    counts = torch.zeros(G, V, dtype=torch.float64)
    mod = adapter.model.get_submodule(adapter.sites[site].module)
    io = adapter.sites[site].io
    captured = {}

    def hook(m, args, out):
        x = args[0] if io == "in" else (out[0] if isinstance(out, tuple) else out)
        captured["x"] = x[..., channel].detach().abs().double().cpu()

    h = mod.register_forward_hook(hook)
    try:
        with no_fastpath(adapter.model):
            for b in batches:
                adapter.run(b)
                a = captured["x"]  # (B, L)
                valid = ~b.padding_mask
                valid[:, 0] = False  # <cls> is not a gene
                tok = b.src[valid]
                g = torch.from_numpy(codes[b.cells])[:, None].expand_as(b.src)[valid]
                flat = g * V + tok
                sums.view(-1).index_add_(0, flat, a[valid])
                counts.view(-1).index_add_(0, flat, torch.ones_like(a[valid]))
                sums[G - 1].index_add_(0, tok, a[valid])
                counts[G - 1].index_add_(0, tok, torch.ones_like(a[valid]))
    finally:
        h.remove()
    return sums.numpy(), counts.numpy(), names


@torch.no_grad()
def recon_delta_by_token(model, masked: list[Batch], edits: list[ScalarEdit], groups=None, n_cells: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sum and count of (pruned - baseline) squared GEP error at masked positions per (group, token id)."""
    adapter = get_adapter(model)
    n_cells = n_cells or int(max(int(b.cells.max()) for b in masked)) + 1
    codes, names = _group_codes(groups, n_cells)
    G = len(names) + 1
    V = adapter.model.config.ntoken
    sums = torch.zeros(G, V, dtype=torch.float64)
    counts = torch.zeros(G, V, dtype=torch.float64)
    with no_fastpath(adapter.model):
        for b in masked:
            base = adapter.run(b)["mlm_output"].double().cpu()
            with edit(adapter, edits, verify=False):
                pruned = adapter.run(b)["mlm_output"].double().cpu()
            target = b.target.double()
            d = (pruned - target) ** 2 - (base - target) ** 2
            m = b.mask
            tok = b.src[m]
            g = torch.from_numpy(codes[b.cells])[:, None].expand_as(b.src)[m]
            sums.view(-1).index_add_(0, g * V + tok, d[m])
            counts.view(-1).index_add_(0, g * V + tok, torch.ones_like(d[m]))
            sums[G - 1].index_add_(0, tok, d[m])
            counts[G - 1].index_add_(0, tok, torch.ones_like(d[m]))
    return sums.numpy(), counts.numpy(), names


@torch.no_grad()
def embedding_alignment(model, channel: int) -> np.ndarray:
    """z-score of each token's normalised gene embedding at `channel` (vocab-sized)."""
    m = get_adapter(model).model
    e = m.encoder.enc_norm(m.encoder.embedding.weight).double()
    col = e[:, channel]
    return ((col - col.mean()) / col.std().clamp(min=1e-12)).cpu().numpy()


def _pct_rank(x: pd.Series) -> pd.Series:
    return x.abs().rank(pct=True)


def gene_scores(model, plain: list[Batch], masked: list[Batch], candidates: pd.DataFrame, *, groups=None,
                min_positions: int = 3, max_candidates: int = 3) -> pd.DataFrame:
    """The `genes.tsv` table for the top candidates (see module docstring)."""
    adapter = get_adapter(model)
    id2gene = {v: k for k, v in adapter.model.vocab.items()}
    n_cells = int(max(int(b.cells.max()) for b in plain)) + 1
    frames = []
    cands = candidates
    if "above_threshold" in cands and cands["above_threshold"].astype(bool).any():
        cands = cands[cands["above_threshold"].astype(bool)]
    if "primary" in cands and cands["primary"].astype(bool).any():
        cands = cands[cands["primary"].astype(bool)]
    for _, row in cands.head(max_candidates).iterrows():
        site, channel = row.get("site"), row.get("channel")
        if site is None or pd.isna(site) or site not in adapter.sites:
            continue
        channel = int(channel)
        s_act, c_act, names = channel_by_token(adapter, plain, site, channel, groups, n_cells)
        s_rec, c_rec, _ = recon_delta_by_token(adapter, masked, [_edit_of(row)], groups, n_cells)
        align = embedding_alignment(adapter, channel)
        seen = np.flatnonzero(c_act[-1] >= min_positions)
        seen = np.array([t for t in seen if not (id2gene.get(t, "").startswith("<"))], dtype=np.int64)
        if len(seen) == 0:
            continue
        df = pd.DataFrame({"candidate": row["candidate"], "gene": [id2gene[t] for t in seen]})
        df["act_mean"] = s_act[-1, seen] / c_act[-1, seen]
        with np.errstate(invalid="ignore", divide="ignore"):
            df["recon_delta"] = np.where(c_rec[-1, seen] > 0, s_rec[-1, seen] / c_rec[-1, seen], np.nan)
            for gi, gname in enumerate(names):
                df[f"act_mean:{gname}"] = np.where(c_act[gi, seen] > 0, s_act[gi, seen] / c_act[gi, seen], np.nan)
                df[f"recon_delta:{gname}"] = np.where(c_rec[gi, seen] > 0, s_rec[gi, seen] / c_rec[gi, seen],
                                                      np.nan)
        df["emb_alignment"] = align[seen]
        df["n_positions"] = c_act[-1, seen].astype(int)
        df["n_masked"] = c_rec[-1, seen].astype(int)
        evidence = [c for c in ("act_mean", "recon_delta", "emb_alignment") if df[c].notna().any()]
        df["score"] = pd.concat([_pct_rank(df[c]) for c in evidence], axis=1).mean(axis=1, skipna=True)
        df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        df["rank"] = np.arange(1, len(df) + 1)
        df["channel"] = channel
        df["site"] = site
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=K.GENE_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    first = [*K.GENE_COLUMNS, "act_mean", "recon_delta", "emb_alignment", "n_positions", "n_masked"]
    return out[first + [c for c in out.columns if c not in first]]
