"""Super-weight-aware quantisation: round-to-nearest fake quantisation with and without the candidates held out.

The super-weight paper's practical result (Yu et al. 2024): in round-to-nearest INT4, one huge scalar sets the scale
of its whole block and every other weight of the block rounds to a few levels (or to zero); holding that scalar out
in full precision lets much larger blocks work. This module measures the same on any model with an adapter:

- `fake_quantize` rounds one tensor symmetrically to INT8/INT4 levels, per tensor, per row, or in blocks of the
  flattened tensor, optionally excluding held-out entries from the scale and keeping them exact, and optionally
  clipping the scale (a percentile of |w|, or the MSE-optimal fraction of the absolute maximum per group);
- `quantized` applies a `QuantSetting` to every linear weight inside a context manager that puts the weights back
  bit for bit (`scsuperweight.instrument.swapped`);
- `quantize_sweep` runs the model under each setting and tabulates `<cls>` cosine to full precision, the family's
  reconstruction error (GEPC MSE for scGPT) and kNN accuracy (the quantize.tsv table).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import metrics as M
from . import results as R
from ._log import logger
from .adapters import get_adapter
from .errors import DataError
from .instrument import swapped

GRANULARITIES = ("tensor", "row", "block")
CLIPS = ("none", "percentile", "mse")
QUANTIZE_COLUMNS = list(R.spec("quantize").contract)  # quantize.tsv, declared once in `results`


@dataclass(frozen=True)
class QuantSetting:
    """One round-to-nearest setting (symmetric, signed levels ``-(2^(b-1)-1) .. 2^(b-1)-1``)."""

    bits: int = 4  # 8 or 4 (any 2..16 works)
    granularity: str = "block"  # "tensor", "row" (one scale per output row) or "block" (the flattened tensor)
    block_size: int | None = 128  # entries per block, for granularity="block"
    holdout: bool = False  # keep the candidates in full precision and out of the scale
    clip: str = "none"  # "none", "percentile" (scale from a percentile of |w|) or "mse" (best fraction of max |w|)
    percentile: float = 99.9  # for clip="percentile"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            msg = f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}."
            raise ValueError(msg)
        if self.clip not in CLIPS:
            msg = f"clip must be one of {CLIPS}, got {self.clip!r}."
            raise ValueError(msg)
        if not 2 <= int(self.bits) <= 16:
            msg = f"bits must be between 2 and 16 (8 and 4 are the usual), got {self.bits!r}."
            raise ValueError(msg)
        if self.granularity == "block" and (self.block_size is None or int(self.block_size) < 1):
            msg = f"granularity='block' needs block_size >= 1 (e.g. 64 .. 4096), got {self.block_size!r}."
            raise ValueError(msg)

    @property
    def name(self) -> str:
        gran = f"block{self.block_size}" if self.granularity == "block" else self.granularity
        clip = "" if self.clip == "none" else f"/clip-{self.clip}"
        return f"int{self.bits}/{gran}{'/holdout' if self.holdout else ''}{clip}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.granularity != "block":
            d["block_size"] = None
        return d


def default_settings(bits: Sequence[int] = (8, 4), block_sizes: Sequence[int] = (64, 256, 1024, 4096),
                     clips: Sequence[str] = ("none", "mse"), granularities: Sequence[str] = GRANULARITIES
                     ) -> list[QuantSetting]:
    """The grid the issue asks for: bits x (tensor, row, blocks) x held out or not x clipped or not."""
    out = []
    for b in bits:
        for g in granularities:
            for bs in (block_sizes if g == "block" else (None,)):
                for clip in clips:
                    for hold in (False, True):
                        out.append(QuantSetting(int(b), g, bs, hold, clip))
    return out


def linear_weights(model) -> list[str]:
    """Names of every linear weight: `nn.Linear` weights and attention's packed input projection."""
    net = get_adapter(model).model
    names = []
    for mname, mod in net.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, nn.Linear):
            names.append(f"{prefix}weight")
        elif isinstance(mod, nn.MultiheadAttention) and getattr(mod, "in_proj_weight", None) is not None:
            names.append(f"{prefix}in_proj_weight")
    return names


def _groups(w: torch.Tensor, s: QuantSetting) -> tuple[torch.Tensor, int]:
    """(n_groups, group_size) view of `w` for the setting (blocks padded with zeros at the end)."""
    flat = w.reshape(-1)
    if s.granularity == "tensor":
        return flat[None], 0
    if s.granularity == "row":
        return w.reshape(w.shape[0], -1), 0
    size = int(s.block_size)
    pad = (-flat.numel()) % size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, size), pad


def _round(g: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g / safe), -qmax, qmax) * safe
    return torch.where(scale > 0, q, torch.zeros_like(q))


def fake_quantize(w: torch.Tensor, setting: QuantSetting, keep: torch.Tensor | None = None,
                  mse_grid: int = 20) -> torch.Tensor:
    """Round `w` to the setting's levels and back (a float tensor of the same shape and dtype).

    `keep` is a bool mask of entries held out: they do not enter any scale and come back unchanged (only used when
    ``setting.holdout``). Clipping picks, per group, the scale from the `percentile` of |w| or the fraction of the
    group's max |w| (from `mse_grid` fractions in [0.3, 1]) with the smallest squared rounding error.
    """
    qmax = 2 ** (int(setting.bits) - 1) - 1
    x = w.detach().double()
    hold = keep is not None and setting.holdout and bool(keep.any())
    src = torch.where(keep, torch.zeros_like(x), x) if hold else x
    g, pad = _groups(src, setting)
    a = g.abs()
    amax = a.amax(1, keepdim=True)
    if setting.clip == "percentile":
        scale = torch.quantile(a, setting.percentile / 100.0, dim=1, keepdim=True) / qmax
        scale = torch.where(scale > 0, scale, amax / qmax)  # a mostly-zero group: fall back to its max
    elif setting.clip == "mse":
        best, best_err = amax / qmax, None
        for frac in torch.linspace(0.3, 1.0, mse_grid, dtype=x.dtype):
            sc = amax * frac / qmax
            err = ((_round(g, sc, qmax) - g) ** 2).sum(1, keepdim=True)
            if best_err is None:
                best, best_err = sc, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, sc, best), torch.where(better, err, best_err)
        scale = best
    else:
        scale = amax / qmax
    q = _round(g, scale, qmax).reshape(-1)
    if pad:
        q = q[:-pad]
    q = q.reshape(w.shape)
    if hold:
        q = torch.where(keep, x, q)
    return q.to(w.dtype)


def holdout_masks(model, candidates: pd.DataFrame | Iterable | None) -> dict[str, torch.Tensor]:
    """Per linear weight, a bool mask of the candidate scalars in it (candidates table with param/row/col, or
    ``(param, (row, col))`` pairs); LN dimensions and parameters that are not quantised are ignored."""
    adapter = get_adapter(model)
    quantised = set(linear_weights(adapter))
    pairs: list[tuple[str, tuple[int, ...]]] = []
    if candidates is None:
        return {}
    if hasattr(candidates, "iterrows"):
        for _, r in candidates.iterrows():
            col = r.get("col")
            if col is None or (isinstance(col, str) and not col) or bool(pd.isna(col)):
                continue
            pairs.append((str(r["param"]), (int(r["row"]), int(col))))
    else:
        pairs = [(str(p), tuple(int(i) for i in idx)) for p, idx in candidates]
    masks: dict[str, torch.Tensor] = {}
    for pname, idx in pairs:
        if pname not in quantised:
            continue
        p = adapter.param(pname)
        m = masks.setdefault(pname, torch.zeros(p.shape, dtype=torch.bool, device=p.device))
        m[idx] = True
    return masks


def quantized_tensors(model, setting: QuantSetting, candidates=None, params: Sequence[str] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """The fake-quantised value of every linear weight (or of `params`), and a summary (relative error, counts)."""
    adapter = get_adapter(model)
    names = list(params) if params is not None else linear_weights(adapter)
    masks = holdout_masks(adapter, candidates) if setting.holdout else {}
    new, err2, norm2, n, held = {}, 0.0, 0.0, 0, 0
    for name in names:
        w = adapter.param(name).detach()
        keep = masks.get(name)
        q = fake_quantize(w, setting, keep)
        new[name] = q
        err2 += float(((q.double() - w.double()) ** 2).sum())
        norm2 += float((w.double() ** 2).sum())
        n += w.numel()
        held += int(keep.sum()) if keep is not None else 0
    info = {"n_weights": n, "n_held_out": held, "weight_rel_error": (err2 / norm2) ** 0.5 if norm2 > 0 else 0.0}
    return new, info


class quantized:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Context manager: every linear weight fake-quantised by `setting`; restored bit for bit on exit.

    Examples
    --------
    >>> with quantized(model, QuantSetting(bits=4, granularity="block", block_size=256, holdout=True), cands) as q:
    ...     out = model(src, values, mask)
    >>> q.info["weight_rel_error"]
    """

    def __init__(self, model, setting: QuantSetting, candidates=None, params: Sequence[str] | None = None):
        self.tensors, self.info = quantized_tensors(model, setting, candidates, params)
        self._cm = swapped(model, self.tensors)

    def __enter__(self) -> quantized:
        self._cm.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _run(model, masked: Sequence, plain: Sequence, n_cells: int) -> dict[str, np.ndarray]:
    """Per-cell outputs of the model as it is now (the family's evaluator, no edits)."""
    from .prune import Condition, evaluator_for  # the family runners; the cache is built under the current weights

    return evaluator_for(model, masked, plain, n_cells).run(Condition("quantized", []))


def quantize_sweep(model, plain_batches: Sequence, masked_batches: Sequence, candidates=None,
                   settings: Sequence[QuantSetting] | None = None, labels=None, *, k: int = 10,
                   params: Sequence[str] | None = None, n_cells: int | None = None, progress: bool = False
                   ) -> pd.DataFrame:
    """Measure the model under each quantisation setting (the quantize.tsv table).

    Parameters
    ----------
    model
        A model with an adapter (scGPT or a BERT-family masked LM).
    plain_batches, masked_batches
        The fixed batches prune uses: plain for the cell embedding, masked for reconstruction.
    candidates
        Scalars to hold out (a superweights table, or ``(param, (row, col))`` pairs); only used by settings with
        ``holdout=True``.
    settings
        Default `default_settings()`.
    labels
        One label per cell (cell index order) for kNN accuracy; None skips it.
    k
        Neighbours for kNN accuracy.
    params
        Quantise only these weights (default every linear weight, `linear_weights`).

    Returns
    -------
    One row per setting, first ``full_precision``: the setting's fields, ``n_weights``, ``n_held_out``,
    ``weight_rel_error`` (relative Frobenius error over the quantised weights), ``cls_cosine`` (mean cosine of each
    cell's embedding to full precision), ``recon_metric`` / ``recon`` / ``recon_delta`` (the family's primary
    reconstruction error, GEPC MSE for scGPT, and its change) and ``knn_accuracy`` (leave-one-out, as prune's).
    """
    from tqdm.auto import tqdm

    adapter = get_adapter(model)
    settings = list(default_settings() if settings is None else settings)
    masked, plain = list(masked_batches), list(plain_batches)
    if n_cells is None:
        n_cells = int(max(int(np.max(b.cells)) for b in (*masked, *plain))) + 1 \
            if all(hasattr(b, "cells") for b in (*masked, *plain)) else len(labels)
    known = {f for s in M.METRICS.values() for f in s.primary_for}
    metric = M.registry.primary_metric(adapter.family) if adapter.family in known else "gepc_mse"
    lab = None if labels is None else np.asarray(labels)

    def measure(res: dict, base_emb: np.ndarray | None) -> dict:
        emb = res["cls"]
        ok = ~np.isnan(emb).any(1)
        row = {"recon_metric": metric, "recon": float(np.nanmean(res[metric])) if metric in res else np.nan}
        if base_emb is not None:
            a, b = emb[ok], base_emb[ok]
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
            row["cls_cosine"] = float(cos.mean())
        else:
            row["cls_cosine"] = 1.0
        row["knn_accuracy"] = np.nan
        if lab is not None:  # leave-one-out, as prune's per-cell knn_accuracy
            try:
                row["knn_accuracy"] = float(M.knn_label_correct(emb[ok], lab[ok], k=k).mean())
            except DataError as exc:
                logger.warning("quantize: no kNN accuracy (%s)", exc)
        return row

    base = _run(adapter, masked, plain, n_cells)
    rows = [{"setting": "full_precision", "bits": 32, "granularity": "", "block_size": None, "holdout": False,
             "clip": "none", "n_weights": sum(adapter.param(n).numel() for n in (params or linear_weights(adapter))),
             "n_held_out": 0, "weight_rel_error": 0.0, **measure(base, None)}]
    for s in tqdm(settings, desc="quantize", disable=not progress, leave=False):
        with quantized(adapter, s, candidates, params) as q:
            res = _run(adapter, masked, plain, n_cells)
        d = s.to_dict()
        d.pop("percentile")
        rows.append({"setting": s.name, **d, **q.info, **measure(res, base["cls"])})
        logger.info("%s: <cls> cosine %.4f, %s %.4g", s.name, rows[-1]["cls_cosine"], metric, rows[-1]["recon"])
    df = pd.DataFrame(rows)
    df["recon_delta"] = df["recon"] - df.loc[0, "recon"]
    df["block_size"] = df["block_size"].astype("Int64")
    return df[QUANTIZE_COLUMNS]


def holdout_gain(sweep: pd.DataFrame, metric: str = "cls_cosine") -> pd.DataFrame:
    """Per setting without holdout, the same setting with the candidates held out beside it, and the gain
    (``metric`` held out minus not; for ``recon`` a negative gain is an improvement): what the report states."""
    df = sweep[sweep["setting"] != "full_precision"]
    key = ["bits", "granularity", "block_size", "clip"]
    a = df[~df["holdout"].astype(bool)].set_index(key)[metric]
    b = df[df["holdout"].astype(bool)].set_index(key)[metric]
    out = pd.DataFrame({"without": a, "with_holdout": b}).dropna().reset_index()
    out["gain"] = out["with_holdout"] - out["without"]
    return out
