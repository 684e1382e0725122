"""Metrics of embeddings under weight edits: the computations and the one registry of what each metric means.

``compute`` holds the numbers (kNN label agreement, Leiden, silhouette, Kobak-Berens preservation, collapse
diagnostics, bootstrap intervals, empirical p-values); ``registry`` holds what the project knows about each metric
that the prune step reports (readable label, direction, per cell or per set, needs labels, model families, doc, the
primary metric of each family). Adding a metric: compute it here, add its `MetricSpec` to ``registry.METRICS``,
and the README's metric table (a test checks that table against the registry).

Leaf package: numpy, scipy, scikit-learn, igraph and leidenalg only; no torch.
"""

from scsuperweight.metrics import compute as _compute
from scsuperweight.metrics.compute import *  # noqa: F403 - the computations, as `metrics.<name>`
from scsuperweight.metrics.compute import _pairs_from_condensed as _pairs_from_condensed  # for its tests
from scsuperweight.metrics.registry import METRICS, MetricSpec

__all__ = [*_compute.__all__, "METRICS", "MetricSpec"]
