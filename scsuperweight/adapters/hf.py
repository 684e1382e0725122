"""Adapters for transformers models (BERT family, Geneformer included; Llama family) and their offline loader.

The evaluations run under edits (masked/causal LM loss per sequence, cell embeddings) live above the
instrumentation, in `scsuperweight.runners.hf`.

Families are recognised by module names, not class names, so relatives that share the layout work too: a
``ModuleList`` of blocks with ``attention.output.dense``, ``intermediate.dense``, ``output.dense`` and the two
``LayerNorm``s is BERT-like (post-norm); one with ``self_attn.o_proj``, ``mlp.down_proj``, ``input_layernorm`` and
``post_attention_layernorm`` is Llama-like (pre-norm, RMSNorm gains without bias). Batches are dicts of forward
keyword arguments (a tokenizer's output); a batch may carry global cell indices in a ``.cells`` attribute
(`scsuperweight.data.geneformer.CellBatch`). transformers itself is imported only inside the functions that need it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._log import logger
from ..errors import CheckpointError, HookError
from .base import Adapter, BatchContext, Site

SUPPORTED = ("bert (BertModel, BertForMaskedLM, Geneformer and models with encoder.layer[i].attention.output.dense, "
             "intermediate.dense, output.dense, output.LayerNorm)",
             "llama (LlamaModel, LlamaForCausalLM and models with layers[i].self_attn.o_proj, mlp.down_proj, "
             "input_layernorm, post_attention_layernorm)")
_BERT_PARTS = ("attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense",
               "output.LayerNorm")
_LLAMA_PARTS = ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
# forward kwargs whose leading dimension is the batch; a 1-D one is a single sequence
_SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "labels")
# tokenizer outputs that are not forward arguments (asked for with return_special_tokens_mask=True etc.)
_NOT_FORWARD = frozenset({"special_tokens_mask", "offset_mapping", "length", "overflow_to_sample_mapping", "cells"})
_START_NAMES = ("<cls>", "[CLS]", "<s>", "<bos>", "<|begin_of_text|>")
_END_NAMES = ("<eos>", "[SEP]", "</s>")


def cells_of(batch) -> np.ndarray | None:
    """Global cell indices of a batch's rows: its ``.cells`` attribute, or a ``"cells"`` entry."""
    cells = getattr(batch, "cells", None)
    if cells is None and isinstance(batch, Mapping) and "cells" in batch:
        cells = batch["cells"]
    if isinstance(cells, torch.Tensor):
        cells = cells.cpu().numpy()
    return None if cells is None else np.asarray(cells, dtype=np.int64).reshape(-1)


def _has(module: nn.Module, dotted: str) -> bool:
    try:
        module.get_submodule(dotted)
    except AttributeError:
        return False
    return True


def _find_blocks(model: nn.Module) -> tuple[str, str] | None:
    """(family, dotted name of the block list) of the outermost ModuleList whose blocks have a known layout."""
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        for family, parts in (("bert", _BERT_PARTS), ("llama", _LLAMA_PARTS)):
            if all(_has(block, p) for block in mod for p in parts):
                return family, name
    return None


class HFAdapter(Adapter):
    """Shared behaviour of the transformers adapters: batches as kwargs dicts, token names, synthetic input."""

    def __init__(self, model: nn.Module, family: str, blocks: str, post_norm: bool):
        n = len(model.get_submodule(blocks))
        cfg = getattr(model, "config", None)
        pad = getattr(cfg, "pad_token_id", None)
        super().__init__(model=model, family=family, n_layers=n, post_norm=post_norm,
                         token_module=self._input_embedding_name(model),
                         pad_token_id=int(pad) if isinstance(pad, int) else None)
        self.blocks = blocks
        self.base = blocks[: -len(blocks.rsplit(".", 1)[-1])]  # "bert.encoder." / "model." / ""
        self.root = self.base[: -len("encoder.")] if self.base.endswith("encoder.") else self.base  # "bert." ...
        self.tokenizer = None  # a transformers tokenizer, when known (token names, special ids)
        # Geneformer inputs remembered by ssw.tl once given: {"token_dictionary": dict, "gene_medians": dict, ...}
        self.gene_dictionaries: dict | None = None
        self._id_to_token: dict[int, str] | None = None
        self._start_token_id: int | None = None
        self._params = {n for n, _ in model.named_parameters()}

    # -- vocabulary ----------------------------------------------------------------------------------------
    @property
    def id_to_token(self) -> dict[int, str] | None:
        """Token id -> name (e.g. a Geneformer token dictionary inverted, genes shown as symbols); settable."""
        return self._id_to_token

    @id_to_token.setter
    def id_to_token(self, mapping: Mapping[int, str] | None) -> None:
        self._id_to_token = None if mapping is None else {int(k): str(v) for k, v in mapping.items()}

    @property
    def start_token_id(self) -> int | None:
        """The token a sequence starts with (``<cls>``/``[CLS]``/BOS) when known; settable."""
        if self._start_token_id is not None:
            return self._start_token_id
        tok = self.tokenizer
        for attr in ("cls_token_id", "bos_token_id"):
            v = getattr(tok, attr, None) if tok is not None else None
            if isinstance(v, int):
                return v
        named = self._named_id(_START_NAMES)  # an attached dictionary knows better than a generic config
        if named is not None:
            return named
        cfg = getattr(self.model, "config", None)
        for attr in ("cls_token_id", "bos_token_id"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int):
                return v
        return None

    @start_token_id.setter
    def start_token_id(self, value: int | None) -> None:
        self._start_token_id = None if value is None else int(value)

    def _named_id(self, names: Sequence[str]) -> int | None:
        if self._id_to_token:
            inv = {v: k for k, v in self._id_to_token.items()}
            for n in names:
                if n in inv:
                    return inv[n]
        return None

    def token_name(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._id_to_token is not None and token_id in self._id_to_token:
            return self._id_to_token[token_id]
        if self.tokenizer is not None:
            try:
                name = self.tokenizer.convert_ids_to_tokens(token_id)
            except Exception:  # noqa: BLE001 - an odd tokenizer should never break a report
                name = None
            if name is not None:
                return str(name)
        return str(token_id)

    def special_token_ids(self) -> set[int]:
        out: set[int] = set()
        cfg = getattr(self.model, "config", None)
        for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id", "mask_token_id",
                     "unk_token_id", "decoder_start_token_id"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int):
                out.add(v)
            elif isinstance(v, (list, tuple)):
                out.update(int(i) for i in v if isinstance(i, int))
        if self.tokenizer is not None:
            out.update(int(i) for i in getattr(self.tokenizer, "all_special_ids", []) or [])
        if self._id_to_token:
            out.update(k for k, v in self._id_to_token.items()
                       if (v.startswith("<") and v.endswith(">")) or (v.startswith("[") and v.endswith("]")))
        if self._start_token_id is not None:
            out.add(self._start_token_id)
        return out

    # -- names ---------------------------------------------------------------------------------------------
    @staticmethod
    def _input_embedding_name(model: nn.Module) -> str:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is not None:
            for name, mod in model.named_modules():
                if mod is emb:
                    return name
        return ""

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def first_layer_of(self, param: str) -> int:
        """Block whose computation `param` enters first: -1 for embeddings, n_layers for final norm and heads."""
        prefix = f"{self.blocks}."
        if param.startswith(prefix):
            return int(param[len(prefix):].split(".", 1)[0])
        embedding = [f"{self.token_module}."] if self.token_module else []
        if self.family == "bert":  # word, position and type embeddings and their LayerNorm
            embedding.append(f"{self.root}embeddings.")
        return -1 if embedding and param.startswith(tuple(embedding)) else self.n_layers

    def short_param(self, param: str) -> str:
        s = param.replace(f"{self.blocks}.", "L")
        if self.root and s.startswith(self.root):
            s = s[len(self.root):]
        return s.replace(".weight", ".w").replace(".bias", ".b")

    def _norm(self, module: str) -> tuple[str | None, str | None]:
        w, b = f"{module}.weight", f"{module}.bias"
        return (w if w in self._params else None), (b if b in self._params else None)

    def _norm_sites(self, name: str, layer: int, kind: str, module: str) -> list[Site]:
        """``{name}_in`` / ``{name}_out`` sites (kinds ``{kind}_in`` / ``{kind}_out``) of a norm module."""
        w, b = self._norm(module)
        return [Site(f"{name}_{io}", layer, f"{kind}_{io}", module, io, norm_weight=w, norm_bias=b)
                for io in ("in", "out")]

    # -- batches -------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def forward_kwargs(self, batch: Mapping, device: torch.device | None = None) -> dict:
        """The batch as forward kwargs: tensors (2-D for sequence keys), on the model's device."""
        if not isinstance(batch, Mapping):
            msg = (f"a {self.family} model takes batches as dicts of forward keyword arguments (e.g. a tokenizer's "
                   f"output with input_ids and attention_mask); got {type(batch).__name__}.")
            raise TypeError(msg)
        device = self._device() if device is None else device
        out = {}
        for k, v in batch.items():
            if k in _NOT_FORWARD:
                continue
            if isinstance(v, (list, np.ndarray)):
                v = torch.as_tensor(np.asarray(v))
            if isinstance(v, torch.Tensor):
                if k in _SEQ_KEYS and v.dim() == 1:
                    v = v[None]
                v = v.to(device)
            out[k] = v
        return out

    def batch_context(self, batch: Mapping) -> BatchContext:
        if not isinstance(batch, Mapping):
            return BatchContext(None, None)
        kw = self.forward_kwargs({k: batch[k] for k in ("input_ids", "attention_mask") if k in batch},
                                 device=torch.device("cpu"))
        ids = kw.get("input_ids")
        am = kw.get("attention_mask")
        pad = None
        if isinstance(am, torch.Tensor) and am.dim() == 2:
            pad = am == 0
        elif isinstance(ids, torch.Tensor) and self.pad_token_id is not None:
            pad = ids.eq(self.pad_token_id)
        return BatchContext(ids, pad, cells_of(batch))

    def run(self, batch: Mapping):
        return self.model(**self.forward_kwargs(batch))

    def synthetic_batch(self, n_tokens: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
        """One sequence of random non-special tokens, after the start token when known (data-free mode)."""
        rng = np.random.default_rng(seed)
        cfg = self.model.config
        vocab = int(getattr(cfg, "vocab_size", 0) or self.model.get_input_embeddings().num_embeddings)
        pool = np.setdiff1d(np.arange(vocab), np.fromiter(self.special_token_ids(), dtype=np.int64))
        start = self.start_token_id
        end = self._end_token_id()
        n_special = (start is not None) + (end is not None)
        max_len = int(getattr(cfg, "max_position_embeddings", 0) or 0) or (n_tokens + n_special)
        n = max(1, min(n_tokens, len(pool), max_len - n_special))
        ids = rng.choice(pool, n, replace=False)
        ids = np.concatenate([[start] if start is not None else [], ids, [end] if end is not None else []])
        t = torch.from_numpy(ids.astype(np.int64))[None]
        return {"input_ids": t, "attention_mask": torch.ones_like(t)}

    def _end_token_id(self) -> int | None:
        return None


class BertAdapter(HFAdapter):
    """BERT-family encoders (post-norm): Geneformer, BERT, RoBERTa-like layouts."""

    def __init__(self, model: nn.Module, blocks: str):
        super().__init__(model, "bert", blocks, post_norm=True)
        sites: dict[str, Site] = {}
        emb_norm = f"{self.root}embeddings.LayerNorm"
        if _has(model, emb_norm):
            for s in self._norm_sites("emb.norm", -1, "emb_norm", emb_norm):
                sites[s.name] = s
        for i in range(self.n_layers):
            p, L = self.block_name(i), f"L{i}"
            ao, io_, oo = f"{p}.attention.output", f"{p}.intermediate", f"{p}.output"
            sites[f"{L}.attn_hidden"] = Site(f"{L}.attn_hidden", i, "attn_hidden", f"{ao}.dense", "in")
            sites[f"{L}.attn_out"] = Site(f"{L}.attn_out", i, "attn_out", f"{ao}.dense", "out",
                                          proj_param=f"{ao}.dense.weight", proj_input_site=f"{L}.attn_hidden",
                                          next_norm=f"{ao}.LayerNorm")
            for s in self._norm_sites(f"{L}.norm1", i, "norm1", f"{ao}.LayerNorm"):
                sites[s.name] = s
            sites[f"{L}.ffn_in"] = Site(f"{L}.ffn_in", i, "ffn_in", f"{io_}.dense", "in")
            sites[f"{L}.ffn_hidden"] = Site(f"{L}.ffn_hidden", i, "ffn_hidden", f"{oo}.dense", "in")
            sites[f"{L}.ffn_out"] = Site(f"{L}.ffn_out", i, "ffn_out", f"{oo}.dense", "out",
                                         proj_param=f"{oo}.dense.weight", proj_input_site=f"{L}.ffn_hidden",
                                         next_norm=f"{oo}.LayerNorm")
            for s in self._norm_sites(f"{L}.norm2", i, "norm2", f"{oo}.LayerNorm"):
                sites[s.name] = s
            sites[f"{L}.block_out"] = Site(f"{L}.block_out", i, "block_out", p, "out")
        self.sites = sites

    def _end_token_id(self) -> int | None:
        v = getattr(self.tokenizer, "sep_token_id", None) if self.tokenizer is not None else None
        if isinstance(v, int):
            return v
        v = getattr(self.model.config, "sep_token_id", None)
        return v if isinstance(v, int) else self._named_id(_END_NAMES)


class LlamaAdapter(HFAdapter):
    """Llama-family decoders (pre-norm, RMSNorm): Llama, Mistral, Qwen2 and relatives with the same names."""

    def __init__(self, model: nn.Module, blocks: str):
        super().__init__(model, "llama", blocks, post_norm=False)
        sites: dict[str, Site] = {}
        final = f"{self.base}norm"
        has_final = _has(model, final)
        for i in range(self.n_layers):
            p, L = self.block_name(i), f"L{i}"
            nxt = f"{self.block_name(i + 1)}.input_layernorm" if i + 1 < self.n_layers else \
                (final if has_final else None)
            for s in self._norm_sites(f"{L}.norm1", i, "norm1", f"{p}.input_layernorm"):
                sites[s.name] = s
            sites[f"{L}.attn_hidden"] = Site(f"{L}.attn_hidden", i, "attn_hidden", f"{p}.self_attn.o_proj", "in")
            sites[f"{L}.attn_out"] = Site(f"{L}.attn_out", i, "attn_out", f"{p}.self_attn.o_proj", "out",
                                          proj_param=f"{p}.self_attn.o_proj.weight",
                                          proj_input_site=f"{L}.attn_hidden",
                                          next_norm=f"{p}.post_attention_layernorm")
            for s in self._norm_sites(f"{L}.norm2", i, "norm2", f"{p}.post_attention_layernorm"):
                sites[s.name] = s
            sites[f"{L}.ffn_in"] = Site(f"{L}.ffn_in", i, "ffn_in", f"{p}.mlp", "in")
            sites[f"{L}.ffn_hidden"] = Site(f"{L}.ffn_hidden", i, "ffn_hidden", f"{p}.mlp.down_proj", "in")
            sites[f"{L}.ffn_out"] = Site(f"{L}.ffn_out", i, "ffn_out", f"{p}.mlp.down_proj", "out",
                                         proj_param=f"{p}.mlp.down_proj.weight", proj_input_site=f"{L}.ffn_hidden",
                                         next_norm=nxt)
            sites[f"{L}.block_out"] = Site(f"{L}.block_out", i, "block_out", p, "out")
        if has_final:
            for s in self._norm_sites("final.norm", self.n_layers, "final_norm", final):
                sites[s.name] = s
        self.sites = sites


def hf_adapter(model: nn.Module) -> HFAdapter:
    """The adapter of a transformers model of a supported family; `scsuperweight.errors.HookError` otherwise.

    Sites per block ``L{i}``: ``attn_hidden`` (input of the attention output projection), ``attn_out``, ``ffn_in``,
    ``ffn_hidden`` (input of the down-projection), ``ffn_out``, ``norm1_in/out``, ``norm2_in/out``, ``block_out``;
    BERT adds ``emb.norm_in/out`` (embedding LayerNorm), Llama ``final.norm_in/out`` (the final RMSNorm).

    Examples
    --------
    >>> from transformers import BertConfig, BertForMaskedLM
    >>> ad = hf_adapter(BertForMaskedLM(BertConfig(num_hidden_layers=2)))
    >>> ad.family, ad.sites["L1.ffn_out"].proj_param
    ('bert', 'bert.encoder.layer.1.output.dense.weight')
    """
    if not isinstance(model, nn.Module):
        msg = f"expected a torch model, got {type(model).__name__}."
        raise HookError(msg)
    found = _find_blocks(model)
    if found is None:
        msg = (f"cannot instrument a {type(model).__name__}: its modules match none of the supported layouts. "
               f"Supported: scGPT, and transformers {'; '.join(SUPPORTED)}.")
        raise HookError(msg)
    family, blocks = found
    adapter = BertAdapter(model, blocks) if family == "bert" else LlamaAdapter(model, blocks)
    logger.info("%s: %s family, %d blocks at %s", type(model).__name__, family, adapter.n_layers, blocks)
    return adapter


# -- loading ---------------------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def _check_loading_info(model: nn.Module, info: Mapping, path: Path, auto: str) -> None:
    """Refuse a load that left weights random or dropped ones the model has a place for (transformers only warns).

    A config naming 3 layers over weights holding 2 shows up as missing keys of layer 2; weights of an extra layer
    as unexpected keys under the model's own modules. Unexpected keys of a head the chosen class does not build
    (``cls.*`` of a masked-LM checkpoint read with ``AutoModel``) and a missing pooler (nothing here reads it) are
    only logged.
    """
    base = model.base_model_prefix
    own = {name for name, _ in model.named_children()} | {name for name, _ in model.base_model.named_children()}

    def is_own(key: str) -> bool:
        head = key.removeprefix(f"{base}.").split(".")[0] if base else key.split(".")[0]
        return head in own or key.startswith(f"{base}.")

    missing = sorted(info.get("missing_keys") or [])
    ignored_missing = [k for k in missing if ".pooler." in f".{k}"]
    missing = [k for k in missing if k not in ignored_missing]
    unexpected = sorted(info.get("unexpected_keys") or [])
    ignored_unexpected = [k for k in unexpected if not is_own(k)]
    unexpected = [k for k in unexpected if is_own(k)]
    mismatched = [f"{k}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in sorted(info.get("mismatched_keys") or [],
                                                                                  key=lambda t: t[0])]
    errors = [str(e).splitlines()[0] for e in info.get("error_msgs") or []]
    if ignored_missing or ignored_unexpected:
        logger.info("%s: not loaded (unused here): %s; left at initialisation: %s", path,
                    ignored_unexpected[:5], ignored_missing)
    if missing or unexpected or mismatched or errors:

        def some(keys: list[str]) -> str:
            return f"{len(keys)} {keys[:8]}{' ...' if len(keys) > 8 else ''}"

        cfg = model.config
        layers = getattr(cfg, "num_hidden_layers", None)
        msg = (f"checkpoint {path} does not match its config.json ({type(model).__name__} via {auto}"
               f"{f', {layers} layers' if layers is not None else ''}): missing keys {some(missing)}, unexpected "
               f"keys {some(unexpected)}, shape mismatches {some(mismatched)}"
               f"{f', errors {errors[:3]}' if errors else ''}. Nothing was used; fix config.json (e.g. "
               "num_hidden_layers, hidden_size, intermediate_size) or use the weights it was saved with.")
        raise CheckpointError(msg)


def load_transformers(path: str | Path, device: str | torch.device | None = None, *,
                      dtype: torch.dtype | None = torch.float32):
    """Load a local transformers directory offline, in eval mode, with its adapter attached.

    The head is chosen from ``config.json``: ``...ForMaskedLM`` -> ``AutoModelForMaskedLM``, ``...ForCausalLM`` (or a
    Llama-type config without architectures) -> ``AutoModelForCausalLM``, otherwise ``AutoModel``. The family found
    is recorded as ``model._ssw_format`` (``"transformers:bert"`` or ``"transformers:llama"``). A tokenizer saved in
    the directory is attached to the adapter for token names.

    Parameters
    ----------
    path
        Directory with ``config.json`` and weights (``model.safetensors`` or ``pytorch_model.bin``, or shards).
    device
        Torch device; default CPU.
    dtype
        Parameter dtype (float32 by default: spike statistics and exact edits are clearest there); None keeps the
        checkpoint's.
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        msg = f"{path} has no config.json; pass a transformers model directory (config.json + weights)."
        raise CheckpointError(msg)
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        msg = f"{cfg_file} is not valid JSON ({e}); the directory is not a readable transformers model."
        raise CheckpointError(msg) from None
    have = [f for f in _WEIGHT_FILES if (path / f).is_file()] or sorted(p.name for p in path.glob("*.safetensors"))
    if not have:
        msg = (f"{path} has config.json but no weights (looked for {', '.join(_WEIGHT_FILES)}); copy the weight "
               "files next to config.json (they are never downloaded: loading is offline).")
        raise CheckpointError(msg)
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    archs = [str(a) for a in cfg.get("architectures") or []]
    if any(a.endswith("ForMaskedLM") for a in archs):
        auto = AutoModelForMaskedLM
    elif any(a.endswith("ForCausalLM") for a in archs) or (not archs and cfg.get("model_type") in
                                                             ("llama", "mistral", "qwen2")):
        auto = AutoModelForCausalLM
    else:
        auto = AutoModel
    kwargs: dict = {"local_files_only": True}
    if dtype is not None:
        major = int(transformers.__version__.split(".")[0])
        kwargs["dtype" if major >= 5 else "torch_dtype"] = dtype
    # mismatched shapes are collected and reported below instead of raised half-way; transformers' own load table is
    # silenced because the decision (refuse) is ours and is said in one line
    kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()  # a bar per shard on stderr would break one-line errors
    try:
        model, info = auto.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = f"could not load {path} with {auto.__name__} (offline): {e}"
        raise CheckpointError(msg.splitlines()[0]) from e
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    _check_loading_info(model, info, path, auto.__name__)
    from ..models.checkpoint import check_finite  # local: keeps this hunk to the loader

    check_finite(model.state_dict(), path)  # a NaN weight would embed every cell as NaN with exit 0
    model.eval()
    if device is not None:
        model.to(device)
    from . import get_adapter

    adapter = get_adapter(model)  # raises the clear HookError for an unsupported layout
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer

            adapter.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - token names are a convenience, never a reason to fail
            logger.warning("tokenizer files in %s could not be read (%s); tokens are shown as ids", path, e)
    model._ssw_format = f"transformers:{adapter.family}"
    logger.info("loaded %s (%s, %s family, %d blocks) from %s", type(model).__name__, auto.__name__,
                adapter.family, adapter.n_layers, path)
    return model


# -- heads ---------------------------------------------------------------------------------------------------
def lm_head(model: nn.Module) -> nn.Module | None:
    """The language-modelling head of a transformers model (BERT ``cls``, Llama ``lm_head``), or None."""
    for attr in ("cls", "lm_head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            return head
    return None


__all__ = ["BertAdapter", "HFAdapter", "LlamaAdapter", "hf_adapter", "lm_head", "load_transformers"]
