"""Where an edit's effect can be put back, a token's id, and a constant activation patch: shared by prune's
conditions, ablation's builders and the runners' evaluators (all patch the activation an edit changes downstream)."""

from __future__ import annotations

import torch

from ..errors import DataError
from .edit import ActivationPatch, ScalarEdit


def restore_target(adapter, e: ScalarEdit, spike_site: str, channel: int) -> tuple[str, int] | None:
    """(site, channel) whose baseline activation undoes the edit `e` downstream of it, or None.

    A weight candidate writes the spike site (a down-projection's output): restoring that site's channel puts the
    super activation back. A LayerNorm gain/bias dimension acts after the spike, inside the norm: the activation to
    put back is the norm's output at that dimension (patching the spike site upstream of the edited norm would not
    undo the edit at all).
    """
    module = e.param.rsplit(".", 1)[0]
    norm_out = [s.name for s in adapter.sites.values() if s.module == module and s.io == "out"]
    if adapter.param(e.param).dim() == 1 and norm_out:
        return norm_out[0], int(e.index[0])
    if spike_site in adapter.sites and adapter.sites[spike_site].io == "out":
        return spike_site, channel
    return None


def token_id(adapter, token: str) -> int | None:
    """The id of `token` in the model's vocabulary (or the adapter's id -> token map), None when it has none."""
    vocab = getattr(adapter.model, "vocab", None)
    if vocab and token in vocab:
        return int(vocab[token])
    id2 = getattr(adapter, "id_to_token", None) or {}
    for i, t in id2.items():
        if t == token:
            return int(i)
    return None


def constant_patches(name: str, patch: tuple | None, token_ids: torch.Tensor | None) -> list[ActivationPatch]:
    """The `ActivationPatch` of a constant patch ``(site, channel, value, token_id)`` (None: no patch) for a batch
    whose (B, L) token ids are `token_ids`; `name` (the condition) for the error when the batch has none."""
    if patch is None:
        return []
    site, channel, value, tid = patch
    if tid is None:
        return [ActivationPatch(site, channel, float(value), "all")]
    if token_ids is None:
        msg = f"{name} patches the token id {tid}; the batch has no token ids to find it in."
        raise DataError(msg)
    return [ActivationPatch(site, channel, float(value), token_ids.eq(tid))]


__all__ = ["constant_patches", "restore_target", "token_id"]
