import numpy as np
import pytest
import torch
from _plant import plant_cls_superweight, tiny_batches, tiny_model

from scsuperweight.detect import find_superweights
from scsuperweight.detect_null import (
    NULL_COLUMNS,
    bh_qvalues,
    detection_null,
    empirical_p,
    null_tensors,
    permutation_pvalues,
    site_pvalues,
)

N_TOKENS = 60


def _row_plant(seed=4, layer=1, row=7):
    """A spike made by arrangement, not by one outlier: a whole down-projection row of moderate weights (1.0, about
    8x the init bound) adds up coherently on every token; shuffled, the same values add up incoherently."""
    m = tiny_model(seed)
    with torch.no_grad():
        m.transformer_encoder.layers[layer].linear2.weight[row, :] = 1.0
    return m


@pytest.mark.parametrize("method", ["permute", "gaussian"])
def test_untrained_model_pvalues_are_roughly_uniform(method):
    m = tiny_model(0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    null = detection_null(m, k=10, n_tokens=N_TOKENS, method=method)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # copies leave the model as it was
    assert list(null.null.columns) == NULL_COLUMNS and null.null["perm"].nunique() == 10
    p = np.sort(site_pvalues(null)["p"].to_numpy())
    assert len(p) >= 10
    # an untrained model is exchangeable with its null copies: p spread over (0, 1], not piled up near 0
    assert 0.25 < p.mean() < 0.75
    assert np.mean(p <= 0.1) < 0.4
    ks = np.max(np.abs(np.arange(1, len(p) + 1) / len(p) - p))
    assert ks < 0.45
    assert null.pass_rate(min_ratio=20.0) == 0.0


def test_arranged_spike_gets_the_smallest_permutation_p():
    m = _row_plant()
    sw = find_superweights(m, mode="data_free", n_tokens=N_TOKENS, max_rounds=1)
    top = sw.iloc[0]
    assert (top["site"], top["channel"], bool(top["above_threshold"])) == ("L1.ffn_out", 7, True)
    null = detection_null(m, k=20, n_tokens=N_TOKENS)
    pv = permutation_pvalues(sw, null)
    assert pv.loc[0, "perm_p"] == pytest.approx(1 / 21)
    assert pv.loc[0, "perm_p_max"] == pytest.approx(1 / 21)
    assert pv.loc[0, "perm_q"] < 0.25
    assert null.pass_rate() == 0.0  # the same values shuffled never pass the fixed threshold
    assert pv.index.equals(sw.index)


def test_lone_outlier_scalar_survives_permutation_but_not_the_gaussian_null():
    m = tiny_model(3)
    plant_cls_superweight(m, tiny_batches(m, 12, 3, 6), 1, 5, 10)
    sw = find_superweights(m, mode="data_free", n_tokens=N_TOKENS, max_rounds=1)
    assert sw.iloc[0]["candidate"] == "L1.linear2.w[5,10]"
    gauss = detection_null(m, k=20, n_tokens=N_TOKENS, method="gaussian")
    assert permutation_pvalues(sw, gauss).loc[0, "perm_p"] == pytest.approx(1 / 21)
    assert gauss.pass_rate() == 0.0
    # shuffling keeps the huge scalar, which writes a spike wherever it lands: the permutation null cannot call it
    perm = detection_null(m, k=10, n_tokens=N_TOKENS, method="permute")
    assert permutation_pvalues(sw, perm).loc[0, "perm_p"] > 0.2
    assert perm.pass_rate() > 0.5


def test_null_tensors_keep_values_or_scale():
    m = tiny_model(1)
    name = "transformer_encoder.layers.0.linear2.weight"
    w = m.get_parameter(name).detach()
    perm = null_tensors(m, 0, "permute")[name]
    assert torch.equal(perm.reshape(-1).sort().values, w.reshape(-1).sort().values) and not torch.equal(perm, w)
    assert torch.equal(null_tensors(m, 0, "permute")[name], perm)  # seeded
    g = null_tensors(m, 0, "gaussian")[name]
    mad = lambda x: float((x - x.median()).abs().median())  # noqa: E731
    assert mad(g) == pytest.approx(mad(w), rel=0.15)
    assert "transformer_encoder.layers.0.norm1.weight" not in null_tensors(m, 0, which="matrices")
    with pytest.raises(ValueError, match="method"):
        null_tensors(m, 0, "shuffle")


def test_empirical_p_and_bh():
    assert empirical_p(5.0, np.array([1.0, 2.0, 6.0])) == pytest.approx(2 / 4)
    assert empirical_p(10.0, np.array([1.0, 2.0, 6.0])) == pytest.approx(1 / 4)
    assert empirical_p(np.inf, np.array([1.0, np.inf])) == pytest.approx(2 / 3)
    assert np.isnan(empirical_p(np.nan, np.array([1.0])))
    q = bh_qvalues([0.01, 0.04, 0.03, np.nan, 0.5])
    assert np.allclose(q[[0, 1, 2, 4]], [0.04, 0.16 / 3, 0.16 / 3, 0.5]) and np.isnan(q[3])
