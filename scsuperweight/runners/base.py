"""The runner protocol: everything one model family needs above its adapter, behind one small interface.

An adapter names a model's blocks and sites and runs one batch; a runner turns AnnData into that family's inputs
(match genes, tokenise, plain and fixed seeded masked batches, the background genes, counts for the params), embeds
cells, and runs a pruning condition into per-cell reconstruction arrays plus cell embeddings. `tl`, `genes`,
`prune`, `pipeline` and `cli` see families only through this; `scsuperweight.runners.get_runner` picks the runner
from ``get_adapter(model).family``.

A condition given to an evaluator is any object with ``.edits`` (a list of `scsuperweight.instrument.ScalarEdit`)
and ``.restore`` (``(site, channel, token_id)`` whose baseline activation is put back where the input token is
``token_id``, or None), such as `scsuperweight.prune.Condition`; optionally ``.patch``, a constant activation
patch ``(site, channel, value, token_id or None)`` (`scsuperweight.instrument.targets.constant_patches`: a
mean-activation ablation), and ``.name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from ..adapters import Adapter, get_adapter
from ..errors import DataError


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows kept as they are)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)


def capture_channel(model, module: str, channel: int, run) -> torch.Tensor:
    """`channel` of the output of `module` during `run()` (a forward of `model`), detached; the hook is removed."""
    captured = {}

    def hook(m, a, out):
        x = out[0] if isinstance(out, tuple) else out
        captured["x"] = x[..., channel].detach().clone()

    h = model.get_submodule(module).register_forward_hook(hook)
    try:
        run()
    finally:
        h.remove()
    return captured["x"]


@dataclass(frozen=True, eq=False)
class Inputs:
    """One family's inputs for a set of cells, built once and shared by every condition of a step."""

    tok: Any  # the family's tokenised cells (scGPT `TokenizedCells`, Geneformer `GeneformerTokens`)
    plain: list  # batches without a mask, every cell once
    masked: list | None  # the same cells with a fixed, seeded reconstruction mask (None without mask_ratio)
    n_cells: int
    background: np.ndarray  # genes present in both the data and the vocabulary, named as genes.tsv names them
    gene_counts: dict  # genes matched (and the data's total), for the params record


class Evaluator(Protocol):
    """Runs pruning conditions over fixed batches."""

    forwards: int  # blocks computed so far (the efficiency benchmark reads it)

    def run(self, cond) -> dict[str, np.ndarray]:
        """Per-cell reconstruction arrays (n_cells,) named by the family's metrics, and ``"cls"`` (n_cells, d)."""
        ...


class Runner:
    """Base class of the family runners; a subclass registered with `scsuperweight.runners.register_runner`.

    Class attributes: ``mask_ratio`` (the family's pretraining mask ratio, the default of every masked step) and
    ``options`` (names of the family's own keyword arguments of the AnnData steps, e.g. Geneformer's
    ``token_dictionary``). What the family's metrics are (names, direction, which one is primary) is not kept here:
    `scsuperweight.metrics.registry` owns it, and the metrics a family's evaluator returns name the family there.
    """

    mask_ratio: ClassVar[float] = 0.25
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model):
        self.adapter: Adapter = get_adapter(model)
        self.model = self.adapter.model

    @property
    def family(self) -> str:
        return self.adapter.family

    # -- AnnData -> inputs -----------------------------------------------------------------------------------
    def configure(self, step: str, *, required: bool = True, reconstruction: bool = False, **options) -> dict:
        """Check that `step` can run on AnnData with this model and take the family's `options`.

        `required`: the step reads cells (False for a data-free scan); `reconstruction`: the step measures masked
        reconstruction (prune). Returns the family's entries for ``uns["ssw"]["params"][step]``.
        """
        return {}

    def describe(self, **options) -> dict:
        """The family's `options` as run.json's params record them (paths or sizes, never the objects)."""
        return {}

    def accepted(self, options: dict) -> dict:
        """The entries of `options` this family's steps take (what a face forwards to `tl`)."""
        return {k: v for k, v in options.items() if k in self.options}

    def full_seq_len(self) -> int | None:
        """The model's own input length (tokens per cell), or None when the family's tokeniser decides it."""
        return None

    def analysis_seq_len(self, max_seq_len: int | str | None) -> int | None:
        """Tokens per cell of scan / prune / run for `max_seq_len` (an int, ``"full"`` or None for the default).

        The base keeps the family's own input length for None and ``"full"``: the 512-token default
        (`scsuperweight.plan.PRUNE_MAX_SEQ_LEN`) is a random gene subsample, which only scGPT's tokeniser draws
        (Geneformer's rank-value encoding would keep its top-ranked genes instead, a different input)."""
        return None if max_seq_len in (None, "full") else int(max_seq_len)

    def prepare(self, adata, *, gene_key: str | None = None, layer: str | None = None,
                max_seq_len: int | None = None, seed: int = 0, batch_size: int = 32, cells=None,
                mask_ratio: float | None = None, **options) -> Inputs:  # pragma: no cover - abstract
        """Tokens, plain batches and (with `mask_ratio`) fixed, seeded masked batches of `adata[cells]`."""
        raise NotImplementedError

    def empty_cells(self, adata, *, gene_key: str | None = None, layer: str | None = None) -> np.ndarray | None:
        """(n_obs,) bool: cells with no counts in any gene this model reads (they carry no measurement), found
        without tokenising; None when the family cannot tell cheaply (its tokeniser then handles them)."""
        return None

    # -- running ----------------------------------------------------------------------------------------------
    def embed(self, inputs: Inputs, *, edits=None, progress: bool = False) -> np.ndarray:  # pragma: no cover
        """L2-normalised (n_cells, d) cell embeddings of `inputs.plain`, optionally under `edits`."""
        raise NotImplementedError

    def evaluator(self, masked: Sequence, plain: Sequence, n_cells: int, *, emb: str = "mean",
                  progress: bool = False) -> Evaluator:
        """An object whose ``run(cond)`` measures one pruning condition (see `Evaluator`)."""
        msg = (f"pruning needs a reconstruction metric; it is not implemented for the {self.family} family "
               f"({type(self.model).__name__}).")
        raise DataError(msg)

    @property
    def reconstruction_metrics(self) -> tuple[str, ...]:
        """The per-cell arrays this family's evaluator returns besides ``"cls"`` (from the metrics registry)."""
        from ..metrics import registry

        return registry.reconstruction(self.family)

    def primary_metric(self, measured: set[str] | None = None) -> str:
        """The metric the verdicts judge candidates on, given the metrics prune measured (the metrics registry's,
        with its stand-in when the primary one was not measured)."""
        from ..metrics import registry

        return registry.primary_metric(self.family, measured or None)

    # -- what genes.py needs ----------------------------------------------------------------------------------
    def masked_errors(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per masked position of `batch`: (row in the batch, true token id, error); None if the model has none."""
        return None

    def token_embeddings(self) -> torch.Tensor | None:
        """(vocab, d) token embeddings as the first block sees them; default the raw token embedding."""
        if self.adapter.token_module:
            return self.model.get_submodule(self.adapter.token_module).weight
        return None
