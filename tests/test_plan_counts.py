"""The plan is what runs (issue 14): `plan_prune` counts every condition kind prune runs, the #17 ablations and
their pools included, at the most; a fixed-draw run that characterises every candidate runs exactly the planned
conditions, a default run (sequential nulls, characterisation of passing candidates only) at most those; and a
budget fits the whole plan, the params used being its choices."""

from collections import Counter

import pytest
from test_cost_faces import small  # noqa: F401 - the planted model and its data (module fixture)

import scsuperweight as ssw
from scsuperweight.plan import condition_kind, format_plan

SIZES = {"max_cells_per_label": 6, "n_random": 20, "n_boot": 20, "first_order": False, "n_unit_random": 5,
         "n_matched": 5, "n_joint": 5, "scale_factors": (0.0, 1.0, 2.0)}


def _ran(small, **kw):  # noqa: F811
    adata, model, cands = small
    a = adata.copy()
    ssw.tl.prune(a, model, label_key="cell_type", candidates=cands, progress=False, **{**SIZES, **kw})
    p = ssw.get.params(a, "prune")
    if kw.get("dry_run"):
        return p, Counter(), a
    ran = Counter(condition_kind(c) for c in set(ssw.get.collapse(a)["condition"]))
    return p, ran, a


@pytest.fixture(scope="module")
def runs(small):  # noqa: F811
    return {"fixed": _ran(small, sequential=False, characterise="all"), "default": _ran(small)}


def test_fixed_draw_run_runs_exactly_the_planned_conditions(runs):
    p, ran, _ = runs["fixed"]
    planned = p["plan"]["conditions_by_kind"]
    # every ablation kind is in the plan (the plan once counted 72 of 161 conditions)
    assert {"mean", "neuron", "channel", "random_neuron", "random_channel", "matched", "joint", "random_joint",
            "scale"} <= set(planned)
    # the joint phase is planned at its most (every candidate passes); here only the planted one does, so none ran
    assert planned["joint"] == 1 and planned["random_joint"] == SIZES["n_joint"]
    assert "joint" not in ran
    assert {k: v for k, v in planned.items() if k not in ("joint", "random_joint")} == dict(ran)
    assert p["plan"]["n_conditions"] == sum(planned.values())


def test_default_run_stays_within_the_plan_and_records_what_it_skipped(runs):
    p, ran, a = runs["default"]
    planned = p["plan"]["conditions_by_kind"]
    assert all(n <= planned[k] for k, n in ran.items()), (dict(ran), planned)
    assert p["conditions_by_kind"] == dict(ran)
    # the null candidate's zeroing fails: it is not restored, scaled or matched, and run.json says why
    v = ssw.get.verdicts(a).query("ablation == 'prune'").set_index("candidate")["passes"]
    assert v["planted"] and not v["null"]
    assert p["characterised"] == ["planted"] and "null" in p["not_characterised"]
    assert "does not pass" in p["not_characterised"]["null"]
    col = set(ssw.get.collapse(a)["condition"])
    assert not any(c.startswith(("scale:null:", "matched:null:", "restore:null")) for c in col)
    assert any(c.startswith("scale:planted:") for c in col) and any(c.startswith("matched:planted:") for c in col)
    # the null parameter's uniform draws stopped early; the expected count is printed beside the maximum
    assert sum(1 for c in col if c.startswith("random:")) < 2 * SIZES["n_random"]
    exp = p["plan"]["expected_by_kind"]
    assert sum(exp.values()) < p["plan"]["n_conditions"] and exp["random"] < planned["random"]
    assert "expected" in format_plan(ssw.plan.Plan(**{k: v for k, v in p["plan"].items()
                                                      if k in ssw.plan.Plan.__dataclass_fields__}))


def test_budget_fits_the_whole_plan(small):  # noqa: F811
    """With a fixed cost model (no calibration: nothing timed), the choices' estimate, every condition kind and the
    scan included, is within the budget, and the plan of the choices is the plan `plan_prune` makes for them (the
    params a run then uses are the choices: test_cost_faces.test_budget_choices_are_the_params_used...)."""
    from scsuperweight.prune import PruneOptions, budget_prune, plan_prune

    _, model, cands = small
    opts = PruneOptions(n_random=40, n_boot=200)
    counts = {"a": 200, "b": 150, "c": 30}
    kw = dict(tokens=1200, flop_rate=2e9, scan_cells=380)
    full = plan_prune(model, cands, opts, n_cells=380, max_seq_len=1200, **kw)
    assert {"mean", "neuron", "random_neuron", "matched", "random_joint"} <= set(full.conditions_by_kind)
    assert full.flops_by_stage["scan"] > 0
    for frac in (0.5, 0.2):
        budget = frac * full.est_seconds
        b = budget_prune(model, cands, opts, budget, label_counts=counts, max_seq_len=1200, **kw)
        assert b.feasible and b.est_seconds <= budget, b.reasons
        n_cells = sum(min(v, b.cells_per_label) for v in counts.values())
        again = plan_prune(model, cands, PruneOptions(n_random=b.n_random, n_boot=b.n_boot), n_cells=n_cells,
                           max_seq_len=b.max_seq_len, **{**kw, "scan_cells": b.scan_cells})
        assert again.est_seconds == pytest.approx(b.est_seconds, rel=1e-9)
        assert again.conditions_by_kind == b.plan.conditions_by_kind
