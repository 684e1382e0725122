"""AnnData face (scanpy style): `embed`, `scan`, `prune`, `genes`, `enrich`.

Each takes `adata` first, writes only under its own key (``adata.uns["ssw"]`` by default, embeddings in
``adata.obsm["X_scGPT"]`` / ``["X_scGPT_pruned"]``), records its parameters in ``uns[key]["params"][step]``, and
returns None (or a copy with ``copy=True``). Stored tables are DataFrames that survive ``write_h5ad``.

Models: scGPT (binned expression through its vocab), or a transformers BERT-family masked LM such as Geneformer,
fed rank-value encoded cells through the user's ``token_dictionary=`` and ``gene_medians=`` (given once per model;
remembered on its adapter). The steps, tables and keys are the same for both; only the reconstruction metrics are
the family's own (``gep*_`` vs ``mlm_*``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from . import _keys as K
from . import results as R
from ._log import logger
from .data.tokenize import empty_cells_message
from .errors import DataError

if TYPE_CHECKING:
    from .plan import BudgetChoice, Calibration, Plan

# ------------------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------------------


def _resolve_model(model, device=None):
    if isinstance(model, str | Path):
        from .loading import load_model

        model = load_model(model)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _ns(adata, key: str) -> dict:
    return R.namespace(adata, key)


_plain = R._plain


def _record(adata, key: str, step: str, params: dict) -> None:
    _ns(adata, key)[K.UNS_PARAMS][step] = json.dumps(_plain(params), sort_keys=True)


h5ad_safe = R.h5ad_safe


def _store(adata, key: str, name: str, df: pd.DataFrame) -> None:
    R.store(adata, name, df, key=key)


def _obs_column(adata, col: str | None, what: str) -> np.ndarray | None:
    if col is None:
        return None
    if col not in adata.obs.columns:
        msg = (f"{what}={col!r} is not a column of adata.obs; columns are {list(adata.obs.columns)}. "
               f"Pass the column that holds the {what.replace('_key', '').replace('_', ' ')}.")
        raise DataError(msg)
    v = adata.obs[col]
    if v.isna().any():
        msg = f"adata.obs[{col!r}] has {int(v.isna().sum())} missing values; fill or drop those cells first."
        raise DataError(msg)
    return v.astype(str).to_numpy()


def stratified_subsample(labels: np.ndarray | None, n_obs: int, max_per_label: int | None, seed: int,
                         max_cells: int | None = None) -> np.ndarray:
    """Seeded subsample: at most `max_per_label` cells per label (and `max_cells` overall), sorted indices."""
    rng = np.random.default_rng(seed)
    if labels is None or max_per_label is None:
        idx = np.arange(n_obs)
    else:
        parts = []
        for lab in sorted(set(labels)):
            cells = np.flatnonzero(labels == lab)
            parts.append(rng.choice(cells, max_per_label, replace=False) if len(cells) > max_per_label else cells)
        idx = np.concatenate(parts)
    if max_cells is not None and len(idx) > max_cells:
        idx = rng.choice(idx, max_cells, replace=False)
    return np.sort(idx)


# -- checks before any work ----------------------------------------------------------------------------------
def _check_inputs(adata, model, *, device=None, label_key: str | None = None, condition_key: str | None = None,
                  donor_key: str | None = None, case=None, control=None, empty: str = "error", **options) -> tuple:
    """Every check of a step's arguments, before a model loads or a cell is tokenised: the AnnData and model
    arguments, the cells-without-counts policy, numeric options (`scsuperweight.checks.OPTION_RULES`), the
    device, obs keys, and the case and control levels. Returns ``(case, control)`` (None, None without a
    condition)."""
    from .checks import check_device, check_model, check_obs_key, check_options, resolve_case_control
    from .data.tokenize import EMPTY_POLICIES
    from .errors import OptionError

    if adata is None:
        msg = "adata is None; pass an AnnData, e.g. adata = sc.read_h5ad('cells.h5ad')."
        raise DataError(msg)
    if not isinstance(model, str | Path):
        check_model(model)
    if empty not in EMPTY_POLICIES:
        msg = (f"empty={empty!r} is not a policy for cells with no counts in any vocab gene; pass one of "
               f"{', '.join(EMPTY_POLICIES)} (--empty in the CLI).")
        raise OptionError(msg)
    check_options(**options)
    if device is not None:
        check_device(device, option="device")
    for name, col in (("label_key", label_key), ("donor_key", donor_key)):
        if col is not None:
            check_obs_key(adata, col, option=name)
    if condition_key is None:
        if case is not None or control is not None:
            msg = f"case={case!r} / control={control!r} given without condition_key; pass the obs column too."
            raise OptionError(msg)
        return None, None
    levels = check_obs_key(adata, condition_key, option="condition_key")
    return resolve_case_control(levels, case, control)


def _eligible(runner, adata, *, gene_key, layer, empty: str, step: str) -> np.ndarray | None:
    """(n_obs,) bool of cells with counts in some vocab gene, or None when all have (or the family cannot tell).

    ``empty="error"`` refuses cells without such counts (one line with the fix); ``"drop"`` and ``"keep"`` leave
    them out of every metric and flag them in ``obs[K.OBS_EMPTY]`` (``"keep"`` also embeds them, as NaN rows)."""
    is_empty = runner.empty_cells(adata, gene_key=gene_key, layer=layer)
    if is_empty is None or not is_empty.any():
        return None
    n = int(is_empty.sum())
    if empty == "error":
        names = ", ".join(map(str, adata.obs_names[np.flatnonzero(is_empty)[:3]]))
        raise DataError(empty_cells_message(n, adata.n_obs, names, where=f"tl.{step}: "))
    if n == adata.n_obs:
        msg = (f"tl.{step}: all {n} cells have no counts in any vocab gene; check layer= (raw counts) and "
               "gene_key= (gene names the vocab knows).")
        raise DataError(msg)
    adata.obs[K.OBS_EMPTY] = is_empty
    logger.warning("%s: %d of %d cells have no counts in any vocab gene; empty=%r: %s (obs[%r])", step, n,
                   adata.n_obs, empty, "left out" if empty == "drop" else "NaN embeddings", K.OBS_EMPTY)
    return ~is_empty


def _empty_record(eligible: np.ndarray | None, empty: str) -> dict:
    return {"empty": empty, "n_empty": 0 if eligible is None else int((~eligible).sum())}


def _subsample(labels, n_obs: int, max_per_label, seed: int, eligible: np.ndarray | None,
               max_cells: int | None = None) -> np.ndarray:
    """`stratified_subsample` over the eligible cells only (all of them when `eligible` is None)."""
    if eligible is None:
        return stratified_subsample(labels, n_obs, max_per_label, seed, max_cells)
    pool = np.flatnonzero(eligible)
    pick = stratified_subsample(None if labels is None else labels[pool], len(pool), max_per_label, seed, max_cells)
    return pool[pick]


# -- model families ------------------------------------------------------------------------------------------
# Everything family-specific (tokenising, batches, embeddings, reconstruction, each family's own options such as
# Geneformer's token dictionary) lives in its runner; the steps below ask `get_runner(model)` and never branch.


def _runner(model, step: str, *, required: bool = True, reconstruction: bool = False, **options):
    """The model's runner, configured for `step` (a clear DataError when the family cannot run it), and the
    family's entries for the step's params."""
    from .runners import get_runner

    runner = get_runner(model)
    return runner, runner.configure(step, required=required, reconstruction=reconstruction, **options)


def _seq_len_record(runner, max_seq_len: int | None, asked) -> dict:
    """What scan / prune record of their tokens per cell: the length used, as asked, the model's own, and the
    consequence in words (`scsuperweight.plan.seq_len_note`); empty for a family whose tokeniser decides it."""
    from .plan import seq_len_note

    full = runner.full_seq_len()
    if full is None or max_seq_len is None:
        return {}
    return {"max_seq_len_asked": asked, "model_max_seq_len": full,
            "seq_len_note": seq_len_note(int(max_seq_len), full, requested=asked)}


# ------------------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------------------


def embed(adata, model="demo", *, gene_key: str | None = None, layer: str | None = None, batch_size: int = 64,
          max_seq_len: int | None = None, token_dictionary=None, gene_medians=None, symbol_key: str | None = None,
          seed: int = 0, device=None, key_added: str = K.OBSM_EMB, empty: str = "error", copy: bool = False,
          progress: bool = True, store=None, block_size: int = 2048):
    """Cell embeddings, L2-normalised: scGPT's `<cls>` output (as the official embedding task computes it), or for a
    BERT-family model (Geneformer) the mean of the final hidden states over a cell's genes.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or ``layer``); genes matched to the vocab by ``var_names`` (or ``var[gene_key]``; for a
        Geneformer-like model the column of Ensembl IDs when ``var_names`` are symbols).
    model
        A loaded model or a path / ``"demo"``.
    max_seq_len
        Longest input; default the model's (scGPT ``args.json``; transformers ``max_position_embeddings``).
    token_dictionary, gene_medians
        Geneformer-like models only (required once per model, then remembered on its adapter): Ensembl ID ->
        token id, and Ensembl ID -> non-zero median; dicts, ``.json`` or ``.pkl`` files.
    symbol_key
        Geneformer-like models: ``var`` column of gene symbols for token names (default ``var_names``).
    key_added
        ``obsm`` key written (default ``"X_scGPT"``, kept for every family so that `pl` and the report find it),
        ready for ``sc.pp.neighbors(adata, use_rep=key_added)``.
    empty
        Cells with no counts in any vocab gene: ``"error"`` (default) refuses them, ``"drop"`` does not embed
        them, ``"keep"`` embeds them as ``<cls>`` alone; either way their rows are NaN, ``obs["ssw_no_vocab_counts"]``
        flags them and the params say how many.

    store, block_size
        Data on disk (a path, a folder or glob of per-donor .h5ad files, a backed AnnData or a
        `scsuperweight.data.sources.Source`) is embedded block by block (`block_size` cells) into the resumable
        store folder `store` (required then; a killed call resumes), never holding all cells' counts or tokens.

    Returns
    -------
    None, or a copy with ``copy=True``. Writes ``adata.obsm[key_added]`` (n_obs, d) and
    ``uns["ssw"]["params"]["embed"]``. For data on disk: a new AnnData (obs of every cell, ``obsm[key_added]``,
    the params with each file's gene overlap), also written to ``store/embeddings.h5ad``.

    Examples
    --------
    >>> import scsuperweight as ssw
    >>> adata = ssw.datasets.synthetic_ad(n_cells=300)
    >>> ssw.tl.embed(adata, "demo")
    >>> adata.obsm["X_scGPT"].shape
    (300, 64)
    """
    from . import atlas

    if atlas.is_streamed(adata):
        if store is None:
            msg = "tl.embed on data on disk writes a resumable store: pass store='path/to/store' (a folder)."
            raise DataError(msg)
        return atlas.embed_anndata(adata, _resolve_model(model, device), store, key_added=key_added,
                                   gene_key=gene_key, layer=layer, batch_size=batch_size, max_seq_len=max_seq_len,
                                   seed=seed, block_size=block_size, token_dictionary=token_dictionary,
                                   gene_medians=gene_medians, symbol_key=symbol_key, progress=progress)
    _check_inputs(adata, model, device=device, empty=empty, batch_size=batch_size, max_seq_len=max_seq_len,
                  seed=seed)
    adata = adata.copy() if copy else adata
    model = _resolve_model(model, device)
    runner, described = _runner(model, "embed", token_dictionary=token_dictionary, gene_medians=gene_medians,
                                symbol_key=symbol_key)
    eligible = _eligible(runner, adata, gene_key=gene_key, layer=layer, empty=empty, step="embed")
    if eligible is None:
        inputs = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                                batch_size=batch_size)
        adata.obsm[key_added] = runner.embed(inputs, progress=progress)
    else:  # drop: embed the others; keep: embed all (`<cls>` alone for the empty ones); empty rows NaN either way
        cells = None if empty == "keep" else np.flatnonzero(eligible)
        inputs = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                                batch_size=batch_size, cells=cells, empty=empty)
        emb = runner.embed(inputs, progress=progress)
        full = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
        full[np.arange(adata.n_obs) if cells is None else cells] = emb
        full[~eligible] = np.nan
        adata.obsm[key_added] = full
    _record(adata, K.UNS_KEY, "embed", dict(gene_key=gene_key, layer=layer, batch_size=batch_size,
                                          max_seq_len=max_seq_len, seed=seed, key_added=key_added,
                                          family=runner.family, **_empty_record(eligible, empty), **described,
                                          **inputs.gene_counts))
    return adata if copy else None


def scan(adata, model="demo", *, mode: str = "data", label_key: str | None = None, gene_key: str | None = None,
         layer: str | None = None, max_cells: int | None = 1000, batch_size: int = 32, max_seq_len: int | None = None,
         min_ratio: float = 20.0, min_abs: float = 0.0, max_rounds: int = 10, stop_fraction: float = 0.1,
         include_ln: bool = True, include_attn: bool = True, weight_only: bool = True, token_dictionary=None,
         gene_medians=None, symbol_key: str | None = None, null_k: int = 20, null_method: str = "both",
         null_cells: int = 64, seed: int = 0, device=None, key: str = K.UNS_KEY, empty: str = "error",
         copy: bool = False, progress: bool = True, screen: str | Sequence[str] = ("activation", "weight_only"),
         max_tokens: int | None = None):
    """Find super-weight-like parameters from activation spikes over the cells (and a weight-only screen).

    Writes ``uns[key]["superweights"]`` (the `superweights.tsv` table: activation candidates, then the weight-only
    screen's rows flagged ``screen="weight_only"``), ``uns[key]["activations"]`` (per layer and site) and
    ``uns[key]["params"]["scan"]`` (thresholds, stop reason, rounds). Cells are subsampled to ``max_cells``
    (stratified by ``label_key`` when given). ``mode="data_free"`` uses one synthetic cell instead. A BERT-family
    (Geneformer-like) model reads the cells through ``token_dictionary`` and ``gene_medians`` (see `embed`); its
    ``token`` column then names genes by symbol. Cells with no counts in any vocab gene are refused, or with
    ``empty="drop"``/``"keep"`` left out of the scan (see `embed`).

    With ``null_k > 0`` (default 20) the detection null runs too (`scsuperweight.detect_null.scan_null`): the
    same trace through ``null_k`` null copies of the checkpoint (``null_method``: ``"gaussian"``, ``"permute"`` or
    ``"both"``) on the data-free cell (``mode="data_free"``) or on ``null_cells`` of the scanned cells, adding
    ``perm_p``, ``perm_q`` and ``perm_p_max`` (and ``*_permute`` with ``"both"``) to the table and recording in
    ``params["scan"]["null"]`` how often a null copy passes the fixed threshold. 0 skips it.

    `screen` picks the screens, in the table's order: ``"activation"`` (spikes over the cells), ``"weight_only"``
    (the largest weights of each matrix; also switched off by ``weight_only=False``) and ``"gradient"`` (the
    first-order null: the scalars whose removal one backward pass predicts to move the primary metric most,
    `scsuperweight.firstorder.gradient_screen`; scGPT, with data). `max_seq_len` caps each cell's tokens (scGPT's
    own seeded random gene subsampling): by default at most 512 (`scsuperweight.plan.PRUNE_MAX_SEQ_LEN`, or the
    model's length when shorter), ``1200`` or ``"full"`` the model's full length; a BERT-family model keeps its own
    input length by default. The params record the length and its consequence (``seq_len_note``). `max_tokens`
    builds batches to at most that many padded tokens.

    Data on disk (a path, a folder or glob of per-donor .h5ad files, a backed AnnData or a Source): the stratified
    sample is drawn from obs alone, only its cells are read, and the sample is returned as a new AnnData holding
    the results.

    Examples
    --------
    >>> ssw.tl.scan(adata, "demo", label_key="cell_type")
    >>> ssw.get.superweights(adata).head()
    >>> ssw.tl.scan(adata, "demo", screen=("activation", "weight_only", "gradient"))
    """
    from . import atlas
    from .detect import scan as _scan
    from .detect import weight_screen

    fresh = mode == "data" and atlas.is_streamed(adata)
    if fresh:  # the sample is a new AnnData: the results go on it and it is returned
        model = _resolve_model(model, device)  # each file's genes are matched to its vocab before any cell is read
        adata, _ = atlas.sample(adata, label_key=label_key, max_per_label="share", max_cells=max_cells, seed=seed,
                                layer=layer, model=model, gene_key=gene_key)
    _check_inputs(adata, model, device=device, label_key=label_key, empty=empty, max_cells=max_cells,
                  batch_size=batch_size, max_seq_len=max_seq_len, min_ratio=min_ratio, min_abs=min_abs,
                  max_rounds=max_rounds, seed=seed)
    screens = (screen,) if isinstance(screen, str) else tuple(screen)
    unknown = set(screens) - {"activation", "weight_only", "gradient"}
    if unknown or not screens:
        msg = (f"screen={screen!r}: each screen must be one of 'activation', 'weight_only', 'gradient' (at least "
               f"one); e.g. screen=('activation', 'gradient').")
        raise DataError(msg)
    if "gradient" in screens and mode != "data":
        msg = "screen='gradient' needs cells (a backward pass over masked cells); use mode='data'."
        raise DataError(msg)
    adata = adata.copy() if copy and not fresh else adata
    model = _resolve_model(model, device)
    runner, described = _runner(model, "scan", required=mode == "data", token_dictionary=token_dictionary,
                                gene_medians=gene_medians, symbol_key=symbol_key)
    asked_len = max_seq_len
    max_seq_len = runner.analysis_seq_len(max_seq_len) if mode == "data" else None
    overlap = atlas.file_overlap(adata, model, gene_key) if mode == "data" else None
    labels = _obs_column(adata, label_key, "label_key")
    per_label = None if labels is None or max_cells is None else max(1, max_cells // len(set(labels)))
    eligible = _eligible(runner, adata, gene_key=gene_key, layer=layer, empty=empty, step="scan") \
        if mode == "data" else None
    cells = _subsample(labels, adata.n_obs, per_label, seed, eligible, max_cells)
    groups = group_names = None
    batches = None
    masked = None
    if mode == "data":
        extra = {"max_tokens": max_tokens} if max_tokens else {}
        inputs = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                                batch_size=batch_size, cells=cells,
                                mask_ratio=runner.mask_ratio if "gradient" in screens else None, **extra)
        batches, masked = inputs.plain, inputs.masked
        if labels is not None:
            group_names, groups = np.unique(labels[cells], return_inverse=True)
    res = _scan(model, batches, mode=mode, min_ratio=min_ratio, min_abs=min_abs, max_rounds=max_rounds,
                stop_fraction=stop_fraction, include_ln=include_ln, include_attn=include_attn, groups=groups,
                group_names=None if group_names is None else list(group_names), seed=seed, progress=progress) \
        if "activation" in screens else None
    table = res.candidates if res is not None else pd.DataFrame()
    null = None
    if null_k and len(table):
        from .detect_null import scan_null

        table, null = scan_null(model, table, batches, k=null_k, method=null_method, seed=seed, data_seed=seed,
                                null_cells=null_cells, min_ratio=min_ratio, min_abs=min_abs, progress=progress)
    parts = [table]
    if weight_only and "weight_only" in screens:
        parts.append(weight_screen(model))
    if "gradient" in screens:
        from .firstorder import gradient_screen

        parts.append(gradient_screen(model, masked))
    parts = [t for t in parts if len(t)]
    table = pd.concat(parts, ignore_index=True) if len(parts) > 1 else (parts[0] if parts else pd.DataFrame())
    if res is None:  # no activation scan: no activation table, no rounds
        from types import SimpleNamespace

        res = SimpleNamespace(candidates=pd.DataFrame(), activations=pd.DataFrame(), params={},
                              stop_reason="no activation screen", rounds=0)
    _store(adata, key, "superweights", table)
    act = res.activations
    first = R.spec("activations").contract
    if len(act) and set(first) <= set(act.columns):  # the contract columns first, as in the TSV
        act = act[[*first, *(c for c in act.columns if c not in first)]]
    _store(adata, key, "activations", act)
    _record(adata, key, "scan", {**res.params, "label_key": label_key, "max_cells": max_cells,
                                 "n_cells_scanned": int(len(cells)) if mode == "data" else 1,
                                 "stop_reason": res.stop_reason, "rounds": res.rounds, "weight_only": weight_only,
                                 "screen": list(screens), "max_seq_len": max_seq_len, "max_tokens": max_tokens,
                                 **_seq_len_record(runner, max_seq_len, asked_len),
                                 "family": runner.family, "null": null or {"k": 0}, **_empty_record(eligible, empty),
                                 "gene_overlap": overlap, **described})
    n_above = int(res.candidates["above_threshold"].sum()) if len(res.candidates) else 0
    logger.info("scan: %d candidates above threshold; %s", n_above, res.stop_reason)
    return adata if copy or fresh else None


def prune(adata, model="demo", *, label_key: str, condition_key: str | None = None, donor_key: str | None = None,
          candidates: pd.DataFrame | None = None, gene_key: str | None = None, layer: str | None = None,
          max_cells_per_label: int | None = 200, mask_ratio: float | None = None, batch_size: int = 32,
          max_seq_len: int | None = None, n_random: int = 40, max_candidates: int = 6, n_boot: int = 200,
          scale_factors: Sequence[float] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0), primary_metric: str | None = None,
          mean_ablation: bool = True, granularities: Sequence[str] = ("scalar", "neuron", "channel"),
          joint: bool = True, n_unit_random: int = 20, n_matched: int = 20, n_joint: int = 20,
          case=None, control=None, token_dictionary=None, gene_medians=None, symbol_key: str | None = None,
          seed: int = 0, device=None, key: str = K.UNS_KEY, empty: str = "error", copy: bool = False,
          progress: bool = True, sequential: bool = True, budget: str | float | None = None, yes: bool = False,
          dry_run: bool = False, dtype: str = "fp32", max_tokens: int | None = None, first_order: bool = True,
          on_plan=None, max_cells_per_donor: int | None = None, max_cells_per_condition: int | None = None,
          characterise: str = "passing", n_restore: int = 3, n_scale: int = 2, embed_all: bool = True,
          draw_embeddings: bool = True):
    """Zero each candidate and measure the collapse against controls, per cell type and condition.

    Writes ``uns[key]["collapse"]`` (the long `collapse.tsv` table with intervals and p-values vs random scalars),
    ``uns[key]["verdicts"]`` (per candidate: does it pass the controls on the primary metric, and why; see
    `scsuperweight.judge.verdicts`),
    ``uns[key]["contrasts"]`` (per cell type: collapse in case cells minus collapse in control cells, with
    intervals; each row names its case and control),
    ``uns[key]["conditions"]`` (what each condition edited), ``obsm["X_scGPT"]`` (baseline, all cells) and
    ``obsm["X_scGPT_pruned"]`` (all cells, with the top candidate zeroed). Metrics use a stratified subsample of
    at most ``max_cells_per_label`` cells per label, stated in the params.

    Reconstruction metrics are the model family's: scGPT ``gep_mse``/``gep_pearson``/``gepc_mse``/``gepc_pearson``
    (masked expression), a BERT-family masked LM (Geneformer) ``mlm_loss``/``mlm_accuracy`` (masked gene tokens;
    its inputs come from ``token_dictionary``/``gene_medians``, see `embed`). Embedding metrics are shared.

    Parameters
    ----------
    max_seq_len
        Tokens per cell at most, a seeded random subset of each cell's genes as scGPT samples them. Default: 512
        (`scsuperweight.plan.PRUNE_MAX_SEQ_LEN`, or the model's length when shorter), about 3x cheaper per
        condition than 1,200; ``1200`` or ``"full"``: the model's full length. Fidelity, not validity: p-values
        stay exact because every condition and control sees the same inputs, and effects describe 512-gene views
        of the cells. The obsm embeddings are taken at the same length. A BERT-family model keeps its own input
        length by default (its rank-value encoding would keep its top genes, not a random subset). The plan's
        notes and the params (``max_seq_len``, ``seq_len_note``) state the choice.
    mask_ratio
        Fraction of each cell's genes masked for the reconstruction metrics; default the family's pretraining
        ratio (scGPT 0.25, Geneformer 0.15).
    max_cells_per_donor, max_cells_per_condition
        Further caps of the sample, per (label, donor) and per (label, condition); with either, the sample is drawn
        by `scsuperweight.data.sources.stratified_sample` from obs. Data on disk (a path, a folder or glob of
        per-donor .h5ad files, a backed AnnData or a Source) is always sampled that way, only the sampled cells are
        read, and the sample is returned as a new AnnData holding the results (pass ``candidates=``).
    primary_metric
        The metric the report judges candidates on, recorded in the params; default ``gepc_mse`` for scGPT
        (``gep_mse`` when the model has no MVC decoder) and ``mlm_loss`` for a BERT-family model.
    mean_ablation
        Also ``mean:<cand>`` (the candidate's contribution set to its mean over the evaluated cells and tokens) and
        ``mean_activation:<cand>`` (the spike channel set to its mean at the spike token), judged against the same
        parameter's random draws as zeroing.
    granularities
        ``scalar`` (zeroing, always), ``neuron`` (``neuron:<cand>``, the FFN unit in and out) and ``channel``
        (``channel:<cand>``, every write to the residual channel in the block), each against `n_unit_random`
        random neurons / channels of the same block.
    joint
        After the zeroing verdicts, ``joint``: the candidates that pass, zeroed together, against `n_joint` random
        sets of as many scalars of the same parameters (when two or more pass).
    n_matched
        Random scalars per candidate from its own |w| quantile bin (``matched:<cand>:<k>``): the ``p_matched``
        column beside the uniform ``p_value``; 0 for none.
    case, control
        The levels of ``condition_key`` contrasted (case minus control). Default: the common spellings of AD and
        of control are recognised (AD, Alzheimer's disease, dementia, ...; control, ctrl, CT, NCI, ...); any
        other levels are refused with the list, never guessed.
    empty
        Cells with no counts in any vocab gene: refused (``"error"``), or left out of every metric (``"drop"``,
        ``"keep"``; see `embed`).
    sequential
        Draw each parameter's random scalars in rounds and stop once its candidates' decisions on the primary
        metric are settled (Besag & Clifford 1991; `scsuperweight.sequential`): a candidate inside its null costs
        a handful of draws, a strong one all `n_random`. False: all `n_random` draws, as before. collapse.tsv
        records ``null_draws``, ``null_stopped_early`` and ``p_sequential``.
    budget
        A time budget (``"15m"``, ``"2h"``, seconds): cells per label, `max_seq_len`, `n_random` and `n_boot` are
        chosen to fit it from a calibration forward (`scsuperweight.plan.choose_budget`: validity floors first);
        when even their floors do not fit, structural levers follow in `scsuperweight.plan.LEVER_ORDER`
        (`embed_all`, `n_matched`, `n_restore`/`n_scale`, `mean_ablation`, `granularities`, `joint`, then
        `max_candidates` down to 1); the choices and reasons are recorded under ``params["prune"]["budget"]``,
        and a budget even the smallest run exceeds gives a `scsuperweight.plan.OverBudgetWarning` unless `yes`.
    yes, dry_run, on_plan
        The plan (conditions, cells, tokens, FLOPs, estimated time; ``params["prune"]["plan"]``) is made before
        any work and logged, or handed to ``on_plan(plan)``. Above one hour without `budget` or ``yes=True`` a
        `scsuperweight.plan.LongRunWarning` gives the estimate. ``dry_run=True`` records the plan and stops.
    dtype
        ``"bf16"``/``"fp16"``: the evaluator forwards autocast (GPU tensor cores); metrics stay float32/64.
    max_tokens
        Build batches to at most this many padded tokens (cells x longest) instead of `batch_size` cells.
    first_order
        The first-order null (``uns[key]["firstorder"]``, firstorder.tsv): each candidate's rank among all
        scalars of its matrix from one backward pass, and its rank correlation with the exact draws.
    characterise
        ``"passing"`` (default): restore, scaling and the |w|-matched draws only for the candidates whose zeroing
        passes the controls (a second phase after the zeroing verdicts; ``params["not_characterised"]`` says
        which were left out and why); ``"all"``: for every candidate (the issue-time behaviour).
    n_restore, n_scale
        How many candidates (in rank order) get the restore-activation condition and the scaling curve.
    embed_all
        True: ``obsm`` embeddings of every cell (two more forwards of the whole data). False: only the evaluated
        cells' rows, taken from the baseline and top-candidate conditions (no extra forward); the others NaN.
    draw_embeddings
        True: the control draws also run the plain pass for the cell embedding, so the embedding metrics get
        p-values. False (a budget lever): the draws run the masked pass only; the verdicts and sequential nulls
        (on the primary metric) are unchanged, the embedding metrics' p-values are NaN and noted.

    Examples
    --------
    >>> ssw.tl.prune(adata, "demo", label_key="cell_type", condition_key="condition", donor_key="donor")
    >>> ssw.get.collapse(adata).query("group == 'all' and metric == 'gepc_mse'")
    >>> ssw.tl.prune(adata, model, label_key="cell_type", budget="15m")  # fit the run to 15 minutes
    """
    from . import atlas
    from .judge import verdicts
    from .precision import parse_dtype
    from .prune import PruneOptions, select_candidates
    from .prune import prune as _prune

    caps = dict(label_key=label_key, donor_key=donor_key, condition_key=condition_key,
                max_per_label=max_cells_per_label, max_per_donor=max_cells_per_donor,
                max_per_condition=max_cells_per_condition, seed=seed)
    fresh = atlas.is_streamed(adata)
    if fresh:  # only the sample is read; it is a new AnnData, returned with the results
        model = _resolve_model(model, device)  # each file's genes are matched to its vocab before any cell is read
        adata, _ = atlas.sample(adata, layer=layer, model=model, gene_key=gene_key, **caps)
    parse_dtype(dtype)  # a bad name fails now, not after the plan
    case, control = _check_inputs(adata, model, device=device, label_key=label_key, condition_key=condition_key,
                                  donor_key=donor_key, case=case, control=control, empty=empty,
                                  max_cells_per_label=max_cells_per_label, batch_size=batch_size,
                                  max_seq_len=max_seq_len, n_random=n_random, max_candidates=max_candidates,
                                  n_boot=n_boot, seed=seed)
    if candidates is None:
        ns = adata.uns.get(key, {})
        if R.spec("superweights").uns_key not in ns:
            msg = f"no candidates under uns[{key!r}]: run ssw.tl.scan first, or pass candidates=."
            raise DataError(msg)
        candidates = ns[R.spec("superweights").uns_key]
    cand = _candidate_frame(candidates)
    if not len(select_candidates(cand, max_candidates)):
        msg = ("there are no candidates to prune (the scan's table is empty); rerun ssw.tl.scan with a lower "
               "min_ratio, or pass candidates=.")
        raise DataError(msg)
    labels = _obs_column(adata, label_key, "label_key")
    conditions = _obs_column(adata, condition_key, "condition_key")
    donors = _obs_column(adata, donor_key, "donor_key")
    adata = adata.copy() if copy and not fresh else adata
    model = _resolve_model(model, device)
    runner, described = _runner(model, "prune", reconstruction=True, token_dictionary=token_dictionary,
                                gene_medians=gene_medians, symbol_key=symbol_key)
    asked_len, max_seq_len = max_seq_len, runner.analysis_seq_len(max_seq_len)  # scGPT: 512 unless asked
    mask_ratio = runner.mask_ratio if mask_ratio is None else mask_ratio
    overlap = atlas.file_overlap(adata, model, gene_key)
    eligible = _eligible(runner, adata, gene_key=gene_key, layer=layer, empty=empty, step="prune")
    opts = PruneOptions(n_random=n_random, max_candidates=max_candidates, n_boot=n_boot,
                        scale_factors=tuple(scale_factors), seed=seed, mean_ablation=mean_ablation,
                        granularities=tuple(granularities), joint=joint, n_unit_random=n_unit_random,
                        n_matched=n_matched, n_joint=n_joint, primary_metric=primary_metric,
                        sequential=sequential, first_order=first_order, dtype=dtype,
                        characterise=characterise, n_restore=n_restore, n_scale=n_scale,
                        draw_embeddings=draw_embeddings)
    cost = plan_cost(adata, model, cand, opts, labels=labels, max_cells_per_label=max_cells_per_label,
                     max_seq_len=asked_len, budget=budget, gene_key=gene_key, layer=layer, seed=seed,
                     batch_size=batch_size, embed_all=embed_all)
    if cost.budget is not None:  # the budget's choices are the parameters this run uses
        from .prune import budgeted_options

        max_cells_per_label, max_seq_len = cost.budget.cells_per_label, cost.budget.max_seq_len
        opts = budgeted_options(opts, cost.budget)
        embed_all = cost.budget.embed_all
    _announce(cost.plan, on_plan, confirmed=yes or budget is not None, yes=yes)
    cost_params = cost.params()
    if dry_run:
        _record(adata, key, "prune", {**cost_params, "dry_run": True, "label_key": label_key})
        return adata if copy else None
    if fresh or max_cells_per_donor is not None or max_cells_per_condition is not None:
        from .data.sources import stratified_sample  # caps per donor / condition too, drawn from obs

        cells = stratified_sample(adata.obs, **{**caps, "max_per_label": max_cells_per_label})
        cells = cells if eligible is None else cells[eligible[cells]]
    else:
        cells = _subsample(labels, adata.n_obs, max_cells_per_label, seed, eligible)
    extra = {"max_tokens": max_tokens} if max_tokens else {}
    inputs = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                            batch_size=batch_size, cells=cells, mask_ratio=mask_ratio, **extra)
    res = _prune(model, inputs.masked, inputs.plain, cand, labels=labels[cells],
                 conditions=None if conditions is None else conditions[cells],
                 donors=None if donors is None else donors[cells], options=opts, n_cells=len(cells),
                 case=case, control=control, progress=progress)
    from . import dist

    if not dist.context().is_main:  # under torchrun rank 0 alone has the tables, embeds every cell and writes
        return adata if copy or fresh else None
    metrics = set(res.collapse["metric"]) if len(res.collapse) else set()
    if primary_metric is None:
        primary_metric = runner.primary_metric(metrics)
    elif metrics and primary_metric not in metrics:
        msg = (f"primary_metric={primary_metric!r} was not measured for this {runner.family} model; measured metrics "
               f"are {sorted(metrics)}.")
        raise DataError(msg)
    _store(adata, key, "collapse", res.collapse)
    _store(adata, key, "verdicts", verdicts(res.collapse, primary_metric=primary_metric, alpha=opts.alpha,
                                            candidates=res.params["candidates"], ci_level=1 - opts.alpha))
    _store(adata, key, "contrasts", res.contrasts)
    _store(adata, key, "conditions", res.conditions)
    if res.firstorder is not None:
        _store(adata, key, "firstorder", res.firstorder)
    # embeddings of every cell: baseline, and with the top candidate zeroed (cells without counts: NaN rows);
    # without embed_all, the evaluated cells' rows from the conditions already run (no extra forward)
    top = res.params["candidates"][0]
    row = cand[cand["candidate"] == top].iloc[0]
    if embed_all:
        every = None if eligible is None else np.flatnonzero(eligible)
        full = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                              batch_size=batch_size, cells=every, **extra)
        made = ((obsm, runner.embed(full, edits=edits), every) for obsm, edits in
                ((K.OBSM_EMB, None), (K.OBSM_EMB_PRUNED, cand[cand["candidate"] == top])))
    else:
        made = ((obsm, res.embeddings[name], np.asarray(cells)) for obsm, name in
                ((K.OBSM_EMB, K.COND_BASELINE), (K.OBSM_EMB_PRUNED, K.cond_prune(top))))
    for obsm, emb, rows in made:
        if rows is not None:
            emb, part = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32), emb
            emb[rows] = part
        adata.obsm[obsm] = emb
    _record(adata, key, "prune", {**res.params, "label_key": label_key, "condition_key": condition_key,
                                  "donor_key": donor_key, "case": case, "control": control, "mask_ratio": mask_ratio,
                                  "max_cells_per_label": max_cells_per_label, "n_cells_evaluated": int(len(cells)),
                                  "pruned_embedding_of": top, "pruned_param": str(row["param"]),
                                  "primary_metric": primary_metric, "family": runner.family,
                                  "max_seq_len": max_seq_len, "max_tokens": max_tokens, **cost_params,
                                  **_seq_len_record(runner, max_seq_len, asked_len),
                                  **_empty_record(eligible, empty), **described,
                                  "max_cells_per_donor": max_cells_per_donor,
                                  "max_cells_per_condition": max_cells_per_condition, "gene_overlap": overlap,
                                  "embed_all": embed_all})
    return adata if copy or fresh else None


@dataclass(frozen=True)
class Cost:
    """A step's plan before the work and, with a budget, what the budget chose (`plan_cost`)."""

    plan: Plan | None
    budget: BudgetChoice | None = None
    calibration: Calibration | None = None

    def params(self) -> dict:
        """``plan`` and ``budget`` as the params and run.json record them."""
        out: dict = {"plan": None if self.plan is None else self.plan.to_dict()}
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.budget is not None:
            out["budget"] = {k: v for k, v in self.budget.to_dict().items() if k != "plan"}
        return out


def plan_cost(adata, model, candidates: pd.DataFrame | None, opts, *, labels: np.ndarray | None,
              max_cells_per_label: int | None, max_seq_len: int | None = None, budget=None,
              gene_key: str | None = None, layer: str | None = None, seed: int = 0, batch_size: int = 32,
              scan_cells: int = 0, scan_rounds: int = 2, embed_all: bool = True, genes_candidates: int = 0,
              scan_null: tuple = (0, "both", 0)) -> Cost:
    """Plan a prune (and, with `scan_cells`, a scan before it) on this data and device, before any work.

    Tokenises the cells prune would measure (their token counts), times one short calibration forward
    (`scsuperweight.plan.calibrate`), and, with `budget`, lets `scsuperweight.prune.budget_prune` choose cells
    per label, tokens per cell, draws, bootstrap resamples and scan cells. `candidates` None plans an assumed
    layout (a whole run plans before its scan). A family without the FLOP model (not scGPT) gets no plan.

    The calibration times the run's batch shape (its median tokens per cell, `batch_size` cells up to
    `scsuperweight.plan.CALIBRATION_TOKENS` tokens a batch): one warm-up, then the fastest of 3 (a busy machine
    times slow). The budget is what is left of it after this
    planning (tokenising, calibrating). `embed_all` plans prune's embeddings of every cell (a lever of the
    budget); `genes_candidates` the genes step after prune (`run`); `scan_null` the scan's detection null,
    ``(null_k, null_method, null_cells)``. `max_seq_len` as the caller was given it (None: scan and prune's
    default, `scsuperweight.plan.PRUNE_MAX_SEQ_LEN` tokens for scGPT; ``"full"``: the model's); a plan note states
    the length used and its consequence (`scsuperweight.plan.seq_len_note`).
    """
    import time

    from .plan import CALIBRATION_TOKENS, calibrate, has_flops, over_budget_message, parse_budget, seq_len_note
    from .prune import budget_prune, budgeted_options, plan_prune
    from .runners import get_runner

    t_start = time.perf_counter()

    net = getattr(model, "model", model)
    if not has_flops(getattr(net, "config", None)):
        if budget is not None:
            logger.warning("budget=%r ignored: the time model is implemented for scGPT architectures", budget)
        return Cost(None)
    runner = get_runner(model)
    model_max = runner.full_seq_len() or (int(net.args.get("max_seq_len", 1200)) if hasattr(net, "args") else 1200)
    asked_len, max_seq_len = max_seq_len, runner.analysis_seq_len(max_seq_len)  # scan / prune's default: 512
    cells = stratified_subsample(labels, adata.n_obs, max_cells_per_label, seed)
    tok = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len or model_max, seed=seed,
                         batch_size=batch_size, cells=cells).tok
    lengths = np.asarray(tok.lengths, dtype=float)

    def timed(cap: int):  # the run's batch shape at this length (a slice of it: see CALIBRATION_TOKENS)
        n = int(max(8, np.median(np.minimum(lengths, cap))))
        c = calibrate(net, n_tokens=n, n_cells=max(1, min(batch_size, CALIBRATION_TOKENS // n)), repeats=3)
        logger.info("%s", c.describe())
        return c

    cal = timed(int(max_seq_len or model_max))
    inner = batch_size if scan_cells else 0  # a whole run (scan, then prune): prune calibrates for its own plan
    embed_cells = 2 * int(adata.n_obs) if embed_all else 0  # tl.prune embeds every cell, baseline and pruned
    choice = None
    if budget is not None:
        counts = pd.Series(labels).value_counts().to_dict() if labels is not None else {"all": int(adata.n_obs)}

        def choose(rate: float):
            left = max(parse_budget(budget) - (time.perf_counter() - t_start), 1e-3)  # planning is part of the run
            return budget_prune(model, candidates, opts, left, label_counts=counts, tokens=lengths,
                                max_seq_len=int(max_seq_len or model_max), flop_rate=rate,
                                cells_per_label=max_cells_per_label, scan_cells=scan_cells,
                                scan_rounds=scan_rounds, embed_cells=embed_cells, genes_candidates=genes_candidates,
                                scan_null=scan_null, calibration_batch=inner)

        choice = choose(cal.flop_rate)
        for _ in range(2):  # the rate depends on the length (attention grows as its square): time the chosen one
            if abs(int(max(8, np.median(np.minimum(lengths, choice.max_seq_len)))) - cal.n_tokens) <= 1:
                break
            cal = timed(choice.max_seq_len)
            choice = choose(cal.flop_rate)
        spent = time.perf_counter() - t_start
        choice = replace(choice, budget_seconds=parse_budget(budget),
                         reasons=(f"planning took {spent:.0f} s of the budget ({cal.describe()} at "
                                  f"{cal.n_tokens} tokens per cell)", *choice.reasons))
        if not choice.feasible:
            logger.warning("budget %s cannot be met: %s", budget, choice.reasons[-2])
        cells = stratified_subsample(labels, adata.n_obs, choice.cells_per_label, seed)
        opts = budgeted_options(opts, choice)
        max_seq_len, scan_cells = choice.max_seq_len, choice.scan_cells
        embed_cells = embed_cells if choice.embed_all else 0
        genes_candidates = choice.genes_candidates if choice.genes_candidates is not None else genes_candidates
        if choice.null_k is not None:
            scan_null = (choice.null_k, choice.null_method, scan_null[2])
    plan = plan_prune(model, candidates, opts, n_cells=len(cells), tokens=lengths,
                      max_seq_len=max_seq_len or model_max, flop_rate=cal.flop_rate, device=cal.device,
                      scan_cells=scan_cells, scan_rounds=scan_rounds, embed_cells=embed_cells,
                      genes_candidates=genes_candidates, scan_null=scan_null, calibration_batch=inner)
    plan = replace(plan, notes=(*plan.notes, cal.describe(),
                                seq_len_note(int(max_seq_len or model_max), model_max, requested=asked_len)))
    if choice is not None:
        plan = replace(plan, notes=(*plan.notes, *choice.reasons),
                       over_budget="" if choice.feasible else over_budget_message(choice))
    return Cost(plan, choice, cal)


def _announce(plan: Plan | None, on_plan, *, confirmed: bool, yes: bool = False) -> None:
    """Hand the plan to `on_plan` (the CLI prints it and may stop there), else log it and warn above one hour
    (without a budget or `yes`) or over a budget even the smallest run exceeds (without `yes`)."""
    from .plan import format_plan, warn_if_long, warn_if_over_budget

    if plan is None:
        return
    if on_plan is not None:
        on_plan(plan)
        return
    logger.info("%s", format_plan(plan))
    warn_if_long(plan, confirmed=confirmed)
    warn_if_over_budget(plan, confirmed=yes)


def _candidate_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Candidates as stored (strings from h5ad) back to typed columns."""
    return R.typed(pd.DataFrame(df), "superweights")


def genes(adata, model="demo", *, label_key: str | None = None, gene_key: str | None = None,
          layer: str | None = None, max_cells_per_label: int | None = 200, mask_ratio: float | None = None,
          batch_size: int = 32, max_seq_len: int | None = None, max_candidates: int = 3, token_dictionary=None,
          gene_medians=None, symbol_key: str | None = None, seed: int = 0, device=None, key: str = K.UNS_KEY,
          empty: str = "error", copy: bool = False, progress: bool = True):
    """Rank the genes that ride on each top candidate's channel (see `scsuperweight.genes`).

    Writes ``uns[key]["genes"]`` (the `genes.tsv` table with its evidence columns, per cell type when
    ``label_key`` is given) and ``uns[key]["background"]`` (genes present in both the data and the vocab). For a
    BERT-family model (inputs from ``token_dictionary``/``gene_medians``, see `embed`) genes are named by symbol
    and ``recon_delta`` is the change of the masked gene token's cross-entropy; ``mask_ratio`` defaults to the
    family's pretraining ratio (scGPT 0.25, Geneformer 0.15).

    Examples
    --------
    >>> ssw.tl.genes(adata, "demo", label_key="cell_type")
    >>> ssw.get.genes(adata).head()
    """
    from .genes import gene_scores

    _check_inputs(adata, model, device=device, label_key=label_key, empty=empty,
                  max_cells_per_label=max_cells_per_label, batch_size=batch_size, max_seq_len=max_seq_len,
                  max_candidates=max_candidates, seed=seed)
    ns = adata.uns.get(key, {})
    if R.spec("superweights").uns_key not in ns:
        msg = f"no candidates under uns[{key!r}]: run ssw.tl.scan first."
        raise DataError(msg)
    adata = adata.copy() if copy else adata
    model = _resolve_model(model, device)
    runner, described = _runner(model, "genes", token_dictionary=token_dictionary, gene_medians=gene_medians,
                                symbol_key=symbol_key)
    mask_ratio = runner.mask_ratio if mask_ratio is None else mask_ratio
    cand = _candidate_frame(ns[R.spec("superweights").uns_key])
    cand = cand[cand.get("screen", pd.Series("activation", index=cand.index)).astype(str).str.startswith("activation")]
    labels = _obs_column(adata, label_key, "label_key")
    eligible = _eligible(runner, adata, gene_key=gene_key, layer=layer, empty=empty, step="genes")
    cells = _subsample(labels, adata.n_obs, max_cells_per_label, seed, eligible)
    inputs = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                            batch_size=batch_size, cells=cells, mask_ratio=mask_ratio)
    table = gene_scores(model, inputs.plain, inputs.masked, cand, groups=None if labels is None else labels[cells],
                        max_candidates=max_candidates)
    _store(adata, key, "genes", table)
    _ns(adata, key)["background"] = inputs.background
    _record(adata, key, "genes", dict(label_key=label_key, max_cells_per_label=max_cells_per_label,
                                      mask_ratio=mask_ratio, max_candidates=max_candidates, seed=seed,
                                      n_cells=int(len(cells)), family=runner.family,
                                      **_empty_record(eligible, empty), **described))
    return adata if copy else None


def enrich(adata, *, gene_sets=("bundled",), key: str = K.UNS_KEY, top_n: int = 50, permutations: int = 1000,
           min_size: int = 5, max_size: int = 500, seed: int = 0, copy: bool = False, progress: bool = True):
    """Pathway enrichment of each candidate's gene ranking, offline, on local gene sets only.

    GSEA prerank (gseapy) on the gene scores and over-representation of the top ``top_n`` genes, both against an
    explicit background (the genes present in the data and the vocab). ``gene_sets``: "bundled" (our cited AD
    sets), paths to ``.gmt`` files, or dicts. Writes ``uns[key]["enrichment"]`` (`enrichment.tsv`).

    Examples
    --------
    >>> ssw.tl.enrich(adata, gene_sets=["bundled", "h.all.v7.0.symbols.gmt"])
    """
    from . import enrich as E
    from .checks import check_options

    check_options(permutations=permutations, top_n=top_n, seed=seed)
    adata = adata.copy() if copy else adata
    ns = adata.uns.get(key, {})
    if R.spec("genes").uns_key not in ns or "background" not in ns:
        msg = f"no gene scores under uns[{key!r}]: run ssw.tl.genes first."
        raise DataError(msg)
    gs = E.load_gene_sets(list(gene_sets) if not isinstance(gene_sets, str | dict) else gene_sets)
    background = list(np.asarray(ns["background"]).astype(str))
    table = ns[R.spec("genes").uns_key]
    frames = []
    for cand, g in table.groupby("candidate", sort=False):
        scores = pd.Series(pd.to_numeric(g["score"]).to_numpy(), index=g["gene"].astype(str))
        pr = E.prerank(scores, gs, background=background, permutations=permutations, min_size=min_size,
                       max_size=max_size, seed=seed, candidate=str(cand))
        top = g.sort_values("score", ascending=False)["gene"].astype(str).head(top_n).tolist()
        orr = E.ora(top, gs, background=background, candidate=str(cand))
        for f, method in ((pr, "prerank"), (orr, "ora")):
            if len(f):
                f = f.copy()
                f["method"] = method
                frames.append(f)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(R.spec("enrichment").contract))
    if len(out):
        out = out.sort_values(["candidate", "method", "fdr"], kind="stable").reset_index(drop=True)
    _store(adata, key, "enrichment", out)
    _record(adata, key, "enrich", dict(gene_sets=[str(s) for s in (gene_sets if not isinstance(gene_sets, str)
                                                                    else [gene_sets])] if not isinstance(gene_sets,
                                                                                                         dict)
                                       else ["<dict>"], top_n=top_n, permutations=permutations, min_size=min_size,
                                       max_size=max_size, seed=seed, background_size=len(background)))
    return adata if copy else None


def _torch_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def quantize(adata, model="demo", *, candidates: pd.DataFrame | None = None, label_key: str | None = None,
             bits: Sequence[int] = (8, 4), granularities: Sequence[str] = ("tensor", "row", "block"),
             block_sizes: Sequence[int] = (64, 256, 1024, 4096), clips: Sequence[str] = ("none", "mse"),
             max_candidates: int = 6, max_cells_per_label: int | None = 100, max_cells: int | None = 500,
             mask_ratio: float | None = None, batch_size: int = 32, max_seq_len: int | None = None, k: int = 10,
             gene_key: str | None = None, layer: str | None = None, token_dictionary=None, gene_medians=None,
             symbol_key: str | None = None, seed: int = 0, device=None, key: str = K.UNS_KEY, copy: bool = False,
             progress: bool = True):
    """Round-to-nearest quantisation of every linear weight, with and without the candidates held out in full
    precision (the super-weight paper's practical result; see `scsuperweight.quantize`).

    Every combination of `bits` x `granularities` (block sizes for ``"block"``) x `clips` runs twice, rounding
    everything and keeping the top `max_candidates` scalar candidates of the scan (``uns[key]["superweights"]``,
    those above threshold first; or `candidates`) exact and out of the scales. Each setting is measured on a
    stratified subsample of cells: ``<cls>`` cosine to full precision, the family's reconstruction error on fixed
    masked batches and its change, and leave-one-out kNN accuracy on ``label_key``.

    Writes ``uns[key]["quantize"]`` (the `quantize.tsv` table) and ``uns[key]["params"]["quantize"]`` (settings,
    the scalars held out, cells).

    Examples
    --------
    >>> ssw.tl.scan(adata, "demo", label_key="cell_type")
    >>> ssw.tl.quantize(adata, "demo", label_key="cell_type", bits=[4], clips=["none"])
    >>> ssw.get.quantize(adata).query("granularity == 'block'")
    """
    from .quantize import default_settings, quantize_sweep

    adata = adata.copy() if copy else adata
    model = _resolve_model(model, device)
    runner, described = _runner(model, "quantize", reconstruction=True, token_dictionary=token_dictionary,
                                gene_medians=gene_medians, symbol_key=symbol_key)
    mask_ratio = runner.mask_ratio if mask_ratio is None else mask_ratio
    if candidates is None:
        ns = adata.uns.get(key, {})
        if R.spec("superweights").uns_key not in ns:
            msg = (f"no candidates under uns[{key!r}] to hold out: run ssw.tl.scan first (CLI: scsuperweight scan), "
                   "or pass candidates=.")
            raise DataError(msg)
        candidates = ns[R.spec("superweights").uns_key]
    held = _holdout_candidates(_candidate_frame(candidates), max_candidates)
    labels = _obs_column(adata, label_key, "label_key")
    cells = stratified_subsample(labels, adata.n_obs, max_cells_per_label if labels is not None else None, seed,
                                 max_cells)
    inputs = runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                            batch_size=batch_size, cells=cells, mask_ratio=mask_ratio)
    settings = default_settings(bits=bits, block_sizes=block_sizes, clips=clips, granularities=granularities)
    table = quantize_sweep(model, inputs.plain, inputs.masked, held, settings,
                           None if labels is None else labels[cells], k=k, n_cells=len(cells), progress=progress)
    _store(adata, key, "quantize", table)
    _record(adata, key, "quantize", dict(bits=list(bits), granularities=list(granularities),
                                         block_sizes=list(block_sizes), clips=list(clips), label_key=label_key,
                                         max_candidates=max_candidates, held_out=held["candidate"].tolist(),
                                         n_cells=int(len(cells)), mask_ratio=mask_ratio, k=k, seed=seed,
                                         family=runner.family, **described))
    return adata if copy else None


def _holdout_candidates(cand: pd.DataFrame, max_candidates: int) -> pd.DataFrame:
    """The scalars to hold out: activation-screen candidates with a column index (not LayerNorm dimensions), only
    those above threshold when any is (else the strongest near-misses, logged), at most `max_candidates`."""
    c = cand
    if "screen" in c.columns:
        c = c[~c["screen"].astype(str).str.startswith("weight")]
    c = c[c["col"].notna()] if "col" in c.columns else c.iloc[:0]
    if "above_threshold" in c.columns and c["above_threshold"].astype(bool).any():
        c = c[c["above_threshold"].astype(bool)]
    elif len(c):
        logger.warning("quantize: no scalar candidate passes the scan's threshold; holding out the %d strongest "
                       "near-misses", min(len(c), int(max_candidates)))
    return c.drop_duplicates("candidate").head(int(max_candidates)).reset_index(drop=True)
