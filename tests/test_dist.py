"""Two gloo processes: sharded Trace reductions merge to the one-process answer; a failing rank ends the job."""

from __future__ import annotations

import os
import pickle
import socket
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from scsuperweight.data.batches import collate
from scsuperweight.dist import DistContext, RankError, context, guard, merge_trace_stats, on_rank0, shard
from scsuperweight.instrument import Trace

EXACT = ("max_abs", "arg_cell", "arg_pos", "arg_token", "top_count", "n_positions", "n_cells", "calls")
SUMS = ("sum_abs", "hist", "n_zero")


def _batches():
    """Eight batches; the last four repeat the first four's cells under other indices, so every channel's maximum
    is tied between the two halves: only the one-process rule (the earlier batch wins) picks cells < 24."""
    from _plant import tiny_model, tiny_tokens

    model = tiny_model(0)
    tok = tiny_tokens(model, n_cells=24, seed=0)
    tok2 = tok.subset(np.concatenate([np.arange(24), np.arange(24)]))
    order = np.argsort(tok.lengths, kind="stable")
    groups = [order[i:i + 6] for i in range(0, 24, 6)]
    return model, [collate(tok2, g) for g in groups] + [collate(tok2, g + 24) for g in groups]


def _trace(model, batches, groups, keep_sums=False):
    with Trace(model, "all", groups=groups) as tr:
        tr.keep_sums = keep_sums
        for b in batches:
            tr.run(b)
    return tr


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = context(timeout_s=30)
    model, batches = _batches()
    mine = [batches[i] for i in shard(len(batches), ctx.rank, ctx.world)]
    tr = _trace(model, mine, np.arange(48) % 3, keep_sums=True)
    merge_trace_stats(tr, ctx)
    on_rank0(ctx, lambda: open(os.path.join(out, "merged.pkl"), "wb").write(pickle.dumps(tr.state())))
    t0 = time.time()
    try:
        with guard(ctx):
            if ctx.rank == 1:
                raise ValueError("planted failure on rank 1")
            time.sleep(0.2)  # rank 0 is still working when rank 1 fails
        msg = "no error"
    except RankError as exc:
        msg = str(exc)
    with open(os.path.join(out, f"error{ctx.rank}.txt"), "w") as fh:
        fh.write(f"{msg}\n{time.time() - t0:.2f}")
    import torch.distributed as dist

    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_is_a_partition():
    for n, w in [(10, 3), (2, 4), (0, 2), (7, 1)]:
        for strided in (False, True):
            parts = [shard(n, r, w, strided=strided) for r in range(w)]
            np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert shard(10, 0, 3).tolist() == [0, 1, 2, 3] and shard(10, 2, 3).tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="rank"):
        shard(5, 3, 3)


def test_single_process_is_a_no_op():
    ctx = DistContext()
    assert not ctx.active and ctx.is_main
    assert on_rank0(ctx, lambda: 5) == 5
    with pytest.raises(KeyError):  # one process: the error itself, unchanged
        with guard(ctx):
            raise KeyError("x")


def test_two_gloo_ranks_merge_exactly_and_fail_together(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: a matmul's rounding depends on the thread count
    try:
        model, batches = _batches()
        ref = _trace(model, batches, np.arange(48) % 3).state()
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    merged = pickle.loads((tmp_path / "merged.pkl").read_bytes())
    assert list(merged) == list(ref)
    for site, want in ref.items():
        got = merged[site]
        for field in EXACT:
            np.testing.assert_array_equal(got[field], want[field], err_msg=f"{site}.{field}")
        for field in SUMS:  # replayed batch by batch: to the last bit
            np.testing.assert_array_equal(got[field], want[field], err_msg=f"{site}.{field}")
        assert got["group_cells"] == want["group_cells"]
        for code, top in want["group_top"].items():
            np.testing.assert_array_equal(got["group_top"][code], top)
        assert np.all(got["arg_cell"][got["max_abs"] > 0] < 24)  # the tie went to the earlier batches
    for rank in (0, 1):
        msg, seconds = (tmp_path / f"error{rank}.txt").read_text().splitlines()
        assert msg == "rank 1 of 2 failed: ValueError: planted failure on rank 1"
        assert float(seconds) < 10


def _sends_worker(rank: int, world: int, port: int, out: str) -> None:
    from scsuperweight.dist import rank0_sends, receive_from_rank0

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = context(timeout_s=30)
    got = []
    for fail in (False, True):  # rank 0 sends a value; then rank 0 fails before it sends
        t0 = time.time()
        try:
            if ctx.is_main:
                with rank0_sends(ctx) as send:
                    time.sleep(0.2)  # the others are already waiting
                    if fail:
                        raise ValueError("planted failure on rank 0")
                    value = send({"extra": [rank, 7]})
            else:
                value = receive_from_rank0(ctx)
            got.append(f"{value}")
        except (RankError, ValueError) as exc:
            got.append(f"{type(exc).__name__}: {exc} after {time.time() - t0:.1f}s")
    with open(os.path.join(out, f"sends{ctx.rank}.txt"), "w") as fh:
        fh.write("\n".join(got))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_rank0_sends_its_value_or_its_error_to_the_waiting_ranks(tmp_path):
    mp.spawn(_sends_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = (tmp_path / "sends0.txt").read_text().splitlines()
    r1 = (tmp_path / "sends1.txt").read_text().splitlines()
    assert r0[0] == r1[0] == "{'extra': [0, 7]}"  # rank 0's value on both ranks
    assert r0[1].startswith("ValueError: planted failure on rank 0")
    assert r1[1].startswith("RankError: rank 0 of 2 failed: ValueError: planted failure on rank 0")
    assert float(r1[1].rsplit(" ", 1)[1].rstrip("s")) < 10  # raised at once, not at the collective's timeout
