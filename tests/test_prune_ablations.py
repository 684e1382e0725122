"""The new ablations judged like zeroing (issue 17, requirements 1-3, 7), on planted tables and a planted model whose
answers are known: a super weight whose zeroing passes but whose mean ablation does not; a neuron that passes where
its scalar does not; each ablation's p against its own pool; p_matched from the candidate's |w| bin."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scsuperweight import _keys as K
from scsuperweight.judge import ABLATIONS, VERDICT_COLUMNS, verdicts

PARAM = "transformer_encoder.layers.1.linear2.weight"
CAND = "L1.linear2.w[5,10]"
N = 19


def _r(condition, delta, lo=np.nan, hi=np.nan, *, candidate="", control_for="", pool="") -> dict:
    return {"condition": condition, "metric": "gepc_mse", "group": K.GROUP_ALL, "value": 1.0 + delta,
            "delta": delta, "ci_low": lo, "ci_high": hi, "p_value": np.nan, "candidate": candidate,
            "control_for": control_for, "null_pool": pool}


def planted_table() -> pd.DataFrame:
    """Uniform draws of PARAM within 0.019; |w|-matched draws of CAND up to 0.5 (the top bin's other weights matter
    more); random neurons of block 1 within 0.05; random joint sets within 0.02. The candidate: zeroing +1.0
    (beyond all), mean +0.004 (inside the uniform null), neuron +0.8 (beyond the neuron null), channel +0.03 (inside
    its null, which has a single draw pool of its own), joint +2.0."""
    rows = [_r(K.COND_BASELINE, 0.0), _r(K.COND_TOP_OUTLIERS, 0.1, 0.08, 0.12)]
    for k, d in enumerate(np.linspace(-0.019, 0.019, N)):
        rows.append(_r(K.cond_random(k), float(d), control_for=PARAM, pool=PARAM))
    for k, d in enumerate(np.linspace(-0.5, 0.5, 9)):
        rows.append(_r(f"matched:{CAND}:{k}", float(d), control_for=CAND, pool=CAND))
    for k, d in enumerate(np.linspace(-0.05, 0.05, 9)):
        rows.append(_r(f"random_neuron:L1:{k}", float(d), control_for="neuron:L1", pool="neuron:L1"))
    for k, d in enumerate(np.linspace(-0.05, 0.05, 9)):
        rows.append(_r(f"random_channel:L1:{k}", float(d), control_for="channel:L1", pool="channel:L1"))
    for k, d in enumerate(np.linspace(-0.02, 0.02, 4)):
        rows.append(_r(f"random_joint:{k}", float(d), control_for=K.COND_JOINT, pool=K.COND_JOINT))
    rows += [_r(K.cond_prune(CAND), 1.0, 0.9, 1.1, candidate=CAND, pool=PARAM),
             _r(f"mean:{CAND}", 0.004, 0.002, 0.006, candidate=CAND, pool=PARAM),
             _r(f"neuron:{CAND}", 0.8, 0.7, 0.9, candidate=CAND, pool="neuron:L1"),
             _r(f"channel:{CAND}", 0.03, 0.02, 0.04, candidate=CAND, pool="channel:L1"),
             _r(K.COND_JOINT, 2.0, 1.8, 2.2, candidate=CAND, pool=K.COND_JOINT)]
    return pd.DataFrame(rows)


def test_every_ablation_judged_against_its_own_pool():
    v = verdicts(planted_table(), primary_metric="gepc_mse", alpha=0.25, ci_level=0.95)
    assert list(v.columns) == VERDICT_COLUMNS
    assert list(v["ablation"]) == ["prune", "mean", "neuron", "channel", "joint"]  # ABLATIONS order, zeroing first
    assert set(v["ablation"]) <= set(ABLATIONS)
    by = v.set_index("ablation")
    assert list(by["condition"]) == [K.cond_prune(CAND), f"mean:{CAND}", f"neuron:{CAND}", f"channel:{CAND}",
                                     K.COND_JOINT]
    assert by.loc["prune", "passes"] and not by.loc["mean", "passes"]  # zero collapses, the mean does not
    assert by.loc["mean", "cond_p"] is False and by.loc["mean", "null_pool"] == PARAM
    assert by.loc["neuron", "passes"] and by.loc["neuron", "n_random"] == 9
    assert by.loc["neuron", "p_value"] == pytest.approx(1 / 10)  # beyond all 9 neuron draws
    assert by.loc["channel", "null_pool"] == "channel:L1" and not by.loc["channel", "passes"]
    assert by.loc["joint", "passes"] and by.loc["joint", "p_value"] == pytest.approx(1 / 5)
    assert by.loc["joint", "candidate"] == CAND and by.loc["joint", "n_random"] == 4


def test_p_matched_is_taken_against_the_candidates_bin_and_does_not_change_the_rule():
    v = verdicts(planted_table(), primary_metric="gepc_mse", alpha=0.25).set_index("ablation")
    # zeroing +1.0: beyond every uniform draw (p = 1/20) and every matched one (p = 1/10)
    assert v.loc["prune", "p_value"] == pytest.approx(1 / (N + 1))
    assert v.loc["prune", "p_matched"] == pytest.approx(1 / 10) and v.loc["prune", "n_matched"] == 9
    # the mean's +0.004 is inside the matched draws too: two-sided p over 9 draws from -0.5 to 0.5
    expect = (1 + np.sum(np.abs(np.linspace(-0.5, 0.5, 9)) >= 0.004)) / 10
    assert v.loc["mean", "p_matched"] == pytest.approx(expect)
    assert np.isnan(v.loc["joint", "p_matched"])  # no bin for a set of candidates
    # the rule is the uniform p's: a table without the matched draws gives the same verdicts
    t = planted_table()
    plain = verdicts(t[~t["condition"].str.startswith("matched:")], primary_metric="gepc_mse", alpha=0.25)
    assert list(plain["passes"]) == list(v["passes"])


def test_zeroing_only_and_older_tables_keep_one_row_per_candidate():
    t = planted_table()
    v = verdicts(t, primary_metric="gepc_mse", alpha=0.25, ablations=())
    assert list(v["ablation"]) == ["prune"]
    old = t[t["condition"].isin([K.COND_BASELINE, K.COND_TOP_OUTLIERS, K.cond_prune(CAND)])
            | t["condition"].str.startswith("random:")].drop(columns=["null_pool"])
    v = verdicts(old, primary_metric="gepc_mse", alpha=0.25)
    assert list(v["candidate"]) == [CAND] and v["passes"].iloc[0]


def test_report_section_reads_the_verdicts(tmp_path):
    from scsuperweight.report import report

    t = planted_table()
    v = verdicts(t, primary_metric="gepc_mse", alpha=0.25)
    res = {"collapse": t, "verdicts": v, "superweights": pd.DataFrame({"candidate": [CAND], "param": [PARAM]})}
    html = report(res, tmp_path / "r.html", metric="gepc_mse", alpha=0.25).read_text()
    sec = html.split("id='ablations'")[1].split("</section>")[0]
    assert "Zero vs mean, and granularity" in sec
    assert "zeroing passes the controls but mean ablation does not" in sec
    assert "its neuron passes" in sec and "its channel fails" in sec
    assert "Joint ablation" in sec
    # the hypotheses still judge each candidate once, on zeroing
    assert html.count("<span class='badge pass'>passes</span>") >= 1
    hyp = html.split("id='hypotheses'")[1].split("</section>")[0]
    assert hyp.count("class='badge") == 1


# ------------------------------------------------------------------------------------------------------------
# through prune on planted models
# ------------------------------------------------------------------------------------------------------------
def _planted(seed: int, in_scale: float, bias: float, write):
    """Unit 10 of block 1 with input weights `in_scale` x noise and bias `bias`; `write` sets what it writes (the
    planted units of tests/test_ablation.py); with masked and plain batches of 24 cells."""
    import torch
    from _plant import tiny_model, tiny_tokens

    from scsuperweight.data import iter_batches

    m = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        blk = m.transformer_encoder.layers[1]
        blk.linear1.weight[10] = in_scale * torch.randn(32, generator=g)
        blk.linear1.bias[10] = bias
        write(blk.linear2.weight, g)
    tok = tiny_tokens(m, 24, seed)
    return m, list(iter_batches(tok, 8, mask_ratio=0.3, seed=0)), list(iter_batches(tok, 8))


def _cands() -> pd.DataFrame:
    return pd.DataFrame([{"candidate": CAND, "kind": "ffn_down", "layer": 1, "param": PARAM, "row": 5, "col": 10,
                          "site": "L1.ffn_out", "channel": 5, "token": "<cls>"}])


ALPHA = 0.1


def _opts(**over):
    from scsuperweight.prune import PruneOptions

    # 10 draws per pool: the smallest p is 1/11, below ALPHA
    base = dict(n_random=10, n_boot=30, n_boot_set=0, n_scale=0, n_restore=0, n_unit_random=10, n_matched=0,
                joint=False, granularities=("scalar",), seed=0)
    return PruneOptions(**{**base, **over})


def test_prune_zeroing_passes_where_the_mean_does_not():
    """A unit that fires exactly 1 at every token (no input weights, bias 1) and writes 50 into channel 5: zeroing
    w[5,10] removes an offset of 50 the model relies on; replacing it by its mean (w = 0, bias += 50) leaves the
    model as it was, up to rounding, far inside the random draws."""
    from scsuperweight.prune import prune

    m, masked, plain = _planted(0, 0.0, 1.0, lambda w, g: w.__setitem__((5, 10), 50.0))
    res = prune(m, masked, plain, _cands(), options=_opts())
    c = res.collapse[(res.collapse["group"] == K.GROUP_ALL) & (res.collapse["metric"] == "cls_cosine_to_baseline")]
    c = c.set_index("condition")
    assert {f"mean:{CAND}", f"mean_activation:{CAND}"} <= set(c.index)
    assert c.loc[f"mean:{CAND}", "null_pool"] == c.loc[K.cond_prune(CAND), "null_pool"] == PARAM
    v = verdicts(res.collapse, primary_metric="gepc_mse", alpha=ALPHA).set_index("ablation")
    assert v.loc["prune", "passes"], v.loc["prune", "reason"]
    assert v.loc["prune", "p_value"] == pytest.approx(1 / 11)
    assert not v.loc["mean", "passes"] and v.loc["mean", "cond_p"] is False
    assert abs(v.loc["mean", "delta"]) < 0.01 * abs(v.loc["prune", "delta"])
    assert v.loc["mean", "n_random"] == 10  # the same draws as zeroing
    kinds = dict(zip(res.conditions["condition"], res.conditions["kind"]))
    assert kinds[f"mean_activation:{CAND}"] == "mean_activation"
    assert res.conditions.set_index("condition").loc[f"mean_activation:{CAND}", "patch"].startswith("L1.ffn_out[5]")


def test_prune_neuron_passes_where_its_scalar_does_not():
    """A unit that writes +-3 into every channel: one of its 32 writes matters little (and less than zeroing the
    largest other weights, which are its other writes), the unit ablated in and out matters beyond 10 random
    units of the block."""
    import torch

    from scsuperweight.prune import prune

    m, masked, plain = _planted(2, 0.3, 2.0, lambda w, g: w.__setitem__(
        (slice(None), 10), 3.0 * torch.sign(torch.randn(32, generator=g))))
    res = prune(m, masked, plain, _cands(), options=_opts(granularities=("scalar", "neuron", "channel"),
                                                          mean_ablation=False))
    v = verdicts(res.collapse, primary_metric="cls_cosine_to_baseline", alpha=ALPHA).set_index("ablation")
    assert not v.loc["prune", "passes"]
    assert v.loc["neuron", "passes"], v.loc["neuron", "reason"]
    assert v.loc["neuron", "null_pool"] == "neuron:L1" and v.loc["neuron", "n_random"] == 10
    assert v.loc["channel", "null_pool"] == "channel:L1"
    draws = res.conditions[res.conditions["condition"].str.startswith("random_neuron:L1:")]
    assert len(draws) == 10 and (draws["control_for"] == "neuron:L1").all()


def test_prune_p_matched_from_the_candidates_bin():
    """p_matched of zeroing is the empirical p against the matched draws, which all come from the candidate's
    own |w| bin; p_value stays the uniform draws'."""
    import torch

    from scsuperweight.ablation import magnitude_bin
    from scsuperweight.metrics import empirical_p
    from scsuperweight.prune import prune

    m, masked, plain = _planted(0, 0.01, 1.0, lambda w, g: w.__setitem__((5, 10), 50.0))
    # 4 uniform draws cannot pass at ALPHA, and matched draws are characterisation (run for passing candidates by
    # default): characterise='all' asks for them on every candidate
    res = prune(m, masked, plain, _cands(), options=_opts(mean_ablation=False, n_matched=8, n_random=4,
                                                          characterise="all"))
    lo, hi = magnitude_bin(m.get_parameter(PARAM).detach(), (5, 10), 20)
    conds = res.conditions[res.conditions["condition"].str.startswith(f"matched:{CAND}:")]
    assert len(conds) == 8 and (conds["control_for"] == CAND).all()
    w = m.get_parameter(PARAM).detach()
    for e in conds["edits"]:
        idx = tuple(int(i) for i in e.split("[")[1].split("]")[0].split(","))
        assert lo <= float(w[idx].abs()) <= hi and idx != (5, 10)
    c = res.collapse[(res.collapse["group"] == K.GROUP_ALL) & (res.collapse["metric"] == "gep_mse")]
    row = c[c["condition"] == K.cond_prune(CAND)].iloc[0]
    null = c.loc[c["condition"].str.startswith(f"matched:{CAND}:"), "delta"].to_numpy()
    assert row["p_matched"] == pytest.approx(empirical_p(row["delta"], null, alternative="two-sided"))
    uni = c.loc[c["condition"].str.startswith("random:"), "delta"].to_numpy()
    assert row["p_value"] == pytest.approx(empirical_p(row["delta"], uni, alternative="two-sided"))
    assert torch.isfinite(torch.tensor(row["p_matched"]))


def test_prune_joint_phase_zeroes_the_passing_candidates_together():
    """Two constant units (10 and 20) writing 50 into channels 5 and 7: both zeroings pass, so the second phase
    zeroes them together against random pairs of scalars of the same matrix."""
    from scsuperweight.prune import prune

    def write(w, g):
        w[5, 10] = 50.0
        w[7, 20] = 50.0
        w[:, 20] = w[:, 20] * (w[:, 20].abs() >= 50.0)  # unit 20 writes channel 7 only

    m, masked, plain = _planted(0, 0.0, 1.0, write)
    with __import__("torch").no_grad():
        blk = m.transformer_encoder.layers[1]
        blk.linear1.weight[20] = 0.0
        blk.linear1.bias[20] = 1.0
    second = _cands().assign(candidate="L1.linear2.w[7,20]", row=7, col=20, channel=7)
    cands = pd.concat([_cands(), second], ignore_index=True)
    res = prune(m, masked, plain, cands, options=_opts(mean_ablation=False, joint=True, n_joint=10,
                                                       primary_metric="gepc_mse", alpha=ALPHA))
    conds = res.conditions.set_index("condition")
    joint = conds.loc[K.COND_JOINT]
    assert joint["edits"].count(PARAM) == 2 and "[5, 10]" in joint["edits"] and "[7, 20]" in joint["edits"]
    draws = conds[conds.index.str.startswith("random_joint:")]
    assert len(draws) == 10 and (draws["n_edits"] == 2).all() and (draws["control_for"] == K.COND_JOINT).all()
    assert not any("[5, 10]" in e or "[7, 20]" in e for e in draws["edits"])
    v = verdicts(res.collapse, primary_metric="gepc_mse", alpha=ALPHA).set_index("ablation")
    assert v.loc["joint", "null_pool"] == K.COND_JOINT and v.loc["joint", "n_random"] == 10
    assert v.loc["joint", "passes"], v.loc["joint", "reason"]
    assert v.loc["joint", "candidate"] == f"{CAND};L1.linear2.w[7,20]"
    # without the second phase nothing joint is run
    off = prune(m, masked, plain, cands, options=_opts(mean_ablation=False, joint=False))
    assert not off.conditions["condition"].str.startswith(("joint", "random_joint:")).any()
