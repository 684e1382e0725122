"""The budget lever `draw_embeddings` (issue 14): with it off, the control draws run the masked (reconstruction)
pass only. On the same planted run the verdicts, the primary metric's deltas and p-values and the sequential
nulls' draws and stopping are identical; the draws have no embedding-metric rows, the candidates' embedding
metrics get a NaN p-value with a note saying why, the evaluator ran no plain pass for a draw, and the plan counts
exactly what ran."""

from collections import Counter

import numpy as np
import pytest
from test_cost_faces import small  # noqa: F401 - the planted model and its data (module fixture)
from test_plan_counts import _CellForwards

import scsuperweight as ssw
from scsuperweight import plan as P
from scsuperweight.prune import UNJUDGED_NOTE, PruneOptions, build_conditions, plan_prune, select_candidates

# uniform draws only (no ablations, no joint phase): the draws that ran are the `random:` conditions
SIZES = {"max_cells_per_label": 6, "n_random": 20, "n_boot": 20, "first_order": False, "mean_ablation": False,
         "granularities": ("scalar",), "joint": False, "n_matched": 0, "embed_all": False,
         "scale_factors": (0.0, 1.0, 2.0), "max_seq_len": 64}
RECON = ("gep_mse", "gep_pearson", "gepc_mse", "gepc_pearson")


def _run(small, **kw):  # noqa: F811
    adata, model, cands = small
    a = adata.copy()
    with _CellForwards(model) as hooks:
        ssw.tl.prune(a, model, label_key="cell_type", candidates=cands, progress=False, **{**SIZES, **kw})
    return a, hooks.cells


@pytest.fixture(scope="module")
def pair(small):  # noqa: F811
    return {on: _run(small, draw_embeddings=on) for on in (True, False)}


def _key(df):
    return df.sort_values(["condition", "metric", "group"]).reset_index(drop=True)


def test_verdicts_and_primary_metric_are_unchanged(pair):
    (on, _), (off, _) = pair[True], pair[False]
    v_on, v_off = ssw.get.verdicts(on), ssw.get.verdicts(off)
    assert v_on["passes"].tolist() == v_off["passes"].tolist()
    assert v_on.set_index("candidate").loc["planted", "passes"]  # the planted one still passes
    assert not v_on.set_index("candidate").loc["null", "passes"]
    c_on, c_off = ssw.get.collapse(on), ssw.get.collapse(off)
    assert set(c_on["condition"]) == set(c_off["condition"])  # the same draws ran: the nulls stopped alike
    r_on, r_off = _key(c_on[c_on["metric"].isin(RECON)]), _key(c_off[c_off["metric"].isin(RECON)])
    assert len(r_on) and len(r_on) == len(r_off)
    for col in ("condition", "metric", "group", "value", "delta", "ci_low", "ci_high", "p_value", "null_draws",
                "null_stopped_early", "p_sequential"):
        assert r_on[col].equals(r_off[col]), col
    p_on, p_off = ssw.get.params(on, "prune"), ssw.get.params(off, "prune")
    assert p_on["null_draws"] == p_off["null_draws"] and p_on["draw_embeddings"] and not p_off["draw_embeddings"]
    # the null candidate's parameter stopped early (the sequential nulls did their work in both runs)
    assert sum(1 for c in set(c_off["condition"]) if c.startswith("random:")) < 2 * SIZES["n_random"]


def test_draws_have_no_embedding_rows_and_candidates_no_embedding_p(pair):
    (on, _), (off, _) = pair[True], pair[False]
    c_on, c_off = ssw.get.collapse(on), ssw.get.collapse(off)
    draws_on = c_on[c_on["condition"].str.startswith("random:")]
    draws_off = c_off[c_off["condition"].str.startswith("random:")]
    assert set(draws_on["metric"]) - set(RECON)  # with the embedding pass the draws had embedding metrics
    assert set(draws_off["metric"]) == set(RECON)
    emb_on = c_on[c_on["condition"].eq("prune:planted") & ~c_on["metric"].isin(RECON)]
    emb_off = c_off[c_off["condition"].eq("prune:planted") & ~c_off["metric"].isin(RECON)]
    assert len(emb_off) == len(emb_on) > 0  # the candidate's embedding metrics are still measured ...
    assert np.allclose(_key(emb_on)["delta"], _key(emb_off)["delta"], equal_nan=True)
    assert emb_on["p_value"].notna().any() and emb_off["p_value"].isna().all()  # ... but not judged
    assert emb_off["note"].str.contains(UNJUDGED_NOTE, regex=False).all()
    assert not c_off.loc[c_off["metric"].isin(RECON), "note"].str.contains(UNJUDGED_NOTE, regex=False).any()
    p = ssw.get.params(off, "prune")
    assert p["embedding_metrics_judged"] is False and "draw_embeddings" in p["embedding_metrics_note"]


def test_draws_ran_no_plain_pass_and_the_plan_counts_it(pair, small):  # noqa: F811
    """The block forwards saved are exactly the draws' plain passes (cells x blocks rerun), and the plan of the
    lever drops exactly those: planned FLOPs saved = block FLOPs x the cell-blocks the run saved, per draw."""
    adata, model, cands = small
    (on, cells_on), (off, cells_off) = pair[True], pair[False]
    n_cells = ssw.get.params(off, "prune")["n_cells_evaluated"]
    ran = set(ssw.get.collapse(off)["condition"])
    opts = PruneOptions(**{k: v for k, v in SIZES.items() if k in PruneOptions.__dataclass_fields__})
    tokens = SIZES["max_seq_len"]
    sel = select_candidates(cands, opts.max_candidates)
    nl = model.config.nlayers
    blocks = {c.name: nl - int(c.edits[0].param.split(".")[2]) for c in build_conditions(model, sel, opts)
              if c.kind == "random"}
    assert cells_on - cells_off == n_cells * sum(b for name, b in blocks.items() if name in ran)
    # the plan (every draw: the most a run does) drops the plain pass of every draw and nothing else
    kw = dict(n_cells=n_cells, tokens=tokens, max_seq_len=tokens)
    full, cut = plan_prune(model, cands, opts, **kw), plan_prune(model, cands, PruneOptions(
        **{**opts.__dict__, "draw_embeddings": False}), **kw)
    block = float(P.block_flops(model.config.d_model, model.config.d_hid, tokens))
    saved = {k: full.flops_by_stage[k] - cut.flops_by_stage[k] for k in full.flops_by_stage}
    assert saved["conditions:random"] == pytest.approx(n_cells * sum(blocks.values()) * block, rel=1e-12)
    assert all(v == 0 for k, v in saved.items() if k not in ("conditions", "conditions:random"))
    assert full.conditions_by_kind == cut.conditions_by_kind
    # the run's own plan (its token counts) is the lever's: at most what it counts ran, and the draws' share smaller
    planned = ssw.get.params(off, "prune")["plan"]
    ran_kinds = Counter(P.condition_kind(c) for c in ran)
    assert all(n <= planned["conditions_by_kind"][k] for k, n in ran_kinds.items())
    with_emb = ssw.get.params(on, "prune")["plan"]["flops_by_stage"]
    assert planned["flops_by_stage"]["conditions:random"] < with_emb["conditions:random"]
    assert planned["flops_by_stage"]["conditions:prune"] == pytest.approx(with_emb["conditions:prune"], rel=1e-12)



def test_a_result_without_cls_persists_and_never_serves_a_condition_needing_it(tmp_path):
    """Resume: a draw's result without ``cls`` is stored and read back as it was; the lever is part of the
    condition's definition, so a run with the embedding pass recomputes it rather than reading a result without."""
    from dataclasses import replace

    from scsuperweight.condstore import ConditionStore, definition, execute, persisting
    from scsuperweight.instrument import ScalarEdit
    from scsuperweight.prune import Condition

    cond = Condition("random:0", [ScalarEdit("w", (1, 2), 0.0)], control_for="w", kind="random", embedding=False)
    calls = []

    def run(c):
        calls.append(c.name)
        out = {"gepc_mse": np.arange(4.0)}
        return out if not c.embedding else {**out, "cls": np.ones((4, 2))}

    store = ConditionStore(tmp_path, inputs="x")
    with persisting(store):
        first = execute(run, [cond])
    with persisting(ConditionStore(tmp_path, inputs="x")):
        again = execute(run, [cond])  # read back, not rerun
        needs = execute(run, [replace(cond, embedding=True)])  # another definition: computed
    assert calls == ["random:0", "random:0"]
    assert set(first["random:0"]) == set(again["random:0"]) == {"gepc_mse"}
    assert np.array_equal(again["random:0"]["gepc_mse"], np.arange(4.0)) and "cls" in needs["random:0"]
    assert definition(cond) != definition(replace(cond, embedding=True))
