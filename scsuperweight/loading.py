"""`load_model`: one entry for official scGPT directories, the shipped demo model and transformers directories."""

from __future__ import annotations

from pathlib import Path

import torch

from ._log import logger
from .errors import CheckpointError
from .models.checkpoint import ARGS_FILE, WEIGHTS_FILE, load_scgpt

DEMO_DIR = Path(__file__).resolve().parent / "checkpoints" / "demo"


def detect_format(path: str | Path) -> str:
    """'scgpt' for an official scGPT directory, 'transformers' for a config.json + weights directory."""
    path = Path(path)
    if (path / ARGS_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        return "scgpt"
    if (path / "config.json").is_file():
        return "transformers"
    if not path.exists():
        msg = f"model path not found: {path}. Pass an official scGPT directory, a transformers directory, or 'demo'."
        raise CheckpointError(msg)
    found = sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else [path.name]
    msg = (f"{path} is neither an official scGPT directory ({ARGS_FILE}, vocab.json, {WEIGHTS_FILE}) nor a "
           f"transformers directory (config.json + weights); it holds {found}.")
    raise CheckpointError(msg)


def load_model(path: str | Path = "demo", device: str | torch.device | None = None):
    """Load a model for analysis, in eval mode.

    Parameters
    ----------
    path
        ``"demo"`` (the small scGPT shipped with the package), an official scGPT checkpoint directory
        (``args.json``, ``vocab.json``, ``best_model.pt``), or a local transformers directory (``config.json`` and
        weights; Geneformer/BERT or Llama family), read offline only.
    device
        Torch device; default CPU.

    Returns
    -------
    The model. scGPT models carry ``.vocab`` (gene -> id), ``.args`` (args.json) and ``.config``.

    Examples
    --------
    >>> import scsuperweight as ssw
    >>> model = ssw.load_model("demo")
    >>> model.config.nlayers
    4
    """
    if str(path) == "demo":
        if not (DEMO_DIR / WEIGHTS_FILE).is_file():
            msg = (f"the demo checkpoint is missing from the installation ({DEMO_DIR}); rebuild it with "
                   "`scsuperweight pretrain --recipe demo`.")
            raise CheckpointError(msg)
        path = DEMO_DIR
    kind = detect_format(path)
    logger.info("loading %s model from %s", kind, path)
    if kind == "scgpt":
        return load_scgpt(path, device=device)
    from .adapters.hf import load_transformers  # lazy: transformers is heavy

    return load_transformers(path, device=device)
