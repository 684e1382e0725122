"""Gene sets shipped with the package, written by the project (each set's GMT description carries its citation).

``BUNDLED_GMT`` is what ``enrich.load_gene_sets("bundled")`` reads. KEGG and DisGeNET are never shipped (their
licences forbid it); users pass their own copies as .gmt paths.
"""

from pathlib import Path

BUNDLED_GMT = Path(__file__).with_name("ad_genesets.gmt")

__all__ = ["BUNDLED_GMT"]
