"""synthetic_ad: droplet-like counts, and the planted programs are really there (measured here, not by the
generator)."""


import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scsuperweight.data.synthetic import CELL_TYPES, TRUTH_KEY
from scsuperweight.datasets import synthetic_ad


@pytest.fixture(scope="module")
def adata():
    return synthetic_ad()


def _program_genes(truth) -> set[str]:
    return {g for prog in truth["programs"].values() for g in prog["genes"]}


def _log2fc_ad_vs_control(adata, cell_type: str, genes) -> np.ndarray:
    """Mean expression AD / control in one cell type, each cell scaled by its counts over genes no program touches
    (so the planted changes do not leak into the other genes through the library size)."""
    truth = adata.uns[TRUTH_KEY]
    unaffected = ~adata.var_names.isin(list(_program_genes(truth)))
    X = adata.X.tocsr().astype(np.float64)
    size = np.asarray(X[:, unaffected].sum(axis=1)).ravel()
    expr = sp.diags(1e4 / size) @ X[:, adata.var_names.get_indexer(list(genes))]
    in_type = (adata.obs["cell_type"] == cell_type).to_numpy()
    is_ad = (adata.obs["condition"] == "AD").to_numpy()
    mean_ad = np.asarray(expr[in_type & is_ad].mean(axis=0)).ravel()
    mean_ctrl = np.asarray(expr[in_type & ~is_ad].mean(axis=0)).ravel()
    return np.log2((mean_ad + 0.1) / (mean_ctrl + 0.1))


def test_counts_look_like_droplet_data(adata):
    assert adata.n_obs == 3000
    assert 600 <= adata.n_vars <= 1500
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert np.issubdtype(adata.X.dtype, np.integer)
    assert adata.X.data.min() >= 1  # non-negative, no stored zeros
    zeros = 1 - adata.X.nnz / (adata.n_obs * adata.n_vars)
    assert 0.85 <= zeros <= 0.95
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    assert 2000 <= np.median(library) <= 5000
    assert library.std() / library.mean() > 0.3  # depth varies between cells
    assert adata.var_names.is_unique
    assert adata.var_names.str.startswith("MT-").sum() == 13
    assert adata.var_names.str.match(r"^RP[LS]\d").sum() > 50


def test_obs_columns(adata):
    obs = adata.obs
    for key in ("cell_type", "condition", "donor"):
        assert isinstance(obs[key].dtype, pd.CategoricalDtype)
    assert list(obs["cell_type"].cat.categories) == list(CELL_TYPES)
    fractions = obs["cell_type"].value_counts(normalize=True)
    assert set(fractions.index) == set(CELL_TYPES)
    assert fractions.idxmax() == "excitatory neuron"
    assert 0.03 <= fractions["microglia"] <= 0.12
    assert set(obs["condition"]) == {"AD", "control"}
    assert obs["donor"].nunique() == 8
    per_donor = obs.groupby("donor", observed=True)["condition"].nunique()
    assert (per_donor == 1).all()  # condition is a donor property
    donors = obs.groupby("donor", observed=True)["condition"].first()
    assert (donors == "AD").sum() == 4


def test_truth_is_complete_and_in_var(adata):
    truth = adata.uns[TRUTH_KEY]
    programs = truth["programs"]
    assert {"dam_microglia", "homeostatic_microglia", "reactive_astrocyte", "synaptic_excitatory"} <= set(programs)
    for prog in programs.values():
        assert prog["cell_type"] in CELL_TYPES
        assert prog["condition"] == "AD"
        assert prog["direction"] in ("up", "down")
        assert prog["log2_fc"] > 0
        assert set(prog["genes"]) <= set(adata.var_names)
    assert set(truth["markers"]) == set(CELL_TYPES)
    for genes in truth["markers"].values():
        assert set(genes) <= set(adata.var_names)
    assert {"SLC17A7", "GAD1", "GFAP", "P2RY12", "MBP", "PDGFRA", "CLDN5"} <= {
        g for genes in truth["markers"].values() for g in genes
    }


def test_markers_are_highest_in_their_cell_type(adata):
    X = adata.X.astype(np.float64)
    library = np.asarray(X.sum(axis=1)).ravel()
    expr = sp.diags(1e4 / library) @ X
    labels = adata.obs["cell_type"].to_numpy()
    for cell_type, genes in adata.uns[TRUTH_KEY]["markers"].items():
        cols = adata.var_names.get_indexer(genes)
        means = {t: expr[labels == t][:, cols].mean() for t in CELL_TYPES}
        assert max(means, key=means.get) == cell_type
        others = max(v for t, v in means.items() if t != cell_type)
        assert means[cell_type] > 10 * others


@pytest.mark.parametrize(
    "name",
    ["dam_microglia", "homeostatic_microglia", "interferon_microglia", "reactive_astrocyte", "synaptic_excitatory"],
)
def test_programs_change_in_their_cell_type_and_condition(adata, name):
    prog = adata.uns[TRUTH_KEY]["programs"][name]
    fc = _log2fc_ad_vs_control(adata, prog["cell_type"], prog["genes"])
    sign = 1 if prog["direction"] == "up" else -1
    assert (sign * fc > 0).all(), dict(zip(prog["genes"], fc.round(2)))
    assert abs(sign * fc.mean() - prog["log2_fc"]) < 0.35
    # ... and not in another cell type that expresses the same genes less: compare with the truth-free control
    untouched = [t for t in CELL_TYPES if t != prog["cell_type"] and t not in ("endothelial",)][0]
    other = _log2fc_ad_vs_control(adata, untouched, prog["genes"])
    assert abs(other.mean()) < abs(fc.mean()) / 2


def test_unplanted_genes_do_not_change(adata):
    truth = adata.uns[TRUTH_KEY]
    rest = [g for g in adata.var_names if g not in _program_genes(truth)]
    micro = (adata.obs["cell_type"] == "microglia").to_numpy()
    detected = np.asarray((adata.X[micro][:, adata.var_names.get_indexer(rest)] > 0).mean(axis=0)).ravel()
    expressed = [g for g, d in zip(rest, detected) if d > 0.3]
    assert len(expressed) > 50
    fc = _log2fc_ad_vs_control(adata, "microglia", expressed)
    assert np.median(np.abs(fc)) < 0.25


def test_effect_scale_zero_plants_nothing():
    null = synthetic_ad(effect_scale=0.0, seed=2)
    for prog in null.uns[TRUTH_KEY]["programs"].values():
        assert prog["log2_fc"] == 0.0
        fc = _log2fc_ad_vs_control(null, prog["cell_type"], prog["genes"])
        assert abs(fc.mean()) < 0.3


def test_cell_types_are_learnable(adata):
    # the usual pipeline (total-count normalisation, log1p, PCA), in numpy + sklearn: scanpy costs seconds to import
    decomposition = pytest.importorskip("sklearn.decomposition")
    neighbors = pytest.importorskip("sklearn.neighbors")
    model_selection = pytest.importorskip("sklearn.model_selection")
    threadpoolctl = pytest.importorskip("threadpoolctl")
    X = adata.X.astype(np.float64)
    logged = (sp.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X).log1p()
    with threadpoolctl.threadpool_limits(1):  # multi-threaded BLAS on a busy 2-core machine is ~10x slower
        pcs = decomposition.PCA(n_components=30, random_state=0).fit_transform(logged.toarray())
    accuracy = model_selection.cross_val_score(
        neighbors.KNeighborsClassifier(n_neighbors=15),
        pcs,
        adata.obs["cell_type"].to_numpy(),
        cv=model_selection.StratifiedKFold(5, shuffle=True, random_state=0),
    ).mean()
    assert accuracy >= 0.95


def test_h5ad_round_trip(adata, tmp_path):
    path = tmp_path / "synthetic.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert (back.X != adata.X).nnz == 0
    assert np.issubdtype(back.X.dtype, np.integer)
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    pd.testing.assert_frame_equal(back.var, adata.var)
    truth, original = back.uns[TRUTH_KEY], adata.uns[TRUTH_KEY]
    assert set(truth["programs"]) == set(original["programs"])
    for name, prog in original["programs"].items():
        got = truth["programs"][name]
        assert list(got["genes"]) == prog["genes"]
        assert float(got["log2_fc"]) == prog["log2_fc"]
        assert str(got["direction"]) == prog["direction"]
        assert str(got["cell_type"]) == prog["cell_type"]
        assert str(got["condition"]) == prog["condition"]
    assert {t: list(g) for t, g in truth["markers"].items()} == original["markers"]
    assert int(truth["params"]["seed"]) == original["params"]["seed"]


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = synthetic_ad(400, seed=3), synthetic_ad(400, seed=3), synthetic_ad(400, seed=4)
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert a.uns[TRUTH_KEY] == b.uns[TRUTH_KEY]
    assert (a.X != c.X).nnz > 0
    assert list(a.var_names) == list(c.var_names)  # the gene panel is fixed; only the draws change


def test_small_and_odd_sizes():
    small = synthetic_ad(n_cells=20, n_donors=3, seed=1)
    assert small.n_obs == 20
    assert set(small.obs["cell_type"]) == set(CELL_TYPES)  # every type present once n_cells allows
    assert set(small.obs["condition"]) == {"AD", "control"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n_cells"):
        synthetic_ad(n_cells=3)
    with pytest.raises(ValueError, match="n_donors"):
        synthetic_ad(n_donors=1)
    with pytest.raises(ValueError, match="median_umis"):
        synthetic_ad(median_umis=0)


