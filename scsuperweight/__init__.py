"""scsuperweight: find, prune and interpret super-weight-like parameters in scGPT (and other transformers).

Model side: ``load_model``, ``Trace``, ``edit``, ``find_superweights``. AnnData side (scanpy style): ``tl``, ``pl``,
``get``, ``report``. Command line: ``scsuperweight --help``.
"""

from __future__ import annotations

import importlib

from ._log import logger
from .loading import load_model

__version__ = "0.1.0"

_LAZY = {
    "Trace": ("instrument.trace", "Trace"),
    "edit": ("instrument.edit", "edit"),
    "find_superweights": ("detect", "find_superweights"),
    "weight_screen": ("detect", "weight_screen"),
    "save_model": ("models.checkpoint", "save_scgpt"),
    "report": ("report", "report"),
    "get_adapter": ("adapters", "get_adapter"),
}
_SUBMODULES = {"tl", "pl", "get", "datasets", "metrics", "enrich", "data", "models", "adapters", "instrument",
               "pipeline"}


def __getattr__(name: str):
    # heavy pieces (scanpy, gseapy, transformers, matplotlib) load on first use, not at import
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    msg = f"module 'scsuperweight' has no attribute {name!r}"
    raise AttributeError(msg)


__all__ = ["load_model", "logger", "__version__", *_LAZY, *sorted(_SUBMODULES)]
