"""The same machinery on transformers models: BERT/Geneformer and Llama adapters, offline loading, planted super
weights found at their exact coordinates, LN/RMSNorm candidates, exact edits, masked-LM evaluation, and Geneformer
rank-value encoding (checked against a slow per-cell reference, then run on real cells)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import transformers
from transformers import BatchEncoding, BertConfig, BertForMaskedLM, BertModel, LlamaConfig, LlamaForCausalLM

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight.adapters import get_adapter
from scsuperweight.adapters.hf import hf_adapter
from scsuperweight.data.geneformer import (
    CellBatch,
    geneformer_batches,
    mask_batches,
    rank_value_encode,
    read_gene_dictionary,
    tokenize_geneformer,
)
from scsuperweight.detect import find_superweights, scan
from scsuperweight.errors import CheckpointError, DataError, HookError
from scsuperweight.instrument import ActivationPatch, Trace, edit
from scsuperweight.runners.hf import embed_cells, evaluate_mlm

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NAMES = {0: "[PAD]", 1: "[CLS]", 2: "[SEP]", 3: "[MASK]"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: thread start-up costs more than it saves, and a busy machine makes it far worse
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def tiny_bert(seed: int = 0, *, layers: int = 3, vocab: int = 200, max_pos: int = 512, head: bool = True):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=max_pos, pad_token_id=0)
    m = (BertForMaskedLM(cfg) if head else BertModel(cfg)).eval()
    get_adapter(m).id_to_token = NAMES
    return m


def tiny_llama(seed: int = 0, *, layers: int = 3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=512, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg).eval()
    get_adapter(m).id_to_token = {0: "<pad>", 1: "<s>", 2: "</s>"}
    return m


def kwargs_batches(seed: int = 0, n: int = 4, size: int = 6, start: int = 1, vocab: int = 200) -> list[dict]:
    """Padded tokenizer-like batches (dicts of input_ids, attention_mask), every sequence starting with `start`."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lens = rng.integers(8, 30, size)
        ids = np.zeros((size, lens.max()), dtype=np.int64)
        am = np.zeros_like(ids)
        for i, L in enumerate(lens):
            ids[i, 0], ids[i, 1:L], am[i, :L] = start, rng.integers(4, vocab, L - 1), 1
        out.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(am)})
    return out


def _first_vs_rest(model, batches, site: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad(), Trace(model, [site], keep=[site], reductions=False) as tr:
        for b in batches:
            tr.run(b)
    first, rest = [], []
    for x, b in zip(tr.full[site], batches):
        am = b["attention_mask"].bool()
        first.append(x[:, 0])
        rest.append(x[:, 1:][am[:, 1:]])
    return torch.cat(first).double(), torch.cat(rest).double()


@torch.no_grad()
def plant_first_token(model, batches, layer: int, row: int, hidden: int, magnitude: float = 200.0) -> float:
    """A super weight: FFN hidden unit `hidden` of block `layer` fires on the first token (BERT: only there, via a
    bias threshold; Llama, whose MLP has no bias: most there), and ``down[row, hidden]`` turns that into a spike of
    about `magnitude` in channel `row` of the FFN output. Returns the unit's first-token selectivity."""
    ad = get_adapter(model)
    first, rest = _first_vs_rest(model, batches, f"L{layer}.ffn_in")
    w = first.mean(0) - rest.mean(0)
    w = w / w.norm()
    lo, hi = float((rest @ w).max()), float((first @ w).min())
    assert hi > lo, "first-token inputs are not separable along the mean difference"
    block = model.get_submodule(ad.block_name(layer))
    if ad.family == "bert":
        up, down = block.intermediate.dense, block.output.dense
        scale = 4.0 / (hi - lo)  # first token at >= +2, every other token at <= -2 before the GELU
        up.weight[hidden] = (w * scale).float()
        up.bias[hidden] = float(-(lo + hi) / 2 * scale)
    else:
        gate, up, down = block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj
        gate.weight[hidden] = (w * 8.0 / (hi - lo)).float()
        up.weight[hidden] = w.float()
    f2, r2 = _first_vs_rest(model, batches, f"L{layer}.ffn_hidden")
    act = float(f2[:, hidden].mean())
    down.weight[row, hidden] = magnitude / act
    return act / float(r2[:, hidden].abs().max())


def _state(model) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(torch.uint8).numpy().tobytes() for k, v in model.state_dict().items()}


# -- adapters ------------------------------------------------------------------------------------------------------
def test_bert_and_llama_sites_name_full_parameters():
    bert = get_adapter(tiny_bert(layers=2))
    assert (bert.family, bert.n_layers, bert.post_norm, bert.pad_token_id) == ("bert", 2, True, 0)
    assert bert.token_module == "bert.embeddings.word_embeddings"
    s = bert.sites["L1.ffn_out"]
    assert (s.module, s.io, s.proj_param, s.proj_input_site, s.next_norm) == (
        "bert.encoder.layer.1.output.dense", "out", "bert.encoder.layer.1.output.dense.weight", "L1.ffn_hidden",
        "bert.encoder.layer.1.output.LayerNorm")
    assert bert.sites["L1.ffn_hidden"].module == "bert.encoder.layer.1.output.dense"
    assert bert.sites["L1.ffn_in"].module == "bert.encoder.layer.1.intermediate.dense"
    assert bert.sites["L0.attn_out"].proj_input_site == "L0.attn_hidden"
    assert bert.sites["L0.norm1_out"].norm_bias == "bert.encoder.layer.0.attention.output.LayerNorm.bias"
    assert bert.sites["L0.norm2_in"].norm_weight == "bert.encoder.layer.0.output.LayerNorm.weight"
    assert bert.sites["emb.norm_out"].norm_weight == "bert.embeddings.LayerNorm.weight"
    assert bert.candidate_id("bert.encoder.layer.1.output.dense.weight", (3, 7)) == "L1.output.dense.w[3,7]"
    assert [bert.first_layer_of(p) for p in ("bert.encoder.layer.1.output.dense.weight",
                                             "bert.embeddings.LayerNorm.bias", "cls.predictions.bias")] == [1, -1, 2]
    # a bare encoder has the same sites without the "bert." prefix
    base = get_adapter(tiny_bert(layers=2, head=False))
    assert base.sites["L1.ffn_out"].proj_param == "encoder.layer.1.output.dense.weight"
    assert base.sites["emb.norm_out"].module == "embeddings.LayerNorm"

    llama = get_adapter(tiny_llama(layers=2))
    assert (llama.family, llama.n_layers, llama.post_norm) == ("llama", 2, False)
    assert llama.token_module == "model.embed_tokens"
    s = llama.sites["L0.ffn_out"]
    assert (s.module, s.proj_param, s.proj_input_site) == (
        "model.layers.0.mlp.down_proj", "model.layers.0.mlp.down_proj.weight", "L0.ffn_hidden")
    assert llama.sites["L0.ffn_in"].module == "model.layers.0.mlp"
    assert llama.sites["L0.attn_out"].proj_param == "model.layers.0.self_attn.o_proj.weight"
    for k, mod in (("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm")):
        site = llama.sites[f"L1.{k}_out"]
        assert (site.norm_weight, site.norm_bias) == (f"model.layers.1.{mod}.weight", None)  # RMSNorm: gain only
    assert llama.sites["final.norm_out"].norm_weight == "model.norm.weight"
    assert [llama.first_layer_of(p) for p in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight",
                                              "model.norm.weight")] == [0, -1, 2]
    assert llama.token_name(1) == "<s>" and llama.token_name(57) == "57"


def test_unknown_architecture_raises_clear_error():
    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(HookError, match=r"Mystery.*bert.*llama"):
        get_adapter(Mystery())
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(HookError, match="GPT2Model"):
        hf_adapter(gpt2)


def test_hooks_fire_under_eval_no_grad_with_attention_masks():
    for model in (tiny_bert(1), tiny_llama(1)):
        batches = kwargs_batches(1)
        with torch.no_grad(), Trace(model, "all") as tr:
            for b in batches:
                tr.run(b)
        ad = get_adapter(model)
        assert set(tr.stats) == set(ad.sites)  # every hook fired
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        for name in ("L0.ffn_out", "L2.block_out", "L1.norm2_in"):
            st = tr.stats[name]
            assert st.n_positions == n_tokens  # padding excluded
            assert st.n_cells == sum(len(b["input_ids"]) for b in batches)
            lens = torch.cat([b["attention_mask"].sum(1) for b in batches])
            assert bool((st.arg_pos < lens[st.arg_cell]).all())  # maxima sit on real tokens only


# -- detection -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "layer", "row", "hidden"), [("bert", 1, 5, 17), ("bert", 0, 30, 2),
                                                                  ("llama", 1, 5, 17), ("llama", 2, 11, 60)])
def test_planted_down_projection_superweight_is_found(family, layer, row, hidden):
    model = tiny_bert(2) if family == "bert" else tiny_llama(2)
    batches = kwargs_batches(2)
    selectivity = plant_first_token(model, batches, layer, row, hidden)
    assert selectivity > (20 if family == "bert" else 1.5)
    param = (f"bert.encoder.layer.{layer}.output.dense.weight" if family == "bert"
             else f"model.layers.{layer}.mlp.down_proj.weight")
    before = _state(model)
    first = "[CLS]" if family == "bert" else "<s>"
    for df in (find_superweights(model, batches),  # an iterable of kwargs dicts
               find_superweights(model, iter(batches)),  # a one-shot generator works too
               find_superweights(model, mode="data_free", n_tokens=60)):
        top = df.iloc[0]
        assert (top["kind"], top["param"], top["layer"], top["row"], top["col"]) == (
            K.KIND_FFN_DOWN, param, layer, row, hidden)
        assert top["token"] == first and bool(top["above_threshold"]) and top["spike"] > 100
        assert top["value"] == pytest.approx(float(model.get_parameter(param).detach()[row, hidden]))
        # (near-misses, reported down to 0.25x the threshold, are other spikes: only the passing round-0 rows count)
        ln = df[df["kind"].isin([K.KIND_LN_WEIGHT, K.KIND_LN_BIAS]) & (df["round"] == 0) & df["above_threshold"]]
        if family == "bert":  # post-norm: the LayerNorm receiving the write comes along, gain and bias
            nn = f"bert.encoder.layer.{layer}.output.LayerNorm"
            assert {(p, r) for p, r in zip(ln["param"], ln["row"])} >= {(f"{nn}.weight", row), (f"{nn}.bias", row)}
        else:  # pre-norm: a residual write names no norm
            assert ln.empty
    assert _state(model) == before  # detection leaves the model as it was
    # a tokenizer's BatchEncoding is one batch, not an iterable of keys
    one = BatchEncoding({k: v for k, v in batches[0].items()})
    assert find_superweights(model, one).iloc[0]["col"] == hidden


def test_norm_output_spike_gives_gain_candidates():
    bert = tiny_bert(3)
    with torch.no_grad():
        bert.bert.encoder.layer[2].output.LayerNorm.weight[9] = 300.0
    df = find_superweights(bert, kwargs_batches(3))
    p = "bert.encoder.layer.2.output.LayerNorm"
    top = df[df["above_threshold"] & df["primary"]]
    assert {(k, q, r) for k, q, r in zip(top["kind"], top["param"], top["row"])} >= {
        (K.KIND_LN_WEIGHT, f"{p}.weight", 9), (K.KIND_LN_BIAS, f"{p}.bias", 9)}
    assert df.iloc[0]["site"] == "L2.norm2_out" and pd_isna(df.iloc[0]["col"])

    llama = tiny_llama(3)
    blk = llama.model.layers[1]
    with torch.no_grad():
        blk.post_attention_layernorm.weight[4] = 300.0
        blk.mlp.gate_proj.weight[:, 4] = 0.0  # the MLP does not read the channel: the spike stays in the norm
        blk.mlp.up_proj.weight[:, 4] = 0.0
    df = find_superweights(llama, kwargs_batches(3))
    top = df.iloc[0]
    assert (top["kind"], top["param"], top["row"], top["site"]) == (
        K.KIND_LN_WEIGHT, "model.layers.1.post_attention_layernorm.weight", 4, "L1.norm2_out")
    assert not (df["kind"] == K.KIND_LN_BIAS).any()  # RMSNorm has no bias
    with edit(llama, df.head(1)):  # zeroing the gain removes the spike
        res = scan(llama, kwargs_batches(3), max_rounds=1)
    assert not (res.candidates["above_threshold"] & (res.candidates["site"] == "L1.norm2_out")).any()


def pd_isna(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


# -- edits and evaluation ------------------------------------------------------------------------------------------
def test_edits_and_patches_restore_bit_for_bit_also_after_an_error():
    for model in (tiny_bert(4), tiny_llama(4)):
        ad = get_adapter(model)
        b = kwargs_batches(4, n=1)[0]
        param = ad.sites["L1.ffn_out"].proj_param
        norm = ad.sites["L0.norm2_out"].norm_weight
        before = _state(model)
        with torch.no_grad():
            ref = ad.run(b).logits
            with edit(model, [(param, (3, 7)), (norm, (5,), 2.5)],
                      patches=[ActivationPatch("L1.ffn_out", 3, 50.0, positions="cls")]):
                assert float(model.get_parameter(param)[3, 7]) == 0.0
                changed = ad.run(b).logits
            assert not torch.equal(changed, ref)
            assert _state(model) == before
            assert torch.equal(ad.run(b).logits, ref)  # the patch hook is gone too
            with pytest.raises(RuntimeError, match="boom"), edit(model, [(param, (0, 0))], factor=3.0):
                raise RuntimeError("boom")
        assert _state(model) == before


def test_evaluate_mlm_matches_the_model_loss_and_sees_edits():
    model = tiny_bert(5)
    masked = mask_batches(kwargs_batches(5), mask_token_id=3, special_token_ids=NAMES, seed=1)
    for b in masked:
        eligible = b["attention_mask"].bool() & ~torch.isin(b["input_ids"], torch.tensor([0, 1, 2, 3]))
        assert bool(((b["labels"] != -100) <= (b["input_ids"] == 3)).all())
        assert bool(((b["labels"] != -100) <= (eligible | (b["input_ids"] == 3))).all())
        assert bool(((b["labels"] != -100).sum(1) >= 1).all())
        assert not bool((b["labels"][:, 0] != -100).any())  # [CLS] never masked
    again = mask_batches(kwargs_batches(5), mask_token_id=3, special_token_ids=NAMES, seed=1)
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(masked, again))  # seeded

    res = evaluate_mlm(model, masked)
    n = sum(len(b["input_ids"]) for b in masked)
    assert res["loss"].shape == (n,) and np.isfinite(res["loss"]).all()
    assert ((res["accuracy"] >= 0) & (res["accuracy"] <= 1)).all()
    with torch.no_grad():  # per-sequence losses, token-weighted, are the model's own mean loss
        for i, b in enumerate(masked):
            rows = slice(i * 6, (i + 1) * 6)
            mine = np.sum(res["loss"][rows] * res["n_masked"][rows]) / res["n_masked"][rows].sum()
            assert mine == pytest.approx(float(model(**b).loss), rel=1e-5)
    param = get_adapter(model).sites["L0.ffn_out"].proj_param
    cut = evaluate_mlm(model, masked, edits=[(param, (r, c)) for r in range(32) for c in range(64)])
    assert np.abs(cut["loss"] - res["loss"]).max() > 1e-3
    assert np.array_equal(evaluate_mlm(model, masked)["loss"], res["loss"])  # restored exactly
    # causal models: next-token loss, labels default to the unpadded input
    llama = tiny_llama(5)
    b = kwargs_batches(5, n=1)[0]
    out = evaluate_mlm(llama, [b])
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    with torch.no_grad():
        ref = float(llama(**b, labels=labels).loss)
    mine = np.sum(out["loss"] * out["n_masked"]) / out["n_masked"].sum()
    assert mine == pytest.approx(ref, rel=1e-5)
    with pytest.raises(HookError, match="language-modelling head"):
        evaluate_mlm(tiny_bert(head=False), masked)


# -- loading -------------------------------------------------------------------------------------------------------
def test_load_model_reads_transformers_directories_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    b = kwargs_batches(6, n=1)[0]
    for make, family, cls in ((tiny_bert, "bert", "BertForMaskedLM"), (tiny_llama, "llama", "LlamaForCausalLM")):
        model = make(6)
        d = tmp_path / family
        model.save_pretrained(d)
        loaded = ssw.load_model(d)
        assert type(loaded).__name__ == cls and not loaded.training
        assert loaded._ssw_format == f"transformers:{family}"
        assert get_adapter(loaded).family == family
        with torch.no_grad():
            assert torch.equal(loaded(**b).logits, model(**b).logits)
    # a tokenizer saved beside the weights names the tokens; its outputs are batches as they come
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(195)]]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(tmp_path / "bert")
    loaded = ssw.load_model(tmp_path / "bert")
    ad = get_adapter(loaded)
    assert (ad.token_name(2), ad.start_token_id) == ("[CLS]", 2) and {0, 2, 3, 4} <= ad.special_token_ids()
    enc = tokenizer(["w1 w2 w3", "w4 w5"], padding=True, return_tensors="pt", return_special_tokens_mask=True)
    with Trace(loaded, "L0.ffn_out") as tr, torch.no_grad():
        tr.run(enc)
    assert tr.stats["L0.ffn_out"].n_positions == int(enc["attention_mask"].sum()) == 9
    assert ad.synthetic_batch(10)["input_ids"][0, [0, -1]].tolist() == [2, 3]  # [CLS] ... [SEP]
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "bert" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights"):
        ssw.load_model(tmp_path / "noweights")


# -- Geneformer input ----------------------------------------------------------------------------------------------
def _slow_rank_value(X: np.ndarray, totals: np.ndarray, medians: np.ndarray, tokens: np.ndarray, k: int) -> list:
    """One cell at a time, the way Geneformer's tokenizer reads (ties broken by gene position)."""
    out = []
    for i in range(X.shape[0]):
        v = X[i] / totals[i] * 10_000 / medians
        nz = np.flatnonzero(X[i])
        order = sorted(nz, key=lambda j: (-v[j], j))
        out.append(tokens[np.array(order[:k], dtype=np.int64)])
    return out


def _toy_adata(seed: int = 0, n_cells: int = 40, n_genes: int = 300):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=0.2, random_state=seed, data_rvs=lambda n: rng.poisson(3, n) + 1)
    X = X.tocsr().astype(np.float32)
    X = X.tolil()
    X[3, 5], X[3, 6] = 7, 7  # a tie (equal medians below) broken by gene position
    X = X.tocsr()
    ens = np.array([f"ENSG{i:011d}" for i in range(n_genes)])
    var = pd.DataFrame({"ensembl_id": ens}, index=[f"SYM{i}" for i in range(n_genes)])
    return ad.AnnData(X, var=var), ens


def test_rank_value_encoding_matches_a_slow_reference(tmp_path):
    adata, ens = _toy_adata()
    rng = np.random.default_rng(1)
    medians = {g: float(m) for g, m in zip(ens, rng.uniform(0.5, 5.0, len(ens)))}
    medians[ens[5]] = medians[ens[6]] = 2.0
    in_dict = ens[rng.permutation(len(ens))[:250]]  # some genes are not in the dictionary
    vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: 4 + i for i, g in enumerate(in_dict)}}
    X = adata.X.toarray()
    totals = X.sum(1)
    keep = np.isin(ens, in_dict)
    tok_ids = np.array([vocab.get(g, -1) for g in ens])
    med = np.array([medians[g] for g in ens])
    for k in (10, 1000):
        ref = _slow_rank_value(X[:, keep], totals, med[keep], tok_ids[keep], k)
        indptr, tokens = rank_value_encode(sp.csr_matrix(X[:, keep]), tok_ids[keep], med[keep], n_counts=totals,
                                           max_genes=k, block_size=7)  # several row blocks
        assert all(np.array_equal(tokens[indptr[i]:indptr[i + 1]], r) for i, r in enumerate(ref))
    # the AnnData route: symbols in the index, Ensembl IDs in a var column; <cls> ... <eos>; a pickle of medians
    with open(tmp_path / "medians.pkl", "wb") as fh:
        pickle.dump({g: np.float64(v) for g, v in medians.items()}, fh)
    (tmp_path / "tokens.json").write_text(json.dumps(vocab))
    tok = tokenize_geneformer(adata, tmp_path / "tokens.json", tmp_path / "medians.pkl", model_input_size=12)
    ref = _slow_rank_value(X[:, keep], totals, med[keep], tok_ids[keep], 10)
    for i in range(adata.n_obs):
        assert np.array_equal(tok.cell(i), np.concatenate([[2], ref[i], [3]]))
    assert tok.token_names[vocab[in_dict[0]]] == f"SYM{list(ens).index(in_dict[0])}"
    no_cls = tokenize_geneformer(adata, {k: v for k, v in vocab.items() if k not in ("<cls>", "<eos>")}, medians,
                                 model_input_size=10)
    assert all(np.array_equal(no_cls.cell(i), ref[i]) for i in range(adata.n_obs))
    # batches: length buckets, right padding, cells remembered
    batches = geneformer_batches(tok, batch_size=8)
    assert sorted(np.concatenate([b.cells for b in batches]).tolist()) == list(range(adata.n_obs))
    for b in batches:
        for r, c in enumerate(b.cells):
            n = len(tok.cell(c))
            assert torch.equal(b["input_ids"][r, :n], torch.from_numpy(tok.cell(c)))
            assert int(b["attention_mask"][r].sum()) == n and bool((b["input_ids"][r, n:] == 0).all())


def test_gene_ids_and_dictionaries_fail_clearly(tmp_path):
    adata, ens = _toy_adata(n_genes=60)
    vocab = {"<pad>": 0, **{g: i + 1 for i, g in enumerate(ens)}}
    medians = dict.fromkeys(ens, 1.0)
    sym_only = adata.copy()
    del sym_only.var["ensembl_id"]
    with pytest.raises(DataError, match="gene symbols.*gene_id_key"):
        tokenize_geneformer(sym_only, vocab, medians)
    with pytest.raises(DataError, match="not a column"):
        tokenize_geneformer(adata, vocab, medians, gene_id_key="nope")
    with pytest.raises(DataError, match="symbol_key"):
        tokenize_geneformer(adata, vocab, medians, symbol_key="nope")
    by_index = adata.copy()
    by_index.var["symbol"] = by_index.var_names.to_numpy()
    by_index.var_names = [f"{g}.3" for g in ens]  # versioned Ensembl IDs as the index need no column
    a = tokenize_geneformer(by_index, vocab, medians, symbol_key="symbol")
    b = tokenize_geneformer(adata, vocab, medians, gene_id_key="ensembl_id")
    assert np.array_equal(a.tokens, b.tokens) and a.token_names == b.token_names
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"ENSG00000000001": Path("x")}, fh)  # any object beyond plain values is refused
    with pytest.raises(DataError, match="refusing to unpickle"):
        read_gene_dictionary(tmp_path / "evil.pkl")
    with pytest.raises(DataError, match="map strings to numbers"):
        read_gene_dictionary({"ENSG00000000001": "a"})


@pytest.fixture(scope="module")
def darmanis():
    p = SHARED_DATA / "darmanis2015_GSE67835.h5ad"
    if not p.is_file():
        pytest.skip(f"real-cell test needs {p} (the shared data folder beside the repo)")
    import anndata as ad

    return ad.read_h5ad(p)


def test_geneformer_like_model_on_real_cells(darmanis, tmp_path):
    adata = darmanis
    X = adata.X.tocsc()
    n_expr = np.diff(X.indptr)
    genes = np.flatnonzero(n_expr >= 5)
    genes = genes[np.argsort(-n_expr[genes], kind="stable")][:3000]
    fake = np.array([f"ENSG{i:011d}" for i in range(adata.n_vars)])  # symbol -> made-up Ensembl-style ID
    adata = adata.copy()
    adata.var["ensembl_id"] = fake
    vocab = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{fake[g]: 4 + i for i, g in enumerate(genes)}}
    norm = sp.diags(10_000 / np.asarray(adata.X.sum(1)).ravel()) @ adata.X  # Geneformer's medians: non-zero
    norm = sp.csc_matrix(norm)  # median of the normalised counts of each gene over the corpus
    medians = {fake[g]: float(np.median(norm.data[norm.indptr[g]:norm.indptr[g + 1]])) for g in genes}
    (tmp_path / "token_dictionary.json").write_text(json.dumps(vocab))

    torch.manual_seed(7)
    model = BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                       pad_token_id=0)).eval()
    tok = tokenize_geneformer(adata, tmp_path / "token_dictionary.json", medians, model=model)
    assert tok.model_input_size == 128 and tok.n_cells == adata.n_obs
    assert tok.lengths.max() == 128 and (tok.tokens[tok.indptr[:-1]] == 2).all()
    c = 11  # the top gene of a cell is its largest count / median
    row = np.asarray(norm[c].todense()).ravel()[genes] / np.array([medians[fake[g]] for g in genes])
    assert tok.cell(c)[1] == vocab[fake[genes[np.argmax(row)]]]
    get_adapter(model).id_to_token = tok.token_names  # token column in symbols; <cls>/<eos> known as special

    cells = np.arange(0, adata.n_obs, 8)  # 59 cells keep the test fast
    batches = geneformer_batches(tok, batch_size=16, cells=cells)
    assert all(isinstance(b, CellBatch) for b in batches)
    plant_first_token(model, batches, 0, 6, 40)  # in the first block, so that the second one reads it
    df = find_superweights(model, batches)
    top = df.iloc[0]
    assert (top["param"], top["row"], top["col"], top["token"]) == ("bert.encoder.layer.0.output.dense.weight", 6,
                                                                      40, "<cls>")
    assert top["stability"] == 1.0

    masked = geneformer_batches(tok, batch_size=16, cells=cells, mask_ratio=0.15, seed=3)
    base = evaluate_mlm(model, masked, n_cells=adata.n_obs)
    assert base["loss"].shape == (adata.n_obs,)
    assert np.isfinite(base["loss"][cells]).all() and np.isnan(np.delete(base["loss"], cells)).all()
    assert (base["n_masked"][cells] == np.maximum(1, np.round(0.15 * (tok.lengths[cells] - 2)))).all()
    pruned = evaluate_mlm(model, masked, edits=df.head(1), n_cells=adata.n_obs)
    assert not np.array_equal(pruned["loss"][cells], base["loss"][cells])  # the edit is seen ...
    assert np.array_equal(evaluate_mlm(model, masked, n_cells=adata.n_obs)["loss"], base["loss"], equal_nan=True)

    emb = embed_cells(model, batches, n_cells=adata.n_obs)
    cls = embed_cells(model, batches, emb="cls", n_cells=adata.n_obs)
    assert emb.shape == (adata.n_obs, 32) and np.isnan(emb[1]).all() and np.isfinite(emb[cells]).all()
    with torch.no_grad():  # one cell alone, no padding: mean over its genes (<cls>, <eos> excluded)
        h = model.bert(input_ids=torch.from_numpy(tok.cell(8))[None])[0][0]
    np.testing.assert_allclose(emb[8], h[1:-1].mean(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cls[8], h[0].numpy(), rtol=1e-4, atol=1e-5)
    # pruning the super weight moves the <cls> state far more than pruning random scalars of the same matrix
    # (a random-init model predicts almost uniformly, so the loss itself barely reacts to either)
    def shift(edits) -> float:
        return float(np.abs(embed_cells(model, batches, emb="cls", edits=edits)[cells] - cls[cells]).mean())

    effect = shift(df.head(1))
    rng = np.random.default_rng(0)
    p = "bert.encoder.layer.0.output.dense.weight"
    for r, c in zip(rng.integers(0, 32, 3), rng.integers(0, 64, 3)):
        assert effect > 100 * shift([(p, (int(r), int(c)))])
