"""Adapters: one protocol over scGPT and transformers models (BERT/Geneformer and Llama families)."""

from __future__ import annotations

from torch import nn

from .base import SITE_KINDS, Adapter, BatchContext, Site


def get_adapter(model: nn.Module | Adapter) -> Adapter:
    """The adapter for `model` (an adapter passes through); a clear error for unknown architectures."""
    if isinstance(model, Adapter):
        return model
    cached = getattr(model, "_ssw_adapter", None)
    if cached is not None:
        return cached
    from ..models.scgpt import ScGPTModel

    if isinstance(model, ScGPTModel):
        from .scgpt import ScGPTAdapter

        adapter = ScGPTAdapter(model)
    else:
        from .hf import hf_adapter  # lazy: transformers is heavy

        adapter = hf_adapter(model)
    object.__setattr__(model, "_ssw_adapter", adapter)  # not a submodule: plain attribute
    return adapter


__all__ = ["Adapter", "BatchContext", "Site", "SITE_KINDS", "get_adapter"]
