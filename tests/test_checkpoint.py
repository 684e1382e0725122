"""Official-format checkpoint I/O: exact round trips, and one clear message for each way a directory can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import scsuperweight as ssw
from scsuperweight.errors import CheckpointError
from scsuperweight.models import ScGPTConfig, ScGPTModel, load_scgpt, save_scgpt

D, NHEAD, D_HID, NLAYERS = 16, 2, 32, 3


def make_vocab(n_genes: int = 17) -> dict[str, int]:
    names = [f"G{i}" for i in range(n_genes)] + ["<pad>", "<cls>", "<eoc>"]
    return {g: i for i, g in enumerate(names)}


def make_model(seed: int = 0, **overrides) -> ScGPTModel:
    vocab = make_vocab()
    kw = dict(ntoken=len(vocab), d_model=D, nhead=NHEAD, d_hid=D_HID, nlayers=NLAYERS, dropout=0.0,
              pad_token_id=vocab["<pad>"])
    kw.update(overrides)
    torch.manual_seed(seed)
    model = ScGPTModel(ScGPTConfig(**kw), vocab=vocab, args={"max_seq_len": 1200, "input_style": "binned"})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial LayerNorm gains/biases, so a swapped tensor cannot go unnoticed
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_scgpt(make_model(), tmp_path / "model")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "best_model.pt", weights_only=True)


def message(path, loader=ssw.load_model) -> str:
    with pytest.raises(CheckpointError) as info:
        loader(path)
    return str(info.value)


# ---------------------------------------------------------------- round trip

@pytest.mark.parametrize("flash_keys", [True, False], ids=["Wqkv", "in_proj"])
@pytest.mark.parametrize("overrides", [
    {},
    {"n_cls": 4, "n_layers_cls": 3, "explicit_zero_prob": True},
    {"n_cls": 2, "n_layers_cls": 2, "mvc": False},
], ids=["published", "cls+zero_prob", "no_mvc"])
def test_round_trip_is_bit_exact(tmp_path, flash_keys, overrides):
    model = make_model(**overrides)
    path = save_scgpt(model, tmp_path / "m", flash_keys=flash_keys)
    keys = set(load_state(path))
    attn = {k for k in keys if ".self_attn." in k and "out_proj" not in k}
    assert all(("Wqkv" in k) == flash_keys and ("in_proj" in k) != flash_keys for k in attn)

    loaded = ssw.load_model(path)
    ref, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    for field in ("ntoken", "d_model", "nhead", "d_hid", "nlayers", "pad_token_id", "pad_value", "mask_value",
                  "n_bins", "mvc", "explicit_zero_prob", "n_cls", "n_layers_cls"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    assert loaded.vocab == model.vocab
    assert loaded.args["max_seq_len"] == 1200 and loaded.args["nheads"] == NHEAD

    src = torch.tensor([[18, 3, 5, 7, 17], [18, 1, 2, 17, 17]])
    values = torch.tensor([[-2.0, 1, 50, 3, -2], [-2, 7, 9, -2, -2]])
    mask = src.eq(17)
    with torch.no_grad():
        a, b = model(src, values, mask, MVC=True, CLS=True), loaded(src, values, mask, MVC=True, CLS=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_again_gives_identical_tensors(ckpt, tmp_path):
    again = save_scgpt(ssw.load_model(ckpt), tmp_path / "again")
    s1, s2 = load_state(ckpt), load_state(again)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert json.loads((again / "vocab.json").read_text()) == json.loads((ckpt / "vocab.json").read_text())


# ---------------------------------------------------------------- missing things

def test_missing_directory(tmp_path):
    msg = message(tmp_path / "nowhere")
    assert "model path not found" in msg and "nowhere" in msg
    msg = message(tmp_path / "nowhere", loader=load_scgpt)
    assert "model directory not found" in msg and "args.json" in msg


def test_directory_of_something_else(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    msg = message(tmp_path)
    assert "neither an official scGPT directory" in msg and "notes.txt" in msg


@pytest.mark.parametrize("name, expected", [
    ("args.json", "args.json not found"),
    ("vocab.json", "vocab.json not found"),
    ("best_model.pt", "weights file not found"),
])
def test_missing_file(ckpt, name, expected):
    (ckpt / name).unlink()
    msg = message(ckpt)
    assert expected in msg and str(ckpt / name) in msg


# ---------------------------------------------------------------- malformed JSON

@pytest.mark.parametrize("name", ["args.json", "vocab.json"])
def test_malformed_json_names_file_and_line(ckpt, name):
    (ckpt / name).write_text('{\n  "embsize": 16,\n  "nheads" 2\n}\n')  # missing colon on line 3
    msg = message(ckpt)
    assert str(ckpt / name) in msg and "not valid JSON" in msg and "line 3" in msg


def test_args_not_an_object(ckpt):
    (ckpt / "args.json").write_text("[1, 2]")
    assert "must hold a JSON object" in message(ckpt)


def test_vocab_values_not_integers(ckpt):
    vocab = json.loads((ckpt / "vocab.json").read_text())
    vocab["G0"] = "zero"
    (ckpt / "vocab.json").write_text(json.dumps(vocab))
    msg = message(ckpt)
    assert "vocab.json" in msg and "integer ids" in msg


# ---------------------------------------------------------------- inconsistent contents

def test_missing_nheads(ckpt):
    args = json.loads((ckpt / "args.json").read_text())
    del args["nheads"]
    (ckpt / "args.json").write_text(json.dumps(args))
    msg = message(ckpt)
    assert "'nheads'" in msg and "args.json" in msg and "cannot be derived" in msg


def test_nheads_not_dividing_d_model(ckpt):
    args = json.loads((ckpt / "args.json").read_text())
    args["nheads"] = 3
    (ckpt / "args.json").write_text(json.dumps(args))
    with pytest.raises(ValueError, match=r"d_model=16 is not divisible by nhead=3.*nheads"):
        ssw.load_model(ckpt)


def test_vocab_size_differs_from_embedding(ckpt):
    vocab = json.loads((ckpt / "vocab.json").read_text())
    del vocab["G3"]
    (ckpt / "vocab.json").write_text(json.dumps(vocab))
    msg = message(ckpt)
    assert "vocab.json has 19 entries" in msg and "20 rows" in msg


class _Trap:
    """Unpickling this would create a file: the loader must refuse before running it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_whole_module_pickle_is_refused(ckpt):
    torch.save(make_model(), ckpt / "best_model.pt")
    msg = message(ckpt)
    assert "not a plain state dict" in msg and "weights_only=True" in msg and "state_dict()" in msg


def test_arbitrary_pickle_is_never_executed(ckpt, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"encoder.embedding.weight": _Trap(marker)}, ckpt / "best_model.pt")
    assert "not a plain state dict" in message(ckpt)
    assert not marker.exists()


def test_wrapped_state_dict(ckpt):
    torch.save({"model_state_dict": load_state(ckpt), "epoch": 3}, ckpt / "best_model.pt")
    msg = message(ckpt)
    assert "'model_state_dict'" in msg and "not a flat state dict" in msg and "save that inner dict" in msg


def test_unexpected_and_missing_keys_are_listed(ckpt):
    state = load_state(ckpt)
    state["foo.weight"] = torch.zeros(2)
    del state["decoder.fc.2.bias"]
    del state["transformer_encoder.layers.1.norm2.bias"]
    torch.save(state, ckpt / "best_model.pt")
    msg = message(ckpt)
    assert "missing keys ['decoder.fc.2.bias', 'transformer_encoder.layers.1.norm2.bias']" in msg
    assert "unexpected keys ['foo.weight']" in msg
    assert "Nothing was loaded" in msg


def test_missing_first_block_ffn_is_listed(ckpt):
    state = load_state(ckpt)
    del state["transformer_encoder.layers.0.linear1.weight"]
    torch.save(state, ckpt / "best_model.pt")
    assert "missing keys ['transformer_encoder.layers.0.linear1.weight']" in message(ckpt)


def test_missing_block_in_the_middle_is_listed(ckpt):
    state = {k: v for k, v in load_state(ckpt).items() if not k.startswith("transformer_encoder.layers.1.")}
    torch.save(state, ckpt / "best_model.pt")
    msg = message(ckpt)
    assert "transformer_encoder.layers.1.self_attn.Wqkv.weight" not in msg  # reported under torch's name
    assert "'transformer_encoder.layers.1.self_attn.in_proj_weight'" in msg
    assert "'transformer_encoder.layers.1.linear2.weight'" in msg


def test_shape_mismatch_between_layers(ckpt):
    state = load_state(ckpt)
    narrow = 24
    state["transformer_encoder.layers.2.linear1.weight"] = torch.zeros(narrow, D)
    state["transformer_encoder.layers.2.linear1.bias"] = torch.zeros(narrow)
    state["transformer_encoder.layers.2.linear2.weight"] = torch.zeros(D, narrow)
    torch.save(state, ckpt / "best_model.pt")
    msg = message(ckpt)
    assert "inconsistent shapes" in msg
    assert "transformer_encoder.layers.2.linear1.weight: file (24, 16) vs model (32, 16)" in msg
    assert "transformer_encoder.layers.2.linear1.bias: file (24,) vs model (32,)" in msg
    assert "transformer_encoder.layers.2.linear2.weight: file (16, 24) vs model (16, 32)" in msg
    assert "layers.0" not in msg and "layers.1" not in msg


def test_batch_conditioned_checkpoint_is_refused(ckpt):
    state = load_state(ckpt)
    state["batch_encoder.embedding.weight"] = torch.zeros(3, D)
    torch.save(state, ckpt / "best_model.pt")
    assert "fine-tuned with batch labels" in message(ckpt)


def test_flash_extras_are_dropped_and_nothing_else(ckpt):
    state = load_state(ckpt)
    state["flag_encoder.weight"] = torch.ones(3, D)
    torch.save(state, ckpt / "best_model.pt")
    loaded = ssw.load_model(ckpt)
    assert "flag_encoder.weight" not in loaded.state_dict()
    assert torch.equal(loaded.state_dict()["transformer_encoder.layers.0.self_attn.in_proj_weight"],
                       state["transformer_encoder.layers.0.self_attn.Wqkv.weight"])
