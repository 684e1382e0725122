"""The family registry: each adapter family gets its runner, an unknown family one clear line, and a new family is
one registered runner class that the AnnData face (`tl.embed`, `tl.prune`) runs without knowing it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from test_hf import tiny_bert, tiny_llama
from test_tl import synthetic_model
from torch import nn

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight.adapters import Adapter
from scsuperweight.errors import DataError
from scsuperweight.instrument import edit
from scsuperweight.metrics import registry
from scsuperweight.runners import (
    RUNNERS,
    BertRunner,
    Inputs,
    LlamaRunner,
    Runner,
    ScGPTRunner,
    get_runner,
    l2_normalise,
    register_runner,
)


def test_each_family_gets_its_runner():
    adata = ssw.datasets.synthetic_ad(n_cells=20, n_donors=2, seed=0)
    cases = [(synthetic_model(adata), ScGPTRunner, "scgpt", 0.25, "gepc_mse"),
             (tiny_bert(), BertRunner, "bert", 0.15, "mlm_loss"),
             (tiny_llama(), LlamaRunner, "llama", None, None)]
    for model, cls, family, ratio, primary in cases:
        runner = get_runner(model)
        assert type(runner) is cls and runner.family == family
        if ratio is not None:
            assert runner.mask_ratio == ratio and runner.primary_metric() == primary
            assert primary in runner.reconstruction_metrics
    assert get_runner(synthetic_model(adata)).primary_metric({"gep_mse", "gep_pearson"}) == "gep_mse"  # no MVC
    assert BertRunner(tiny_bert()).describe(token_dictionary="td.pkl", gene_medians={"a": 1.0}) == {
        "token_dictionary": "td.pkl", "gene_medians": "<dict of 1 entries>", "symbol_key": None}
    assert ScGPTRunner(synthetic_model(adata)).describe(token_dictionary="td.pkl") == {}


def test_llama_is_registered_but_the_anndata_steps_refuse_it():
    adata = ssw.datasets.synthetic_ad(n_cells=20, n_donors=2, seed=0)
    runner = get_runner(tiny_llama())
    with pytest.raises(DataError, match="tl.embed on AnnData supports scGPT and BERT-family"):
        runner.configure("embed")
    with pytest.raises(DataError, match="not for the llama family"):
        runner.evaluator([], [], 0)
    with pytest.raises(DataError, match="this is a llama model"):
        ssw.tl.scan(adata, tiny_llama(), mode="data_free", progress=False)


class _ModelOfUnknownKind(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        object.__setattr__(self, "_ssw_adapter", Adapter(self, family="mystery"))


def test_an_unknown_family_fails_in_one_line_naming_the_supported_ones():
    with pytest.raises(DataError) as err:
        get_runner(_ModelOfUnknownKind())
    msg = str(err.value)
    assert "\n" not in msg and "'mystery'" in msg
    assert all(f in msg for f in ("scgpt", "bert", "llama"))
    with pytest.raises(TypeError, match="subclass of scsuperweight.runners.Runner"):
        register_runner("mystery", object)


# -- a new family: a linear autoencoder over expression, known to nobody but its runner ---------------------------
N_GENES, PLANT = 12, 3


class ToyAutoencoder(nn.Module):
    """Cells -> codes (x W^T) -> expression (codes W); with W = I every gene is reconstructed exactly."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(N_GENES, N_GENES, bias=False)
        with torch.no_grad():
            self.enc.weight.copy_(torch.eye(N_GENES))
        object.__setattr__(self, "_ssw_adapter", Adapter(self, family="toy", n_layers=1))


class ToyEvaluator:
    def __init__(self, model, x: np.ndarray):
        self.model, self.x, self.forwards = model, torch.from_numpy(x), 0

    @torch.no_grad()
    def run(self, cond) -> dict[str, np.ndarray]:
        with edit(self.model, cond.edits, verify=False):
            codes = self.x @ self.model.enc.weight.T
            recon = codes @ self.model.enc.weight
        self.forwards += 1
        return {"toy_mse": ((recon - self.x) ** 2).mean(1).double().numpy(), "cls": codes.double().numpy()}


class ToyRunner(Runner):
    mask_ratio = 0.5

    def prepare(self, adata, *, cells=None, mask_ratio=None, **kwargs) -> Inputs:
        sub = adata[cells] if cells is not None else adata
        x = np.asarray(sub.X, dtype=np.float32)
        return Inputs(x, [x], [x] if mask_ratio else None, len(x), np.asarray(sub.var_names, dtype=str),
                      {"genes_matched": sub.n_vars})

    @torch.no_grad()
    def embed(self, inputs, *, edits=None, progress=False) -> np.ndarray:
        with edit(self.model, [] if edits is None else edits):
            return l2_normalise((torch.from_numpy(inputs.tok) @ self.model.enc.weight.T).numpy())

    def evaluator(self, masked, plain, n_cells, *, emb="mean", progress=False) -> ToyEvaluator:
        return ToyEvaluator(self.model, masked[0])


@pytest.fixture
def toy_family(monkeypatch):
    """The two registrations a new family needs: its runner, and its metric (naming the family) in the registry."""
    monkeypatch.setitem(registry.METRICS, "toy_mse", registry.MetricSpec(
        "toy_mse", "toy reconstruction MSE", registry.LOWER, "cell", False, ("toy",), "mean squared error of the "
        "autoencoder's reconstruction of a cell", primary_for=("toy",)))
    register_runner("toy", ToyRunner)
    yield
    RUNNERS.pop("toy")


def test_a_new_family_is_one_registered_runner(toy_family):
    rng = np.random.default_rng(0)
    x = rng.uniform(1.0, 3.0, (40, N_GENES)).astype(np.float32)
    adata = ad.AnnData(x, obs=pd.DataFrame({"cell_type": np.repeat(["a", "b"], 20)},
                                           index=[f"c{i}" for i in range(40)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))
    model = ToyAutoencoder()
    ssw.tl.embed(adata, model, progress=False)
    assert np.allclose(adata.obsm[K.OBSM_EMB], l2_normalise(x), atol=1e-6)
    assert ssw.get.params(adata, "embed")["family"] == "toy"
    cand = pd.DataFrame({"candidate": ["enc[3,3]"], "param": ["enc.weight"], "row": [PLANT], "col": [PLANT]})
    ssw.tl.prune(adata, model, label_key="cell_type", candidates=cand, n_random=3, n_boot=10, scale_factors=(0.0,),
                 max_cells_per_label=None, progress=False)
    col = ssw.get.collapse(adata).set_index(["condition", "metric", "group"])
    # zeroing W[3, 3] loses gene 3 from every reconstruction: the error rises by mean(x_3^2) / n_genes exactly
    assert col.loc[("prune:enc[3,3]", "toy_mse", "all"), "delta"] == pytest.approx(
        float((x[:, PLANT].astype(np.float64) ** 2).mean() / N_GENES), rel=1e-5)
    assert col.loc[("baseline", "toy_mse", "all"), "value"] == pytest.approx(0.0, abs=1e-10)
    pruned = x.copy()
    pruned[:, PLANT] = 0.0
    assert np.allclose(adata.obsm[K.OBSM_EMB_PRUNED], l2_normalise(pruned), atol=1e-6)
    params = ssw.get.params(adata, "prune")
    assert (params["family"], params["primary_metric"], params["mask_ratio"]) == ("toy", "toy_mse", 0.5)
    assert get_runner(model).reconstruction_metrics == ("toy_mse",)
    assert np.array_equal(model.enc.weight.detach().numpy(), np.eye(N_GENES))  # every edit restored
