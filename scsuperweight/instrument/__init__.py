"""Hooks and edits: `Trace` (streaming reductions over named sites) and `edit` (exact, verified restore)."""

from .edit import ActivationPatch, ScalarEdit, edit
from .trace import SiteStats, Trace, no_fastpath

__all__ = ["ActivationPatch", "ScalarEdit", "SiteStats", "Trace", "edit", "no_fastpath"]
