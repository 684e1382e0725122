"""Several processes with `torch.distributed` (torchrun): who am I, my share of the work, merging, failing loudly.

A user who outgrows one process already has `torchrun --nproc-per-node N`; this module lets every step run under
it (or under a process group the caller initialised) and give the one-process answer: work is split into
contiguous shards of one global order, per-rank results are gathered and merged in rank order, and rank 0 writes.
With one process every helper is a no-op. A rank that raises must not leave the others waiting forever in a
collective: `guard` all-reduces an error flag after each unit of work, and every rank then raises the failing
rank's error; collectives carry a timeout so a rank that died outright ends the others too.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ._log import logger


class RankError(RuntimeError):
    """Another rank (or this one) failed; the message names the rank and its error."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank, world size, local rank (its GPU) and backend (None: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device of this rank's collectives (and model): its GPU under nccl, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def context(backend: str | None = None, *, timeout_s: float = 1800.0) -> DistContext:
    """The job this process belongs to: an initialised process group, or one from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), or a single process.

    The backend defaults to nccl when CUDA is available, else gloo. `timeout_s` bounds every collective, so a
    rank that died takes the others down with it instead of leaving them waiting.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                           dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        msg = "WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process instead."
        raise RuntimeError(msg)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local, backend)
    logger.info("rank %d of %d (%s)", ctx.rank, ctx.world, backend)
    return ctx


def finish() -> None:
    """Leave the process group this module (or torchrun's environment) started; a no-op with one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n_items: int, rank: int, world: int, *, strided: bool = False) -> np.ndarray:
    """The items of `rank`: a contiguous block (sizes differ by at most one, earlier ranks larger) or every
    `world`-th item. Contiguous shards keep the global order rank after rank, which is what lets merging in rank
    order reproduce one process's tie rules; deterministic either way."""
    if world < 1 or not 0 <= rank < world:
        msg = f"need 0 <= rank < world, got rank={rank}, world={world}."
        raise ValueError(msg)
    if strided:
        return np.arange(rank, n_items, world)
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    return np.arange(start, start + base + (rank < extra))


def gather_objects(obj, ctx: DistContext) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; ``[obj]`` with one process."""
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(obj, ctx: DistContext) -> list | None:
    """Every rank's `obj` in rank order on rank 0 (None on the others); ``[obj]`` with one process."""
    if not ctx.active:
        return [obj]
    import torch.distributed as dist

    out: list | None = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def check(ctx: DistContext, error: BaseException | None = None) -> None:
    """Collective: after a unit of work, every rank learns whether any rank failed, and all raise its error.

    Every rank must call it the same number of times (`guard` does so whether or not the work raised).
    """
    if not ctx.active:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return
    messages = gather_objects(None if error is None else f"{type(error).__name__}: {error}", ctx)
    failed = [r for r, m in enumerate(messages) if m is not None]
    msg = f"rank {failed[0]} of {ctx.world} failed: {messages[failed[0]]}"
    if len(failed) > 1:
        msg += f" (ranks {failed} failed)"
    raise RankError(msg) from error


@contextmanager
def guard(ctx: DistContext):
    """Run one unit of work; if it raises on any rank, every rank raises that rank's error (no hang)."""
    error = None
    try:
        yield
    except Exception as exc:  # the error travels to every rank; KeyboardInterrupt and SystemExit go straight up
        error = exc
    check(ctx, error)


def on_rank0(ctx: DistContext, fn: Callable, *args, **kwargs):
    """Call `fn` on rank 0 only (the one that writes outputs); the others wait for it and share its failure.

    Returns `fn`'s result on rank 0, None elsewhere.
    """
    result = None
    with guard(ctx):
        if ctx.is_main:
            result = fn(*args, **kwargs)
    return result


class _Sender:
    """Rank 0's `send` inside `rank0_sends`: hands one value to every rank (once)."""

    def __init__(self, ctx: DistContext):
        self.ctx, self.sent = ctx, False

    def __call__(self, value):
        self.sent = True
        return gather_objects(("ok", value), self.ctx)[0][1]


@contextmanager
def rank0_sends(ctx: DistContext):
    """Rank 0 alone runs the block (work only it needs, e.g. the tables it writes); the others wait in
    `receive_from_rank0` for the one value rank 0 hands them with ``send(value)`` inside the block.

    A failure on rank 0 before it sends is sent instead, so the waiting ranks raise it rather than hang; a block
    that ends without sending sends None. Collectives may follow the send inside the block (the others run the
    same ones after receiving). With one process ``send`` returns its value.
    """
    send = _Sender(ctx)
    try:
        yield send
    except Exception as exc:
        if ctx.active and not send.sent:
            gather_objects(("error", f"{type(exc).__name__}: {exc}"), ctx)
        raise
    if not send.sent:
        send(None)


def receive_from_rank0(ctx: DistContext):
    """On a rank other than 0: the value rank 0 sends from its `rank0_sends` block, or rank 0's error."""
    kind, value = gather_objects(None, ctx)[0]
    if kind == "error":
        msg = f"rank 0 of {ctx.world} failed: {value}"
        raise RankError(msg)
    return value


def run_in_rounds(items: list, work: Callable, keep: Callable, ctx: DistContext, *,
                  after: Callable | None = None) -> None:
    """Deal `items` out in rounds of one per rank (a strided shard): each rank runs ``work(item)``; rank 0 gathers
    each round and calls ``keep(item, result)`` in item order (it alone writes); then ``after(round_items)`` runs
    on every rank. A failure on any rank, in `work` or in `keep`, ends every rank with that error.

    Each round is a unit that is finished (kept) or not, so a run killed between rounds resumes from its items.
    """
    for r in range(0, len(items), ctx.world):
        batch = items[r:r + ctx.world]
        result = None
        with guard(ctx):
            if ctx.rank < len(batch):
                result = work(batch[ctx.rank])
        got = gather_to_main(result, ctx)
        with guard(ctx):
            if ctx.is_main:
                for item, res in zip(batch, got, strict=False):
                    keep(item, res)
        if after is not None:
            after(batch)


def merge_trace_stats(trace, ctx: DistContext) -> None:
    """Merge every rank's `Trace` reductions into rank 0's trace (in rank order), collectively.

    Each rank must have traced a contiguous shard (`shard`) of the one-process batch sequence; then rank 0's
    maxima, argmaxes (same tie rule: the earliest batch wins), counts and histograms equal one process's (the
    float sums up to the last bit). The other ranks' traces are left as they were.
    """
    if not ctx.active:
        return
    states = gather_to_main(trace.state(), ctx)
    if states is not None:
        for state in states[1:]:
            trace.merge_state(state)
