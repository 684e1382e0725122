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
    nhead = int(args["nheads"])
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
    state = rename_official_keys(_read_state(path / WEIGHTS_FILE))
    if any(k.startswith("batch_encoder.") or k.startswith("dsbn.") for k in state):
        raise _err("this checkpoint was fine-tuned with batch labels (batch_encoder/dsbn keys); only the "
                   "pretrained foundation models (no batch conditioning) are supported.")
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
    tmp = path / (WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path / WEIGHTS_FILE)
    (path / ARGS_FILE).write_text(json.dumps(args, indent=2, sort_keys=True))
    (path / VOCAB_FILE).write_text(json.dumps(model.vocab))
    return path


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
