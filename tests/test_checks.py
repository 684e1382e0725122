"""Up-front validators (issue 16, reqs 1, 2, 4): each bad input gives the right error class and one line that names
the problem, the value received and the fix."""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scsuperweight import checks as C
from scsuperweight.errors import DataError, OptionError, OutputError, SSWError


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and isinstance(exc_info.value, SSWError)
    return msg


@pytest.fixture
def adata() -> ad.AnnData:
    rng = np.random.default_rng(0)
    n = 60
    obs = pd.DataFrame({
        "cell_type": pd.Categorical(rng.choice(["astro", "micro", "oligo"], n)),
        "diagnosis": pd.Categorical(np.where(np.arange(n) % 2, "AD", "Control")),
        "donor": [f"d{i % 6}" for i in range(n)],
    }, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(np.ones((n, 4), dtype=np.float32), obs=obs)


# ---------------------------------------------------------------- output paths

def test_existing_file_as_out_dir(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(OutputError) as e:
        C.check_out_dir(f)
    assert "is an existing file, not a directory" in one_line(e) and str(f) in one_line(e)


def test_out_dir_under_a_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(OutputError) as e:
        C.check_out_dir(f / "sub" / "dir")
    assert f"{str(f)!r} is a file" in one_line(e)


def test_directory_as_output_file(tmp_path):
    with pytest.raises(OutputError) as e:
        C.check_out_file(tmp_path, suffixes=(".html",))
    assert "is a directory, not a file" in one_line(e)
    with pytest.raises(OutputError, match=r"does not end with \.h5ad"):
        C.check_out_file(tmp_path / "x.txt", suffixes=(".h5ad",))
    assert C.check_out_file(tmp_path / "new" / "r.h5ad", suffixes=(".h5ad",)) == tmp_path / "new" / "r.h5ad"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_parent(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError) as e:
            C.check_out_dir(locked / "run")
        assert "no permission to write" in one_line(e) and str(locked) in one_line(e)
        with pytest.raises(OutputError, match="no permission"):
            C.check_out_file(locked / "report.html")
    finally:
        locked.chmod(0o700)


def test_fresh_and_existing_out_dirs_pass(tmp_path):
    assert C.check_out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert C.check_out_dir(tmp_path) == tmp_path


# ---------------------------------------------------------------- device

def test_device_strings():
    import torch

    assert C.check_device(None) == "cpu" and C.check_device("cpu") == "cpu"
    with pytest.raises(OptionError) as e:
        C.check_device("gpu0")
    assert "'gpu0' is not a torch device" in one_line(e)
    if not torch.cuda.is_available():
        with pytest.raises(OptionError) as e:
            C.check_device("cuda")
        assert "--device 'cuda'" in one_line(e) and "pass --device cpu" in one_line(e)
    else:
        with pytest.raises(OptionError, match="GPU"):
            C.check_device(f"cuda:{torch.cuda.device_count()}")


# ---------------------------------------------------------------- model argument

def test_model_argument():
    import torch

    C.check_model(torch.nn.Linear(2, 2))
    for bad, needle in ((None, "model is None; pass a loaded model"), ("demo", "not a model; load it first"),
                        ({"a": 1}, "is a dict, not a torch model")):
        with pytest.raises(OptionError) as e:
            C.check_model(bad)
        assert needle in one_line(e)


# ---------------------------------------------------------------- obs keys

def test_obs_key_missing_suggests_close(adata):
    with pytest.raises(DataError) as e:
        C.check_obs_key(adata, "celltype")
    msg = one_line(e)
    assert "--label-key 'celltype' is not a column" in msg and "Did you mean 'cell_type'" in msg


def test_obs_key_with_nan_names_cells(adata):
    adata.obs["diagnosis"] = adata.obs["diagnosis"].astype(object)
    adata.obs.loc[["c3", "c7"], "diagnosis"] = np.nan
    with pytest.raises(DataError) as e:
        C.check_obs_key(adata, "diagnosis", option="--condition-key")
    assert "2 missing values (NaN) of 60 (e.g. cells c3, c7)" in one_line(e) and "notna()" in one_line(e)
    assert C.check_obs_key(adata, "diagnosis", allow_missing=True).isna().sum() == 2


# ---------------------------------------------------------------- numeric options

@pytest.mark.parametrize("name, value, needle", [
    ("max_cells_per_label", 0, "--max-cells-per-label (max_cells_per_label=) is 0; it must be an integer >= 1"),
    ("max_candidates", 0, "--max-candidates (max_candidates=) is 0"),
    ("n_random", -3, "--n-random (n_random=) is -3"),
    ("n_boot", 2.5, "is 2.5 (float); it must be an integer"),
    ("batch_size", True, "is True (bool)"),
    ("alpha", 1.0, "--alpha (alpha=) is 1.0; it must be a number > 0 and < 1"),
    ("min_ratio", float("nan"), "is nan (float); it must be a number"),
    ("seed", -1, "--seed (seed=) is -1"),
])
def test_numeric_option_out_of_range(name, value, needle):
    with pytest.raises(OptionError) as e:
        C.check_options(**{name: value})
    assert needle in one_line(e)


def test_n_random_too_small_for_alpha():
    C.check_options(n_random=20, alpha=0.05)  # 1/21 < 0.05
    with pytest.raises(OptionError) as e:
        C.check_options(n_random=19, alpha=0.05)  # 1/20 is not below 0.05
    assert "1/20 = 0.05, not below alpha=0.05" in one_line(e) and "--n-random 20 or more" in one_line(e)


def test_unknown_option_is_a_caller_bug():
    with pytest.raises(TypeError):
        C.check_options(max_cels=3)


# ---------------------------------------------------------------- gene sets

def test_gene_set_paths_are_read_up_front(tmp_path):
    good = tmp_path / "mine.gmt"
    good.write_text("SET_A\tdesc\tAPOE\tTREM2\nSET_B\tdesc\tGFAP\n")
    assert C.check_gene_sets(["bundled", str(good)])["mine"] == 2
    with pytest.raises(DataError) as e:
        C.check_gene_sets([str(good), str(tmp_path / "typo.gmt")])
    assert "typo.gmt" in one_line(e) and "does not exist" in one_line(e)
    bad = tmp_path / "bad.gmt"
    bad.write_text("SET_A APOE TREM2\n")
    with pytest.raises(DataError, match="line 1 is not a GMT line"):
        C.check_gene_sets(str(bad))


# ---------------------------------------------------------------- cells

def test_too_few_cells_for_the_run(adata):
    assert C.cells_used(adata.obs["cell_type"], 5) == 15
    with pytest.raises(DataError) as e:
        C.check_enough_cells(adata, "cell_type", 5)
    msg = one_line(e)
    assert "would evaluate 15 cells (3 labels of 'cell_type', at most 5 each)" in msg
    assert "raise --max-cells-per-label" in msg
    assert C.check_enough_cells(adata, "cell_type", 7) == 21
    with pytest.raises(DataError, match="the data has 10 cells"):
        C.check_enough_cells(adata[:10], None)


# ---------------------------------------------------------------- case and control

@pytest.mark.parametrize("levels, expected", [
    (["AD", "Control"], ("AD", "Control")),
    (["control", "AD"], ("AD", "control")),
    (["Alzheimer's disease", "normal"], ("Alzheimer's disease", "normal")),
    (["ALZHEIMER", "healthy"], ("ALZHEIMER", "healthy")),
    (["dementia", "no dementia"], ("dementia", "no dementia")),
    (["NCI", "AD"], ("AD", "NCI")),
    (["case", "ctrl"], ("case", "ctrl")),
    (["CT", "AD", "MCI"], ("AD", "CT")),  # a third level is left out of the contrast, not guessed into it
    (["control", "disease"], ("disease", "control")),  # two levels, one known: the other is the case
    (["Non-demented", "pathology"], ("pathology", "Non-demented")),
])
def test_case_control_spellings(levels, expected):
    assert C.resolve_case_control(levels) == expected


def test_case_control_refuses_to_guess():
    with pytest.raises(OptionError) as e:
        C.resolve_case_control(["groupA", "groupB"])
    msg = one_line(e)
    assert "'groupA', 'groupB'" in msg and "--case LEVEL --control LEVEL" in msg
    with pytest.raises(OptionError):  # two spellings of AD: which one?
        C.resolve_case_control(["AD", "dementia", "control"])
    with pytest.raises(OptionError):  # three levels, only MCI and a control: no case
        C.resolve_case_control(["MCI", "early", "control"])


def test_case_control_explicit():
    assert C.resolve_case_control(["groupA", "groupB"], case="groupB") == ("groupB", "groupA")
    assert C.resolve_case_control(["AD", "control"], case="control", control="AD") == ("control", "AD")
    assert C.resolve_case_control(pd.Categorical([1, 2, 2, 1]), case="2", control="1") == (2, 1)
    with pytest.raises(OptionError) as e:
        C.resolve_case_control(["AD", "control"], case="Alz")
    assert "--case 'Alz' is not a condition level; the levels are 'AD', 'control'" in one_line(e)
    with pytest.raises(OptionError, match="both 'AD'"):
        C.resolve_case_control(["AD", "control"], case="AD", control="AD")
    with pytest.raises(DataError, match="1 level"):
        C.resolve_case_control(["AD", "AD", None])


# ---------------------------------------------------------------- the aggregate

def test_validate_run_inputs_resolves_everything(adata, tmp_path):
    got = C.validate_run_inputs(adata, label_key="cell_type", condition_key="diagnosis", donor_key="donor",
                                gene_sets=["bundled"], out_dir=tmp_path / "run", device="cpu",
                                max_cells_per_label=10, n_random=40, alpha=0.05, max_candidates=6, n_boot=50)
    assert (got.case, got.control, got.device, got.n_cells) == ("AD", "Control", "cpu", 30)
    assert got.gene_sets["ad_genesets"] > 0 and got.to_dict()["case"] == "AD"


@pytest.mark.parametrize("kwargs, err, needle", [
    ({"max_cells_per_label": 0}, OptionError, "--max-cells-per-label"),
    ({"out_dir": "FILE"}, OutputError, "existing file"),
    ({"device": "tpu"}, OptionError, "not a torch device"),
    ({"device": "meta"}, OptionError, "not supported"),
    ({"label_key": "nope"}, DataError, "'nope' is not a column"),
    ({"donor_key": "donors"}, DataError, "--donor-key 'donors'"),
    ({"case": "AD"}, OptionError, "without --condition-key"),
    ({"gene_sets": ["missing.gmt"]}, DataError, "missing.gmt"),
    ({"max_cells_per_label": 2}, DataError, "too few cells"),
])
def test_validate_run_inputs_stops_first(adata, tmp_path, kwargs, err, needle):
    (tmp_path / "FILE").write_text("x")
    kwargs = {k: (str(tmp_path / v) if k == "out_dir" else v) for k, v in kwargs.items()}
    kwargs.setdefault("label_key", "cell_type")
    with pytest.raises(err) as e:
        C.validate_run_inputs(adata, **kwargs)
    assert needle in one_line(e)


def test_validate_run_inputs_without_adata():
    with pytest.raises(DataError, match="adata is None"):
        C.validate_run_inputs(None, label_key="x")
