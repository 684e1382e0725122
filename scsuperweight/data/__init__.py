"""AnnData -> model input: validation, gene matching, binning, tokenisation, batches; data manifests."""

from .batches import Batch, bucket_batches, collate, iter_batches, mask_batch
from .tokenize import GeneMatch, TokenizedCells, bin_matrix, get_counts, match_genes, tokenize_anndata, tokenize_counts

__all__ = ["Batch", "GeneMatch", "TokenizedCells", "bin_matrix", "bucket_batches", "collate", "get_counts",
           "iter_batches", "mask_batch", "match_genes", "tokenize_anndata", "tokenize_counts"]
