"""A first-order null over every scalar of a parameter: one backward pass instead of one forward per scalar.

Zeroing a scalar w changes the primary metric L by about ``-w * dL/dw`` (first-order Taylor expansion, as in
attribution patching). One backward pass of L over the fixed masked batches gives that estimate for every scalar of
every parameter at once, so a candidate can be placed among *all* scalars of its matrix (rank, percentile), not
only among a few dozen random draws, and a third screen (``screen="gradient"``) can rank scalars by predicted
effect. The estimate is good for small perturbations and poor for the large ones that matter most (a super weight's
removal is not small), so it ranks and describes; the exact draws still decide.

The metric is the scGPT primary metric, ``gepc_mse``: the per-cell masked MSE of the MVC decoder averaged over
cells, computed from the model's forward outputs as `runners.scgpt.reconstruction_from_outputs` does, but kept in the
autograd graph (``gep_mse``, the per-position decoder, when the model has no MVC decoder or it is asked for).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from .adapters import get_adapter
from .detect import screen_targets
from .errors import DataError

_OUTPUT_OF = {"gepc_mse": "mvc_output", "gep_mse": "mlm_output"}


def _metric_output(model, metric: str) -> str:
    if metric not in _OUTPUT_OF:
        msg = f"`metric` must be one of {sorted(_OUTPUT_OF)} for a first-order null; got {metric!r}."
        raise DataError(msg)
    if metric == "gepc_mse" and not hasattr(model, "mvc_decoder"):
        msg = "this model has no MVC decoder, so `gepc_mse` is undefined; pass metric='gep_mse'."
        raise DataError(msg)
    return _OUTPUT_OF[metric]


def _summed_cell_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over cells of each cell's masked MSE (differentiable); cells with no masked gene contribute 0."""
    m = mask.float()
    per_cell = (((pred.float() - target) ** 2) * m).sum(1) / m.sum(1).clamp(min=1)  # (B,)
    return per_cell.sum()


def first_order_effects(model, masked_batches: Sequence, params: Sequence[str], *, metric: str = "gepc_mse"
                        ) -> dict[str, torch.Tensor]:
    """First-order change of the mean per-cell `metric` when each scalar of each parameter in `params` is zeroed.

    Returns ``{param: tensor of the parameter's shape}`` (float32, CPU): ``-w * dL/dw`` with L the metric averaged
    over every cell of `masked_batches` (the same fixed, seeded masked batches prune measures on). Positive means
    zeroing that scalar is predicted to *raise* the error. The model's weights and mode are left as they were.
    """
    net = get_adapter(model).model
    out_key = _metric_output(net, metric)
    batches = list(masked_batches)
    if not batches or any(getattr(b, "mask", None) is None for b in batches):
        msg = "`masked_batches` must be masked batches (built with mask_ratio > 0, e.g. runners.scgpt.masked_batches)."
        raise DataError(msg)
    named = dict(net.named_parameters())
    missing = [p for p in params if p not in named]
    if missing:
        msg = f"no parameter(s) {missing} in this model; use names from model.named_parameters()."
        raise DataError(msg)
    device = next(net.parameters()).device
    targets = [named[p] for p in params]
    grads = [torch.zeros_like(t, dtype=torch.float32) for t in targets]
    n_cells = sum(len(b.cells) for b in batches)
    was_training = net.training
    net.eval()  # dropout off: the metric prune measures is the eval-mode one
    try:
        with torch.enable_grad():
            for batch in batches:
                b = batch.to(device)
                out = net(b.src, b.values, b.padding_mask)
                loss = _summed_cell_mse(out[out_key], b.target, b.mask) / n_cells
                for acc, g in zip(grads, torch.autograd.grad(loss, targets, allow_unused=True)):
                    if g is not None:
                        acc += g.float()
    finally:
        net.train(was_training)
    return {p: (-t.detach().float() * g).cpu() for p, t, g in zip(params, targets, grads)}


def rank_of(effects: torch.Tensor, index: Sequence[int] | int) -> tuple[int, float]:
    """Rank (1 = largest |effect|) and percentile (100 = no scalar has a larger |effect|) of one scalar."""
    a = effects.detach().abs().reshape(-1).double()
    v = float(effects.detach().abs()[(index,) if isinstance(index, int) else tuple(int(i) for i in index)])
    tol = 1e-12 * max(1.0, v)
    rank = int((a > v + tol).sum()) + 1
    percentile = 100.0 * float((a <= v + tol).sum()) / a.numel()
    return rank, percentile


def rank_correlation(first_order, exact) -> float:
    """Spearman correlation between first-order estimates and exact zeroing effects (NaN pairs dropped)."""
    x, y = np.asarray(first_order, dtype=float), np.asarray(exact, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:  # a constant side: no rank order to compare
        return float("nan")
    return float(spearmanr(x[ok], y[ok]).statistic)


def gradient_screen(model, masked_batches: Sequence, *, top_k: int = 3, min_ratio: float = 10.0,
                    metric: str = "gepc_mse") -> pd.DataFrame:
    """Third screen: the scalars whose removal is predicted (first order) to move `metric` most.

    Over the parameters the weight screen ranks (FFN down-projections, attention output projections, the gains
    and biases of the norms that write sites), the `top_k` scalars per parameter by |first-order effect|. Rows use
    the superweights.tsv columns with ``screen="gradient"``, ``effect`` (predicted change of the metric),
    ``effect_ratio`` (|effect| / median |effect| of that parameter), ``percentile`` within the parameter and
    ``above_threshold`` (``effect_ratio >= min_ratio``); sorted by |effect|, which is in the metric's units and so
    comparable across parameters. Leads to test, never a verdict.
    """
    adapter = get_adapter(model)
    targets = screen_targets(adapter)
    effects = first_order_effects(adapter.model, masked_batches, [p for _, _, p in targets], metric=metric)
    rows = []
    for site, kind, pname in targets:
        e = effects[pname]
        a = e.abs().reshape(-1)
        med = float(a.median())
        w = adapter.param(pname).detach().float().cpu().reshape(-1)
        vals, idx = a.topk(min(top_k, a.numel()))
        for v, i in zip(vals.tolist(), idx.tolist()):
            coord = np.unravel_index(i, tuple(e.shape))
            row, col = int(coord[0]), (int(coord[1]) if len(coord) > 1 else None)
            ratio = v / med if med > 0 else float("inf")
            rows.append({"candidate": adapter.candidate_id(pname, coord), "kind": kind, "layer": site.layer,
                         "param": pname, "row": row, "col": col, "value": float(w[i]),
                         "spike": np.nan, "spike_ratio": np.nan, "token": "", "stability": np.nan,
                         "effect": float(e.reshape(-1)[i]), "effect_ratio": ratio,
                         "percentile": rank_of(e, coord)[1], "above_threshold": ratio >= min_ratio,
                         "screen": "gradient", "threshold_ratio": min_ratio, "metric": metric})
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["col"] = df["col"].astype("Int64")
    df = df.iloc[np.argsort(-df["effect"].abs().to_numpy(), kind="stable")].reset_index(drop=True)
    df["rank"] = np.arange(1, len(df) + 1)
    return df
