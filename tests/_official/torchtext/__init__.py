"""Test-only stand-in for the `torchtext` package, so that the official `scgpt` 0.2.4 imports on modern torch.

The last torchtext release cannot load on torch >= 2.4, yet `scgpt.tokenizer.gene_tokenizer` imports
`torchtext.vocab` at import time (``import torchtext.vocab as torch_vocab`` and ``from torchtext.vocab import
Vocab``). Only that module is provided, in pure Python. The parity test puts `tests/_official` on `sys.path` for its
own duration; nothing in the package or the other tests ever sees it.
"""

__version__ = "0.0.0+scsuperweight-standin"
