"""A census of spikes across checkpoints: where they sit in each model, and whether they sit at the same place.

Given several models (checkpoint directories, loaded models, or a training run's saved snapshots in step order),
trace each one over the same kind of input (data-free by default: each model's synthetic batch with the same seed)
and list per model its strongest spikes (layer, site, channel, token, ratio, and a detection-null p-value when
asked), its candidates (`detect.find_superweights`), and which spike coordinates (layer, site kind, channel) recur
across models. Over a training run's snapshots the same table says when a spike emerges (``first_step``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import results as R
from ._log import logger
from .adapters import get_adapter
from .detect import find_superweights
from .detect_null import detection_null, empirical_p, site_spikes
from .errors import DataError

CENSUS_COLUMNS = list(R.spec("census").contract)  # census.tsv, declared once in `results`
_STEP = re.compile(r"step[_-]?(\d+)$")


@dataclass(frozen=True)
class CensusResult:
    """``spikes`` (census.tsv: the top spikes per model), ``candidates`` (per model, the detector's rows),
    ``coincidences`` (per coordinate seen above threshold: how many models and which, the first in order)."""

    spikes: pd.DataFrame
    candidates: pd.DataFrame
    coincidences: pd.DataFrame
    params: dict = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return self.spikes


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """A training run's snapshots in step order: ``run_dir/steps/step_NNNNNN`` (``pretrain(save_every=...)``),
    or step-named folders directly in `run_dir`."""
    root = Path(run_dir)
    base = root / "steps" if (root / "steps").is_dir() else root
    found = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := _STEP.search(p.name))] \
        if base.is_dir() else []
    if not found:
        msg = (f"no step_NNNNNN checkpoints in {base}; train with `scsuperweight pretrain --save-every N` (or "
               "pretrain(save_every=N)) to keep snapshots, or pass the model directories themselves.")
        raise DataError(msg)
    return [p for _, p in sorted(found)]


def _step_of(path: Path | None, model) -> float:
    if path is not None and (m := _STEP.search(Path(path).name)):
        return float(m.group(1))
    steps = getattr(model, "args", {}).get("trained_steps") if hasattr(model, "args") else None
    return float(steps) if steps is not None else np.nan


def cell_batches(adata, *, label_key: str | None = None, max_cells: int | None = 200, layer: str | None = None,
                 gene_key: str | None = None, max_seq_len: int | None = None, batch_size: int = 32,
                 seed: int = 0) -> Callable:
    """``model -> batches`` for a data-mode `census`: the same seeded cells of `adata` (at most `max_cells`, spread
    evenly over the `label_key` types when given) tokenised for each model's own vocabulary, so that every
    checkpoint is traced over the same real cells rather than a synthetic one.

    Examples
    --------
    >>> census(checkpoint_dirs("pretrain_out"), batches=cell_batches(adata, label_key="cell_type", max_cells=100))
    """
    from .data.sources import stratified_sample
    from .runners import get_runner

    if adata is None or adata.n_obs == 0:
        msg = "a data-mode census needs cells; pass an AnnData with raw counts (CLI: --data cells.h5ad)."
        raise DataError(msg)
    per_label = None
    if label_key is not None and max_cells is not None:
        if label_key not in adata.obs.columns:
            msg = f"label_key={label_key!r} is not an obs column; columns are {list(adata.obs.columns)}."
            raise DataError(msg)
        per_label = max(1, int(max_cells) // adata.obs[label_key].nunique())
    cells = stratified_sample(adata.obs, label_key if per_label else None, max_per_label=per_label,
                              max_cells=max_cells, seed=seed)

    def batches(model) -> list:
        runner = get_runner(model)
        runner.configure("scan", required=True)
        return list(runner.prepare(adata, gene_key=gene_key, layer=layer, max_seq_len=max_seq_len, seed=seed,
                                   batch_size=batch_size, cells=cells).plain)

    batches.n_cells = len(cells)  # type: ignore[attr-defined]  # recorded in the census params
    return batches


def _load(item):
    if isinstance(item, (str, Path)):
        from .loading import load_model

        return load_model(item), Path(item)
    return item, None


def census(models: Sequence, batches: Sequence | Callable | None = None, *, names: Sequence[str] | None = None,
           top: int = 5, min_ratio: float = 20.0, min_abs: float = 0.0, candidates: bool = True,
           max_rounds: int = 3, null_k: int = 0, null_method: str = "gaussian", n_tokens: int = 256, seed: int = 0,
           progress: bool = False) -> CensusResult:
    """Spikes, candidates and shared coordinates of several models (see the module docstring).

    Parameters
    ----------
    models
        Model directories, loaded models, or both; a single training-run directory is expanded with
        `checkpoint_dirs` (its snapshots, in step order).
    batches
        None: data-free (each model's synthetic batch of `n_tokens`, seed `seed`). A list: the same batches for
        every model (their vocabularies must agree). A callable ``model -> batches``: per-model inputs (e.g. the
        same cells tokenised for each vocabulary).
    names
        One label per model; default the directory name, else ``model<i>``.
    top
        Spikes kept per model (the strongest ratios over the detector's sites).
    min_ratio, min_abs
        The detector's thresholds: ``above_threshold``, and the coordinates compared across models.
    candidates
        Also run `find_superweights` per model (iterative, up to `max_rounds`).
    null_k
        With ``null_k > 0``, a detection null of that many copies per model (`detection_null`, `null_method`)
        gives each spike its ``perm_p``.

    Returns
    -------
    `CensusResult`; ``spikes`` has the columns `CENSUS_COLUMNS`: ``order`` (position in `models`), ``step`` (the
    training step of a snapshot, from its folder name or args.json ``trained_steps``), ``n_models`` (models whose
    spikes above threshold include the same layer, site kind and channel), ``coincides`` (``n_models > 1``) and
    ``models_sharing``.

    Examples
    --------
    >>> res = census(checkpoint_dirs("pretrain_out"))  # a run trained with save_every=100
    >>> res.coincidences[["layer", "kind", "channel", "first_step", "n_models"]]
    """
    items = list(models) if not isinstance(models, (str, Path)) else [models]
    # one training run: its snapshots (a pretrain output dir holds its final model beside steps/ too)
    if len(items) == 1 and isinstance(items[0], (str, Path)) and ((Path(items[0]) / "steps").is_dir() or (
            not (Path(items[0]) / "args.json").is_file() and not (Path(items[0]) / "config.json").is_file())):
        items = checkpoint_dirs(items[0])
    if not items:
        msg = "census needs at least one model (directories or loaded models)."
        raise DataError(msg)
    if names is not None and len(names) != len(items):
        msg = f"names has {len(names)} entries for {len(items)} models; give one name per model or none."
        raise DataError(msg)
    spikes, cands = [], []
    for i, item in enumerate(tqdm(items, desc="census", disable=not progress, leave=False)):
        model, path = _load(item)
        adapter = get_adapter(model)
        name = names[i] if names is not None else (path.name if path is not None else f"model{i}")
        if batches is None:
            bs = [adapter.synthetic_batch(n_tokens=n_tokens, seed=seed)]
        else:
            bs = list(batches(model)) if callable(batches) else list(batches)
        sp = site_spikes(adapter, bs).sort_values("ratio", ascending=False, kind="stable").head(top)
        sp = sp.reset_index(drop=True)
        sp.insert(0, "model", name)
        sp.insert(1, "order", i)
        sp.insert(2, "step", _step_of(path, model))
        sp.insert(3, "rank", np.arange(1, len(sp) + 1))
        sp["above_threshold"] = (sp["ratio"] >= min_ratio) & (sp["max_abs"] >= min_abs)
        sp["perm_p"] = np.nan
        if null_k > 0:
            null = detection_null(adapter, None if batches is None else bs, k=null_k, seed=seed,
                                  method=null_method, n_tokens=n_tokens, data_seed=seed)
            sp["perm_p"] = [empirical_p(float(r), null.ratios(s)) for s, r in zip(sp["site"], sp["ratio"])]
        spikes.append(sp)
        if candidates:
            mode = {"mode": "data_free", "n_tokens": n_tokens, "seed": seed} if batches is None else {}
            c = find_superweights(adapter, None if batches is None else bs, min_ratio=min_ratio, min_abs=min_abs,
                                  max_rounds=max_rounds, **mode)
            c.insert(0, "model", name)
            c.insert(1, "order", i)
            c.insert(2, "step", sp["step"].iloc[0] if len(sp) else np.nan)
            cands.append(c)
        logger.info("census %s: top spike %s channel %s ratio %.3g", name, sp["site"].iloc[0] if len(sp) else "-",
                    sp["channel"].iloc[0] if len(sp) else "-", sp["ratio"].iloc[0] if len(sp) else np.nan)
    table = pd.concat(spikes, ignore_index=True)
    coincide = _coincidences(table)
    key = ["layer", "kind", "channel"]
    table = table.merge(coincide[[*key, "n_models", "models_sharing"]], on=key, how="left")
    table["n_models"] = pd.to_numeric(table["n_models"], errors="coerce").where(table["above_threshold"], 0) \
        .fillna(0).astype(int)
    table["models_sharing"] = table["models_sharing"].where(table["above_threshold"], "").fillna("")
    table["coincides"] = table["n_models"] > 1
    params = {"n_models": len(items), "top": top, "min_ratio": min_ratio, "min_abs": min_abs, "null_k": null_k,
              "null_method": null_method, "inputs": "data_free" if batches is None else "batches",
              "n_cells": getattr(batches, "n_cells", None),
              "n_tokens": n_tokens, "seed": seed}
    cand_frame = pd.concat(cands, ignore_index=True) if cands else pd.DataFrame()
    return CensusResult(table[CENSUS_COLUMNS], cand_frame, coincide, params)


def _coincidences(spikes: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, site kind, channel) above threshold in some model: the models, their count, the first one."""
    above = spikes[spikes["above_threshold"]]
    cols = ["layer", "kind", "channel", "n_models", "models_sharing", "first_model", "first_step", "max_ratio"]
    if above.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for (layer, kind, ch), g in above.groupby(["layer", "kind", "channel"], sort=True):
        g = g.sort_values("order", kind="stable")
        models = list(dict.fromkeys(g["model"]))
        rows.append({"layer": layer, "kind": kind, "channel": ch, "n_models": len(models),
                     "models_sharing": ";".join(models), "first_model": models[0],
                     "first_step": g["step"].iloc[0], "max_ratio": float(g["ratio"].max())})
    return pd.DataFrame(rows, columns=cols).sort_values(["n_models", "max_ratio"], ascending=False,
                                                        kind="stable").reset_index(drop=True)
