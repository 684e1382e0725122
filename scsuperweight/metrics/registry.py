"""What the project knows about each metric the prune step reports, in one place.

One `MetricSpec` per metric: its readable label, its direction (+1 higher is better, -1 lower is better), whether
it is defined per cell (averaged over any group and bootstrapped) or per set of cells, whether it needs cell labels,
which model families measure it (empty: every family, the embedding metrics), what it means, and for which families
it is the primary metric (the one the verdicts judge candidates on). prune, pl, report, tl, train and the README's
metric table read it from here; a metric absent from the registry (e.g. a new evaluator's array) is still reported,
with its name as label and no known direction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MetricSpec",
    "METRICS",
    "spec",
    "label",
    "direction",
    "worse",
    "primary_metric",
    "per_cell",
    "set_level",
    "reconstruction",
    "needs_labels",
    "default_metric",
    "markdown_table",
]

HIGHER = +1  # higher is better
LOWER = -1  # lower is better


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str  # readable name, in figures and the report
    direction: int  # HIGHER (+1) or LOWER (-1) is better
    level: str  # "cell": one value per cell; "set": one value per group of cells
    needs_labels: bool  # computed only when cell labels (cell types) are given
    families: tuple[str, ...]  # model families that measure it; () = every family
    doc: str
    primary_for: tuple[str, ...] = ()  # families whose verdicts are judged on it


def _m(name, label, direction, level, needs_labels, families, doc, primary_for=()) -> tuple[str, MetricSpec]:
    return name, MetricSpec(name, label, direction, level, needs_labels, tuple(families), doc, tuple(primary_for))


_SCGPT, _BERT = ("scgpt",), ("bert",)
METRICS: dict[str, MetricSpec] = dict([
    # reconstruction of masked inputs: each family's evaluator returns its own, per cell
    _m("gep_mse", "expression-reconstruction MSE (GEP)", LOWER, "cell", False, _SCGPT,
       "masked-expression MSE of the per-position decoder (mlm_output) on masked genes"),
    _m("gep_pearson", "expression-reconstruction Pearson r (GEP)", HIGHER, "cell", False, _SCGPT,
       "Pearson r between predicted and true bins on masked genes (mlm_output)"),
    _m("gepc_mse", "masked-expression MSE (GEPC)", LOWER, "cell", False, _SCGPT,
       "masked MSE of the MVC decoder (mvc_output), predicting genes from the cell embedding alone",
       primary_for=_SCGPT),
    _m("gepc_pearson", "masked-expression Pearson r (GEPC)", HIGHER, "cell", False, _SCGPT,
       "Pearson r of the MVC decoder on masked genes"),
    _m("mlm_loss", "masked-token cross-entropy (MLM)", LOWER, "cell", False, _BERT,
       "masked-LM cross-entropy (nats) of the masked gene tokens of a cell (transformers masked LMs such as "
       "Geneformer)", primary_for=_BERT),
    _m("mlm_accuracy", "masked-token top-1 accuracy (MLM)", HIGHER, "cell", False, _BERT,
       "top-1 accuracy of the masked-LM head on the masked gene tokens of a cell"),
    # the cell embeddings, per cell
    _m("knn_accuracy", "kNN cell-type accuracy", HIGHER, "cell", True, (),
       "leave-one-out kNN label accuracy of the cell embeddings (cross-validated by construction)"),
    _m("silhouette", "cell-type silhouette", HIGHER, "cell", True, (),
       "cosine silhouette of the labels in embedding space; higher = types better separated"),
    _m("knn_preservation", "kNN neighbourhood preservation", HIGHER, "cell", False, (),
       "Kobak-Berens KNN: fraction of each cell's k nearest baseline neighbours kept"),
    _m("cls_cosine_to_baseline", "<cls> cosine to baseline embedding", HIGHER, "cell", False, (),
       "cosine between a cell's embedding and its baseline embedding (scGPT: the <cls> output; transformers: the "
       "evaluator's embedding, the mean over genes by default)"),
    # the cell embeddings, per set
    _m("leiden_ari", "Leiden ARI vs cell types", HIGHER, "set", True, (),
       "ARI between Leiden clusters of the embeddings and the labels"),
    _m("leiden_nmi", "Leiden NMI vs cell types", HIGHER, "set", True, (),
       "NMI between Leiden clusters of the embeddings and the labels"),
    _m("knc_preservation", "k-nearest-class preservation", HIGHER, "set", True, (),
       "Kobak-Berens KNC: fraction of each class mean's nearest class means kept"),
    _m("cpd", "pairwise-distance correlation (CPD)", HIGHER, "set", False, (),
       "Kobak-Berens CPD: Spearman correlation of pairwise distances with the baseline"),
    # a collapsing embedding drives all cells towards one direction: mean cosine goes up
    _m("mean_cosine", "mean pairwise cosine of embeddings", LOWER, "set", False, (),
       "mean pairwise cosine of the embeddings; 1 = all cells collapsed onto one direction"),
    _m("effective_rank", "effective rank of embeddings", HIGHER, "set", False, (),
       "effective rank of the embeddings (Roy & Vetterli); low = collapsed"),
])

# the metric a figure or the report shows when none is named: primary metrics first, then identity, then geometry
_DEFAULT_ORDER = ("gepc_mse", "gep_mse", "mlm_loss", "knn_accuracy", "leiden_ari", "silhouette",
                  "cls_cosine_to_baseline", "mean_cosine", "effective_rank")


def spec(name: str) -> MetricSpec | None:
    """The registry entry of `name`, None for a metric the registry does not know."""
    return METRICS.get(name)


def label(name: str) -> str:
    """The readable name of a metric (the metric itself when unknown)."""
    s = METRICS.get(name)
    return s.label if s is not None else name


def direction(name: str) -> int | None:
    """+1 when higher is better, -1 when lower is better, None when unknown."""
    s = METRICS.get(name)
    return s.direction if s is not None else None


def worse(delta, name: str):
    """How much worse a change makes the model (positive = worse); |delta| when the direction is unknown."""
    d = direction(name)
    delta = np.asarray(delta, dtype=float)
    return np.abs(delta) if d is None else -d * delta


def needs_labels(name: str) -> bool:
    s = METRICS.get(name)
    return s is not None and s.needs_labels


def _measured_by(s: MetricSpec, family: str | None) -> bool:
    return family is None or not s.families or family in s.families


def per_cell(family: str | None = None) -> tuple[str, ...]:
    """Per-cell metrics (of `family`, or of every family)."""
    return tuple(n for n, s in METRICS.items() if s.level == "cell" and _measured_by(s, family))


def set_level(family: str | None = None) -> tuple[str, ...]:
    """Set-level metrics (of `family`, or of every family)."""
    return tuple(n for n, s in METRICS.items() if s.level == "set" and _measured_by(s, family))


def reconstruction(family: str) -> tuple[str, ...]:
    """The reconstruction metrics `family`'s evaluator returns (the per-cell metrics only that family measures)."""
    return tuple(n for n, s in METRICS.items() if family in s.families)


def primary_metric(family: str, measured: Iterable[str] | None = None) -> str:
    """The metric verdicts of `family` are judged on.

    When `measured` is given and the family's primary metric is not among them (a scGPT model without the MVC
    decoder has no ``gepc_*``), the family's first measured reconstruction metric of the same direction and level
    (``gep_mse``) stands in.
    """
    primary = [n for n, s in METRICS.items() if family in s.primary_for]
    if not primary:
        known = sorted({f for s in METRICS.values() for f in s.primary_for})
        msg = f"family={family!r} has no primary metric in the registry; families with one: {known}."
        raise KeyError(msg)
    if measured is not None:
        measured = set(measured)
        if primary[0] not in measured:
            first = METRICS[primary[0]]
            stand_in = [m for m in reconstruction(family) if m in measured and METRICS[m].direction ==
                        first.direction and METRICS[m].level == first.level]
            if stand_in:
                return stand_in[0]
    return primary[0]


def default_metric(present: Iterable[str]) -> str | None:
    """The metric to show when none is named: the first of `present` in the registry's preference order."""
    present = list(present)
    return next((m for m in _DEFAULT_ORDER if m in present), None)


def markdown_table() -> str:
    """The README's metric table, generated from the registry."""
    rows = ["| metric | what | better | per | needs labels | families |", "|---|---|---|---|---|---|"]
    for s in METRICS.values():
        fams = ", ".join(s.families) if s.families else "all"
        if s.primary_for:
            fams += " (primary for " + ", ".join(s.primary_for) + ")"
        what = f"{s.label}: {s.doc}".replace("<", "&lt;").replace(">", "&gt;")  # <cls> is text, not a tag
        rows.append(f"| `{s.name}` | {what} | {'higher' if s.direction > 0 else 'lower'} | "
                    f"{s.level} | {'yes' if s.needs_labels else 'no'} | {fams} |")
    return "\n".join(rows)
