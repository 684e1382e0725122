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


class _CellForwards:
    """Cells through every encoder block, counted by forward hooks (which leave outputs alone), per block."""

    def __init__(self, model):
        self.layers = list(model.transformer_encoder.layers)
        self.cells = 0
        self._hooks = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, m, args, out):
        self.cells += args[0].shape[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    @property
    def forwards(self) -> float:  # whole-model cell forwards
        return self.cells / len(self.layers)


def test_scan_plan_counts_every_trace_and_capture(small):  # noqa: F811
    """The scan ran 14x its plan (issue 14): the plan counted its rounds' traces, not the forwards that choose each
    candidate's column. Those are one cell each now, and the plan counts them: what ran equals the plan of the
    rounds and captures the scan records, and the default plan (2 rounds) is never below what ran."""
    from scsuperweight.plan import forward_flops, make_plan, max_scan_captures

    adata, model, _ = small
    a = adata.copy()
    with _CellForwards(model) as hooks:
        ssw.tl.scan(a, model, label_key="cell_type", max_cells=24, null_k=0, progress=False)
    p = ssw.get.params(a, "scan")
    n, traced, captures = p["n_cells_scanned"], p["n_rounds_traced"], p["n_captures"]
    assert traced == 2 and captures >= 1  # the planted spike's round, then a round with none passing
    assert hooks.forwards == traced * n + captures  # one cell per capture (a whole batch each before)
    cfg = model.config
    per_cell = forward_flops(cfg, 100)
    plan = make_plan(cfg, [], n_cells=0, tokens=100, scan_cells=n, scan_rounds=traced, scan_captures=captures)
    assert plan.flops_by_stage["scan"] == pytest.approx(hooks.forwards * per_cell, rel=1e-12)
    assert max_scan_captures(cfg.nlayers, traced) >= captures
    default = make_plan(cfg, [], n_cells=0, tokens=100, scan_cells=n)
    assert default.flops_by_stage["scan"] >= plan.flops_by_stage["scan"]


def test_genes_plan_counts_what_genes_runs(small):  # noqa: F811
    """tl.genes runs, per candidate, a plain forward and the masked forward with and without the candidate over
    its cells: 3 cell forwards a cell, as `make_plan` counts the genes step."""
    from scsuperweight.plan import forward_flops, make_plan

    adata, model, _ = small
    a = adata.copy()
    ssw.tl.scan(a, model, label_key="cell_type", max_cells=24, null_k=0, progress=False)
    with _CellForwards(model) as hooks:
        ssw.tl.genes(a, model, label_key="cell_type", max_cells_per_label=4, max_candidates=1, progress=False)
    n = ssw.get.params(a, "genes")["n_cells"]
    assert hooks.forwards == 3 * n
    cfg = model.config
    plan = make_plan(cfg, [], n_cells=n, tokens=100, genes_candidates=1)
    full, encoders = forward_flops(cfg, 100), forward_flops(cfg, 100, decoders=False)
    assert plan.flops_by_stage["genes"] == pytest.approx(n * (2 * full + encoders), rel=1e-12)


def test_budget_plans_to_90_percent_of_it(small):  # noqa: F811
    """The solver fits its estimate to BUDGET_TARGET (90%) of the budget: a run whose estimate is up to 20% short
    still lands within the budget's +10%."""
    from scsuperweight.plan import BUDGET_TARGET
    from scsuperweight.prune import PruneOptions, budget_prune, plan_prune

    _, model, cands = small
    opts = PruneOptions(n_random=40, n_boot=200)
    counts = {"a": 200, "b": 150, "c": 30}
    kw = dict(tokens=1200, flop_rate=2e9, scan_cells=380)
    full = plan_prune(model, cands, opts, n_cells=380, max_seq_len=1200, **kw)
    budget = 0.5 * full.est_seconds
    b = budget_prune(model, cands, opts, budget, label_counts=counts, max_seq_len=1200, **kw)
    assert BUDGET_TARGET == 0.9 and b.target == BUDGET_TARGET
    assert b.feasible and b.est_seconds <= 0.9 * budget and b.budget_seconds == budget
    # the whole budget would have allowed more: the margin is used, not lost to rounding
    whole = budget_prune(model, cands, opts, budget / 0.9, label_counts=counts, max_seq_len=1200, **kw)
    assert whole.est_seconds > b.est_seconds
    with pytest.raises(ssw.errors.DataError, match="target"):
        ssw.plan.choose_budget(10, config=model.config, flop_rate=1e9, label_counts=counts, tokens=100,
                               fixed_conditions=[], null_layers=[], target=1.5)


def test_a_whole_run_counts_the_calibration_prune_makes_for_its_own_plan(small):  # noqa: F811
    """Calibrating at the run's batch shape (up to CALIBRATION_TOKENS) costs forwards; a whole run's prune makes
    one (a warm-up and 3) for its own plan, and the whole run's plan counts it."""
    from scsuperweight.plan import CALIBRATION_TOKENS, calibration_cells, forward_flops
    from scsuperweight.prune import PruneOptions, plan_prune

    assert CALIBRATION_TOKENS == 8192
    assert calibration_cells(256, 32) == 4 * 32 and calibration_cells(1200, 32) == 4 * 6
    assert calibration_cells(512, 8) == 4 * 8 and calibration_cells(20000, 32) == 4
    _, model, cands = small
    kw = dict(n_cells=30, tokens=256, max_seq_len=256, flop_rate=1e9, scan_cells=64)
    without = plan_prune(model, cands, PruneOptions(), **kw)
    whole = plan_prune(model, cands, PruneOptions(), calibration_batch=32, **kw)
    assert "calibrate" not in without.flops_by_stage
    assert whole.flops_by_stage["calibrate"] == pytest.approx(128 * forward_flops(model.config, 256), rel=1e-12)
    assert whole.total_flops == pytest.approx(without.total_flops + whole.flops_by_stage["calibrate"], rel=1e-12)
