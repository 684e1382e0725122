"""Progress: the rate and ETA count only this session's work; the writer merges into run.json."""

from __future__ import annotations

import json

import pytest

from scsuperweight.progress import Progress
from scsuperweight.results import RunLog


def test_eta_from_this_session_and_run_json(tmp_path):
    run = tmp_path / "run.json"
    log = RunLog(tmp_path, {"run_id": "r1", "command": "embed"})
    now = [100.0]
    with Progress(10, initial=4, desc="embed", enabled=False, writer=log.progress, every_s=0,
                  clock=lambda: now[0]) as p:
        assert p.record()["eta_s"] is None  # nothing done yet in this session
        now[0] += 6.0
        p.update(2, block=5)  # 2 new blocks in 6 s: 3 s each, 4 left
        rec = json.loads(run.read_text())
        assert rec["run_id"] == "r1"  # the rest of run.json is kept
        assert rec["progress"]["done"] == 6 and rec["progress"]["block"] == 5
        assert rec["progress"]["eta_s"] == pytest.approx(12.0)
        assert rec["progress"]["rate_per_s"] == pytest.approx(1 / 3)


def test_only_rank0_writes_and_throttle(tmp_path):
    calls = []
    p = Progress(5, enabled=False, is_main=False, writer=calls.append, every_s=0)
    p.update()
    p.close()
    assert calls == []
    now = [0.0]
    q = Progress(5, enabled=False, writer=calls.append, every_s=10, clock=lambda: now[0])
    q.update()  # first write at once
    now[0] = 5.0
    q.update()  # throttled
    q.close()  # always at the end
    assert [c["done"] for c in calls] == [1, 2]
