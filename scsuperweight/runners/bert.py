"""The BERT-family runner: Geneformer-like masked LMs fed rank-value encoded cells.

The cells are read through the user's token dictionary (Ensembl ID -> token id) and gene medians (Ensembl ID ->
non-zero median), given once per model and remembered, read, on its adapter (``adapter.gene_dictionaries``).
Reconstruction is the masked-LM head's cross-entropy and top-1 accuracy on the masked gene tokens of each cell;
the cell embedding is the mean of the final hidden states over a cell's genes (Geneformer's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..adapters.hf import lm_head
from ..errors import DataError
from ..instrument import ActivationPatch, edit
from ..instrument.targets import constant_patches
from .base import Inputs, capture_channel
from .hf import HFRunner, embed_cells, evaluate_mlm


def describe_dict(d) -> str | None:
    """How a dictionary argument is recorded in params: its path, or its size (never the dict itself)."""
    if d is None:
        return None
    if isinstance(d, str | Path):
        return str(d)
    return f"<dict of {len(d)} entries>"


class HFEvaluator:
    """Runs conditions for transformers masked-LM models (BERT family: Geneformer, BERT) over fixed batches.

    Same contract as `scsuperweight.runners.scgpt.ScGPTEvaluator`: ``run(cond)`` returns per-cell arrays
    ``mlm_loss`` and ``mlm_accuracy`` (`evaluate_mlm` on the masked batches) and ``cls``, the (n_cells, d) cell
    embedding (`embed_cells` on the plain batches; ``emb="mean"``, Geneformer's convention, by default; none for a
    condition with ``embedding=False``, which skips the plain pass). No block
    inputs are cached: every condition is a full forward under `scsuperweight.instrument.edit` (transformers block
    call signatures differ between versions, and a rerun from a middle block would have to rebuild the attention
    masks the model builds itself), so a condition costs a whole pass over the batches. A restore condition puts the
    baseline activation of its site and channel back wherever the input token is the token that carried the spike
    (an `ActivationPatch` per batch).
    """

    def __init__(self, model, masked: Sequence, plain: Sequence, n_cells: int, *, emb: str = "mean",
                 progress: bool = False):
        from ..adapters import get_adapter

        self.adapter = get_adapter(model)
        if self.adapter.family != "bert":
            msg = (f"HFEvaluator scores masked-LM reconstruction; it supports BERT-family models (Geneformer), not "
                   f"the {self.adapter.family} family.")
            raise TypeError(msg)
        self.model = self.adapter.model
        self.masked = list(masked)
        self.plain = list(plain)
        self.n_cells = n_cells
        self.emb = emb
        self.progress = progress
        self.forwards = 0  # blocks computed, for the efficiency benchmark
        self._site_values: dict = {}

    def _baseline_channel(self, which: str, i: int, batch, site: str, channel: int) -> torch.Tensor:
        """(B, L) activation of `site`, `channel` on batch `i` without edits (computed once, then reused)."""
        key = (which, i, site, channel)
        if key not in self._site_values:
            kw = self.adapter.forward_kwargs(batch)
            kw.pop("labels", None)
            self._site_values[key] = capture_channel(self.model, self.adapter.sites[site].module, channel,
                                                     lambda: self.model.base_model(**kw))
        return self._site_values[key]

    def _patches(self, which: str, i: int, batch, cond) -> list[ActivationPatch]:
        ids = self.adapter.forward_kwargs({"input_ids": batch["input_ids"]})["input_ids"]
        out = constant_patches(cond.name, getattr(cond, "patch", None), ids)
        if cond.restore is not None:
            site, channel, tid = cond.restore
            base = self._baseline_channel(which, i, batch, site, channel)
            out.append(ActivationPatch(site, channel, base, ids.eq(tid)))
        return out

    @torch.no_grad()
    def run(self, cond) -> dict[str, np.ndarray]:
        n = self.n_cells
        # a condition without the embedding (a control draw under draw_embeddings=False) skips the plain pass
        plain = self.plain if getattr(cond, "embedding", True) else []
        if cond.restore is not None:  # baseline values are captured before any edit is applied
            for which, batches in (("masked", self.masked), ("plain", plain)):
                for i, b in enumerate(batches):
                    self._baseline_channel(which, i, b, cond.restore[0], cond.restore[1])
        with edit(self.model, cond.edits, verify=False):
            if cond.restore is None and getattr(cond, "patch", None) is None:
                rec = evaluate_mlm(self.model, self.masked, n_cells=n)
                emb = embed_cells(self.model, plain, emb=self.emb, n_cells=n) if plain else None
            else:  # a patch holds one batch's values: one call per batch
                rec = {"loss": np.full(n, np.nan), "accuracy": np.full(n, np.nan)}
                for i, b in enumerate(self.masked):
                    r = evaluate_mlm(self.model, [b], patches=self._patches("masked", i, b, cond),
                                     n_cells=n)
                    for k in rec:
                        ok = ~np.isnan(r[k])
                        rec[k][ok] = r[k][ok]
                emb = None
                for i, b in enumerate(plain):
                    e = embed_cells(self.model, [b], emb=self.emb, n_cells=n,
                                    patches=self._patches("plain", i, b, cond))
                    if emb is None:
                        emb = np.full_like(e, np.nan)
                    rows = ~np.isnan(e).all(1)  # this batch's cells
                    emb[rows] = e[rows]
        self.forwards += self.adapter.n_layers * (len(self.masked) + len(plain))
        out = {"mlm_loss": rec["loss"], "mlm_accuracy": rec["accuracy"]}
        return out if emb is None else {**out, "cls": emb.astype(np.float64)}


class BertRunner(HFRunner):
    """BERT-family masked LMs (Geneformer, BERT); options ``token_dictionary``, ``gene_medians``, ``symbol_key``."""

    mask_ratio = 0.15  # Geneformer's pretraining ratio
    options = ("token_dictionary", "gene_medians", "symbol_key")

    def configure(self, step, *, required=True, reconstruction=False, token_dictionary=None, gene_medians=None,
                  symbol_key=None, **options) -> dict:
        dicts = self._gene_dictionaries(token_dictionary, gene_medians, symbol_key, step, required)
        if reconstruction:
            self._check_mlm_head(step)
        if dicts is None:
            return {}
        return {"token_dictionary": dicts.get("token_dictionary_source"),
                "gene_medians": dicts.get("gene_medians_source"), "symbol_key": dicts.get("symbol_key")}

    def describe(self, *, token_dictionary=None, gene_medians=None, symbol_key=None, **options) -> dict:
        return {"token_dictionary": describe_dict(token_dictionary), "gene_medians": describe_dict(gene_medians),
                "symbol_key": symbol_key}

    def _gene_dictionaries(self, token_dictionary=None, gene_medians=None, symbol_key: str | None = None,
                           step: str = "", required: bool = True) -> dict | None:
        """Geneformer inputs: given now, else remembered on the adapter from an earlier step.

        Both dictionaries are read once (JSON, pickle or dict) and kept, read, on ``adapter.gene_dictionaries``, so
        later steps on the same model need not repeat them.
        """
        from ..data.geneformer import read_gene_dictionary

        adapter = self.adapter
        known = adapter.gene_dictionaries or {}
        if (token_dictionary is None) != (gene_medians is None) and not known:
            given = "token_dictionary" if gene_medians is None else "gene_medians"
            missing = "gene_medians" if gene_medians is None else "token_dictionary"
            msg = f"tl.{step}: {given}= was given without {missing}=; a Geneformer-like model needs both."
            raise DataError(msg)
        if token_dictionary is None and gene_medians is None and not known:
            if not required:
                return None
            msg = (f"tl.{step} on a {type(adapter.model).__name__} (BERT family) needs the Geneformer inputs: pass "
                   "token_dictionary= (Ensembl ID -> token id; a dict, .json or .pkl, e.g. Geneformer's "
                   "token_dictionary.pkl) and gene_medians= (Ensembl ID -> non-zero median; e.g. "
                   "gene_median_dictionary.pkl). They are remembered for later steps on the same model.")
            raise DataError(msg)
        out = dict(known)
        if token_dictionary is not None:
            out["token_dictionary"] = read_gene_dictionary(token_dictionary, what="token dictionary")
            out["token_dictionary_source"] = describe_dict(token_dictionary)
        if gene_medians is not None:
            out["gene_medians"] = read_gene_dictionary(gene_medians, what="gene-median dictionary")
            out["gene_medians_source"] = describe_dict(gene_medians)
        if symbol_key is not None:
            out["symbol_key"] = symbol_key
        adapter.gene_dictionaries = out
        return out

    def _check_mlm_head(self, step: str) -> None:
        """The reconstruction metrics need the masked-LM head."""
        if not type(self.model).__name__.endswith("ForMaskedLM"):
            msg = (f"tl.{step} measures masked-gene reconstruction, which needs the masked-LM head; got "
                   f"{type(self.model).__name__}. Load the model with its head (e.g. BertForMaskedLM: architectures "
                   "in config.json).")
            raise DataError(msg)

    def prepare(self, adata, *, gene_key=None, layer=None, max_seq_len=None, seed=0, batch_size=32, cells=None,
                mask_ratio=None, **options) -> Inputs:
        from ..data.geneformer import geneformer_batches, tokenize_geneformer

        if options.pop("max_tokens", None):  # rank-value cells are one fixed length: batch_size cells per batch
            from .._log import logger

            logger.info("max_tokens is not used for %s models: batches of batch_size=%d cells", self.family,
                        batch_size)
        dicts = self._gene_dictionaries(step="prepare", **options)
        sub = adata[cells] if cells is not None else adata
        tok = tokenize_geneformer(sub, dicts["token_dictionary"], dicts["gene_medians"], gene_id_key=gene_key,
                                  layer=layer, model_input_size=max_seq_len, model=self.model,
                                  symbol_key=dicts.get("symbol_key"))
        self.adapter.id_to_token = tok.token_names  # tokens print as gene symbols
        plain = geneformer_batches(tok, batch_size)
        masked = geneformer_batches(tok, batch_size, mask_ratio=mask_ratio, seed=seed) if mask_ratio else None
        return Inputs(tok, plain, masked, tok.n_cells, np.asarray(tok.symbols, dtype=str),
                      {"genes_matched": len(tok.var_index)})

    def evaluator(self, masked, plain, n_cells, *, emb="mean", progress=False) -> HFEvaluator:
        return HFEvaluator(self.model, masked, plain, n_cells, emb=emb, progress=progress)

    def masked_errors(self, batch):
        net = self.model
        head = lm_head(net)
        if head is None or net.base_model is net:
            return None
        kw = self.adapter.forward_kwargs(batch)
        labels = kw.pop("labels", None)
        if labels is None:
            return None
        hidden = net.base_model(**kw)[0]  # (B, L, d)
        scored = labels != -100  # the masked positions; labels hold the true token there
        logits = head(hidden[scored]).float()  # (N, V)
        ce = torch.nn.functional.cross_entropy(logits, labels[scored], reduction="none").double().cpu()
        return scored.nonzero()[:, 0].cpu(), labels[scored].cpu(), ce

    def token_embeddings(self) -> torch.Tensor:
        """Word plus token-type embedding after the embedding LayerNorm (positions left out: a gene's rank
        position varies by cell)."""
        emb = self.model.get_submodule(f"{self.adapter.root}embeddings")
        e = emb.word_embeddings.weight
        if getattr(emb, "token_type_embeddings", None) is not None:
            e = e + emb.token_type_embeddings.weight[0]
        return emb.LayerNorm(e)
