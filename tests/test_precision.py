"""bf16 forwards agree with fp32 where it matters (embeddings, the planted candidate, reconstruction error), on CPU
here and on CUDA when one is present; asking for CUDA on a CPU-only torch is one clear error."""

import numpy as np
import pytest
import torch
from _plant import plant_cls_superweight, tiny_model, tiny_tokens

from scsuperweight.checks import check_device
from scsuperweight.data import iter_batches
from scsuperweight.detect import find_superweights
from scsuperweight.errors import DataError, OptionError
from scsuperweight.precision import float32_outputs, forward_precision, parse_dtype
from scsuperweight.runners.scgpt import embed, reconstruction

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="no CUDA GPU on this machine"))]


@pytest.fixture(scope="module")
def planted():
    m = tiny_model(21, nlayers=3)
    tok = tiny_tokens(m, n_cells=24, seed=21)
    plain = list(iter_batches(tok, 12))
    plant_cls_superweight(m, plain, 1, 6, 17, magnitude=300.0)
    return m, tok, plain


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_matches_fp32(planted, device):
    m, tok, plain = planted
    m = m.to(device)
    try:
        e32 = embed(m, tok, batch_size=12)
        with forward_precision(m, "bf16"):
            e16 = embed(m, tok, batch_size=12)
            d16 = find_superweights(m, plain)
            r16 = reconstruction(m, list(iter_batches(tok, 12, mask_ratio=0.3)))
        d32 = find_superweights(m, plain)
        r32 = reconstruction(m, list(iter_batches(tok, 12, mask_ratio=0.3)))
    finally:
        m.to("cpu")
    assert e16.dtype == np.float32 and not np.array_equal(e16, e32)  # it did run in bf16 ...
    assert (e16 * e32).sum(1).min() > 0.999  # ... and the cell embeddings point the same way
    top = lambda d: tuple(d.iloc[0][["kind", "layer", "row", "col", "token"]])  # noqa: E731
    assert top(d16) == top(d32) == ("ffn_down", 1, 6, 17, "<cls>")
    prim = lambda d: set(d[d["above_threshold"] & d["primary"]]["candidate"])  # noqa: E731
    assert prim(d16) == prim(d32)
    assert np.nanmean(r16["gepc_mse"]) == pytest.approx(np.nanmean(r32["gepc_mse"]), rel=0.02)


def test_edits_inside_an_autocast_region_are_seen(planted):
    m, tok, plain = planted
    from scsuperweight.instrument import edit

    b = plain[0]
    with forward_precision(m, "bf16"), torch.no_grad():
        before = m(b.src, b.values, b.padding_mask)["cell_emb"]
        with edit(m, [("transformer_encoder.layers.1.linear2.weight", (6, 17))]):
            after = m(b.src, b.values, b.padding_mask)["cell_emb"]
    assert not torch.allclose(before, after, atol=1e-2)


def test_parse_dtype_and_outputs():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(DataError, match="`dtype` must be one of"):
        parse_dtype("int8")
    out = float32_outputs({"a": torch.ones(2, dtype=torch.bfloat16), "ids": torch.ones(2, dtype=torch.long)})
    assert out["a"].dtype == torch.float32 and out["ids"].dtype == torch.long


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_only_torch_is_one_clear_error():
    with pytest.raises(OptionError) as e:
        check_device("cuda")
    assert "--device cpu" in str(e.value) and "\n" not in str(e.value)
    assert check_device(None) == "cpu"
