"""The scGPT runner: binned expression through the model's vocab, `<cls>` embeddings, masked-expression metrics.

Pruning conditions rerun the model only from the first edited block: the input of every block is cached once,
without edits (`ScGPTEvaluator`). Reconstruction is the expression decoder's (GEP, ``mlm_output``) and, when the
model has one, the MVC decoder's (GEPC, ``mvc_output``) masked error and correlation per cell. The primitives
(`embed`, `masked_batches`, `reconstruction`, `reconstruction_from_outputs`) take fixed, seeded batches and masks,
so that every condition is measured on exactly the same inputs; they are torch + numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.batches import Batch, iter_batches
from ..data.token_batches import iter_token_batches
from ..data.tokenize import TokenizedCells
from ..instrument import ActivationPatch, ScalarEdit, edit, no_fastpath
from ..instrument.targets import constant_patches
from .base import Inputs, Runner, capture_channel, l2_normalise


@torch.no_grad()
def embed(model, tok: TokenizedCells, *, batch_size: int = 64, normalise: bool = True,
          progress: bool = False) -> np.ndarray:
    """`<cls>` embeddings (n_cells, d), L2-normalised as the official embedding task does, in cell order."""
    return _embed_batches(model, list(iter_batches(tok, batch_size)), tok.n_cells, normalise=normalise,
                          progress=progress)


@torch.no_grad()
def _embed_batches(model, batches: Sequence[Batch], n_cells: int, *, normalise: bool = True,
                   progress: bool = False) -> np.ndarray:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((n_cells, model.config.d_model), dtype=np.float32)
    for batch in tqdm(batches, desc="embed", disable=not progress, leave=False):
        b = batch.to(device)
        # a batch without padding needs no mask, and without one attention takes torch's fused SDPA kernel
        mask = b.padding_mask if bool(b.padding_mask.any()) else None
        hidden = model._encode(b.src, b.values, mask)
        out[batch.cells] = hidden[:, 0, :].float().cpu().numpy()
    model.train(was_training)
    return l2_normalise(out) if normalise else out


def masked_batches(tok: TokenizedCells, *, mask_ratio: float = 0.25, mask_value: float = -1.0, seed: int = 0,
                   batch_size: int = 64, cells: np.ndarray | None = None) -> list[Batch]:
    """Fixed, seeded masked batches: build once, share across every condition."""
    return list(iter_batches(tok, batch_size, mask_ratio=mask_ratio, mask_value=mask_value, seed=seed, cells=cells))


def _per_cell_mse_pearson(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                          ) -> tuple[np.ndarray, np.ndarray]:
    mse, r = _per_cell_mse_pearson_t(pred, target, mask)
    return mse.double().cpu().numpy(), r.double().cpu().numpy()


def _per_cell_mse_pearson_t(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell masked MSE and Pearson as tensors on the outputs' device (no host synchronisation)."""
    m = mask.float()
    n = m.sum(1).clamp(min=1)
    mse = (((pred - target) ** 2) * m).sum(1) / n
    pm = (pred * m).sum(1) / n
    tm = (target * m).sum(1) / n
    pc = (pred - pm[:, None]) * m
    tc = (target - tm[:, None]) * m
    denom = torch.sqrt((pc ** 2).sum(1) * (tc ** 2).sum(1))
    r = torch.where(denom > 0, (pc * tc).sum(1) / denom.clamp(min=1e-12), torch.full_like(denom, float("nan")))
    return mse, r


def reconstruction_tensors(outputs: dict, batch: Batch) -> dict[str, torch.Tensor]:
    """`reconstruction_from_outputs` as float32 tensors left on the outputs' device."""
    res = {}
    dev = outputs["mlm_output"].device
    target, mask = batch.target.to(dev, non_blocking=True), batch.mask.to(dev, non_blocking=True)
    res["gep_mse"], res["gep_pearson"] = _per_cell_mse_pearson_t(outputs["mlm_output"].float(), target, mask)
    if "mvc_output" in outputs:
        res["gepc_mse"], res["gepc_pearson"] = _per_cell_mse_pearson_t(outputs["mvc_output"].float(), target, mask)
    return res


def reconstruction_from_outputs(outputs: dict, batch: Batch) -> dict[str, np.ndarray]:
    """Per-cell masked MSE and Pearson of GEP (`mlm_output`) and, when present, GEPC (`mvc_output`)."""
    return {k: v.double().cpu().numpy() for k, v in reconstruction_tensors(outputs, batch).items()}


@torch.no_grad()
def reconstruction(model, batches: Iterable[Batch], n_cells: int | None = None, *, progress: bool = False
                   ) -> dict[str, np.ndarray]:
    """Per-cell masked reconstruction metrics over fixed masked batches (see `masked_batches`), one full forward.

    Returns a dict of arrays indexed by cell: ``gep_mse``, ``gep_pearson``, ``gepc_mse``, ``gepc_pearson`` and
    ``cls_emb`` (raw `<cls>` output). Cells not in any batch hold NaN.
    """
    batches = list(batches)
    if n_cells is None:
        n_cells = int(max(b.cells.max() for b in batches)) + 1
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    res: dict[str, np.ndarray] = {}
    for batch in tqdm(batches, desc="reconstruct", disable=not progress, leave=False):
        b = batch.to(device)
        out = model(b.src, b.values, b.padding_mask)
        per = reconstruction_from_outputs(out, b)
        per["cls_emb"] = out["cell_emb"].double().cpu().numpy()
        for k, v in per.items():
            if k not in res:
                res[k] = np.full((n_cells, *v.shape[1:]), np.nan)
            res[k][batch.cells] = v
    model.train(was_training)
    return res


class ScGPTEvaluator:
    """Runs conditions over fixed batches, reusing every block input computed once without edits."""

    def __init__(self, model, masked: Sequence[Batch], plain: Sequence[Batch], n_cells: int,
                 progress: bool = False):
        from ..adapters import get_adapter

        self.adapter = get_adapter(model)
        if not hasattr(self.adapter, "encode_cache"):
            msg = f"pruning with cached reruns is implemented for scGPT models, not {self.adapter.family}."
            raise TypeError(msg)
        self.model = self.adapter.model
        self.n_cells = n_cells
        self.progress = progress
        with no_fastpath(self.model):
            self.masked = [self.adapter.encode_cache(b) for b in masked]
            self.plain = [self.adapter.encode_cache(b) for b in plain]
        self.forwards = 0  # blocks recomputed, for the efficiency benchmark
        self._site_values: dict = {}

    def first_layer(self, edits: Sequence[ScalarEdit], restore=None, patch=None) -> int:
        layers = [self.adapter.first_layer_of(e.param) for e in edits]
        for at in (restore, patch):  # an activation patch: rerun from its site's block
            if at is not None:
                layers.append(self.adapter.sites[at[0]].layer)
        return min(layers) if layers else self.adapter.n_layers

    def _baseline_channel(self, cache: dict, site: str, channel: int) -> torch.Tensor:
        key = (id(cache), site, channel)
        if key not in self._site_values:
            def run():
                with no_fastpath(self.model):
                    self.adapter.run_from(cache, self.adapter.sites[site].layer, decoders=False)

            self._site_values[key] = capture_channel(self.model, self.adapter.sites[site].module, channel, run)
        return self._site_values[key]

    @torch.no_grad()
    def run(self, cond) -> dict[str, np.ndarray]:
        patch = getattr(cond, "patch", None)  # a constant (site, channel, value, token_id): mean_activation
        layer = self.first_layer(cond.edits, cond.restore, patch)
        out: dict[str, np.ndarray] = {}
        parts: dict[str, list[torch.Tensor]] = {}
        cells: dict[str, list[np.ndarray]] = {"masked": [], "plain": []}
        # a condition without the embedding (a control draw under draw_embeddings=False) skips the plain pass: its
        # result has the reconstruction arrays and no ``cls``
        passes = (("masked", self.masked), ("plain", self.plain)) if getattr(cond, "embedding", True) \
            else (("masked", self.masked),)
        if cond.restore is not None:  # baseline values are captured before any edit is applied
            for _, caches in passes:
                for cache in caches:
                    self._baseline_channel(cache, cond.restore[0], cond.restore[1])
        with no_fastpath(self.model), edit(self.model, cond.edits, verify=False):
            for name, caches in passes:
                for cache in caches:
                    patches = None
                    if cond.restore is not None:
                        site, channel, token_id = cond.restore
                        base = self._baseline_channel(cache, site, channel)
                        positions = cache["batch"].src.eq(token_id)
                        patches = [ActivationPatch(site, channel, base, positions)]
                    if patch is not None:
                        patches = [*(patches or []), *constant_patches(cond.name, patch, cache["batch"].src)]
                    decoders = name == "masked"  # the plain batches give the cell embedding only
                    if patches:
                        with edit(self.model, patches=patches, verify=False):
                            o = self.adapter.run_from(cache, layer, decoders=decoders)
                    else:
                        o = self.adapter.run_from(cache, layer, decoders=decoders)
                    self.forwards += self.adapter.n_layers - max(layer, 0)
                    cells[name].append(cache["batch"].cells)
                    if name == "masked":
                        for k, v in reconstruction_tensors(o, cache["batch"]).items():
                            parts.setdefault(k, []).append(v)
                    else:
                        parts.setdefault("cls", []).append(o["cell_emb"].float())
        # results stay on the device while the condition's batches are queued; one copy to the host per array
        # (on a GPU the per-batch .cpu() calls would each wait for the kernels before them)
        for k, vs in parts.items():
            v = torch.cat(vs).double().cpu().numpy()
            out[k] = np.full((self.n_cells, *v.shape[1:]), np.nan)
            out[k][np.concatenate(cells["plain" if k == "cls" else "masked"])] = v
        return out


class ScGPTRunner(Runner):
    """scGPT (our model and every official checkpoint loaded into it)."""

    mask_ratio = 0.25

    def full_seq_len(self) -> int:
        return int(self.model.args.get("max_seq_len", 1200))

    def analysis_seq_len(self, max_seq_len: int | str | None) -> int:
        from ..plan import analysis_seq_len

        return analysis_seq_len(max_seq_len, self.full_seq_len())

    def prepare(self, adata, *, gene_key=None, layer=None, max_seq_len=None, seed=0, batch_size=32, cells=None,
                mask_ratio=None, empty: str = "error", **options) -> Inputs:
        from ..data.tokenize import tokenize_anndata

        model = self.model
        cfg = model.config
        sub = adata[cells] if cells is not None else adata
        max_len = max_seq_len or self.full_seq_len()
        tok = tokenize_anndata(sub, model.vocab, gene_key=gene_key, layer=layer, n_bins=cfg.n_bins,
                               max_seq_len=max_len, pad_value=cfg.pad_value, seed=seed,
                               pad_token=model.args.get("pad_token", "<pad>"), empty=empty)
        max_tokens = options.get("max_tokens")
        if max_tokens:  # batches of at most max_tokens padded tokens: many short cells, few long ones
            plain = list(iter_token_batches(tok, max_tokens))
            masked = list(iter_token_batches(tok, max_tokens, mask_ratio=mask_ratio,
                                             mask_value=cfg.mask_value, seed=seed)) if mask_ratio else None
        else:
            plain = list(iter_batches(tok, batch_size))
            masked = list(iter_batches(tok, batch_size, mask_ratio=mask_ratio, mask_value=cfg.mask_value,
                                       seed=seed)) if mask_ratio else None
        return Inputs(tok, plain, masked, tok.n_cells, np.asarray(tok.genes.genes, dtype=str),
                      {"genes_matched": len(tok.genes.var_index), "genes_total": tok.genes.n_total})

    def empty_cells(self, adata, *, gene_key=None, layer=None) -> np.ndarray:
        from ..data.tokenize import get_counts, match_genes

        X = get_counts(adata, match_genes(adata, self.model.vocab, gene_key=gene_key), layer=layer)
        return np.diff(X.indptr) == 0

    def embed(self, inputs: Inputs, *, edits=None, progress: bool = False) -> np.ndarray:
        if edits is None:
            return _embed_batches(self.model, inputs.plain, inputs.n_cells, progress=progress)
        with edit(self.model, edits):
            return _embed_batches(self.model, inputs.plain, inputs.n_cells, progress=progress)

    def evaluator(self, masked, plain, n_cells, *, emb="mean", progress=False) -> ScGPTEvaluator:
        return ScGPTEvaluator(self.model, masked, plain, n_cells, progress=progress)

    def masked_errors(self, batch):
        out = self.adapter.run(batch)["mlm_output"].double().cpu()
        m = batch.mask
        err = (out - batch.target.double()) ** 2
        rows = torch.arange(m.shape[0])[:, None].expand_as(m)
        return rows[m], batch.src[m], err[m]

    def token_embeddings(self) -> torch.Tensor:
        m = self.model
        return m.encoder.enc_norm(m.encoder.embedding.weight)
