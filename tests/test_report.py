"""The HTML report: hypotheses written from planted results, escaping, self-containment, loading a run dir.

`fake_results` builds small, consistent result tables with a known answer (one candidate with a huge effect,
20 random draws near zero, one null candidate, AD − control contrasts per cell type); test_pl.py draws its figures
from the same tables. `write_run_dir` lays them out as a run directory (the TSVs and run.json).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from scsuperweight import _keys
from scsuperweight.errors import DataError
from scsuperweight.report import load_results, report

STRONG = "ln_weight:L2:17"
NULL = "ffn_down:L5:3:100"
EVIL_LABEL = "<script>alert(1)</script>"
EVIL_GENE = "<img src=x onerror=alert(1)>"
SITES = ["norm1_in", "attn_out", "norm1_out", "ffn_in", "ffn_hidden", "ffn_out", "norm2_in", "norm2_out",
         "block_out"]


def _c(condition, metric, group, value, delta, lo=np.nan, hi=np.nan, p=np.nan):
    return dict(condition=condition, metric=metric, group=group, value=value, delta=delta, ci_low=lo, ci_high=hi,
                p_value=p)


def fake_results(strong: bool = True, seed: int = 0) -> dict:
    """Result tables with a planted answer. `strong=False` makes every candidate null."""
    rng = np.random.default_rng(seed)
    sw = pd.DataFrame([
        dict(candidate=STRONG, kind="ln_weight", layer=2, param="transformer_encoder.layers.2.norm2.weight",
             row=17, col=np.nan, value=8.5, spike=412.0, spike_ratio=950.0, token="<cls>", stability=1.0, rank=1,
             screen="activation", above_threshold=True),
        dict(candidate=NULL, kind="ffn_down", layer=5, param="transformer_encoder.layers.5.linear2.weight",
             row=3, col=100, value=-0.9, spike=60.0, spike_ratio=40.0, token="APOE", stability=0.6, rank=2,
             screen="activation", above_threshold=True),
    ])
    act = []
    for layer in range(6):
        for site in SITES:
            m = float(rng.lognormal(1.0, 0.4))
            ch = int(rng.integers(0, 64))
            if (layer, site) == (2, "norm2_in"):
                m, ch = 412.0, 17  # the planted super activation
            act.append(dict(layer=layer, site=site, max_abs=m, median_abs=0.4, channel=ch, token="<cls>",
                            stability=0.9))
    act = pd.DataFrame(act)

    base = {"gepc_mse": 1.23, "knn_accuracy": 0.91}
    rows = [_c("baseline", m, "all", v, 0.0) for m, v in base.items()]
    for k in range(20):
        d = float(rng.normal(0, 0.01))
        rows.append(_c(_keys.cond_random(k), "gepc_mse", "all", 1.23 + d, d))
        rows.append(_c(_keys.cond_random(k), "knn_accuracy", "all", 0.91 - abs(d), -abs(d)))
    rows.append(_c("top_outliers", "gepc_mse", "all", 1.25, 0.02, 0.005, 0.035, 0.2))
    rows.append(_c("top_outliers", "knn_accuracy", "all", 0.90, -0.01, -0.02, 0.0, 0.3))
    if strong:
        rows.append(_c(_keys.cond_prune(STRONG), "gepc_mse", "all", 2.34, 1.11, 0.9, 1.3, 0.01))
        rows.append(_c(_keys.cond_prune(STRONG), "knn_accuracy", "all", 0.41, -0.5, -0.6, -0.4, 0.01))
        rows.append(_c(_keys.cond_restore(STRONG), "gepc_mse", "all", 1.43, 0.2, 0.1, 0.3, 0.03))
        for f, v in [(0, 2.34), (0.5, 1.6), (1, 1.23), (2, 1.30), (3, 1.8)]:
            rows.append(_c(_keys.cond_scale(STRONG, f), "gepc_mse", "all", v, v - 1.23))
        per = {"Microglia": (2.5, 1.2), "Astrocytes": (0.8, 0.7), EVIL_LABEL: (0.3, 0.25)}
    else:
        rows.append(_c(_keys.cond_prune(STRONG), "gepc_mse", "all", 1.233, 0.003, -0.01, 0.016, 0.7))
        rows.append(_c(_keys.cond_prune(STRONG), "knn_accuracy", "all", 0.905, -0.005, -0.02, 0.01, 0.6))
        per = {"Microglia": (0.01, 0.0), "Astrocytes": (0.0, 0.01), EVIL_LABEL: (0.0, 0.0)}
    rows.append(_c(_keys.cond_prune(NULL), "gepc_mse", "all", 1.235, 0.005, -0.01, 0.02, 0.6))
    rows.append(_c(_keys.cond_prune(NULL), "knn_accuracy", "all", 0.90, -0.01, -0.03, 0.01, 0.5))
    for lab, (ad, ctl) in per.items():
        for cond, d in (("AD", ad), ("control", ctl)):
            g = f"{lab}{_keys.GROUP_SEP}{cond}"
            rows.append(_c("baseline", "gepc_mse", g, 1.2, 0.0))
            rows.append(_c(_keys.cond_prune(STRONG), "gepc_mse", g, 1.2 + d, d, d - 0.1, d + 0.1, 0.01))
        rows.append(_c(_keys.cond_prune(STRONG), "gepc_mse", lab, 1.2 + (ad + ctl) / 2, (ad + ctl) / 2,
                       (ad + ctl) / 2 - 0.08, (ad + ctl) / 2 + 0.08, 0.01))
    for cond, d in (("AD", 1.3 if strong else 0.004), ("control", 0.9 if strong else 0.002)):
        rows.append(_c(_keys.cond_prune(STRONG), "gepc_mse", cond, 1.23 + d, d, d - 0.1, d + 0.1, 0.01))
    collapse = pd.DataFrame(rows)
    # the prune step's own contrasts (AD - control per cell type, bootstrap interval): deliberately not the
    # difference of the two groups' intervals above, so a report that approximated would show other numbers
    contrasts = pd.DataFrame([
        dict(condition=_keys.cond_prune(STRONG), metric="gepc_mse", group=lab, delta_AD=ad, delta_control=ctl,
             difference=ad - ctl, ci_low=ad - ctl - below, ci_high=ad - ctl + above, contrast="AD - control",
             n_case=40, n_control=38, bootstrap_unit="donors")
        for (lab, (ad, ctl)), (below, above) in zip(per.items(), [(0.18, 0.17), (0.15, 0.16), (0.15, 0.15)],
                                                    strict=True)
    ])

    genes = pd.DataFrame([
        dict(candidate=STRONG, gene="APOE", score=3.2, rank=1, spike_corr=0.8),
        dict(candidate=STRONG, gene=EVIL_GENE, score=2.9, rank=2, spike_corr=0.7),
        dict(candidate=STRONG, gene="CLU", score=2.1, rank=3, spike_corr=0.6),
        dict(candidate=STRONG, gene="TREM2", score=1.7, rank=4, spike_corr=0.5),
        dict(candidate=NULL, gene="NA", score=0.3, rank=1, spike_corr=0.1),
        dict(candidate=NULL, gene="RPL13", score=0.2, rank=2, spike_corr=0.05),
    ])
    enrichment = pd.DataFrame([
        dict(candidate=STRONG, gene_set="Reactome", term="Complement cascade", nes=2.1, odds_ratio=np.nan,
             p_value=1e-4, fdr=0.001, genes="APOE;CLU"),
        dict(candidate=STRONG, gene_set="GO_BP", term="Microglial activation", nes=1.8, odds_ratio=np.nan,
             p_value=2e-3, fdr=0.02, genes="TREM2"),
        dict(candidate=STRONG, gene_set="GO_BP", term=f"term {EVIL_LABEL}", nes=-0.5, odds_ratio=np.nan,
             p_value=0.5, fdr=0.8, genes=EVIL_GENE),
        dict(candidate=NULL, gene_set="KEGG", term="Ribosome", nes=0.9, odds_ratio=np.nan, p_value=0.2,
             fdr=0.4, genes="RPL13"),
    ])
    run = {
        "versions": {"scsuperweight": "0.1.0", "python": "3.11", "numpy": np.__version__},
        "model": {"path": "checkpoints/demo_scgpt", "hash": "sha256:" + "ab" * 32, "n_layers": 6, "d_model": 64},
        "data": {"path": "synthetic_ad.h5ad", "hash": "sha256:" + "cd" * 32, "n_cells": 600, "n_genes": 1200},
        "params": {"label_key": "cell_type", "condition_key": "condition", "primary_metric": "gepc_mse",
                   "n_random": 20, "max_cells_per_label": 80, "note": EVIL_LABEL,
                   "prune": {"alpha": 0.05, "n_random": 20, "n_cells": 240, "min_group_cells": 5}},
        "seed": 0,
        "timings": {"scan": 1.2, "prune": 33.4},
    }
    return {
        _keys.UNS_SUPERWEIGHTS: sw,
        _keys.UNS_ACTIVATIONS: act,
        _keys.UNS_COLLAPSE: collapse,
        "contrasts": contrasts,
        _keys.UNS_GENES: genes,
        _keys.UNS_ENRICHMENT: enrichment,
        _keys.UNS_RUN: run,
    }


FILES = {_keys.UNS_SUPERWEIGHTS: _keys.FILE_SUPERWEIGHTS, _keys.UNS_ACTIVATIONS: _keys.FILE_ACTIVATIONS,
         _keys.UNS_COLLAPSE: _keys.FILE_COLLAPSE, "contrasts": "contrasts.tsv", _keys.UNS_GENES: _keys.FILE_GENES,
         _keys.UNS_ENRICHMENT: _keys.FILE_ENRICHMENT}


def write_run_dir(res: dict, path):
    """`res` as the prune/pipeline steps lay it out: one TSV per table, run.json; a table absent from `res` has
    no file; an empty table gets the file pandas writes for an empty DataFrame (as the prune step does)."""
    path.mkdir(parents=True, exist_ok=True)
    for name, fname in FILES.items():
        if name in res:
            res[name].to_csv(path / fname, sep="\t", index=False)
    (path / _keys.FILE_RUN).write_text(json.dumps(res[_keys.UNS_RUN]))
    return path


def fake_adata(res: dict | None = None, n: int = 240, seed: int = 0):
    """Cells in 3 planted clusters; the pruned embedding has collapsed them onto one direction."""
    import anndata as ad

    rng = np.random.default_rng(seed)
    labels = np.array(["Microglia", "Astrocytes", EVIL_LABEL])[rng.integers(0, 3, n)]
    centres = {lab: rng.normal(0, 3, 16) for lab in np.unique(labels)}
    x = np.stack([centres[lab] for lab in labels]) + rng.normal(0, 0.5, (n, 16))
    xp = np.outer(np.ones(n), rng.normal(0, 1, 16)) + rng.normal(0, 0.05, (n, 16))
    a = ad.AnnData(np.zeros((n, 5), dtype=np.float32))
    a.obs["cell_type"] = pd.Categorical(labels)
    a.obs["condition"] = pd.Categorical(rng.choice(["AD", "control"], n))
    a.obs["age"] = rng.uniform(60, 90, n)
    a.obsm[_keys.OBSM_EMB] = x.astype(np.float32)
    a.obsm[_keys.OBSM_EMB_PRUNED] = xp.astype(np.float32)
    if res is not None:
        a.uns[_keys.UNS_KEY] = {k: v for k, v in res.items() if k != _keys.UNS_RUN}
        a.uns[_keys.UNS_KEY][_keys.UNS_RUN] = res[_keys.UNS_RUN]
    return a


def _section(page: str, sid: str) -> str:
    m = re.search(rf"<section id='{sid}'>(.*?)</section>", page, flags=re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def _item(section: str, needle: str) -> str:
    items = [li for li in re.findall(r"<li>(.*?)</li>", section, flags=re.S) if needle in li]
    assert items, f"no list item mentions {needle}"
    return items[0]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def strong_page(tmp_path_factory):
    out = report(fake_results(), tmp_path_factory.mktemp("rep") / "report.html", title="Demo <b>run</b>")
    return out.read_text(encoding="utf-8")


def test_strong_candidate_passes_with_its_numbers(strong_page):
    hyp = _section(strong_page, "hypotheses")
    assert "1 of 2 candidate(s) pass the controls" in hyp
    li = _item(hyp, f"<code>{STRONG}</code>")
    assert "badge pass" in li
    assert ("Zeroing ln_weight L2[17]" in li and "raises masked-expression MSE (GEPC) from 1.23 to 2.34 "
            "(Δ +1.11, 95% CI 0.9–1.3; p = 0.01 vs 20 random draws)") in li
    assert "the largest-other-weights control moves it by +0.02" in li
    # the rule is stated on the page
    assert "p &lt; 0.05 against the random draws of the same parameter" in hyp and "excludes 0" in hyp


def test_null_candidate_fails_and_says_why(strong_page):
    li = _item(_section(strong_page, "hypotheses"), f"<code>{NULL}</code>")
    assert "badge fail" in li
    assert "from 1.23 to 1.24 (Δ +0.005, 95% CI -0.01 to 0.02; p = 0.6 vs 20 random draws)" in li
    assert "p = 0.6 is not below 0.05" in li
    assert "does not exceed the top-outliers control" in li and "includes 0" in li


def test_follow_ups_read_off_the_tables(strong_page):
    hyp = _section(strong_page, "hypotheses")
    cells = _item(hyp, "Cell types that move most")
    # Microglia collapse most (mean Δ (2.5 + 1.2) / 2 = 1.85), then Astrocytes (0.75)
    assert cells.index("Microglia (Δ +1.85, 95% CI 1.77–1.93)") < cells.index("Astrocytes (Δ +0.75")
    # AD vs control: read off the contrasts table, never approximated from the per-group intervals
    con = _item(hyp, "AD − control contrasts from contrasts.tsv")
    assert ("AD cells lose more than control cells in 3 of 3 cell types by the point estimate; the interval "
            "excludes 0 in 1 of 3: Microglia +1.3 (bootstrap CI 1.12–1.47)") in con
    assert "resampling donors" in con
    gap = _item(hyp, "The largest contrast is in Microglia")
    assert ("AD Δ +2.5 vs control Δ +1.2, difference +1.3 (bootstrap CI 1.12–1.47; 40 AD and 38 control cells); "
            "AD cells lose more.") in gap
    assert "≈" not in hyp and "assuming independence" not in hyp
    assert "takes Δ from +1.11 to +0.2 (95% CI 0.1–0.3): 82% of the effect recovered" in hyp
    assert "U-shaped, lowest at ×1" in hyp and "2.34 at ×0, 1.8 at ×3, baseline 1.23 at ×1" in hyp
    assert "APOE (3.2)" in hyp and "CLU (2.1)" in hyp
    assert "Complement cascade (Reactome; NES +2.1; FDR 0.001)" in hyp
    assert "Microglial activation (GO_BP; NES +1.8; FDR 0.02)" in hyp


def test_caveats_are_generated_from_the_run(strong_page):
    cav = _section(strong_page, "caveats")
    assert "post-LayerNorm" in cav and "ffn_down, ln_weight" in cav
    assert "synthetic" in cav
    assert "With 20 random draws the smallest empirical p-value is 1/21 = 0.048" in cav
    assert "Multiple testing" in cav and "No donor key" in cav


def test_every_candidate_null_says_none_passes(tmp_path):
    page = report(fake_results(strong=False), tmp_path / "r.html").read_text(encoding="utf-8")
    hyp = _section(page, "hypotheses")
    assert "No candidate passes the controls" in hyp
    assert "badge pass" not in hyp and "pass the controls</b>" not in hyp
    assert "Exploratory only (it did not pass)" in hyp
    # numbers keep enough digits to differ
    assert "from 1.23 to 1.233 (Δ +0.003, 95% CI -0.01 to 0.016; p = 0.7 vs 20 random draws)" in hyp


def test_data_strings_are_escaped(strong_page):
    assert "<script>alert" not in strong_page
    assert "<img src=x" not in strong_page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in strong_page
    assert "&lt;img src=x onerror=alert(1)&gt;" in strong_page
    assert "<title>Demo &lt;b&gt;run&lt;/b&gt;</title>" in strong_page


def test_page_is_self_contained(strong_page):
    assert "<script" not in strong_page.lower() and "<link" not in strong_page.lower()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", strong_page)
    assert "url(" not in strong_page
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", strong_page)
    assert len(imgs) == 5  # every figure but the embedding (no AnnData here)
    assert "Embedding before and after.</b> Skipped" in strong_page
    assert "Could not be drawn" not in strong_page


def test_tables_and_provenance(strong_page):
    tables = _section(strong_page, "tables")
    # candidates table carries the verdict; collapse is a pivot (random draws summarised in one row)
    assert "<th>verdict</th>" in tables and "passes" in tables
    assert "random (n=20)" in tables and "random:3" not in tables
    assert "+1.11 [0.9, 1.3] *" in tables
    prov = _section(strong_page, "provenance")
    assert "sha256:abab" in prov and "33.4 s" in prov and "primary_metric" in prov


def test_report_from_anndata_draws_the_embedding(tmp_path):
    res = fake_results()
    page = report(fake_adata(res), tmp_path / "a.html").read_text(encoding="utf-8")
    assert len(re.findall(r"data:image/png;base64,", page)) == 6
    assert "coloured by cell_type" in page
    assert "1 of 2 candidate(s) pass the controls" in page


def test_load_results_round_trip_and_missing_files(tmp_path):
    res = fake_results()
    for name, fname in [(_keys.UNS_SUPERWEIGHTS, _keys.FILE_SUPERWEIGHTS), (_keys.UNS_COLLAPSE, _keys.FILE_COLLAPSE),
                        (_keys.UNS_GENES, _keys.FILE_GENES)]:
        res[name].to_csv(tmp_path / fname, sep="\t", index=False)
    (tmp_path / _keys.FILE_RUN).write_text(json.dumps(res[_keys.UNS_RUN]))
    (tmp_path / _keys.FILE_ENRICHMENT).write_text("")  # an empty file is skipped, not a crash
    got = load_results(tmp_path)
    assert set(got) == {_keys.UNS_SUPERWEIGHTS, _keys.UNS_COLLAPSE, _keys.UNS_GENES, _keys.UNS_RUN}
    assert got[_keys.UNS_GENES]["gene"].tolist()[4] == "NA"  # a gene called NA stays a gene
    assert got[_keys.UNS_SUPERWEIGHTS]["above_threshold"].tolist() == [True, True]
    assert got[_keys.UNS_SUPERWEIGHTS]["col"].isna().tolist() == [True, False]
    pd.testing.assert_series_equal(got[_keys.UNS_COLLAPSE]["delta"], res[_keys.UNS_COLLAPSE]["delta"],
                                   check_exact=False)
    page = report(tmp_path, tmp_path).read_text(encoding="utf-8")  # a directory gets report.html
    assert (tmp_path / _keys.FILE_REPORT).is_file()
    assert "1 of 2 candidate(s) pass the controls" in page
    assert "Spike map.</b> Skipped: No activations table" in page and "ssw.tl.scan" in page
    assert "Skipped: no enrichment table (run ssw.tl.enrich)" in page
    with pytest.raises(DataError, match="not a directory"):
        load_results(tmp_path / "nope")


def test_missing_collapse_says_which_step(tmp_path):
    res = fake_results()
    del res[_keys.UNS_COLLAPSE]
    page = report(res, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "No hypotheses: the collapse table is absent (run ssw.tl.prune)" in page
    assert "run ssw.tl.prune (CLI: scsuperweight prune) first" in page
    res = fake_results()
    res[_keys.UNS_COLLAPSE] = res[_keys.UNS_COLLAPSE].drop(columns="value")
    page = report(res, tmp_path / "r2.html").read_text(encoding="utf-8")
    assert "Note: the collapse table lacks column(s) [&#x27;value&#x27;] and was ignored." in page


def test_p_value_computed_from_random_draws_when_absent(tmp_path):
    res = fake_results()
    col = res[_keys.UNS_COLLAPSE]
    col.loc[col["condition"] == _keys.cond_prune(STRONG), "p_value"] = np.nan
    page = report(res, tmp_path / "r.html").read_text(encoding="utf-8")
    li = _item(_section(page, "hypotheses"), f"<code>{STRONG}</code>")
    # no random draw reaches |Δ| = 1.11, so p = 1 / 21
    assert "p = 0.048 vs 20 random draws, computed here from the draws" in li and "badge pass" in li


def test_chromium_renders_the_page_without_console_errors(tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the headless render is skipped")
    res = fake_results()
    page = report(fake_adata(res), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [exe, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}", "--window-size=1280,2000",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    console = [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    assert shot.is_file() and shot.stat().st_size > 50_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------------------
# AD vs control from contrasts.tsv; every count and level from the data
# ---------------------------------------------------------------------------------------------------------------


def _contrast_items(hyp: str) -> str:
    return " ".join(li for li in re.findall(r"<li>(.*?)</li>", hyp, flags=re.S)
                    if "contrast" in li or "AD Δ" in li)


def test_contrast_is_read_from_contrasts_tsv_not_approximated(tmp_path):
    res = fake_results()
    # a contrast the collapse groups contradict: their per-condition rows give +1.3 (≈ 1.16–1.44) for Microglia
    res["contrasts"] = pd.DataFrame([dict(
        condition=_keys.cond_prune(STRONG), metric="gepc_mse", group="Microglia", delta_AD=0.1, delta_control=0.223,
        difference=-0.123, ci_low=-0.2, ci_high=-0.05, contrast="AD - control", n_case=31, n_control=29,
        bootstrap_unit="donors")])
    page = report(write_run_dir(res, tmp_path / "run"), tmp_path / "r.html").read_text(encoding="utf-8")
    hyp = _section(page, "hypotheses")
    gap = _item(hyp, "The largest contrast is in Microglia")
    assert ("AD Δ +0.1 vs control Δ +0.223, difference -0.123 (bootstrap CI -0.2 to -0.05; 31 AD and 29 control "
            "cells); control cells lose more.") in gap
    con = _item(hyp, "AD − control contrasts from contrasts.tsv")
    assert ("AD cells lose more than control cells in 0 of 1 cell types by the point estimate; the interval excludes 0 "
            "in 1 of 1: Microglia -0.123 (bootstrap CI -0.2 to -0.05)") in con
    items = _contrast_items(hyp)
    assert "1.3" not in items and "1.16" not in items and "≈" not in hyp and "independence" not in hyp
    tables = _section(page, "tables")
    assert "<h3>AD − control contrasts</h3>" in tables
    row = re.search(r"<tr><td>prune:[^<]*</td><td>Microglia</td>(.*?)</tr>", tables.split("AD − control")[1]).group(1)
    assert re.findall(r"<td class='num'>([^<]*)</td>", row)[:5] == ["0.1", "0.223", "-0.123", "-0.2", "-0.05"]


def test_contrast_names_its_case_and_control_from_the_table(tmp_path):
    # levels 'disease' / 'control' with disease the case (issue 16): the text and the heading read the table's
    # case and control, never "AD"; the delta columns are delta_<case> / delta_<control>
    res = fake_results()
    res["contrasts"] = pd.DataFrame([dict(
        condition=_keys.cond_prune(STRONG), metric="gepc_mse", group="Microglia", delta_disease=0.4,
        delta_control=0.1, difference=0.3, ci_low=0.2, ci_high=0.4, contrast="disease - control", case="disease",
        control="control", n_case=31, n_control=29, bootstrap_unit="donors")])
    page = report(write_run_dir(res, tmp_path / "run"), tmp_path / "r.html").read_text(encoding="utf-8")
    hyp = _section(page, "hypotheses")
    assert "disease − control contrasts from contrasts.tsv" in hyp
    assert "disease Δ +0.4 vs control Δ +0.1, difference +0.3" in _item(hyp, "The largest contrast is in Microglia")
    assert "<h3>disease − control contrasts</h3>" in _section(page, "tables")
    assert "AD −" not in page and "AD Δ" not in page
    # no rows: the sentence names the levels the prune step recorded
    res["contrasts"] = pd.DataFrame()
    res[_keys.UNS_RUN]["params"]["prune"] = {"case": "disease", "control": "healthy"}
    hyp = _section(report(res, tmp_path / "e.html").read_text(encoding="utf-8"), "hypotheses")
    assert "No disease-vs-healthy contrast: contrasts.tsv has no rows" in hyp


def test_no_contrasts_says_so_and_why(tmp_path):
    # absent: no contrasts.tsv in the run directory
    res = fake_results()
    del res["contrasts"]
    page = report(write_run_dir(res, tmp_path / "a"), tmp_path / "a.html").read_text(encoding="utf-8")
    hyp = _section(page, "hypotheses")
    assert ("No AD-vs-control contrast: there is no contrasts table (contrasts.tsv, written by the prune step, is "
            "absent from this run), and the report does not approximate one from the per-condition rows of "
            "collapse.tsv.") in hyp
    assert "The largest contrast" not in hyp and "≈" not in hyp and "difference" not in _contrast_items(hyp)
    assert "Skipped: there is no contrasts table" in _section(page, "tables")
    assert "absent: contrasts" in _section(page, "summary")
    # present but empty (what the prune step writes without a condition column), no condition key recorded
    res = fake_results()
    res["contrasts"] = pd.DataFrame()
    res[_keys.UNS_RUN]["params"]["condition_key"] = None
    run_dir = write_run_dir(res, tmp_path / "b")
    assert load_results(run_dir)["contrasts"].empty
    page = report(run_dir, tmp_path / "b.html").read_text(encoding="utf-8")
    hyp = _section(page, "hypotheses")
    assert ("No AD-vs-control contrast: contrasts.tsv has no rows: no condition column was given to the prune step "
            "(condition_key is not set in the run's parameters), so there are no disease and control cells to "
            "contrast.") in hyp
    assert "contrasts (no rows)" in _section(page, "summary")
    # empty although a condition key was given: the reason names the key and the recorded minimum group size
    res[_keys.UNS_RUN]["params"]["condition_key"] = "condition"
    hyp = _section(report(res, tmp_path / "c.html").read_text(encoding="utf-8"), "hypotheses")
    assert ("although condition_key <code>condition</code> was given, the prune step contrasts only when that column "
            "has exactly two values and a cell type has at least 5 cells in each of them.") in hyp


def _pooled(res: dict, per_param: int) -> dict:
    """`res` with its random draws replaced by `per_param` draws of each candidate's parameter (control_for)."""
    sw = res[_keys.UNS_SUPERWEIGHTS]
    params = dict(zip(sw["candidate"], sw["param"], strict=True))
    col = res[_keys.UNS_COLLAPSE]
    col = col[~col["condition"].str.startswith("random:")].assign(control_for="")
    rng = np.random.default_rng(1)
    rows = []
    for k in range(2 * per_param):
        pname = params[STRONG] if k < per_param else params[NULL]
        d = float(rng.normal(0, 0.01))
        rows.append({**_c(_keys.cond_random(k), "gepc_mse", "all", 1.23 + d, d), "control_for": pname})
        rows.append({**_c(_keys.cond_random(k), "knn_accuracy", "all", 0.91 - abs(d), -abs(d)), "control_for": pname})
    res[_keys.UNS_COLLAPSE] = pd.concat([col, pd.DataFrame(rows)], ignore_index=True)
    return res


def test_random_draw_counts_come_from_each_parameters_pool(tmp_path):
    res = _pooled(fake_results(), per_param=7)
    sw = res[_keys.UNS_SUPERWEIGHTS]
    p_strong, p_null = sw["param"].tolist()
    col = res[_keys.UNS_COLLAPSE]
    col.loc[col["condition"] == _keys.cond_prune(STRONG), "p_value"] = np.nan  # computed here, from its own pool
    res[_keys.UNS_RUN]["params"]["n_random"] = 7
    res[_keys.UNS_RUN]["params"]["prune"]["n_random"] = 7
    page = report(write_run_dir(res, tmp_path / "run"), tmp_path / "r.html").read_text(encoding="utf-8")
    hyp = _section(page, "hypotheses")
    # no draw reaches |Δ| = 1.11: p = 1 / (7 + 1), which no longer passes at 0.05
    li = _item(hyp, f"<code>{STRONG}</code>")
    assert f"p = 0.12 vs 7 random draws of <code>{p_strong}</code>, computed here from the draws" in li
    assert "badge fail" in li and "p = 0.12 is not below 0.05" in li
    assert f"p = 0.6 vs 7 random draws of <code>{p_null}</code>" in _item(hyp, f"<code>{NULL}</code>")
    assert (f"7 draws for each of 2 parameter(s) (<code>{p_strong}</code>, <code>{p_null}</code>; 14 in all). Each "
            "candidate's p-value is taken against its own parameter's draws only.") in hyp
    assert ("With 7 random draws per parameter the smallest empirical p-value is 1/8 = 0.12: at α = 0.05 no "
            "candidate can pass on an empirical p") in _section(page, "caveats")
    assert "random (n=14: 2 parameter(s) × 7)" in _section(page, "tables")
    for wrong in ("14 random draws", "20 random draws", "30 random draws", "10 random draws", "1/15", "1/21"):
        assert wrong not in page
    # the recorded option disagrees with the table: the table's count is stated, the disagreement said
    res[_keys.UNS_RUN]["params"]["n_random"] = 10
    hyp = _section(report(res, tmp_path / "r2.html").read_text(encoding="utf-8"), "hypotheses")
    assert "vs 7 random draws of" in hyp and "vs 10 random draws" not in hyp
    assert "The run records n_random = 10 per parameter; the counts above are the draws collapse.tsv holds" in hyp


def test_interval_level_comes_from_the_recorded_alpha(tmp_path):
    res = fake_results()
    res[_keys.UNS_RUN]["params"]["prune"]["alpha"] = 0.1
    page = report(res, tmp_path / "a.html").read_text(encoding="utf-8")
    assert "(Δ +1.11, 90% CI 0.9–1.3;" in page and "a 90% CI of Δ that excludes 0" in page and "95%" not in page
    del res[_keys.UNS_RUN]["params"]["prune"]["alpha"]
    page = report(res, tmp_path / "b.html").read_text(encoding="utf-8")
    assert "(Δ +1.11, CI 0.9–1.3;" in page and "95%" not in page
    assert "the interval's level is not recorded in the run's parameters" in page


def test_report_from_anndata_reads_step_params_and_contrasts_from_uns(tmp_path):
    res = _pooled(fake_results(), per_param=4)
    run = res[_keys.UNS_RUN]
    del run["params"]["prune"], run["params"]["n_random"], run["params"]["max_cells_per_label"]
    a = fake_adata(res)
    # as tl stores them: each step's params as JSON text, the pipeline's run record as JSON text
    a.uns[_keys.UNS_KEY][_keys.UNS_PARAMS] = {"prune": json.dumps({"alpha": 0.2, "n_random": 4, "n_cells": 123,
                                                                    "max_cells_per_label": 41})}
    a.uns[_keys.UNS_KEY][_keys.UNS_RUN] = json.dumps(run)
    page = report(a, tmp_path / "a.html").read_text(encoding="utf-8")
    hyp = _section(page, "hypotheses")
    assert "80% CI" in hyp and "vs 4 random draws of <code>" in hyp
    assert "123<br><small>at most 41 per label</small>" in _section(page, "summary")
    assert "difference +1.3 (bootstrap CI 1.12–1.47; 40 AD and 38 control cells)" in hyp


def test_ssw_report_stays_callable_after_the_package_is_imported(tmp_path):
    """`import scsuperweight.report` rebinds `ssw.report` to the package; calling it still writes the report."""
    import scsuperweight as ssw
    import scsuperweight.report as report_pkg

    assert ssw.report is report_pkg
    out = ssw.report(fake_results(), tmp_path / "r.html")
    assert out == tmp_path / "r.html" and "<html" in out.read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8").split("Generated")[0] == \
        report(fake_results(), tmp_path / "f.html").read_text(encoding="utf-8").split("Generated")[0]
