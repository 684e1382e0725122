"""Figures: each returns a Figure (or the Axes it was given), saves a PNG, shows the planted answer, and names the
missing step when its table is absent. Tables come from test_report.fake_results."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from scsuperweight import _keys, pl
from scsuperweight.errors import DataError

sys.path.insert(0, str(Path(__file__).parent))
from test_report import EVIL_LABEL, NULL, STRONG, fake_adata, fake_results  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def res():
    return fake_results()


@pytest.fixture(scope="module")
def adata(res):
    return fake_adata(res)


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _yticks(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


CALLS = {
    "spike_map": lambda d, **kw: pl.spike_map(d, **kw),
    "candidate_effects": lambda d, **kw: pl.candidate_effects(d, **kw),
    "collapse_by_celltype": lambda d, **kw: pl.collapse_by_celltype(d, **kw),
    "scaling_curve": lambda d, **kw: pl.scaling_curve(d, **kw),
    "embedding_before_after": lambda d, **kw: pl.embedding_before_after(d, color="cell_type", **kw),
    "enrichment_dotplot": lambda d, **kw: pl.enrichment_dotplot(d, **kw),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_returns_figure_and_saves_png(name, adata, tmp_path):
    out = tmp_path / "sub" / f"{name}.png"
    fig = CALLS[name](adata, save=out)
    assert isinstance(fig, Figure)
    assert out.is_file() and out.stat().st_size > 5_000
    assert out.read_bytes()[:8] == PNG


@pytest.mark.parametrize("name", [n for n in CALLS if n != "embedding_before_after"])
def test_draws_on_given_axes_from_dict_or_frame(name, res):
    fig, ax = plt.subplots()
    assert CALLS[name](res, ax=ax) is ax
    assert ax.has_data() or ax.images or ax.collections


def test_embedding_on_given_axes_and_numeric_colour(adata):
    fig, axs = plt.subplots(1, 2)
    assert pl.embedding_before_after(adata, color="age", ax=axs) == tuple(axs)
    # PCA of the baseline keeps the three planted clusters apart along PC1/PC2; the pruned one has collapsed
    spread = [np.ptp(a.collections[0].get_offsets(), axis=0).sum() for a in axs]
    assert spread[0] > 5 * spread[1]


def test_spike_map_marks_the_planted_channel(res):
    ax = pl.spike_map(res[_keys.UNS_ACTIVATIONS], ax=plt.subplots()[1])
    im = ax.images[0]
    arr = np.ma.filled(im.get_array(), np.nan)
    i, j = np.unravel_index(np.nanargmax(arr), arr.shape)
    assert _yticks(ax)[i] == "2"
    assert ax.get_xticklabels()[j].get_text() == "norm2_in"
    assert arr[i, j] == 412.0
    assert [t.get_text() for t in ax.texts if t.get_position() == (j, i)] == ["17"]
    assert isinstance(im.norm, matplotlib.colors.LogNorm)


def test_spike_map_ratio(res):
    ax = pl.spike_map(res, value="spike_ratio", ax=plt.subplots()[1])
    assert np.nanmax(np.ma.filled(ax.images[0].get_array(), np.nan)) == pytest.approx(412.0 / 0.4)
    with pytest.raises(ValueError, match="spike_ratio"):
        pl.spike_map(res, value="median")


def test_candidate_effects_orders_by_effect_and_draws_the_random_band(res):
    ax = pl.candidate_effects(res, ax=plt.subplots()[1])
    ticks = _yticks(ax)
    assert ticks[0] == f"zero {STRONG}" and ticks[1] == f"zero {NULL}"
    assert "top outliers (control)" in ticks and f"restore {STRONG}" in ticks
    assert ticks[-1] == "random draws, all parameters (n=20)"  # draws not labelled by parameter: one pool
    assert "p=0.01" in _texts(ax)
    # the shaded band spans the random deltas only (tiny), far from the strong candidate at +1.11
    band = [p for p in ax.patches if p.get_label().startswith("random controls")][0]
    xs = np.array([band.get_x(), band.get_x() + band.get_width()])
    assert xs[0] < 0 < xs[1] and np.abs(xs).max() < 0.05


def test_candidate_effects_draws_each_candidate_against_its_own_parameters_draws():
    """Two candidates in parameters with very different nulls: each row's band is its own pool's percentiles."""
    rng = np.random.default_rng(1)
    pools = {"enc.0.norm2.weight": rng.normal(2.0, 0.5, 40), "enc.0.linear2.weight": rng.normal(0.0, 0.01, 40)}
    rows = [dict(condition="baseline", delta=0.0, null_pool="")]
    rows += [dict(condition="prune:A", delta=3.0, null_pool="enc.0.norm2.weight"),
             dict(condition="prune:B", delta=0.5, null_pool="enc.0.linear2.weight")]
    k = 0
    for pname, draws in pools.items():
        for v in draws:
            rows.append(dict(condition=f"random:{k}", delta=float(v), null_pool=pname, control_for=pname))
            k += 1
    col = pd.DataFrame(rows).assign(metric="gepc_mse", group="all", value=lambda d: 10 + d["delta"], ci_low=np.nan,
                                    ci_high=np.nan, p_value=np.nan)
    col["control_for"] = col["control_for"].fillna("")
    ax = pl.candidate_effects(col, ax=plt.subplots()[1])
    ticks = _yticks(ax)
    assert ticks[:2] == ["zero A", "zero B"]
    assert ticks[2:] == ["random: enc.0.norm2.weight (n=40)", "random: enc.0.linear2.weight (n=40)"]
    bars = sorted((p for p in ax.patches if p.get_height() == pytest.approx(0.8)), key=lambda p: p.get_y())
    assert len(bars) == 2
    for bar, pname in zip(bars, ["enc.0.norm2.weight", "enc.0.linear2.weight"]):  # rows 0 (A) and 1 (B)
        lo, hi = np.percentile(pools[pname], (2.5, 97.5))
        assert bar.get_x() == pytest.approx(lo) and bar.get_x() + bar.get_width() == pytest.approx(hi)


def test_collapse_by_celltype_puts_the_most_collapsed_first(res):
    ax = pl.collapse_by_celltype(res, ax=plt.subplots()[1])
    ticks = _yticks(ax)
    assert ticks == ["all cells", "Microglia", "Astrocytes", EVIL_LABEL]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:2] == ["AD", "control"] or set(legend) >= {"AD", "control"}
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths[-1] == pytest.approx(2.5)  # AD microglia


def test_scaling_curve_uses_prune_as_zero_and_marks_baseline(res):
    col = res[_keys.UNS_COLLAPSE]
    no_zero = col[col["condition"] != _keys.cond_scale(STRONG, 0)]
    ax = pl.scaling_curve(no_zero, ax=plt.subplots()[1])
    line = ax.lines[0]
    assert list(line.get_xdata()) == [0.0, 0.5, 1.0, 2.0, 3.0]
    assert line.get_ydata()[0] == pytest.approx(2.34)  # prune:<cand> filled in as ×0
    assert any(np.allclose(ln.get_ydata(), 1.23) for ln in ax.lines[1:])


def test_enrichment_dotplot_top_term_first(res):
    ax = pl.enrichment_dotplot(res, n_terms=2, ax=plt.subplots()[1])
    assert _yticks(ax) == ["Complement cascade", "Microglial activation"]
    odds = res[_keys.UNS_ENRICHMENT].assign(nes=np.nan, odds_ratio=[4.0, 2.0, 1.1, 1.5])
    assert isinstance(pl.enrichment_dotplot(odds), Figure)


def test_value_scale_ci_is_moved_to_the_delta_scale():
    df = pd.DataFrame([
        dict(condition="baseline", metric="m", group="all", value=1.0, delta=0.0, ci_low=np.nan, ci_high=np.nan,
             p_value=np.nan),
        dict(condition="prune:a", metric="m", group="all", value=3.0, delta=2.0, ci_low=2.8, ci_high=3.2,
             p_value=0.01),
        dict(condition="prune:b", metric="m", group="all", value=1.5, delta=np.nan, ci_low=0.2, ci_high=0.8,
             p_value=0.01),
    ])
    out = pl._prepare_collapse(df).set_index("condition")
    assert out.loc["prune:a", ["ci_low", "ci_high"]].tolist() == pytest.approx([1.8, 2.2])
    assert out.loc["prune:b", "delta"] == pytest.approx(0.5)
    assert out.loc["prune:b", ["ci_low", "ci_high"]].tolist() == pytest.approx([0.2, 0.8])


def test_dollar_in_a_label_does_not_start_mathtext(res, tmp_path):
    col = res[_keys.UNS_COLLAPSE].copy()
    col["group"] = col["group"].str.replace("Astrocytes", "$x$ cells", regex=False)
    fig = pl.collapse_by_celltype(col, save=tmp_path / "d.png")
    ticks = _yticks(fig.axes[0])
    # escaped: drawn as the literal "$x$ cells", never parsed as math
    assert r"\$x\$ cells" in ticks and not any(matplotlib.cbook.is_math_text(t) for t in ticks)


@pytest.mark.parametrize(
    ("name", "table", "step"),
    [
        ("spike_map", _keys.UNS_ACTIVATIONS, "ssw.tl.scan"),
        ("candidate_effects", _keys.UNS_COLLAPSE, "ssw.tl.prune"),
        ("collapse_by_celltype", _keys.UNS_COLLAPSE, "ssw.tl.prune"),
        ("scaling_curve", _keys.UNS_COLLAPSE, "ssw.tl.prune"),
        ("enrichment_dotplot", _keys.UNS_ENRICHMENT, "ssw.tl.enrich"),
    ],
)
def test_missing_table_names_the_step(name, table, step, res):
    a = fake_adata({k: v for k, v in res.items() if k != table})
    with pytest.raises(DataError, match=rf"run {step}"):
        CALLS[name](a)
    with pytest.raises(DataError, match=rf"run {step}"):
        CALLS[name](fake_adata(None))  # no uns["ssw"] at all
    with pytest.raises(DataError, match=rf"run {step}"):
        CALLS[name]({k: v for k, v in res.items() if k != table})


def test_wrong_table_or_missing_pieces(res, adata):
    with pytest.raises(DataError, match=r"lacks column\(s\).*collapse"):
        pl.candidate_effects(res[_keys.UNS_GENES])
    with pytest.raises(DataError, match="metrics present"):
        pl.candidate_effects(res, metric="nope")
    col = res[_keys.UNS_COLLAPSE]
    with pytest.raises(DataError, match="scale factors"):
        pl.scaling_curve(col[~col["condition"].str.startswith("scale:")])
    with pytest.raises(DataError, match="label key"):
        pl.collapse_by_celltype(col[col["group"] == "all"])
    b = adata.copy()
    del b.obsm[_keys.OBSM_EMB_PRUNED]
    with pytest.raises(DataError, match="run ssw.tl.prune first"):
        pl.embedding_before_after(b)
    with pytest.raises(DataError, match="run ssw.tl.embed and ssw.tl.prune first"):
        pl.embedding_before_after(res)
    with pytest.raises(DataError, match="sc.tl.umap"):
        pl.embedding_before_after(adata, basis="X_umap")
    with pytest.raises(DataError, match="not an obs column"):
        pl.embedding_before_after(adata, color="nope")


def test_embedding_with_precomputed_basis(adata):
    b = adata.copy()
    b.obsm["X_umap"] = b.obsm[_keys.OBSM_EMB][:, :2]
    b.obsm["X_umap_pruned"] = b.obsm[_keys.OBSM_EMB_PRUNED][:, :2]
    fig = pl.embedding_before_after(b, basis="umap", color="cell_type")
    assert fig.axes[0].get_title() == "baseline (UMAP)"
    assert np.allclose(fig.axes[0].collections[0].get_offsets().data[:, :2].min(axis=0),
                       b.obsm["X_umap"].min(axis=0))
