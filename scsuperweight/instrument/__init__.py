"""Hooks and edits: `Trace` (streaming reductions over named sites) and `edit` (exact, verified restore)."""

from ..models._torch import no_fastpath  # re-exported: the layers above import it from here
from .edit import ActivationPatch, ScalarEdit, edit, swapped
from .trace import SiteStats, Trace

__all__ = ["ActivationPatch", "ScalarEdit", "SiteStats", "Trace", "edit", "no_fastpath", "swapped"]
