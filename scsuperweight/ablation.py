"""Ablations beyond zeroing one scalar: mean ablation, three granularities, a joint ablation, and their controls.

Zeroing a massive activation can over-state what it does: Sun et al. (2024) found zeroing destroys LLMs while
setting the activation to its mean is harmless. This module BUILDS the edits for those claims; prune runs them
beside its own conditions with the same inputs and nulls. Condition names (collapse.tsv):

- ``mean:<cand>``: the candidate's contribution replaced by its mean over the given cells and tokens. For a
  projection scalar ``w_rc`` that is exactly: ``w_rc = 0`` and ``bias[r] += mean(x_c) * w_rc`` (the output keeps the
  mean of ``x_c * w_rc`` and loses only its variation). For a LayerNorm dimension: ``gain[r] = 0`` and
  ``bias[r] = mean`` of that dimension's output, so the output is its mean everywhere.
- ``mean_activation:<cand>``: the spike site's channel set to its mean at the spike token (a constant patch).
- ``neuron:<cand>``: the intermediate unit ``c`` of a down-projection scalar ``[r, c]``: up-projection row ``c`` (and
  its bias) and down-projection column ``c``.
- ``channel:<cand>``: every parameter of the block that writes or rescales residual channel ``r``: the FFN and
  attention output projections' row ``r`` (and biases), both LayerNorms' gain and bias at ``r``.
- ``joint``: every given candidate zeroed together.
- Controls: ``random_neuron:L<layer>:<k>`` and ``random_channel:L<layer>:<k>`` (the same granularity in the same
  block; ``control_for`` names the pool ``neuron:L<layer>`` / ``channel:L<layer>``), and
  ``matched:<cand>:<k>`` (a random scalar of the candidate's matrix from the candidate's own |w| quantile bin;
  ``control_for`` is the candidate), beside prune's uniform ``random:<k>`` draws; ``random_joint:<k>`` (one random
  scalar of each joint candidate's parameter, zeroed together; pool ``joint``).

Every ablation names its null in ``null_pool``: a mean or mean_activation the candidate's parameter (prune's uniform
draws of that parameter, the same null as zeroing), a neuron ``neuron:L<layer>``, a channel ``channel:L<layer>``,
the joint ablation ``joint``, and a control draw its own pool.

Means are taken with forward hooks over the batches given (the evaluated cells), padding excluded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import _keys as K
from .adapters import get_adapter
from .errors import DataError
from .instrument import ActivationPatch, ScalarEdit, edit, no_fastpath
from .instrument.targets import constant_patches, restore_target, token_id


def cond_mean(candidate: str) -> str:
    return f"mean:{candidate}"


def cond_mean_activation(candidate: str) -> str:
    return f"mean_activation:{candidate}"


def cond_neuron(candidate: str) -> str:
    return f"neuron:{candidate}"


def cond_channel(candidate: str) -> str:
    return f"channel:{candidate}"


COND_JOINT = K.COND_JOINT


@dataclass(frozen=True)
class Ablation:
    """One condition: scalar edits, optionally a constant activation patch ``(site, channel, value, token_id)``
    (``token_id`` None: every position)."""

    name: str
    edits: tuple[ScalarEdit, ...]
    kind: str  # mean, mean_activation, neuron, channel, joint, random_neuron, random_channel, matched
    candidate: str = ""
    control_for: str = ""  # the null pool of a control draw
    patch: tuple[str, int, float, int | None] | None = None
    null_pool: str = ""  # whose draws are this condition's null (a draw's own pool; see the module doc)

    def patches(self, token_ids: torch.Tensor | None) -> list[ActivationPatch]:
        """The activation patches for a batch whose (B, L) token ids are `token_ids`."""
        return constant_patches(self.name, self.patch, token_ids)

    def to_dict(self) -> dict:
        return {"condition": self.name, "kind": self.kind, "candidate": self.candidate,
                "control_for": self.control_for, "n_edits": len(self.edits),
                "edits": ";".join(describe_edit(e) for e in self.edits),
                "patch": "" if self.patch is None else "{}[{}]={:.6g}@{}".format(*self.patch)}


def describe_edit(e: ScalarEdit) -> str:
    """One edit in words for the conditions table: ``param[i, j]x0``, ``param[i]=0.5``, ``param[i]x1+2.5``."""
    how = f"={e.value:.6g}" if e.value is not None else f"x{e.factor:g}" + (f"{e.add:+.6g}" if e.add else "")
    return f"{e.param}{list(e.index)}{how}"


def ablations_frame(ablations: Iterable[Ablation]) -> pd.DataFrame:
    """What each ablation edits, one row per condition (for the conditions table)."""
    return pd.DataFrame([a.to_dict() for a in ablations])


# ------------------------------------------------------------------------------------------------------------
# means over cells and tokens
# ------------------------------------------------------------------------------------------------------------
def _token_ids(adapter, batch) -> torch.Tensor | None:
    ctx = adapter.batch_context(batch)
    return ctx.token_ids


@torch.no_grad()
def site_means(model, batches: Iterable, sites: Sequence[str], token_id: int | None = None
               ) -> dict[str, torch.Tensor]:
    """Mean of every channel of each site over the non-padding positions of `batches` (only the positions holding
    `token_id` when given), in float64 on CPU."""
    adapter = get_adapter(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = dict.fromkeys(sites, 0.0)
    state: dict = {}

    def take(name: str, x: torch.Tensor) -> None:
        x = x[None] if x.dim() == 2 else x  # (B, L, d)
        keep = state["keep"]
        if keep is None:
            keep = torch.ones(x.shape[:2], dtype=torch.bool)
        keep = keep.to(x.device)
        sel = x[keep].double().cpu()
        sums[name] = sums.get(name, torch.zeros(x.shape[-1], dtype=torch.float64)) + sel.sum(0)
        counts[name] += sel.shape[0]

    handles = []
    for name in sites:
        site = adapter.sites[name] if name in adapter.sites else adapter.select_sites(name)[0]
        mod = adapter.model.get_submodule(site.module)
        if site.io == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: take(n, a[0])))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: take(n, o[0] if isinstance(o, tuple) else o)))
    try:
        with no_fastpath(adapter.model):
            for b in batches:
                ctx = adapter.batch_context(b)
                keep = None if ctx.padding_mask is None else ~ctx.padding_mask.bool()
                if token_id is not None:
                    if ctx.token_ids is None:
                        msg = "a mean at a token needs batches whose token ids the adapter can read."
                        raise DataError(msg)
                    at = ctx.token_ids.eq(token_id)
                    keep = at if keep is None else keep & at.to(keep.device)
                state["keep"] = None if keep is None else keep.cpu()
                adapter.run(b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name in sites:
        if not counts[name]:
            msg = f"site {name} saw no position to average (token {token_id!r} absent from the batches?)."
            raise DataError(msg)
        out[name] = sums[name] / counts[name]
    return out


# ------------------------------------------------------------------------------------------------------------
# reading a candidate row
# ------------------------------------------------------------------------------------------------------------
def _index(row) -> tuple[int, ...]:
    col = row.get("col")
    if col is None or (isinstance(col, str) and not col) or bool(pd.isna(col)):
        return (int(row["row"]),)
    return int(row["row"]), int(col)


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def _has(adapter, name: str) -> bool:
    try:
        adapter.param(name)
    except AttributeError:
        return False
    return True


def _proj_site(adapter, param: str):
    for s in adapter.sites.values():
        if s.proj_param == param:
            return s
    return None


def _norm_out_site(adapter, param: str):
    module = _module_of(param)
    for s in adapter.sites.values():
        if s.module == module and s.io == "out" and (s.norm_weight or s.norm_bias):
            return s
    return None


def _zero(param: str, index: Sequence[int]) -> ScalarEdit:
    return ScalarEdit(param, tuple(int(i) for i in index), 0.0)


def _cand_layer(adapter, cand) -> int:
    """The candidate's block: its ``layer`` column, else the block of the site its parameter belongs to."""
    layer = cand.get("layer")
    if layer is None or (not isinstance(layer, str) and pd.isna(layer)):
        return _layer_of(adapter, str(cand["param"]))
    return int(layer)


def _layer_of(adapter, param: str) -> int:
    for s in adapter.sites.values():
        if param in (s.proj_param, s.norm_weight, s.norm_bias):
            return s.layer
    return -1


# ------------------------------------------------------------------------------------------------------------
# requirement 1: mean ablation
# ------------------------------------------------------------------------------------------------------------
def mean_ablation(model, cand, batches: Sequence) -> Ablation:
    """``mean:<cand>``: the candidate's contribution replaced by its mean over `batches` (see the module doc)."""
    adapter = get_adapter(model)
    param, idx, cid = str(cand["param"]), _index(cand), str(cand["candidate"])
    if len(idx) == 2:
        r, c = idx
        bias = f"{_module_of(param)}.bias"
        if not _has(adapter, bias):
            msg = (f"mean ablation of {cid} adds the mean contribution to {bias}, which this model does not have; "
                   "use mean_activation instead.")
            raise DataError(msg)
        site = _proj_site(adapter, param)
        if site is None:
            msg = f"no site writes {param}; mean ablation needs the projection's input."
            raise DataError(msg)
        W = adapter.param(param).detach()
        if site.proj_input_site is not None:
            x_mean = float(site_means(adapter, batches, [site.proj_input_site])[site.proj_input_site][c])
        else:  # the input is not a module's: mean output = W mean(x) + b, solved for mean(x)
            y = site_means(adapter, batches, [site.name])[site.name]
            y = y - adapter.param(bias).detach().double().cpu()
            x_mean = float(torch.linalg.lstsq(W.double().cpu(), y[:, None]).solution[c, 0])
        w = float(W[r, c])
        edits = (_zero(param, idx), ScalarEdit(bias, (r,), 1.0, add=x_mean * w))
        return Ablation(cond_mean(cid), edits, "mean", cid, null_pool=param)
    site = _norm_out_site(adapter, param)
    if site is None or not site.norm_weight or not site.norm_bias:
        msg = f"mean ablation of the norm dimension {cid} needs a norm with a gain and a bias and an output site."
        raise DataError(msg)
    r = idx[0]
    mean = float(site_means(adapter, batches, [site.name])[site.name][r])
    edits = (ScalarEdit(site.norm_weight, (r,), value=0.0), ScalarEdit(site.norm_bias, (r,), value=mean))
    return Ablation(cond_mean(cid), edits, "mean", cid, null_pool=param)


def _activation_target(adapter, cand) -> tuple[str, int] | None:
    site = cand.get("site")
    if site is None or (not isinstance(site, str) and pd.isna(site)):
        return None
    return restore_target(adapter, _zero(str(cand["param"]), _index(cand)), str(site), int(cand["channel"]))


def mean_activation_ablation(model, cand, batches: Sequence) -> Ablation:
    """``mean_activation:<cand>``: the spike site's channel set, at the spike token, to its mean there."""
    adapter = get_adapter(model)
    cid = str(cand["candidate"])
    target = _activation_target(adapter, cand)
    token = cand.get("token")
    tid = token_id(adapter, str(token)) if token is not None and not pd.isna(token) and token else None
    if target is None or tid is None:
        msg = f"{cid} has no spike site and token to patch (a weight-only screen row?); no mean_activation."
        raise DataError(msg)
    site, channel = target
    mean = float(site_means(adapter, batches, [site], token_id=tid)[site][channel])
    return Ablation(cond_mean_activation(cid), (), "mean_activation", cid, patch=(site, channel, mean, tid),
                    null_pool=str(cand["param"]))


# ------------------------------------------------------------------------------------------------------------
# requirement 2: granularities
# ------------------------------------------------------------------------------------------------------------
def _up_projections(adapter, layer: int) -> list[str]:
    """Weight names of the block's up-projection(s) (two for a gated FFN)."""
    site = adapter.sites.get(f"L{layer}.ffn_in")
    if site is None:
        return []
    if _has(adapter, f"{site.module}.weight"):
        return [f"{site.module}.weight"]
    return [f"{site.module}.{n}.weight" for n in ("gate_proj", "up_proj") if _has(adapter, f"{site.module}.{n}.weight")]


def _neuron_edits(adapter, layer: int, down: str, c: int) -> tuple[ScalarEdit, ...]:
    edits = []
    for up in _up_projections(adapter, layer):
        W1 = adapter.param(up)
        edits += [_zero(up, (c, j)) for j in range(W1.shape[1])]
        if _has(adapter, f"{_module_of(up)}.bias"):
            edits.append(_zero(f"{_module_of(up)}.bias", (c,)))
    W2 = adapter.param(down)
    edits += [_zero(down, (i, c)) for i in range(W2.shape[0])]
    return tuple(edits)


def _ffn_down(adapter, layer: int) -> str | None:
    s = adapter.sites.get(f"L{layer}.ffn_out")
    return s.proj_param if s is not None else None


def neuron_ablation(model, cand) -> Ablation:
    """``neuron:<cand>``: the intermediate unit c of a down-projection scalar [r, c] zeroed in and out."""
    adapter = get_adapter(model)
    param, idx, cid = str(cand["param"]), _index(cand), str(cand["candidate"])
    site = _proj_site(adapter, param)
    if len(idx) != 2 or site is None or site.kind != "ffn_out":
        msg = f"{cid} is not a down-projection scalar; a neuron ablation needs an FFN unit (kind ffn_down)."
        raise DataError(msg)
    return Ablation(cond_neuron(cid), _neuron_edits(adapter, site.layer, param, idx[1]), "neuron", cid,
                    null_pool=f"neuron:L{site.layer}")


def _channel_edits(adapter, layer: int, r: int) -> tuple[ScalarEdit, ...]:
    edits: list[ScalarEdit] = []
    for kind in ("ffn_out", "attn_out"):
        s = adapter.sites.get(f"L{layer}.{kind}")
        if s is None or not s.proj_param:
            continue
        W = adapter.param(s.proj_param)
        edits += [_zero(s.proj_param, (r, j)) for j in range(W.shape[1])]
        if _has(adapter, f"{_module_of(s.proj_param)}.bias"):
            edits.append(_zero(f"{_module_of(s.proj_param)}.bias", (r,)))
    seen = set()
    for kind in ("norm1_out", "norm2_out"):
        s = adapter.sites.get(f"L{layer}.{kind}")
        if s is None:
            continue
        for p in (s.norm_weight, s.norm_bias):
            if p and p not in seen:
                seen.add(p)
                edits.append(_zero(p, (r,)))
    return tuple(edits)


def channel_ablation(model, cand) -> Ablation:
    """``channel:<cand>``: everything in the candidate's block that writes or rescales its residual channel r."""
    adapter = get_adapter(model)
    param, idx, cid = str(cand["param"]), _index(cand), str(cand["candidate"])
    layer = _cand_layer(adapter, cand)
    r = idx[0]
    if layer < 0:  # an embedding-level norm: its own gain and bias are what writes the channel
        site = _norm_out_site(adapter, param)
        if site is None:
            msg = f"{cid} is in no block and no norm the adapter names; a channel ablation needs one."
            raise DataError(msg)
        edits = tuple(_zero(p, (r,)) for p in (site.norm_weight, site.norm_bias) if p)
    else:
        edits = _channel_edits(adapter, layer, r)
    return Ablation(cond_channel(cid), edits, "channel", cid, null_pool=f"channel:L{layer}")


def joint_ablation(model, cands: pd.DataFrame) -> Ablation:
    """``joint``: every candidate of `cands` (e.g. those that pass) zeroed together."""
    edits = tuple(_zero(str(r["param"]), _index(r)) for _, r in cands.iterrows())
    return Ablation(COND_JOINT, edits, "joint", ";".join(map(str, cands["candidate"])), null_pool=COND_JOINT)


def random_joints(model, cands: pd.DataFrame, n: int, *, seed: int = 0,
                  exclude: Iterable[tuple[str, tuple[int, ...]]] = ()) -> list[Ablation]:
    """``random_joint:<k>``: `n` draws, each one random scalar of every candidate's parameter (never a candidate,
    never `exclude`, no scalar twice in a draw) zeroed together: the null of the same granularity for `joint`."""
    adapter = get_adapter(model)
    taken = {(p, tuple(int(i) for i in ix)) for p, ix in exclude}
    taken |= {(str(r["param"]), _index(r)) for _, r in cands.iterrows()}
    rng = np.random.default_rng([seed, len(cands), 5])
    out = []
    for k in range(n):
        picked: set = set()
        for _, r in cands.iterrows():
            param = str(r["param"])
            shape = tuple(adapter.param(param).shape)
            if math.prod(shape) <= len({i for p, i in taken | picked if p == param}):
                continue  # nothing left to draw in a tiny vector
            while True:
                idx = tuple(int(i) for i in np.unravel_index(int(rng.integers(math.prod(shape))), shape))
                if (param, idx) not in taken and (param, idx) not in picked:
                    break
            picked.add((param, idx))
        out.append(Ablation(f"random_joint:{k}", tuple(_zero(p, i) for p, i in sorted(picked)), "random_joint",
                            control_for=COND_JOINT, null_pool=COND_JOINT))
    return out


def _random_units(model, layer: int, n: int, exclude: Iterable[int], seed: int, what: str) -> list[Ablation]:
    adapter = get_adapter(model)
    down = _ffn_down(adapter, layer)
    if down is None:
        msg = f"block {layer} has no FFN down-projection site."
        raise DataError(msg)
    axis, build = (1, lambda i: _neuron_edits(adapter, layer, down, i)) if what == "neuron" else \
        (0, lambda i: _channel_edits(adapter, layer, i))
    pool = np.setdiff1d(np.arange(adapter.param(down).shape[axis]), np.fromiter(exclude, int))
    rng = np.random.default_rng([seed, layer, axis])
    picks = rng.choice(pool, size=min(n, len(pool)), replace=False)
    pool_name = f"{what}:L{layer}"
    return [Ablation(f"random_{what}:L{layer}:{k}", build(int(i)), f"random_{what}", control_for=pool_name,
                     null_pool=pool_name) for k, i in enumerate(picks)]


def random_neurons(model, layer: int, n: int, *, exclude: Iterable[int] = (), seed: int = 0) -> list[Ablation]:
    """`n` random FFN units of block `layer` (other than `exclude`), each ablated like `neuron_ablation`."""
    return _random_units(model, layer, n, exclude, seed, "neuron")


def random_channels(model, layer: int, n: int, *, exclude: Iterable[int] = (), seed: int = 0) -> list[Ablation]:
    """`n` random residual channels of block `layer` (other than `exclude`), each ablated like `channel_ablation`."""
    return _random_units(model, layer, n, exclude, seed, "channel")


# ------------------------------------------------------------------------------------------------------------
# requirement 3: magnitude-matched controls
# ------------------------------------------------------------------------------------------------------------
def magnitude_bin(w: torch.Tensor, index: Sequence[int], n_bins: int = 20) -> tuple[float, float]:
    """The |w| quantile bin ``[lo, hi]`` of `w` that holds the entry at `index` (`n_bins` equal-count bins)."""
    a = w.detach().abs().reshape(-1).double().cpu()
    edges = torch.quantile(a, torch.linspace(0, 1, n_bins + 1, dtype=torch.float64))
    v = float(w.detach().abs()[tuple(index)])
    b = int(np.clip(np.searchsorted(edges.numpy(), v, side="right") - 1, 0, n_bins - 1))
    return float(edges[b]), float(edges[b + 1])


def matched_scalars(model, cand, n: int, *, n_bins: int = 20, seed: int = 0,
                    exclude: Iterable[tuple[str, tuple[int, ...]]] = ()) -> list[Ablation]:
    """``matched:<cand>:<k>``: `n` random scalars of the candidate's parameter from its own |w| quantile bin
    (drawn without replacement; fewer when the bin is smaller), each zeroed; the candidate and `exclude` never."""
    adapter = get_adapter(model)
    param, idx, cid = str(cand["param"]), _index(cand), str(cand["candidate"])
    w = adapter.param(param).detach()
    lo, hi = magnitude_bin(w, idx, n_bins)
    a = w.abs().reshape(-1).cpu()
    taken = {int(np.ravel_multi_index(i, tuple(w.shape))) for p, i in exclude if p == param}
    taken.add(int(np.ravel_multi_index(idx, tuple(w.shape))))
    pool = np.setdiff1d(torch.nonzero((a >= lo) & (a <= hi)).reshape(-1).numpy(), np.array(sorted(taken)))
    rng = np.random.default_rng([seed, math.prod(idx) + len(cid), 3])
    picks = rng.choice(pool, size=min(n, len(pool)), replace=False) if len(pool) else []
    return [Ablation(f"matched:{cid}:{k}", (_zero(param, np.unravel_index(int(i), tuple(w.shape))),), "matched",
                     control_for=cid, null_pool=cid) for k, i in enumerate(picks)]


# ------------------------------------------------------------------------------------------------------------
# everything for a candidates table, and a runner for checks
# ------------------------------------------------------------------------------------------------------------
def build_ablations(model, cands: pd.DataFrame, batches: Sequence, *, joint: pd.DataFrame | None = None,
                    n_random: int = 40, n_bins: int = 20, seed: int = 0,
                    kinds: Sequence[str] = ("mean", "mean_activation", "neuron", "channel", "matched"),
                    n_matched: int | None = None, n_joint: int | None = None) -> list[Ablation]:
    """Every new condition for `cands` with its controls. A kind that does not apply to a candidate (a neuron of
    a LayerNorm dimension, a mean without a bias to absorb it) is skipped, and so is a neuron or channel ablation
    identical to an earlier one (a scalar's LN companions share its channel: it is named after the first).
    `joint`: the candidates that passed (None: no joint condition). Random neurons/channels (`n_random` each) are
    drawn once per block that has a candidate; `n_matched` and `n_joint` (default `n_random`) draws for the
    magnitude-matched scalars of each candidate and for the joint ablation."""
    adapter = get_adapter(model)
    build = {"mean": lambda r: mean_ablation(adapter, r, batches),
             "mean_activation": lambda r: mean_activation_ablation(adapter, r, batches),
             "neuron": lambda r: neuron_ablation(adapter, r), "channel": lambda r: channel_ablation(adapter, r)}
    out: list[Ablation] = []
    neuron_layers: dict[int, set[int]] = {}
    channel_layers: dict[int, set[int]] = {}
    taken = [(str(r["param"]), _index(r)) for _, r in cands.iterrows()]
    seen: set = set()
    for _, r in cands.iterrows():
        for kind in kinds:
            if kind in build:
                try:
                    a = build[kind](r)
                except DataError:
                    continue
                same = (kind, frozenset((e.param, e.index) for e in a.edits))
                if kind in ("neuron", "channel") and same in seen:
                    continue  # e.g. the LN companions of a scalar share its channel: one condition, the first name
                seen.add(same)
                out.append(a)
                idx, layer = _index(r), _cand_layer(adapter, r)
                if kind == "neuron":
                    neuron_layers.setdefault(layer, set()).add(idx[1])
                if kind == "channel" and layer >= 0:
                    channel_layers.setdefault(layer, set()).add(idx[0])
            elif kind == "matched" and len(_index(r)) == 2:
                out += matched_scalars(adapter, r, n_random if n_matched is None else n_matched, n_bins=n_bins,
                                       seed=seed, exclude=taken)
    for layer, used in neuron_layers.items():
        out += random_neurons(adapter, layer, n_random, exclude=used, seed=seed)
    for layer, used in channel_layers.items():
        out += random_channels(adapter, layer, n_random, exclude=used, seed=seed)
    if joint is not None and len(joint):
        out.append(joint_ablation(adapter, joint))
        out += random_joints(adapter, joint, n_random if n_joint is None else n_joint, seed=seed, exclude=taken)
    return out


@torch.no_grad()
def run_ablation(model, ablation: Ablation | None, batches: Sequence) -> list:
    """The model's outputs on each batch under `ablation` (None: unedited); full forwards, weights restored."""
    adapter = get_adapter(model)
    outs = []
    edits = list(ablation.edits) if ablation is not None else []
    with no_fastpath(adapter.model), edit(adapter, edits):
        for b in batches:
            patches = ablation.patches(_token_ids(adapter, b)) if ablation is not None else []
            if patches:
                with edit(adapter, patches=patches, verify=False):
                    outs.append(adapter.run(b))
            else:
                outs.append(adapter.run(b))
    return outs


__all__ = ["COND_JOINT", "Ablation", "ablations_frame", "build_ablations", "channel_ablation", "cond_channel",
           "cond_mean", "cond_mean_activation", "describe_edit",
           "cond_neuron", "joint_ablation", "magnitude_bin", "matched_scalars",
           "mean_ablation", "mean_activation_ablation", "neuron_ablation", "random_channels", "random_joints",
           "random_neurons", "run_ablation", "site_means"]
