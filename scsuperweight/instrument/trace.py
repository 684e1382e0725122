"""`Trace`: forward hooks on named sites that keep streaming reductions, never the full activations.

Per site and channel it keeps the running max |x| with the cell, position and token where it occurred, the mean
|x|, how many cells have that channel as their largest (overall and per group), and a log-scale histogram of |x|
from which a robust typical magnitude (the median) is read. Memory is O(sites x channels), whatever the number of
cells. Full tensors are kept only for the sites named in `keep`.

While active it switches off torch's fused encoder fast path and nested tensors (both bypass submodule hooks),
and it raises if a hook it placed never fired. Everything is undone on exit, also on exceptions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..adapters import Adapter, BatchContext, Site, get_adapter
from ..errors import HookError

_HIST_LO, _HIST_HI, _HIST_BINS = -10.0, 8.0, 1800  # log10 |x| from 1e-10 to 1e8 in 0.01 steps
_HIST_SAMPLE = 1 << 16  # values per call that feed the histogram (a strided subsample)


@dataclass
class _Reduced:
    """One batch's reductions of one activation tensor; sites that see the same tensor share them."""

    B: int
    L: int
    m: torch.Tensor  # (d,) max |x| per channel over the batch, float64, CPU
    arg_b: torch.Tensor  # (d,) batch row of the first (row, position) holding it, as max(0) over (B * L, d), CPU
    arg_pos: torch.Tensor  # (d,) and its position, CPU
    sum_abs: torch.Tensor  # (d,) float64, CPU
    n_valid: int
    top: torch.Tensor  # (B,) each cell's largest channel, CPU
    hist: torch.Tensor | None  # (_HIST_BINS,) float64, CPU, already weighted by the sampling step
    n_zero: int  # sampled values that are not > 0, weighted by the step


def _geometry(ctx: BatchContext, B: int, L: int, d: int, device) -> dict:
    """Padding rows, the valid-row count and the histogram's sample indices for one batch shape and width."""
    g: dict = {}
    mask = ctx.padding_mask
    if mask is not None and tuple(mask.shape) == (B, L):
        pad = mask.reshape(-1).to(device)
        pad_rows = pad.nonzero()[:, 0]
        valid_rows = (~pad).nonzero()[:, 0]
        g["n_valid"] = int(valid_rows.numel())
    else:
        pad_rows, g["n_valid"] = None, B * L
    n = g["n_valid"] * d
    step = max(1, n // _HIST_SAMPLE)
    while step > 1 and math.gcd(step, d) != 1:  # a stride sharing a factor with d would sample only some channels
        step += 1
    g["step"] = step
    g["pad_rows"] = pad_rows if pad_rows is not None and len(pad_rows) else None
    g["sample"] = None
    if g["pad_rows"] is not None:
        # every step-th value of the valid rows flattened, (n_valid, d) row-major, as flat indices into (B * L * d)
        k = torch.arange(0, n, step, device=device)
        rows = torch.div(k, d, rounding_mode="floor")
        g["sample"] = valid_rows[rows] * d + (k - rows * d)
    return g


def _log_hist(vals: torch.Tensor) -> torch.Tensor:
    """`torch.histc(torch.log10(vals), _HIST_BINS, _HIST_LO, _HIST_HI)` as float64 counts on the CPU, for vals >= 0.

    The same bin for every float32 value as histc: its arithmetic, trunc((log10 v - lo) * bins / (hi - lo)) in
    float32, the top edge in the last bin, values outside the range, NaN and zeros (log10 = -inf) dropped; checked
    over every float32 in [1e-11, 1e9]. But in a few cheap in-place passes and a bincount rather than histc's scalar
    loop, and without log10(0), which takes a slow path: zeros are lifted to 1e-30 first, below the range anyway.
    """
    t = torch.log10(vals.clamp(min=1e-30))
    t.sub_(_HIST_LO).mul_(_HIST_BINS).div_(_HIST_HI - _HIST_LO)  # histc's position, before truncation
    # below the range (t < 0) and NaN -> 0; bin k -> k + 1; t >= bins -> bins + 1 (above the range or the top edge)
    t.nan_to_num_(nan=-1.0).clamp_(-1.0, _HIST_BINS).floor_().add_(1.0)
    counts = torch.bincount(t.int(), minlength=_HIST_BINS + 2).cpu()
    hist = counts[1:_HIST_BINS + 1].double()
    if counts[_HIST_BINS + 1]:  # rare (|x| >= 1e8): histc keeps a value whose log10 is exactly hi in the last bin
        lv = torch.log10(vals.clamp(min=1e-30))
        top = (lv.sub(_HIST_LO).mul_(_HIST_BINS).div_(_HIST_HI - _HIST_LO) >= _HIST_BINS) & (lv <= _HIST_HI)
        hist[-1] += int(top.sum())
    return hist


def _reduce(x: torch.Tensor, ctx: BatchContext, geometry: dict | None = None, scratch: dict | None = None
            ) -> _Reduced:
    """Every per-batch reduction of one activation (the hot path of a trace: it runs per site and batch).

    One abs, one in-place zeroing of the padding rows, one amax over positions (the batch max, each cell's top
    channel and where the max sits all follow from the per-cell max), one sum, and the histogram of a fixed strided
    sample gathered without packing the valid rows. Only small per-channel results are returned. `geometry` caches
    `_geometry` across the sites of one batch; `scratch` keeps the |x| buffer between calls (a fresh
    activation-sized buffer costs a page fault per 4 KiB on every call).
    """
    x = x.detach()
    if x.dim() == 2:  # (L, d) unbatched
        x = x[None]
    B, L, d = x.shape
    # |x| into a contiguous float32 buffer of our own (so its padding can be zeroed in place) in one pass, whatever
    # x's layout (attention outputs come transposed from (L, B, d))
    n = B * L * d
    buf = scratch.get(x.device) if scratch is not None else None
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32, device=x.device)
        if scratch is not None:
            scratch[x.device] = buf
    a = buf[:n].view(B, L, d)
    if x.dtype == torch.float32:
        torch.abs(x, out=a)
    else:
        a.copy_(x.abs())
    key = (B, L, d, a.device)
    g = geometry.get(key) if geometry is not None else None
    if g is None:
        g = _geometry(ctx, B, L, d, a.device)
        if geometry is not None:
            geometry[key] = g
    flat = a.view(B * L, d)
    if g["pad_rows"] is not None:
        flat[g["pad_rows"]] = 0.0
    cellmax = a.amax(1)  # (B, d)
    m = cellmax.amax(0)  # (d,) max is exact: the same values as a max over all positions
    # where each channel's max sits: the first row reaching it, then the first position in that row
    arg_b = (cellmax == m).to(torch.uint8).argmax(0)  # (d,)
    arg_pos = (a[arg_b, :, torch.arange(d, device=a.device)] == m[:, None]).to(torch.uint8).argmax(1)  # (d,)
    sum_abs = a.sum((0, 1)).double().cpu()
    top = cellmax.argmax(1).cpu()  # (B,) each cell's largest channel
    step = g["step"]
    vals = flat.view(-1)[::step] if g["sample"] is None else flat.view(-1).index_select(0, g["sample"])
    n_pos = int(torch.count_nonzero(vals > 0))
    n_zero = (vals.numel() - n_pos) * step
    hist = _log_hist(vals) * step if n_pos else None
    return _Reduced(B, L, m.double().cpu(), arg_b.cpu(), arg_pos.cpu(), sum_abs, g["n_valid"], top, hist, n_zero)


@dataclass
class SiteStats:
    """Streaming reductions of one site; all tensors live on the CPU and have one entry per channel."""

    site: Site
    d: int
    max_abs: torch.Tensor
    arg_cell: torch.Tensor
    arg_pos: torch.Tensor
    arg_token: torch.Tensor
    sum_abs: torch.Tensor
    n_positions: int = 0
    n_cells: int = 0
    top_count: torch.Tensor | None = None
    group_top: dict = field(default_factory=dict)  # group code -> (d,) counts
    group_cells: dict = field(default_factory=dict)  # group code -> n cells
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(_HIST_BINS, dtype=torch.float64))
    n_zero: int = 0
    calls: int = 0

    @classmethod
    def empty(cls, site: Site, d: int) -> SiteStats:
        z = torch.zeros(d, dtype=torch.float64)
        i = torch.full((d,), -1, dtype=torch.long)
        return cls(site, d, z.clone(), i.clone(), i.clone(), i.clone(), z.clone(),
                   top_count=torch.zeros(d, dtype=torch.long))

    def update(self, x: torch.Tensor, ctx: BatchContext, groups: np.ndarray | None,
               reduced: _Reduced | None = None) -> None:
        """Fold one batch's activations `x` (B, L, d) into the running reductions (`reduced`: already reduced)."""
        r = reduced if reduced is not None else _reduce(x, ctx)
        m = r.m
        better = m > self.max_abs
        if better.any():
            cols = better.nonzero()[:, 0]
            b, pos = r.arg_b[cols], r.arg_pos[cols]
            cells = torch.as_tensor(ctx.cells, dtype=torch.long) if ctx.cells is not None else torch.arange(r.B)
            self.max_abs[cols] = m[cols]
            self.arg_cell[cols] = cells[b]
            self.arg_pos[cols] = pos
            if ctx.token_ids is not None and ctx.token_ids.shape == (r.B, r.L):
                self.arg_token[cols] = ctx.token_ids.cpu()[b, pos]
        self.sum_abs += r.sum_abs
        self.n_positions += r.n_valid
        top = r.top
        self.top_count += torch.bincount(top, minlength=self.d)
        self.n_cells += r.B
        if groups is not None and ctx.cells is not None:
            g = groups[np.asarray(ctx.cells)]
            for code in np.unique(g):
                sel = torch.from_numpy(g == code)
                self.group_top.setdefault(int(code), torch.zeros(self.d, dtype=torch.long))
                self.group_top[int(code)] += torch.bincount(top[sel], minlength=self.d)
                self.group_cells[int(code)] = self.group_cells.get(int(code), 0) + int(sel.sum())
        self.n_zero += r.n_zero
        if r.hist is not None:
            self.hist += r.hist
        self.calls += 1

    def median_abs(self, nonzero: bool = False) -> float:
        """Histogram estimate of the median |x| (over non-zero values when `nonzero`)."""
        total = self.hist.sum().item() + (0 if nonzero else self.n_zero)
        if total == 0:
            return float("nan")
        half = total / 2
        if not nonzero and self.n_zero >= half:
            return 0.0
        cum = torch.cumsum(self.hist, 0) + (0 if nonzero else self.n_zero)
        k = int(torch.searchsorted(cum, torch.tensor(half, dtype=torch.float64)))
        width = (_HIST_HI - _HIST_LO) / _HIST_BINS
        return float(10 ** (_HIST_LO + (k + 0.5) * width))

    def typical(self) -> float:
        """Robust typical magnitude: the median |x|, or the non-zero median when over a quarter are exactly 0."""
        total = self.hist.sum().item() + self.n_zero
        if total and self.n_zero / total > 0.25:  # ReLU-like sites: the zeros say nothing about magnitude
            return self.median_abs(nonzero=True)
        med = self.median_abs()
        return med if med > 0 else self.median_abs(nonzero=True)

    def top_channel(self) -> int:
        return int(self.max_abs.argmax())

    def stability(self, channel: int) -> float:
        """Fraction of cells whose largest channel at this site is `channel`."""
        return float(self.top_count[channel]) / max(self.n_cells, 1)

    def group_stability(self, channel: int) -> dict[int, float]:
        return {g: float(c[channel]) / max(self.group_cells[g], 1) for g, c in self.group_top.items()}


def _version(t) -> int | None:
    """The in-place version counter of a tensor (None for inference-mode tensors, which have none)."""
    if t is None:
        return -1
    try:
        return t._version
    except RuntimeError:
        return None


def _set_fastpath(enabled: bool) -> bool:
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    return prev


@contextmanager
def no_fastpath(model: nn.Module):
    """Switch off torch's fused encoder fast path and nested tensors (both bypass submodule hooks); restore after."""
    prev = _set_fastpath(False)
    nested = [(m, m.use_nested_tensor) for m in model.modules() if isinstance(m, nn.TransformerEncoder)]
    for m, _ in nested:
        m.use_nested_tensor = False
    try:
        yield
    finally:
        _set_fastpath(prev)
        for m, flag in nested:
            m.use_nested_tensor = flag


class Trace:
    """Hook sites of a model and keep streaming reductions of their activations.

    Parameters
    ----------
    model
        A model or an adapter (`scsuperweight.adapters.get_adapter`).
    sites
        ``"all"``, a site name (``"L2.ffn_out"``), a kind (``"ffn_out"``: every layer), a glob (``"L1.*"``), a list
        of those, or a predicate on `Site`.
    keep
        Sites whose full activations are also kept (on CPU), for small runs only.
    groups
        Optional integer code per cell (global cell index) for per-group stability.
    check_fired
        Raise on exit if a placed hook never fired.

    Examples
    --------
    >>> with Trace(model, "ffn_out") as tr:
    ...     for batch in batches:
    ...         tr.run(batch)
    >>> tr.to_frame()  # one row per site: max |x|, its channel and token, median, stability
    """

    def __init__(self, model: nn.Module | Adapter, sites: str | Sequence[str] | Callable[[Site], bool] = "all", *,
                 keep: str | Sequence[str] | None = None, groups: np.ndarray | None = None,
                 reductions: bool = True, check_fired: bool = True):
        self.adapter = get_adapter(model)
        self.model = self.adapter.model
        self.sites = self.adapter.select_sites(sites)
        self.keep = {s.name for s in self.adapter.select_sites(keep)} if keep else set()
        for name in self.keep:
            if name not in {s.name for s in self.sites}:
                self.sites.append(self.adapter.sites[name])
        self.groups = None if groups is None else np.asarray(groups)
        self.reductions = reductions
        self.check_fired = check_fired
        self.stats: dict[str, SiteStats] = {}
        self.full: dict[str, list[torch.Tensor]] = {n: [] for n in self.keep}
        self.contexts: list[BatchContext] = []  # the contexts of kept batches (only when keep is set)
        self._handles: list = []
        self._ctx = BatchContext(None, None, None)
        self._pending: BatchContext | None = None
        self._next_cell = 0
        self._saved: dict = {}
        self._active = False
        # per batch: geometry shared by all sites, and the last tensor's reductions (a norm's output is also the
        # next linear's input, a block's output is its last norm's: such sites see one tensor and share one pass)
        self._geom_owner: tuple = ()
        self._geom: dict = {}
        self._memo: tuple = ()
        self._scratch: dict = {}

    # -- context management --------------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        self._saved["switch"] = no_fastpath(self.model)
        self._saved["switch"].__enter__()
        try:
            if self.adapter.token_module:
                tm = self.model.get_submodule(self.adapter.token_module)
                self._handles.append(tm.register_forward_pre_hook(self._on_tokens))
            for site in self.sites:
                mod = self.model.get_submodule(site.module)
                self._handles.append(mod.register_forward_hook(self._make_hook(site)))
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._restore()
        if exc_type is None and self.check_fired:
            never = [s.name for s in self.sites if s.name not in self.stats or self.stats[s.name].calls == 0]
            if never and any(st.calls for st in self.stats.values()) or (never and self._next_cell):
                msg = (f"hooks on {never} never fired although the model ran; the model may take a fused path "
                       "that bypasses these modules, or these modules are not used by its forward.")
                raise HookError(msg)
            if never and not self.stats:
                msg = ("no hook fired: the model was never run inside the Trace. Call tr.run(batch) or the model "
                       "inside the `with` block.")
                raise HookError(msg)

    def _restore(self) -> None:
        self._geom_owner, self._geom, self._memo, self._scratch = (), {}, (), {}
        for h in self._handles:
            h.remove()
        self._handles.clear()
        switch = self._saved.pop("switch", None)
        if switch is not None:
            switch.__exit__(None, None, None)
        self._active = False

    # -- running -------------------------------------------------------------------------------------------
    def run(self, batch):
        """Run one batch through the adapter, with its cell indices and padding known to the hooks."""
        self._pending = self.adapter.batch_context(batch)
        try:
            return self.adapter.run(batch)
        finally:
            self._pending = None

    def set_context(self, ctx: BatchContext) -> None:
        """For runners that bypass the token module (e.g. a rerun from a middle layer)."""
        self._ctx = ctx

    def _on_tokens(self, module, args):
        ids = args[0] if args else None
        ctx = self.adapter.context_from_tokens(ids) if isinstance(ids, torch.Tensor) else BatchContext(None, None)
        if self._pending is not None:
            p = self._pending
            ctx = BatchContext(p.token_ids if p.token_ids is not None else ctx.token_ids,
                               p.padding_mask if p.padding_mask is not None else ctx.padding_mask, p.cells)
        if ctx.cells is None and ctx.token_ids is not None:
            B = ctx.token_ids.shape[0] if ctx.token_ids.dim() > 1 else 1
            ctx.cells = np.arange(self._next_cell, self._next_cell + B)
            self._next_cell += B
        elif ctx.cells is not None:
            self._next_cell = max(self._next_cell, int(np.max(ctx.cells)) + 1)
        self._ctx = ctx
        if self.keep:
            self.contexts.append(ctx)

    def _make_hook(self, site: Site):
        def hook(module, args, output):
            x = args[0] if site.io == "in" else (output[0] if isinstance(output, tuple) else output)
            if not isinstance(x, torch.Tensor) or x.is_nested:
                return
            if self.reductions:
                st = self.stats.get(site.name)
                if st is None:
                    st = self.stats[site.name] = SiteStats.empty(site, x.shape[-1])
                st.update(x, self._ctx, self.groups, reduced=self._reduced(x))
            elif site.name not in self.stats:
                self.stats[site.name] = SiteStats.empty(site, x.shape[-1])
                self.stats[site.name].calls = 1
            if site.name in self.keep:
                self.full[site.name].append(x.detach().cpu())

        return hook

    def _reduced(self, x: torch.Tensor) -> _Reduced:
        """`_reduce(x)`, reusing the reductions of the previous hook when it saw this very tensor, unmodified."""
        ctx = self._ctx
        mask = ctx.padding_mask
        owner = self._geom_owner
        if not (owner and owner[0] is ctx and owner[1] is mask and owner[2] == _version(mask)):
            self._geom_owner, self._geom, self._memo = (ctx, mask, _version(mask)), {}, ()
        memo = self._memo
        version = _version(x)
        if memo and memo[0] is x and version is not None and memo[1] == version:
            return memo[2]
        r = _reduce(x, ctx, self._geom, self._scratch)
        self._memo = (x, version, r) if version is not None else ()
        return r

    # -- results -------------------------------------------------------------------------------------------
    def summary(self, site: str) -> dict:
        st = self.stats[site]
        c = st.top_channel()
        typical = st.typical()
        tok = int(st.arg_token[c])
        return {
            "layer": st.site.layer, "site": st.site.kind, "site_name": site,
            "max_abs": float(st.max_abs[c]), "median_abs": typical,
            "ratio": float(st.max_abs[c]) / typical if typical > 0 else float("inf"),
            "channel": c, "token": self.adapter.token_name(tok) if tok >= 0 else "",
            "cell": int(st.arg_cell[c]), "position": int(st.arg_pos[c]), "stability": st.stability(c),
            "mean_abs_channel": float(st.sum_abs[c]) / max(st.n_positions, 1), "n_cells": st.n_cells,
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per traced site (the activations.tsv table)."""
        rows = [self.summary(s.name) for s in self.sites if s.name in self.stats and self.stats[s.name].calls]
        return pd.DataFrame(rows)
