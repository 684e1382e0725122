"""Adapter for our scGPT model (and therefore for every official checkpoint loaded into it)."""

from __future__ import annotations

import numpy as np
import torch

from ..data.batches import Batch
from ..models.scgpt import ScGPTModel
from .base import Adapter, BatchContext, Site


class ScGPTAdapter(Adapter):
    def __init__(self, model: ScGPTModel):
        n = model.config.nlayers
        super().__init__(model=model, family="scgpt", n_layers=n, post_norm=True,
                         token_module="encoder.embedding", pad_token_id=model.config.pad_token_id)
        self._id2gene = {v: k for k, v in model.vocab.items()}
        sites: dict[str, Site] = {}

        def add(site: Site) -> None:
            sites[site.name] = site

        add(Site("emb.gene_norm_out", -1, "gene_norm_out", "encoder.enc_norm", "out",
                 norm_weight="encoder.enc_norm.weight", norm_bias="encoder.enc_norm.bias"))
        add(Site("emb.value_norm_out", -1, "value_norm_out", "value_encoder.norm", "out",
                 norm_weight="value_encoder.norm.weight", norm_bias="value_encoder.norm.bias"))
        for i in range(n):
            p = self.block_name(i)
            L = f"L{i}"
            add(Site(f"{L}.attn_out", i, "attn_out", f"{p}.self_attn", "out",
                     proj_param=f"{p}.self_attn.out_proj.weight", next_norm=f"{p}.norm1"))
            add(Site(f"{L}.ffn_in", i, "ffn_in", f"{p}.linear1", "in"))
            add(Site(f"{L}.ffn_hidden", i, "ffn_hidden", f"{p}.linear2", "in"))
            add(Site(f"{L}.ffn_out", i, "ffn_out", f"{p}.linear2", "out", proj_param=f"{p}.linear2.weight",
                     proj_input_site=f"{L}.ffn_hidden", next_norm=f"{p}.norm2"))
            for k in (1, 2):
                for io in ("in", "out"):
                    add(Site(f"{L}.norm{k}_{io}", i, f"norm{k}_{io}", f"{p}.norm{k}", io,
                             norm_weight=f"{p}.norm{k}.weight", norm_bias=f"{p}.norm{k}.bias"))
            add(Site(f"{L}.block_out", i, "block_out", p, "out"))
        self.sites = sites

    def block_name(self, layer: int) -> str:
        return f"transformer_encoder.layers.{layer}"

    def short_param(self, param: str) -> str:
        return param.replace("transformer_encoder.layers.", "L").replace(".weight", ".w").replace(".bias", ".b") \
            .replace("self_attn.", "")

    def token_name(self, token_id: int) -> str:
        return self._id2gene.get(int(token_id), f"<id {int(token_id)}>")

    def special_token_ids(self) -> set[int]:
        return {v for k, v in self.model.vocab.items() if k.startswith("<") and k.endswith(">")}

    def batch_context(self, batch: Batch) -> BatchContext:
        return BatchContext(batch.src, batch.padding_mask, batch.cells)

    def run(self, batch: Batch) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        b = batch.to(device)
        return self.model(b.src, b.values, b.padding_mask)

    def synthetic_batch(self, n_tokens: int = 256, seed: int = 0) -> Batch:
        """One synthetic cell: `<cls>` then `n_tokens` random vocab genes with random bins (data-free mode)."""
        rng = np.random.default_rng(seed)
        specials = self.special_token_ids()
        genes = np.array([v for v in self.model.vocab.values() if v not in specials])
        n = min(n_tokens, len(genes))
        ids = np.concatenate([[self.model.cls_token_id], rng.choice(genes, n, replace=False)])
        vals = np.concatenate([[self.model.config.pad_value],
                               rng.integers(1, self.model.config.n_bins, n)]).astype(np.float32)
        src = torch.from_numpy(ids)[None]
        return Batch(np.array([0]), src, torch.from_numpy(vals)[None], torch.zeros_like(src, dtype=torch.bool))

    # -- rerun from a middle layer (pruning conditions share everything below their first edit) --------------
    def first_layer_of(self, param: str) -> int:
        """Block whose computation `param` enters first: -1 for the input encoders, n_layers for the decoders."""
        prefix = "transformer_encoder.layers."
        if param.startswith(prefix):
            return int(param[len(prefix):].split(".", 1)[0])
        if param.startswith(("encoder.", "value_encoder.")):
            return -1
        return self.n_layers

    @torch.no_grad()
    def encode_cache(self, batch: Batch) -> dict:
        """Inputs of every block for `batch` (plus what the heads need), computed once without edits."""
        device = next(self.model.parameters()).device
        b = batch.to(device)
        gene_embs, h = self.model.embed_inputs(b.src, b.values)
        inputs = []
        for layer in self.model.transformer_encoder.layers:
            inputs.append(h)
            h = layer(h, src_key_padding_mask=b.padding_mask)
        return {"batch": b, "gene_embs": gene_embs, "inputs": inputs, "final": h}

    @torch.no_grad()
    def run_from(self, cache: dict, layer: int, *, decoders: bool = True) -> dict[str, torch.Tensor]:
        """Outputs of the model when blocks `layer`.. are recomputed from the cached input of `layer`.

        With ``decoders=False`` only ``cell_emb`` is returned (the expression decoders are skipped: what an
        embedding-only evaluation needs).
        """
        b = cache["batch"]
        if layer < 0:
            gene_embs, h = self.model.embed_inputs(b.src, b.values)
            layer = 0
        else:
            gene_embs = cache["gene_embs"]
            h = cache["inputs"][layer] if layer < self.n_layers else cache["final"]
        for blk in self.model.transformer_encoder.layers[layer:]:
            h = blk(h, src_key_padding_mask=b.padding_mask)
        if not decoders:
            return {"cell_emb": h[:, 0, :]}
        return self.model.heads(h, gene_embs)
