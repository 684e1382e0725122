"""Where an edit's effect can be put back, and a token's id: shared by prune's restore condition and ablation's
activation-level mean (both patch the activation a candidate's edit changes downstream)."""

from __future__ import annotations

from .edit import ScalarEdit


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


__all__ = ["restore_target", "token_id"]
