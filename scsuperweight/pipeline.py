"""The whole pipeline into an output directory: scan -> prune -> genes -> enrich -> report.

Each step writes its table as soon as it finishes and `run.json` is rewritten after every step (with versions,
hashes, parameters, seed and timings), so a run that fails late loses nothing already computed; the error is
recorded in `run.json` too.
"""

from __future__ import annotations

import hashlib
import platform
import time
import traceback
from pathlib import Path

import numpy as np

from . import _keys as K
from . import dist, get, tl
from . import results as R
from ._io import atomic_write_h5ad
from ._log import logger
from .condstore import ConditionStore, persisting


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("scsuperweight", "torch", "numpy", "pandas", "scipy", "anndata", "scanpy", "gseapy",
                "scikit-learn", "leidenalg"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def model_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def data_hash(adata) -> str:
    """sha256 of the counts, obs names and var names; for a sample read from data on disk, the source's hash (so
    every step's sample of one atlas belongs to the same run)."""
    import scipy.sparse as sp

    source = adata.uns.get(K.UNS_SOURCE) if hasattr(adata, "uns") else None
    if source and source.get("sha256"):
        return str(source["sha256"])
    h = hashlib.sha256()
    X = adata.X
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        for a in (X.data, X.indices, X.indptr):
            h.update(np.ascontiguousarray(a).tobytes())
    elif X is not None:
        h.update(np.ascontiguousarray(np.asarray(X)).tobytes())
    h.update("\n".join(map(str, adata.obs_names)).encode())
    h.update("\n".join(map(str, adata.var_names)).encode())
    return h.hexdigest()


def _model_info(model) -> dict:
    """Architecture facts for run.json, under the same names for every family."""
    from .adapters import get_adapter

    cfg = getattr(model, "config", None)

    def first(*names):
        for n in names:
            v = getattr(cfg, n, None)
            if v is not None:
                return v
        return None

    adapter = get_adapter(model)
    return {"family": adapter.family, "class": type(model).__name__, "d_model": first("d_model", "hidden_size"),
            "nlayers": adapter.n_layers, "nhead": first("nhead", "num_attention_heads"),
            "ntoken": first("ntoken", "vocab_size")}


_SHARED_STEPS = ("scan", "prune")  # the steps whose work is split across torchrun's ranks


def run_pipeline(adata, model, out_dir, *, label_key: str, condition_key: str | None = None,
                 donor_key: str | None = None, case=None, control=None, empty: str = "error",
                 gene_sets=("bundled",), seed: int = 0, batch_size: int = 32,
                 max_cells_scan: int = 1000, max_cells_per_label: int = 200, n_random: int = 40,
                 max_candidates: int = 6, n_boot: int = 200, permutations: int = 1000,
                 gene_key: str | None = None, layer: str | None = None,
                 token_dictionary=None, gene_medians=None, symbol_key: str | None = None,
                 max_seq_len: int | None = None, primary_metric: str | None = None,
                 prune_options: dict | None = None, data_path: str | None = None,
                 model_path: str | None = None, progress: bool = True, extra_info: dict | None = None,
                 overwrite: bool = False, sequential: bool = True, budget: str | float | None = None,
                 yes: bool = False, dry_run: bool = False, dtype: str = "fp32", max_tokens: int | None = None,
                 screen=("activation", "weight_only"), on_plan=None,
                 resume: bool = False, max_cells_per_donor: int | None = None,
                 max_cells_per_condition: int | None = None) -> dict:
    """Run every step on `adata` with `model`, writing the DESIGN.md output files into `out_dir`.

    `model` is an scGPT model or a BERT-family masked LM (Geneformer-like); the latter reads the cells through
    `token_dictionary` (Ensembl ID -> token id) and `gene_medians` (Ensembl ID -> non-zero median), dicts or
    ``.json``/``.pkl`` files, with `gene_key` the var column of Ensembl IDs when ``var_names`` are symbols and
    `symbol_key` the var column of symbols when ``var_names`` are Ensembl IDs (see `scsuperweight.tl.embed`).
    The output files have the same columns for both families; only the reconstruction metrics differ
    (``gep*_`` for scGPT, ``mlm_loss``/``mlm_accuracy`` for masked LMs). `primary_metric` (default the family's:
    ``gepc_mse`` / ``mlm_loss``, see `scsuperweight.tl.prune`) is recorded in run.json's params, where the report
    reads the metric it judges candidates on. `prune_options`: the ablations beside zeroing, as keyword arguments
    of `scsuperweight.tl.prune` (``mean_ablation``, ``granularities``, ``joint``, ``n_unit_random``, ``n_matched``,
    ``n_joint``, ``characterise``: ``"all"`` restores and scales every top candidate, not only passing ones),
    recorded in the params.

    `out_dir` holds one run: a directory that already holds a run's files is refused (RunDirError) unless
    `overwrite`, which removes exactly those files first. run.json records a ``run_id`` and the data and model
    hashes, and every table written carries the run id in a ``run_id`` column.

    Every input is checked before any work (`scsuperweight.checks.validate_run_inputs`: numeric options, output
    directory, device, obs keys, `case` / `control` levels of `condition_key`, enough cells, gene-set files), so a
    typo costs seconds, not a run. `empty` is the policy for cells with no counts in any vocab gene (see
    `scsuperweight.tl.embed`); how many there were is recorded in run.json's ``data``.

    Before any step, the run is planned (`scsuperweight.tl.plan_cost`: scan and prune conditions by kind, cells,
    tokens, FLOPs, the time estimated from a calibration forward; candidates not found yet are assumed in block
    0, the costliest place) and the plan is logged, or handed to ``on_plan(plan)``, and recorded in run.json
    (``plan``). Above one hour without `budget` or ``yes=True`` a `scsuperweight.plan.LongRunWarning` gives the
    estimate. ``dry_run=True`` writes run.json (status ``dry-run``, the plan) and stops. `budget` (``"15m"``)
    picks scan cells, cells per label, `max_seq_len`, `n_random` and `n_boot` to fit (validity floors first);
    run.json records the choices and the reasons (``budget``), and the report shows them. `max_seq_len`: one length
    for scan, prune and genes; by default 512 tokens per cell for scGPT (`scsuperweight.plan.PRUNE_MAX_SEQ_LEN`,
    a seeded random gene subsample: fidelity, not validity), ``1200`` / ``"full"`` the model's full length;
    run.json's ``tokens_per_cell`` and the plan's notes state the choice and its consequence. `sequential`, `dtype`,
    `max_tokens` and `screen` are passed to `scsuperweight.tl.prune` / `scsuperweight.tl.scan`.

    Resuming: a directory holding an unfinished run (killed, failed) of the same data, model and parameters is
    resumed, not refused: its run id is kept, the steps rerun, and prune's conditions already finished (kept in
    ``out_dir/.conditions``) are not recomputed, so the tables equal an uninterrupted run's. `resume` makes any
    other directory an error. Under torchrun every rank calls this; prune's conditions are shared across ranks
    and rank 0 alone writes.
    """
    from .checks import check_model, check_run_dir, validate_run_inputs

    check_model(model)
    # an unfinished run in out_dir may be this one, resumed: prepare_run_dir decides once the inputs are hashed
    prev = R.read_run_json(out_dir) if Path(out_dir).is_dir() else None
    check_run_dir(out_dir, overwrite=overwrite or resume or bool(prev and prev.get("status") not in (None, "done")))
    checked = validate_run_inputs(adata, label_key=label_key, condition_key=condition_key, donor_key=donor_key,
                                  case=case, control=control, gene_sets=list(gene_sets), seed=seed,
                                  batch_size=batch_size, max_cells_scan=max_cells_scan,
                                  max_cells_per_label=max_cells_per_label, n_random=n_random,
                                  max_candidates=max_candidates, n_boot=n_boot, permutations=permutations,
                                  max_seq_len=max_seq_len)
    case, control = checked.case, checked.control
    from .prune import PruneOptions
    from .report import report
    from .runners import get_runner

    ctx = dist.context()
    runner = get_runner(model)
    fields = PruneOptions.__dataclass_fields__
    po = dict(prune_options or {})
    opts = PruneOptions(n_random=n_random, max_candidates=max_candidates, n_boot=n_boot, seed=seed,
                        sequential=sequential, primary_metric=primary_metric, dtype=dtype,
                        **{k: tuple(v) if k in ("granularities", "scale_factors") else v for k, v in po.items()
                           if k in fields})
    labels = tl._obs_column(adata, label_key, "label_key")
    # one length for scan, prune and genes (the plan counts them at it): scGPT's default is 512 tokens per cell
    asked_len, max_seq_len = max_seq_len, runner.analysis_seq_len(max_seq_len)
    genes_candidates = min(3, max_candidates)  # tl.genes' default
    null_k, null_method, null_cells = 20, "both", 64  # tl.scan's detection null defaults
    cost = tl.plan_cost(adata, model, None, opts, labels=labels, max_cells_per_label=max_cells_per_label,
                        max_seq_len=asked_len, budget=budget, gene_key=gene_key, layer=layer, seed=seed,
                        batch_size=batch_size, scan_cells=min(max_cells_scan or adata.n_obs, adata.n_obs),
                        embed_all=po.get("embed_all", True), genes_candidates=genes_candidates,
                        scan_null=(null_k, null_method, null_cells))
    if cost.budget is not None:  # the budget's choices (knobs and structural levers) are what every step uses
        b = cost.budget
        max_cells_scan, max_cells_per_label, max_seq_len, n_random, n_boot = \
            b.scan_cells, b.cells_per_label, b.max_seq_len, b.n_random, b.n_boot
        levers = b.settings()
        max_candidates = levers.pop("max_candidates", max_candidates)
        genes_candidates = levers.pop("genes_candidates", genes_candidates)
        null_k, null_method = levers.pop("null_k", null_k), levers.pop("null_method", null_method)
        from .plan import BUDGET_ORDER

        po.update({k: list(v) if isinstance(v, tuple) else v for k, v in levers.items() if k not in BUDGET_ORDER})
        prune_options = po
    tl._announce(cost.plan, on_plan, confirmed=yes or budget is not None, yes=yes)
    family_options = runner.accepted(dict(token_dictionary=token_dictionary, gene_medians=gene_medians,
                                          symbol_key=symbol_key))
    params = dict(label_key=label_key, condition_key=condition_key, donor_key=donor_key, case=case, control=control,
                  empty=empty, gene_sets=list(gene_sets),
                  seed=seed, batch_size=batch_size, max_cells_scan=max_cells_scan,
                  max_cells_per_label=max_cells_per_label, n_random=n_random, max_candidates=max_candidates,
                  n_boot=n_boot,
                  permutations=permutations, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len,
                  primary_metric=primary_metric, prune_options=dict(prune_options or {}), sequential=sequential,
                  budget=budget, dtype=dtype, max_tokens=max_tokens,
                  screen=[screen] if isinstance(screen, str) else list(screen),
                  max_cells_per_donor=max_cells_per_donor, max_cells_per_condition=max_cells_per_condition)
    params.update(runner.describe(**family_options))
    m_hash, d_hash = model_hash(model), data_hash(adata)
    inputs = R.inputs_hash(d_hash, m_hash, params)
    out = Path(out_dir)
    dist.on_rank0(ctx, R.prepare_run_dir, out, overwrite=overwrite, inputs=inputs, resume=resume)
    info = {"versions": _versions(), "seed": seed, "params": params, "data_hash": d_hash, "model_hash": m_hash,
            "inputs": inputs, "model": {"path": model_path, "sha256_state": m_hash, **_model_info(model)},
            "data": {"path": data_path, "sha256": d_hash, "n_cells": int(adata.n_obs),
                     "n_genes": int(adata.n_vars)}, **cost.params(),
            "tokens_per_cell": {"max_seq_len": max_seq_len, **tl._seq_len_record(runner, max_seq_len, asked_len)},
            **(extra_info or {})}
    if R.resumable(R.read_run_json(out), inputs) and not dry_run:  # its run id, steps and timings are kept
        log = R.RunLog.resume(out, info, main=ctx.is_main)
        for k in ("error", "traceback"):
            log.info.pop(k, None)
        log.info["status"] = "running"
    else:
        log = R.RunLog(out, info, write=ctx.is_main, main=ctx.is_main)
    if dry_run:
        log.info["status"] = "dry-run"
        log.write()
        return log.info
    common = dict(gene_key=gene_key, layer=layer, batch_size=batch_size, max_seq_len=max_seq_len, seed=seed,
                  empty=empty, progress=progress)
    common.update(family_options)
    steps = [
        ("scan", lambda: tl.scan(adata, model, label_key=label_key, max_cells=max_cells_scan, screen=screen,
                                 max_tokens=max_tokens, null_k=null_k, null_method=null_method, **common)),
        # the run's plan was announced above: prune's own (with the candidates found) is logged and recorded
        ("prune", lambda: tl.prune(adata, model, label_key=label_key, condition_key=condition_key,
                                   donor_key=donor_key, case=case, control=control,
                                   max_cells_per_label=max_cells_per_label, n_random=n_random,
                                   max_candidates=max_candidates, n_boot=n_boot, primary_metric=primary_metric,
                                   sequential=sequential, dtype=dtype, max_tokens=max_tokens, yes=True,
                                   max_cells_per_donor=max_cells_per_donor,
                                   max_cells_per_condition=max_cells_per_condition, **(prune_options or {}),
                                   **common)),
        ("genes", lambda: tl.genes(adata, model, label_key=label_key, max_cells_per_label=max_cells_per_label,
                                   max_candidates=genes_candidates, **common)),
        ("enrich", lambda: tl.enrich(adata, gene_sets=gene_sets, permutations=permutations, seed=seed,
                                     progress=progress)),
    ]
    store = ConditionStore(out, inputs) if ctx.is_main else None  # finished prune conditions, for a resume
    try:
        for name, run in steps:
            if not ctx.is_main and name not in _SHARED_STEPS:  # genes and enrich feed only what rank 0 writes
                break
            t0 = time.perf_counter()
            logger.info("step %s", name)
            with persisting(store, writer=log.progress if ctx.is_main else None):
                run()
            if not ctx.is_main:
                continue
            R.write_run_dir(adata, out, steps=(name,), run_id=log.run_id)
            if name == "prune":  # the report judges candidates on the metric prune chose for the family
                pp = get.params(adata, "prune")
                log.info["params"]["primary_metric"] = pp["primary_metric"]
                # what ran of the plan: sequential pools' draws, candidates left uncharacterised and why
                log.info["prune_conditions"] = {k: pp.get(k) for k in ("conditions_by_kind", "null_draws",
                                                                       "characterised", "not_characterised")}
            if name == "scan":  # cells without counts in any vocab gene: how many, and what was done with them
                log.info["data"]["n_empty"] = int(get.params(adata, "scan").get("n_empty", 0))
            scanned = get.params(adata, "scan") if name == "scan" else None
            log.step(name, time.perf_counter() - t0, **({"scan": scanned, "gene_overlap": scanned.get("gene_overlap")}
                                                        if scanned is not None else {}))
        if not ctx.is_main:
            return log.info
        t0 = time.perf_counter()
        R.set_run_record(adata, log.info)
        atomic_write_h5ad(adata, out / R.RESULTS.file)
        log.step("write_h5ad", time.perf_counter() - t0)
        t0 = time.perf_counter()
        log.info["status"] = "done"
        log.write()
        store.clear()  # the finished run's tables hold everything the conditions were kept for
        report(out, out / R.REPORT.file)
        log.step("report", time.perf_counter() - t0)
    except BaseException as exc:
        log.info["status"] = "failed"
        log.info["error"] = f"{type(exc).__name__}: {exc}"
        log.info["traceback"] = traceback.format_exc(limit=8)
        log.write()
        raise
    return log.info
