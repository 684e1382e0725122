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
