"""Finished conditions persist atomically and are reused only for the same definition and inputs."""

from __future__ import annotations

import numpy as np

from scsuperweight.condstore import ConditionStore, safe_name


def test_write_reload_and_stale(tmp_path):
    rng = np.random.default_rng(0)
    a = {"cell_loss": rng.standard_normal(50).astype(np.float32), "cells": np.arange(50)}
    b = {"cell_loss": rng.standard_normal(50)}
    defs = {"prune:L3.w[5]": {"kind": "prune", "param": "L3.norm2.weight", "index": 5},
            "random:7": {"kind": "random", "draw": 7}}
    st = ConditionStore(tmp_path, inputs="model=abc;cells=50;seed=0")
    st.save("prune:L3.w[5]", defs["prune:L3.w[5]"], a)
    st.save("random:7", defs["random:7"], b)

    again = ConditionStore(tmp_path, inputs="model=abc;cells=50;seed=0")  # a new process resuming
    done = again.load_done(defs)
    assert sorted(done) == ["prune:L3.w[5]", "random:7"]
    for k, v in a.items():
        np.testing.assert_array_equal(done["prune:L3.w[5]"][k], v)
        assert done["prune:L3.w[5]"][k].dtype == v.dtype
    np.testing.assert_array_equal(done["random:7"]["cell_loss"], b["cell_loss"])

    changed = dict(defs, **{"random:7": {"kind": "random", "draw": 8}})  # the plan changed for one condition
    assert sorted(again.load_done(changed)) == ["prune:L3.w[5]"]
    assert ConditionStore(tmp_path, inputs="model=xyz;cells=50;seed=0").load_done(defs) == {}  # other inputs
    assert not [p for p in (tmp_path / ".conditions").iterdir() if p.name.startswith(".")]  # no temporaries


def test_safe_names_do_not_collide():
    assert safe_name("a/b") != safe_name("a:b")
    assert "/" not in safe_name("prune:L3/norm2.w[5]")
