"""Family runners behind one registry: the only place above the adapters that knows model families.

``get_runner(model)`` returns the runner of ``get_adapter(model).family``: scGPT (`ScGPTRunner`), BERT/Geneformer
(`BertRunner`), Llama (`LlamaRunner`, registered, refused by the AnnData steps). A new family is one runner class
(see `Runner`) registered with ``register_runner(family, cls)`` beside an adapter that names its blocks.

Examples
--------
>>> from scsuperweight.runners import get_runner
>>> runner = get_runner(model)
>>> inputs = runner.prepare(adata, batch_size=32, mask_ratio=runner.mask_ratio)
>>> emb = runner.embed(inputs)
"""

from __future__ import annotations

from ..adapters import get_adapter
from ..errors import DataError
from .base import Evaluator, Inputs, Runner, l2_normalise
from .bert import BertRunner
from .llama import LlamaRunner
from .scgpt import ScGPTRunner

RUNNERS: dict[str, type[Runner]] = {}  # family -> runner class, in registration order


def register_runner(family: str, cls: type[Runner]) -> None:
    """Make `cls` the runner of models whose adapter says ``family`` (replacing any earlier one)."""
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        msg = f"register_runner({family!r}, {cls!r}): the runner must be a subclass of scsuperweight.runners.Runner."
        raise TypeError(msg)
    RUNNERS[family] = cls


def get_runner(model) -> Runner:
    """The runner of `model`'s family (a model or its adapter); a one-line DataError for an unknown family."""
    adapter = get_adapter(model)
    cls = RUNNERS.get(adapter.family)
    if cls is None:
        msg = (f"no runner for the {adapter.family!r} model family ({type(adapter.model).__name__}); supported "
               f"families: {', '.join(RUNNERS)}. Register one with scsuperweight.runners.register_runner.")
        raise DataError(msg)
    return cls(adapter)


register_runner("scgpt", ScGPTRunner)
register_runner("bert", BertRunner)
register_runner("llama", LlamaRunner)

__all__ = ["RUNNERS", "BertRunner", "Evaluator", "Inputs", "LlamaRunner", "Runner", "ScGPTRunner", "get_runner",
           "l2_normalise", "register_runner"]
