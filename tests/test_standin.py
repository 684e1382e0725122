"""The stand-in checkpoint has the published shapes and loads like an official one; a planted weight is found."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scsuperweight import _keys as K
from scsuperweight import load_model
from scsuperweight.data import iter_batches, tokenize_counts
from scsuperweight.detect import find_superweights
from scsuperweight.errors import DataError
from scsuperweight.standin import (
    FILLER_PREFIX,
    build_standin,
    bundled_genes,
    parameter_count,
    plant_superweight,
    standin_model,
)


def _published_count(ntoken=60_697, d=512, d_hid=512, nlayers=12) -> int:
    """Parameters of scGPT's TransformerModel counted by hand from its layers (weights + biases)."""
    lin = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    ln = 2 * d
    encoders = ntoken * d + ln + lin(1, d) + lin(d, d) + ln  # gene embedding + norm, value encoder
    block = lin(d, 3 * d) + lin(d, d) + lin(d, d_hid) + lin(d_hid, d) + 2 * ln  # qkv, out_proj, FFN, 2 norms
    expr = lin(d, d) + lin(d, d) + lin(d, 1)
    mvc = lin(d, d) + lin(d, d, bias=False)
    return encoders + nlayers * block + expr + mvc


@pytest.mark.slow
def test_human_standin_has_the_published_shapes(tmp_path):
    path = build_standin(tmp_path / "human", size="human", seed=1)
    assert {p.name for p in path.iterdir()} >= {"args.json", "vocab.json", "best_model.pt"}
    m = load_model(path)
    c = m.config
    assert (c.ntoken, c.d_model, c.nhead, c.d_hid, c.nlayers) == (60_697, 512, 8, 512, 12)
    n = parameter_count(m)
    assert n == _published_count() == 51_329_025
    assert round(n / 1e6, 1) == 51.3  # the figure
    state = torch.load(path / "best_model.pt", weights_only=True)
    assert "transformer_encoder.layers.0.self_attn.Wqkv.weight" in state  # the published key style


def test_vocab_real_genes_first_then_fillers_then_specials():
    m = standin_model("tiny", genes=["APOE", "TREM2", "APOE", "<cls>"])
    names = list(m.vocab)
    assert names[:2] == ["APOE", "TREM2"] and names[2] == f"{FILLER_PREFIX}00000"
    assert names[-3:] == ["<pad>", "<cls>", "<eoc>"] and len(names) == m.config.ntoken == 1_200
    assert sorted(m.vocab.values()) == list(range(1_200))
    default = standin_model("tiny").vocab
    assert {"APOE", "TREM2", "GFAP", "SNAP25"} <= set(default) and len(bundled_genes()) > 1000


def test_same_seed_same_weights_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b = standin_model("tiny", seed=4), standin_model("tiny", seed=4)
    assert torch.equal(torch.rand(3), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = standin_model("tiny", seed=5)
    assert not torch.equal(a.encoder.embedding.weight, c.encoder.embedding.weight)


def test_unknown_size_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="`size` must be one of"):
        build_standin(tmp_path, size="brain")


def _cells(model, n=16, seed=0):
    genes = np.array([i for n_, i in model.vocab.items() if not n_.startswith(("<", FILLER_PREFIX))])
    rng = np.random.default_rng(seed)
    X = sp.random(n, len(genes), density=0.3, random_state=seed,
                  data_rvs=lambda k: rng.poisson(3, k) + 1).tocsr().astype(np.float32)
    tok = tokenize_counts(X, genes, cls_token_id=model.vocab["<cls>"], pad_token_id=model.config.pad_token_id,
                          max_seq_len=96, seed=seed)
    return list(iter_batches(tok, 8))


def test_planted_tiny_standin_is_the_detectors_top_candidate(tmp_path):
    path = build_standin(tmp_path / "tiny", size="tiny", seed=2, plant={"layer": 1, "row": 9, "col": 21})
    recorded = json.loads((path / "args.json").read_text())["standin_plant"]
    assert (recorded["layer"], recorded["row"], recorded["col"]) == (1, 9, 21)
    m = load_model(path)
    for batches in (_cells(m), None):  # real-gene cells never seen by the calibration, and the data-free mode
        df = find_superweights(m, batches) if batches else find_superweights(m, mode="data_free", n_tokens=200)
        top = df.iloc[0]
        assert (top["kind"], top["layer"], top["row"], top["col"], top["token"]) == \
            (K.KIND_FFN_DOWN, 1, 9, 21, "<cls>")
        assert top["candidate"] == recorded["candidate"] and bool(top["above_threshold"])
    unplanted = load_model(build_standin(tmp_path / "plain", size="tiny", seed=2))
    df = find_superweights(unplanted, _cells(unplanted))
    assert not df["above_threshold"].any() if len(df) else True


def test_plant_value_and_bad_coordinates():
    m = standin_model("tiny", seed=0)
    p = plant_superweight(m, layer=3, row=1, col=2, value=77.0)
    assert m.transformer_encoder.layers[3].linear2.weight[1, 2].item() == p.value == 77.0
    assert p.margin > 0 and 0 < p.activation < 1
    with pytest.raises(DataError, match="outside linear2.weight"):
        plant_superweight(m, layer=0, row=64, col=0)
    with pytest.raises(DataError, match="`layer` must be in"):
        plant_superweight(m, layer=4, row=0, col=0)
