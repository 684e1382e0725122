"""Cells from disk without loading them: one .h5ad, a folder or glob of per-donor .h5ad files, or an AnnData.

An atlas is usually distributed as per-donor files whose gene lists differ a little. `open_source` reads every
file's obs (small) at once and leaves the counts on disk: rows are read on demand through anndata's own backed
readers (`anndata.io.sparse_dataset` for sparse matrices, the h5py dataset for dense ones), for `X` or any layer
(anndata's backed mode keeps only `X` on disk and loads layers whole, and atlases keep raw counts in a layer).
`Source.iter_chunks` yields small in-memory AnnData chunks, one file at a time, each with that file's genes, so
the existing tokeniser matches genes per file. Samples are drawn from obs alone (`stratified_sample`), then only
the sampled rows are read.
"""

from __future__ import annotations

import glob as _glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from natsort import natsorted
from pandas.api.types import infer_dtype, union_categoricals

from .._log import logger
from ..errors import DataError

FILE_COLUMN = "ssw_file"  # obs column naming the file each cell came from
DEFAULT_CHUNK = 2048


@dataclass(frozen=True)
class SourceFile:
    """One member of a Source: its label, first global cell and size, its genes, and where its counts live."""

    label: str
    start: int
    n_obs: int
    var: pd.DataFrame
    path: Path | None = None  # read lazily from disk
    adata: object | None = None  # an in-memory AnnData
    soma: SomaReader | None = None  # a TileDB-SOMA experiment, read through tiledbsoma

    @property
    def stop(self) -> int:
        return self.start + self.n_obs


def _paths(data) -> list[Path]:
    """The .h5ad files named by a path, a folder (its *.h5ad, sorted) or a glob (sorted)."""
    text = str(data)
    if any(c in text for c in "*?["):
        found = sorted(Path(p) for p in _glob.glob(text))
    elif Path(text).is_dir():
        found = sorted(Path(text).glob("*.h5ad"))
    elif Path(text).is_file():
        found = [Path(text)]
    else:
        msg = f"data={text!r}: no such file or folder; pass an .h5ad file, a folder of .h5ad files or a glob."
        raise DataError(msg)
    if not found:
        msg = f"data={text!r} matches no .h5ad file; check the folder or the glob pattern (e.g. 'donors/*.h5ad')."
        raise DataError(msg)
    return found


def _labels(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


class Source:
    """Several AnnData-like members seen as one: `obs` of every cell (global order: file by file), counts on demand.

    Use `open_source` to build one. Global cell ``i`` is row ``i - f.start`` of the member ``f`` holding it.
    """

    def __init__(self, files: list[SourceFile], obs: pd.DataFrame, *, layer: str | None = None):
        self.files, self.obs, self.layer = files, obs, layer
        self._starts = np.array([f.start for f in files], dtype=np.int64)
        self._handles: dict[int, object] = {}
        self._elements: dict[int, object] = {}  # member -> its counts element, opened once
        self._indptrs: dict[int, np.ndarray] = {}  # member -> its CSR indptr, read once (n_obs + 1 integers)

    n_obs = property(lambda self: len(self.obs))
    obs_names = property(lambda self: self.obs.index)

    def __repr__(self) -> str:
        return f"Source({self.n_obs} cells in {len(self.files)} file(s), layer={self.layer!r})"

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        self._elements.clear()
        self._indptrs.clear()

    # -- genes -----------------------------------------------------------------------------------------------
    def genes_shared_with(self, vocab: dict[str, int], *, gene_key: str | None = None) -> pd.DataFrame:
        """Per file: its genes and how many of them the vocab knows (what each file's tokenisation will use).
        `scsuperweight.atlas.file_overlap` logs it, records it and refuses a file sharing too few."""
        rows = []
        for f in self.files:
            if gene_key is None:
                names = f.var.index.astype(str)
            elif gene_key in f.var.columns:
                names = f.var[gene_key].astype(str)
            else:
                msg = (f"gene_key={gene_key!r} is not a var column of {f.label}; its columns are "
                       f"{list(f.var.columns)}. Pass a column of gene symbols, or gene_key=None for var_names.")
                raise DataError(msg)
            shared = int(pd.Index(names).unique().isin(list(vocab)).sum())
            rows.append({"file": f.label, "n_cells": f.n_obs, "n_genes": len(names), "n_shared": shared,
                         "fraction": shared / max(len(names), 1)})
        return pd.DataFrame(rows)

    # -- reading ---------------------------------------------------------------------------------------------
    def _element(self, k: int):
        """The counts of member `k` (X or the layer), rows readable on demand; opened once per member."""
        import h5py
        from anndata.io import sparse_dataset

        if k in self._elements:
            return self._elements[k]
        f = self.files[k]
        if k not in self._handles:
            self._handles[k] = h5py.File(f.path, "r")
        h = self._handles[k]
        key = "X" if self.layer is None else f"layers/{self.layer}"
        if key not in h:
            layers = list(h["layers"].keys()) if "layers" in h else []
            msg = (f"{f.label} has no {key!r}; its layers are {layers}. Pass layer= the one with raw counts, "
                   "or layer=None for X.")
            raise DataError(msg)
        el = h[key]
        self._elements[k] = sparse_dataset(el) if isinstance(el, h5py.Group) else el
        return self._elements[k]

    def _rows(self, k: int, rows: np.ndarray):
        """Rows `rows` (sorted, local) of member `k`'s counts on disk, in memory.

        A run of consecutive rows of a CSR matrix (every block of an embedding run) is read as three slices of
        anndata's on-disk CSR arrays, with the member's indptr read once: anndata's backed indexing gives the same
        matrix but costs milliseconds per call in index checks, which dominate small blocks. Anything else goes
        through anndata's backed indexing.
        """
        import scipy.sparse as sp

        el = self._element(k)
        if not len(rows) or rows[-1] - rows[0] + 1 != len(rows):
            return el[rows]
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        if getattr(el, "format", None) != "csr":
            return el[r0:r1]
        group = el.group
        if k not in self._indptrs:
            self._indptrs[k] = group["indptr"][:]
        indptr = self._indptrs[k]
        lo, hi = int(indptr[r0]), int(indptr[r1])
        return sp.csr_matrix((group["data"][lo:hi], group["indices"][lo:hi], indptr[r0:r1 + 1] - lo),
                             shape=(r1 - r0, el.shape[1]))

    def _read(self, k: int, rows: np.ndarray):
        """An in-memory AnnData of rows `rows` (sorted, local to member `k`) of member `k`."""
        import anndata as ad

        f = self.files[k]
        obs = self.obs.iloc[f.start + rows]
        if f.soma is not None:
            chunk = ad.AnnData(obs=obs.copy(), var=f.var.copy())
            X = f.soma.read_rows(rows)
            if self.layer is None:
                chunk.X = X
            else:
                chunk.layers[self.layer] = X
            return chunk
        if f.adata is not None:
            view = f.adata[rows]
            view = view.copy() if view.is_view else view
            view.obs_names = obs.index  # the Source's (possibly prefixed) names
            return view
        X = self._rows(k, rows)
        chunk = ad.AnnData(obs=obs.copy(), var=f.var.copy())
        if self.layer is None:
            chunk.X = X
        else:
            chunk.layers[self.layer] = X
        return chunk

    def _split(self, cells: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(member, sorted global cells in it) for every member holding some of `cells`."""
        member = np.searchsorted(self._starts, cells, side="right") - 1
        return [(int(k), cells[member == k]) for k in np.unique(member)]

    def iter_chunks(self, cells=None, chunk_size: int = DEFAULT_CHUNK) -> Iterator[tuple[np.ndarray, object]]:
        """Yield ``(global cell indices, in-memory AnnData)`` chunks of at most `chunk_size` cells.

        Only the requested rows are read, in global order, one member at a time (a chunk never spans two files,
        so each chunk carries its own file's genes). `cells`: global indices (any order; duplicates dropped) or a
        boolean mask; None for all cells.
        """
        if chunk_size < 1:
            msg = f"chunk_size must be >= 1, got {chunk_size}."
            raise ValueError(msg)
        cells = self._cells(cells)
        for k, glob_cells in self._split(cells):
            local = glob_cells - self.files[k].start
            for s in range(0, len(local), chunk_size):
                yield glob_cells[s:s + chunk_size], self._read(k, local[s:s + chunk_size])

    def chunk_plan(self, cells=None, chunk_size: int = DEFAULT_CHUNK) -> list[np.ndarray]:
        """The global cells of each chunk `iter_chunks` yields, without reading anything (for stores, sharding)."""
        cells = self._cells(cells)
        return [g[s:s + chunk_size] for _, g in self._split(cells) for s in range(0, len(g), chunk_size)]

    def read(self, cells) -> list[tuple[np.ndarray, object]]:
        """The chosen cells as one in-memory AnnData per member (members differ in genes)."""
        return [(g, self._read(k, g - self.files[k].start)) for k, g in self._split(self._cells(cells))]

    def _cells(self, cells) -> np.ndarray:
        if cells is None:
            return np.arange(self.n_obs, dtype=np.int64)
        cells = np.asarray(cells)
        if cells.dtype == bool:
            if len(cells) != self.n_obs:
                msg = f"a boolean cell mask must have n_obs={self.n_obs} entries, got {len(cells)}."
                raise DataError(msg)
            return np.flatnonzero(cells)
        cells = np.unique(cells.astype(np.int64))
        if len(cells) and (cells[0] < 0 or cells[-1] >= self.n_obs):
            msg = f"cell indices must lie in [0, {self.n_obs}); got {cells[0]}..{cells[-1]}."
            raise DataError(msg)
        return cells


def _unique_names(obs: list[pd.DataFrame], labels: list[str]) -> list[pd.DataFrame]:
    """Obs names unique across members: kept when they already are, else every name becomes ``<file>:<name>``.

    Prefixing all names (not only the colliding ones) keeps the rule simple: a name depends only on its file.
    """
    for o, lab in zip(obs, labels, strict=True):
        if not o.index.is_unique:
            dup = o.index[o.index.duplicated()][:3].tolist()
            msg = (f"obs names repeat inside {lab} (e.g. {dup}); make them unique first "
                   "(adata.obs_names_make_unique()) and write the file again.")
            raise DataError(msg)
    if pd.Index(np.concatenate([o.index.to_numpy(dtype=object) for o in obs])).is_unique:
        return obs
    logger.info("obs names repeat across files: each becomes '<file>:<name>'")
    out = []
    for o, lab in zip(obs, labels, strict=True):
        o = o.copy()
        o.index = pd.Index([f"{lab}:{n}" for n in o.index], name=o.index.name)
        out.append(o)
    return out


def _concat_obs(obs_list: list[pd.DataFrame]) -> pd.DataFrame:
    """The members' obs one after another, string columns kept categorical across files.

    Why: pandas concatenates categoricals whose categories differ (a ``donor`` column names one donor per file) into
    object columns, 8 bytes a cell plus the strings, where categorical codes take 1 byte. Such a column becomes
    the categorical anndata itself would write for those values (``strings_to_categoricals``: the values present,
    natural-sorted, only when some value repeats), so the .h5ad written from this obs is the one written before.
    """
    if len(obs_list) == 1:
        return obs_list[0].copy()
    obs = pd.concat(obs_list, axis=0, join="outer")
    for c in obs.columns:
        if obs[c].dtype != object or not all(c in o.columns and isinstance(o[c].dtype, pd.CategoricalDtype)
                                             for o in obs_list):
            continue
        cat = union_categoricals([pd.Categorical(o[c]) for o in obs_list]).remove_unused_categories()
        if infer_dtype(cat.categories) != "string" or len(cat.categories) >= len(cat):
            continue  # not strings, or every value unique: anndata writes those as strings, so they stay so
        obs[c] = cat.reorder_categories(natsorted(cat.categories))
    return obs


def open_source(data, *, layer: str | None = None) -> Source:
    """A `Source` over `data`: an .h5ad path, a folder or glob of .h5ad files, a backed or in-memory AnnData,
    a TileDB-SOMA experiment (its folder or URI, or an open ``tiledbsoma.Experiment``; the ``[soma]`` extra; see
    `SomaReader`), or a Source (returned as is).

    Only obs and var are read now; the counts (``X``, or ``layers[layer]``) stay on disk until `iter_chunks`.
    ``obs`` gets a column ``ssw_file`` naming each cell's file.

    Examples
    --------
    >>> src = open_source("donors/*.h5ad", layer="UMIs")  # doctest: +SKIP
    >>> for cells, chunk in src.iter_chunks(chunk_size=4096):  # doctest: +SKIP
    ...     tok = tokenize_anndata(chunk, vocab, layer="UMIs")
    """
    import anndata as ad

    if isinstance(data, Source):
        return data
    if is_soma(data):
        return _open_soma(data, layer=layer)
    if isinstance(data, ad.AnnData):
        if data.isbacked:
            paths, given = [Path(data.filename)], data.obs
        else:
            obs = data.obs.copy()
            obs[FILE_COLUMN] = pd.Categorical(["memory"] * data.n_obs)
            return Source([SourceFile("memory", 0, data.n_obs, data.var, adata=data)], obs, layer=layer)
    else:
        paths, given = _paths(data), None
    import h5py
    from anndata.io import read_elem

    labels = _labels(paths)
    obs_list, files, start = [], [], 0
    for p, lab in zip(paths, labels, strict=True):
        with h5py.File(p, "r") as h:
            o = given if given is not None else read_elem(h["obs"])
            var = read_elem(h["var"])
        files.append(SourceFile(lab, start, len(o), var, path=p))
        obs_list.append(o)
        start += len(o)
    obs_list = _unique_names(obs_list, labels)
    obs = _concat_obs(obs_list)
    obs[FILE_COLUMN] = pd.Categorical(np.repeat(labels, [f.n_obs for f in files]), categories=labels)
    logger.info("opened %d cells in %d file(s)", len(obs), len(files))
    return Source(files, obs, layer=layer)


def stratified_sample(obs: pd.DataFrame, label_key: str | None = None, donor_key: str | None = None,
                      condition_key: str | None = None, *, max_per_label: int | None = None,
                      max_per_donor: int | None = None, max_per_condition: int | None = None,
                      max_cells: int | None = None, seed: int = 0) -> np.ndarray:
    """A seeded sample of cells drawn from obs alone; sorted global indices (read them with `iter_chunks`).

    Cells are visited in one seeded random order, and each cap keeps the first cells of that order among those
    the previous caps kept: at most `max_per_donor` per (label, donor), `max_per_condition` per (label,
    condition), `max_per_label` per label and `max_cells` in all. A missing key or cap leaves that stratum
    uncapped. Every cap is met; the same obs and seed give the same sample.
    """
    n = len(obs)
    order = np.random.default_rng(seed).permutation(n)
    keys = {}
    for name, key in (("label_key", label_key), ("donor_key", donor_key), ("condition_key", condition_key)):
        if key is None:
            continue
        if key not in obs.columns:
            msg = f"{name}={key!r} is not an obs column; columns are {list(obs.columns)}."
            raise DataError(msg)
        col = obs[key]
        if col.isna().any():
            msg = f"obs[{key!r}] has {int(col.isna().sum())} missing values; fill or drop those cells first."
            raise DataError(msg)
        keys[name] = pd.factorize(col.astype(str))[0][order]
    label = keys.get("label_key", np.zeros(n, dtype=np.int64))
    kept = np.ones(n, dtype=bool)  # in visiting order
    for cap, extra in ((max_per_donor, "donor_key"), (max_per_condition, "condition_key"), (max_per_label, None)):
        if cap is None or (extra is not None and extra not in keys):
            continue
        group = label if extra is None else label * (int(keys[extra].max(initial=0)) + 1) + keys[extra]
        pos = np.flatnonzero(kept)
        rank = pd.Series(group[pos]).groupby(group[pos]).cumcount().to_numpy()
        kept[pos[rank >= cap]] = False
    if max_cells is not None:
        pos = np.flatnonzero(kept)
        kept[pos[max_cells:]] = False
    return np.sort(order[kept])


# -- TileDB-SOMA (the CELLxGENE Census format) ------------------------------------------------------------------
SOMA_MEASUREMENT = "RNA"


def is_soma(data) -> bool:
    """Is `data` a TileDB-SOMA experiment: an open ``tiledbsoma.Experiment``, a remote URI (``tiledb://``,
    ``s3://``, ...) or a local TileDB group folder holding ``ms`` (its measurements)?"""
    if type(data).__module__.startswith("tiledbsoma"):
        return True
    if not isinstance(data, str | Path):
        return False
    text = str(data)
    if "://" in text and not text.startswith("file://"):
        return not text.endswith(".h5ad")
    p = Path(text.removeprefix("file://"))
    return p.is_dir() and (p / "__tiledb_group.tdb").exists() and (p / "ms").is_dir()


class SomaReader:
    """Rows of one X layer of a SOMA measurement, read on demand with tiledbsoma's own sparse reader.

    Cells and genes are addressed by their ``soma_joinid``; a chunk of rows comes back as a CSR matrix of those
    rows (in the order asked) over every gene of the measurement, in var order.
    """

    def __init__(self, experiment, measurement: str, layer: str, obs_ids: np.ndarray, var_ids: np.ndarray):
        self.experiment, self.measurement, self.layer = experiment, measurement, layer
        self.obs_ids, self.var_ids = obs_ids, var_ids
        self._var_pos = pd.Series(np.arange(len(var_ids)), index=var_ids)

    def read_rows(self, rows: np.ndarray):
        import scipy.sparse as sp

        joinids = self.obs_ids[rows]
        X = self.experiment.ms[self.measurement].X[self.layer]
        table = X.read(coords=(joinids,)).tables().concat()
        r = pd.Series(np.arange(len(joinids)), index=joinids)[table["soma_dim_0"].to_numpy()].to_numpy()
        c = self._var_pos[table["soma_dim_1"].to_numpy()].to_numpy()
        vals = table["soma_data"].to_numpy().astype(np.float32)
        return sp.csr_matrix((vals, (r, c)), shape=(len(joinids), len(self.var_ids)))


def _open_soma(data, *, layer: str | None = None, measurement: str = SOMA_MEASUREMENT) -> Source:
    """A one-member Source over a SOMA experiment: obs and var read now (small), X rows on demand.

    The counts are the X layer `layer` (then given to the steps as that AnnData layer), or without `layer` the X
    layer ``raw`` (the Census's counts) or the experiment's only X layer, given as ``X``.
    """
    try:
        import tiledbsoma
    except ImportError:
        msg = (f"data={str(data)!r} is a TileDB-SOMA experiment, but tiledbsoma is not installed; "
               "pip install 'scsuperweight[soma]'.")
        raise DataError(msg) from None
    exp = data if type(data).__module__.startswith("tiledbsoma") else tiledbsoma.Experiment.open(str(data))
    if measurement not in exp.ms:
        msg = f"the SOMA experiment {exp.uri} has no measurement {measurement!r}; it has {list(exp.ms.keys())}."
        raise DataError(msg)
    ms = exp.ms[measurement]
    names = list(ms.X.keys())
    x_layer = layer if layer is not None else "raw" if "raw" in names else names[0] if len(names) == 1 else None
    if x_layer not in names:
        msg = (f"the SOMA experiment {exp.uri} has X layers {names}; pass layer= the one with raw counts "
               "(--layer).")
        raise DataError(msg)
    obs = exp.obs.read().concat().to_pandas()
    var = ms.var.read().concat().to_pandas()
    obs_ids, var_ids = obs.pop("soma_joinid").to_numpy(), var.pop("soma_joinid").to_numpy()
    obs.index = pd.Index(obs.pop("obs_id").astype(str) if "obs_id" in obs else obs_ids.astype(str), name=None)
    var.index = pd.Index(var.pop("var_id").astype(str) if "var_id" in var else var_ids.astype(str), name=None)
    label = Path(str(exp.uri).rstrip("/")).name or "soma"
    reader = SomaReader(exp, measurement, x_layer, obs_ids, var_ids)
    obs[FILE_COLUMN] = pd.Categorical([label] * len(obs))
    logger.info("opened %d cells of the SOMA experiment %s (X layer %r)", len(obs), exp.uri, x_layer)
    return Source([SourceFile(label, 0, len(obs), var, soma=reader)], obs, layer=layer)
