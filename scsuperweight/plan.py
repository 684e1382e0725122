"""A plan before the work: what a run will compute, how many FLOPs that is, and how long it will take here.

The forward FLOPs are counted from the architecture (matmuls only, 2 FLOPs per multiply-add; norms, softmax and
activations are a few percent and left out). Per cell of L tokens, d = d_model, per encoder block:
QKV and output projections 8·L·d², FFN 4·L·d·d_hid, attention scores and mixing 4·L²·d; the value encoder
2·L·d² (+ 2·L·d); the expression decoder 4·L·d² (+ 2·L·d); the MVC decoder 4·L·d² (+ 2·L·d).
At the published size (d=512, 12 blocks) and L=1,200 that is about 80 GFLOP per cell.

A prune condition edits parameters and reruns only the blocks from the first edited one (prune caches every block
input once), over the masked cells with the decoders and over the plain cells without them. A short calibration
forward on the device gives its FLOP rate; FLOPs / rate is the estimated wall time.

`choose_budget` turns a time budget into knob settings, cutting in an order that protects validity first (see its
docstring), and says why in words.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from .errors import DataError

# ------------------------------------------------------------------------------------------------------------
# tokens per cell of the analysis steps
# ------------------------------------------------------------------------------------------------------------
# scan, prune and run read at most this many tokens per cell (<cls> included) by default, through scGPT's own
# seeded random gene subsampling; attention grows as the square of the length, so 512 of 1,200 tokens cut a
# condition's forward about 3x. Every condition and control of a run sees the same inputs, so the p-values stay
# exact: fidelity (effects describe 512-gene views of the cells), not validity. The budget's tokens-per-cell knob
# starts here (floor 256); `embed` keeps the model's full length; max_seq_len=1200 / "full" restores it.
PRUNE_MAX_SEQ_LEN = 512


def analysis_seq_len(max_seq_len: int | str | None, full: int) -> int:
    """The tokens per cell scan / prune / run use on a model whose own input length is `full`: `max_seq_len` as
    given, ``"full"`` the model's, None ``min(PRUNE_MAX_SEQ_LEN, full)``."""
    if max_seq_len is None:
        return min(PRUNE_MAX_SEQ_LEN, int(full))
    return int(full) if max_seq_len == "full" else int(max_seq_len)


def seq_len_note(max_seq_len: int, full: int, *, requested: int | str | None = None) -> str:
    """One line for the plan and run.json: the tokens per cell chosen, why, and what it means."""
    why = (f"the scan/prune default (PRUNE_MAX_SEQ_LEN); --max-seq-len {full} or 'full' (max_seq_len={full}) "
           "restores full length") if requested is None else f"max_seq_len={requested!r} as asked"
    if max_seq_len >= full:
        return f"tokens per cell: the model's full length, {full} ({why})"
    return (f"tokens per cell: at most {max_seq_len} of the model's {full} ({why}); cells with more than "
            f"{max_seq_len - 1} counted genes are seen through scGPT's seeded random gene subsampling: fidelity, "
            f"not validity: p-values stay exact because every condition and control sees the same inputs; effects "
            f"describe {max_seq_len}-gene views of the cells")


# ------------------------------------------------------------------------------------------------------------
# FLOPs from the architecture
# ------------------------------------------------------------------------------------------------------------


def _arch(config) -> tuple[int, int, int, bool]:
    """(d_model, d_hid, nlayers, mvc) from an `ScGPTConfig` or a mapping with those fields."""
    get = config.get if isinstance(config, Mapping) else (lambda k, default=None: getattr(config, k, default))
    return int(get("d_model")), int(get("d_hid")), int(get("nlayers")), bool(get("mvc", True))


def block_flops(d: int, d_hid: int, n_tokens) -> np.ndarray | float:
    """Forward FLOPs of one post-norm encoder block for one cell of `n_tokens` tokens (array-friendly)."""
    L = np.asarray(n_tokens, dtype=float)
    return 8 * L * d * d + 4 * L * d * d_hid + 4 * L * L * d


def encoder_flops(d: int, n_tokens) -> np.ndarray | float:
    """Gene embedding (a lookup: 0) and the continuous value encoder, Linear(1, d) and Linear(d, d)."""
    L = np.asarray(n_tokens, dtype=float)
    return 2 * L * d + 2 * L * d * d


def decoder_flops(d: int, n_tokens, *, mvc: bool = True) -> np.ndarray | float:
    """Expression decoder (Linear d-d, d-d, d-1) and, with `mvc`, the MVC decoder (gene2query, W, inner product)."""
    L = np.asarray(n_tokens, dtype=float)
    expr = 4 * L * d * d + 2 * L * d
    return expr + (4 * L * d * d + 2 * L * d if mvc else 0.0)


def forward_flops(config, n_tokens, *, first_layer: int = -1, decoders: bool = True) -> float:
    """FLOPs of one forward of one cell from block `first_layer` on (-1: from the input encoders; nlayers: the
    decoders only), summed over cells when `n_tokens` is an array of per-cell lengths."""
    d, d_hid, nlayers, mvc = _arch(config)
    blocks = nlayers - max(first_layer, 0)
    total = blocks * block_flops(d, d_hid, n_tokens)
    if first_layer < 0:
        total = total + encoder_flops(d, n_tokens)
    if decoders:
        total = total + decoder_flops(d, n_tokens, mvc=mvc)
    return float(np.sum(total))


def calibration_cells(n_tokens: int, batch_size: int = 32, repeats: int = 3) -> int:
    """Cell forwards of one `calibrate` at the run's batch shape (`CALIBRATION_TOKENS`): a warm-up and `repeats`."""
    return (int(repeats) + 1) * max(1, min(int(batch_size), CALIBRATION_TOKENS // max(int(n_tokens), 1)))


def max_scan_captures(nlayers: int, rounds: int) -> int:
    """The most one-cell forwards `scsuperweight.detect.scan` runs to choose candidates' columns in `rounds` rounds:
    one per FFN / attention-output site (2 per block) for the first round's near-misses and again for the last
    round's (the one where no spike passes), and one per passing round between."""
    return 4 * int(nlayers) + max(int(rounds) - 2, 0)


# ------------------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------------------


# tokens in the calibration batch (`batch_size` cells at most): the run's batch shape, or a slice of it large
# enough to allocate as the run does. A slice of 8 cells x 256 tokens reused freed heap memory (1 page fault a
# forward) where the run's 32-cell batches map fresh pages for every attention matrix (290k faults, 8% of a
# forward's time on the 51 M stand-in), so the rate it gave was too high for the run.
CALIBRATION_TOKENS = 8192


@dataclass(frozen=True)
class Calibration:
    """A short timed forward on the device: its FLOPs, the best of `repeats` timed repetitions (after one warm-up),
    the rate they give, every repetition's seconds and the load average when it ran (a busy machine times slow:
    the fastest repetition is the one least disturbed)."""

    flop_rate: float  # FLOP/s of the fastest repetition
    seconds: float  # the fastest repetition
    flops: float
    n_cells: int
    n_tokens: int
    device: str
    repeats: int = 1
    times: tuple = ()  # every timed repetition, seconds
    load_average: float = float("nan")  # 1-minute load average at calibration (nan where the OS has none)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["times"] = list(self.times)
        return d

    def describe(self) -> str:
        """``calibrated at 123 GFLOP/s (best of 3; load average 2.5)``."""
        load = f"{self.load_average:.1f}" if np.isfinite(self.load_average) else "unknown"
        return f"calibrated at {_si(self.flop_rate, 'FLOP/s')} (best of {self.repeats}; load average {load})"


def best_of(once, repeats: int) -> tuple[float, tuple]:
    """Call `once` (returns seconds) once to warm up, then `repeats` times; the fastest and every timed one.

    The fastest is the estimate least disturbed by other work on the machine (a shared CPU can time a forward
    100x slower under load); the warm-up pays one-off costs (allocation, kernel selection) the run pays once."""
    once()
    times = tuple(float(once()) for _ in range(max(1, int(repeats))))
    return min(times), times


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # not every OS has one
        return float("nan")


@torch.no_grad()
def calibrate(model, *, n_tokens: int = 256, n_cells: int = 2, repeats: int = 3, seed: int = 0) -> Calibration:
    """Time a real forward (encoders, blocks, both decoders) of `n_cells` synthetic cells of `n_tokens` tokens
    (the run's batch shape, or a slice of it): one warm-up, then the fastest of `repeats` gives the FLOP rate
    (`best_of`). Weights are not touched."""
    net = getattr(model, "model", model)
    device = next(net.parameters()).device
    rng = np.random.default_rng(seed)
    genes = np.array([v for k, v in net.vocab.items() if not k.startswith("<")])
    n = int(min(n_tokens - 1, len(genes)))
    src = np.stack([np.concatenate([[net.vocab["<cls>"]], rng.choice(genes, n, replace=False)])
                    for _ in range(n_cells)])
    vals = rng.integers(1, net.config.n_bins, src.shape).astype(np.float32)
    vals[:, 0] = net.config.pad_value
    src_t, vals_t = torch.from_numpy(src).to(device), torch.from_numpy(vals).to(device)
    was_training = net.training
    net.eval()

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        net(src_t, vals_t, None)
        if device.type == "cuda":  # the one host synchronisation, outside any per-condition loop
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    load = _load_average()
    try:
        seconds, times = best_of(once, repeats)
    finally:
        net.train(was_training)
    flops = forward_flops(net.config, np.full(n_cells, n + 1))
    return Calibration(flops / max(seconds, 1e-9), seconds, flops, n_cells, n + 1, str(device), len(times), times,
                       load)


# ------------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------------


def condition_kind(name: str) -> str:
    """``prune:L2.linear2.w[6,17]`` -> ``prune``; ``baseline`` -> ``baseline``."""
    return str(name).split(":", 1)[0]


@dataclass(frozen=True)
class Plan:
    """What a run will compute, its forward FLOPs and (with a FLOP rate) its estimated wall time."""

    conditions_by_kind: dict  # kind -> number of conditions
    blocks_by_kind: dict  # kind -> blocks rerun per condition (mean over the kind's conditions, per pass)
    flops_by_stage: dict  # embed, scan, cache, conditions (and per kind under "conditions:<kind>")
    n_cells: int
    tokens_per_cell: float  # mean tokens per cell after max_seq_len
    max_seq_len: int | None
    scan_cells: int
    scan_rounds: int
    total_flops: float
    flop_rate: float | None = None  # FLOP/s from a calibration forward
    overhead_seconds: float = 0.0  # non-forward work (metrics, bootstrap), estimated
    device: str = ""
    notes: tuple = field(default_factory=tuple)
    # the counts above are the most a run can do; what it is expected to do under an assumption stated in the notes
    # (sequential nulls stop early, only passing candidates are characterised): kind -> count, and its estimate
    expected_by_kind: dict = field(default_factory=dict)
    expected_seconds: float = float("nan")
    # with a budget that even the smallest run exceeds: one line saying so (the CLI stops on it without --yes)
    over_budget: str = ""

    @property
    def n_conditions(self) -> int:
        return int(sum(self.conditions_by_kind.values()))

    @property
    def forward_seconds(self) -> float:
        return float("nan") if not self.flop_rate else self.total_flops / self.flop_rate

    @property
    def est_seconds(self) -> float:
        return self.forward_seconds + self.overhead_seconds

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(n_conditions=self.n_conditions, forward_seconds=self.forward_seconds,
                 est_seconds=self.est_seconds, notes=list(self.notes))
        return d

    def to_frame(self) -> pd.DataFrame:
        """One row per stage and per condition kind: count, blocks rerun, FLOPs, share and seconds."""
        rows = []
        for stage, flops in self.flops_by_stage.items():
            kind = stage.split(":", 1)[1] if stage.startswith("conditions:") else ""
            if stage == "conditions":
                continue
            rows.append({"stage": "conditions" if kind else stage, "kind": kind,
                         "n": self.conditions_by_kind.get(kind, np.nan) if kind else np.nan,
                         "blocks_per_condition": self.blocks_by_kind.get(kind, np.nan) if kind else np.nan,
                         "flops": flops, "share": flops / self.total_flops if self.total_flops else np.nan,
                         "seconds": flops / self.flop_rate if self.flop_rate else np.nan})
        return pd.DataFrame(rows)


def _lengths(tokens, max_seq_len: int | None) -> np.ndarray:
    L = np.atleast_1d(np.asarray(tokens, dtype=float))
    if L.size == 0 or (L < 1).any():
        msg = f"tokens per cell must be >= 1 (got {tokens!r}); pass each cell's token count or one number."
        raise DataError(msg)
    return np.minimum(L, max_seq_len) if max_seq_len else L


def make_plan(config, conditions: Sequence[tuple[str, int]], *, n_cells: int, tokens, max_seq_len: int | None = None,
              scan_cells: int = 0, scan_rounds: int = 2, embed: bool = False, flop_rate: float | None = None,
              overhead_seconds: float = 0.0, device: str = "", notes: Sequence[str] = (),
              embed_cells: int | None = None, first_order: bool = False, genes_candidates: int = 0,
              null_forwards: int = 0, scan_captures: int | None = None, calibration_forwards: int = 0,
              masked_only: Sequence[str] = ()) -> Plan:
    """Plan a run.

    Parameters
    ----------
    config
        The model's `ScGPTConfig` (or a mapping with d_model, d_hid, nlayers, mvc).
    conditions
        ``(name_or_kind, first_layer)`` per prune condition, in any order: the kind is the name up to ``:``;
        `first_layer` is the first block the condition's edits enter (-1 for the input encoders, nlayers for the
        decoders; ``adapter.first_layer_of(param)``, the minimum over a condition's edits).
    n_cells
        Cells measured per condition (masked and plain passes over the same cells).
    tokens
        Tokens per cell (with `<cls>`): one number, or an array of per-cell counts (sampled cells, or a sample of
        them); `max_seq_len` caps each.
    scan_cells, scan_rounds
        Cells and rounds of the activation scan (0: no scan in this run): each round traces every scan cell.
    scan_captures
        The scan's one-cell forwards that choose each candidate's column (`scsuperweight.detect.scan` records
        ``n_captures``); default `max_scan_captures` (the most for `scan_rounds` rounds).
    embed
        Whether the run embeds cells once more (the embed step): `embed_cells` cells (default `n_cells`; prune
        embeds every cell of the data twice, baseline and pruned).
    flop_rate
        FLOP/s on this device (`calibrate`); without it the plan has FLOPs but no time.
    first_order
        The first-order null's backward pass over the `n_cells` masked cells (a full forward with the decoders and
        its backward, counted as three forwards).
    null_forwards
        Cell forwards of the scan's detection null (copies + 1, times its methods, times its cells).
    calibration_forwards
        Cell forwards of a calibration the run makes after this plan (a whole run's prune plans its own
        conditions once the candidates are known: `calibration_cells`).
    genes_candidates
        Candidates whose genes are scored after prune (`run`'s genes step over the same cells): a plain forward and
        a masked forward with and without the candidate, each.
    masked_only
        Condition kinds that run the masked pass only, without the plain pass for the cell embedding (the control
        draws under ``PruneOptions.draw_embeddings=False``).
    """
    L = _lengths(tokens, max_seq_len)
    d, d_hid, nlayers, mvc = _arch(config)
    memo: dict = {}

    def per_cell(first: int, dec: bool) -> float:  # mean FLOPs per cell; memoised: budgets plan many times
        if (first, dec) not in memo:
            memo[first, dec] = forward_flops(config, L, first_layer=first, decoders=dec) / L.size
        return memo[first, dec]

    counts: Counter = Counter()
    blocks: dict[str, list[int]] = {}
    cond_flops: Counter = Counter()
    for name, first in conditions:
        kind = condition_kind(name)
        first = int(first)
        counts[kind] += 1
        blocks.setdefault(kind, []).append(nlayers - max(min(first, nlayers), 0))
        # masked pass with the decoders, plain pass for the cell embedding only (none for a masked-only kind)
        plain = 0.0 if kind in masked_only else per_cell(first, False)
        cond_flops[kind] += n_cells * (per_cell(first, True) + plain)
    stages = {}
    if embed:
        stages["embed"] = (n_cells if embed_cells is None else int(embed_cells)) * per_cell(-1, False)
    if scan_cells:  # every round traces every scan cell; each capture is one cell's forward
        captures = max_scan_captures(nlayers, scan_rounds) if scan_captures is None else int(scan_captures)
        stages["scan"] = (scan_rounds * scan_cells + captures) * per_cell(-1, True)
    if null_forwards:
        stages["scan_null"] = int(null_forwards) * per_cell(-1, True)
    if conditions:
        stages["cache"] = 2 * n_cells * per_cell(-1, False)  # every block input, once, for both passes
    if first_order:
        stages["first_order"] = 3 * n_cells * per_cell(-1, True)  # forward + backward (about twice a forward)
    if calibration_forwards:
        stages["calibrate"] = int(calibration_forwards) * per_cell(-1, True)
    if genes_candidates:
        stages["genes"] = int(genes_candidates) * n_cells * (per_cell(-1, False) + 2 * per_cell(-1, True))
    stages["conditions"] = float(sum(cond_flops.values()))
    stages.update({f"conditions:{k}": float(v) for k, v in cond_flops.items()})
    total = sum(v for k, v in stages.items() if not k.startswith("conditions:"))
    return Plan(dict(counts), {k: float(np.mean(v)) for k, v in blocks.items()}, stages, int(n_cells),
                float(L.mean()), max_seq_len, int(scan_cells), int(scan_rounds), float(total), flop_rate,
                float(overhead_seconds), device, tuple(notes))


def _si(x: float, unit: str) -> str:
    for div, p in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {p}{unit}"
    return f"{x:.3g} {unit}"


def format_duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "unknown (no calibration)"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_plan(plan: Plan) -> str:
    """The plan as the CLI prints it (a few aligned lines)."""
    kinds = ", ".join(f"{k} {n}" for k, n in plan.conditions_by_kind.items())
    lines = [f"plan: {plan.n_conditions} conditions ({kinds}) over {plan.n_cells} cells, "
             f"{plan.tokens_per_cell:.0f} tokens per cell"
             + (f" (max_seq_len {plan.max_seq_len})" if plan.max_seq_len else "")]
    for _, r in plan.to_frame().iterrows():
        what = f"{r['stage']}:{r['kind']}" if r["kind"] else r["stage"]
        extra = f" x{int(r['n'])}, {r['blocks_per_condition']:.1f} blocks each" if r["kind"] else ""
        secs = f", {format_duration(r['seconds'])}" if np.isfinite(r["seconds"]) else ""
        lines.append(f"  {what:<22} {_si(r['flops'], 'FLOP'):>11}{extra}{secs}")
    rate = f" at {_si(plan.flop_rate, 'FLOP/s')} measured on {plan.device or 'this device'}" if plan.flop_rate else ""
    over = f" + {format_duration(plan.overhead_seconds)} metrics" if plan.overhead_seconds else ""
    lines.append(f"  total {_si(plan.total_flops, 'FLOP')}{rate}: about {format_duration(plan.est_seconds)}{over}")
    if plan.expected_by_kind:
        n_exp = int(sum(plan.expected_by_kind.values()))
        exp = ", ".join(f"{k} {n}" for k, n in plan.expected_by_kind.items())
        lines.append(f"  at most {plan.n_conditions} conditions (the estimate above, used for the 1-hour check and "
                     f"budgets); expected {n_exp} ({exp}): about {format_duration(plan.expected_seconds)}")
    lines += [f"  note: {n}" for n in plan.notes]
    if plan.over_budget:
        lines.append(f"  over budget: {plan.over_budget}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# budgets
# ------------------------------------------------------------------------------------------------------------
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)")


def parse_budget(text: str | float | int) -> float:
    """``"15m"``, ``"90s"``, ``"2h"``, ``"1h30m"`` or a number of seconds -> seconds (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = _PART.findall(s)
        if s.replace(".", "", 1).isdigit():
            seconds = float(s)
        elif not parts or "".join(a + b for a, b in parts) != s or any(u not in _UNITS for _, u in parts):
            msg = f"budget {text!r} is not a duration; write e.g. 90s, 15m, 2h or 1h30m."
            raise DataError(msg)
        else:
            seconds = sum(float(a) * _UNITS[u] for a, u in parts)
    if not (np.isfinite(seconds) and seconds > 0):
        msg = f"budget {text!r} must be a positive duration; write e.g. 90s, 15m, 2h or 1h30m."
        raise DataError(msg)
    return seconds


def min_draws(alpha: float) -> int:
    """Fewest random draws whose smallest attainable p, 1 / (n + 1), is below `alpha`."""
    n = max(1, math.floor(1 / alpha))
    while 1 / (n + 1) >= alpha:
        n += 1
    return n


# non-forward work per condition (metrics, bootstrap intervals), measured: about 0.12 s per condition at 60 cells
# and 200 resamples on this 2-core machine; it grows with the cells and, a little, with the resamples
SECONDS_PER_CELL = 1.5e-3
SECONDS_PER_BOOT_CELL = 2.5e-6


def metric_seconds(n_conditions: int, n_cells: int, n_boot: int) -> float:
    """Estimated non-forward seconds of `n_conditions` conditions over `n_cells` cells with `n_boot` resamples."""
    return float(n_conditions) * n_cells * (SECONDS_PER_CELL + SECONDS_PER_BOOT_CELL * n_boot)


# the share of a budget the solver plans to: the estimate is a model (a shared machine, work it does not count), and
# a run may end up to 10% over its budget, so planning to 90% keeps an estimate 20% short inside that allowance
BUDGET_TARGET = 0.9

@dataclass(frozen=True)
class Layout:
    """The structure of a run that the budget's knobs scale: every condition but the uniform random draws as
    ``(kind, first_layer)``, the first layer of each parameter whose uniform draws are drawn (``n_random`` each),
    and the stages beside the conditions (cells embedded once more, the first-order backward pass, genes)."""

    fixed_conditions: tuple
    null_layers: tuple
    embed_cells: int = 0
    first_order: bool = False
    genes_candidates: int = 0
    null_passes: int = 0  # the scan's detection null: (copies + 1) x methods traced over its cells
    null_cells: int = 0
    masked_only: tuple = ()  # condition kinds without the plain (embedding) pass (`make_plan`)


@dataclass(frozen=True)
class Lever:
    """One structural cut, pulled only once every knob is at its floor: `values` are the `BudgetChoice` fields it
    sets (from `before`), `layout` the run's structure with it and every lever before it pulled."""

    name: str
    values: dict
    before: dict
    why: str
    layout: Layout


@dataclass(frozen=True)
class BudgetChoice:
    """Knob settings that fit a budget, the plan they give, and why each knob has its value.

    The first five are the knobs (`BUDGET_ORDER`); the fields after `plan` are the structural levers
    (`LEVER_ORDER`) at the values the run uses (None: not a lever of this run)."""

    budget_seconds: float
    cells_per_label: int
    max_seq_len: int
    n_random: int
    n_boot: int
    scan_cells: int
    est_seconds: float
    feasible: bool
    reasons: tuple
    plan: Plan | None = None
    embed_all: bool = True  # embed every cell of the data for obsm (False: the evaluated cells, no extra forward)
    genes_candidates: int | None = None  # candidates whose genes are scored (run's genes step)
    n_matched: int | None = None
    draw_embeddings: bool | None = None  # the control draws' plain pass (False: reconstruction only)
    n_restore: int | None = None
    n_scale: int | None = None
    mean_ablation: bool | None = None
    granularities: tuple | None = None
    joint: bool | None = None
    first_order: bool | None = None
    max_candidates: int | None = None
    null_method: str | None = None  # the scan's detection null: "both", "gaussian", ...
    null_k: int | None = None
    pulled: tuple = ()  # the levers pulled, in order
    target: float = BUDGET_TARGET  # the share of the budget the choice was fitted to (`choose_budget`)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = None if self.plan is None else self.plan.to_dict()
        d["reasons"] = list(self.reasons)
        d["pulled"] = list(self.pulled)
        d["granularities"] = None if self.granularities is None else list(self.granularities)
        return d

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{k: v for k, v in self.to_dict().items() if k not in ("plan", "reasons")}])

    def settings(self) -> dict:
        """Every knob and lever at the value the run uses (levers that are not this run's left out)."""
        knobs = {k: getattr(self, k) for k in BUDGET_ORDER}
        levers = {k: getattr(self, k) for k in _LEVER_FIELDS if getattr(self, k) is not None}
        return {**knobs, **levers}


_LEVER_FIELDS = ("embed_all", "genes_candidates", "n_matched", "draw_embeddings", "n_restore", "n_scale",
                 "mean_ablation", "granularities", "joint", "first_order", "max_candidates", "null_method", "null_k")

# the order in which knobs give way, each down to its floor; the first ones cost the least validity
BUDGET_ORDER = ("scan_cells", "n_boot", "max_seq_len", "cells_per_label", "n_random")
_WHY = {
    "scan_cells": "the scan only proposes candidates and a super activation shows on every cell, so fewer scan "
                  "cells find the same spikes",
    "n_boot": "fewer bootstrap resamples make the interval ends noisier, not biased",
    "max_seq_len": "fewer tokens per cell (scGPT's own random gene subsampling) change what the model sees: "
                   "fidelity, not validity",
    "cells_per_label": "fewer cells per cell type widen every interval and lower power",
    "n_random": "fewer random draws raise the smallest attainable p, kept below alpha",
}
# then, with every knob at its floor, the structural levers, in this order (each removes work that answers a
# question beside the verdict; the top candidate is always judged against its own parameter's draws and the top
# outliers); `scsuperweight.prune.budget_levers` builds them for a prune run
LEVER_ORDER = ("embed_all", "genes_candidates", "null_method", "n_matched", "draw_embeddings", "characterisation",
               "mean_ablation", "unit_pools", "joint", "detection_null", "first_order", "top_characterisation",
               "max_candidates")
LEVER_WHY = {
    "embed_all": "obsm embeddings only for the evaluated cells (taken from the baseline and top-candidate "
                 "conditions, no extra forward); the other cells' rows are NaN",
    "genes_candidates": "genes ranked for the top candidate only",
    "null_method": "the scan's detection null with the Gaussian copies only (the one that can call a lone planted "
                   "scalar), not the permutation copies beside them",
    "detection_null": "no detection null in the scan (perm_p not computed): the spike thresholds propose, the "
                      "prune controls judge",
    "n_matched": "no |w|-matched draws: p_matched is not computed; the uniform draws still judge every candidate",
    "draw_embeddings": "random draws run the reconstruction pass only: the verdicts and sequential nulls judge on "
                       "the primary metric as before; the embedding metrics get no p-value",
    "characterisation": "restore and scaling for the top candidate only",
    "mean_ablation": "no mean / mean-activation ablations (they ask how, not whether, a candidate matters)",
    "unit_pools": "no neuron / channel ablations and their random-unit pools",
    "joint": "no joint ablation of the passing candidates",
    "first_order": "no first-order null over the whole matrix (it informs; the exact draws decide)",
    "top_characterisation": "no restore or scaling curve for the top candidate either (they describe how it "
                            "acts; the verdict is its zeroing against the draws)",
    "max_candidates": "fewer candidates judged (the scan's rank order); never fewer than the top one, judged "
                      "against its own parameter's random draws and the top outliers",
}


def _fmt(v) -> str:
    return "+".join(v) if isinstance(v, tuple) else str(v)


def choose_budget(budget_seconds: float, *, config, flop_rate: float, label_counts: Mapping[str, int],
                  tokens, fixed_conditions: Sequence[tuple[str, int]], null_layers: Sequence[int],
                  alpha: float = 0.05, n_random: int = 40, n_boot: int = 200, max_seq_len: int = 1200,
                  scan_cells: int = 1000, scan_rounds: int = 2, cells_per_label: int | None = None,
                  min_cells_per_label: int = 20, min_seq_len: int = 256, min_boot: int = 100,
                  min_scan_cells: int = 64, seconds_per_boot_cell: float = SECONDS_PER_BOOT_CELL,
                  seconds_per_condition: float = 0.0, seconds_per_cell: float = SECONDS_PER_CELL,
                  embed_cells: int = 0, first_order: bool = False, genes_candidates: int = 0,
                  null_passes: int = 0, null_cells: int = 0, masked_only: Sequence[str] = (),
                  levers: Sequence[Lever] = (), requested: Mapping | None = None,
                  target: float = BUDGET_TARGET, calibration_batch: int = 0) -> BudgetChoice:
    """Pick cells per label, tokens per cell, random draws, bootstrap resamples and scan cells to fit a budget,
    and, when even their floors do not fit, pull structural levers.

    Knobs give way in `BUDGET_ORDER`: scan cells, bootstrap resamples, tokens per cell (max_seq_len), cells per
    label, random draws; each is set to the largest value that fits with the knobs after it still at their
    requested values, never below its floor. Two floors protect validity and are never crossed: `n_random` keeps
    the smallest attainable p = 1 / (n_random + 1) below `alpha` (`min_draws`), and every cell type keeps at least
    `min_cells_per_label` cells (or all it has). When every knob at its floor still exceeds the budget, `levers`
    (in `LEVER_ORDER`: the whole-data embedding, genes beyond the top candidate, |w|-matched draws, the draws'
    embedding pass, characterisation beyond the top candidate, mean ablations, neuron / channel pools, the joint
    phase, the first-order null, the top candidate's restore and scaling, then fewer candidates down to one) are
    pulled one at a time until the floors fit, and the knobs are fitted again from their requested values on that
    smaller run. When even the last lever does not fit, the floors are returned with ``feasible=False`` and the
    time they need. The estimate is worst case for the draws (a strong candidate uses every draw; sequential nulls
    only make a run shorter).

    `fixed_conditions` are the ``(kind, first_layer)`` of every condition but the random draws; `null_layers`
    the first layer of each parameter whose null is drawn (`n_random` draws each). `label_counts` are the cells
    available per label, `tokens` each cell's token count (or one number). Non-forward work is modelled as
    `seconds_per_cell` plus `seconds_per_boot_cell` per resample, per cell per condition, plus
    `seconds_per_condition`. `embed_cells` cells are embedded once at the chosen length besides (prune's
    embeddings of every cell); `first_order`, `genes_candidates` and `masked_only` as in `make_plan`.
    `requested` holds the lever fields' requested values (recorded in the choice when no lever is pulled).

    The choice is fitted to `target` x the budget (`BUDGET_TARGET`, 90%): the margin absorbs what the estimate
    misses, so a run lands within the budget's +10%; ``feasible`` says whether the estimate fits that share.
    `calibration_batch` (the run's batch size; 0: none) counts the calibration prune makes for its own plan in a
    whole run (`calibration_cells` at the chosen length).
    """
    full = float(budget_seconds)
    if not 0 < target <= 1:
        msg = f"`target` is the share of the budget to plan to, in (0, 1]; got {target!r} (e.g. 0.9)."
        raise DataError(msg)
    budget = full * float(target)
    if not budget > 0:
        msg = f"`budget_seconds` must be > 0; got {budget_seconds!r}."
        raise DataError(msg)
    if not label_counts:
        msg = "`label_counts` is empty: pass the number of cells available per label (e.g. obs[label].value_counts())."
        raise DataError(msg)
    counts = np.array([int(v) for v in label_counts.values()])
    L_all = _lengths(tokens, None)
    floor_draws = min_draws(alpha)
    req = {"scan_cells": min(scan_cells, int(counts.sum())), "n_boot": n_boot, "max_seq_len": max_seq_len,
           "cells_per_label": int(cells_per_label or counts.max()), "n_random": max(n_random, floor_draws)}
    floors = {"scan_cells": min(min_scan_cells, req["scan_cells"]), "n_boot": min(min_boot, n_boot),
              "max_seq_len": min(min_seq_len, max_seq_len),
              "cells_per_label": min(min_cells_per_label, req["cells_per_label"]), "n_random": floor_draws}

    def plan_of(k: dict, lay: Layout) -> Plan:
        n_cells = int(np.minimum(counts, k["cells_per_label"]).sum())
        conds = list(lay.fixed_conditions) + [("random", x) for x in lay.null_layers for _ in range(k["n_random"])]
        overhead = len(conds) * (seconds_per_condition + n_cells * (seconds_per_cell
                                                                    + seconds_per_boot_cell * k["n_boot"]))
        return make_plan(config, conds, n_cells=n_cells, tokens=L_all, max_seq_len=k["max_seq_len"],
                         scan_cells=min(k["scan_cells"], int(counts.sum())), scan_rounds=scan_rounds,
                         flop_rate=flop_rate, overhead_seconds=overhead, embed=lay.embed_cells > 0,
                         embed_cells=lay.embed_cells, first_order=lay.first_order,
                         genes_candidates=lay.genes_candidates,
                         null_forwards=lay.null_passes * min(lay.null_cells, k["scan_cells"]),
                         calibration_forwards=calibration_cells(k["max_seq_len"], calibration_batch)
                         if calibration_batch else 0, masked_only=lay.masked_only)

    def fit(lay: Layout) -> tuple[dict, list]:
        cost = lambda k: plan_of(k, lay).est_seconds  # noqa: E731
        knobs, reasons = dict(req), []
        if cost(knobs) <= budget:
            return knobs, [f"everything as requested fits: about {format_duration(cost(knobs))} of "
                           f"{format_duration(budget)} ({target:.0%} of the budget)"]
        for name in BUDGET_ORDER:
            lo, hi = floors[name], knobs[name]
            if cost({**knobs, name: lo}) > budget:
                knobs[name] = lo
                if lo < hi:
                    reasons.append(f"{name} {hi} -> {lo} (its floor): {_WHY[name]}")
                continue
            while lo < hi:  # largest value that fits: cost grows with every knob
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if cost({**knobs, name: mid}) <= budget else (lo, mid - 1)
            if lo < req[name]:
                reasons.append(f"{name} {req[name]} -> {lo}: {_WHY[name]}")
            knobs[name] = lo
            break
        return knobs, reasons

    lay = Layout(tuple(fixed_conditions), tuple(null_layers), int(embed_cells), bool(first_order),
                 int(genes_candidates), int(null_passes), int(null_cells), tuple(masked_only))
    knobs, reasons = fit(lay)
    pulled: list[Lever] = []
    for lever in levers:
        if plan_of(knobs, lay).est_seconds <= budget:
            break
        pulled.append(lever)
        lay = lever.layout
        knobs, reasons = fit(lay)
    chosen = dict(requested or {})
    lever_reasons = []
    for name in dict.fromkeys(lv.name for lv in pulled):  # a lever pulled in steps (max_candidates) reads once
        steps = [lv for lv in pulled if lv.name == name]
        chosen.update(steps[-1].values)
        change = "; ".join(f"{k} {_fmt(steps[0].before[k])} -> {_fmt(v)}" for k, v in steps[-1].values.items())
        lever_reasons.append(f"every knob at its floor still exceeds the budget, so {change}: {steps[0].why}")
    plan = plan_of(knobs, lay)
    est = plan.est_seconds
    feasible = est <= budget
    reasons = lever_reasons + reasons
    if not feasible:
        reasons.append(f"even at every floor{' and the smallest run (' + str(len(levers)) + ' cuts)' if levers else ''}"
                       f" the run needs about {format_duration(est)}, over the budget of {format_duration(full)} "
                       f"(planned to {target:.0%} of it): "
                       f"raise the budget, or pass fewer cells or candidates")
    reasons.append(f"validity floors kept: n_random >= {floor_draws} (smallest p 1/{floor_draws + 1} < "
                   f"{alpha:g}), >= {min_cells_per_label} cells per label (or all a label has)")
    plan = replace(plan, notes=(*plan.notes, *reasons))
    fields = {k: v for k, v in chosen.items() if k in BudgetChoice.__dataclass_fields__}
    return BudgetChoice(full, int(knobs["cells_per_label"]), int(knobs["max_seq_len"]), int(knobs["n_random"]),
                        int(knobs["n_boot"]), int(knobs["scan_cells"]), float(est), bool(feasible), tuple(reasons),
                        plan, **fields, pulled=tuple(dict.fromkeys(lv.name for lv in pulled)), target=float(target))


# ------------------------------------------------------------------------------------------------------------
# before the work: one hour needs a budget or a yes
# ------------------------------------------------------------------------------------------------------------
LONG_RUN_SECONDS = 3600.0  # a plan estimated above this asks for --budget or --yes


class LongRunWarning(UserWarning):
    """A run was started whose plan is estimated above `LONG_RUN_SECONDS` without a budget or a confirmation."""


def long_run_message(plan: Plan, *, cli: bool = True) -> str:
    """One line: the estimate and both ways on (a budget that fits, or a confirmation)."""
    est = format_duration(plan.est_seconds)
    if cli:
        return (f"this run is estimated at about {est} on {plan.device or 'this device'} (over 1 hour); pass "
                f"--budget 15m (or any duration) to fit the run to a time, or --yes to run the plan as printed.")
    return (f"this run is estimated at about {est} on {plan.device or 'this device'} (over 1 hour); pass "
            f"budget='15m' (or any duration) to fit it to a time, or yes=True to run the plan as estimated.")


class OverBudgetWarning(UserWarning):
    """A run was started with a budget that even its smallest plan exceeds, without a confirmation."""


def over_budget_message(choice: BudgetChoice) -> str:
    """One line: the budget, what the smallest run needs, and the ways on."""
    go = "--yes (yes=True) to run it anyway"
    return (f"the budget of {format_duration(choice.budget_seconds)} cannot be met: even the smallest run (every "
            f"floor, {'; '.join(choice.pulled) or 'no structural cut'} cut) needs about "
            f"{format_duration(choice.est_seconds)}; raise the budget, pass fewer cells, or {go}.")


def warn_if_over_budget(plan: Plan, *, confirmed: bool) -> None:
    """The Python faces' answer to an unmeetable budget: an `OverBudgetWarning` (never an error)."""
    if plan.over_budget and not confirmed:
        warnings.warn(plan.over_budget, OverBudgetWarning, stacklevel=3)


def is_long(plan: Plan) -> bool:
    return bool(np.isfinite(plan.est_seconds) and plan.est_seconds > LONG_RUN_SECONDS)


def warn_if_long(plan: Plan, *, confirmed: bool) -> None:
    """The Python faces' answer to a long plan: a `LongRunWarning` with the estimate (never an error)."""
    if is_long(plan) and not confirmed:
        warnings.warn(long_run_message(plan, cli=False), LongRunWarning, stacklevel=3)


def has_flops(config) -> bool:
    """Whether the FLOP model applies (an scGPT config: d_model, d_hid, nlayers)."""
    try:
        _arch(config)
    except (TypeError, ValueError, KeyError):
        return False
    return True
