"""Numerical parity with the official scGPT 0.2.4 `TransformerModel`.

An official model is built with seeded random weights, written in the format of the published checkpoints
(flash-attention `Wqkv` names, an extra `flag_encoder.weight`, no `cls_decoder.*`), loaded with
`scsuperweight.load_model`, and both models are run on the same padded batch. The official package only imports on
modern torch with a stand-in for `torchtext.vocab` (tests/_official), which is put on sys.path for the import only.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import scsuperweight as ssw
from scsuperweight.models.checkpoint import save_scgpt

OFFICIAL_DIR = Path(__file__).resolve().parent / "_official"
D_MODEL, NHEAD, D_HID, NLAYERS, NTOKEN = 64, 4, 128, 3, 200
PAD_VALUE = -2
TOL = 1e-5
# the official encoder keeps torch's nested-tensor fast path, which warns that the API is a prototype
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")


def import_official_scgpt():
    """Import scgpt 0.2.4 with the torchtext stand-in visible only while importing; return (scgpt, None) or
    (None, reason)."""
    sys.path.insert(0, str(OFFICIAL_DIR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flash.attn is not installed")
            import scgpt.model  # noqa: F401  (importing scgpt.* runs scgpt/__init__, which imports everything)
            import scgpt.utils  # noqa: F401
    except Exception as exc:  # any import failure means: no official reference here
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        sys.path.remove(str(OFFICIAL_DIR))
        # scgpt already holds the classes it needs; do not leave the stand-in importable as `torchtext`
        for name in [m for m in sys.modules if m == "torchtext" or m.startswith("torchtext.")]:
            del sys.modules[name]
    return sys.modules["scgpt"], None


@pytest.fixture(scope="module")
def scgpt():
    module, reason = import_official_scgpt()
    if module is None:
        pytest.skip(f"official scgpt 0.2.4 cannot be imported ({reason}); install it with "
                    "`pip install --no-deps scgpt==0.2.4 'datasets<3' ipython`")
    return module


def make_vocab() -> dict[str, int]:
    genes = [f"GENE{i}" for i in range(NTOKEN - 3)]
    return {g: i for i, g in enumerate([*genes, "<pad>", "<cls>", "<eoc>"])}


@pytest.fixture(scope="module")
def official(scgpt):
    """Official model, seeded, every parameter perturbed so that LayerNorm gains and biases are not trivial."""
    vocab = make_vocab()
    torch.manual_seed(0)
    model = scgpt.model.TransformerModel(
        ntoken=NTOKEN, d_model=D_MODEL, nhead=NHEAD, d_hid=D_HID, nlayers=NLAYERS, nlayers_cls=3, n_cls=1,
        vocab=vocab, dropout=0.0, pad_token="<pad>", pad_value=PAD_VALUE, do_mvc=True, do_dab=False,
        use_batch_labels=False, domain_spec_batchnorm=False, input_emb_style="continuous",
        explicit_zero_prob=False, use_fast_transformer=False, pre_norm=False,
    )
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    return model, vocab


def official_args() -> dict:
    return {"embsize": D_MODEL, "nheads": NHEAD, "d_hid": D_HID, "nlayers": NLAYERS, "n_layers_cls": 3,
            "dropout": 0.0, "pad_token": "<pad>", "pad_value": PAD_VALUE, "mask_value": -1, "n_bins": 51,
            "max_seq_len": 1200, "input_style": "binned", "input_emb_style": "continuous", "MVC": True,
            "USE_GENERATIVE_TRAINING": True, "fast_transformer": True, "fp16": True}


def write_official_dir(model, vocab, path: Path, *, impl: bool = False) -> Path:
    """Write the model as the published files are: flash-attention names, flag_encoder, no cls_decoder."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("cls_decoder."):
            continue
        if impl:  # the newer wrapper: self_attn._impl.{Wqkv,out_proj}
            key = key.replace("self_attn.in_proj_", "self_attn._impl.Wqkv.")
            key = key.replace("self_attn.out_proj.", "self_attn._impl.out_proj.")
        else:
            key = key.replace("self_attn.in_proj_", "self_attn.Wqkv.")
        state[key] = value.detach().clone()
    state["flag_encoder.weight"] = torch.randn(3, D_MODEL, generator=torch.Generator().manual_seed(2))
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "best_model.pt")
    (path / "args.json").write_text(json.dumps(official_args(), indent=2))
    (path / "vocab.json").write_text(json.dumps(vocab))
    return path


def padded_batch(vocab: dict[str, int], lengths=(40, 7, 63, 2, 25), seed: int = 3):
    """<cls> first with pad_value, distinct genes, bins 1..50, then <pad>/pad_value up to the longest cell."""
    gen = torch.Generator().manual_seed(seed)
    B, L = len(lengths), max(lengths)
    src = torch.full((B, L), vocab["<pad>"], dtype=torch.long)
    values = torch.full((B, L), float(PAD_VALUE))
    for i, n in enumerate(lengths):
        src[i, 0] = vocab["<cls>"]
        src[i, 1:n] = torch.randperm(NTOKEN - 3, generator=gen)[: n - 1]
        values[i, 1:n] = torch.randint(1, 51, (n - 1,), generator=gen).float()
    return src, values, src.eq(vocab["<pad>"])


def run_both(ours, theirs, src, values, mask, grad: bool):
    with torch.set_grad_enabled(grad):
        out_ours = ours(src, values, src_key_padding_mask=mask, MVC=True)
        out_theirs = theirs(src, values, src_key_padding_mask=mask, MVC=True)
    return out_ours, out_theirs


def assert_parity(out_ours, out_theirs, mask, *, padded_too: bool = False):
    valid = torch.ones_like(mask) if padded_too else ~mask
    diffs = {
        "cell_emb": (out_ours["cell_emb"] - out_theirs["cell_emb"]).abs().max().item(),
        # padded positions are compared only with grad on: under no_grad the official encoder takes torch's
        # nested-tensor path, which writes zeros there, while ours computes them; neither value is meaningful
        "mlm_output": (out_ours["mlm_output"] - out_theirs["mlm_output"])[valid].abs().max().item(),
        "mvc_output": (out_ours["mvc_output"] - out_theirs["mvc_output"])[valid].abs().max().item(),
    }
    assert all(d <= TOL for d in diffs.values()), f"max |ours - official| above {TOL}: {diffs}"
    # the comparison must not be vacuous
    assert out_theirs["mlm_output"][valid].abs().max() > 1e-2
    assert out_theirs["cell_emb"].abs().max() > 1e-2


@pytest.mark.parametrize("impl", [False, True], ids=["Wqkv", "_impl.Wqkv"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_official_checkpoint_parity(official, tmp_path, impl, grad):
    theirs, vocab = official
    path = write_official_dir(theirs, vocab, tmp_path / "ckpt", impl=impl)
    saved = torch.load(path / "best_model.pt", weights_only=True)
    assert not any("in_proj" in k or k.startswith("cls_decoder.") for k in saved)
    assert "flag_encoder.weight" in saved

    ours = ssw.load_model(path)
    assert not ours.training
    ref = {k: v for k, v in theirs.state_dict().items() if not k.startswith("cls_decoder.")}
    got = ours.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)

    src, values, mask = padded_batch(vocab)
    out_ours, out_theirs = run_both(ours, theirs, src, values, mask, grad)
    assert_parity(out_ours, out_theirs, mask, padded_too=grad)


def test_saved_by_us_loads_in_official_code(scgpt, official, tmp_path):
    """The reverse direction: `save_scgpt` output read by the official loader reproduces our outputs."""
    theirs, vocab = official
    ours = ssw.load_model(write_official_dir(theirs, vocab, tmp_path / "a"))
    path = save_scgpt(ours, tmp_path / "b")
    args = json.loads((path / "args.json").read_text())
    torch.manual_seed(5)
    other = scgpt.model.TransformerModel(
        ntoken=NTOKEN, d_model=args["embsize"], nhead=args["nheads"], d_hid=args["d_hid"], nlayers=args["nlayers"],
        vocab=vocab, dropout=0.0, pad_token=args["pad_token"], pad_value=args["pad_value"], do_mvc=True,
        use_fast_transformer=False,
    )
    scgpt.utils.load_pretrained(other, torch.load(path / "best_model.pt", weights_only=True), verbose=False)
    other.eval()
    src, values, mask = padded_batch(vocab, seed=4)
    assert_parity(*run_both(ours, other, src, values, mask, grad=False), mask)
