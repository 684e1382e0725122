"""Torch switches shared by the layers above; here because models import nothing else of the package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def no_fastpath(model: nn.Module | None = None) -> Iterator[None]:
    """Run the block on torch's regular attention path; restore the previous settings after.

    Torch's fused fast path (eval + no_grad) bypasses submodule hooks and never calls
    scaled_dot_product_attention, so hooks, patches and the fast kernels all need it off. With `model`, its
    ``nn.TransformerEncoder`` modules also stop packing padded batches into nested tensors (which skips the
    per-layer modules too).
    """
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    modules = [] if model is None else model.modules()
    nested = [(m, m.use_nested_tensor) for m in modules if isinstance(m, nn.TransformerEncoder)]
    for m, _ in nested:
        m.use_nested_tensor = False
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)
        for m, flag in nested:
            m.use_nested_tensor = flag
