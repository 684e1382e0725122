"""`edit`: zero, scale, set or shift chosen scalars (weights, LayerNorm gain/bias dimensions), swap whole
tensors, and patch activations, then put everything back bit for bit.

Edits are in place on `param.data` (torch.nn.utils.prune would rename parameters). The original values are
copied before the first change and written back on exit, also on exceptions; the restoration is then checked
against a byte-level fingerprint of every touched parameter, so "restored" is verified, not assumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..errors import HookError
from ..models._torch import no_fastpath


@dataclass(frozen=True)
class ScalarEdit:
    """Change one entry of a parameter: ``value`` if given, else ``original * factor + add``.

    ``factor=0`` zeroes it (the default); ``value`` sets it (a LayerNorm bias set to a mean); ``add`` shifts it (a
    bias that absorbs a mean contribution). Several edits of one entry each start from the original value.
    """

    param: str
    index: tuple[int, ...]
    factor: float = 0.0
    value: float | None = None
    add: float = 0.0

    def apply(self, original: torch.Tensor) -> torch.Tensor:
        if self.value is not None:
            return torch.full_like(original, self.value)
        new = original * self.factor
        return new + self.add if self.add else new


@dataclass
class ActivationPatch:
    """Overwrite one channel of a site's activation at chosen positions.

    `values` is a float (a constant), or a tensor (B, L) of the values to put back (e.g. the baseline activation
    recorded for the same batch: the paper's "restore the super activation"), or a callable returning one from the
    site's current activation. `positions` is ``"all"``, ``"cls"``/``0`` (the first token), or a (B, L) bool mask.
    """

    site: str
    channel: int
    values: float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
    positions: str | int | torch.Tensor = "all"


def _fingerprint(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()


def _as_edits(targets, factor: float) -> list[ScalarEdit]:
    """Accept ScalarEdits, (param, index[, factor]) tuples, or a candidates DataFrame (param, row, col)."""
    if targets is None:
        return []
    if hasattr(targets, "iterrows"):
        import pandas as pd  # a DataFrame was passed, so pandas is loaded

        out = []
        for _, r in targets.iterrows():
            col = r.get("col")
            # an LN dimension has no col: None, "", NaN, or pd.NA (find_superweights gives an Int64 column)
            idx = (int(r["row"]),) if col is None or (isinstance(col, str) and col == "") or bool(pd.isna(col)) \
                else (int(r["row"]), int(col))
            out.append(ScalarEdit(str(r["param"]), idx, factor))
        return out
    if isinstance(targets, ScalarEdit) or (isinstance(targets, tuple) and isinstance(targets[0], str)):
        targets = [targets]
    out = []
    for t in targets:
        if isinstance(t, ScalarEdit):
            out.append(t)
        else:
            param, index, *rest = t
            index = (int(index),) if isinstance(index, int) else tuple(int(i) for i in index)
            out.append(ScalarEdit(param, index, float(rest[0]) if rest else factor))
    return out


@contextmanager
def edit(model: nn.Module | Adapter, targets: Iterable | None = None, *, factor: float = 0.0,
         patches: Sequence[ActivationPatch] | None = None, verify: bool = True):
    """Temporarily edit scalars and patch activations; restore every parameter bit for bit on exit.

    Parameters
    ----------
    model
        The model (or its adapter).
    targets
        Scalars to edit: `ScalarEdit`s, ``(param_name, index)`` or ``(param_name, index, factor)`` tuples, or a
        candidates table with ``param``, ``row``, ``col`` (an LN dimension has an empty ``col``).
    factor
        Default multiplier for targets that do not carry their own (0 zeroes them).
    patches
        Activation patches active for the duration.
    verify
        Check on exit that every touched parameter's bytes equal what they were before.

    Examples
    --------
    >>> with edit(model, [("transformer_encoder.layers.1.linear2.weight", (5, 17))]):
    ...     out = model(src, values, mask)   # the scalar is 0 here
    >>> # and back to its exact original value here
    """
    adapter = get_adapter(model)
    net = adapter.model
    edits = _as_edits(targets, factor)
    params: dict[str, nn.Parameter] = {}
    for e in edits:
        try:
            p = net.get_parameter(e.param)
        except AttributeError:
            msg = f"no parameter named {e.param!r} in this model; use names from model.named_parameters()."
            raise HookError(msg) from None
        if len(e.index) != p.dim() or any(not 0 <= i < s for i, s in zip(e.index, p.shape)):
            msg = f"index {e.index} is out of range for {e.param} of shape {tuple(p.shape)}."
            raise HookError(msg)
        params[e.param] = p
    prints = {name: _fingerprint(p) for name, p in params.items()} if verify else {}
    originals: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    handles = []
    try:
        with torch.no_grad():
            for e in edits:
                key = (e.param, e.index)
                p = params[e.param]
                if key not in originals:
                    originals[key] = p.data[e.index].clone()
                p.data[e.index] = e.apply(originals[key])
        if patches:
            switch = no_fastpath(net)  # patched modules must really be called
            switch.__enter__()
            handles.append(switch)
            for patch in patches:
                handles.append(_register_patch(adapter, patch))
        yield edits
    finally:
        for h in reversed(handles):
            h.__exit__(None, None, None) if hasattr(h, "__exit__") else h.remove()
        with torch.no_grad():
            for (name, index), value in originals.items():
                params[name].data[index] = value
        if verify:
            bad = [n for n, p in params.items() if _fingerprint(p) != prints[n]]
            if bad:  # pragma: no cover - would mean torch changed memory under us
                msg = f"parameters {bad} were not restored bit for bit after the edit."
                raise HookError(msg)


@contextmanager
def swapped(model: nn.Module | Adapter, tensors: dict[str, torch.Tensor], *, verify: bool = True):
    """Temporarily replace whole parameters (``{name: new values}``, same shapes); restore them bit for bit.

    For edits that touch every entry of a tensor (fake quantisation, a permuted copy) where per-scalar
    `ScalarEdit`s would be wasteful. The originals are copied once; on exit (also on error) they are written back
    and, with `verify`, every swapped parameter's bytes are checked against its fingerprint from before.

    Examples
    --------
    >>> with swapped(model, {"transformer_encoder.layers.0.linear2.weight": w_quantised}):
    ...     out = model(src, values, mask)
    """
    net = get_adapter(model).model
    params: dict[str, nn.Parameter] = {}
    for name, t in tensors.items():
        try:
            p = net.get_parameter(name)
        except AttributeError:
            msg = f"no parameter named {name!r} in this model; use names from model.named_parameters()."
            raise HookError(msg) from None
        if tuple(t.shape) != tuple(p.shape):
            msg = f"replacement for {name} has shape {tuple(t.shape)}, the parameter {tuple(p.shape)}."
            raise HookError(msg)
        params[name] = p
    prints = {name: _fingerprint(p) for name, p in params.items()} if verify else {}
    originals = {name: p.data.clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.data.copy_(tensors[name].to(p.device, p.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.data.copy_(originals[name])
        if verify:
            bad = [n for n, p in params.items() if _fingerprint(p) != prints[n]]
            if bad:  # pragma: no cover - would mean torch changed memory under us
                msg = f"parameters {bad} were not restored bit for bit after the swap."
                raise HookError(msg)


def _position_mask(positions, shape: tuple[int, int], device) -> torch.Tensor:
    B, L = shape
    if isinstance(positions, torch.Tensor):
        return positions.to(device).bool()
    mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    if positions == "all":
        mask[:] = True
    elif positions in ("cls", 0, "first"):
        mask[:, 0] = True
    elif isinstance(positions, int):
        mask[:, positions] = True
    else:
        msg = f"positions must be 'all', 'cls', an int or a (B, L) bool mask, got {positions!r}."
        raise HookError(msg)
    return mask


def _register_patch(adapter: Adapter, patch: ActivationPatch):
    if patch.site not in adapter.sites:
        adapter.select_sites(patch.site)  # raises with suggestions
    site = adapter.sites[patch.site]
    if site.io != "out":
        msg = f"activation patches act on module outputs; {patch.site} is an input site."
        raise HookError(msg)
    module = adapter.model.get_submodule(site.module)

    def hook(mod, args, output):
        x = output[0] if isinstance(output, tuple) else output
        squeeze = x.dim() == 2
        xb = x[None] if squeeze else x
        B, L, _ = xb.shape
        mask = _position_mask(patch.positions, (B, L), xb.device)
        vals = patch.values(xb[..., patch.channel]) if callable(patch.values) else patch.values
        new = xb.clone()
        chan = new[..., patch.channel]
        if isinstance(vals, torch.Tensor):
            vals = vals.to(chan.device, chan.dtype)
            chan[mask] = vals.expand(B, L)[mask] if vals.dim() == 2 or vals.dim() == 0 else vals
        else:
            chan[mask] = float(vals)
        new = new[0] if squeeze else new
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)
