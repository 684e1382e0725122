import copy

import pytest
import torch
from _plant import plant_cls_superweight, tiny_batches, tiny_model

from scsuperweight.census import CENSUS_COLUMNS, census, checkpoint_dirs
from scsuperweight.errors import DataError
from scsuperweight.models.checkpoint import save_scgpt

N_TOKENS = 40


@pytest.fixture(scope="module")
def planted():
    m = tiny_model(3)
    plant_cls_superweight(m, tiny_batches(m, 12, 3, 6), 1, 5, 10)
    return m


def test_same_planted_spike_coincides_and_a_clean_model_does_not(planted):
    clean = tiny_model(8)
    res = census([planted, copy.deepcopy(planted), clean], names=["a", "b", "clean"], n_tokens=N_TOKENS, top=3,
                 max_rounds=1)
    sp = res.spikes
    assert list(sp.columns) == CENSUS_COLUMNS
    top = sp[sp["rank"] == 1].set_index("model")
    for name in ("a", "b"):
        assert (top.loc[name, "layer"], top.loc[name, "kind"], top.loc[name, "channel"]) == (1, "ffn_out", 5)
        assert top.loc[name, "token"] == "<cls>" and bool(top.loc[name, "coincides"])
        assert top.loc[name, "n_models"] == 2 and top.loc[name, "models_sharing"] == "a;b"
    assert not sp.loc[sp["model"] == "clean", "above_threshold"].any()
    assert not sp.loc[sp["model"] == "clean", "coincides"].any()
    first = res.coincidences.iloc[0]
    assert (first["layer"], first["kind"], first["channel"], first["n_models"]) == (1, "ffn_out", 5, 2)
    cands = res.candidates
    assert set(cands.loc[cands["above_threshold"], "model"]) == {"a", "b"}
    assert (cands["candidate"] == "L1.linear2.w[5,10]").sum() == 2


def test_training_snapshots_in_step_order_show_when_the_spike_emerges(planted, tmp_path):
    run = tmp_path / "run"
    before = tiny_model(3)  # the same model before the plant
    for step, m in ((1000, planted), (0, before), (200, planted)):
        m.args["trained_steps"] = step
        save_scgpt(m, run / "steps" / f"step_{step:06d}")
    assert [p.name for p in checkpoint_dirs(run)] == ["step_000000", "step_000200", "step_001000"]
    res = census(run, n_tokens=N_TOKENS, top=2, candidates=False, null_k=5)
    assert list(res.spikes["step"].unique()) == [0, 200, 1000]
    first = res.coincidences.iloc[0]
    assert (first["layer"], first["channel"], first["first_step"], first["n_models"]) == (1, 5, 200, 2)
    top = res.spikes[res.spikes["rank"] == 1].set_index("step")
    assert top.loc[200, "perm_p"] == pytest.approx(1 / 6)  # the Gaussian null never reaches the planted spike
    assert not bool(top.loc[0, "above_threshold"])
    with pytest.raises(DataError, match="save-every"):
        checkpoint_dirs(tmp_path / "empty")


def test_pretrain_keeps_snapshots(tmp_path):
    from scsuperweight.data.synthetic import synthetic_ad
    from scsuperweight.train import pretrain

    recipe = {"name": "tiny", "genes": {"n_top_genes": 100}, "tokens": {"max_seq_len": 32},
              "model": {"d_model": 16, "nhead": 2, "d_hid": 32, "nlayers": 1, "dropout": 0.0},
              "train": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "log_every": 2},
              "eval": {"every": 100, "max_cells": 20, "activation_cells": 4, "batch_size": 20},
              "checkpoint": {"every": 100}}
    torch.manual_seed(0)
    pretrain(synthetic_ad(n_cells=80, n_donors=2, seed=0), recipe=recipe, out_dir=tmp_path, progress=False,
             save_every=2)
    dirs = checkpoint_dirs(tmp_path)
    assert [p.name for p in dirs] == ["step_000000", "step_000002", "step_000004"]
    assert all((p / "best_model.pt").is_file() for p in dirs)
