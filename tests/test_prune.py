"""Pruning with controls on a model where the plant is causally strong (a <cls>-only super weight in the last
block writes the cell embedding): the candidate leaves the random-control band, restoring its activation recovers,
the scaling curve passes through the baseline at 1, and the same seed gives the same table."""

import numpy as np
import pandas as pd
import pytest
from _plant import plant_cls_superweight, tiny_model, tiny_tokens

from scsuperweight import _keys as K
from scsuperweight.data import iter_batches
from scsuperweight.detect import find_superweights
from scsuperweight.prune import PruneOptions, build_conditions, prune, select_candidates

N = 48


@pytest.fixture(scope="module")
def setup():
    m = tiny_model(21, nlayers=3)
    tok = tiny_tokens(m, n_cells=N, seed=21)
    plain = list(iter_batches(tok, 16))
    masked = list(iter_batches(tok, 16, mask_ratio=0.3, seed=0))
    plant_cls_superweight(m, plain, 2, 6, 17, magnitude=300.0)
    cands = find_superweights(m, plain)
    labels = np.array(["astro", "micro", "neuron"])[np.arange(N) % 3]
    conds = np.where((np.arange(N) // 3) % 2 == 0, "AD", "control")
    donors = np.array([f"d{i}" for i in np.arange(N) // 6])
    # the plant moves the cell embedding, not the primary metric: restore and scaling (run by default only for
    # candidates whose zeroing passes on the primary metric) are asked for on every candidate
    opts = PruneOptions(n_random=10, n_boot=60, n_boot_set=8, seed=3, n_unit_random=5, n_matched=5, n_joint=5,
                        characterise="all")
    res = prune(m, masked, plain, cands, labels=labels, conditions=conds, donors=donors, options=opts)
    return m, plain, masked, cands, labels, conds, donors, opts, res


def _all(res, metric):
    c = res.collapse
    return c[(c["group"] == K.GROUP_ALL) & (c["metric"] == metric)].set_index("condition")


def test_contract_columns_and_conditions(setup):
    *_, res = setup
    c = res.collapse
    assert list(c.columns[: len(K.COLLAPSE_COLUMNS)]) == K.COLLAPSE_COLUMNS
    conds = set(c["condition"])
    top = "L2.linear2.w[6,17]"
    assert {K.COND_BASELINE, K.cond_prune(top), K.COND_TOP_OUTLIERS, K.cond_restore(top)} <= conds
    assert sum(x.startswith("random:") for x in conds) >= 10
    assert {K.cond_scale(top, f) for f in (0, 0.5, 1, 1.5, 2, 3)} <= conds
    groups = set(c["group"])
    assert {"all", "astro", "AD", "control", "astro|AD", "neuron|control"} <= groups
    assert {"gep_mse", "gepc_mse", "gep_pearson", "knn_accuracy", "leiden_ari", "leiden_nmi", "silhouette",
            "knn_preservation", "knc_preservation", "cpd", "mean_cosine", "effective_rank"} <= set(c["metric"])
    assert (c.loc[c["condition"] != K.COND_BASELINE, "bootstrap_unit"] == "donors").all()
    # every row names the parameter whose random draws are its null: a candidate's own, a draw's own
    pool = dict(zip(c["condition"], c["null_pool"]))
    assert pool[K.cond_prune(top)] == pool[K.cond_restore(top)] == "transformer_encoder.layers.2.linear2.weight"
    assert pool[K.COND_BASELINE] == pool[K.COND_TOP_OUTLIERS] == ""
    rand = c[c["condition"].str.startswith("random:")]
    assert (rand["null_pool"] == rand["control_for"]).all() and (rand["control_for"] != "").all()


def test_candidate_far_outside_random_band(setup):
    *_, res = setup
    t = _all(res, "cls_cosine_to_baseline")
    top = K.cond_prune("L2.linear2.w[6,17]")
    rand = t.loc[[i for i in t.index if i.startswith("random:")], "delta"]
    assert t.loc[top, "delta"] < -0.3
    assert rand.abs().max() < 0.05 * abs(t.loc[top, "delta"])
    assert t.loc[top, "p_value"] == pytest.approx(1 / 11)  # as extreme as it gets with 10 draws
    assert t.loc[top, "ci_high"] < 0  # interval excludes no change
    assert t.loc[top, "ci_low"] <= t.loc[top, "delta"] <= t.loc[top, "ci_high"]


def test_restore_recovers_and_scaling_passes_baseline(setup):
    *_, res = setup
    t = _all(res, "cls_cosine_to_baseline")
    top = "L2.linear2.w[6,17]"
    assert abs(t.loc[K.cond_restore(top), "delta"]) < 0.1 * abs(t.loc[K.cond_prune(top), "delta"])
    c = res.collapse
    at1 = c[c["condition"] == K.cond_scale(top, 1.0)]
    assert (at1["delta"].abs() < 1e-9).all()  # factor 1 is the baseline, every metric, every group
    curve = [t.loc[K.cond_scale(top, f), "delta"] for f in (0.0, 0.5, 1.0)]
    assert curve[0] < curve[1] <= curve[2] == 0.0
    assert t.loc[K.cond_scale(top, 0.0), "delta"] == pytest.approx(t.loc[K.cond_prune(top), "delta"])


def test_same_seed_same_table(setup):
    m, plain, masked, cands, labels, conds, donors, opts, res = setup
    again = prune(m, masked, plain, cands, labels=labels, conditions=conds, donors=donors, options=opts)
    pd.testing.assert_frame_equal(res.collapse, again.collapse)
    pd.testing.assert_frame_equal(res.contrasts, again.contrasts)


def test_contrasts_and_random_controls(setup):
    m, plain, masked, cands, labels, conds, donors, opts, res = setup
    ct = res.contrasts
    assert {"astro", "micro", "neuron"} <= set(ct["group"])
    assert (ct["ci_low"] <= ct["ci_high"]).all()
    assert np.allclose(ct["ci_level"], 1 - opts.alpha)  # the level the report prints
    built = build_conditions(m, select_candidates(cands, opts.max_candidates), opts)
    taken = {(e.param, e.index) for c in built if c.name.startswith("prune:") for e in c.edits}
    for c in built:
        if c.name.startswith("random:"):
            assert len(c.edits) == 1 and (c.edits[0].param, c.edits[0].index) not in taken
            assert c.edits[0].param == c.control_for
        if c.name == K.COND_TOP_OUTLIERS:
            assert all((e.param, e.index) not in taken for e in c.edits)
            assert len([e for e in c.edits if e.param.endswith("linear2.weight")]) == opts.outlier_floor


def test_restore_of_a_layernorm_candidate_patches_the_norm_output(setup):
    """Zeroing a LayerNorm gain dimension acts inside the norm: the restore condition must put back the norm's
    output at that dimension (the spike site, upstream of the norm, cannot undo it)."""
    m, plain, masked, cands, labels, conds, donors, opts, _ = setup
    ln = cands[cands["candidate"] == "L2.norm2.w[6]"]
    assert len(ln) == 1 and ln.iloc[0]["kind"] == K.KIND_LN_WEIGHT
    built = {c.name: c for c in build_conditions(m, ln, opts)}
    restore = built[K.cond_restore("L2.norm2.w[6]")]
    assert restore.restore[:2] == ("L2.norm2_out", 6)
    # 2 draws cannot pass: the restore (characterisation, by default for passing candidates) asked for anyway
    small = PruneOptions(n_random=2, n_boot=10, n_boot_set=2, n_scale=0, seed=3, characterise="all")
    res = prune(m, masked, plain, ln, labels=labels, conditions=conds, donors=donors, options=small)
    t = _all(res, "cls_cosine_to_baseline")
    assert t.loc[K.cond_prune("L2.norm2.w[6]"), "delta"] < -0.05  # zeroing the gain at the spike channel hurts
    # the last block's norm output at <cls> is the cell embedding: putting it back recovers it exactly
    assert abs(t.loc[K.cond_restore("L2.norm2.w[6]"), "delta"]) < 1e-6


def test_contrast_with_control_and_disease_levels_names_disease_the_case():
    # issue 16: levels 'control' / 'disease' once flipped the sign (the alphabetically first level was the case);
    # control is recognised, so disease is the case, and every row says so
    from scsuperweight.prune import Condition, _contrasts

    rng = np.random.default_rng(0)
    n = 40
    labels = np.repeat(["astro", "micro"], n // 2)
    conditions = np.tile(["control", "disease"], n // 2)
    base = {"cls": rng.normal(size=(n, 8)), "gep_mse": np.ones(n)}
    # pruning hurts disease cells by 0.5 more than control cells
    hurt = {"cls": base["cls"], "gep_mse": np.ones(n) + np.where(conditions == "disease", 0.7, 0.2)}
    results = {K.COND_BASELINE: base, "prune:c": hurt}
    conds = [Condition(K.COND_BASELINE, []), Condition("prune:c", [], candidate="c")]
    base_pc = {"gep_mse": base["gep_mse"]}
    con = _contrasts(conds, results, base_pc, labels, conditions, None, PruneOptions(n_boot=20))
    row = con[(con["metric"] == "gep_mse") & (con["group"] == "astro")].iloc[0]
    assert (row["case"], row["control"], row["contrast"]) == ("disease", "control", "disease - control")
    assert row["delta_disease"] == pytest.approx(0.7) and row["delta_control"] == pytest.approx(0.2)
    assert row["difference"] == pytest.approx(0.5)
    # explicit levels win, and the sign follows them
    flipped = _contrasts(conds, results, base_pc, labels, conditions, None, PruneOptions(n_boot=20),
                         case="control", control="disease")
    assert flipped["difference"].iloc[0] == pytest.approx(-0.5)
