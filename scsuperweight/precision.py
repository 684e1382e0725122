"""Mixed precision for forwards, float32 for everything computed from them.

On a GPU a bf16 forward runs on the tensor cores at several times the fp32 rate. Only the forward is autocast: the
weights stay float32 (so edits and restores stay exact), and every output is cast to float32 before a metric,
reduction or comparison sees it. `--dtype fp32` is the reference; bf16 keeps fp32's exponent range (the large
activations super weights make do not overflow), fp16 does not and is offered for GPUs without bf16. The device
itself is checked by `scsuperweight.checks.check_device` (one error for --device cuda on a CPU-only torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager, nullcontext

import torch

from .errors import DataError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or a torch dtype among them) -> the torch dtype."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    key = str(name).lower().replace("float", "fp").replace("bfp16", "bf16")
    if key not in DTYPES:
        msg = f"`dtype` must be one of {list(DTYPES)}; got {name!r}. bf16 on a recent GPU, fp32 on a CPU."
        raise DataError(msg)
    return DTYPES[key]


def autocast_forward(device: str | torch.device, dtype: str | torch.dtype = "fp32"):
    """Context for a forward in `dtype` on `device` (a no-op for fp32). Use it around the model call only."""
    dt = parse_dtype(dtype)
    if dt == torch.float32:
        return nullcontext()
    dev_type = torch.device(device).type
    try:
        # no cast cache: autocast keeps the low-precision copy of each weight for the whole region, so a scalar
        # edited inside it (every prune condition, every scan round) would be invisible to the forward
        return torch.autocast(device_type=dev_type, dtype=dt, cache_enabled=False)
    except RuntimeError as err:  # e.g. a dtype this device's autocast does not support
        msg = f"autocast to {dtype} is not supported on {dev_type} ({str(err).splitlines()[0]}); use bf16 or fp32."
        raise DataError(msg) from None


def float32_outputs(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every floating tensor of a forward's outputs as float32, so metrics and reductions run at full precision."""
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in outputs.items()}


@contextmanager
def forward_precision(model: torch.nn.Module, dtype: str | torch.dtype = "fp32"):
    """`autocast_forward` on the model's own device."""
    device = next(model.parameters()).device
    with autocast_forward(device, dtype):
        yield
