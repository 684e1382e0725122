"""A TileDB-SOMA experiment (the CELLxGENE Census format) as a source: obs and var read at once, X rows on demand
through tiledbsoma's reader, each chunk equal to the same rows of the AnnData it was written from."""

from __future__ import annotations

import numpy as np
import pytest

soma_io = pytest.importorskip("tiledbsoma.io", reason="tiledbsoma is not installed (pip install 'scsuperweight[soma]')")

from scsuperweight import atlas  # noqa: E402
from scsuperweight.data.sources import FILE_COLUMN, is_soma, open_source  # noqa: E402
from scsuperweight.datasets import synthetic_ad  # noqa: E402
from scsuperweight.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    a = synthetic_ad(n_cells=40, n_donors=2, seed=4)
    a.uns = {}
    uri = str(tmp_path_factory.mktemp("soma") / "exp")
    soma_io.from_anndata(uri, a, measurement_name="RNA", X_layer_name="raw")
    return uri, a


def test_soma_rows_equal_the_anndata_rows(experiment):
    uri, a = experiment
    assert is_soma(uri) and not is_soma(str(uri) + "/ms")
    src = open_source(uri)
    assert list(src.obs_names) == list(a.obs_names) and list(src.files[0].var.index) == list(a.var_names)
    assert src.obs["cell_type"].astype(str).tolist() == a.obs["cell_type"].astype(str).tolist()
    assert set(src.obs[FILE_COLUMN]) == {"exp"}
    picked = np.array([31, 2, 17, 3, 39])  # any order: read sorted, as every source does
    seen = []
    for cells, chunk in src.iter_chunks(picked, chunk_size=2):
        assert chunk.n_obs <= 2
        np.testing.assert_array_equal(chunk.X.toarray(), a.X[cells].toarray())
        assert list(chunk.obs_names) == list(a.obs_names[cells])
        seen += cells.tolist()
    assert seen == sorted(picked.tolist())
    with pytest.raises(DataError, match=r"X layers \['raw'\]; pass layer="):
        open_source(uri, layer="UMIs")


def test_soma_sample_and_gene_overlap(experiment):
    from scsuperweight.loading import load_model

    uri, a = experiment
    demo = load_model("demo")
    sample, cells = atlas.sample(uri, label_key="cell_type", max_per_label=3, seed=0, model=demo)
    np.testing.assert_array_equal(sample.X.toarray(), a.X[cells].toarray())
    (row,) = atlas.file_overlap(sample, demo)
    assert (row["file"], row["n_cells"], row["n_genes"]) == ("exp", 40, a.n_vars)
    assert row["n_shared"] == sum(g in demo.vocab for g in a.var_names)
