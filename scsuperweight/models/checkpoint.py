"""Read and write official scGPT checkpoint directories (args.json, vocab.json, best_model.pt).

The published files were written by a flash-attention build: `self_attn.Wqkv.*` (or `self_attn._impl.*`) instead
of torch's `in_proj_*`, an unused `flag_encoder.weight`, no classifier head. The official loader loads
non-strictly and silently leaves mismatched weights random; this loader renames, derives every size it can from
the tensors, and then loads strictly, failing with one message that lists every missing or unexpected key.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch

from .._io import atomic_torch_save, atomic_write_json, atomic_write_text
from ..errors import CheckpointError  # errors.py is a leaf every layer may use
from .scgpt import ScGPTConfig, ScGPTModel

ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "best_model.pt"
DROPPED_KEYS = ("flag_encoder.weight",)
_LAYER_RE = re.compile(r"^transformer_encoder\.layers\.(\d+)\.")


def _err(msg: str) -> CheckpointError:
    return CheckpointError(msg)


def rename_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map flash-attention key names onto torch's, and drop keys no public model uses."""
    out = {}
    for key, value in state.items():
        if key in DROPPED_KEYS:
            continue
        new = key.replace("self_attn._impl.", "self_attn.")
        new = new.replace("self_attn.Wqkv.weight", "self_attn.in_proj_weight")
        new = new.replace("self_attn.Wqkv.bias", "self_attn.in_proj_bias")
        out[new] = value
    return out


def to_flash_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse rename: torch names -> the `Wqkv` names of the published checkpoints."""
    out = {}
    for key, value in state.items():
        new = key.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight")
        new = new.replace("self_attn.in_proj_bias", "self_attn.Wqkv.bias")
        out[new] = value
    return out


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise _err(f"{what} not found: {path}. An official scGPT directory holds {ARGS_FILE}, {VOCAB_FILE} "
                   f"and {WEIGHTS_FILE}.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise _err(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                   "re-download the checkpoint or fix the file.") from None


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise _err(f"weights file not found: {path}. An official scGPT directory holds {WEIGHTS_FILE}.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _err(f"{path} is not a plain state dict that loads with weights_only=True ({first}). Re-save it "
                   "with torch.save(model.state_dict(), path); arbitrary pickles are never unpickled.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise _err(f"{path} holds {keys!r}, not a flat state dict of tensors. If it wraps one (e.g. under "
                   "'model_state_dict'), save that inner dict as best_model.pt.")
    return state


# args.json fields this package reads, and the JSON type each must have; a wrong type is named with its value so
# that `"nheads": "eight"` fails as one line about args.json rather than as int()'s "invalid literal".
_ARG_TYPES: dict[str, tuple[str, tuple[type, ...]]] = {
    **{k: ("an integer", (int,)) for k in ("nheads", "embsize", "d_hid", "nlayers", "n_bins", "max_seq_len",
                                            "n_layers_cls")},
    **{k: ("a number", (int, float)) for k in ("dropout", "pad_value", "mask_value")},
    "pad_token": ("a string", (str,)),
    **{k: ("true or false", (bool,)) for k in ("MVC", "explicit_zero_prob")},
}
# the smallest value that makes sense for each integer field
_ARG_MIN = {"nheads": 1, "embsize": 1, "d_hid": 1, "nlayers": 1, "n_bins": 2, "max_seq_len": 2, "n_layers_cls": 1}


def check_args(args: dict, where: str | Path = ARGS_FILE) -> None:
    """Refuse args.json fields of the wrong JSON type or out of range, naming the field, the value and the type."""
    for field, (expected, types) in _ARG_TYPES.items():
        if field not in args:
            continue
        value = args[field]
        # JSON true/false are Python bools, and bool is an int subclass: never accept one for a number
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not ok and int in types and float not in types and isinstance(value, float) and value.is_integer():
            ok = True  # 8.0 written by a float-minded tool is still 8
        if not ok:
            msg = (f"{where}: field {field!r} is {json.dumps(value)} ({type(value).__name__}); expected "
                   f"{expected}. Fix the value in args.json (published scGPT models use e.g. \"nheads\": 8).")
            raise _err(msg)
        if field in _ARG_MIN and value < _ARG_MIN[field]:
            msg = f"{where}: field {field!r} is {value}; it must be at least {_ARG_MIN[field]}. Fix args.json."
            raise _err(msg)


def check_vocab(vocab: dict[str, int], n_rows: int, where: str | Path = VOCAB_FILE) -> None:
    """Vocab ids must be unique and index rows of the gene embedding; the offending genes are named."""
    by_id: dict[int, list[str]] = {}
    for gene, idx in vocab.items():
        by_id.setdefault(idx, []).append(gene)
    shared = {i: g for i, g in by_id.items() if len(g) > 1}
    if shared:
        examples = "; ".join(f"id {i}: {', '.join(map(repr, g[:4]))}" for i, g in sorted(shared.items())[:5])
        msg = (f"{where} gives the same id to several genes ({len(shared)} ids shared, e.g. {examples}); each gene "
               "needs its own embedding row. Use the vocab.json shipped with these weights.")
        raise _err(msg)
    outside = sorted((i, g[0]) for i, g in by_id.items() if not 0 <= i < n_rows)
    if outside:
        examples = ", ".join(f"{g!r}: {i}" for i, g in outside[:5])
        msg = (f"{where} has {len(outside)} ids outside the gene embedding's rows 0..{n_rows - 1} (e.g. {examples}); "
               "the vocab and weights come from different models. Use the vocab.json shipped with these weights.")
        raise _err(msg)


def check_finite(state: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse a checkpoint with NaN or infinite weights: every cell would embed as NaN while the run succeeds."""
    bad = []
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            n = int((~torch.isfinite(value)).sum())
            if n:
                bad.append(f"{key} ({n} of {value.numel()})")
    if bad:
        msg = (f"checkpoint {where} has non-finite weights (NaN or inf) in {len(bad)} tensor(s): "
               f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. The file is corrupt or training diverged; "
               "use an earlier or re-downloaded checkpoint.")
        raise _err(msg)


def config_from_state(state: dict[str, torch.Tensor], args: dict, vocab: dict[str, int]) -> ScGPTConfig:
    """Derive every size from the tensors; only `nheads` must come from args.json."""
    if "encoder.embedding.weight" not in state:
        raise _err("state dict has no 'encoder.embedding.weight': this is not an scGPT TransformerModel "
                   f"(first keys: {list(state)[:5]}).")
    emb = state["encoder.embedding.weight"]
    ntoken, d_model = emb.shape
    layers = {int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))}
    if not layers:
        raise _err("state dict has no transformer_encoder.layers.* keys; the file is incomplete.")
    nlayers = max(layers) + 1
    # any block's FFN width will do; a missing or inconsistent one is reported by the strict check below
    ffn_keys = sorted(k for k in state if _LAYER_RE.match(k) and k.endswith(".linear1.weight"))
    if not ffn_keys:
        raise _err("state dict has no transformer_encoder.layers.*.linear1.weight key (the FFN up-projection); "
                   "the file is incomplete.")
    d_hid = state[ffn_keys[0]].shape[0]
    if "nheads" not in args:
        raise _err("args.json has no 'nheads': the number of attention heads cannot be derived from the "
                   "weights. Add it (published scGPT models use \"nheads\": 8).")
    check_args(args)
    nhead = int(args["nheads"])
    # args.json sizes are redundant with the tensors; when they disagree the file lost blocks or rows (a checkpoint
    # missing its last block would otherwise load as a shallower model without a word)
    derived = {"nlayers": nlayers, "embsize": d_model, "d_hid": d_hid}
    differ = [f"{k} {int(args[k])} in args.json vs {v} in the weights" for k, v in derived.items()
              if k in args and int(args[k]) != v]
    if differ:
        msg = (f"args.json and the weights disagree: {'; '.join(differ)}. The weights file is incomplete or belongs to "
               "another model; use the files shipped together.")
        raise _err(msg)
    check_vocab(vocab, ntoken)
    if len(vocab) != ntoken:
        raise _err(f"vocab.json has {len(vocab)} entries but the gene embedding has {ntoken} rows; the vocab "
                   "and weights come from different models. Use the vocab.json shipped with these weights.")
    pad_token = args.get("pad_token", "<pad>")
    if pad_token not in vocab:
        raise _err(f"pad token {pad_token!r} (args.json 'pad_token') is not in vocab.json.")
    if "<cls>" not in vocab:
        raise _err("vocab.json has no '<cls>' token; scGPT cell embeddings read the <cls> position.")
    n_cls_layers = {int(k.split(".")[2]) for k in state if k.startswith("cls_decoder._decoder.")}
    modelled = {"embsize", "nheads", "d_hid", "nlayers", "dropout", "pad_token", "pad_value", "mask_value",
                "n_bins", "MVC", "n_layers_cls", "explicit_zero_prob"}
    return ScGPTConfig(
        ntoken=ntoken, d_model=d_model, nhead=nhead, d_hid=d_hid, nlayers=nlayers,
        dropout=float(args.get("dropout", 0.2)),
        pad_token_id=int(vocab[pad_token]),
        pad_value=float(args.get("pad_value", -2)),
        mask_value=float(args.get("mask_value", -1)),
        n_bins=int(args.get("n_bins", 51)),
        mvc="mvc_decoder.W.weight" in state,
        explicit_zero_prob="decoder.zero_logit.0.weight" in state,
        n_cls=state["cls_decoder.out_layer.weight"].shape[0] if "cls_decoder.out_layer.weight" in state else 0,
        # _decoder holds (Linear, ReLU, LayerNorm) x (n_layers_cls - 1); out_layer is the last layer
        n_layers_cls=max(n_cls_layers) // 3 + 2 if n_cls_layers else int(args.get("n_layers_cls", 3)),
        extra={k: v for k, v in args.items() if k not in modelled},
    )


def load_scgpt(path: str | Path, device: str | torch.device | None = None) -> ScGPTModel:
    """Load an official scGPT checkpoint directory strictly; see `scsuperweight.load_model`."""
    path = Path(path)
    if not path.is_dir():
        raise _err(f"model directory not found: {path}. Pass the folder that holds {ARGS_FILE}, "
                   f"{VOCAB_FILE} and {WEIGHTS_FILE}, or 'demo'.")
    args = _read_json(path / ARGS_FILE, "args.json")
    vocab = _read_json(path / VOCAB_FILE, "vocab.json")
    if not isinstance(args, dict):
        raise _err(f"{path / ARGS_FILE} must hold a JSON object of training arguments.")
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise _err(f"{path / VOCAB_FILE} must map gene symbols to integer ids ({{\"GAPDH\": 17, ...}}).")
    check_args(args, path / ARGS_FILE)  # cheap, so before the weights are read
    state = rename_official_keys(_read_state(path / WEIGHTS_FILE))
    if any(k.startswith("batch_encoder.") or k.startswith("dsbn.") for k in state):
        raise _err("this checkpoint was fine-tuned with batch labels (batch_encoder/dsbn keys); only the "
                   "pretrained foundation models (no batch conditioning) are supported.")
    check_finite(state, path / WEIGHTS_FILE)
    config = config_from_state(state, args, vocab)
    model = ScGPTModel(config, vocab=vocab, args=args)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise _err(f"checkpoint {path} does not match the scGPT architecture: missing keys {missing}, "
                   f"unexpected keys {unexpected}. Nothing was loaded.")
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in model.state_dict().items() if state[k].shape != v.shape]
    if shapes:
        raise _err(f"checkpoint {path} has tensors of inconsistent shapes: {shapes}.")
    model.load_state_dict(state, strict=True)
    model.source = str(path)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def save_scgpt(model: ScGPTModel, path: str | Path, *, flash_keys: bool = True) -> Path:
    """Write `model` as an official scGPT directory (keys in the published `Wqkv` style by default)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    args = dict(model.args)
    args.update(c.extra)
    args.update(embsize=c.d_model, nheads=c.nhead, d_hid=c.d_hid, nlayers=c.nlayers, dropout=c.dropout,
                n_layers_cls=c.n_layers_cls, pad_value=c.pad_value, mask_value=c.mask_value, n_bins=c.n_bins,
                MVC=c.mvc, explicit_zero_prob=c.explicit_zero_prob, input_emb_style="continuous",
                input_style="binned")
    args.setdefault("pad_token", "<pad>")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if flash_keys:
        state = to_flash_keys(state)
    atomic_torch_save(state, path / WEIGHTS_FILE)
    atomic_write_json(args, path / ARGS_FILE)
    atomic_write_text(path / VOCAB_FILE, json.dumps(model.vocab))
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
