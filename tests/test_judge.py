"""Verdicts on planted collapse tables where the answer is known: far beyond the null and the control passes with
the smallest possible p; inside the null, inside the control, or an interval over 0 fails and says why; the
metric's direction is recorded and, when asked, enforced; the report and the CLI read the table."""

from __future__ import annotations

import ast
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight.judge import VERDICT_COLUMNS, verdicts
from scsuperweight.prune import _add_p_values

N_RANDOM = 19
PARAM = "transformer_encoder.layers.2.norm2.weight"
STRONG, INSIDE, WEAK, WIDE = "strong", "inside_null", "inside_control", "wide"


def _r(condition, metric, delta, lo=np.nan, hi=np.nan, *, candidate="", control_for="", pool=PARAM) -> dict:
    return {"condition": condition, "metric": metric, "group": K.GROUP_ALL, "value": 1.0 + delta, "delta": delta,
            "ci_low": lo, "ci_high": hi, "p_value": np.nan, "candidate": candidate, "control_for": control_for,
            "null_pool": pool}


def planted(metric: str = "gepc_mse", sign: float = 1.0, with_p: bool = True) -> pd.DataFrame:
    """Random draws of one parameter at |Δ| <= 0.019, the top-outliers control at 0.1; four candidates:
    far beyond both (1.0), inside the null (0.004), beyond the null but inside the control (0.05, narrow
    interval), far beyond both but with an interval over 0."""
    rows = [_r(K.COND_BASELINE, metric, 0.0, pool="")]
    for k, d in enumerate(np.linspace(-0.019, 0.019, N_RANDOM)):
        rows.append(_r(K.cond_random(k), metric, float(d), control_for=PARAM))
    rows.append(_r(K.COND_TOP_OUTLIERS, metric, sign * 0.1, sign * 0.08, sign * 0.12, pool=""))
    for cand, d, lo, hi in ((STRONG, 1.0, 0.9, 1.1), (INSIDE, 0.004, 0.002, 0.006), (WEAK, 0.05, 0.045, 0.055),
                            (WIDE, 1.0, -0.2, 2.2)):
        lo, hi = sorted((sign * lo, sign * hi))
        rows.append(_r(K.cond_prune(cand), metric, sign * d, lo, hi, candidate=cand))
    df = pd.DataFrame(rows)
    return _add_p_values(df) if with_p else df  # the prune step's own p-values


def _by_cand(v: pd.DataFrame) -> dict[str, pd.Series]:
    return {r["candidate"]: r for _, r in v.iterrows()}


def test_far_beyond_null_and_control_passes_with_the_smallest_p():
    v = verdicts(planted(), primary_metric="gepc_mse", alpha=0.1, ci_level=0.95)
    assert list(v.columns) == VERDICT_COLUMNS and list(v["candidate"]) == [STRONG, INSIDE, WEAK, WIDE]
    s = _by_cand(v)[STRONG]
    assert s["passes"] and s["status"] == "passes"
    assert s["p_value"] == pytest.approx(1 / (N_RANDOM + 1)) and s["n_random"] == N_RANDOM
    assert s["null_pool"] == PARAM and s["p_source"] == "collapse"
    assert (s["cond_p"], s["cond_control"], s["cond_interval"]) == (True, True, True)
    assert s["control_delta"] == pytest.approx(0.1) and s["delta"] == pytest.approx(1.0)
    assert "p = 0.05 < 0.1" in s["reason"] and "95% CI (0.9–1.1) excludes 0" in s["reason"]


def test_each_failed_condition_is_named():
    v = _by_cand(verdicts(planted(), primary_metric="gepc_mse", alpha=0.1, ci_level=0.95))
    inside = v[INSIDE]
    assert not inside["passes"] and inside["status"] == "fails" and inside["cond_p"] is False
    assert inside["p_value"] > 0.5 and f"p = {inside['p_value']:.2g} is not below 0.1" in inside["reason"]
    weak = v[WEAK]  # beyond every draw (p at its floor), but half the control's change
    assert weak["cond_p"] is True and weak["cond_control"] is False and weak["cond_interval"] is True
    assert not weak["passes"] and weak["reason"] == (
        "|Δ| 0.05 does not exceed the top-outliers control's |Δ| 0.1")
    wide = v[WIDE]
    assert wide["cond_p"] is True and wide["cond_control"] is True and wide["cond_interval"] is False
    assert not wide["passes"] and wide["reason"] == "the 95% CI (-0.2 to 2.2) includes 0"


def test_p_values_come_from_the_same_draws_when_the_table_has_none():
    # an older table without p-values: computed here, once, with the prune step's formula
    old = planted(with_p=False)
    new = planted()
    v_old = verdicts(old, primary_metric="gepc_mse", alpha=0.1)
    v_new = verdicts(new, primary_metric="gepc_mse", alpha=0.1)
    np.testing.assert_allclose(v_old["p_value"], v_new["p_value"])
    assert (v_old["p_source"] == "draws").all() and (v_new["p_source"] == "collapse").all()
    assert list(v_old["status"]) == list(v_new["status"]) == ["passes", "fails", "fails", "fails"]


def test_missing_controls_are_not_evaluable_rather_than_failed():
    col = planted()
    col = col[~col["condition"].isin([K.COND_TOP_OUTLIERS]) & ~col["condition"].str.startswith("random:")]
    col = col.assign(p_value=np.nan)
    s = _by_cand(verdicts(col, primary_metric="gepc_mse", alpha=0.1))[STRONG]
    assert s["status"] == "not evaluable" and not s["passes"]
    assert s["cond_p"] is None and s["cond_control"] is None and s["cond_interval"] is True
    assert s["reason"] == "no p-value and no random draws to compute one; the top-outliers control was not run"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_direction_of_a_higher_is_better_metric(sign):
    # knn_accuracy: higher is better, so a fall (sign -1) is the harm
    col = planted("knn_accuracy", sign=sign)
    two = _by_cand(verdicts(col, primary_metric="knn_accuracy", alpha=0.1))
    harm = _by_cand(verdicts(col, primary_metric="knn_accuracy", alpha=0.1, direction="harmful"))
    assert two[STRONG]["harmful"] is (sign < 0)
    assert two[STRONG]["passes"]  # the stated rule: |Δ| beyond the control's, whichever way
    assert harm[STRONG]["passes"] is (sign < 0)
    if sign > 0:
        assert harm[STRONG]["cond_control"] is False
        assert "goes the harmless way (higher is better for knn_accuracy)" in harm[STRONG]["reason"]
    # and for a lower-is-better metric the same fall is an improvement
    col = planted("gepc_mse", sign=sign)
    assert verdicts(col, primary_metric="gepc_mse", alpha=0.1)["harmful"].iloc[0] is (sign > 0)
    with pytest.raises(ValueError, match="direction"):
        verdicts(col, primary_metric="gepc_mse", direction="up")


def test_stored_on_anndata_and_read_back_with_missing_conditions():
    from scsuperweight.tl import _store

    col = planted()
    col = col[col["condition"] != K.COND_TOP_OUTLIERS]
    v = verdicts(col, primary_metric="gepc_mse", alpha=0.1)
    a = ad.AnnData(np.zeros((2, 2)))
    _store(a, K.UNS_KEY, K.UNS_VERDICTS, v)
    got = ssw.get.verdicts(a)
    assert list(got["candidate"]) == list(v["candidate"]) and got["passes"].dtype == bool
    assert got["cond_control"].isna().all() and got["cond_p"].tolist() == [True, False, True, True]
    np.testing.assert_allclose(got["p_value"], v["p_value"])


def test_report_reads_the_stored_verdicts(tmp_path):
    from test_report import NULL, _item, _section, fake_results
    from test_report import STRONG as R_STRONG

    from scsuperweight.report import report

    res = fake_results()
    v = verdicts(res[K.UNS_COLLAPSE], primary_metric="gepc_mse", alpha=0.05, ci_level=0.95,
                 superweights=res[K.UNS_SUPERWEIGHTS])
    assert list(v["status"]) == ["passes", "fails"]  # the report's own judgement of these tables
    # a stored table that says otherwise wins: the report judges nothing itself
    v.loc[v["candidate"] == NULL, ["status", "passes", "reason"]] = ["fails", False, "a planted reason"]
    v.loc[v["candidate"] == R_STRONG, ["status", "passes", "reason"]] = ["fails", False, "another planted reason"]
    res[K.UNS_VERDICTS] = v
    hyp = _section(report(res, tmp_path / "r.html").read_text(encoding="utf-8"), "hypotheses")
    assert "No candidate passes the controls" in hyp
    assert "Does not pass because: another planted reason." in _item(hyp, f"<code>{R_STRONG}</code>")
    # a table judged at another level is not this report's: the rule is applied again, at the report's alpha
    page = report(res, tmp_path / "r2.html", alpha=0.2).read_text(encoding="utf-8")
    assert "1 of 2 candidate(s) pass the controls" in _section(page, "hypotheses")


def test_no_face_computes_a_p_value():
    root = Path(ssw.__file__).parent
    faces = [*sorted((root / "report").glob("*.py")), root / "pl.py", root / "cli.py"]  # report/ is a package
    assert len(faces) > 3
    for name in faces:
        tree = ast.parse(name.read_text(encoding="utf-8"))
        called = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
                  for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert "empirical_p" not in called and "_add_p_values" not in called, name


def test_a_tiny_passing_effect_is_flagged_in_words_but_still_passes():
    # planted: a mean ablation moving GEPC by 2e-5 on a baseline of 200 while its null moves at most 1e-7; the
    # rule has no effect-size floor, so it passes, and the reason states how small the change is
    metric, base = "gepc_mse", 200.0
    rows = [{**_r(K.COND_BASELINE, metric, 0.0, pool=""), "value": base}]
    for k, d in enumerate(np.linspace(-1e-7, 1e-7, N_RANDOM)):
        rows.append({**_r(K.cond_random(k), metric, float(d), control_for=PARAM), "value": base + d})
    rows.append({**_r(K.COND_TOP_OUTLIERS, metric, 1e-6, 5e-7, 2e-6, pool=""), "value": base + 1e-6})
    for cand, d in (("tiny", 2e-5), ("big", 20.0)):
        rows.append({**_r(K.cond_prune(cand), metric, d, 0.5 * d, 1.5 * d, candidate=cand), "value": base + d})
    v = _by_cand(verdicts(_add_p_values(pd.DataFrame(rows)), primary_metric=metric, alpha=0.1, ci_level=0.95))
    tiny, big = v["tiny"], v["big"]
    assert tiny["passes"] and big["passes"]
    assert tiny["rel_effect"] == pytest.approx(1e-7) and big["rel_effect"] == pytest.approx(0.1)
    assert tiny["reason"].endswith("; passes, but changes gepc_mse by only 1e-05% of its baseline")
    assert "passes, but" not in big["reason"]
