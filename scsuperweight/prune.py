"""Prune candidates and measure the collapse against controls, per cell type and per condition.

Conditions (names as in `collapse.tsv`): ``baseline``; ``prune:<cand>`` (the candidate zeroed); ``random:<k>``
(one random scalar of the same parameter as a candidate zeroed: the null; draws are grouped per parameter and the
column ``control_for`` names the parameter; ``null_pool`` names, on every row, the parameter whose draws are that
row's null); ``top_outliers`` (the k largest other weights of every edited
parameter zeroed, the paper's "largest non-super weights" control); ``restore:<cand>`` (candidate zeroed but its
activation put back at the token that carried the spike); ``scale:<cand>:<f>`` (the candidate multiplied by f).
Beside zeroing (`scsuperweight.ablation`, each judged against its own null, named in ``null_pool``):
``mean:<cand>`` and ``mean_activation:<cand>`` (the candidate's contribution, or the spike channel at the spike
token, set to its mean; null: the same parameter's ``random:`` draws), ``neuron:<cand>`` and ``channel:<cand>``
(null: ``random_neuron:L<l>:<k>`` / ``random_channel:L<l>:<k>`` of the same block), ``matched:<cand>:<k>`` (random
scalars of the candidate's |w| quantile bin: ``p_matched``), and, in a second phase after the zeroing verdicts,
``joint`` (the passing candidates zeroed together; null: ``random_joint:<k>``, as many random scalars of the same
parameters).

Phases and cost (issue 14): every control pool (a ``control_for``) is drawn sequentially, stopping once every
condition judged against it is settled (Besag & Clifford 1991; `_Runner`); restore, scaling and the |w|-matched
draws characterise a candidate that matters, so by default (``characterise="passing"``) they run in a second
phase, with the joint ablation, only for the candidates whose zeroing passes the controls (params record which
were left out and why). `plan_prune` counts all of it at the most.

All conditions share the same tokenised, masked inputs. An evaluator runs each condition and returns per-cell
reconstruction arrays (whatever the model family defines: ``gep_*``/``gepc_*`` for scGPT, ``mlm_*`` for masked-LM
transformers such as Geneformer) and the cell embeddings under ``"cls"``; it is the family runner's
(`scsuperweight.runners`): scGPT reruns the model only from the first edited block (the input of every block is
cached once), a masked LM runs full forwards. Metrics are computed per cell where they are defined per cell (so
they can be averaged over any group and bootstrapped over donors) and per set otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from . import _keys as K
from . import ablation as A
from . import dist
from . import metrics as M
from . import plan as P
from ._log import logger
from .adapters import get_adapter
from .data.batches import Batch
from .errors import DataError, SmallDataWarning
from .firstorder import first_order_effects, rank_correlation, rank_of
from .instrument import ScalarEdit
from .instrument.targets import restore_target as _restore_target
from .instrument.targets import token_id as _token_id
from .metrics import registry as R
from .plan import LEVER_WHY, BudgetChoice, Layout, Lever, Plan, choose_budget, make_plan, metric_seconds
from .precision import forward_precision
from .runners import get_runner, l2_normalise
from .runners.bert import HFEvaluator  # noqa: F401 - re-exported: the evaluators used to live here
from .runners.scgpt import ScGPTEvaluator  # noqa: F401
from .sequential import SequentialPool, decision_h

GRANULARITIES = ("scalar", "neuron", "channel")


@dataclass(frozen=True)
class PruneOptions:
    n_random: int = 40  # random draws per candidate parameter (the null): the smallest p is 1/41, below 0.05
    outlier_fraction: float = 1e-6  # the paper's top 1e-6 of each tensor ...
    outlier_floor: int = 10  # ... but at least this many per matrix (1 per vector)
    scale_factors: tuple = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    n_scale: int = 2  # candidates that get a scaling curve
    n_restore: int = 3  # candidates that get the restore-activation condition
    max_candidates: int = 6
    n_boot: int = 200  # bootstrap resamples for per-cell metrics
    n_boot_set: int = 20  # for set-level metrics (not Leiden)
    k: int = 10  # neighbours for KNN preservation and kNN accuracy
    alpha: float = 0.05
    min_group_cells: int = 5
    embedding: str = "mean"  # transformers cell embedding: "mean" over genes (Geneformer) or "cls"; scGPT: <cls>
    seed: int = 0
    mean_ablation: bool = True  # mean:<cand> and mean_activation:<cand> beside zeroing (the same parameter's null)
    granularities: tuple = ("scalar", "neuron", "channel")  # zeroing the scalar always; neuron:, channel: on request
    joint: bool = True  # second phase: the candidates whose zeroing passes, zeroed together (when two or more do)
    n_unit_random: int = 20  # random neurons / channels per block: their null (20: the smallest p is 1/21 < 0.05)
    n_matched: int = 20  # |w|-bin-matched random scalars per candidate (p_matched); 0: none
    n_joint: int = 20  # random sets of scalars: the joint ablation's null
    n_bins: int = 20  # |w| quantile bins of a matrix for the matched draws
    # what the joint phase and the sequential nulls judge on (None: the family's primary, metrics.registry)
    primary_metric: str | None = None

    # random draws in rounds, each parameter's stopping once its candidates' decisions on the primary metric are
    # settled (Besag & Clifford 1991, `scsuperweight.sequential`); False: all n_random draws, as before
    sequential: bool = True
    first_order: bool = True  # the first-order null over every scalar of each candidate's matrix (firstorder.tsv)
    dtype: str = "fp32"  # the evaluator forwards' precision (autocast); metrics are float32/float64 either way
    # which candidates get the characterisation conditions (restore, scaling, |w|-matched draws): "passing", those
    # whose zeroing passes the controls (a second phase after the zeroing verdicts); "all", every candidate
    characterise: str = "passing"
    # whether the control draws (`DRAW_KINDS`) also run the plain pass for the cell embedding; False (a budget
    # lever): the draws run the masked pass only, so the verdicts and sequential nulls, which judge on the primary
    # (reconstruction) metric, are unchanged, and the embedding metrics get no p-value
    draw_embeddings: bool = True

    def __post_init__(self):
        bad = sorted(set(self.granularities) - set(GRANULARITIES))
        if bad:
            msg = f"granularities={tuple(self.granularities)!r} has {bad}; choose from {GRANULARITIES}."
            raise ValueError(msg)
        if self.characterise not in ("passing", "all"):
            msg = f"characterise={self.characterise!r}; choose 'passing' (the default) or 'all'."
            raise ValueError(msg)


@dataclass(frozen=True)
class PruneResult:
    collapse: pd.DataFrame
    contrasts: pd.DataFrame
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # condition -> (n, d) normalised
    conditions: pd.DataFrame | None = None  # what each condition edited
    params: dict = field(default_factory=dict)
    firstorder: pd.DataFrame | None = None  # each candidate among all scalars of its matrix (firstorder.tsv)

    def to_frame(self) -> pd.DataFrame:
        return self.collapse


# ------------------------------------------------------------------------------------------------------------
# running conditions
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Condition:
    name: str
    edits: list[ScalarEdit]
    restore: tuple | None = None  # (site, channel, token_id)
    control_for: str = ""  # a control draw's pool (a parameter, neuron:L<l>, channel:L<l>, joint, a candidate)
    candidate: str = ""
    factor: float = float("nan")
    patch: tuple | None = None  # a constant activation patch (site, channel, value, token_id or None: everywhere)
    kind: str = ""  # baseline, prune, random, top_outliers, restore, scale, or an `scsuperweight.ablation` kind
    null_pool: str = ""  # whose draws are its null, when not the edited parameter's (see `_null_pool`)
    embedding: bool = True  # the plain pass for the cell embedding (``cls``); False: reconstruction only

    @classmethod
    def of(cls, a: A.Ablation) -> Condition:
        """The condition that runs an `scsuperweight.ablation.Ablation`."""
        return cls(a.name, list(a.edits), control_for=a.control_for, candidate=a.candidate, patch=a.patch,
                   kind=a.kind, null_pool=a.null_pool)


def evaluator_for(model, masked: Sequence, plain: Sequence, n_cells: int, *, emb: str = "mean",
                  progress: bool = False):
    """The evaluator of `model`'s family (`scsuperweight.runners.get_runner(model).evaluator`)."""
    return get_runner(model).evaluator(masked, plain, n_cells, emb=emb, progress=progress)


# ------------------------------------------------------------------------------------------------------------
# building the conditions
# ------------------------------------------------------------------------------------------------------------
def _edit_of(row) -> ScalarEdit:
    col = row["col"]
    idx = (int(row["row"]),) if col is None or pd.isna(col) else (int(row["row"]), int(col))
    return ScalarEdit(str(row["param"]), idx, 0.0)


def select_candidates(candidates: pd.DataFrame, max_candidates: int) -> pd.DataFrame:
    """What to prune, in this order of preference: activation candidates above threshold (primary before their LN
    companions); else the gradient screen's rows above its threshold (when the scan ran it); else the activation
    near-misses (the strongest sub-threshold spikes, so that the question "does even the largest activation's
    parameter matter?" is still answered); else the other screens' rows (weight-only, gradient)."""
    if candidates is None or len(candidates) == 0:
        msg = "no candidates to prune: run the scan first (ssw.tl.scan / scsuperweight scan)."
        raise DataError(msg)
    c = candidates
    screen = c["screen"].astype(str) if "screen" in c else pd.Series("activation", index=c.index)
    above = c["above_threshold"].astype(bool) if "above_threshold" in c else pd.Series(True, index=c.index)
    act = screen.str.startswith("activation")
    grad = screen == "gradient"
    for mask, why in ((act & above, "activation candidates above threshold"),
                      (grad & above, "gradient screen rows above threshold (no activation candidate passed)"),
                      (act, "activation near-misses (nothing passed the thresholds)"),
                      (~act, "weight-only or gradient screen rows (no activation spike was found)")):
        if mask.any():
            logger.info("pruning %s", why)
            return c[mask].head(max_candidates).reset_index(drop=True)
    return c.head(max_candidates).reset_index(drop=True)


def build_conditions(model, cands: pd.DataFrame, opts: PruneOptions, batches: Sequence | None = None
                     ) -> list[Condition]:
    """Zeroing, its controls, restore and scaling; with `batches` (the evaluated cells, for the means) also the
    ablations of `ablation_conditions`."""
    adapter = get_adapter(model)
    rng = np.random.default_rng(opts.seed)
    conds = [Condition(K.COND_BASELINE, [], kind="baseline")]
    cand_edits = {r["candidate"]: _edit_of(r) for _, r in cands.iterrows()}
    taken = {(e.param, e.index) for e in cand_edits.values()}
    for cid, e in cand_edits.items():
        conds.append(Condition(K.cond_prune(cid), [e], candidate=cid, kind="prune"))
    # null: random scalars of the same parameter, n_random per distinct parameter
    k = 0
    for pname in dict.fromkeys(e.param for e in cand_edits.values()):
        shape = tuple(adapter.param(pname).shape)
        n = math.prod(shape)
        for _ in range(opts.n_random):
            while True:
                idx = tuple(int(i) for i in np.unravel_index(int(rng.integers(n)), shape))
                if (pname, idx) not in taken:
                    break
            conds.append(Condition(K.cond_random(k), [ScalarEdit(pname, idx, 0.0)], control_for=pname,
                                   kind="random"))
            k += 1
    # the largest other weights of every edited parameter
    outliers = []
    for pname in dict.fromkeys(e.param for e in cand_edits.values()):
        w = adapter.param(pname).detach().abs().reshape(-1).cpu()
        floor = opts.outlier_floor if adapter.param(pname).dim() > 1 else 1
        n_top = max(floor, math.ceil(opts.outlier_fraction * w.numel()))
        order = torch.argsort(w, descending=True).tolist()
        shape = tuple(adapter.param(pname).shape)
        picked = 0
        for i in order:
            idx = tuple(int(j) for j in np.unravel_index(i, shape))
            if (pname, idx) in taken:
                continue
            outliers.append(ScalarEdit(pname, idx, 0.0))
            picked += 1
            if picked == n_top:
                break
    conds.append(Condition(K.COND_TOP_OUTLIERS, outliers, kind="top_outliers"))
    ranked = cands[cands["primary"].astype(bool)] if "primary" in cands else cands
    ranked = ranked if len(ranked) else cands
    for _, r in ranked.head(opts.n_restore).iterrows():
        site = r.get("site")
        token = r.get("token")
        if site is None or pd.isna(site) or site not in adapter.sites or not token:
            continue
        token_id = _token_id(adapter, token)
        if token_id is None:
            continue
        target = _restore_target(adapter, cand_edits[r["candidate"]], site, int(r["channel"]))
        if target is not None:
            conds.append(Condition(K.cond_restore(r["candidate"]), [cand_edits[r["candidate"]]],
                                   restore=(*target, token_id), candidate=r["candidate"], kind="restore"))
    for _, r in ranked.head(opts.n_scale).iterrows():
        for f in opts.scale_factors:
            e = cand_edits[r["candidate"]]
            conds.append(Condition(K.cond_scale(r["candidate"], f), [ScalarEdit(e.param, e.index, float(f))],
                                   candidate=r["candidate"], factor=float(f), kind="scale"))
    if batches is not None:
        conds += ablation_conditions(model, cands, opts, batches)
    return conds


def ablation_conditions(model, cands: pd.DataFrame, opts: PruneOptions, batches: Sequence) -> list[Condition]:
    """The conditions beside zeroing that `opts` asks for (`scsuperweight.ablation.build_ablations`): mean and
    mean-activation ablations, neuron and channel ablations with random units of the same block, and the
    |w|-matched draws; means over `batches` (the evaluated cells, unmasked)."""
    kinds = [k for k, on in (("mean", opts.mean_ablation), ("mean_activation", opts.mean_ablation),
                             ("neuron", "neuron" in opts.granularities),
                             ("channel", "channel" in opts.granularities), ("matched", opts.n_matched > 0)) if on]
    if not kinds:
        return []
    abl = A.build_ablations(model, cands, batches, n_random=opts.n_unit_random, n_bins=opts.n_bins, seed=opts.seed,
                            kinds=kinds, n_matched=opts.n_matched)
    return [Condition.of(a) for a in abl]


def condition_layers(model, conds: Sequence[Condition]) -> list[tuple[str, int]]:
    """``(name, first block rerun)`` per condition, for `scsuperweight.plan.make_plan`: the first block any of its
    edits (or its restored site) enters; -1 (a full forward) where the family cannot rerun from a middle block; a
    condition computing what another already does (`_edits_key`: the run reuses that result) counts as the
    decoders only (n_layers)."""
    adapter = get_adapter(model)
    cached = hasattr(adapter, "encode_cache")  # only scGPT reruns from cached block inputs
    out, seen = [], {_edits_key(Condition(K.COND_BASELINE, []))}
    for c in conds:
        key = _edits_key(c)
        if key in seen and c.name != K.COND_BASELINE:  # computed once (scale 0 is zeroing, scale 1 the baseline)
            out.append((c.name, adapter.n_layers))
            continue
        seen.add(key)
        if not cached:
            out.append((c.name, -1))
            continue
        layers = [adapter.first_layer_of(e.param) for e in c.edits]
        for at in (c.restore, c.patch):  # an activation put back or patched: rerun from its site's block
            if at is not None and at[0] in adapter.sites:
                layers.append(adapter.sites[at[0]].layer)
        out.append((c.name, min(layers) if layers else adapter.n_layers))
    return out


def _planned_ablations(model, cands: pd.DataFrame, opts: PruneOptions) -> list[Condition]:
    """The conditions `ablation_conditions` will build for `cands`, without the forwards its means need: the mean
    and mean-activation ablations as placeholders with the edits' parameters and the patched site (what the plan
    needs: how many, and the first block each reruns); neurons, channels and matched draws as built."""
    kinds = [k for k, on in (("neuron", "neuron" in opts.granularities), ("channel", "channel" in opts.granularities),
                             ("matched", opts.n_matched > 0)) if on]
    adapter = get_adapter(model)
    out: list[Condition] = []
    if opts.mean_ablation:
        for _, r in cands.iterrows():
            cid, param, idx = str(r["candidate"]), str(r["param"]), A._index(r)
            bias = f"{A._module_of(param)}.bias"
            site = A._norm_out_site(adapter, param) if len(idx) == 1 else A._proj_site(adapter, param)
            if len(idx) == 2 and site is not None and A._has(adapter, bias) or \
                    len(idx) == 1 and site is not None and site.norm_weight and site.norm_bias:
                out.append(Condition(A.cond_mean(cid), [ScalarEdit(param, idx, 0.0)], candidate=cid, kind="mean",
                                     null_pool=param))
            token = r.get("token")
            tid = _token_id(adapter, str(token)) if token is not None and not pd.isna(token) and token else None
            target = A._activation_target(adapter, r)
            if target is not None and tid is not None:
                out.append(Condition(A.cond_mean_activation(cid), [], candidate=cid, kind="mean_activation",
                                     patch=(target[0], target[1], 0.0, tid), null_pool=param))
    if kinds:
        abl = A.build_ablations(model, cands, (), n_random=opts.n_unit_random, n_bins=opts.n_bins, seed=opts.seed,
                                kinds=kinds, n_matched=opts.n_matched)
        out += [Condition.of(a) for a in abl]
    if opts.joint and len(cands) >= 2:  # the most: every candidate passes, all zeroed together
        taken = [(str(r["param"]), A._index(r)) for _, r in cands.iterrows()]
        out += [Condition.of(a) for a in (A.joint_ablation(model, cands),
                                          *A.random_joints(model, cands, opts.n_joint, seed=opts.seed,
                                                           exclude=taken))]
    return out


@dataclass(frozen=True)
class _Layout:
    """What a prune run will compute, for its plan: the conditions at most (name, first block), each draw pool's
    first block and size, and the conditions expected under a stated assumption."""

    fixed: list  # (name, first layer) of every condition but the uniform random: draws
    null_layers: list  # first layer of each parameter whose uniform draws are drawn (n_random each)
    expected: list  # (name, first layer) of every condition expected, draws included
    notes: list


def _planned_layout(model, candidates: pd.DataFrame | None, opts: PruneOptions) -> _Layout:
    """Every condition the run `opts` describes can run (`prune` runs these and no others; at most these with
    sequential nulls, characterisation only for passing candidates and the joint phase), and an expected subset.

    With candidates, the conditions `build_conditions` and `_planned_ablations` make for them. Without (a whole run
    plans before its scan has found any), an assumed layout, stated in the notes: `max_candidates` down-projection
    scalars in 3 parameters of block 0 (every block rerun: the most a condition can cost), each with every
    ablation. The expected count assumes the first candidate is a super weight (it passes, its pools run every
    draw, it alone is characterised, no joint phase) and every other pool settles in its first round of draws.
    """
    if candidates is not None:
        sel = select_candidates(candidates, opts.max_candidates)
        conds = build_conditions(model, sel, opts) + _planned_ablations(model, sel, opts)
        layers = condition_layers(model, conds)
        notes: list[str] = []
    else:
        sel = None
        n, nl = opts.max_candidates, get_adapter(model).n_layers
        names = [K.COND_BASELINE] + [f"prune:c{i}" for i in range(n)] + [K.COND_TOP_OUTLIERS] \
            + [f"restore:c{i}" for i in range(min(n, opts.n_restore))] \
            + [f"scale:c{i}:{f}" for i in range(min(n, opts.n_scale)) for f in opts.scale_factors] \
            + [f"{k}:c{i}" for i in range(n) for k in ("mean", "mean_activation") if opts.mean_ablation] \
            + [f"{k}:c{i}" for i in range(n) for k in ("neuron", "channel") if k in opts.granularities] \
            + [f"random_{k}:L0:{j}" for k in ("neuron", "channel") if k in opts.granularities
               for j in range(opts.n_unit_random)] \
            + [f"matched:c{i}:{j}" for i in range(n) for j in range(opts.n_matched)] \
            + ([K.COND_JOINT] + [f"random_joint:{j}" for j in range(opts.n_joint)] if opts.joint and n > 1 else [])
        pools = min(3, n)
        # scaling by 0 is the zeroing and by 1 the baseline: the run reuses those results (`_edits_key`)
        same = {f"scale:c{i}:{f}" for i in range(n) for f in opts.scale_factors if float(f) in (0.0, 1.0)}
        layers = [(x, nl if x == K.COND_BASELINE or x in same else 0) for x in names]
        layers += [(K.cond_random(k), 0) for k in range(pools * opts.n_random)]
        conds = None
        notes = [f"candidates not found yet: assumed {n} in {pools} parameters of block 0 (the costliest place: "
                 f"every block rerun), each with every ablation"]
    kind = lambda name: name.split(":", 1)[0]  # noqa: E731
    fixed = [x for x in layers if kind(x[0]) != "random"]
    if conds is not None:
        first: dict = {}
        for (_, lay), c in zip(layers, conds):
            if c.kind == "random":
                first.setdefault(c.control_for, lay)
        null_layers = list(first.values())
    else:
        null_layers = [0] * min(3, opts.max_candidates)
    expected = _expected(layers, conds, sel, opts)
    return _Layout(fixed, null_layers, expected, notes)


def _expected(layers, conds, sel, opts: PruneOptions) -> list:
    """The conditions expected under `_planned_layout`'s stated assumption (see there)."""
    if conds is None:  # the assumed layout: c0 is the super weight; the uniform draws of parameter i are p<i>
        top, top_pools = "c0", {"c0", "p0", "neuron:L0", "channel:L0"}

        def pool_of(name: str) -> str:
            kind, _, rest = name.partition(":")
            if kind == "random":
                return f"p{int(rest) // max(1, opts.n_random)}"
            if kind in ("random_neuron", "random_channel"):
                return f"{kind[len('random_'):]}:L0"
            return rest.split(":")[0] if kind == "matched" else ""

        def cand_of(name: str) -> str:
            return name.split(":")[1] if ":" in name else ""
    else:
        top = str(sel["candidate"].iloc[0]) if len(sel) else ""
        by_name = {c.name: c for c in conds}
        top_pools = {p for c in conds if c.candidate == top for p in _judging_pools(c)}

        def pool_of(name: str) -> str:
            return by_name[name].control_for

        def cand_of(name: str) -> str:
            return _owner(by_name[name])
    out, seen = [], Counter()
    sizes = Counter(pool_of(n) for n, _ in layers if pool_of(n))
    for name, lay in layers:
        kind = name.split(":", 1)[0]
        if kind in ("joint", "random_joint"):
            continue
        if kind in GATED_KINDS and opts.characterise == "passing" and cand_of(name) != top:
            continue
        pool = pool_of(name)
        if pool and opts.sequential and pool not in top_pools:
            seen[pool] += 1
            if seen[pool] > decision_h(opts.alpha, sizes[pool]):
                continue
        out.append((name, lay))
    return out


def plan_prune(model, candidates: pd.DataFrame | None, opts: PruneOptions, *, n_cells: int, tokens,
               max_seq_len: int | None = None, flop_rate: float | None = None, device: str = "",
               scan_cells: int = 0, scan_rounds: int = 2, embed_cells: int = 0, genes_candidates: int = 0,
               scan_null: tuple = (0, "both", 0), calibration_batch: int = 0) -> Plan:
    """The plan of a prune run (`scsuperweight.plan.make_plan`) over `n_cells` cells of `tokens` tokens each (an
    array of per-cell counts, or one number), before any forward: every condition kind it can run (zeroing, its
    controls, restore and scaling, the mean / neuron / channel ablations and their pools, matched draws, the joint
    phase), the blocks each reruns, the first-order null's backward pass, forward FLOPs and, with `flop_rate`
    (`scsuperweight.plan.calibrate`), the estimated time (forwards plus `scsuperweight.plan.metric_seconds`). The
    counts and the estimate are the MOST the run can do (every draw, every candidate characterised, the joint
    phase); ``expected_by_kind`` / ``expected_seconds`` are what it is expected to do under the assumption stated
    in the notes (see `_planned_layout`). `embed_cells` cells embedded besides (obsm), `genes_candidates` the
    genes step after prune (`run`), `scan_null` the scan's detection null as ``(null_k, null_method,
    null_cells)``, `calibration_batch` the batch size of the calibration prune makes for its own plan in a whole run
    (0: none)."""
    lay = _planned_layout(model, candidates, opts)
    conds = lay.fixed + [("random", x) for x in lay.null_layers for _ in range(opts.n_random)]
    notes = list(lay.notes)
    if opts.sequential or opts.characterise == "passing":
        notes.append("counted at the most: every draw of every pool, every candidate characterised and the joint "
                     "phase; sequential nulls (Besag & Clifford 1991) stop a pool once its decisions are settled, "
                     "and restore, scaling and matched draws run only for candidates whose zeroing passes")
        notes.append("expected: the top candidate is a super weight (passes, all its pools' draws, it alone "
                     "characterised, no joint phase) and every other pool settles in one round of draws")
    cfg = get_adapter(model).model.config
    common = dict(n_cells=n_cells, tokens=tokens, max_seq_len=max_seq_len, flop_rate=flop_rate, device=device,
                  scan_cells=scan_cells, scan_rounds=scan_rounds, embed=embed_cells > 0, embed_cells=embed_cells,
                  first_order=opts.first_order, genes_candidates=genes_candidates,
                  null_forwards=null_passes(scan_null[0], scan_null[1]) * min(scan_null[2], scan_cells),
                  calibration_forwards=P.calibration_cells(max_seq_len or 1200, calibration_batch)
                  if calibration_batch else 0, masked_only=masked_only(opts))
    plan = make_plan(cfg, conds, overhead_seconds=metric_seconds(len(conds), n_cells, opts.n_boot), notes=notes,
                     **common)
    exp = make_plan(cfg, lay.expected, overhead_seconds=metric_seconds(len(lay.expected), n_cells, opts.n_boot),
                    **common)
    return replace(plan, expected_by_kind=dict(exp.conditions_by_kind), expected_seconds=exp.est_seconds)


def masked_only(opts: PruneOptions) -> tuple:
    """The condition kinds that run the masked pass only (`scsuperweight.plan.make_plan`'s `masked_only`): the
    control draws without ``draw_embeddings``."""
    return () if opts.draw_embeddings else DRAW_KINDS


def null_passes(null_k: int, null_method: str) -> int:
    """Traced forwards per cell of the scan's detection null: the model and `null_k` copies, per method."""
    return (int(null_k) + 1) * (2 if null_method == "both" else 1) if null_k else 0


def budget_levers(model, candidates: pd.DataFrame | None, opts: PruneOptions, *, embed_cells: int = 0,
                  genes_candidates: int = 0, scan_null: tuple = (0, "both", 0)) -> tuple[Layout, list[Lever], dict]:
    """The prune run's layout, its structural levers in `scsuperweight.plan.LEVER_ORDER` (each with the layout
    once it and every lever before it are pulled) and the levers' requested values.

    In order: the whole-data embedding (obsm from the evaluated cells instead), genes beyond the top candidate,
    the scan's permutation null beside the Gaussian one, the |w|-matched draws, the draws' plain (embedding) pass
    (``draw_embeddings``), restore and scaling beyond the top
    candidate, the mean ablations, the neuron / channel pools, the joint phase, the scan's detection null, the
    first-order null, the top candidate's restore and scaling, then `max_candidates` one at a time down to 1
    (never 0: the scan's top candidate is always judged against its own parameter's draws and the top
    outliers)."""
    null_k, null_method, null_cells = scan_null

    def layout(o: PruneOptions, embed: int, genes: int, k: int, method: str) -> Layout:
        lay = _planned_layout(model, candidates, o)
        return Layout(tuple(lay.fixed), tuple(lay.null_layers), embed, o.first_order, genes,
                      null_passes(k, method), int(null_cells), masked_only(o))

    requested = {"embed_all": True, "genes_candidates": genes_candidates, "n_matched": opts.n_matched,
                 "draw_embeddings": opts.draw_embeddings,
                 "n_restore": opts.n_restore, "n_scale": opts.n_scale, "mean_ablation": opts.mean_ablation,
                 "granularities": tuple(opts.granularities), "joint": opts.joint,
                 "first_order": opts.first_order, "max_candidates": opts.max_candidates}
    if null_k:
        requested.update(null_k=int(null_k), null_method=null_method)
    cuts: list[tuple[str, dict]] = []
    if embed_cells:
        cuts.append(("embed_all", {"embed_all": False}))
    if genes_candidates > 1:
        cuts.append(("genes_candidates", {"genes_candidates": 1}))
    if null_k and null_method == "both":
        cuts.append(("null_method", {"null_method": "gaussian"}))
    if opts.n_matched:
        cuts.append(("n_matched", {"n_matched": 0}))
    if opts.draw_embeddings:
        cuts.append(("draw_embeddings", {"draw_embeddings": False}))
    if opts.n_restore > 1 or opts.n_scale > 1:
        cuts.append(("characterisation", {"n_restore": min(1, opts.n_restore), "n_scale": min(1, opts.n_scale)}))
    if opts.mean_ablation:
        cuts.append(("mean_ablation", {"mean_ablation": False}))
    if set(opts.granularities) - {"scalar"}:
        cuts.append(("unit_pools", {"granularities": ("scalar",)}))
    if opts.joint:
        cuts.append(("joint", {"joint": False}))
    if null_k:
        cuts.append(("detection_null", {"null_k": 0}))
    if opts.first_order:
        cuts.append(("first_order", {"first_order": False}))
    if min(opts.n_restore, 1) or min(opts.n_scale, 1):
        cuts.append(("top_characterisation", {"n_restore": 0, "n_scale": 0}))
    cuts += [("max_candidates", {"max_candidates": m}) for m in range(opts.max_candidates - 1, 0, -1)]
    now = dict(requested)
    levers = []
    for name, values in cuts:
        before = {k: now[k] for k in values}
        now.update(values)
        o = replace(opts, **{k: now[k] for k in ("n_matched", "draw_embeddings", "n_restore", "n_scale",
                                                 "mean_ablation", "granularities", "joint", "first_order",
                                                 "max_candidates")})
        lay = layout(o, 0 if not now["embed_all"] else embed_cells, int(now["genes_candidates"]),
                     now.get("null_k", 0), now.get("null_method", null_method))
        levers.append(Lever(name, dict(values), before, LEVER_WHY[name], lay))
    return layout(opts, embed_cells, genes_candidates, null_k, null_method), levers, requested


def budget_prune(model, candidates: pd.DataFrame | None, opts: PruneOptions, budget_seconds: float, *,
                 label_counts: dict, tokens, max_seq_len: int, flop_rate: float,
                 cells_per_label: int | None = None, scan_cells: int = 0, scan_rounds: int = 2,
                 embed_cells: int = 0, genes_candidates: int = 0, scan_null: tuple = (0, "both", 0),
                 calibration_batch: int = 0) -> BudgetChoice:
    """`scsuperweight.plan.choose_budget` for the prune run `opts` describes (its conditions as `plan_prune`
    counts them): cells per label, tokens per cell, random draws, bootstrap resamples and scan cells that fit
    `budget_seconds`, validity floors first, then the structural levers of `budget_levers`, with the reasons.
    `budgeted_options` turns the choice into the options the run uses."""
    lay, levers, requested = budget_levers(model, candidates, opts, embed_cells=embed_cells,
                                           genes_candidates=genes_candidates, scan_null=scan_null)
    notes = _planned_layout(model, candidates, opts).notes
    choice = choose_budget(budget_seconds, config=get_adapter(model).model.config, flop_rate=flop_rate,
                           label_counts=label_counts, tokens=tokens, fixed_conditions=lay.fixed_conditions,
                           null_layers=lay.null_layers, alpha=opts.alpha, n_random=opts.n_random, n_boot=opts.n_boot,
                           max_seq_len=max_seq_len, scan_cells=scan_cells, scan_rounds=scan_rounds,
                           cells_per_label=cells_per_label, embed_cells=embed_cells, first_order=opts.first_order,
                           genes_candidates=genes_candidates, null_passes=lay.null_passes,
                           null_cells=lay.null_cells, masked_only=lay.masked_only, levers=levers,
                           requested=requested,
                           calibration_batch=calibration_batch)
    if notes and choice.plan is not None:
        choice = replace(choice, plan=replace(choice.plan, notes=(*notes, *choice.plan.notes)))
    return choice


def budgeted_options(opts: PruneOptions, choice: BudgetChoice) -> PruneOptions:
    """`opts` with every knob and lever the budget chose (the options the budgeted run uses)."""
    fields = PruneOptions.__dataclass_fields__
    return replace(opts, **{k: v for k, v in choice.settings().items() if k in fields})


def _passing(model, cands: pd.DataFrame, collapse: pd.DataFrame, opts: PruneOptions) -> set[str]:
    """The candidates whose zeroing passes the controls on the primary metric (`scsuperweight.judge.verdicts`)."""
    from .judge import verdicts

    if collapse.empty:
        return set()
    metric = opts.primary_metric or get_runner(model).primary_metric(set(collapse["metric"]))
    v = verdicts(collapse, primary_metric=metric, alpha=opts.alpha, ablations=())
    return set(v.loc[v["passes"].astype(bool), "candidate"].astype(str)) & set(cands["candidate"].astype(str))


def joint_conditions(model, cands: pd.DataFrame, collapse: pd.DataFrame, opts: PruneOptions, *,
                     passing: set[str] | None = None) -> list[Condition]:
    """The second phase: ``joint`` (every candidate whose zeroing passes the controls on the primary metric,
    zeroed together) and its null, ``random_joint:<k>``; nothing when fewer than two pass (one alone is its own
    ``prune:`` condition). `passing`: those candidates, when the caller has judged them already."""
    if not opts.joint or collapse.empty:
        return []
    passing = _passing(model, cands, collapse, opts) if passing is None else passing
    passing = cands[cands["candidate"].astype(str).isin(passing)]
    if len(passing) < 2:
        logger.info("joint ablation skipped: %d candidate(s) pass", len(passing))
        return []
    taken = [(str(r["param"]), A._index(r)) for _, r in cands.iterrows()]
    abl = [A.joint_ablation(model, passing),
           *A.random_joints(model, passing, opts.n_joint, seed=opts.seed, exclude=taken)]
    return [Condition.of(a) for a in abl]


# ------------------------------------------------------------------------------------------------------------
# metrics and statistics
# ------------------------------------------------------------------------------------------------------------
def _groups(labels, conditions, min_cells: int) -> list[tuple[str, np.ndarray, bool]]:
    """(name, cell mask, has several labels) for all, each label, each condition, label|condition."""
    n = len(labels) if labels is not None else len(conditions)
    out = [(K.GROUP_ALL, np.ones(n, dtype=bool), labels is not None and len(set(labels)) > 1)]
    if labels is not None:
        for lab in sorted(set(labels)):
            out.append((str(lab), labels == lab, False))
    if conditions is not None:
        for c in sorted(set(conditions)):
            multi = labels is not None and len(set(labels[conditions == c])) > 1
            out.append((str(c), conditions == c, multi))
        if labels is not None:
            for lab in sorted(set(labels)):
                for c in sorted(set(conditions)):
                    out.append((f"{lab}{K.GROUP_SEP}{c}", (labels == lab) & (conditions == c), False))
    return [g for g in out if g[1].sum() >= min_cells]


def reconstruction_metrics(res: dict) -> list[str]:
    """The per-cell reconstruction metrics an evaluator returned: every 1-D array except the embedding."""
    return [m for m, v in res.items() if m != "cls" and np.ndim(v) == 1]


def _noted(notes: dict | None, metric: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; with `notes`, the `SmallDataWarning`s it raises (a neighbour count lowered, a NaN
    where the group is too small) go to ``notes[metric]`` instead of the console, for the table's ``note``."""
    if notes is None:
        return fn(*args, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallDataWarning)
        value = fn(*args, **kwargs)
    for w in caught:
        if issubclass(w.category, SmallDataWarning):
            if str(w.message) not in notes.setdefault(metric, []):
                notes[metric].append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return value


def _note(notes: dict, *metrics: str) -> str:
    return "; ".join(dict.fromkeys(m for metric in metrics for m in notes.get(metric, ())))


def per_cell_metrics(res: dict, base: dict | None, labels, k: int, notes: dict | None = None
                     ) -> dict[str, np.ndarray]:
    """The evaluator's reconstruction arrays as they are, then the embedding metrics (from ``res["cls"]``).

    With a `notes` dict, why a metric was adapted to few cells (the neighbour count used) is recorded there per
    metric (see `_noted`); a cell whose label no other cell holds has no kNN vote (NaN). A result without
    ``cls`` (a draw run without the embedding pass, ``PruneOptions.draw_embeddings=False``) gives the
    reconstruction metrics only."""
    out = {m: res[m] for m in reconstruction_metrics(res)}
    if "cls" not in res:
        return out
    emb = l2_normalise(np.nan_to_num(res["cls"]))
    if labels is not None and len(set(labels)) > 1:
        acc = _noted(notes, "knn_accuracy", M.knn_label_correct, emb, labels, k=k).astype(float)
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        acc[counts[inverse] < 2] = np.nan  # no other cell of its label: nothing to vote for it
        out["knn_accuracy"] = acc
        out["silhouette"] = _noted(notes, "silhouette", M.silhouette_per_cell, emb, labels)
    base_emb = l2_normalise(np.nan_to_num(base["cls"])) if base is not None else emb
    out["knn_preservation"] = _noted(notes, "knn_preservation", M.knn_preservation, base_emb, emb, k=k)
    out["cls_cosine_to_baseline"] = np.sum(emb * base_emb, axis=1)
    return out


def set_metrics(emb: np.ndarray, base_emb: np.ndarray, labels, multi_label: bool, seed: int,
                cpd_ref: M.CPDReference | None = None, notes: dict | None = None) -> dict[str, float]:
    """Set-level metrics of one group; `cpd_ref`: the baseline's `M.CPDReference` (same result, faster). With a
    `notes` dict, why a metric was adapted or is NaN on a small group is recorded there (see `_noted`)."""
    cpd = cpd_ref(emb) if cpd_ref is not None else M.cpd(base_emb, emb, seed=seed)
    out = {"cpd": cpd, "mean_cosine": M.mean_pairwise_cosine(emb),
           "effective_rank": M.effective_rank(emb)}
    if multi_label:
        ari, nmi = _noted(notes, "leiden", M.leiden_ari_nmi, emb, labels, seed=seed)
        out.update(leiden_ari=ari, leiden_nmi=nmi)
        out["knc_preservation"] = _noted(notes, "knc_preservation", M.knc_preservation, base_emb, emb, labels)
    return out


def _resample_counts(units_or_n, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_cells) counts of each cell in each bootstrap resample (donor-level when units are given)."""
    n = len(units_or_n) if not isinstance(units_or_n, int) else units_or_n
    counts = np.zeros((n_boot, n), dtype=np.float64)
    for i, idx in enumerate(M.bootstrap_indices(units_or_n, n_boot, seed)):
        counts[i] = np.bincount(idx, minlength=n)
    return counts


def _boot_mean_ci(values: np.ndarray, counts: np.ndarray, alpha: float) -> tuple[float, float]:
    """Percentile interval of the mean of `values` over the resamples in `counts` (NaNs left out)."""
    ok = ~np.isnan(values)
    num = counts @ np.where(ok, values, 0.0)
    den = counts @ ok.astype(float)
    means = num[den > 0] / den[den > 0]
    if len(means) < 5:
        return np.nan, np.nan
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


_SET_BOOT = {"cpd": lambda e, b, s: M.cpd(b, e, seed=s), "mean_cosine": lambda e, b, s: M.mean_pairwise_cosine(e),
             "effective_rank": lambda e, b, s: M.effective_rank(e)}


def _set_boots(emb, base_emb, units, n_boot: int, seed: int, with_cpd: bool = True,
               cpd_refs: dict | None = None) -> dict[str, np.ndarray]:
    """Set-level metrics recomputed on `n_boot` resamples (same resamples for every condition). CPD (a rank
    correlation over all pairs) is the costly one: callers bootstrap it for the overall group only, and pass
    `cpd_refs` (resample -> the baseline's `M.CPDReference` on it, filled on first use) so that the baseline's
    distances are ranked once per resample rather than once per condition."""
    if not n_boot:
        return {}
    out = {m: np.full(n_boot, np.nan) for m in _SET_BOOT if with_cpd or m != "cpd"}
    for i, idx in enumerate(M.bootstrap_indices(units if units is not None else len(emb), n_boot, seed)):
        for m in out:
            try:
                if m == "cpd" and cpd_refs is not None:
                    if i not in cpd_refs:
                        cpd_refs[i] = M.CPDReference(base_emb[idx], seed=seed)
                    out[m][i] = cpd_refs[i](emb[idx])
                else:
                    out[m][i] = _SET_BOOT[m](emb[idx], base_emb[idx], seed)
            except Exception:  # a degenerate resample is skipped, not fatal
                continue
    return out


@dataclass(frozen=True)
class _Group:
    """One group of cells (all, a label, a condition, label|condition) and what its metrics reuse for every
    condition: the bootstrap resamples and the baseline's set-level metrics and their bootstraps."""

    mask: np.ndarray  # (n_cells,) bool: the group's cells
    multi_label: bool  # several labels in the group: the label-structure set metrics apply
    units: np.ndarray | None  # donor per cell of the group, None to resample cells
    counts: np.ndarray  # (n_boot, n_group) cell counts of each bootstrap resample
    labels: np.ndarray | None  # label per cell of the group
    n_boot_set: int  # resamples for the set-level metrics (0: none for this group)
    base_set: dict  # baseline set-level metric -> value
    base_boots: dict  # baseline set-level metric -> (n_boot_set,) resampled values
    cpd_ref: M.CPDReference  # the baseline's CPD reference on the group
    cpd_refs: dict  # resample -> the baseline's CPDReference on it, filled on first use

    @property
    def unit(self) -> str:
        return "cells" if self.units is None else "donors"


def prune(model, masked: Sequence[Batch], plain: Sequence[Batch], candidates: pd.DataFrame, *,
          labels: np.ndarray | None = None, conditions: np.ndarray | None = None,
          donors: np.ndarray | None = None, options: PruneOptions | None = None, n_cells: int | None = None,
          case=None, control=None, progress: bool = False) -> PruneResult:
    """Run every condition and compute the long `collapse` table and the case-vs-control `contrasts`.

    `case` / `control` name the condition levels contrasted (see `scsuperweight.checks.resolve_case_control`,
    which is asked when they are not given and refuses to guess). Metrics adapted to a small group carry the
    reason in collapse's ``note`` column (the neighbour count used, or why the value is NaN).

    `masked` and `plain` are the same cells' batches with and without the fixed reconstruction mask (scGPT
    `Batch`es, or `scsuperweight.data.geneformer.CellBatch`es for a BERT-family masked LM; the evaluator is the
    family runner's, `scsuperweight.runners.get_runner(model).evaluator`); `labels`/`conditions`/`donors` are per
    cell (global cell index = the batches' ``.cells``).
    `n_cells` defaults to one past the largest cell index (pass it when some cells have no batch).
    Under torchrun the conditions are shared across ranks and rank 0 alone computes the tables (the others get
    empty ones, and their candidates and cell count in ``params``).
    """
    opts = options or PruneOptions()
    if n_cells is None:
        n_cells = int(max(int(np.max(b.cells)) for b in plain)) + 1
    labels = None if labels is None else np.asarray(labels).astype(str)
    conditions = None if conditions is None else np.asarray(conditions).astype(str)
    units = None if donors is None else np.asarray(donors).astype(str)
    if conditions is not None and labels is not None and len(set(conditions)) > 1:
        from .checks import resolve_case_control

        case, control = resolve_case_control(sorted(set(conditions)), None if case is None else str(case),
                                             None if control is None else str(control))
    cands = select_candidates(candidates, opts.max_candidates)
    built = build_conditions(model, cands, opts, batches=plain)
    gated = [c for c in built if opts.characterise == "passing" and c.kind in GATED_KINDS]
    logger.info("pruning: %d candidates, %d conditions over %d cells (%d more for the candidates that pass)",
                len(cands), len(built) - len(gated), n_cells, len(gated))
    net = get_adapter(model).model
    with forward_precision(net, opts.dtype):
        ev = evaluator_for(model, masked, plain, n_cells, emb=opts.embedding, progress=progress)
        runner = _Runner(ev, model, opts, progress)
        later_names = {c.name for c in gated}
        runner.run([c for c in built if c.name not in later_names])  # phase 1: zeroing, its controls, the #17 ablations
    results = runner.results
    conds = runner.ordered(built)
    ctx = dist.context()
    if not ctx.is_main:  # under torchrun rank 0 alone computes the tables (it writes them); the others run their
        extra = dist.receive_from_rank0(ctx)  # share of the phase-2 conditions it decides, and return no tables
        if extra:
            with forward_precision(net, opts.dtype):
                runner.run(extra)  # the same sequential rounds: every rank holds every result
        return PruneResult(pd.DataFrame(), pd.DataFrame(), params={"candidates": list(cands["candidate"]),
                                                                   "n_cells": n_cells, "rank": ctx.rank})
    # the metrics are many small matrix operations: multi-threaded BLAS only spins on them (measured 200x slower
    # on a busy 2-core machine), so they run on one BLAS thread
    with threadpool_limits(limits=1, user_api="blas"), dist.rank0_sends(ctx) as send:
        base = results[K.COND_BASELINE]
        groups = _groups(labels, conditions, opts.min_group_cells) if (labels is not None or conditions is not None) \
            else [(K.GROUP_ALL, np.ones(n_cells, dtype=bool), False)]
        base_notes: dict = {}
        base_pc = per_cell_metrics(base, None, labels, opts.k, base_notes)
        base_emb = l2_normalise(np.nan_to_num(base["cls"]))
        # per group, once: bootstrap resample counts (shared by every metric and condition), baseline set metrics
        gstate: dict[str, _Group] = {}
        set_notes: dict[str, dict] = {}  # group -> metric -> why it was adapted (same for every condition)
        for gi, (gname, gmask, multi) in enumerate(groups):
            gunits = units[gmask] if units is not None and len(set(units[gmask])) > 1 else None
            counts = _resample_counts(gunits if gunits is not None else int(gmask.sum()), opts.n_boot, opts.seed + gi)
            glabels = labels[gmask] if labels is not None else None
            boot_set = opts.n_boot_set if (gname == K.GROUP_ALL or (conditions is not None and gname in
                                                                     set(conditions))) else 0
            cref = M.CPDReference(base_emb[gmask], seed=opts.seed)
            brefs: dict = {}
            gnotes: dict = {}
            bset = set_metrics(base_emb[gmask], base_emb[gmask], glabels, multi, opts.seed, cref, gnotes)
            bboots = _set_boots(base_emb[gmask], base_emb[gmask], gunits, boot_set, opts.seed, gname == K.GROUP_ALL,
                                brefs)
            gstate[gname] = _Group(gmask, multi, gunits, counts, glabels, boot_set, bset, bboots, cref, brefs)
            set_notes[gname] = gnotes
        embeddings = {}

        def rows_of(cond: Condition) -> list[dict]:
            rows = []
            res = results[cond.name]
            is_base = cond.name == K.COND_BASELINE
            notes = base_notes if is_base else {}
            pc = base_pc if is_base else per_cell_metrics(res, base, labels, opts.k, notes)
            emb = l2_normalise(np.nan_to_num(res["cls"])) if "cls" in res else None
            kept = is_base or cond.name.startswith(("prune:", "restore:")) or cond.name == K.COND_TOP_OUTLIERS
            if emb is not None and kept:
                embeddings[cond.name] = emb.astype(np.float32)
            for gname, g in gstate.items():
                for metric, vals in pc.items():
                    if labels is None and R.needs_labels(metric):
                        continue
                    v, b = vals[g.mask], base_pc[metric][g.mask]
                    ok = ~np.isnan(v) & ~np.isnan(b)
                    if ok.sum() < 2:
                        continue
                    target = v if is_base else v - b
                    lo, hi = _boot_mean_ci(target, g.counts, opts.alpha)
                    rows.append(_row(cond, metric, gname, float(np.mean(v[ok])), float(np.mean(v[ok] - b[ok])), lo, hi,
                                     g.unit, _note(notes, metric)))
                if emb is None:  # no embedding: no set-level metrics
                    continue
                snotes = set_notes[gname] if is_base else {}
                sm = g.base_set if is_base else set_metrics(emb[g.mask], base_emb[g.mask], g.labels, g.multi_label,
                                                            opts.seed, g.cpd_ref, snotes)
                boots = g.base_boots if is_base else _set_boots(emb[g.mask], base_emb[g.mask], g.units, g.n_boot_set,
                                                                opts.seed, gname == K.GROUP_ALL, g.cpd_refs)
                for metric, value in sm.items():
                    lo = hi = np.nan
                    if metric in boots:
                        d = boots[metric] if is_base else boots[metric] - g.base_boots[metric]
                        d = d[~np.isnan(d)]
                        if len(d) >= 5:
                            lo, hi = np.quantile(d, [opts.alpha / 2, 1 - opts.alpha / 2])
                    why = _note(snotes, "leiden" if metric.startswith("leiden_") else metric)
                    rows.append(_row(cond, metric, gname, float(value), float(value - g.base_set.get(metric, np.nan)),
                                     lo, hi, g.unit, why))
            return rows

        rows = [r for cond in tqdm(conds, desc="metrics", disable=not progress, leave=False) for r in rows_of(cond)]
        collapse = _add_p_values(pd.DataFrame(rows))
        # phase 2, on the zeroing verdicts: restore, scaling and |w|-matched draws of the candidates that pass
        # (what a candidate that does not matter does when restored or scaled is not a question), and the joint
        # ablation of the passing candidates; under torchrun rank 0 decides and sends them to the other ranks
        passing = _passing(model, cands, collapse, opts)
        later = [c for c in gated if _owner(c) in passing]
        skipped = sorted({_owner(c) for c in gated} - passing)
        phase2 = send([*later, *joint_conditions(model, cands, collapse, opts, passing=passing)])
        if phase2:
            with forward_precision(net, opts.dtype):
                runner.run(phase2)
            extra = [c for c in runner.ordered(phase2) if c.name not in {x.name for x in conds}]
            rows += [r for cond in extra for r in rows_of(cond)]
            conds = [*conds, *extra]
            collapse = _add_p_values(pd.DataFrame(rows))
    nulls = runner.nulls()
    collapse = _add_null_columns(collapse, conds, nulls)
    if not opts.draw_embeddings:
        collapse = _note_unjudged(collapse, reconstruction_metrics(results[K.COND_BASELINE]))
    firstorder = _first_order_table(model, masked, conds, collapse, nulls, opts) if opts.first_order else None
    contrasts = _contrasts(conds, results, base_pc, labels, conditions, units, opts, case, control) \
        if case is not None and control is not None else pd.DataFrame()
    cond_table = pd.DataFrame([{"condition": c.name, "candidate": c.candidate, "control_for": c.control_for,
                                "factor": c.factor, "n_edits": len(c.edits),
                                "edits": ";".join(A.describe_edit(e) for e in c.edits),
                                "restore": "" if c.restore is None else f"{c.restore[0]}[{c.restore[1]}]",
                                "kind": c.kind, "null_pool": _null_pool(c),
                                "patch": "" if c.patch is None else "{}[{}]={:.6g}@{}".format(*c.patch)}
                               for c in conds])
    params = {**opts.__dict__, "n_cells": n_cells, "n_conditions": len(conds), "blocks_recomputed": ev.forwards,
              "candidates": list(cands["candidate"]), "case": case, "control": control,
              "null_draws": {p: n.draws for p, n in nulls.items()} if nulls else None,
              "conditions_by_kind": dict(Counter(c.kind for c in conds)),
              "characterised": sorted(passing & {_owner(c) for c in gated}) if gated else None,
              "not_characterised": {cid: (f"zeroing does not pass the controls on {runner.metric}: no "
                                          f"{', '.join(sorted({c.kind for c in gated if _owner(c) == cid}))}")
                                    for cid in skipped}}
    if not opts.draw_embeddings:
        params["embedding_metrics_judged"] = False
        params["embedding_metrics_note"] = UNJUDGED_NOTE
    params["scale_factors"] = list(opts.scale_factors)
    params["granularities"] = list(opts.granularities)
    return PruneResult(collapse, contrasts, embeddings, cond_table, params, firstorder)


def run_conditions(ev, conds: Sequence[Condition], *, progress: bool = False) -> dict[str, dict]:
    """Run `conds` with the evaluator `ev`: condition name -> its per-cell result arrays, in `conds` order.

    The one place where conditions execute, so that persisting finished conditions (resume), sharding them across
    ranks and running the random draws in sequential rounds all meet here rather than in `prune`. Inside a
    `scsuperweight.condstore.persisting` block, conditions already in its store are not rerun and each one is saved
    as it finishes; under torchrun they are dealt out across ranks (`scsuperweight.condstore.execute`).
    """
    from .condstore import execute

    return execute(ev.run, conds, progress=progress)


@dataclass(frozen=True)
class NullRecord:
    """How one parameter's random draws went: draws made, whether they stopped before `n_random`, and the
    sequential p (Besag & Clifford 1991) of each condition judged against them, by condition name."""

    param: str
    draws: int
    stopped_early: bool
    h: int
    max_draws: int
    p: dict  # condition name -> sequential p


def _all_delta(res: dict, base: dict, metric: str) -> float:
    """The all-cells delta of a per-cell metric, as the collapse table computes it (mean of v - b where both are
    finite)."""
    v, b = np.asarray(res[metric], dtype=float), np.asarray(base[metric], dtype=float)
    ok = ~np.isnan(v) & ~np.isnan(b)
    return float(np.mean(v[ok] - b[ok])) if ok.sum() >= 2 else float("nan")


# the kinds of control draws (each names its pool in control_for) and the characterisation conditions that run
# only for candidates whose zeroing passes (``PruneOptions.characterise="passing"``)
DRAW_KINDS = ("random", "random_neuron", "random_channel", "matched", "random_joint")
GATED_KINDS = ("restore", "scale", "matched")


def _judging_pools(cond: Condition) -> list[str]:
    """The pools of control draws a condition's p-values are taken against: its ``null_pool`` (the p-value) and,
    for a candidate's scalar-level conditions, the candidate's |w|-matched draws (``p_matched``), as
    `_add_p_values` takes them."""
    if cond.control_for or cond.kind in ("baseline", K.COND_TOP_OUTLIERS):
        return []
    pool = _null_pool(cond)
    out = [pool] if pool else []
    if cond.candidate and not pool.startswith(_UNIT_POOLS):
        out.append(cond.candidate)
    return out


def _owner(cond: Condition) -> str:
    """The candidate a condition belongs to (a |w|-matched draw names it as its pool)."""
    return cond.candidate or (cond.control_for if cond.kind == "matched" else "")


def _edits_key(cond: Condition) -> tuple:
    """What a condition computes (its edits, restore and patch): two conditions with one key give one result. An
    edit that changes nothing (factor 1, no value, no shift: scaling by 1) is left out, so it is the baseline."""
    edits = (e for e in cond.edits if not (e.value is None and e.factor == 1.0 and e.add == 0.0))
    return (tuple((e.param, tuple(e.index), e.factor, e.value, e.add) for e in edits), cond.restore, cond.patch)


class _Runner:
    """Runs a prune's conditions in phases, the control draws of every pool sequentially.

    Each call to `run` runs the phase's non-draw conditions, then its draws pool by pool (a pool: the draws
    sharing a ``control_for``: a parameter's uniform ``random:`` draws, a block's random neurons or channels, a
    candidate's |w|-matched draws, the joint ablation's random sets) in rounds until every condition judged
    against that pool is settled (Besag & Clifford 1991, `scsuperweight.sequential`) or the pool is exhausted.
    A condition judged against a pool that stopped in an earlier phase first replays the draws made, and the pool
    draws on if that does not settle it, so no judged p rests on a truncated pool. Draws run in `build_conditions`
    order, so a sequential run measures a prefix of the fixed run's draws. A condition computing exactly what an
    earlier one did (``scale:<cand>:0`` is ``prune:<cand>``) shares its result instead of a second forward.
    Without ``opts.sequential`` (or without a per-cell primary metric) every draw runs.
    """

    def __init__(self, ev, model, opts: PruneOptions, progress: bool = False):
        self.ev, self.model, self.opts, self.progress = ev, model, opts, progress
        self.results: dict[str, dict] = {}
        self.ran: list[Condition] = []
        self.pool_conds: dict[str, list[Condition]] = {}  # pool -> its draw conditions, in `build_conditions` order
        self.pools: dict[str, SequentialPool] = {}
        self.metric: str | None = None
        self.sequential = opts.sequential
        self._keys: dict[tuple, str] = {}

    def _execute(self, conds: Sequence[Condition]) -> None:
        todo, alias = [], {}
        for c in conds:
            key = (_edits_key(c), c.embedding)  # a result without the embedding serves no condition needing it
            if key in self._keys:
                alias[c.name] = self._keys[key]
            else:
                self._keys[key] = c.name
                todo.append(c)
        self.results.update(run_conditions(self.ev, todo, progress=self.progress))
        for name, same in alias.items():
            self.results[name] = self.results[same]

    def _delta(self, name: str) -> float:
        return _all_delta(self.results[name], self.results[K.COND_BASELINE], self.metric)

    def run(self, conds: Sequence[Condition]) -> None:
        fixed = [c for c in conds if not c.control_for]
        # without draw_embeddings the draws run the masked pass only: they feed the p-values and the sequential
        # stopping on the reconstruction metrics (the primary one decides), not the embedding metrics'
        draws = [c if self.opts.draw_embeddings else replace(c, embedding=False) for c in conds if c.control_for]
        self._execute(fixed)
        self.ran += fixed
        if self.metric is None:
            measured = reconstruction_metrics(self.results[K.COND_BASELINE])
            self.metric = self.opts.primary_metric or get_runner(self.model).primary_metric(set(measured))
            if self.sequential and self.metric not in measured:
                # a set-level primary metric cannot be scored per draw: every draw, as before
                logger.warning("sequential nulls need a per-cell primary metric; %r is not one: every draw is run",
                               self.metric)
                self.sequential = False
        new: dict[str, list[Condition]] = {}
        for c in draws:
            new.setdefault(c.control_for, []).append(c)
        for p, cs in new.items():
            self.pool_conds.setdefault(p, []).extend(cs)
            h = decision_h(self.opts.alpha, len(self.pool_conds[p]))
            if p in self.pools:
                self.pools[p].grow(len(cs), h=h)
            else:
                self.pools[p] = SequentialPool(h=h, max_draws=len(cs))
        if not self.sequential:
            self._execute(draws)
            self.ran += draws
            return
        for c in self.ran:  # every condition judged against a pool joins it, replaying the draws made so far
            for p in _judging_pools(c):
                if p in self.pools and c.name not in self.pools[p].tests and np.isfinite(d := self._delta(c.name)):
                    self.pools[p].join(c.name, d)
        while todo := {p: self.pool_conds[p][pool.draws:pool.draws + n] for p, pool in self.pools.items()
                       if (n := pool.next_round())}:
            batch = [c for cs in todo.values() for c in cs]
            self._execute(batch)
            self.ran += batch
            for p, cs in todo.items():  # deltas on the host once per round, not per condition
                for c in cs:
                    self.pools[p].add(self._delta(c.name))

    def nulls(self) -> dict[str, NullRecord]:
        """One `NullRecord` per pool (empty without sequential nulls: every draw ran)."""
        if not self.sequential:
            return {}
        out = {}
        for p, pool in self.pools.items():
            out[p] = NullRecord(p, pool.draws, pool.stopped_early, pool.h, pool.max_draws, pool.p)
            logger.info("null %s: %d of %d draws%s", p, pool.draws, pool.max_draws,
                        " (stopped early: decisions settled)" if pool.stopped_early else "")
        return out

    def ordered(self, conds: Sequence[Condition]) -> list[Condition]:
        """The conditions of `conds` that ran, in `conds` order."""
        return [c for c in conds if c.name in self.results]


def _add_null_columns(df: pd.DataFrame, conds: Sequence[Condition], nulls: dict[str, NullRecord]) -> pd.DataFrame:
    """``null_draws`` (draws in the row's null pool; all draws for a row with no pool), ``null_stopped_early``
    and, on the rows of every condition judged against a pool, ``p_sequential`` (its Besag-Clifford p on the
    primary metric; the same
    value on every metric's row, since only the primary metric decided when to stop)."""
    if df.empty:
        return df
    n_pool = Counter(c.control_for for c in conds if c.control_for)
    total = sum(1 for c in conds if c.kind == "random")
    df["null_draws"] = [n_pool.get(p, 0) if p else total for p in df["null_pool"]]
    df["null_stopped_early"] = [bool(nulls[p].stopped_early) if p in nulls else False for p in df["null_pool"]]
    # a condition judged against two pools (its parameter's draws and its |w|-matched draws): its null_pool's p
    p_seq = {(n.param, c): p for n in nulls.values() for c, p in n.p.items()}
    df["p_sequential"] = [p_seq.get((pool, c), np.nan) for c, pool in zip(df["condition"], df["null_pool"])]
    return df


def _first_order_table(model, masked: Sequence, conds: Sequence[Condition], collapse: pd.DataFrame,
                       nulls: dict[str, NullRecord], opts: PruneOptions) -> pd.DataFrame | None:
    """Per candidate: its first-order effect, rank and percentile among all scalars of its matrix, its exact
    delta, and per parameter the Spearman correlation of the first-order estimates with the exact deltas of the
    random draws (`scsuperweight.firstorder`). None when the family has no first-order metric (it informs; the
    exact draws decide)."""
    measured = set(collapse["metric"]) if len(collapse) else set()
    try:
        metric = opts.primary_metric or get_runner(model).primary_metric(measured or None)
    except DataError:
        return None
    if metric not in _FIRST_ORDER_METRICS:  # the differentiable metrics firstorder implements (scGPT's decoders)
        logger.info("no first-order null for %s: it is implemented for %s", metric, list(_FIRST_ORDER_METRICS))
        return None
    cand_conds = [c for c in conds if c.name.startswith("prune:") and c.edits]
    params = list(dict.fromkeys(c.edits[0].param for c in cand_conds))
    if not params:
        return None
    with forward_precision(get_adapter(model).model, opts.dtype):
        effects = first_order_effects(model, masked, params, metric=metric)
    all_rows = collapse[(collapse["metric"] == metric) & (collapse["group"] == K.GROUP_ALL)]
    exact = dict(zip(all_rows["condition"], all_rows["delta"]))
    corr, n_draws = {}, {}
    for p in params:
        rand = [c for c in conds if c.kind == "random" and c.control_for == p and c.name in exact]
        fo = [float(effects[p][tuple(c.edits[0].index)]) for c in rand]
        corr[p] = rank_correlation(fo, [exact[c.name] for c in rand])
        n_draws[p] = len(rand)
    rows = []
    for c in cand_conds:
        e = c.edits[0]
        rank, pct = rank_of(effects[e.param], e.index)
        rows.append({"candidate": c.candidate, "param": e.param, "metric": metric,
                     "first_order": float(effects[e.param][tuple(e.index)]), "rank": rank, "percentile": pct,
                     "n_scalars": int(effects[e.param].numel()), "exact_delta": exact.get(c.name, np.nan),
                     "rank_correlation": corr[e.param], "n_draws": n_draws[e.param]})
    return pd.DataFrame(rows)


_FIRST_ORDER_METRICS = ("gepc_mse", "gep_mse")


def _null_pool(cond: Condition) -> str:
    """The parameter whose random draws are a condition's null: its own for a random draw, the edited parameter's
    for a candidate's conditions, "" for the baseline and for top_outliers (several parameters: all draws)."""
    if cond.control_for:
        return cond.control_for
    if cond.null_pool:  # an ablation names its own (a mean: the parameter's; a neuron: neuron:L<l>; joint)
        return cond.null_pool
    if cond.edits and cond.name != K.COND_TOP_OUTLIERS:
        return cond.edits[0].param
    return ""


def _row(cond: Condition, metric, group, value, delta, lo, hi, unit, note: str = "") -> dict:
    return {"condition": cond.name, "metric": metric, "group": group, "value": value,
            "delta": 0.0 if cond.name == K.COND_BASELINE else delta, "ci_low": lo, "ci_high": hi,
            "p_value": np.nan, "ci_of": "value" if cond.name == K.COND_BASELINE else "delta",
            "bootstrap_unit": unit, "candidate": cond.candidate, "control_for": cond.control_for,
            "null_pool": _null_pool(cond), "factor": cond.factor, "p_matched": np.nan, "note": note}


UNJUDGED_NOTE = ("embedding metrics not judged: draws ran without the embedding pass (budget lever "
                 "draw_embeddings)")


def _note_unjudged(df: pd.DataFrame, reconstruction: Sequence[str]) -> pd.DataFrame:
    """`UNJUDGED_NOTE` on the rows of the conditions judged against draws whose metric is not a reconstruction
    metric: their draws ran without the plain pass (``draw_embeddings=False``), so their p-value is NaN."""
    if df.empty:
        return df
    rows = (df["condition"] != K.COND_BASELINE) & (df["control_for"] == "") & ~df["metric"].isin(reconstruction)
    note = df["note"].fillna("").astype(str)
    df["note"] = np.where(rows, np.where(note == "", UNJUDGED_NOTE, note + "; " + UNJUDGED_NOTE), note)
    return df


_UNIT_POOLS = ("neuron:", "channel:", K.COND_JOINT)  # pools of whole units, not of a candidate's parameter


def _add_p_values(df: pd.DataFrame) -> pd.DataFrame:
    """p of each non-random condition's delta against the control draws of its ``null_pool`` (the uniform
    ``random:`` draws of all parameters when it has none: top_outliers edits several parameters), two-sided; and
    ``p_matched``, against the candidate's |w|-matched draws (pool: the candidate), for the conditions whose null
    is the candidate's parameter."""
    if df.empty:
        return df
    rand = df[df["control_for"] != ""]
    null = {key: g["delta"].to_numpy() for key, g in rand.groupby(["control_for", "metric", "group"])}
    uniform = rand[rand["condition"].str.startswith("random:")]
    null_all = {key: g["delta"].to_numpy() for key, g in uniform.groupby(["metric", "group"])}
    pm = []
    for r in df.itertuples():
        pool = None if r.control_for or not r.candidate or str(r.null_pool).startswith(_UNIT_POOLS) \
            else null.get((r.candidate, r.metric, r.group))
        pool = None if pool is None else pool[~np.isnan(pool)]
        ok = pool is not None and len(pool) and not np.isnan(r.delta)
        pm.append(M.empirical_p(r.delta, pool, alternative="two-sided") if ok else np.nan)
    df["p_matched"] = pm
    p = []
    for r in df.itertuples():
        if r.condition == K.COND_BASELINE or r.control_for:
            p.append(np.nan)
            continue
        pool = null.get((r.null_pool, r.metric, r.group)) if r.null_pool else null_all.get((r.metric, r.group))
        if pool is None or len(pool) == 0 or np.isnan(r.delta):
            p.append(np.nan)
        else:
            p.append(M.empirical_p(r.delta, pool[~np.isnan(pool)], alternative="two-sided"))
    df["p_value"] = p
    cols = [*K.COLLAPSE_COLUMNS]
    return df[cols + [c for c in df.columns if c not in cols]]


# reconstruction metrics in the contrasts table: errors first, then correlations (unknown ones last)
_CONTRAST_ORDER = {m: i for i, m in enumerate(("gep_mse", "gepc_mse", "mlm_loss", "gep_pearson", "gepc_pearson",
                                               "mlm_accuracy"))}


def _contrasts(conds, results, base_pc, labels, conditions, units, opts, case=None, control=None) -> pd.DataFrame:
    """Per cell type: (delta in case cells) - (delta in control cells), with a bootstrap interval; each row names
    its case and control (``case``, ``control``, ``contrast``, ``delta_<case>``, ``delta_<control>``). Cells of
    any other condition level enter no contrast."""
    if case is None or control is None:
        from .checks import resolve_case_control

        case, control = resolve_case_control(sorted(set(conditions)), case, control)
    case, ctrl = str(case), str(control)
    silenced: dict = {}  # small-group notes are the collapse table's; not repeated here
    rows = []
    base = results[K.COND_BASELINE]
    for cond in conds:
        if not cond.name.startswith(("prune:", "restore:")) and cond.name != K.COND_TOP_OUTLIERS:
            continue
        pc = per_cell_metrics(results[cond.name], base, labels, opts.k, silenced)
        recon = sorted(reconstruction_metrics(results[cond.name]), key=lambda m: _CONTRAST_ORDER.get(m, 99))
        for metric in (*recon, "cls_cosine_to_baseline", "knn_preservation"):
            if metric not in pc:
                continue
            d = pc[metric] - (base_pc[metric] if metric in base_pc else 0)
            for lab in sorted(set(labels)):
                a = (labels == lab) & (conditions == case) & ~np.isnan(d)
                b = (labels == lab) & (conditions == ctrl) & ~np.isnan(d)
                if a.sum() < opts.min_group_cells or b.sum() < opts.min_group_cells:
                    continue
                ua = units[a] if units is not None and len(set(units[a])) > 1 else None
                ub = units[b] if units is not None and len(set(units[b])) > 1 else None
                if (ua is None) != (ub is None):
                    ua = ub = None
                lo, hi = M.bootstrap_diff_ci(d[a], d[b], units_a=ua, units_b=ub, n_boot=opts.n_boot,
                                             alpha=opts.alpha, seed=opts.seed)
                rows.append({"condition": cond.name, "metric": metric, "group": lab,
                             f"delta_{case}": float(d[a].mean()), f"delta_{ctrl}": float(d[b].mean()),
                             "difference": float(d[a].mean() - d[b].mean()), "ci_low": lo, "ci_high": hi,
                             "contrast": f"{case} - {ctrl}", "case": case, "control": ctrl,
                             "n_case": int(a.sum()), "n_control": int(b.sum()),
                             "bootstrap_unit": "cells" if ua is None else "donors",
                             "ci_level": 1.0 - opts.alpha})
    return pd.DataFrame(rows)
