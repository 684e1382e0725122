"""From a candidate's channel to genes: three kinds of evidence, each kept, combined into one rank.

For a candidate that writes channel `c` at site `s`:
- ``act_mean``: mean |activation| at (s, c) over the positions where a gene's token stands (which genes carry
  the channel), overall and per group (``act_mean:<group>``);
- ``recon_delta``: mean change of a gene's reconstruction error at its masked positions when the candidate is
  zeroed (signed: > 0 means the gene is reconstructed worse), overall and per group. scGPT: the squared error of
  the expression decoder (GEP); BERT-family masked LMs (Geneformer): the cross-entropy of the masked gene token;
- ``emb_alignment``: the gene token embedding's z-scored value at channel c, as the first block sees it (scGPT:
  after the encoder norm; BERT: word plus token-type embedding after the embedding LayerNorm, positions left out
  since a gene's rank position varies by cell; Llama: the raw token embedding).
``score`` is the mean of the evidence columns' percentile ranks (absolute values; a missing evidence column is
left out), so a gene scores high when it carries the channel, loses most when it is cut, and points along it.
Evidence a model cannot give (no masked-LM head, a causal LM, a channel wider than the embedding) is NaN.
All three work on any adapter: token ids, padding and cells come from `Adapter.batch_context`, gene names from
`Adapter.token_name`, the vocabulary size from the token embedding module.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import _keys as K
from .adapters import get_adapter
from .instrument import ScalarEdit, edit, no_fastpath
from .runners import get_runner


def _edit_of(row) -> ScalarEdit:
    col = row["col"]
    idx = (int(row["row"]),) if col is None or pd.isna(col) else (int(row["row"]), int(col))
    return ScalarEdit(str(row["param"]), idx, 0.0)


def _group_codes(groups, n_cells) -> tuple[np.ndarray, list[str]]:
    if groups is None:
        return np.zeros(n_cells, dtype=np.int64), []
    names, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes.astype(np.int64), list(names)


def _n_cells(batches) -> int:
    return int(max(int(np.max(b.cells)) for b in batches)) + 1


def vocab_size(model) -> int:
    """Number of token ids: rows of the adapter's token embedding module (else ``config.ntoken``/``vocab_size``)."""
    adapter = get_adapter(model)
    if adapter.token_module:
        emb = adapter.model.get_submodule(adapter.token_module)
        if hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
    cfg = adapter.model.config
    return int(getattr(cfg, "ntoken", None) or cfg.vocab_size)


class _ByToken:
    """Sums and counts per (group, token id), the last group row holding all cells: arrays (G+1, V)."""

    def __init__(self, n_groups: int, vocab: int):
        self.V = vocab
        self.sums = torch.zeros(n_groups + 1, vocab, dtype=torch.float64)
        self.counts = torch.zeros(n_groups + 1, vocab, dtype=torch.float64)

    def add(self, group: torch.Tensor, token: torch.Tensor, value: torch.Tensor) -> None:
        flat = group * self.V + token
        ones = torch.ones_like(value)
        self.sums.view(-1).index_add_(0, flat, value)
        self.counts.view(-1).index_add_(0, flat, ones)
        self.sums[-1].index_add_(0, token, value)
        self.counts[-1].index_add_(0, token, ones)


@torch.no_grad()
def channel_by_token(model, batches: list, site: str, channel: int, groups=None, n_cells: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sum and count of |activation| at (site, channel) per (group, token id): arrays (G+1, vocab).

    Padding and special tokens (``<cls>``, ``<eos>``, ...) are left out: they are not genes.
    """
    adapter = get_adapter(model)
    n_cells = n_cells or _n_cells(batches)
    codes, names = _group_codes(groups, n_cells)
    acc = _ByToken(len(names), vocab_size(adapter))
    specials = torch.tensor(sorted(adapter.special_token_ids()), dtype=torch.long)
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
                ctx = adapter.batch_context(b)
                adapter.run(b)
                a = captured["x"]  # (B, L)
                ids = ctx.token_ids.cpu()
                valid = ~torch.isin(ids, specials)
                if ctx.padding_mask is not None:
                    valid &= ~ctx.padding_mask.cpu()
                g = torch.from_numpy(codes[np.asarray(ctx.cells)])[:, None].expand_as(ids)
                acc.add(g[valid], ids[valid], a[valid])
    finally:
        h.remove()
    return acc.sums.numpy(), acc.counts.numpy(), names


@torch.no_grad()
def recon_delta_by_token(model, masked: list, edits: list[ScalarEdit], groups=None, n_cells: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Sum and count of (pruned - baseline) reconstruction error at masked positions per (group, token id).

    scGPT: squared GEP error; BERT-family masked LMs: cross-entropy of the masked token (batches with ``labels``).
    Models without a masked-reconstruction output (a bare encoder, a causal LM) give all-zero counts, which
    `gene_scores` turns into NaN evidence.
    """
    runner = get_runner(model)
    adapter = runner.adapter
    n_cells = n_cells or _n_cells(masked)
    codes, names = _group_codes(groups, n_cells)
    acc = _ByToken(len(names), vocab_size(adapter))
    with no_fastpath(adapter.model):
        for b in masked:
            base = runner.masked_errors(b)
            if base is None:
                break
            with edit(adapter, edits, verify=False):
                pruned = runner.masked_errors(b)
            rows, tok, err = base
            cells = np.asarray(adapter.batch_context(b).cells)
            g = torch.from_numpy(codes[cells])[rows]
            acc.add(g, tok, pruned[2] - err)
    return acc.sums.numpy(), acc.counts.numpy(), names


@torch.no_grad()
def embedding_alignment(model, channel: int) -> np.ndarray:
    """z-score of each token's input embedding at `channel` (vocab-sized; NaN where the family has none)."""
    e = get_runner(model).token_embeddings()  # as the first block sees it (the family runner knows)
    if e is None:
        return np.full(vocab_size(model), np.nan)
    if channel >= e.shape[1]:
        return np.full(e.shape[0], np.nan)
    col = e[:, channel].double()
    return ((col - col.mean()) / col.std().clamp(min=1e-12)).cpu().numpy()


def _pct_rank(x: pd.Series) -> pd.Series:
    return x.abs().rank(pct=True)


def gene_scores(model, plain: list, masked: list, candidates: pd.DataFrame, *, groups=None,
                min_positions: int = 3, max_candidates: int = 3) -> pd.DataFrame:
    """The `genes.tsv` table for the top candidates (see module docstring).

    `plain` and `masked` are the same cells' batches (scGPT `Batch`es, or Geneformer `CellBatch`es with
    ``labels`` for the masked ones); gene names are the adapter's token names (set
    ``get_adapter(model).id_to_token`` for a transformers model to get symbols).
    """
    adapter = get_adapter(model)
    specials = adapter.special_token_ids()
    n_cells = _n_cells(plain)
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
        genes = [adapter.token_name(t) for t in seen]
        keep = [t not in specials and not g.startswith("<") for t, g in zip(seen, genes)]
        seen = seen[np.asarray(keep, dtype=bool)] if len(seen) else seen
        if len(seen) == 0:
            continue
        df = pd.DataFrame({"candidate": row["candidate"], "gene": [g for g, k in zip(genes, keep) if k]})
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
