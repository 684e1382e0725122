"""`--characterise` on the command line reaches prune: by default a candidate whose zeroing does not pass gets no
restore:, scale: or |w|-matched conditions (run.json's params say why); with `--characterise all` every
candidate gets them, as before the default changed."""

import anndata as ad
import pandas as pd
import pytest
from test_cost_faces import small  # noqa: F401 - the planted model, its data and two candidates (module fixture)

import scsuperweight as ssw
from scsuperweight import _keys as K
from scsuperweight import results as R
from scsuperweight.cli import build_parser, main
from scsuperweight.models import save_scgpt


@pytest.fixture(scope="module")
def pruned(small, tmp_path_factory):  # noqa: F811
    adata, model, _ = small
    d = tmp_path_factory.mktemp("characterise")
    save_scgpt(model, d / "model")
    a = adata.copy()
    # the planted scalar and a null one of another down-projection, with the spike sites a scan records (restore
    # puts the spike back there)
    cands = pd.DataFrame([{"candidate": c, "param": f"transformer_encoder.layers.{layer}.linear2.weight", "row": r,
                           "col": col, "screen": "activation", "above_threshold": True, "site": f"L{layer}.ffn_out",
                           "channel": r, "token": "<cls>"} for c, layer, r, col in (("planted", 0, 5, 11),
                                                                                    ("null", 1, 3, 4))])
    R.store(a, "superweights", cands)
    a.write_h5ad(d / "data.h5ad")
    out = {}
    for how in ("passing", "all"):
        extra = [] if how == "passing" else ["--characterise", "all"]
        # 2 draws: the smallest p is 1/3, so no zeroing passes and the default characterises no candidate
        assert main(["prune", "--model", str(d / "model"), "--data", str(d / "data.h5ad"), "--out", str(d / how),
                     "--label-key", "cell_type", "--max-cells-per-label", "3", "--n-random", "2", "--n-boot", "2",
                     "--max-candidates", "2", "--granularities", "scalar", "--no-mean-ablation", "--no-joint",
                     "--n-matched", "2", "--max-seq-len", "32", "--no-progress", *extra]) == 0
        conds = set(pd.read_csv(d / how / K.FILE_COLLAPSE, sep="\t")["condition"])
        out[how] = conds, ssw.get.params(ad.read_h5ad(d / how / R.RESULTS.file), "prune")
    return out


def test_default_leaves_a_failing_candidate_uncharacterised_all_does_not(pruned):
    (default, dp), (every, ap) = pruned["passing"], pruned["all"]
    for cand in ("planted", "null"):
        assert f"prune:{cand}" in default and f"prune:{cand}" in every
        gated = (f"restore:{cand}", f"scale:{cand}:", f"matched:{cand}:")
        assert not any(c.startswith(gated) for c in default)
        assert {g for g in gated for c in every if c.startswith(g)} == set(gated)
    assert set(dp["not_characterised"]) == {"planted", "null"} and "does not pass" in dp["not_characterised"]["null"]
    assert ap["characterise"] == "all" and dp["characterise"] == "passing" and not ap["not_characterised"]


@pytest.mark.parametrize("command", ["prune", "run"])
def test_help_says_what_characterise_costs(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--characterise {passing,all}" in text and "whose zeroing passes" in text and "every candidate" in text
