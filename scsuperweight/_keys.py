"""The one place that names every AnnData key and every output column.

Everything that writes to an AnnData or to a table in the output directory takes its names from here,
so the DESIGN.md output contract is defined once.
"""

from __future__ import annotations

# AnnData keys
UNS_KEY = "ssw"  # default namespace under adata.uns
OBSM_EMB = "X_scGPT"  # L2-normalised <cls> embedding
OBSM_EMB_PRUNED = "X_scGPT_pruned"  # embedding of the top candidate pruned

# uns["ssw"][...] sub-keys
UNS_PARAMS = "params"
UNS_SUPERWEIGHTS = "superweights"
UNS_ACTIVATIONS = "activations"
UNS_COLLAPSE = "collapse"
UNS_VERDICTS = "verdicts"
UNS_GENES = "genes"
UNS_ENRICHMENT = "enrichment"
UNS_RUN = "run"

# output files in an output directory
FILE_SUPERWEIGHTS = "superweights.tsv"
FILE_ACTIVATIONS = "activations.tsv"
FILE_COLLAPSE = "collapse.tsv"
FILE_VERDICTS = "verdicts.tsv"
FILE_GENES = "genes.tsv"
FILE_ENRICHMENT = "enrichment.tsv"
FILE_RESULTS = "results.h5ad"
FILE_REPORT = "report.html"
FILE_RUN = "run.json"

# superweights.tsv (contract columns first; more are welcome after them)
SUPERWEIGHT_COLUMNS = [
    "candidate", "kind", "layer", "param", "row", "col", "value",
    "spike", "spike_ratio", "token", "stability",
]
# activations.tsv
ACTIVATION_COLUMNS = ["layer", "site", "max_abs", "median_abs", "channel", "token", "stability"]
# collapse.tsv
COLLAPSE_COLUMNS = ["condition", "metric", "group", "value", "delta", "ci_low", "ci_high", "p_value"]
# genes.tsv
GENE_COLUMNS = ["candidate", "gene", "score", "rank"]
# enrichment.tsv
ENRICHMENT_COLUMNS = ["candidate", "gene_set", "term", "nes", "odds_ratio", "p_value", "fdr", "genes"]

# candidate kinds
KIND_FFN_DOWN = "ffn_down"
KIND_LN_WEIGHT = "ln_weight"
KIND_LN_BIAS = "ln_bias"
KIND_ATTN_OUT = "attn_out"

# collapse.tsv condition names
COND_BASELINE = "baseline"


def cond_prune(candidate: str) -> str:
    return f"prune:{candidate}"


def cond_random(k: int) -> str:
    return f"random:{k}"


COND_TOP_OUTLIERS = "top_outliers"


def cond_restore(candidate: str) -> str:
    return f"restore:{candidate}"


def cond_scale(candidate: str, factor: float) -> str:
    return f"scale:{candidate}:{factor:g}"


GROUP_ALL = "all"
GROUP_SEP = "|"  # label|condition
