"""A stand-in for the published scGPT checkpoints, and a documented way to plant a known super weight.

The official scGPT models (whole-human, brain, ...) are on Google Drive only, so tests and benchmarks here use a
directory in the same format with the same shapes and seeded random weights: ``build_standin(dir)``. Its numbers
say what a real checkpoint *costs*; its weights say nothing about what a real checkpoint *does*, so a stand-in is
never a demo result.

``plant_superweight`` makes one FFN hidden unit fire only on ``<cls>`` and gives its down-projection scalar a
large value, so the block writes a spike of a chosen size into one channel: a super weight with its super
activation. On a copy of a user's own checkpoint it is a positive control: the scan must rank the planted scalar
first and prune must find it causal before a negative result on the untouched model means anything.

This module sits above ``models``, ``data`` and ``instrument`` (planting needs a trace of the block's inputs), not
inside ``models``, which imports nothing of ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ._log import logger
from .adapters import get_adapter
from .data.synthetic import _gene_table
from .errors import DataError
from .genesets import BUNDLED_GMT
from .instrument import Trace
from .models import ScGPTConfig, ScGPTModel, save_scgpt

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
FILLER_PREFIX = "SSW_FILLER_"
# The published architecture (scGPT whole-human and the organ models share it; the vocab size is whole-human's).
# "tiny" keeps the same structure at a size a unit test can run in well under a second.
STANDIN_SIZES = {
    "human": {"ntoken": 60_697, "d_model": 512, "nhead": 8, "d_hid": 512, "nlayers": 12},
    "tiny": {"ntoken": 1_200, "d_model": 64, "nhead": 4, "d_hid": 128, "nlayers": 4},
}
# args.json fields of the published checkpoints that the loader does not model, kept for the round trip
_PUBLISHED_ARGS = {"max_seq_len": 1200, "n_bins": 51, "input_emb_style": "continuous", "input_style": "binned",
                   "MVC": True, "GEPC": True, "explicit_zero_prob": False, "pad_token": "<pad>",
                   "pad_value": -2, "mask_value": -1, "do_mvc": True, "fast_transformer": True}


def _check_size(size: str) -> dict:
    if size not in STANDIN_SIZES:
        msg = f"`size` must be one of {sorted(STANDIN_SIZES)}; got {size!r}. 'human' is the published whole-human " \
              "architecture (51.3 M parameters), 'tiny' a 4-layer d=64 model for tests."
        raise DataError(msg)
    return STANDIN_SIZES[size]


def bundled_genes() -> list[str]:
    """Real human gene symbols the package ships: the synthetic generator's genes, then the bundled gene sets'."""
    genes = dict.fromkeys(_gene_table().index.astype(str))
    for line in BUNDLED_GMT.read_text().splitlines():
        parts = line.split("\t")
        genes.update(dict.fromkeys(g for g in parts[2:] if g))
    return list(genes)


def standin_vocab(ntoken: int, genes: Sequence[str] | None = None) -> dict[str, int]:
    """`ntoken` entries: real genes first (`genes`, else `bundled_genes()`), then fillers, then the specials
    ``<pad>``, ``<cls>``, ``<eoc>`` last as in the demo checkpoint. Real cells match the real genes only."""
    real = list(dict.fromkeys(str(g) for g in (bundled_genes() if genes is None else genes)))
    real = [g for g in real if g not in SPECIAL_TOKENS]
    n_genes = ntoken - len(SPECIAL_TOKENS)
    if len(real) > n_genes:
        logger.warning("stand-in vocab: %d genes given, %d fit; the first %d are kept", len(real), n_genes, n_genes)
        real = real[:n_genes]
    names = real + [f"{FILLER_PREFIX}{i:05d}" for i in range(n_genes - len(real))] + list(SPECIAL_TOKENS)
    return {name: i for i, name in enumerate(names)}


def standin_model(size: str = "human", *, seed: int = 0, genes: Sequence[str] | None = None) -> ScGPTModel:
    """The stand-in as a model in memory (eval mode, dropout 0): torch's default initialisation under `seed`,
    without touching the global random state."""
    sizes = dict(_check_size(size))
    vocab = standin_vocab(sizes.pop("ntoken"), genes)
    cfg = ScGPTConfig(ntoken=len(vocab), dropout=0.0, pad_token_id=vocab["<pad>"], **sizes)
    args = {**_PUBLISHED_ARGS, "nheads": cfg.nhead, "standin": size, "standin_seed": int(seed)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ScGPTModel(cfg, vocab=vocab, args=args)
    return model.eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class PlantedWeight:
    """Where a planted super weight sits and what it was calibrated to."""

    layer: int
    row: int  # the channel the spike is written into (linear2 output)
    col: int  # the hidden unit that fires on <cls> (linear2 input)
    param: str
    candidate: str  # the id the scan and prune use for this scalar
    value: float  # the planted weight
    activation: float  # the hidden unit's mean activation on <cls> in the calibration batches
    margin: float  # gap between the lowest <cls> and highest gene projection (> 0: only <cls> fires)

    def to_dict(self) -> dict:
        return asdict(self)


def _calibration_batches(model, n: int = 4, n_tokens: int = 128) -> list:
    adapter = get_adapter(model)
    return [adapter.synthetic_batch(n_tokens=n_tokens, seed=s) for s in range(n)]


@torch.no_grad()
def plant_superweight(model: ScGPTModel, *, layer: int, row: int, col: int, value: float | None = None,
                      batches: Sequence | None = None, magnitude: float = 200.0) -> PlantedWeight:
    """Plant a super weight at ``transformer_encoder.layers[layer].linear2.weight[row, col]`` (in place).

    Hidden unit `col` of block `layer` is rewired (its `linear1` row and bias) to separate `<cls>` inputs from gene
    inputs along the difference of their means, scaled so that it outputs 0 on every gene position of `batches`
    and about 0.5 on `<cls>`; the down-projection scalar then writes about `magnitude` into channel `row` on
    `<cls>` only (or `value` times the unit's activation when `value` is given). Batches default to a few synthetic
    cells from the model's vocab; pass real cells' batches when the plant must hold on real data.

    Run it on a copy of a checkpoint (it overwrites two rows of weights): it is a positive control, never a result.

    Raises `DataError` when `<cls>` and gene inputs are not separable along their mean difference there.
    """
    blocks = model.transformer_encoder.layers
    if not 0 <= layer < len(blocks):
        msg = f"`layer` must be in [0, {len(blocks)}); got {layer}."
        raise DataError(msg)
    lin1, lin2 = blocks[layer].linear1, blocks[layer].linear2
    if not (0 <= row < lin2.out_features and 0 <= col < lin2.in_features):
        msg = f"(row, col) = ({row}, {col}) is outside linear2.weight of shape {tuple(lin2.weight.shape)}."
        raise DataError(msg)
    batches = list(batches) if batches is not None else _calibration_batches(model)
    site = f"L{layer}.ffn_in"
    with Trace(model, [site], keep=[site], reductions=False) as tr:
        for b in batches:
            tr.run(b)
    xs, gene_rows = [], []
    for x, b in zip(tr.full[site], batches):
        xs.append(x[:, 0, :])  # <cls>
        gene_rows.append(x[:, 1:, :][~b.padding_mask[:, 1:]])
    cls_x, gene_x = torch.cat(xs).double(), torch.cat(gene_rows).double()
    w = cls_x.mean(0) - gene_x.mean(0)
    w = w / w.norm()
    lo, hi = float((gene_x @ w).max()), float((cls_x @ w).min())
    if hi <= lo:
        msg = (f"block {layer}: <cls> inputs are not separable from gene inputs along their mean difference "
               f"(highest gene {lo:.3g} >= lowest <cls> {hi:.3g}); try another layer or fewer calibration cells.")
        raise DataError(msg)
    bias = -(lo + hi) / 2
    scale = 1.0 / (hi - lo)
    lin1.weight[col] = (w * scale).float()
    lin1.bias[col] = float(bias * scale)
    act = float(((cls_x @ w + bias) * scale).mean())  # activation of the unit on <cls>, ~0.5
    lin2.weight[row, col] = magnitude / act if value is None else value
    pname = f"transformer_encoder.layers.{layer}.linear2.weight"
    return PlantedWeight(layer, row, col, pname, get_adapter(model).candidate_id(pname, (row, col)),
                         float(lin2.weight[row, col]), act, hi - lo)


def build_standin(out_dir: str | Path, *, size: str = "human", seed: int = 0, genes: Sequence[str] | None = None,
                  plant: dict | None = None) -> Path:
    """Write a stand-in official-format scGPT directory (args.json, vocab.json, best_model.pt) and return its path.

    Parameters
    ----------
    out_dir
        Folder to write (created; existing files of the same names are replaced).
    size
        ``"human"``: the published whole-human architecture (d=512, 12 layers, 8 heads, d_hid 512, 60,697 tokens,
        51.3 M parameters). ``"tiny"``: 4 layers, d=64, 1,200 tokens, for fast tests.
    seed
        Seeds the random weights.
    genes
        Real gene symbols to put first in the vocab (e.g. your data's ``var_names``); default `bundled_genes()`.
    plant
        Keyword arguments of `plant_superweight` (``layer``, ``row``, ``col``, optionally ``magnitude``/``value``);
        the planted coordinates are recorded in args.json under ``standin_plant``.

    Examples
    --------
    >>> path = build_standin("standin_human", genes=adata.var_names, plant={"layer": 2, "row": 9, "col": 21})
    >>> model = scsuperweight.load_model(path)
    """
    model = standin_model(size, seed=seed, genes=genes)
    if plant is not None:
        planted = plant_superweight(model, **plant)
        model.args["standin_plant"] = planted.to_dict()
        logger.info("stand-in: planted %s = %.4g", planted.candidate, planted.value)
    return save_scgpt(model, out_dir)
