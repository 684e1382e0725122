import pandas as pd
import pytest
import torch
from _plant import tiny_batches, tiny_model

from scsuperweight.ablation import (
    Ablation,
    ablations_frame,
    build_ablations,
    channel_ablation,
    joint_ablation,
    magnitude_bin,
    matched_scalars,
    mean_ablation,
    mean_activation_ablation,
    neuron_ablation,
    random_channels,
    random_neurons,
    run_ablation,
    site_means,
)
from scsuperweight.instrument import ScalarEdit, Trace, edit

LAYER, ROW, UNIT = 1, 5, 10
W2 = f"transformer_encoder.layers.{LAYER}.linear2.weight"


def _cand(**over):
    row = {"candidate": f"L{LAYER}.linear2.w[{ROW},{UNIT}]", "kind": "ffn_down", "layer": LAYER, "param": W2,
           "row": ROW, "col": UNIT, "site": f"L{LAYER}.ffn_out", "channel": ROW, "token": "<cls>"}
    return pd.Series({**row, **over})


def _cos(outs, base) -> float:
    a = torch.cat([o["cell_emb"] for o in outs]).double()
    b = torch.cat([o["cell_emb"] for o in base]).double()
    return float(torch.nn.functional.cosine_similarity(a, b).mean())


def _planted_unit(seed: int, in_scale: float, bias: float, write) -> tuple:
    """Unit UNIT of block LAYER with input weights `in_scale` x noise, bias `bias`, and `write(column)` setting what
    it writes; with the model's outputs before any ablation."""
    m = tiny_model(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        blk = m.transformer_encoder.layers[LAYER]
        blk.linear1.weight[UNIT] = in_scale * torch.randn(32, generator=g)
        blk.linear1.bias[UNIT] = bias
        write(blk.linear2.weight, g)
    bs = tiny_batches(m, 12, seed, 6)
    return m, bs, run_ablation(m, None, bs)


@pytest.fixture(scope="module")
def constant_unit():
    """A unit that fires at about 1 on every token (a tiny input weight, bias 1) and writes 50 into channel ROW:
    a large activation that is nearly constant, so its mean carries it."""
    return _planted_unit(0, 0.01, 1.0, lambda w, g: w.__setitem__((ROW, UNIT), 50.0))


@pytest.fixture(scope="module")
def wide_neuron():
    """A strongly active unit that writes +-3 into every channel: each single scalar is one of 32 equal writes."""
    return _planted_unit(2, 0.3, 2.0, lambda w, g: w.__setitem__((slice(None), UNIT),
                                                                  3.0 * torch.sign(torch.randn(32, generator=g))))


def test_scalar_edit_set_and_add_restore_bit_for_bit():
    m = tiny_model(1)
    p = m.get_parameter(W2)
    before = p.detach().clone()
    with edit(m, [ScalarEdit(W2, (0, 0), value=7.5), ScalarEdit(W2, (0, 1), 2.0, add=0.25),
                  ScalarEdit(W2, (0, 2), 1.0)]):
        assert float(p.detach()[0, 0]) == 7.5
        assert float(p.detach()[0, 1]) == pytest.approx(2 * float(before[0, 1]) + 0.25)
        assert torch.equal(p.detach()[0, 2], before[0, 2])  # factor 1 leaves the bits as they are
    assert torch.equal(p.detach(), before)


def test_site_means_match_kept_activations(constant_unit):
    m, bs, _ = constant_unit
    site = f"L{LAYER}.ffn_hidden"
    with Trace(m, [site], keep=[site], reductions=False) as tr:
        for b in bs:
            tr.run(b)
    xs = [x[~b.padding_mask] for x, b in zip(tr.full[site], bs)]
    expect = torch.cat(xs).double().mean(0)
    got = site_means(m, bs, [site])[site]
    assert torch.allclose(got, expect, atol=1e-6)
    cls_only = site_means(m, bs, [site], token_id=m.vocab["<cls>"])[site]
    expect_cls = torch.cat([x[:, 0] for x in tr.full[site]]).double().mean(0)
    assert torch.allclose(cls_only, expect_cls, atol=1e-6)


def test_zeroing_collapses_but_mean_ablation_does_not(constant_unit):
    m, bs, base = constant_unit
    cand = _cand()
    zero = Ablation("prune", (ScalarEdit(W2, (ROW, UNIT)),), "zero")
    mean = mean_ablation(m, cand, bs)
    assert mean.name == "mean:L1.linear2.w[5,10]"
    # the planted answer: x_unit is ~1 everywhere, so the bias absorbs ~50
    (w_edit, b_edit) = mean.edits
    assert (w_edit.param, w_edit.index, w_edit.factor) == (W2, (ROW, UNIT), 0.0)
    assert b_edit.param.endswith("linear2.bias") and b_edit.add == pytest.approx(50.0, rel=0.05)
    assert _cos(run_ablation(m, zero, bs), base) < 0.5
    assert _cos(run_ablation(m, mean, bs), base) > 0.995
    act = mean_activation_ablation(m, cand, bs)
    assert act.patch[:2] == (f"L{LAYER}.ffn_out", ROW) and act.patch[3] == m.vocab["<cls>"]
    assert _cos(run_ablation(m, act, bs), base) > 0.995


def test_mean_ablation_keeps_the_mean_of_what_it_replaces(constant_unit):
    m, bs, _ = constant_unit
    site = f"L{LAYER}.ffn_out"
    before = site_means(m, bs, [site])[site]
    with edit(m, list(mean_ablation(m, _cand(), bs).edits)):
        after = site_means(m, bs, [site])[site]
    assert float(after[ROW]) == pytest.approx(float(before[ROW]), rel=1e-5)
    # a LayerNorm dimension: its output becomes its mean at every token
    norm = f"transformer_encoder.layers.{LAYER}.norm2.weight"
    ln = mean_ablation(m, _cand(candidate="L1.norm2.w[5]", kind="ln_weight", param=norm, col=None), bs)
    out_site = f"L{LAYER}.norm2_out"
    mean = float(site_means(m, bs, [out_site])[out_site][ROW])
    with edit(m, list(ln.edits)), Trace(m, [out_site], keep=[out_site], reductions=False) as tr:
        for b in bs:
            tr.run(b)
    vals = torch.cat([x[..., ROW].reshape(-1) for x in tr.full[out_site]])
    assert torch.allclose(vals, torch.full_like(vals, mean), atol=1e-5)


def test_neuron_matters_where_its_scalar_does_not(wide_neuron):
    m, bs, base = wide_neuron
    cand = _cand()
    scalar = 1 - _cos(run_ablation(m, Ablation("prune", (ScalarEdit(W2, (ROW, UNIT)),), "zero"), bs), base)
    neuron = neuron_ablation(m, cand)
    assert len(neuron.edits) == 32 + 1 + 32  # linear1 row, its bias, linear2 column
    hit = 1 - _cos(run_ablation(m, neuron, bs), base)
    controls = [1 - _cos(run_ablation(m, a, bs), base) for a in random_neurons(m, LAYER, 4, exclude=[UNIT])]
    assert scalar < 0.05 and hit > 0.3
    assert hit > 10 * scalar and hit > 10 * max(controls)


def test_channel_ablation_silences_the_channel_and_controls_are_other_channels(wide_neuron):
    m, bs, _ = wide_neuron
    ch = channel_ablation(m, _cand())
    params = {e.param.rsplit(".", 2)[-2] + "." + e.param.rsplit(".", 1)[-1] for e in ch.edits}
    assert params == {"linear2.weight", "linear2.bias", "out_proj.weight", "out_proj.bias", "norm1.weight",
                      "norm1.bias", "norm2.weight", "norm2.bias"}
    assert all(e.index[0] == ROW for e in ch.edits)
    site = f"L{LAYER}.block_out"
    with edit(m, list(ch.edits)), Trace(m, [site], keep=[site], reductions=False) as tr:
        for b in bs:
            tr.run(b)
    assert all(bool((x[..., ROW] == 0).all()) for x in tr.full[site])  # post-norm: the block writes nothing there
    ctrl = random_channels(m, LAYER, 5, exclude=[ROW], seed=3)
    assert len({a.edits[0].index[0] for a in ctrl}) == 5 and all(a.edits[0].index[0] != ROW for a in ctrl)
    assert [a.edits[0].index for a in ctrl] == [a.edits[0].index for a in random_channels(m, LAYER, 5,
                                                                                          exclude=[ROW], seed=3)]
    assert {a.control_for for a in ctrl} == {f"channel:L{LAYER}"}


def test_matched_scalars_come_from_the_candidates_bin():
    m = tiny_model(4)
    with torch.no_grad():
        m.get_parameter(W2)[ROW, UNIT] = 10.0  # the largest entry: its bin is the top 5%
    w = m.get_parameter(W2).detach()
    lo, hi = magnitude_bin(w, (ROW, UNIT), n_bins=20)
    assert hi == pytest.approx(10.0) and lo == pytest.approx(float(torch.quantile(w.abs().reshape(-1), 0.95)))
    draws = matched_scalars(m, _cand(), 30, n_bins=20, seed=0, exclude=[(W2, (0, 0))])
    idx = [a.edits[0].index for a in draws]
    assert len(set(idx)) == len(idx) and (ROW, UNIT) not in idx and (0, 0) not in idx
    assert all(lo <= float(w[i].abs()) <= hi for i in idx)
    assert len(draws) <= int((w.abs() >= lo).sum()) - 1
    assert {a.control_for for a in draws} == {_cand()["candidate"]}


def test_build_ablations_and_joint(wide_neuron):
    m, bs, _ = wide_neuron
    cands = pd.DataFrame([_cand(), _cand(candidate="L1.norm2.w[5]", kind="ln_weight",
                                         param=f"transformer_encoder.layers.{LAYER}.norm2.weight", col=None)])
    abl = build_ablations(m, cands, bs, joint=cands, n_random=3)
    names = [a.name for a in abl]
    assert {"mean:L1.linear2.w[5,10]", "mean_activation:L1.linear2.w[5,10]", "neuron:L1.linear2.w[5,10]",
            "channel:L1.linear2.w[5,10]", "mean:L1.norm2.w[5]", "joint"} <= set(names)
    assert "neuron:L1.norm2.w[5]" not in names  # no FFN unit behind a LayerNorm dimension
    assert "channel:L1.norm2.w[5]" not in names  # the same channel of the same block as the scalar's: one condition
    assert sum(n.startswith("random_neuron:L1:") for n in names) == 3
    assert sum(n.startswith("matched:L1.linear2.w[5,10]:") for n in names) == 3
    assert len(names) == len(set(names))
    j = joint_ablation(m, cands)
    assert [(e.param, e.index) for e in j.edits] == [(W2, (ROW, UNIT)),
                                                      (f"transformer_encoder.layers.{LAYER}.norm2.weight", (ROW,))]
    frame = ablations_frame(abl)
    assert list(frame.columns[:4]) == ["condition", "kind", "candidate", "control_for"]
    assert frame.set_index("condition").loc["mean_activation:L1.linear2.w[5,10]", "patch"].startswith("L1.ffn_out[5]")
