import numpy as np
import pytest
import torch
from _plant import plant_cls_superweight, tiny_batches, tiny_model

from scsuperweight import _keys as K
from scsuperweight.detect import find_superweights, scan, weight_screen


def _plant_case(seed):
    rng = np.random.default_rng(1000 + seed)
    m = tiny_model(seed, nlayers=3)
    bs = tiny_batches(m, n_cells=12, seed=seed, batch_size=6)
    layer, row, hidden = int(rng.integers(0, 3)), int(rng.integers(0, 32)), int(rng.integers(0, 64))
    plant_cls_superweight(m, bs, layer, row, hidden)
    return m, bs, (layer, row, hidden)


@pytest.mark.parametrize("seed", range(20))
def test_planted_superweight_is_top_candidate(seed):
    m, bs, (layer, row, hidden) = _plant_case(seed)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    df = find_superweights(m, bs)
    top = df.iloc[0]
    assert (top["kind"], top["layer"], top["row"], top["col"]) == (K.KIND_FFN_DOWN, layer, row, hidden)
    assert top["param"] == f"transformer_encoder.layers.{layer}.linear2.weight"
    assert top["token"] == "<cls>"
    assert top["stability"] == 1.0  # every cell's largest channel there
    assert bool(top["above_threshold"])
    assert top["value"] == pytest.approx(float(m.transformer_encoder.layers[layer].linear2.weight[row, hidden]))
    # the post-norm LN entries at the spike channel come along as candidates of their own kinds
    ln = df[df["kind"].isin([K.KIND_LN_WEIGHT, K.KIND_LN_BIAS])]
    assert {(int(r.layer), int(r.row)) for r in ln.itertuples()} >= {(layer, row)}
    assert list(df.columns[: len(K.SUPERWEIGHT_COLUMNS)]) == K.SUPERWEIGHT_COLUMNS
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # detection leaves the model as is


@pytest.mark.parametrize("seed", range(5))
def test_no_plant_no_candidate_above_threshold(seed):
    m = tiny_model(100 + seed)
    res = scan(m, tiny_batches(m, n_cells=12, seed=seed, batch_size=6))
    assert not res.candidates["above_threshold"].any() if len(res.candidates) else True
    assert "no spike passes" in res.stop_reason


def test_data_free_mode_finds_plant():
    m, bs, (layer, row, hidden) = _plant_case(3)
    top = find_superweights(m, mode="data_free", n_tokens=40).iloc[0]
    assert (top["layer"], top["row"], top["col"], top["token"]) == (layer, row, hidden, "<cls>")


def test_iterative_finds_two_plants_and_stops():
    m = tiny_model(7)
    bs = tiny_batches(m, n_cells=12, seed=7, batch_size=6)
    # the later plant first: it is calibrated on the inputs it will see once the earlier one is removed
    plant_cls_superweight(m, bs, 2, 20, 40, magnitude=150.0)
    plant_cls_superweight(m, bs, 0, 5, 10, magnitude=300.0)
    res = scan(m, bs, max_rounds=6)
    prim = res.candidates[res.candidates["primary"] & res.candidates["above_threshold"]]
    coords = [(int(r.layer), int(r.row), int(r.col)) for r in prim.itertuples() if r.kind == K.KIND_FFN_DOWN]
    assert coords[:2] == [(0, 5, 10), (2, 20, 40)]
    assert len(res.rounds) >= 2
    assert res.rounds[0]["spike"] > res.rounds[1]["spike"]


def test_ln_dimension_spike_gives_ln_candidates():
    m = tiny_model(11)
    with torch.no_grad():
        m.transformer_encoder.layers[1].norm1.weight[9] = 80.0
    res = scan(m, tiny_batches(m, n_cells=12, seed=11, batch_size=6), max_rounds=2)
    top = res.candidates.iloc[0]
    assert top["kind"] in (K.KIND_LN_WEIGHT, K.KIND_LN_BIAS)
    assert (top["layer"], top["row"]) == (1, 9)
    assert top["param"].startswith("transformer_encoder.layers.1.norm1.")
    assert pd_isna(top["col"])


def pd_isna(x):
    import pandas as pd

    return pd.isna(x)


def test_near_misses_reported_and_thresholds_stated():
    m, bs, (layer, row, hidden) = _plant_case(5)
    df = find_superweights(m, bs, min_ratio=1e6)  # nothing passes: the plant becomes a near-miss at most
    assert not df["above_threshold"].any() if len(df) else True
    df2 = find_superweights(m, bs, min_ratio=20.0, min_abs=5.0)
    assert (df2["threshold_ratio"] == 20.0).all() and (df2["threshold_abs"] == 5.0).all()


def test_weight_screen_ranks_planted_scalar():
    m, _, (layer, row, hidden) = _plant_case(2)
    ws = weight_screen(m)
    top = ws.iloc[0]
    assert (top["kind"], top["layer"], top["row"], top["col"]) == (K.KIND_FFN_DOWN, layer, row, hidden)
    assert (ws["screen"] == "weight_only").all()


def test_a_capture_runs_one_cell_and_sees_what_the_batch_shows():
    """The column choice's capture runs only the cell that carried the spike (a batch of one: the scan's plan counts
    it so), and that cell's activation vector is the one its whole batch gives, padding included."""
    from scsuperweight.adapters import get_adapter
    from scsuperweight.detect import _capture, _one_cell

    m = tiny_model(5)
    batch = tiny_batches(m, n_cells=6, seed=5)[0]
    adapter = get_adapter(m)
    one, row = _one_cell(batch, 3)
    assert row == 0 and one.src.shape[0] == 1 and list(one.cells) == [batch.cells[3]]
    assert torch.equal(one.padding_mask[0], batch.padding_mask[3])
    site = "L1.ffn_out"
    calls = []
    h = m.transformer_encoder.layers[0].register_forward_hook(lambda mod, a, o: calls.append(a[0].shape[0]))
    try:
        x = _capture(adapter, batch, site, [], 3, 2)
    finally:
        h.remove()
    assert calls == [1]
    from scsuperweight.instrument import Trace

    with torch.no_grad(), Trace(adapter, [site], keep=[site], reductions=False) as tr:
        tr.run(batch)
    full = tr.full[site][0][3, 2].double()
    assert torch.allclose(x, full, rtol=1e-5, atol=1e-6)
    assert _one_cell({"input_ids": batch.src}, 3)[1] == 3  # a batch type it does not know stays whole
