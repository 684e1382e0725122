"""The Llama-family runner: decoders (Llama, Mistral, Qwen2 layouts) are instrumented and scanned through the
low-level API (`scsuperweight.find_superweights` with batches of forward kwargs, e.g. a tokenizer's output), but
no single-cell tokenisation of AnnData exists for them, so the AnnData steps refuse them with one clear line.
"""

from __future__ import annotations

from ..errors import DataError
from .hf import HFRunner


class LlamaRunner(HFRunner):
    """Registered so that the family is known; the AnnData face refuses it (see module docstring)."""

    def _refuse(self, step: str):
        msg = (f"tl.{step} on AnnData supports scGPT and BERT-family (Geneformer-like) models; this is a "
               f"{self.family} model. Use the low-level API (find_superweights with batches of forward kwargs).")
        raise DataError(msg)

    def configure(self, step, *, required=True, reconstruction=False, **options) -> dict:
        self._refuse(step)

    def prepare(self, adata, **kwargs):
        self._refuse("prepare")

    def evaluator(self, masked, plain, n_cells, *, emb="mean", progress=False):
        msg = ("pruning needs a reconstruction metric; it is implemented for scGPT and BERT-family masked LMs "
               f"(Geneformer), not for the {self.family} family.")
        raise DataError(msg)
