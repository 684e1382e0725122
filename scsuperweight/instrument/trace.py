"""`Trace`: forward hooks on named sites that keep streaming reductions, never the full activations.

Per site and channel it keeps the running max |x| with the cell, position and token where it occurred (exact), how
many cells have that channel as their largest (overall and per group; exact), the mean |x| (estimated from sampled
rows, exact when a batch has fewer rows than the sample) and a log-scale histogram of |x| from which a robust typical
magnitude (the median) is read. Memory is O(sites x channels), whatever the number of cells. Full tensors are kept
only for the sites named in `keep`.

Speed: each hook reduces its activation while it is still in cache and writes a few small results into blocks
allocated once per batch. For float32 CPU activations the C extension `_reduce` does it in one pass over the
values (the per-cell max over positions, the batch max's cell and position, each cell's top channel, the sampled
rows' sum and histogram). Otherwise a torch path writes |x| into a reused buffer and makes the same reductions in
a few passes; both give the same answers. At the end of the batch (`Trace.run`, or on access) the blocks are
folded into the running statistics (NumPy arrays) in a few operations per width, not a dozen per site. A tensor
seen by several sites (a norm's output is the next linear's input) is reduced once, and one hook per module serves
all its sites. `benchmarks/bench_trace.py` measures the overhead.

While active it switches off torch's fused encoder fast path and nested tensors (both bypass submodule hooks),
and it raises if a hook it placed never fired. Everything is undone on exit, also on exceptions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..adapters import Adapter, BatchContext, Site, get_adapter
from ..errors import HookError
from ..models._torch import no_fastpath

try:  # the optional one-pass C reduction (built with the package where a C compiler is present)
    from . import _reduce as _native
except ImportError:  # pragma: no cover - exercised where the extension was not built
    _native = None

# Whether float32 CPU activations go through the C pass (set SCSUPERWEIGHT_NATIVE=0 to force the torch path).
NATIVE = os.environ.get("SCSUPERWEIGHT_NATIVE", "1") != "0"

# The |x| histogram bins float32 bit patterns: for x >= 0 the bits read as an int32 grow with x, so `bits >> 18`
# (8 exponent bits, 5 mantissa bits) is a log-scale bin 2**(1/32) wide (2.2%), found with one shift and no log.
_SHIFT = 18
_BIN_LO = (127 - 34) << 5  # the first regular bin starts at 2**-34 (5.8e-11)
_BIN_HI = (127 + 27) << 5  # the last one ends at 2**27 (1.3e8)
_HIST_BINS = _BIN_HI - _BIN_LO + 2  # + an underflow bin (0 < |x| < 2**-34) first and an overflow bin (inf, NaN) last
_HIST_SAMPLE = 1 << 13  # values per activation tensor that feed the histogram (whole rows, every step-th)


def _bin_edges() -> np.ndarray:
    """Lower edge of every histogram bin (the underflow bin: 0) and the upper edge of the last regular bin."""
    codes = np.arange(_BIN_LO, _BIN_HI + 1, dtype=np.int64) << _SHIFT
    edges = codes.astype(np.int32).view(np.float32).astype(np.float64)
    return np.concatenate([[0.0], edges])


_EDGES = _bin_edges()


def _padding(ctx: BatchContext, B: int, L: int, device) -> dict:
    """The padding of one batch, shared by all widths: padding rows, valid rows and the (B, L) mask (all None
    when no row is padding)."""
    mask = ctx.padding_mask
    if mask is not None and tuple(mask.shape) == (B, L):
        pad = mask.reshape(-1).to(device=device, dtype=torch.bool)
        pad_rows = pad.nonzero()[:, 0]
        if len(pad_rows):
            return {"pad_rows": pad_rows, "valid_rows": (~pad).nonzero()[:, 0], "pad_mask": pad.view(B, L)}
    return {"pad_rows": None, "valid_rows": None, "pad_mask": None}


def _geometry(ctx: BatchContext, B: int, L: int, d: int, device, padding: dict | None = None) -> dict:
    """Padding rows, the valid-row count and the sampled rows for one batch shape and width.

    The sample is every `step`-th valid (cell, position) row, all its channels: about `_HIST_SAMPLE` values whatever
    the width. A row is contiguous in memory, so the sample reads a `1/step` share of the tensor (a strided sample
    of single values would touch nearly every cache line). The step is coprime with the sequence length, so that
    the sampled positions cycle through every position over the cells rather than always hitting the same ones
    (position 0 is `<cls>`).
    """
    g = dict(padding if padding is not None else _padding(ctx, B, L, device))
    g["n_valid"] = B * L if g["valid_rows"] is None else int(g["valid_rows"].numel())
    step = max(1, g["n_valid"] // max(1, _HIST_SAMPLE // d))
    while step > 1 and math.gcd(step, L) != 1:
        step += 1
    g["step"] = step
    g["channels"] = torch.arange(d, device=device)
    g["sample"] = None if g["pad_rows"] is None else g["valid_rows"][::step]
    g["sample_rows"] = (torch.arange(0, g["n_valid"], step, device=device) if g["sample"] is None
                        else g["sample"].contiguous())  # the same rows as flat indices, for the native pass
    g["weight"] = g["n_valid"] / max(g["sample_rows"].numel(), 1)  # valid rows per sampled row
    return g


class _Stack:
    """What the hooks kept of the activations of one batch and width, one row per distinct activation, in blocks
    allocated once per batch (the hooks write into them; the fold reads them at the end of the batch)."""

    def __init__(self, B: int, L: int, d: int, ctx: BatchContext, g: dict, device, capacity: int):
        self.B, self.L, self.d, self.ctx, self.g, self.device = B, L, d, ctx, g, device
        self.entries: list[list[str]] = []  # per activation: the site names that saw it
        self.blocks: dict[str, torch.Tensor] = {}
        self._allocate(max(capacity, 1))

    _LAYOUT = (  # name, shape after the row, dtype; in the order of reduce_f32's output arguments
        ("m", "d", torch.float32),  # the batch max |x| per channel
        ("b", "d", torch.long),  # the first cell (batch row) holding it
        ("pos", "d", torch.long),  # the first position in that cell holding it
        ("top", "B", torch.long),  # each cell's largest channel (the first, on ties)
        ("sums", "d", torch.float64),  # the sum of |x| over the sampled rows
        ("hist", "H", torch.long),  # the histogram of the sampled |x| (zeros excluded)
        ("n_zero", "", torch.long),  # the sampled zeros
    )

    def _allocate(self, capacity: int) -> None:
        sizes = {"d": (self.d,), "B": (self.B,), "H": (_HIST_BINS,), "": ()}
        old, n = self.blocks, len(self.entries)
        self.blocks = {name: torch.empty((capacity, *sizes[k]), dtype=dt, device=self.device)
                       for name, k, dt in self._LAYOUT}
        for name, t in old.items():
            self.blocks[name][:n] = t[:n]
        self.capacity = capacity
        # the address of row 0 and the bytes per row of every block, for the C pass
        self._ptrs = [(t.data_ptr(), t.stride(0) * t.element_size()) for t in self.blocks.values()]

    def slot(self) -> int:
        """The row for the next activation (the blocks double when full)."""
        if len(self.entries) == self.capacity:
            self._allocate(2 * self.capacity)
        return len(self.entries)

    def row_ptrs(self, i: int) -> list[int]:
        return [p + i * step for p, step in self._ptrs]


class _Store:
    """The running reductions of every site of one width, one row per site (so a batch updates all in a few ops).

    NumPy arrays: the fold makes a few dozen operations on small arrays per batch, where torch's per-operation
    overhead would cost several times more; `SiteStats` hands them out as tensors sharing the memory.
    """

    _FIELDS = {  # name: (shape after the row, dtype, initial value)
        "max_abs": ("d", np.float64, 0), "sum_abs": ("d", np.float64, 0), "arg_cell": ("d", np.int64, -1),
        "arg_pos": ("d", np.int64, -1), "arg_token": ("d", np.int64, -1), "top_count": ("d", np.int64, 0),
        "hist": ("H", np.float64, 0), "n_zero": ("", np.float64, 0), "n_positions": ("", np.int64, 0),
        "n_cells": ("", np.int64, 0), "calls": ("", np.int64, 0),
    }

    def __init__(self, d: int):
        self.d = d
        self.rows: dict[str, int] = {}
        shapes = {"d": (d,), "H": (_HIST_BINS,), "": ()}
        for name, (k, dt, _) in self._FIELDS.items():
            setattr(self, name, np.zeros((0, *shapes[k]), dtype=dt))
        self.group_top: dict[int, np.ndarray] = {}  # group code -> (rows, d) top-channel counts
        self.group_cells: dict[int, np.ndarray] = {}  # group code -> (rows,) cells

    def add(self, name: str) -> int:
        row = self.rows[name] = len(self.rows)

        def grow(a: np.ndarray, fill=0) -> np.ndarray:
            return np.concatenate([a, np.full((1, *a.shape[1:]), fill, dtype=a.dtype)])

        for field, (_, _, fill) in self._FIELDS.items():
            setattr(self, field, grow(getattr(self, field), fill))
        for code in self.group_top:
            self.group_top[code], self.group_cells[code] = grow(self.group_top[code]), grow(self.group_cells[code])
        return row

    def group(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        if code not in self.group_top:
            n = len(self.rows)
            self.group_top[code] = np.zeros((n, self.d), dtype=np.int64)
            self.group_cells[code] = np.zeros(n, dtype=np.int64)
        return self.group_top[code], self.group_cells[code]


class SiteStats:
    """Streaming reductions of one site; all tensors live on the CPU and have one entry per channel.

    ``max_abs`` (max |x|), ``arg_cell`` / ``arg_pos`` / ``arg_token`` (where it occurred: global cell index, position,
    token id; -1 while a channel was only ever 0), ``sum_abs`` (sum of |x| over valid positions, estimated from the
    sampled rows), ``top_count`` (cells whose largest channel this is),
    ``hist`` (log-scale histogram of a strided sample of the non-zero |x|, weighted to the full count), ``n_zero``
    (exact zeros, weighted likewise), ``n_positions``, ``n_cells``, ``calls``; per group: ``group_top``,
    ``group_cells``.
    """

    def __init__(self, site: Site, store: _Store, row: int):
        self.site, self._store, self._row = site, store, row

    d = property(lambda self: self._store.d)
    max_abs = property(lambda self: torch.from_numpy(self._store.max_abs[self._row]))
    arg_cell = property(lambda self: torch.from_numpy(self._store.arg_cell[self._row]))
    arg_pos = property(lambda self: torch.from_numpy(self._store.arg_pos[self._row]))
    arg_token = property(lambda self: torch.from_numpy(self._store.arg_token[self._row]))
    sum_abs = property(lambda self: torch.from_numpy(self._store.sum_abs[self._row]))
    top_count = property(lambda self: torch.from_numpy(self._store.top_count[self._row]))
    hist = property(lambda self: torch.from_numpy(self._store.hist[self._row]))
    n_zero = property(lambda self: float(self._store.n_zero[self._row]))
    n_positions = property(lambda self: int(self._store.n_positions[self._row]))
    n_cells = property(lambda self: int(self._store.n_cells[self._row]))
    calls = property(lambda self: int(self._store.calls[self._row]))

    @property
    def group_cells(self) -> dict[int, int]:
        return {c: int(t[self._row]) for c, t in self._store.group_cells.items() if int(t[self._row])}

    @property
    def group_top(self) -> dict[int, torch.Tensor]:
        return {c: torch.from_numpy(self._store.group_top[c][self._row]) for c in self.group_cells}

    def median_abs(self, nonzero: bool = False) -> float:
        """Histogram estimate of the median |x| (over non-zero values when `nonzero`): the bin's geometric centre."""
        hist = self._store.hist[self._row]
        zeros = 0.0 if nonzero else self.n_zero
        total = float(hist.sum()) + zeros
        if total == 0:
            return float("nan")
        half = total / 2
        if zeros >= half:
            return 0.0
        k = int(np.searchsorted(np.cumsum(hist) + zeros, half))
        if k == 0:  # the underflow bin: below 2**-34
            return float(_EDGES[1] / 2)
        if k >= _HIST_BINS - 1:  # the overflow bin
            return float("inf")
        return float(math.sqrt(_EDGES[k] * _EDGES[k + 1]))

    def typical(self) -> float:
        """Robust typical magnitude: the median |x|, or the non-zero median when over a quarter are exactly 0."""
        total = float(self._store.hist[self._row].sum()) + self.n_zero
        if total and self.n_zero / total > 0.25:  # ReLU-like sites: the zeros say nothing about magnitude
            return self.median_abs(nonzero=True)
        med = self.median_abs()
        return med if med > 0 else self.median_abs(nonzero=True)

    def top_channel(self) -> int:
        return int(self._store.max_abs[self._row].argmax())

    def stability(self, channel: int) -> float:
        """Fraction of cells whose largest channel at this site is `channel`."""
        return float(self._store.top_count[self._row, channel]) / max(self.n_cells, 1)

    def group_stability(self, channel: int) -> dict[int, float]:
        return {g: float(c[channel]) / max(self.group_cells[g], 1) for g, c in self.group_top.items()}


def _reduce_tensor(a: torch.Tensor, g: dict, stack: _Stack, i: int) -> None:
    """The passes over every value of one activation's |x| (`a`, (B, L, d), a scratch buffer still in cache), into
    row `i` of the stack's blocks: the torch path, for activations the C pass does not take (GPU, other dtypes).

    Zeroes the padding rows, then keeps the batch max per channel with the first cell row holding it and the first
    position in that row (the order of a max over all (row, position) pairs), each cell's largest channel, the sum
    per channel and the histogram of a strided sample of rows.
    """
    B, L, d = a.shape
    blk = stack.blocks
    flat = a.view(B * L, d)
    if g["pad_rows"] is not None:
        flat.index_fill_(0, g["pad_rows"], 0.0)
    cellmax = a.amax(1)  # (B, d)
    m, b = cellmax.max(0)  # the first maximal row
    blk["m"][i], blk["b"][i] = m, b
    blk["pos"][i] = a[b, :, g["channels"]].argmax(1)  # (d, L) -> the first maximal position
    blk["top"][i] = cellmax.argmax(1)
    rows = flat[::g["step"]] if g["sample"] is None else flat.index_select(0, g["sample"])  # (k, d)
    torch.sum(rows, 0, dtype=torch.float64, out=blk["sums"][i])
    bits = rows.view(torch.int32) >> _SHIFT  # |x| >= 0: the bit patterns grow with the value
    n_zero = (bits == 0).sum()  # 0 (and denormals below 2**-131)
    idx = (bits - (_BIN_LO - 1)).clamp_(0, _HIST_BINS - 1)
    hist = torch.bincount(idx.view(-1), minlength=_HIST_BINS)
    hist[0] -= n_zero  # zeros fell into the underflow bin: they are counted apart
    blk["hist"][i], blk["n_zero"][i] = hist, n_zero


def _reduce_native(x: torch.Tensor, g: dict, stack: _Stack, i: int) -> None:
    """`_reduce_tensor`'s results for a float32 CPU activation with contiguous channels, in one pass over x.

    `_reduce.reduce_f32` (C) reads each value once, skipping the padding rows, and writes only the small results
    (into row `i` of the stack's blocks), instead of writing |x| and reading it back four times. The tests require
    both paths to give the same answers.
    """
    B, L, d = x.shape
    pad = g["pad_mask"]
    rows = g["sample_rows"]
    _native.reduce_f32(x.data_ptr(), B, L, d, x.stride(0), x.stride(1), 0 if pad is None else pad.data_ptr(),
                       rows.data_ptr(), rows.numel(), _SHIFT, _BIN_LO, _HIST_BINS, *stack.row_ptrs(i))


def _native_ok(x: torch.Tensor) -> bool:
    return NATIVE and _native is not None and x.dtype == torch.float32 and x.device.type == "cpu" and \
        x.stride(-1) == 1 and x.dim() == 3


def _reduce_stack(stack: _Stack) -> dict:
    """The rest of the reductions of the S activations of one batch, in a few operations for all of them.

    Returns small NumPy arrays, one row per activation: the batch max with its cell row and position, the sum of
    |x|, each cell's top channel and their counts, the histogram and the count of zeros (both weighted by the
    sampling step).
    """
    S, d, weight = len(stack.entries), stack.d, stack.g["weight"]
    blk = {name: t[:S].cpu().numpy() for name, t in stack.blocks.items()}
    top = blk["top"]  # (S, B) each cell's largest channel
    counts = np.bincount((top + np.arange(0, S * d, d)[:, None]).ravel(), minlength=S * d).reshape(S, d)
    return {"sum_abs": blk["sums"] * weight, "top": top, "top_count": counts, "hist": blk["hist"] * weight,
            "n_zero": blk["n_zero"] * weight, "m": blk["m"].astype(np.float64), "arg_b": blk["b"],
            "arg_pos": blk["pos"]}


def _version(t) -> int | None:
    """The in-place version counter of a tensor (None for inference-mode tensors, which have none)."""
    if t is None:
        return -1
    try:
        return t._version
    except RuntimeError:
        return None


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
        self._stats: dict[str, SiteStats] = {}
        self._stores: dict[int, _Store] = {}  # width -> the running reductions of its sites
        self.full: dict[str, list[torch.Tensor]] = {n: [] for n in self.keep}
        self.contexts: list[BatchContext] = []  # the contexts of kept batches (only when keep is set)
        self._handles: list = []
        self._ctx = BatchContext(None, None, None)
        self._pending: BatchContext | None = None
        self._next_cell = 0
        self._saved: dict = {}
        self._active = False
        # Per batch, each hooked tensor is reduced in its hook into one row of a stack per width (small results);
        # at the end of the batch the stacks are folded into the running statistics in a few operations per width.
        # A tensor seen by two sites (a norm's output is the next linear's input, a block's output is its last
        # norm's) is reduced once.
        self._geom_owner: tuple = ()
        self._geom: dict = {}
        self._memo: tuple = ()
        self._stacks: dict = {}  # (width, device) -> _Stack waiting to be folded in
        self._scratch: dict = {}  # device -> flat float32 buffer for |x|, reused by every hook (torch path)
        self._capacity: dict = {}  # (width, device) -> activations per batch so far (the stacks' block size)
        self._info: tuple = ()  # (ctx, shape, per-batch info shared by the widths)
        self._rows_memo: dict = {}  # (store, the stack's site names) -> store rows
        self._pending_sites: set[str] = set()
        # Several processes: with keep_sums, `state` carries every batch's float sums and `merge_state` adds them
        # batch by batch, so the merged sums equal one process's to the last bit (float addition is not
        # associative; adding a shard's total would round differently).
        self.keep_sums = False
        self._sum_parts: list = []  # (width, store rows, sum_abs, hist, n_zero) per folded stack

    # -- context management --------------------------------------------------------------------------------
    def __enter__(self) -> Trace:
        self._saved["switch"] = no_fastpath(self.model)
        self._saved["switch"].__enter__()
        try:
            if self.adapter.token_module:
                tm = self.model.get_submodule(self.adapter.token_module)
                self._handles.append(tm.register_forward_pre_hook(self._on_tokens))
            # One hook per module and direction serves all its sites. Inputs are reduced in a pre-hook, before the
            # module runs: the tensor was just written and is still in cache (after the module has written its
            # own output it is not), and an in-place module cannot have changed it yet.
            by_module: dict[tuple[str, bool], list[Site]] = {}
            for site in self.sites:
                by_module.setdefault((site.module, site.io == "in"), []).append(site)
            for (module, inputs), sites in by_module.items():
                mod = self.model.get_submodule(module)
                if inputs:
                    self._handles.append(mod.register_forward_pre_hook(self._make_pre_hook(sites)))
                else:
                    self._handles.append(mod.register_forward_hook(self._make_hook(sites)))
        except BaseException:
            self._restore()
            raise
        self._active = True
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.flush()
        except Exception:
            if exc_type is None:
                self._restore()
                raise
        self._restore()
        if exc_type is None and self.check_fired:
            stats = self._stats
            never = [s.name for s in self.sites if s.name not in stats or stats[s.name].calls == 0]
            if never and any(st.calls for st in stats.values()) or (never and self._next_cell):
                msg = (f"hooks on {never} never fired although the model ran; the model may take a fused path "
                       "that bypasses these modules, or these modules are not used by its forward.")
                raise HookError(msg)
            if never and not stats:
                msg = ("no hook fired: the model was never run inside the Trace. Call tr.run(batch) or the model "
                       "inside the `with` block.")
                raise HookError(msg)

    def _restore(self) -> None:
        self._geom_owner, self._geom, self._memo, self._stacks, self._scratch = (), {}, (), {}, {}
        self._info, self._rows_memo = (), {}
        self._pending_sites.clear()
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
            self.flush()

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

    def _make_hook(self, sites: list[Site]):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            for site in sites:
                self._see(site, out)

        return hook

    def _make_pre_hook(self, sites: list[Site]):
        def pre_hook(module, args):
            x = args[0] if args else None
            for site in sites:
                self._see(site, x)

        return pre_hook

    def _see(self, site: Site, x) -> None:
        if not isinstance(x, torch.Tensor) or x.is_nested:
            return
        if site.name in self._pending_sites:  # the module ran twice in this batch: fold the first call in
            self.flush()
        st = self._stats.get(site.name)
        if st is None:
            d = x.shape[-1]
            store = self._stores.setdefault(d, _Store(d))
            st = self._stats[site.name] = SiteStats(site, store, store.add(site.name))
        if self.reductions:
            self._push(x, site.name)
        else:
            st._store.calls[st._row] += 1
        if site.name in self.keep:
            self.full[site.name].append(x.detach().cpu())

    def _push(self, x: torch.Tensor, name: str) -> None:
        """Reduce |x| of one hooked tensor into the batch's stack (once per tensor, however many sites see it)."""
        seen = x  # the object the module passed on: the next hook sees the same one (`detach` makes a new one)
        x = x.detach()
        if x.dim() == 2:  # (L, d) unbatched
            x = x[None]
        ctx = self._ctx
        version = _version(x)
        memo = self._memo
        if memo and memo[0] is seen and version is not None and memo[1] == version and memo[2] is ctx:
            # the tensor the previous hook saw, unmodified: its reductions are already in the stack
            memo[3].append(name)
            self._pending_sites.add(name)
            return
        B, L, d = x.shape
        key = (d, x.device)
        stack = self._stacks.get(key)
        if stack is not None and ((stack.B, stack.L) != (B, L) or stack.ctx is not ctx):
            self.flush()
            stack = None
        if stack is None:
            stack = self._stacks[key] = _Stack(B, L, d, ctx, self._geometry_for(ctx, B, L, d, x.device), x.device,
                                               self._capacity.get(key, 32))
        i = stack.slot()
        if _native_ok(x):
            _reduce_native(x, stack.g, stack, i)
        else:
            n = B * L * d
            buf = self._scratch.get(x.device)
            if buf is None or buf.numel() < n:
                buf = self._scratch[x.device] = torch.empty(n, dtype=torch.float32, device=x.device)
            a = buf[:n].view(B, L, d)
            if x.dtype == torch.float32:
                torch.abs(x, out=a)
            else:
                a.copy_(x.abs())
            _reduce_tensor(a, stack.g, stack, i)
        entry = [name]
        stack.entries.append(entry)
        self._pending_sites.add(name)
        self._memo = (seen, version, ctx, entry) if version is not None else ()

    def _geometry_for(self, ctx: BatchContext, B: int, L: int, d: int, device) -> dict:
        mask = ctx.padding_mask
        owner = self._geom_owner
        if not (owner and owner[0] is ctx and owner[1] is mask and owner[2] == _version(mask)):
            self._geom_owner, self._geom = (ctx, mask, _version(mask)), {}
        key = (B, L, d, device)
        g = self._geom.get(key)
        if g is None:
            padding = self._geom.get((B, L, device))
            if padding is None:
                padding = self._geom[(B, L, device)] = _padding(ctx, B, L, device)
            g = self._geom[key] = _geometry(ctx, B, L, d, device, padding)
        return g

    def flush(self) -> None:
        """Fold the batch's reductions into the running statistics (done after each `run` and on access)."""
        stacks, self._stacks, self._memo = self._stacks, {}, ()
        self._pending_sites.clear()
        for key, stack in stacks.items():
            if stack.entries:
                self._capacity[key] = max(self._capacity.get(key, 0), len(stack.entries))
                self._fold(stack)

    def _batch_info(self, ctx: BatchContext, B: int, L: int) -> dict:
        """Per batch, shared by its widths: the global cell indices, the token ids and the cells' groups."""
        memo = self._info
        if memo and memo[0] is ctx and memo[1] == (B, L):
            return memo[2]
        info = {"cells": np.asarray(ctx.cells, dtype=np.int64) if ctx.cells is not None else np.arange(B),
                "tokens": ctx.token_ids.cpu().long().numpy() if ctx.token_ids is not None and
                tuple(ctx.token_ids.shape) == (B, L) else None}
        if self.groups is not None and ctx.cells is not None:
            codes, inv = np.unique(self.groups[np.asarray(ctx.cells)], return_inverse=True)
            info["groups"] = (codes.tolist(), inv.astype(np.int64).ravel(), np.bincount(inv, minlength=len(codes)))
        self._info = (ctx, (B, L), info)
        return info

    def _rows_for(self, store: _Store, entries: list[list[str]]):
        """The store rows of a stack's sites (a slice when they are consecutive, as in every batch after the
        first) and, when tensors were seen by several sites, which reduction row feeds each site."""
        key = (id(store), tuple(tuple(e) for e in entries))
        hit = self._rows_memo.get(key)
        if hit is None:
            rows = [store.rows[n] for e in entries for n in e]
            ent = [i for i, e in enumerate(entries) for _ in e]
            consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
            hit = self._rows_memo[key] = (slice(rows[0], rows[0] + len(rows)) if consecutive else np.array(rows),
                                          None if len(ent) == len(entries) else np.array(ent), len(rows))
        return hit

    def _fold(self, stack: _Stack) -> None:
        B, L, d, g = stack.B, stack.L, stack.d, stack.g
        store = self._stores[d]
        info = self._batch_info(stack.ctx, B, L)
        r = _reduce_stack(stack)
        rows, ent, n = self._rows_for(store, stack.entries)
        if ent is not None:  # tensors seen by several sites: one reduction row each
            r = {k: v[ent] for k, v in r.items()}
        m, b, pos = r["m"], r["arg_b"], r["arg_pos"]
        cur = store.max_abs[rows]
        better = m > cur
        store.max_abs[rows] = np.where(better, m, cur)
        store.arg_cell[rows] = np.where(better, info["cells"][b], store.arg_cell[rows])
        store.arg_pos[rows] = np.where(better, pos, store.arg_pos[rows])
        if info["tokens"] is not None:
            store.arg_token[rows] = np.where(better, info["tokens"][b, pos], store.arg_token[rows])
        store.sum_abs[rows] += r["sum_abs"]
        store.top_count[rows] += r["top_count"]
        store.hist[rows] += r["hist"]
        store.n_zero[rows] += r["n_zero"]
        if self.keep_sums:  # each batch's float sums, so that a merge can replay them in one-process order
            where = np.arange(len(store.rows))[rows] if isinstance(rows, slice) else rows
            self._sum_parts.append((d, where, r["sum_abs"].copy(), r["hist"].copy(), np.array(r["n_zero"])))
        store.n_positions[rows] += g["n_valid"]
        store.n_cells[rows] += B
        store.calls[rows] += 1
        if "groups" in info:
            codes, inv, sizes = info["groups"]
            K = len(codes)
            key = (inv[None, :] * n + np.arange(n)[:, None]) * d + r["top"]
            per = np.bincount(key.ravel(), minlength=K * n * d).reshape(K, n, d)
            for k, code in enumerate(codes):
                top_k, cells_k = store.group(int(code))
                top_k[rows] += per[k]
                cells_k[rows] += sizes[k]

    # -- results -------------------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, SiteStats]:
        """Site name -> `SiteStats`, up to date with every batch run so far."""
        if self._stacks:
            self.flush()
        return self._stats

    def summary(self, site: str) -> dict:
        st = self.stats[site]
        store, row = st._store, st._row
        c = st.top_channel()
        typical = st.typical()
        tok = int(store.arg_token[row, c])
        max_abs, n_positions = float(store.max_abs[row, c]), int(store.n_positions[row])
        return {
            "layer": st.site.layer, "site": st.site.kind, "site_name": site,
            "max_abs": max_abs, "median_abs": typical,
            "ratio": max_abs / typical if typical > 0 else float("inf"),
            "channel": c, "token": self.adapter.token_name(tok) if tok >= 0 else "",
            "cell": int(store.arg_cell[row, c]), "position": int(store.arg_pos[row, c]), "stability": st.stability(c),
            "mean_abs_channel": float(store.sum_abs[row, c]) / max(n_positions, 1), "n_cells": st.n_cells,
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per traced site (the activations.tsv table)."""
        stats = self.stats
        rows = [self.summary(s.name) for s in self.sites if s.name in stats and stats[s.name].calls]
        return pd.DataFrame(rows)

    # -- several processes ---------------------------------------------------------------------------------
    def state(self) -> dict:
        """The running reductions as plain arrays per site (picklable), to merge traces of several processes."""
        out = {}
        for name, st in self.stats.items():
            store, row = st._store, st._row
            rec = {field: np.array(getattr(store, field)[row]) for field in _Store._FIELDS}
            rec["group_top"] = {c: t[row].copy() for c, t in store.group_top.items()}
            rec["group_cells"] = {c: int(t[row]) for c, t in store.group_cells.items()}
            if self.keep_sums:
                rec["sum_parts"] = [(sa[i], hi[i], nz[i]) for d, where, sa, hi, nz in self._sum_parts
                                    if d == store.d for i in np.flatnonzero(where == row)]
            out[name] = rec
        return out

    def merge_state(self, state: dict) -> None:
        """Fold in another trace's `state` as if its batches had run after this trace's.

        Maxima follow the one-process rule (a later batch wins only when strictly larger), so merging the shards of
        one batch sequence in order gives the one-process maxima, argmaxes and counts exactly. The float sums
        (``sum_abs``, ``hist``, ``n_zero``) are added batch by batch when the state carries them (a trace with
        ``keep_sums = True``): then they are exact too; otherwise per shard, which can differ in the last bit.
        Merging into an empty trace (not entered) reproduces the state exactly.
        """
        self.flush()
        for name, rec in state.items():
            st = self._stats.get(name)
            if st is None:
                store = self._stores.setdefault(len(rec["max_abs"]), _Store(len(rec["max_abs"])))
                st = self._stats[name] = SiteStats(self.adapter.sites[name], store, store.add(name))
            store, row = st._store, st._row
            better = rec["max_abs"] > store.max_abs[row]
            for field in ("max_abs", "arg_cell", "arg_pos", "arg_token"):
                getattr(store, field)[row] = np.where(better, rec[field], getattr(store, field)[row])
            exact = "sum_parts" in rec
            for field in ("sum_abs", "top_count", "hist", "n_zero", "n_positions", "n_cells", "calls"):
                if not (exact and field in ("sum_abs", "hist", "n_zero")):
                    getattr(store, field)[row] += rec[field]
            for sa, hi, nz in rec.get("sum_parts", ()):
                store.sum_abs[row] += sa
                store.hist[row] += hi
                store.n_zero[row] += nz
            for code, top in rec["group_top"].items():
                top_k, cells_k = store.group(int(code))
                top_k[row] += top
                cells_k[row] += rec["group_cells"][code]
