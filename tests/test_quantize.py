import hashlib

import numpy as np
import pytest
import torch
from _plant import plant_cls_superweight, tiny_model, tiny_tokens

from scsuperweight.data import iter_batches
from scsuperweight.quantize import (
    QUANTIZE_COLUMNS,
    QuantSetting,
    default_settings,
    fake_quantize,
    holdout_gain,
    linear_weights,
    quantize_sweep,
    quantized,
)
from scsuperweight.runners.scgpt import masked_batches

W2 = "transformer_encoder.layers.1.linear2.weight"


def _state_hash(m) -> str:
    h = hashlib.sha256()
    for k, v in m.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def planted():
    m = tiny_model(1)
    tok = tiny_tokens(m, 16, 1)
    plain, masked = list(iter_batches(tok, 8)), masked_batches(tok, batch_size=8)
    plant_cls_superweight(m, plain, 1, 5, 10, magnitude=200.0)
    return m, plain, masked


def test_rounding_levels_and_granularity():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    for s in (QuantSetting(4, "tensor", None), QuantSetting(4, "row", None), QuantSetting(4, "block", 32)):
        q = fake_quantize(w, s)
        groups = {"tensor": q.reshape(1, -1), "row": q, "block": q.reshape(-1, 32)}[s.granularity]
        src = {"tensor": w.reshape(1, -1), "row": w, "block": w.reshape(-1, 32)}[s.granularity]
        for g, x in zip(groups, src):
            scale = float(x.abs().max()) / 7
            levels = torch.round(g / scale)
            assert torch.allclose(levels * scale, g, atol=1e-5)  # every value is a multiple of its group's scale
            assert levels.abs().max() <= 7
            assert float((g - x).abs().max()) <= scale / 2 + 1e-6  # round to nearest
    # INT8 is finer than INT4; finer groups are never worse than one scale for the tensor
    e8 = (fake_quantize(w, QuantSetting(8, "tensor", None)) - w).norm()
    e4 = (fake_quantize(w, QuantSetting(4, "tensor", None)) - w).norm()
    assert e8 < e4 / 8
    # a block size that does not divide the tensor pads the last block and still returns the shape
    assert fake_quantize(w, QuantSetting(4, "block", 100)).shape == w.shape


def test_clipping_never_worse_by_mse_and_clips_the_outlier():
    torch.manual_seed(1)
    w = torch.randn(4, 256) * 0.05
    w[0, 3] = 5.0  # one outlier per tensor
    plain = fake_quantize(w, QuantSetting(4, "row", None))
    mse = fake_quantize(w, QuantSetting(4, "row", None, clip="mse"))
    assert ((mse - w) ** 2).sum(1).le(((plain - w) ** 2).sum(1) + 1e-9).all()
    pct = fake_quantize(w, QuantSetting(4, "row", None, clip="percentile", percentile=99.0))
    assert float(pct[0, 3]) < 1.0  # the percentile scale clips the outlier ...
    assert float((pct[1] - w[1]).abs().mean()) < float((plain[1] - w[1]).abs().mean()) * 1.5  # ... rows stay fine


def test_holdout_keeps_outlier_and_rescues_its_block():
    torch.manual_seed(2)
    w = torch.randn(32, 64) * 0.1
    w[5, 10] = 400.0
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep[5, 10] = True
    big = QuantSetting(4, "block", 4096)
    q = fake_quantize(w, big, keep)  # holdout=False: the mask is ignored
    others = ~keep
    assert float(q[5, 10]) == pytest.approx(400.0)  # the maximum is exact ...
    assert bool((q[others] == 0).all())  # ... and every other weight of the block rounds to 0 (scale 400/7)
    qh = fake_quantize(w, QuantSetting(4, "block", 4096, holdout=True), keep)
    assert float(qh[5, 10]) == 400.0
    err_h, err = (qh - w)[others].norm(), (q - w)[others].norm()
    assert err_h < 0.2 * err


def test_context_restores_bit_for_bit(planted):
    m, plain, _ = planted
    before = _state_hash(m)
    s = QuantSetting(4, "block", 64, holdout=True, clip="mse")
    with quantized(m, s, [(W2, (5, 10))]) as q:
        assert _state_hash(m) != before
        assert float(m.get_parameter(W2).detach()[5, 10]) == float(q.tensors[W2][5, 10])
        assert q.info["n_held_out"] == 1
    assert _state_hash(m) == before
    with pytest.raises(RuntimeError, match="inside"), quantized(m, s):
        raise RuntimeError("error inside")
    assert _state_hash(m) == before
    names = linear_weights(m)
    assert W2 in names and "transformer_encoder.layers.0.self_attn.in_proj_weight" in names
    assert "transformer_encoder.layers.0.self_attn.out_proj.weight" in names


def test_sweep_holding_out_the_planted_weight_helps_at_large_blocks(planted):
    m, plain, masked = planted
    before = _state_hash(m)
    settings = [QuantSetting(4, "block", bs, hold) for bs in (64, 4096) for hold in (False, True)]
    labels = np.arange(16) % 2
    df = quantize_sweep(m, plain, masked, [(W2, (5, 10))], settings, labels, k=3, params=[W2])
    assert _state_hash(m) == before
    assert list(df.columns) == QUANTIZE_COLUMNS
    assert df.loc[0, "setting"] == "full_precision" and df.loc[0, "cls_cosine"] == 1.0
    loss = df.set_index("setting")["cls_cosine"].rsub(1.0)  # 1 - cosine to full precision
    # at a block of the whole matrix the planted scalar sets the scale and the rest of its matrix rounds to 0:
    # holding it out removes almost all of the damage
    assert loss["int4/block4096/holdout"] < 0.1 * loss["int4/block4096"]
    # and the damage without holdout grows with the block size (the planted answer: one block is hit at 64)
    assert loss["int4/block4096"] > 2 * loss["int4/block64"]
    recon = df.set_index("setting")["recon_delta"].abs()
    assert recon["int4/block4096/holdout"] < recon["int4/block4096"]
    gain = holdout_gain(df)
    assert len(gain) == 2 and (gain["gain"] > 0).all()
    assert df["knn_accuracy"].between(0, 1).all()


def test_default_grid_covers_the_issue():
    s = default_settings()
    names = {x.name for x in s}
    assert {"int8/tensor", "int4/row/holdout", "int4/block4096/holdout/clip-mse", "int8/block64"} <= names
    assert len(names) == len(s) == 2 * (2 + 4) * 2 * 2
    with pytest.raises(ValueError, match="granularity"):
        QuantSetting(4, "column")
