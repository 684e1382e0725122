"""scGPT's TransformerModel, rewritten so that official checkpoints load into it key for key.

The attribute tree and parameter names are those of `scgpt.model.TransformerModel` (scgpt 0.2.4) for the
configuration every published checkpoint uses: continuous value encoding, post-norm torch encoder blocks,
expression decoder, inner-product MVC decoder, optional classifier head. Nothing here knows about AnnData.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ._torch import no_fastpath


@dataclass
class ScGPTConfig:
    ntoken: int  # vocabulary size (rows of the gene embedding)
    d_model: int = 512  # embsize in args.json
    nhead: int = 8  # cannot be derived from weights: args.json `nheads`
    d_hid: int = 512  # FFN hidden width
    nlayers: int = 12
    dropout: float = 0.2  # 0 for CPU training: attention dropout forces torch's slow path
    pad_token_id: int = 0  # vocab["<pad>"], the embedding's padding_idx
    pad_value: float = -2.0  # value paired with <cls> and <pad>
    mask_value: float = -1.0  # value of masked positions in the reconstruction objective
    n_bins: int = 51
    max_value: float = 512.0  # ContinuousValueEncoder clamps inputs at this
    mvc: bool = True  # build the inner-product MVC (GEPC) decoder
    mvc_decoder_style: str = "inner product"  # or "inner product, detach"
    explicit_zero_prob: bool = False  # zero-logit heads on both decoders
    n_cls: int = 0  # classifier head classes; 0 = no head (published checkpoints have none)
    n_layers_cls: int = 3
    extra: dict = field(default_factory=dict)  # unmodelled args.json fields, kept for the round trip

    def to_dict(self) -> dict:
        return asdict(self)


class GeneEncoder(nn.Module):
    def __init__(self, ntoken: int, d_model: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(ntoken, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:  # (B, L) -> (B, L, d)
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    """Bin value -> d-dim vector: clamp, Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout."""

    def __init__(self, d_model: int, dropout: float = 0.1, max_value: float = 512.0):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        self.linear1 = nn.Linear(1, d_model)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.max_value = max_value

    def forward(self, x: Tensor) -> Tensor:  # (B, L) -> (B, L, d)
        x = torch.clamp(x.unsqueeze(-1), max=self.max_value)
        x = self.linear2(self.activation(self.linear1(x)))
        return self.dropout(self.norm(x))


class ExprDecoder(nn.Module):
    """Per-position expression prediction (GEP) from the transformer output."""

    def __init__(self, d_model: int, explicit_zero_prob: bool = False):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, d_model), nn.LeakyReLU(),
            nn.Linear(d_model, 1),
        )
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.zero_logit = nn.Sequential(
                nn.Linear(d_model, d_model), nn.LeakyReLU(),
                nn.Linear(d_model, d_model), nn.LeakyReLU(),
                nn.Linear(d_model, 1),
            )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = {"pred": self.fc(x).squeeze(-1)}  # (B, L)
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return out


class ClsDecoder(nn.Module):
    """Optional fine-tuning classifier head on the cell embedding."""

    def __init__(self, d_model: int, n_cls: int, nlayers: int = 3):
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.extend([nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)])
        self.out_layer = nn.Linear(d_model, n_cls)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class MVCDecoder(nn.Module):
    """Inner-product decoder (GEPC): predicts each gene's value from the cell embedding alone."""

    def __init__(self, d_model: int, arch_style: str = "inner product", explicit_zero_prob: bool = False):
        super().__init__()
        if arch_style not in ("inner product", "inner product, detach"):
            msg = (f"MVC decoder style {arch_style!r} is not supported; published scGPT checkpoints use "
                   "'inner product'.")
            raise ValueError(msg)
        self.arch_style = arch_style
        self.gene2query = nn.Linear(d_model, d_model)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d_model, d_model, bias=False)
        self.explicit_zero_prob = explicit_zero_prob
        if explicit_zero_prob:
            self.W_zero_logit = nn.Linear(d_model, d_model)

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> dict[str, Tensor]:
        if self.arch_style.endswith("detach"):
            gene_embs = gene_embs.detach()
        query = self.query_activation(self.gene2query(gene_embs))  # (B, L, d)
        out = {"pred": torch.bmm(self.W(query), cell_emb.unsqueeze(2)).squeeze(2)}  # (B, L)
        if self.explicit_zero_prob:
            zero_logit = torch.bmm(self.W_zero_logit(query), cell_emb.unsqueeze(2)).squeeze(2)
            out["zero_probs"] = torch.sigmoid(zero_logit)
        return out


class ScGPTModel(nn.Module):
    """scGPT TransformerModel (continuous value style, post-norm blocks, <cls> cell embedding).

    `forward(src, values, src_key_padding_mask)` returns a dict with `mlm_output` (B, L), `cell_emb` (B, d)
    and `mvc_output` (B, L) when the MVC decoder exists.
    """

    def __init__(self, config: ScGPTConfig, vocab: dict[str, int] | None = None, args: dict | None = None):
        super().__init__()
        c = config
        if c.d_model % c.nhead:
            msg = f"d_model={c.d_model} is not divisible by nhead={c.nhead}; check `nheads` in args.json."
            raise ValueError(msg)
        self.config = c
        self.vocab = dict(vocab) if vocab is not None else {}
        self.args = dict(args) if args is not None else {}
        self.encoder = GeneEncoder(c.ntoken, c.d_model, padding_idx=c.pad_token_id)
        self.value_encoder = ContinuousValueEncoder(c.d_model, c.dropout, max_value=c.max_value)
        layer = nn.TransformerEncoderLayer(c.d_model, c.nhead, c.d_hid, c.dropout, batch_first=True)
        # nested tensors would bypass every submodule hook and change padding semantics: never use them
        self.transformer_encoder = nn.TransformerEncoder(layer, c.nlayers, enable_nested_tensor=False)
        self.decoder = ExprDecoder(c.d_model, explicit_zero_prob=c.explicit_zero_prob)
        if c.n_cls > 0:
            self.cls_decoder = ClsDecoder(c.d_model, c.n_cls, nlayers=c.n_layers_cls)
        if c.mvc:
            self.mvc_decoder = MVCDecoder(c.d_model, c.mvc_decoder_style, c.explicit_zero_prob)

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    @property
    def cls_token_id(self) -> int:
        return self.vocab["<cls>"]

    def embed_inputs(self, src: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Gene embedding (B, L, d) and the summed encoder input (B, L, d)."""
        gene_embs = self.encoder(src)
        return gene_embs, gene_embs + self.value_encoder(values)

    def run_encoder(self, total: Tensor, src_key_padding_mask: Tensor | None) -> Tensor:
        """The transformer blocks, always on torch's regular path, which calls scaled_dot_product_attention.

        The fused fast path (eval + no_grad) does not use it: on 2 CPU cores, 32 cells x 1200 tokens (d=64, 4 layers)
        took 2.4x longer without a padding mask and 4x longer with one. Outputs agree to float rounding.
        """
        with no_fastpath():
            return self.transformer_encoder(total, src_key_padding_mask=src_key_padding_mask)  # (B, L, d)

    def _encode(self, src: Tensor, values: Tensor, src_key_padding_mask: Tensor | None) -> Tensor:
        _, total = self.embed_inputs(src, values)
        return self.run_encoder(total, src_key_padding_mask)  # (B, L, d)

    def heads(self, hidden: Tensor, gene_embs: Tensor, *, MVC: bool = True, CLS: bool = False) -> dict:
        """Decoders on the final hidden states; split out so a rerun from a middle layer can reuse them."""
        out: dict[str, Tensor] = {}
        dec = self.decoder(hidden)
        out["mlm_output"] = dec["pred"]
        if "zero_probs" in dec:
            out["mlm_zero_probs"] = dec["zero_probs"]
        cell_emb = hidden[:, 0, :]  # the <cls> position
        out["cell_emb"] = cell_emb
        if CLS and hasattr(self, "cls_decoder"):
            out["cls_output"] = self.cls_decoder(cell_emb)
        if MVC and hasattr(self, "mvc_decoder"):
            mvc = self.mvc_decoder(cell_emb, gene_embs)
            out["mvc_output"] = mvc["pred"]
            if "zero_probs" in mvc:
                out["mvc_zero_probs"] = mvc["zero_probs"]
        return out

    def forward(self, src: Tensor, values: Tensor, src_key_padding_mask: Tensor | None = None, *,
                MVC: bool = True, CLS: bool = False) -> dict[str, Tensor]:
        gene_embs, total = self.embed_inputs(src, values)
        hidden = self.run_encoder(total, src_key_padding_mask)
        return self.heads(hidden, gene_embs, MVC=MVC, CLS=CLS)
