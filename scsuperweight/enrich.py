"""Gene-set enrichment on local gene sets only: GSEA prerank (via gseapy) and over-representation (hypergeometric).

Every source of gene sets is resolved to plain dicts here before any test runs, so nothing reaches a server: a
string that is not a local file is refused rather than handed to gseapy, which would take it for an Enrichr
library name and download it. Both tests work in an explicit universe: prerank ranks only the genes it is given
(optionally cut to a background), and ORA requires its background. Results are tidy tables whose first columns are
the ``enrichment.tsv`` contract (``_keys.ENRICHMENT_COLUMNS``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

from scsuperweight._keys import ENRICHMENT_COLUMNS
from scsuperweight._log import logger
from scsuperweight.errors import DataError
from scsuperweight.genesets import BUNDLED_GMT

__all__ = ["BUNDLED", "gmt_descriptions", "load_gene_sets", "ora", "prerank", "read_gmt"]

BUNDLED = "bundled"
_PRERANK_METHODS = ("multilevel", "permutation")
_EXTRA_COLUMNS = ["method", "es", "n_genes", "set_size", "overlap"]
_SOURCES_HELP = "'bundled', a path to a .gmt file, a dict {term: genes}, or a list of these"
# what an Enrichr / MSigDB library name looks like: one word of letters, digits and _-+. (no path separator)
_LIBRARY_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+.\-]*")


# ---------------------------------------------------------------------------------------------------------------
# loading


def _iter_gmt(path: Path) -> Iterator[tuple[int, str, str, list[str]]]:
    """(line number, name, description, genes) for each set of a GMT file, refusing malformed lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"gene-set file {str(path)!r} does not exist; pass an existing .gmt path."
        raise DataError(msg) from None
    except IsADirectoryError:
        msg = f"gene-set path {str(path)!r} is a directory; pass the .gmt file inside it."
        raise DataError(msg) from None
    except UnicodeDecodeError as err:
        msg = f"gene-set file {str(path)!r} is not UTF-8 text ({err.reason}); a GMT file is plain tab-separated text."
        raise DataError(msg) from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3 or not fields[0].strip():
            msg = (
                f"{path}, line {lineno} is not a GMT line: expected NAME<TAB>DESCRIPTION<TAB>GENE..., got "
                f"{len(fields)} tab-separated field(s) starting {line[:60]!r}. Check that the file is tab-separated."
            )
            raise DataError(msg)
        genes = [_strip_weight(g.strip()) for g in fields[2:]]
        genes = list(dict.fromkeys(g for g in genes if g))
        if not genes:
            msg = f"{path}, line {lineno}: gene set {fields[0].strip()!r} lists no genes."
            raise DataError(msg)
        yield lineno, fields[0].strip(), fields[1].strip(), genes


def _strip_weight(gene: str) -> str:
    """'GENE,1.0' (Enrichr's weighted GMT) -> 'GENE'; a comma inside a name (Reactome has some) is kept."""
    head, sep, tail = gene.rpartition(",")
    if sep:
        try:
            float(tail)
        except ValueError:
            return gene
        return head.strip()
    return gene


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a GMT file into ``{term: genes}``.

    Genes keep their file order, with duplicates and Enrichr-style weights (``GENE,1.0``) removed. A term that
    appears twice gets the union of its genes (and a warning).

    Raises
    ------
    DataError
        The file is missing, not text, empty, or has a line that is not ``NAME<TAB>DESCRIPTION<TAB>GENE...``.
    """
    path = Path(path)
    sets: dict[str, list[str]] = {}
    for lineno, name, _, genes in _iter_gmt(path):
        if name in sets:
            logger.warning("%s, line %d: gene set %r appears again; merging its genes", path, lineno, name)
            genes = list(dict.fromkeys([*sets[name], *genes]))
        sets[name] = genes
    if not sets:
        msg = f"gene-set file {str(path)!r} holds no gene sets."
        raise DataError(msg)
    return sets


def gmt_descriptions(path: str | os.PathLike) -> dict[str, str]:
    """The description field of each set of a GMT file (for the bundled sets: the citation)."""
    return {name: desc for _, name, desc, _ in _iter_gmt(Path(path))}


def _clean_sets(sets: Mapping, where: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for term, genes in sets.items():
        if isinstance(genes, str) or not isinstance(genes, Iterable):
            msg = (
                f"gene set {term!r} in {where} is a {type(genes).__name__}, not a list of genes; "
                "pass {term: [gene, ...]}."
            )
            raise DataError(msg)
        clean = list(dict.fromkeys(s for s in (str(g).strip() for g in genes) if s))
        if clean:
            out[str(term)] = clean
    if not out:
        msg = f"{where} holds no non-empty gene sets; pass {{term: [gene, ...]}}."
        raise DataError(msg)
    return out


def _load_one(source) -> dict[str, dict[str, list[str]]]:
    if isinstance(source, Mapping):
        if source and all(isinstance(v, Mapping) for v in source.values()):
            # already {library: {term: genes}}, e.g. what load_gene_sets returned
            return {str(lib): _clean_sets(sets, f"library {lib!r}") for lib, sets in source.items()}
        return {"custom": _clean_sets(source, "the gene-set dict")}
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text == BUNDLED:
            return {BUNDLED_GMT.stem: read_gmt(BUNDLED_GMT)}
        path = Path(text).expanduser()
        if (
            not path.exists()
            and isinstance(source, str)
            and _LIBRARY_NAME.fullmatch(text)
            and not text.lower().endswith((".gmt", ".txt", ".tsv"))
        ):
            msg = (
                f"gene_sets={text!r} is not a local file and looks like an Enrichr/MSigDB library name: "
                "pass a local .gmt path; library names would call a server (this tool never downloads). "
                f"Download the library once (e.g. Enrichr's 'Download GMT'), then pass its path, or pass {BUNDLED!r}."
            )
            raise DataError(msg)
        return {path.stem: read_gmt(path)}
    msg = f"gene_sets entry {source!r} of type {type(source).__name__} is not supported; pass {_SOURCES_HELP}."
    raise DataError(msg)


def load_gene_sets(sources) -> dict[str, dict[str, list[str]]]:
    """Resolve gene-set sources to ``{library: {term: genes}}``, locally.

    Parameters
    ----------
    sources
        ``"bundled"`` (the AD gene sets shipped with the package), a path to a .gmt file, a dict
        ``{term: genes}`` (library ``"custom"``), a dict ``{library: {term: genes}}``, or a list of these.
        A .gmt file's library is named after its file name without the extension; a name used twice gets a
        numeric suffix.

    Returns
    -------
    ``{library: {term: [gene, ...]}}``, genes unique and in source order.

    Raises
    ------
    DataError
        A missing or malformed file, an empty source, or a string that looks like an Enrichr library name
        (those would need a server).

    Examples
    --------
    >>> from scsuperweight.enrich import load_gene_sets
    >>> libs = load_gene_sets(["bundled", {"my_set": ["APOE", "TREM2", "TYROBP"]}])
    >>> sorted(libs)
    ['ad_genesets', 'custom']
    """
    items = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    if not items:
        msg = f"gene_sets is empty; pass {_SOURCES_HELP}."
        raise DataError(msg)
    out: dict[str, dict[str, list[str]]] = {}
    for item in items:
        for lib, sets in _load_one(item).items():
            name, k = lib, 2
            while name in out:
                name, k = f"{lib}_{k}", k + 1
            out[name] = sets
    return out


def _restrict(
    sets: Mapping[str, list[str]], universe: Mapping[str, object] | set[str], min_size: int, max_size: int
) -> dict[str, list[str]]:
    """Each set cut to the universe, kept when min_size <= size <= max_size (sizes counted after the cut)."""
    out = {}
    for term, genes in sets.items():
        kept = [g for g in genes if g in universe]
        if min_size <= len(kept) <= max_size:
            out[term] = kept
    return out


def _check_sizes(min_size: int, max_size: int | None) -> None:
    if int(min_size) < 1 or (max_size is not None and int(max_size) < int(min_size)):
        msg = f"min_size={min_size!r}, max_size={max_size!r}: need 1 <= min_size <= max_size."
        raise DataError(msg)


def _finish(frame: pd.DataFrame, score: str) -> pd.DataFrame:
    """Contract columns first, best first: by FDR, then p-value, then the larger |score|."""
    frame = frame.assign(_key=-frame[score].abs())
    frame = frame.sort_values(["fdr", "p_value", "_key"], kind="stable", na_position="last").drop(columns="_key")
    return frame[ENRICHMENT_COLUMNS + _EXTRA_COLUMNS].reset_index(drop=True)


def _empty_result() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in ENRICHMENT_COLUMNS + _EXTRA_COLUMNS})


# ---------------------------------------------------------------------------------------------------------------
# prerank


def _ranking(scores: pd.Series, background) -> pd.Series:
    if not isinstance(scores, pd.Series):
        msg = f"scores must be a pandas Series (gene -> score), got {type(scores).__name__}."
        raise DataError(msg)
    ranked = pd.Series(pd.to_numeric(scores, errors="coerce").to_numpy(float), index=scores.index.astype(str))
    if ranked.index.has_duplicates:
        dup = ranked.index[ranked.index.duplicated()].unique()[:5].tolist()
        msg = f"scores has duplicated gene names (e.g. {dup}); aggregate them first (scores.groupby(level=0).mean())."
        raise DataError(msg)
    bad = ~np.isfinite(ranked.to_numpy())
    if bad.any():
        logger.warning("prerank: dropping %d genes whose score is NaN or infinite", int(bad.sum()))
        ranked = ranked[~bad]
    if background is not None:
        if isinstance(background, str):
            msg = f"background={background!r} is a string; pass a list of genes."
            raise DataError(msg)
        universe = set(map(str, background))
        ranked = ranked[ranked.index.isin(universe)]
    if len(ranked) < 2:
        msg = f"prerank needs at least 2 scored genes (in the background); got {len(ranked)}."
        raise DataError(msg)
    # a fixed order for ties, so that the result does not depend on the input order
    order = np.lexsort((ranked.index.to_numpy(), -ranked.to_numpy()))
    return ranked.iloc[order]


def prerank(
    scores: pd.Series,
    gene_sets,
    *,
    background: Iterable[str] | None = None,
    permutations: int = 1000,
    min_size: int = 5,
    max_size: int = 500,
    seed: int = 0,
    method: str = "multilevel",
    candidate: str = "",
) -> pd.DataFrame:
    """GSEA on a ranked gene list (``gseapy.prerank``), against local gene sets only.

    Each library is tested on its own (its FDR is within the library), with sets cut to the ranked genes and
    filtered by size before gseapy runs, which keeps large libraries fast.

    Parameters
    ----------
    scores
        Gene -> score; higher means more towards the top of the ranking. NaN scores are dropped.
    gene_sets
        Anything :func:`load_gene_sets` takes.
    background
        If given, only these genes are ranked (genes scored but outside it are dropped).
    permutations
        Permutations for the null. With ``method="multilevel"`` they only normalise the ES into the NES; with
        ``"permutation"`` they are the whole null, and the smallest non-zero p-value is about
        ``1 / permutations`` (gseapy reports 0 when no permutation reached the observed score).
    min_size, max_size
        Allowed set sizes, counted among the ranked genes.
    seed
        Permutation seed; the same seed gives the same table.
    method
        ``"multilevel"`` (default): fgsea's adaptive multilevel p-values (Korotkevich et al. 2021, as ported in
        gseapy >= 1.3), accurate far below ``1 / permutations``, FDR by Benjamini-Hochberg; GO BP against 1,000
        genes takes seconds. ``"permutation"``: classic GSEA gene-set permutation with GSEA's FDR q-value;
        about 50x slower on large libraries.
    candidate
        Written into the ``candidate`` column (the super-weight candidate the scores belong to).

    Returns
    -------
    One row per tested set, best first: ``candidate``, ``gene_set`` (the library), ``term``, ``nes``,
    ``odds_ratio`` (NaN here), ``p_value``, ``fdr`` (see ``method``), ``genes`` (leading edge,
    ``;``-joined, in rank order), then ``method`` (``"prerank"``), ``es``, ``n_genes`` (set size among the ranked
    genes), ``set_size`` (size in the library), ``overlap`` (leading-edge size).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from scsuperweight.enrich import prerank
    >>> genes = [f"GENE{i}" for i in range(200)]
    >>> scores = pd.Series(np.linspace(1, -1, 200), index=genes)
    >>> sets = {"top": genes[:15], "random": genes[::13]}
    >>> prerank(scores, sets, permutations=200).loc[0, "term"]
    'top'
    """
    _check_sizes(min_size, max_size)
    if method not in _PRERANK_METHODS:
        msg = f"method={method!r} is not one of {_PRERANK_METHODS}."
        raise DataError(msg)
    if int(permutations) < 1:
        msg = f"permutations={permutations!r}: the NES and p-values need permutations >= 1 (1000 is usual)."
        raise DataError(msg)
    ranked = _ranking(scores, background)
    libraries = load_gene_sets(gene_sets)

    # gseapy sees tokens, not symbols: its case heuristics (upper-casing a ranking judged mostly upper-case) cannot
    # then merge, drop or rename genes behind our back
    token = {g: f"G{i}" for i, g in enumerate(ranked.index)}
    symbol = dict(zip(token.values(), token.keys()))
    rnk = pd.Series(ranked.to_numpy(), index=list(token.values()))

    frames = []
    for lib, sets in libraries.items():
        # gseapy also wants every set smaller than the ranking
        kept = _restrict(sets, token, int(min_size), min(int(max_size), len(ranked) - 1))
        if not kept:
            logger.info(
                "prerank: no set of %r has %d-%d genes among the %d ranked", lib, min_size, max_size, len(ranked)
            )
            continue
        logger.info("prerank: %d of %d sets of %r, %d genes ranked", len(kept), len(sets), lib, len(ranked))
        res = _run_gseapy(rnk, {t: [token[g] for g in gs] for t, gs in kept.items()}, permutations, seed, method)
        lead = [
            [symbol[t] for t in str(s).split(";") if t] if isinstance(s, str) else [] for s in res["Lead_genes"]
        ]
        terms = res["Term"].astype(str)
        frames.append(
            pd.DataFrame(
                {
                    "candidate": candidate,
                    "gene_set": lib,
                    "term": terms.to_numpy(),
                    "nes": pd.to_numeric(res["NES"], errors="coerce").to_numpy(float),
                    "odds_ratio": np.nan,
                    "p_value": pd.to_numeric(res["NOM p-val"], errors="coerce").to_numpy(float),
                    "fdr": pd.to_numeric(res["FDR q-val"], errors="coerce").to_numpy(float),
                    "genes": [";".join(g) for g in lead],
                    "method": "prerank",
                    "es": pd.to_numeric(res["ES"], errors="coerce").to_numpy(float),
                    "n_genes": [len(kept[t]) for t in terms],
                    "set_size": [len(sets[t]) for t in terms],
                    "overlap": [len(g) for g in lead],
                }
            )
        )
    if not frames:
        msg = (
            f"prerank: no gene set has {min_size}-{max_size} genes among the {len(ranked)} ranked genes. "
            "Check that genes and sets use the same identifiers (HGNC symbols, same species), or lower min_size."
        )
        raise DataError(msg)
    return _finish(pd.concat(frames, ignore_index=True), "nes")


def _run_gseapy(
    rnk: pd.Series, sets: dict[str, list[str]], permutations: int, seed: int, method: str
) -> pd.DataFrame:
    import gseapy  # slow to import (seconds); only needed here

    if method != "permutation" and "method" not in inspect.signature(gseapy.prerank).parameters:
        # older gseapy would swallow the keyword in **kwargs and silently run the slow permutation test
        msg = (
            f"method={method!r} needs gseapy >= 1.3 (found {gseapy.__version__}); "
            "upgrade gseapy or pass method='permutation'."
        )
        raise RuntimeError(msg)
    extra = {} if method == "permutation" else {"method": method}

    # gseapy attaches a stderr handler to a fresh logger on every call; keep its chatter out of the user's
    # output and pass it on at debug level
    chatter = io.StringIO()
    with contextlib.redirect_stderr(chatter):
        pre = gseapy.prerank(
            rnk=rnk,
            gene_sets=sets,  # always a dict: a string here could make gseapy download a library
            outdir=None,
            min_size=1,
            max_size=len(rnk),
            permutation_num=int(permutations),
            threads=1,
            seed=int(seed),
            no_plot=True,
            verbose=False,
            **extra,
        )
    if chatter.getvalue().strip():
        logger.debug("gseapy: %s", chatter.getvalue().strip())
    return pre.res2d


# ---------------------------------------------------------------------------------------------------------------
# over-representation


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values."""
    n = len(p)
    if n == 0:
        return p
    order = np.argsort(p)
    scaled = p[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def ora(
    genes: Iterable[str],
    gene_sets,
    *,
    background: Iterable[str],
    min_size: int = 3,
    candidate: str = "",
) -> pd.DataFrame:
    """Over-representation of a gene list in local gene sets (one-sided hypergeometric test, BH FDR).

    Everything is counted inside ``background``: query genes outside it are dropped (with a warning), sets are cut
    to it, and sets with fewer than ``min_size`` background genes are not tested. FDR is Benjamini-Hochberg over
    all tested sets of a library; rows are returned for the sets that share at least one gene with the query.

    Parameters
    ----------
    genes
        The query genes (order is kept in the ``genes`` column).
    gene_sets
        Anything :func:`load_gene_sets` takes.
    background
        Every gene that could have been in the query (e.g. all genes scored). Required: the default universe of
        "all genes in the gene sets" inflates significance.
    min_size
        Smallest set size, counted in the background.
    candidate
        Written into the ``candidate`` column.

    Returns
    -------
    ``candidate``, ``gene_set`` (the library), ``term``, ``nes`` (NaN here), ``odds_ratio`` (sample odds ratio with
    the Haldane-Anscombe +0.5 correction, so always finite), ``p_value``, ``fdr``, ``genes`` (overlap,
    ``;``-joined), then ``method`` (``"ora"``), ``es`` (NaN), ``n_genes`` (set size in the background),
    ``set_size`` (size in the library), ``overlap``. Best first.

    Examples
    --------
    >>> from scsuperweight.enrich import ora
    >>> universe = [f"GENE{i}" for i in range(500)]
    >>> sets = {"hit": universe[:20], "other": universe[100:140]}
    >>> ora(universe[:10], sets, background=universe).loc[0, "term"]
    'hit'
    """
    _check_sizes(min_size, None)
    if background is None or isinstance(background, str):
        msg = f"background={background!r}: pass the list of genes that could have been in the query."
        raise DataError(msg)
    universe = dict.fromkeys(str(g) for g in background)
    query = list(dict.fromkeys(str(g) for g in genes))
    inside = [g for g in query if g in universe]
    if len(inside) < len(query):
        logger.warning(
            "ora: %d of %d query genes are not in the background; ignored", len(query) - len(inside), len(query)
        )
    if not inside:
        msg = f"ora: none of the {len(query)} query genes is in the background ({len(universe)} genes)."
        raise DataError(msg)
    n_universe, n_query = len(universe), len(inside)

    frames = []
    for lib, sets in load_gene_sets(gene_sets).items():
        kept = _restrict(sets, universe, int(min_size), n_universe)
        if not kept:
            logger.info("ora: no set of %r has >= %d genes in the background", lib, min_size)
            continue
        terms = list(kept)
        size = np.array([len(kept[t]) for t in terms])
        members = [set(kept[t]) for t in terms]
        shared = [[g for g in inside if g in m] for m in members]
        x = np.array([len(s) for s in shared])
        p = hypergeom.sf(x - 1, n_universe, size, n_query)
        odds = ((x + 0.5) * (n_universe - size - n_query + x + 0.5)) / ((size - x + 0.5) * (n_query - x + 0.5))
        frame = pd.DataFrame(
            {
                "candidate": candidate,
                "gene_set": lib,
                "term": terms,
                "nes": np.nan,
                "odds_ratio": odds,
                "p_value": np.clip(p, 0.0, 1.0),
                "fdr": _bh(np.clip(p, 0.0, 1.0)),
                "genes": [";".join(s) for s in shared],
                "method": "ora",
                "es": np.nan,
                "n_genes": size,
                "set_size": [len(sets[t]) for t in terms],
                "overlap": x,
            }
        )
        frames.append(frame[frame["overlap"] > 0])
    if not frames:
        msg = (
            f"ora: no gene set has >= {min_size} genes in the background ({n_universe} genes). Check that genes and "
            "sets use the same identifiers (HGNC symbols, same species)."
        )
        raise DataError(msg)
    frames = [f for f in frames if len(f)]
    if not frames:
        return _empty_result()
    return _finish(pd.concat(frames, ignore_index=True), "odds_ratio")
