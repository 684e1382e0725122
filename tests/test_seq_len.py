"""Scan and prune read at most 512 tokens per cell by default (`scsuperweight.plan.PRUNE_MAX_SEQ_LEN`), through
scGPT's seeded random gene subsampling, on an official-format model whose own length is 1,200: the params and the
plan record the length and its consequence, ``max_seq_len=1200`` / ``"full"`` give full length, and `embed`
keeps the model's length."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import scsuperweight as ssw
from scsuperweight.checks import check_option
from scsuperweight.loading import load_model
from scsuperweight.models import ScGPTConfig, ScGPTModel, save_scgpt
from scsuperweight.plan import PRUNE_MAX_SEQ_LEN, analysis_seq_len
from scsuperweight.runners.scgpt import ScGPTRunner

N_GENES = 700  # every cell counts all of them: > 511, so the default subsamples every cell


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(N_GENES)]
    adata = ad.AnnData(rng.poisson(3.0, (24, N_GENES)).astype(np.float32) + 1,
                       obs=pd.DataFrame({"cell_type": ["a"] * 12 + ["b"] * 12}, index=[f"c{i}" for i in range(24)]),
                       var=pd.DataFrame(index=genes))
    vocab = {g: i for i, g in enumerate(genes)}
    vocab.update({"<pad>": N_GENES, "<cls>": N_GENES + 1, "<eoc>": N_GENES + 2})
    torch.manual_seed(0)
    cfg = ScGPTConfig(ntoken=len(vocab), d_model=16, nhead=2, d_hid=16, nlayers=1, dropout=0.0, pad_token_id=N_GENES)
    path = save_scgpt(ScGPTModel(cfg, vocab=vocab, args={"nheads": 2, "max_seq_len": 1200}).eval(),
                      tmp_path_factory.mktemp("m") / "model")
    model = load_model(str(path))
    assert model.args["max_seq_len"] == 1200
    cands = pd.DataFrame([{"candidate": "c0", "param": "transformer_encoder.layers.0.linear2.weight", "row": 3,
                           "col": 5, "screen": "activation", "above_threshold": True}])
    return adata, model, cands


@pytest.fixture
def lengths(monkeypatch):
    """Every tokenisation's longest cell (tokens, <cls> included), in call order."""
    seen: list[int] = []
    prepare = ScGPTRunner.prepare

    def spy(self, adata, **kw):
        out = prepare(self, adata, **kw)
        seen.append(int(np.max(out.tok.lengths)))
        return out

    monkeypatch.setattr(ScGPTRunner, "prepare", spy)
    return seen


def _prune(official, **kw):
    adata, model, cands = official
    a = adata.copy()
    ssw.tl.prune(a, model, label_key="cell_type", candidates=cands, n_random=4, n_boot=10, first_order=False,
                 mean_ablation=False, granularities=("scalar",), joint=False, n_matched=0, n_scale=0, n_restore=0,
                 embed_all=False, progress=False, **kw)
    return a, ssw.get.params(a, "prune")


def test_the_default_resolves_to_512_and_full_or_a_number_as_asked():
    assert PRUNE_MAX_SEQ_LEN == 512
    assert analysis_seq_len(None, 1200) == 512 and analysis_seq_len(None, 128) == 128  # never above the model's
    assert analysis_seq_len("full", 1200) == 1200 and analysis_seq_len(300, 1200) == 300
    assert check_option("max_seq_len", "full") == "full"


def test_prune_default_tokenises_at_512_and_records_it(official, lengths):
    a, p = _prune(official)
    assert lengths and set(lengths) == {512}  # the plan's tokenisation and the run's: 511 genes + <cls>
    assert p["max_seq_len"] == 512 and p["max_seq_len_asked"] is None and p["model_max_seq_len"] == 1200
    assert "at most 512 of the model's 1200" in p["seq_len_note"] and "fidelity, not validity" in p["seq_len_note"]
    plan = p["plan"]
    assert plan["max_seq_len"] == 512 and plan["tokens_per_cell"] == 512
    assert any("at most 512 of the model's 1200" in n for n in plan["notes"])
    assert len(ssw.get.collapse(a))


def test_prune_max_seq_len_1200_or_full_gives_full_length(official, lengths):
    _, p = _prune(official, max_seq_len=1200, dry_run=True)
    assert lengths == [N_GENES + 1]  # every counted gene and <cls>
    assert p["plan"]["max_seq_len"] == 1200 and p["plan"]["tokens_per_cell"] == N_GENES + 1
    assert any("the model's full length, 1200" in n for n in p["plan"]["notes"])
    _, q = _prune(official, max_seq_len="full", dry_run=True)
    assert lengths == [N_GENES + 1] * 2 and q["plan"]["max_seq_len"] == 1200


def test_scan_defaults_to_512_and_embed_keeps_the_model_length(official, lengths):
    adata, model, _ = official
    a = adata.copy()
    ssw.tl.scan(a, model, label_key="cell_type", null_k=0, progress=False)
    s = ssw.get.params(a, "scan")
    assert lengths == [512] and s["max_seq_len"] == 512 and "at most 512" in s["seq_len_note"]
    ssw.tl.embed(a, model, progress=False)
    assert lengths == [512, N_GENES + 1]


def test_run_dry_run_records_the_length_in_run_json(official, tmp_path):
    from scsuperweight.pipeline import run_pipeline

    adata, model, _ = official
    info = run_pipeline(adata.copy(), model, tmp_path / "run", label_key="cell_type", dry_run=True, progress=False)
    t = info["tokens_per_cell"]
    assert t["max_seq_len"] == 512 and t["model_max_seq_len"] == 1200 and "fidelity, not validity" in t["seq_len_note"]
    assert info["params"]["max_seq_len"] == 512 and info["plan"]["max_seq_len"] == 512
    full = run_pipeline(adata.copy(), model, tmp_path / "full", label_key="cell_type", dry_run=True, progress=False,
                        max_seq_len="full")
    assert full["tokens_per_cell"]["max_seq_len"] == 1200 and full["plan"]["tokens_per_cell"] == N_GENES + 1


def test_cli_max_seq_len_takes_a_number_or_full():
    import argparse

    from scsuperweight.cli import _seq_len_arg

    assert _seq_len_arg("full") == "full" and _seq_len_arg("FULL") == "full" and _seq_len_arg("1200") == 1200
    with pytest.raises(argparse.ArgumentTypeError, match="512, 1200 or 'full'"):
        _seq_len_arg("long")
