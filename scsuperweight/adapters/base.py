"""The adapter protocol: what the instrumenting and detection code needs to know about a transformer.

An adapter names a model's blocks and the sites inside each block (by one vocabulary shared by every family),
says which parameters can be candidates at each site, reads the token ids and padding of the batch being run,
and runs a batch. Trace, edit, detect and prune see models only through this.

Site kinds (per block `L{i}`): ``attn_out`` (attention output projection, before the residual add), ``ffn_in``
(input of the up-projection), ``ffn_hidden`` (input of the down-projection), ``ffn_out`` (output of the
down-projection, before the residual add), ``norm1_in``/``norm1_out``/``norm2_in``/``norm2_out`` (the block's two
norms; for pre-norm models the input norm is norm1), ``block_out``. Embedding-level sites are named ``emb.<kind>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

SITE_KINDS = ("attn_out", "ffn_in", "ffn_hidden", "ffn_out", "norm1_in", "norm1_out", "norm2_in", "norm2_out",
              "block_out")


@dataclass(frozen=True)
class Site:
    """A place in the network whose activation can be hooked."""

    name: str  # e.g. "L2.ffn_out" or "emb.gene_norm_out"
    layer: int  # block index; -1 for embedding-level sites
    kind: str  # one of SITE_KINDS or an embedding-level kind
    module: str  # dotted module name that is hooked
    io: str  # "in": the module's first input; "out": its output (first element when a tuple)
    # a linear whose output is this site: its weight name, and the site holding its input (None: not hookable)
    proj_param: str | None = None
    proj_input_site: str | None = None
    # a norm whose output (kind *_out) or input (kind *_in) this is: its weight and bias names
    norm_weight: str | None = None
    norm_bias: str | None = None
    # for a residual-stream write (ffn_out, attn_out): the norm that receives it next
    next_norm: str | None = None


@dataclass
class BatchContext:
    """What a hook needs to know about the batch being run."""

    token_ids: torch.Tensor | None  # (B, L)
    padding_mask: torch.Tensor | None  # (B, L) True at padding
    cells: np.ndarray | None = None  # (B,) global cell indices when the runner knows them


@dataclass
class Adapter:
    """Base adapter; subclasses fill `sites` and implement the few model-specific methods."""

    model: nn.Module
    family: str = "generic"
    sites: dict[str, Site] = field(default_factory=dict)
    n_layers: int = 0
    post_norm: bool = True
    token_module: str = ""  # an nn.Embedding whose first input is the token ids (read by Trace for context)
    pad_token_id: int | None = None  # padding is where token == pad_token_id (None: no padding)

    # -- names ---------------------------------------------------------------------------------------------
    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def param(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)

    def block_name(self, layer: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_name(self, token_id: int) -> str:
        return str(int(token_id))

    def special_token_ids(self) -> set[int]:
        return set()

    def candidate_id(self, param: str, index: Sequence[int]) -> str:
        """A short, stable id for one scalar, e.g. ``L2.linear2[5,17]``."""
        return f"{self.short_param(param)}[{','.join(str(int(i)) for i in index)}]"

    def short_param(self, param: str) -> str:
        return param

    # -- batches -------------------------------------------------------------------------------------------
    def context_from_tokens(self, token_ids: torch.Tensor) -> BatchContext:
        pad = token_ids.eq(self.pad_token_id) if self.pad_token_id is not None else None
        return BatchContext(token_ids, pad)

    def batch_context(self, batch) -> BatchContext:
        """Context of a batch given to `run` (overrides the one read from the token module when known)."""
        return BatchContext(None, None)

    def run(self, batch) -> Any:  # pragma: no cover - abstract
        """Run one batch (a family-specific batch object, or a dict of forward kwargs)."""
        raise NotImplementedError

    def synthetic_batch(self, n_tokens: int = 256, seed: int = 0):  # pragma: no cover
        """One synthetic input for the data-free detector (the paper used one prompt)."""
        raise NotImplementedError

    # -- site selection ------------------------------------------------------------------------------------
    def select_sites(self, spec: str | Sequence[str] | Callable[[Site], bool] | None) -> list[Site]:
        """Sites by exact name, kind (``ffn_out`` = that kind in every layer), glob, list or predicate."""
        import difflib
        import fnmatch

        if spec is None or spec == "all":
            return list(self.sites.values())
        if callable(spec):
            return [s for s in self.sites.values() if spec(s)]
        names = [spec] if isinstance(spec, str) else list(spec)
        out: dict[str, Site] = {}
        for n in names:
            hits = [s for s in self.sites.values() if s.name == n or s.kind == n or fnmatch.fnmatchcase(s.name, n)]
            if not hits:
                from ..errors import HookError

                options = list(self.sites) + sorted({s.kind for s in self.sites.values()})
                close = difflib.get_close_matches(n, options, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                msg = (f"unknown site {n!r} for this {self.family} model.{hint} Sites look like "
                       f"{list(self.sites)[:4]}; kinds are {sorted({s.kind for s in self.sites.values()})}.")
                raise HookError(msg)
            for s in hits:
                out[s.name] = s
        return list(out.values())
