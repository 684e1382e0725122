import math

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


def _brute_force(xs, batches, d):
    """Every reduction of one site recomputed from its full activations, padding excluded."""
    max_abs = torch.zeros(d, dtype=torch.float64)
    cell = torch.full((d,), -1, dtype=torch.long)
    pos = torch.full((d,), -1, dtype=torch.long)
    top, vals, total = [], [], torch.zeros(d, dtype=torch.float64)
    for x, b in zip(xs, batches):
        a = x.abs().double()
        a[b.padding_mask] = 0
        for r in range(a.shape[0]):  # rows in order, positions in order: the first occurrence wins ties
            m, p = a[r].max(0)
            better = m > max_abs
            max_abs[better] = m[better]
            cell[better] = int(b.cells[r])
            pos[better] = p[better]
            top.append(int(a[r].amax(0).argmax()))
        vals.append(a[~b.padding_mask])
        total += a.sum((0, 1))
    return max_abs, cell, pos, np.array(top), torch.cat(vals), total


@pytest.mark.parametrize("path", ["torch", "native"])
def test_every_reduction_matches_brute_force_on_every_site(model_and_batches, monkeypatch, path):
    """All channels of all sites (shared tensors included) against a recomputation from the full activations, with
    the C pass and with the torch path."""
    from scsuperweight.instrument import trace as T

    if path == "native" and T._native is None:
        pytest.skip("the C extension scsuperweight.instrument._reduce is not built here")
    monkeypatch.setattr(T, "NATIVE", path == "native")
    m, batches = model_and_batches
    groups = np.arange(20) % 3  # a group code per cell
    with torch.no_grad(), Trace(m, "all", keep="all", groups=groups) as tr:
        for b in batches:
            tr.run(b)
    cells = np.concatenate([b.cells for b in batches])
    for name, st in tr.stats.items():
        xs = tr.full[name]
        max_abs, cell, pos, top, vals, total = _brute_force(xs, batches, st.d)
        assert torch.equal(st.max_abs, max_abs), name
        assert torch.equal(st.arg_cell, cell), name
        assert torch.equal(st.arg_pos, pos), name
        src = {int(c): b.src[i] for b in batches for i, c in enumerate(b.cells)}
        seen = [c for c in range(st.d) if cell[c] >= 0]  # -1: a channel that was only ever 0
        assert all(int(st.arg_token[c]) == int(src[int(cell[c])][int(pos[c])]) for c in seen), name
        assert torch.equal(st.top_count, torch.as_tensor(np.bincount(top, minlength=st.d))), name
        for code in range(3):
            sel = groups[cells] == code
            assert st.group_cells[code] == int(sel.sum())
            assert torch.equal(st.group_top[code], torch.as_tensor(np.bincount(top[sel], minlength=st.d)))
        assert st.n_positions == len(vals) == sum(int((~b.padding_mask).sum()) for b in batches)
        # tiny batches: every row is sampled, so the sums and the zero count are exact
        assert torch.allclose(st.sum_abs, total, rtol=1e-5), name
        assert st.n_zero == pytest.approx(float((vals == 0).sum())), name
        nz = vals[vals > 0]
        assert st.median_abs(nonzero=True) == pytest.approx(float(nz.median()), rel=0.025), name


def _edge_case_activations():
    """Activations that stress the reductions: ties, zeros, NaN, inf, an all-padding cell, odd widths, strides."""
    gen = torch.Generator().manual_seed(3)
    cases = []
    for B, L, d in [(5, 7, 37), (3, 300, 8), (1, 1, 1), (16, 33, 64)]:
        x = torch.randn(B, L, d, generator=gen)
        x[:, :, 0] = 0.0  # a channel that is only ever 0
        if d > 2:
            x[:, :, 2] = torch.round(x[:, :, 2])  # ties within and across cells
        pad = torch.zeros(B, L, dtype=torch.bool)
        pad[-1, L // 2:] = True
        if B > 2:
            pad[1] = True  # a cell that is all padding
        cases.append((f"plain {B}x{L}x{d}", x, pad))
        cases.append((f"no padding {B}x{L}x{d}", x.clone(), None))
        strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # (B, L, d) view of (L, B, d) memory
        cases.append((f"strided {B}x{L}x{d}", strided, pad))
    x = torch.randn(4, 9, 12, generator=gen)
    x[0, 3, 1], x[2, 5, 1], x[1, 2, 4], x[3, 1, 6] = float("nan"), float("nan"), float("inf"), -float("inf")
    x[1, 0, 7] = 1e-40  # a denormal: counted with the zeros
    x[2, 0, 8] = 1e-12  # the underflow bin
    cases.append(("nan/inf/denormal", x, torch.zeros(4, 9, dtype=torch.bool)))
    return cases


@pytest.mark.parametrize("case", range(len(_edge_case_activations())))
def test_native_pass_equals_torch_path(case):
    """The C pass gives the torch path's answers on edge cases (NaN first and largest, ties to the first)."""
    from scsuperweight.adapters import BatchContext
    from scsuperweight.instrument import trace as T

    if T._native is None:
        pytest.skip("the C extension scsuperweight.instrument._reduce is not built here")
    name, x, pad = _edge_case_activations()[case]
    B, L, d = x.shape
    ctx = BatchContext(None, pad, np.arange(B))
    g = T._geometry(ctx, B, L, d, x.device)
    native, ref = (T._Stack(B, L, d, ctx, g, x.device, capacity=1) for _ in range(2))
    T._reduce_native(x, g, native, native.slot())
    T._reduce_tensor(x.abs().contiguous(), g, ref, ref.slot())  # the scratch buffer is contiguous
    for key, t in ref.blocks.items():
        got = native.blocks[key][0]
        if key == "sums":
            assert torch.allclose(got, t[0], rtol=1e-5, equal_nan=True), (name, key)
        else:
            assert torch.equal(got, t[0]) or torch.allclose(got.double(), t[0].double(), equal_nan=True, rtol=0,
                                                             atol=0), (name, key, got, t[0])
    if "nan" in name:
        assert torch.isnan(native.blocks["m"][0, 1]) and int(native.blocks["b"][0, 1]) == 0
        assert int(native.blocks["pos"][0, 1]) == 3 and float(native.blocks["m"][0, 4]) == float("inf")


@pytest.mark.parametrize("path", ["torch", "native"])
def test_sampled_histogram_and_sums_on_large_batches(path):
    """Batches larger than the sample: the median within a bin width, the per-channel mean within a few percent."""
    from scsuperweight.adapters import BatchContext
    from scsuperweight.instrument import trace as T

    gen = torch.Generator().manual_seed(0)
    d = 48
    scale = torch.linspace(0.5, 4.0, d)
    x = torch.randn(64, 300, d, generator=gen) * scale
    x[:, :, 5] = torch.relu(x[:, :, 5])  # a ReLU-like channel: half zeros
    pad = torch.zeros(64, 300, dtype=torch.bool)
    pad[::2, 250:] = True
    ctx = BatchContext(None, pad, np.arange(64))
    g = T._geometry(ctx, 64, 300, d, x.device)
    assert g["step"] > 1 and math.gcd(g["step"], 300) == 1
    stack = T._Stack(64, 300, d, ctx, g, x.device, capacity=1)
    a = x.abs()
    if path == "native":
        if T._native is None:
            pytest.skip("the C extension scsuperweight.instrument._reduce is not built here")
        T._reduce_native(x, g, stack, stack.slot())
    else:
        T._reduce_tensor(a.clone(), g, stack, stack.slot())
    stack.entries.append(["s"])
    r = {k: torch.as_tensor(v) for k, v in T._reduce_stack(stack).items()}
    valid = a[~pad]  # (n_valid, d)
    est, exact = r["sum_abs"][0] / len(valid), valid.double().mean(0)
    assert float(est.sum() / exact.sum()) == pytest.approx(1.0, abs=0.03)  # ~170 sampled rows: 1% standard error
    assert torch.allclose(est, exact, rtol=0.25)  # per channel: 6% standard error
    hist = r["hist"][0]
    total = float(hist.sum() + r["n_zero"][0])
    assert total == pytest.approx(valid.numel(), rel=1e-9)  # weights restore the full count
    assert float(r["n_zero"][0]) == pytest.approx(float((valid == 0).sum()), rel=0.1)
    med = float(valid[valid > 0].median())
    cum = torch.cumsum(hist, 0)
    k = int(torch.searchsorted(cum, cum[-1] / 2))
    assert T._EDGES[k] * 0.97 <= med <= T._EDGES[k + 1] * 1.03


def test_a_module_called_twice_per_batch_counts_both_calls():
    """A shared module runs twice in one forward: both calls are folded in, none overwrites the other."""
    from torch import nn

    from scsuperweight.adapters.base import Adapter, BatchContext, Site

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    class TwiceAdapter(Adapter):
        def __init__(self, model):
            self.model = model
            self.sites = {"L0.ffn_out": Site("L0.ffn_out", 0, "ffn_out", "lin", "out")}
            self.token_module = None

        def batch_context(self, batch):
            return BatchContext(None, None, np.arange(len(batch)))

        def run(self, batch):
            return self.model(batch)

    torch.manual_seed(0)
    model = Twice()
    x = torch.randn(3, 5, 4)
    ad = TwiceAdapter(model)
    with torch.no_grad(), Trace(ad, "all") as tr:
        tr.set_context(BatchContext(None, None, np.arange(3)))
        tr.run(x)
    with torch.no_grad():
        first = model.lin(x)
        second = model.lin(first)
    st = tr.stats["L0.ffn_out"]
    assert st.calls == 2 and st.n_cells == 6
    expect = torch.maximum(first.abs().amax((0, 1)), second.abs().amax((0, 1))).double()
    assert torch.equal(st.max_abs, expect)


def test_a_tensor_seen_by_several_sites_is_reduced_once(model_and_batches, monkeypatch):
    """A norm's output is the next linear's input and the block's output: one reduction serves all its sites."""
    from scsuperweight.instrument import trace as T

    m, batches = model_and_batches
    calls = []
    for fn in ("_reduce_native", "_reduce_tensor"):
        orig = getattr(T, fn)
        monkeypatch.setattr(T, fn, lambda *a, _orig=orig: (calls.append(1), _orig(*a))[1])
    with torch.no_grad(), Trace(m, "all", keep="all") as tr:
        tr.run(batches[0])
    distinct = {t.data_ptr() for ts in tr.full.values() for t in ts}  # kept CPU tensors share the activations
    assert len(tr.full) > len(distinct)  # the model has shared tensors
    assert len(calls) == len(distinct)


def test_the_c_extension_is_built_where_a_compiler_is():
    """Where a C compiler exists the install builds the one-pass reduction; a silent fallback would cost ~3x."""
    import shutil
    import sysconfig

    from scsuperweight.instrument import trace as T

    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}) here: the torch path is used, and tested above")
    assert T._native is not None, ("scsuperweight.instrument._reduce is not built although a C compiler is present; "
                                   "reinstall with `pip install -e .` (setup.py builds it)")


@pytest.mark.parametrize("path", ["torch", "native"])
def test_stack_blocks_grow_without_losing_rows(path):
    """More activations in a batch than the blocks were sized for: they double, and earlier rows survive."""
    from scsuperweight.adapters import BatchContext
    from scsuperweight.instrument import trace as T

    if path == "native" and T._native is None:
        pytest.skip("the C extension scsuperweight.instrument._reduce is not built here")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, 10, 8, generator=gen) * (i + 1) for i in range(5)]
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[2, 6:] = True
    ctx = BatchContext(None, pad, np.arange(3))
    g = T._geometry(ctx, 3, 10, 8, torch.device("cpu"))
    small, big = T._Stack(3, 10, 8, ctx, g, "cpu", capacity=1), T._Stack(3, 10, 8, ctx, g, "cpu", capacity=8)
    for stack in (small, big):
        for i, x in enumerate(xs):
            if path == "native":
                T._reduce_native(x, g, stack, stack.slot())
            else:
                T._reduce_tensor(x.abs(), g, stack, stack.slot())
            stack.entries.append([f"s{i}"])
    assert small.capacity == 8 and big.capacity == 8
    a, b = T._reduce_stack(small), T._reduce_stack(big)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert np.allclose(a["m"][:, 0], [float(x[:, :, 0].abs()[~pad].max()) for x in xs])


def test_no_fastpath_restores_the_flags_it_found_even_on_error():
    from scsuperweight.instrument import no_fastpath
    from scsuperweight.models._torch import no_fastpath as low

    assert no_fastpath is low  # one helper, re-exported
    m = tiny_model(0)
    enc = m.transformer_encoder
    enc.use_nested_tensor = True
    with pytest.raises(RuntimeError, match="boom"), no_fastpath(m):
        assert not torch.backends.mha.get_fastpath_enabled() and not enc.use_nested_tensor
        with no_fastpath():  # nested: leaves the outer switch off
            pass
        assert not torch.backends.mha.get_fastpath_enabled()
        raise RuntimeError("boom")
    assert torch.backends.mha.get_fastpath_enabled() and enc.use_nested_tensor
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with no_fastpath():
            pass
        assert not torch.backends.mha.get_fastpath_enabled()  # an off flag stays off
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
