"""AnnData keys, candidate kinds and condition names.

The output tables (uns keys, files, columns and their types) are defined once, in `scsuperweight.results`; the
old names (``UNS_SUPERWEIGHTS``, ``FILE_COLLAPSE``, ``GENE_COLUMNS``, ...) still resolve here, read from it.
"""

from __future__ import annotations

# AnnData keys
UNS_KEY = "ssw"  # default namespace under adata.uns
UNS_SOURCE = "ssw_source"  # a sample read from data on disk: {"sha256": the source's hash, "path", "n_cells"}
OBSM_EMB = "X_scGPT"  # L2-normalised <cls> embedding
OBSM_EMB_PRUNED = "X_scGPT_pruned"  # embedding of the top candidate pruned
# obs column: True for a cell with no counts in any gene the model knows (written by a step run with empty="drop"
# or "keep" when there are such cells; their embedding rows are NaN and no metric counts them)
OBS_EMPTY = "ssw_no_vocab_counts"

# uns["ssw"][...] sub-keys that are not tables (the tables, their files and columns: scsuperweight.results)
UNS_PARAMS = "params"
UNS_RUN = "run"

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


COND_JOINT = "joint"  # every passing candidate zeroed together (scsuperweight.ablation)

GROUP_ALL = "all"
GROUP_SEP = "|"  # label|condition


_TABLE_ALIASES = {"SUPERWEIGHT": "superweights", "ACTIVATION": "activations", "COLLAPSE": "collapse",
                  "CONTRAST": "contrasts", "CONDITION": "conditions", "GENE": "genes", "ENRICHMENT": "enrichment",
                  "VERDICT": "verdicts"}


def __getattr__(name: str):
    """UNS_<TABLE>, FILE_<TABLE>, <TABLE>_COLUMNS and FILE_RESULTS / FILE_REPORT / FILE_RUN, read from the schema
    in `scsuperweight.results` so that no name is written twice."""
    from . import results as R

    kind, _, rest = name.partition("_")
    if kind in ("UNS", "FILE"):
        if kind == "FILE" and rest.lower() in R.FILES:
            return R.FILES[rest.lower()].file
        if rest.lower() in R.TABLES:
            s = R.TABLES[rest.lower()]
            return s.uns_key if kind == "UNS" else s.file
    if name.endswith("_COLUMNS") and name[: -len("_COLUMNS")] in _TABLE_ALIASES:
        return list(R.TABLES[_TABLE_ALIASES[name[: -len("_COLUMNS")]]].contract)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
