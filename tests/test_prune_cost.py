"""Cost without loss of validity, through `prune` on a planted model: sequential nulls (Besag & Clifford 1991) give
the full-draw verdicts for a planted strong candidate and for null candidates while a null candidate's parameter
costs a handful of draws; the first-order null places the planted scalar in the top few percent of its matrix and
predicts the exact draws' effects in rank order (bf16: tests/test_cost_faces.py, through tl.prune)."""

import numpy as np
import pandas as pd
import pytest
from _plant import plant_cls_superweight, tiny_model, tiny_tokens

from scsuperweight import _keys as K
from scsuperweight import results as R
from scsuperweight.data import iter_batches
from scsuperweight.judge import verdicts
from scsuperweight.prune import PruneOptions, prune
from scsuperweight.sequential import decision_h

N = 24
PLANTED = "transformer_encoder.layers.0.linear2.weight"
NULLS = ("transformer_encoder.layers.1.linear1.weight", "transformer_encoder.layers.2.linear1.weight")


@pytest.fixture(scope="module")
def planted():
    m = tiny_model(21, nlayers=3)
    tok = tiny_tokens(m, n_cells=N, seed=21)
    plain = list(iter_batches(tok, 12))
    masked = list(iter_batches(tok, 12, mask_ratio=0.3, seed=0))
    # layer 0: the spike on <cls> reaches every gene through attention, so the primary metric (gepc_mse) moves
    plant_cls_superweight(m, plain, 0, 6, 17, magnitude=300.0)
    cands = pd.DataFrame([{"candidate": cid, "param": p, "row": r, "col": c, "screen": "activation",
                           "above_threshold": True}
                          for cid, p, r, c in (("planted", PLANTED, 6, 17), ("null_a", NULLS[0], 7, 2),
                                               ("null_b", NULLS[1], 4, 9))])
    labels = np.array(["astro", "micro", "neuron"])[np.arange(N) % 3]
    return m, plain, masked, cands, labels


def _run(planted, **kw):
    m, plain, masked, cands, labels = planted
    opts = PruneOptions(n_random=20, n_boot=20, n_boot_set=0, max_candidates=3, n_scale=0, n_restore=0, seed=3,
                        mean_ablation=False, granularities=("scalar",), joint=False, n_matched=0, **kw)
    res = prune(m, masked, plain, cands, labels=labels, options=opts)
    v = verdicts(res.collapse, primary_metric="gepc_mse", candidates=res.params["candidates"])
    return res, v[v["ablation"] == "prune"].set_index("candidate")


@pytest.fixture(scope="module")
def both(planted):
    return _run(planted, sequential=False, first_order=False), _run(planted)


def test_sequential_verdicts_equal_full_draw_verdicts(both):
    (_, full), (_, seq) = both
    assert full.loc["planted", "passes"] and not full.loc["null_a", "passes"] and not full.loc["null_b", "passes"]
    assert seq["passes"].to_dict() == full["passes"].to_dict()
    # the strong candidate used every draw, so its p is the full-draw p exactly
    assert seq.loc["planted", "p_value"] == full.loc["planted", "p_value"] == pytest.approx(1 / 21)


def test_null_candidates_stop_after_a_handful_of_draws(both):
    (full_res, _), (res, _) = both
    draws = res.params["null_draws"]
    h = decision_h(0.05, 20)
    assert draws[PLANTED] == 20 and full_res.params["null_draws"] is None
    assert all(h <= draws[p] <= 2 * h for p in NULLS)  # a round is h draws; nulls settle in the first or second
    c = res.collapse
    prim = c[(c["metric"] == "gepc_mse") & (c["group"] == K.GROUP_ALL)].set_index("condition")
    assert prim.loc["prune:planted", "null_draws"] == 20 and not prim.loc["prune:planted", "null_stopped_early"]
    assert prim.loc["prune:null_a", "null_draws"] == draws[NULLS[0]] and prim.loc["prune:null_a", "null_stopped_early"]
    assert prim.loc["prune:planted", "p_sequential"] == pytest.approx(1 / 21)
    assert prim.loc["prune:null_a", "p_sequential"] >= 0.05
    # the draws made are a prefix of the fixed run's draws: same conditions, same deltas
    fc = full_res.collapse
    fprim = fc[(fc["metric"] == "gepc_mse") & (fc["group"] == K.GROUP_ALL)].set_index("condition")
    rand = [i for i in prim.index if i.startswith("random:")]
    assert len(rand) == sum(draws.values()) < 3 * 20
    np.testing.assert_allclose(prim.loc[rand, "delta"], fprim.loc[rand, "delta"])
    # the columns are part of the schema, typed on the way back
    typed = R.typed(c, "collapse")
    assert str(typed["null_draws"].dtype) == "Int64" and typed["null_stopped_early"].dtype == bool


def test_first_order_null_ranks_the_planted_scalar_and_predicts_the_draws(both):
    _, (res, _) = both
    fo = res.firstorder.set_index("candidate")
    assert list(fo.columns) == list(R.spec("firstorder").columns)[1:]
    print("\n" + fo[["rank", "percentile", "first_order", "exact_delta", "rank_correlation", "n_draws"]].to_string())
    # a super weight's removal is no small perturbation (the post-norm saturates): first order still places it in
    # the top few percent of its 2,048 scalars, far above a null candidate, but not necessarily first
    assert fo.loc["planted", "percentile"] > 95 and fo.loc["planted", "rank"] < fo.loc["null_a", "rank"]
    assert fo.loc["planted", "n_scalars"] == 32 * 64 and fo.loc["planted", "n_draws"] == 20
    # small perturbations are first-order: the random draws' exact effects follow the estimate in rank order
    assert fo.loc["planted", "rank_correlation"] > 0.8
    assert fo.loc["null_a", "rank"] > 10


def test_every_ablation_judged_against_a_pool_keeps_its_full_draw_verdict(planted):
    """A mean ablation is judged against the same parameter's draws as zeroing: the pool must not stop on the
    zeroing decision alone (a null zeroing with a strong mean ablation would leave it 1 draw)."""
    m, plain, masked, cands, labels = planted
    # the LayerNorm bias at the planted channel: zeroing it changes nothing (it is 0), its mean ablation a lot
    bias = {"candidate": "L0.norm2.b[6]", "param": "transformer_encoder.layers.0.norm2.bias", "row": 6,
            "col": None, "screen": "activation", "above_threshold": True}
    cands = pd.concat([cands, pd.DataFrame([bias])], ignore_index=True)
    out = {}
    for seq in (False, True):
        opts = PruneOptions(n_random=20, n_boot=20, n_boot_set=0, max_candidates=4, n_scale=0, n_restore=0, seed=3,
                            mean_ablation=True, granularities=("scalar",), joint=False, n_matched=0,
                            sequential=seq, first_order=False)
        res = prune(m, masked, plain, cands, labels=labels, options=opts)
        v = verdicts(res.collapse, primary_metric="gepc_mse", candidates=res.params["candidates"])
        out[seq] = v.set_index(["candidate", "ablation"])["passes"].to_dict()
    assert set(k[1] for k in out[True]) >= {"prune", "mean"}
    assert not out[False][("L0.norm2.b[6]", "prune")]
    assert any(ok for (c, a), ok in out[False].items() if c == "L0.norm2.b[6]" and a != "prune")
    assert out[True] == out[False]


@pytest.fixture(scope="module")
def every_pool(planted):
    """Every ablation with its pool (uniform, neuron, channel, |w|-matched), fixed draws against sequential ones;
    every candidate characterised so that a null candidate's matched draws run too."""
    m, plain, masked, cands, labels = planted
    # a null down-projection scalar: its neuron and channel have pools of their own (block 2)
    null_c = {"candidate": "null_c", "param": "transformer_encoder.layers.2.linear2.weight", "row": 3, "col": 5,
              "screen": "activation", "above_threshold": True}
    cands = pd.concat([cands, pd.DataFrame([null_c])], ignore_index=True)
    out = {}
    for seq in (False, True):
        opts = PruneOptions(n_random=20, n_boot=20, n_boot_set=0, max_candidates=4, n_scale=0, n_restore=0, seed=3,
                            mean_ablation=True, granularities=("scalar", "neuron", "channel"), joint=True,
                            n_unit_random=10, n_matched=10, n_joint=10, sequential=seq, first_order=False,
                            characterise="all")
        out[seq] = prune(m, masked, plain, cands, labels=labels, options=opts)
    return out


def test_every_pool_stops_sequentially_with_the_full_draw_decisions(every_pool):
    full, seq = every_pool[False], every_pool[True]
    vf, vs = (verdicts(r.collapse, primary_metric="gepc_mse", candidates=r.params["candidates"])
              .set_index(["candidate", "ablation"]) for r in (full, seq))
    assert vs["passes"].to_dict() == vf["passes"].to_dict()
    assert vf.loc[("planted", "prune"), "passes"] and not vf.loc[("null_a", "prune"), "passes"]
    # p_matched (beside the rule) gives the same decision on the primary metric from the truncated matched pools
    assert ((vs["p_matched"] < 0.05) == (vf["p_matched"] < 0.05)).all()
    draws = seq.params["null_draws"]
    kinds = dict(zip(seq.conditions["control_for"], seq.conditions["kind"]))
    print({p: (kinds.get(p), n) for p, n in draws.items()})
    # the planted candidate's uniform and matched pools run every draw; null candidates' channel and matched
    # pools stop early
    assert draws[PLANTED] == 20 and draws["planted"] == 10
    assert draws["null_a"] < 10 and draws["null_b"] < 10
    assert draws["null_a"] < 10 and draws["null_c"] < 10
    assert draws["neuron:L2"] < 10 and draws["channel:L2"] < 10
    # the draws made are a prefix of the fixed run's, with the same deltas
    c, fc = (r.collapse[(r.collapse["metric"] == "gepc_mse") & (r.collapse["group"] == K.GROUP_ALL)]
             .set_index("condition") for r in (seq, full))
    ran = [x for x in c.index if c.loc[x, "control_for"]]
    assert set(ran) < set(x for x in fc.index if fc.loc[x, "control_for"])
    np.testing.assert_allclose(c.loc[ran, "delta"], fc.loc[ran, "delta"])
