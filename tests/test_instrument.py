import numpy as np
import pytest
import torch
from _plant import tiny_batches, tiny_model

from scsuperweight.errors import HookError
from scsuperweight.instrument import ActivationPatch, Trace, edit


@pytest.fixture
def model_and_batches():
    m = tiny_model(0)
    return m, tiny_batches(m, n_cells=20, seed=0)


def test_hooks_fire_under_eval_no_grad_with_padding(model_and_batches):
    m, batches = model_and_batches
    assert any(b.padding_mask.any() for b in batches)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), Trace(m) as tr:
        assert not torch.backends.mha.get_fastpath_enabled()
        for b in batches:
            tr.run(b)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert all(st.calls == len(batches) for st in tr.stats.values())
    assert set(tr.stats) == set(tr.adapter.sites)
    assert not m.transformer_encoder.layers[0].linear2._forward_hooks  # removed


def test_reductions_match_full_tensors(model_and_batches):
    m, batches = model_and_batches
    with torch.no_grad(), Trace(m, "L1.ffn_out", keep="L1.ffn_out") as tr:
        for b in batches:
            tr.run(b)
    st = tr.stats["L1.ffn_out"]
    vals, maxes = [], torch.zeros(st.d, dtype=torch.float64)
    for x, b in zip(tr.full["L1.ffn_out"], batches):
        a = x.abs().double()
        a[b.padding_mask] = 0
        maxes = torch.maximum(maxes, a.amax((0, 1)))
        vals.append(a[~b.padding_mask].reshape(-1))
    assert torch.allclose(st.max_abs, maxes)
    c = st.top_channel()
    # the recorded cell/position really holds the maximum
    cell, pos = int(st.arg_cell[c]), int(st.arg_pos[c])
    for x, b in zip(tr.full["L1.ffn_out"], batches):
        hit = np.flatnonzero(b.cells == cell)
        if len(hit):
            assert float(x[hit[0], pos, c].abs()) == pytest.approx(float(st.max_abs[c]), rel=1e-6)
            assert int(st.arg_token[c]) == int(b.src[hit[0], pos])
    med = float(torch.cat(vals).median())
    assert st.median_abs() == pytest.approx(med, rel=0.03)  # histogram estimate within 3%
    assert st.n_cells == sum(len(b.cells) for b in batches)


def test_memory_does_not_grow_with_cells(model_and_batches):
    m, _ = model_and_batches
    sizes = []
    for n in (8, 64):
        bs = tiny_batches(m, n_cells=n, seed=1)
        with torch.no_grad(), Trace(m, "ffn_out") as tr:
            for b in bs:
                tr.run(b)
        sizes.append(sum(t.numel() for st in tr.stats.values()
                         for t in (st.max_abs, st.arg_cell, st.hist, st.top_count, st.sum_abs)))
    assert sizes[0] == sizes[1]


def test_unknown_site_suggests_close_match(model_and_batches):
    m, _ = model_and_batches
    with pytest.raises(HookError, match="ffn_out"):
        Trace(m, "ffn_outt")
    with pytest.raises(HookError, match="L1.ffn_out"):
        Trace(m, "L1.fn_out")


def test_trace_raises_when_model_never_ran(model_and_batches):
    m, _ = model_and_batches
    with pytest.raises(HookError, match="never run"), Trace(m, "ffn_out"):
        pass


def test_hooks_removed_on_exception(model_and_batches):
    m, batches = model_and_batches
    with pytest.raises(ValueError), torch.no_grad(), Trace(m, "all") as tr:
        tr.run(batches[0])
        raise ValueError("boom")
    assert all(not mod._forward_hooks for mod in m.modules())
    assert all(not mod._forward_pre_hooks for mod in m.modules())
    assert torch.backends.mha.get_fastpath_enabled()


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _bit_equal(a, b):
    return all(torch.equal(a[k].view(torch.uint8) if a[k].dtype.is_floating_point else a[k],
                           b[k].view(torch.uint8) if b[k].dtype.is_floating_point else b[k]) for k in a)


def test_edit_zero_scale_and_exact_restore(model_and_batches):
    m, batches = model_and_batches
    before = _snapshot(m)
    W = "transformer_encoder.layers.1.linear2.weight"
    G = "transformer_encoder.layers.0.norm2.weight"
    orig = float(m.get_parameter(W)[3, 5].detach())
    with edit(m, [(W, (3, 5)), (G, 7, 2.5), (W, (3, 5))]):  # duplicate target edits once
        assert float(m.get_parameter(W)[3, 5]) == 0.0
        assert float(m.get_parameter(G)[7]) == pytest.approx(2.5 * float(before[G][7]))
    assert _bit_equal(before, _snapshot(m))
    with pytest.raises(RuntimeError), edit(m, [(W, (3, 5))], factor=3.0):
        assert float(m.get_parameter(W)[3, 5]) == pytest.approx(3 * orig)
        raise RuntimeError("fails mid-edit")
    assert _bit_equal(before, _snapshot(m))


def test_edit_changes_output_and_bad_targets(model_and_batches):
    m, batches = model_and_batches
    b = batches[0]
    with torch.no_grad():
        base = m(b.src, b.values, b.padding_mask)["cell_emb"]
        with edit(m, [("transformer_encoder.layers.2.norm2.weight", 4)]):
            e = m(b.src, b.values, b.padding_mask)["cell_emb"]
    assert torch.allclose(e[:, 4], m.transformer_encoder.layers[2].norm2.bias[4].expand(len(e)), atol=1e-6)
    assert not torch.allclose(base, e)
    with pytest.raises(HookError, match="no parameter"):
        with edit(m, [("nope.weight", (0, 0))]):
            pass
    with pytest.raises(HookError, match="out of range"):
        with edit(m, [("transformer_encoder.layers.1.linear2.weight", (999, 0))]):
            pass


def test_activation_patch_restores_baseline_value(model_and_batches):
    m, batches = model_and_batches
    b = batches[0]
    W = "transformer_encoder.layers.1.linear2.weight"
    with torch.no_grad(), Trace(m, "L1.ffn_out", keep="L1.ffn_out", reductions=False) as tr:
        base = tr.run(b)
    base_chan = tr.full["L1.ffn_out"][0][..., 3]
    with torch.no_grad(), edit(m, [(W, (3, 5))]):
        pruned = m(b.src, b.values, b.padding_mask)
        with edit(m, patches=[ActivationPatch("L1.ffn_out", 3, base_chan, "all")]):
            restored = m(b.src, b.values, b.padding_mask)
    assert not torch.allclose(pruned["cell_emb"], base["cell_emb"])
    assert torch.allclose(restored["cell_emb"], base["cell_emb"], atol=1e-5)
