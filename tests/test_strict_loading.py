"""Strict and sane loading (issue 16, req 3): every way a checkpoint can load into silently wrong results is refused
with one line that names the tensor, key, gene or args.json field at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import scsuperweight as ssw
from scsuperweight.errors import CheckpointError
from scsuperweight.models import save_scgpt
from scsuperweight.models.checkpoint import check_args, check_vocab
from tests.test_checkpoint import load_state, make_model


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_scgpt(make_model(), tmp_path / "model")


def refused(path) -> str:
    with pytest.raises(CheckpointError) as info:
        ssw.load_model(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- official scGPT directories

def test_nan_weight_is_named(ckpt):
    state = load_state(ckpt)
    state["transformer_encoder.layers.1.linear2.weight"][3, 5] = float("nan")
    state["decoder.fc.0.bias"][0] = float("inf")
    torch.save(state, ckpt / "best_model.pt")
    msg = refused(ckpt)
    assert "non-finite weights" in msg and "2 tensor(s)" in msg
    assert "transformer_encoder.layers.1.linear2.weight (1 of 512)" in msg and "decoder.fc.0.bias (1 of" in msg


def test_duplicate_vocab_ids_name_the_genes(ckpt):
    edit_json(ckpt / "vocab.json", G5=3)  # G3 and G5 share id 3; id 5 is nobody's
    msg = refused(ckpt)
    assert "same id" in msg and "id 3: 'G3', 'G5'" in msg


def test_vocab_id_beyond_embedding_is_named(ckpt):
    vocab = json.loads((ckpt / "vocab.json").read_text())
    vocab["G4"] = 99  # id 4 freed, 99 >= 20 rows
    (ckpt / "vocab.json").write_text(json.dumps(vocab))
    msg = refused(ckpt)
    assert "outside the gene embedding's rows 0..19" in msg and "'G4': 99" in msg


def test_negative_vocab_id_is_named(ckpt):
    edit_json(ckpt / "vocab.json", G4=-1)
    assert "'G4': -1" in refused(ckpt)


@pytest.mark.parametrize("field, value, expected", [
    ("nheads", "eight", "an integer"),
    ("nheads", 2.5, "an integer"),
    ("nheads", True, "an integer"),
    ("dropout", "0.1", "a number"),
    ("pad_token", 0, "a string"),
    ("n_bins", None, "an integer"),
    ("MVC", "yes", "true or false"),
])
def test_args_field_of_wrong_type_is_named(ckpt, field, value, expected):
    edit_json(ckpt / "args.json", **{field: value})
    msg = refused(ckpt)
    assert f"field {field!r} is {json.dumps(value)}" in msg and f"expected {expected}" in msg
    assert str(ckpt / "args.json") in msg and "invalid literal" not in msg


def test_args_integral_float_is_accepted_and_range_is_checked(ckpt):
    check_args({"nheads": 2.0, "dropout": 0, "MVC": False})  # 2.0 is still 2; an int is a number
    edit_json(ckpt / "args.json", nheads=0)
    assert "field 'nheads' is 0; it must be at least 1" in refused(ckpt)


def test_args_sizes_disagreeing_with_weights_are_refused(ckpt):
    # a file that lost its last block would otherwise load as a shallower model
    state = {k: v for k, v in load_state(ckpt).items() if not k.startswith("transformer_encoder.layers.2.")}
    torch.save(state, ckpt / "best_model.pt")
    msg = refused(ckpt)
    assert "nlayers 3 in args.json vs 2 in the weights" in msg


def test_good_checkpoint_still_loads(ckpt):
    assert ssw.load_model(ckpt).config.nlayers == 3
    check_vocab({"a": 0, "b": 1}, 2)  # no error


# ---------------------------------------------------------------- transformers directories

def tiny_bert_dir(tmp_path: Path, layers: int = 2) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    d = tmp_path / f"bert{layers}"
    BertForMaskedLM(cfg).save_pretrained(d)
    return d


@pytest.fixture
def bert(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tiny_bert_dir(tmp_path)


def test_transformers_config_with_more_layers_than_weights(bert):
    edit_json(bert / "config.json", num_hidden_layers=3)
    msg = refused(bert)
    assert "does not match its config.json" in msg and "3 layers" in msg
    assert "missing keys 16" in msg and "bert.encoder.layer.2.attention.output.LayerNorm.bias" in msg


def test_transformers_config_with_fewer_layers_than_weights(bert):
    edit_json(bert / "config.json", num_hidden_layers=1)
    msg = refused(bert)
    assert "unexpected keys 16" in msg and "bert.encoder.layer.1." in msg and "missing keys 0 []" in msg


def test_transformers_shape_mismatch_is_listed_not_reinitialised(bert):
    edit_json(bert / "config.json", intermediate_size=24)
    msg = refused(bert)
    assert "shape mismatches 6" in msg
    assert "bert.encoder.layer.0.intermediate.dense.weight: file (32, 16) vs model (24, 16)" in msg


def test_transformers_nan_weight_is_named(bert):
    from safetensors.torch import load_file, save_file

    state = load_file(bert / "model.safetensors")
    key = "bert.encoder.layer.1.output.dense.weight"
    state[key][0, 0] = float("nan")
    save_file(state, bert / "model.safetensors", metadata={"format": "pt"})
    msg = refused(bert)
    assert "non-finite" in msg and f"{key} (1 of 512)" in msg


def test_transformers_head_not_built_is_tolerated(bert, tmp_path):
    # a masked-LM checkpoint whose config names no head class is read with AutoModel: its cls.* head is unused
    # and the pooler it lacks is never read, so this loads
    other = tmp_path / "nohead"
    shutil.copytree(bert, other)
    edit_json(other / "config.json", architectures=None)
    model = ssw.load_model(other)
    assert type(model).__name__ == "BertModel"
    assert torch.isfinite(model.embeddings.word_embeddings.weight).all()


def test_transformers_legacy_position_ids_buffer_is_not_an_error(bert):
    # older transformers saved `embeddings.position_ids` (Geneformer's published weights have it): not a weight
    from safetensors.torch import load_file, save_file

    state = load_file(bert / "model.safetensors")
    state["bert.embeddings.position_ids"] = torch.arange(32)[None]
    save_file(state, bert / "model.safetensors", metadata={"format": "pt"})
    assert ssw.load_model(bert).config.num_hidden_layers == 2


# ---------------------------------------------------------------- Geneformer token dictionaries

def _gf_inputs():
    import anndata as ad
    import numpy as np

    ids = [f"ENSG{i:011d}" for i in range(6)]
    adata = ad.AnnData(np.arange(1, 19, dtype=np.float32).reshape(3, 6))
    adata.var_names = ids
    vocab = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(ids)}}
    return adata, vocab, {g: 1.0 for g in ids}


def test_geneformer_token_ids_shared_by_two_genes_are_refused():
    from scsuperweight.data.geneformer import tokenize_geneformer
    from scsuperweight.errors import DataError

    adata, vocab, medians = _gf_inputs()
    vocab["ENSG00000000004"] = vocab["ENSG00000000001"]
    with pytest.raises(DataError, match=r"id 3 to \['ENSG00000000001', 'ENSG00000000004'\]") as info:
        tokenize_geneformer(adata, vocab, medians)
    assert "\n" not in str(info.value)


def test_geneformer_token_id_beyond_the_embedding_is_refused(bert):
    from scsuperweight.data.geneformer import tokenize_geneformer
    from scsuperweight.errors import DataError

    adata, vocab, medians = _gf_inputs()
    model = ssw.load_model(bert)  # an embedding of 40 rows
    assert tokenize_geneformer(adata, vocab, medians, model=model).n_cells == 3
    vocab["ENSG00000000005"] = 40
    with pytest.raises(DataError, match=r"beyond the model's embedding of 40 rows \(largest 40, for "
                                        r"'ENSG00000000005'\)"):
        tokenize_geneformer(adata, vocab, medians, model=model)
    vocab["ENSG00000000005"] = 2.5
    with pytest.raises(DataError, match="has id 2.5; ids must be whole numbers"):
        tokenize_geneformer(adata, vocab, medians)
