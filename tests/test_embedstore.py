"""The embedding store survives SIGKILL: a resumed run redoes only unfinished blocks and ends bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scsuperweight.data.sources import open_source
from scsuperweight.embedstore import EmbeddingStore, embed_to_store
from scsuperweight.errors import DataError

# A deterministic stand-in for a model: log1p counts of a fixed gene list (each file's genes matched by name)
# times a fixed matrix. The sleep makes a block long enough to be killed in the middle of.
EMBED = textwrap.dedent("""
    import sys, time
    import numpy as np
    import scipy.sparse as sp
    GENES = [f"G{i}" for i in range(40)]
    W = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)

    def embed_fn(chunk, pause=0.0):
        X = sp.csr_matrix(chunk.X)
        pos = {g: i for i, g in enumerate(chunk.var_names)}
        dense = np.zeros((chunk.n_obs, 40), np.float32)
        for j, g in enumerate(GENES):
            if g in pos:
                dense[:, j] = X[:, pos[g]].toarray().ravel()
        time.sleep(pause)
        return np.log1p(dense) @ W
""")

RUN = EMBED + textwrap.dedent("""
    from scsuperweight.data.sources import open_source
    from scsuperweight.embedstore import EmbeddingStore, embed_to_store
    src = open_source(sys.argv[1])
    store = EmbeddingStore(sys.argv[2], src.obs_names, block_size=6)
    embed_to_store(src, lambda c: embed_fn(c, float(sys.argv[3])), store)
""")


@pytest.fixture
def atlas(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "atlas"
    folder.mkdir()
    for d, n in enumerate([14, 9, 20]):
        genes = rng.permutation([f"G{i}" for i in range(40)])[:35]  # each file its own genes and order
        X = sp.random(n, 35, density=0.3, random_state=d, format="csr", dtype=np.float32)
        X.data = np.ceil(X.data * 20)
        ad.AnnData(X, obs=pd.DataFrame(index=[f"d{d}_{i}" for i in range(n)]),
                   var=pd.DataFrame(index=genes)).write_h5ad(folder / f"donor{d}.h5ad")
    script = tmp_path / "run_embed.py"
    script.write_text(RUN)
    return folder, script


def _namespace():
    ns: dict = {}
    exec(EMBED, ns)  # noqa: S102 - the same embed_fn as the subprocess, defined once
    return ns["embed_fn"]


def test_sigkill_resume_identical(atlas, tmp_path):
    folder, script = atlas
    embed_fn = _namespace()
    src = open_source(folder)
    clean = EmbeddingStore(tmp_path / "clean", src.obs_names, block_size=6)
    assert embed_to_store(src, embed_fn, clean) == clean.n_blocks == 8

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(killed), "0.3"], env=os.environ.copy())
    deadline = time.time() + 60
    while time.time() < deadline:
        done = killed / "done"
        if done.exists() and sum(p.name.isdigit() for p in done.iterdir()) >= 3:  # markers, not temporaries
            break
        assert proc.poll() is None, "the embedding subprocess ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = EmbeddingStore(killed, src.obs_names, block_size=6)
    finished = store.done_blocks()
    assert 3 <= len(finished) < store.n_blocks  # killed part-way
    assert finished == list(range(len(finished)))  # blocks finish in order
    computed = embed_to_store(src, embed_fn, store)
    assert computed == store.n_blocks - len(finished)  # only unfinished blocks are redone
    np.testing.assert_array_equal(store.read(), clean.read())  # bit for bit
    out = store.finalize(src.obs)
    back = ad.read_h5ad(out)
    assert list(back.obs_names) == list(src.obs_names)
    np.testing.assert_array_equal(back.obsm["X_scGPT"], clean.read())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_sampled_cells_and_guards(atlas, tmp_path):
    folder, _ = atlas
    embed_fn = _namespace()
    src = open_source(folder)
    cells = np.array([30, 2, 17, 5, 40, 11])  # any order, across files
    store = EmbeddingStore(tmp_path / "s", src.obs_names[cells], block_size=4)
    embed_to_store(src, embed_fn, store, cells=cells)
    full = EmbeddingStore(tmp_path / "f", src.obs_names, block_size=50)
    embed_to_store(src, embed_fn, full)
    # rows land in place (a matmul over another batch differs only in rounding)
    np.testing.assert_allclose(store.read(), full.read()[cells], rtol=1e-5, atol=1e-5)
    assert embed_to_store(src, embed_fn, store, cells=cells) == 0  # all finished: nothing recomputed
    with pytest.raises(DataError, match="other inputs"):
        EmbeddingStore(tmp_path / "s", src.obs_names[:3], block_size=4)
    half = EmbeddingStore(tmp_path / "h", src.obs_names, block_size=10)
    embed_to_store(src, embed_fn, half, blocks=[0, 2])
    assert half.done_blocks() == [0, 2]
    with pytest.raises(DataError, match="not finished"):
        half.read()


def test_a_block_costs_two_fsyncs_and_its_marker_comes_after_them(atlas, tmp_path, monkeypatch):
    """Per block: the chunk file and its folder are fsynced, then the (empty) marker is made, with no fsync of its
    own; the data is already on disk when the marker appears, and a lost marker only means the block is redone."""
    import scsuperweight.embedstore as es

    folder, _ = atlas
    src = open_source(folder)
    store = EmbeddingStore(tmp_path / "s", src.obs_names, block_size=10)
    events: list[str] = []
    real_fsync, real_touch = os.fsync, es._touch
    monkeypatch.setattr(es.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(es, "_touch", lambda p: (events.append("marker"), real_touch(p))[1])
    embed_fn = _namespace()
    assert embed_to_store(src, embed_fn, store) == store.n_blocks
    assert events == ["fsync", "fsync", "marker"] * store.n_blocks
    assert store.done_blocks() == list(range(store.n_blocks))
    whole = np.concatenate([embed_fn(chunk) for _, chunk in src.iter_chunks(chunk_size=10**6)])  # file by file
    np.testing.assert_allclose(store.read(), whole, rtol=1e-6, atol=1e-6)


def test_finalize_streams_blocks_into_the_file_anndata_would_write(atlas, tmp_path):
    """The .h5ad copied block by block from the store reads back as the one anndata writes from memory (obs, uns,
    obsm with anndata's encoding), and an unfinished store is refused before any file is made."""
    import h5py

    import scsuperweight.embedstore as es

    folder, _ = atlas
    src = open_source(folder)
    store = EmbeddingStore(tmp_path / "s", src.obs_names, block_size=7)  # last block partial
    assert src.n_obs % 7
    embed_to_store(src, _namespace(), store)
    uns = {"ssw": {"params": {"embed": '{"seed": 0}'}}}
    out = store.finalize(src.obs, tmp_path / "streamed.h5ad", key_added="X_test", uns=uns)
    ad.AnnData(obs=src.obs.copy(), obsm={"X_test": store.read()}, uns=uns).write_h5ad(tmp_path / "memory.h5ad")
    got, want = ad.read_h5ad(out), ad.read_h5ad(tmp_path / "memory.h5ad")
    pd.testing.assert_frame_equal(got.obs, want.obs)
    assert got.uns == want.uns and list(got.obsm) == ["X_test"]
    assert got.obsm["X_test"].dtype == np.float32
    np.testing.assert_array_equal(got.obsm["X_test"], want.obsm["X_test"])
    with h5py.File(out) as a, h5py.File(tmp_path / "memory.h5ad") as b:
        assert dict(a["obsm/X_test"].attrs) == dict(b["obsm/X_test"].attrs)
    half = EmbeddingStore(tmp_path / "h", src.obs_names, block_size=10)
    embed_to_store(src, _namespace(), half, blocks=[0])
    with pytest.raises(DataError, match="not finished"):
        half.finalize(src.obs, tmp_path / "half.h5ad")
    assert not (tmp_path / "half.h5ad").exists()
    es.trim_heap()  # on glibc it finds malloc_trim; elsewhere it is a no-op
    import platform

    assert (es._LIBC_TRIM[0] is not None) == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
