"""enrich: the planted set comes first, nothing touches the network, every GMT we meet loads, and the bundled
gene sets are what they claim to be."""

import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import fisher_exact

from scsuperweight._keys import ENRICHMENT_COLUMNS
from scsuperweight.data.synthetic import MARKERS, TRUTH_KEY
from scsuperweight.datasets import synthetic_ad
from scsuperweight.enrich import gmt_descriptions, load_gene_sets, ora, prerank, read_gmt
from scsuperweight.errors import DataError
from scsuperweight.genesets import BUNDLED_GMT

SHARED_GENESETS = Path(__file__).parents[2] / "shared" / "genesets"
GO_BP = SHARED_GENESETS / "enrichr.GO_Biological_Process_2021.gmt"
needs_shared = pytest.mark.skipif(
    not SHARED_GENESETS.is_dir(), reason=f"shared gene sets not found at {SHARED_GENESETS} (../shared beside the repo)"
)

GENES = [f"GENE{i:04d}" for i in range(1000)]


@pytest.fixture(scope="module")
def planted():
    """Scores over 1,000 genes: 25 planted at the top, 25 pushed down less far, and 40 random sets as decoys."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(GENES))
    up = [GENES[i] for i in order[:25]]
    down = [GENES[i] for i in order[25:50]]
    scores = pd.Series(rng.normal(size=len(GENES)), index=GENES)
    scores[up] += 3.0
    scores[down] -= 2.0
    sets = {"PLANTED_UP": up, "PLANTED_DOWN": down}
    for k in range(40):
        sets[f"RANDOM_{k:02d}"] = list(rng.choice(GENES, size=int(rng.integers(15, 60)), replace=False))
    return scores, sets


def _block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------------------------
# prerank


def test_prerank_puts_the_planted_set_first(planted):
    scores, sets = planted
    res = prerank(scores, sets, permutations=1000, seed=0, candidate="c1")
    assert list(res.columns[: len(ENRICHMENT_COLUMNS)]) == ENRICHMENT_COLUMNS
    top = res.iloc[0]
    assert top["term"] == "PLANTED_UP"
    assert top["nes"] > 0 and top["fdr"] < 0.05
    down = res.set_index("term").loc["PLANTED_DOWN"]
    assert down["nes"] < 0 and down["fdr"] < 0.05
    assert set(res["term"][:2]) == {"PLANTED_UP", "PLANTED_DOWN"}
    decoys = res[res["term"].str.startswith("RANDOM")]
    assert (decoys["fdr"] < 0.05).sum() <= 2
    assert set(top["genes"].split(";")) <= set(sets["PLANTED_UP"])  # the leading edge is made of planted genes
    assert top["overlap"] == len(top["genes"].split(";")) >= 15
    assert res["odds_ratio"].isna().all()
    assert (res["candidate"] == "c1").all() and (res["method"] == "prerank").all()
    assert (res["gene_set"] == "custom").all()
    assert (res["n_genes"] == res["set_size"]).all()  # every set lies inside the ranking here


def test_prerank_is_reproducible_and_order_free(planted):
    scores, sets = planted
    first = prerank(scores, sets, permutations=300, seed=1)
    again = prerank(scores.sample(frac=1.0, random_state=3), sets, permutations=300, seed=1)
    pd.testing.assert_frame_equal(first, again)


def test_prerank_permutation_method_agrees(planted):
    scores, sets = planted
    res = prerank(scores, sets, permutations=500, seed=0, method="permutation")
    assert set(res["term"][:2]) == {"PLANTED_UP", "PLANTED_DOWN"}
    assert (res.set_index("term").loc[["PLANTED_UP", "PLANTED_DOWN"], "fdr"] < 0.05).all()


def test_prerank_background_restricts_the_ranking(planted):
    scores, sets = planted
    background = GENES[:500]
    res = prerank(scores, sets, background=background, permutations=200, min_size=5)
    inside = set(background)
    sizes = res.set_index("term")["n_genes"]
    for term, n in sizes.items():
        assert n == sum(g in inside for g in sets[term])
    for genes in res["genes"]:
        assert set(filter(None, genes.split(";"))) <= inside


def test_prerank_size_filter_and_bad_input(planted):
    scores, sets = planted
    res = prerank(scores, sets, permutations=100, min_size=30, max_size=50)
    assert res["n_genes"].between(30, 50).all()
    with pytest.raises(DataError, match="duplicated"):
        prerank(pd.Series([1.0, 2.0, 3.0], index=["A", "A", "B"]), sets)
    with pytest.raises(DataError, match="no gene set"):
        prerank(scores, {"MOUSE": ["Apoe", "Trem2", "Tyrobp", "Cst7", "Lpl"]})
    with pytest.raises(DataError, match="method"):
        prerank(scores, sets, method="fgsea")


def test_prerank_keeps_mixed_case_genes():
    # gseapy upper-cases a ranking that is < 90% upper case when the sets are upper case, after which set members
    # such as "C9orf72" no longer match and silently drop out of the set; our genes must stay exactly as given
    genes = [f"GENE{i:04d}" for i in range(850)] + [f"C{i}orf{i % 7 + 1}" for i in range(150)]
    scores = pd.Series(np.random.default_rng(0).normal(size=len(genes)), index=genes)
    planted = genes[:23] + genes[850:852]
    scores[planted] += 4.0
    res = prerank(scores, {"PLANTED": planted, "OTHER": genes[100:140]}, permutations=200).set_index("term")
    assert res.loc["PLANTED", "n_genes"] == 25
    assert {"C0orf1", "C1orf2"} <= set(res.loc["PLANTED", "genes"].split(";"))


# ---------------------------------------------------------------------------------------------------------------
# over-representation


def test_ora_puts_the_planted_set_first(planted):
    _, sets = planted
    rng = np.random.default_rng(1)
    query = sets["PLANTED_UP"][:15] + list(rng.choice(GENES, size=10, replace=False))
    res = ora(query, sets, background=GENES, candidate="c2")
    assert list(res.columns[: len(ENRICHMENT_COLUMNS)]) == ENRICHMENT_COLUMNS
    top = res.iloc[0]
    assert top["term"] == "PLANTED_UP" and top["fdr"] < 0.05 and top["odds_ratio"] > 10
    assert res["nes"].isna().all() and (res["method"] == "ora").all() and (res["candidate"] == "c2").all()
    # the p-value is the one-sided Fisher exact test on the 2x2 table, computed here by hand
    query_set = set(query)
    x = len(query_set & set(sets["PLANTED_UP"]))
    table = [[x, len(query_set) - x], [len(sets["PLANTED_UP"]) - x, len(GENES) - len(query_set) - 25 + x]]
    assert top["overlap"] == x
    assert top["p_value"] == pytest.approx(fisher_exact(table, alternative="greater")[1], rel=1e-9)
    assert set(top["genes"].split(";")) == query_set & set(sets["PLANTED_UP"])


def test_ora_matches_gseapy_enrich_offline(planted, monkeypatch):
    gseapy = pytest.importorskip("gseapy")
    _, sets = planted
    query = sets["PLANTED_UP"][:12] + GENES[900:920]
    background = GENES[:950]
    ours = ora(query, sets, background=background, min_size=1).set_index("term")
    _block_network(monkeypatch)
    theirs = gseapy.enrich(gene_list=query, gene_sets=sets, background=background, outdir=None, no_plot=True)
    theirs = theirs.results.set_index("Term")
    assert set(ours.index) == set(theirs.index)
    for term in ours.index:
        assert ours.loc[term, "p_value"] == pytest.approx(theirs.loc[term, "P-value"], rel=1e-9)
        assert ours.loc[term, "odds_ratio"] == pytest.approx(theirs.loc[term, "Odds Ratio"], rel=1e-9)


def test_ora_counts_inside_the_background(planted):
    _, sets = planted
    background = GENES[:300]
    res = ora(sets["PLANTED_UP"], sets, background=background, min_size=1)
    inside = set(background)
    for _, row in res.iterrows():
        assert row["n_genes"] == sum(g in inside for g in sets[row["term"]])
        assert set(row["genes"].split(";")) <= inside
    with pytest.raises(TypeError):
        ora(sets["PLANTED_UP"], sets)  # the background is required
    with pytest.raises(DataError, match="background"):
        ora(sets["PLANTED_UP"], sets, background=None)
    with pytest.raises(DataError, match="none of"):
        ora(["NOT_A_GENE"], sets, background=GENES)


def test_bh_fdr_is_monotone_in_p(planted):
    _, sets = planted
    res = ora(GENES[:200], sets, background=GENES, min_size=1)
    ordered = res.sort_values("p_value")
    assert (np.diff(ordered["fdr"].to_numpy()) >= -1e-12).all()
    assert (res["fdr"] >= res["p_value"] - 1e-15).all() and (res["fdr"] <= 1).all()


# ---------------------------------------------------------------------------------------------------------------
# offline


def test_nothing_touches_the_network(planted, monkeypatch):
    _block_network(monkeypatch)
    with pytest.raises(OSError):
        socket.create_connection(("maayanlab.cloud", 443), timeout=1)
    scores, sets = planted
    assert not prerank(scores, sets, permutations=200).empty
    assert not prerank(scores, sets, permutations=100, method="permutation").empty
    assert not ora(sets["PLANTED_UP"], sets, background=GENES).empty
    # real symbols against the bundled sets and a public GMT file
    symbols = list(synthetic_ad(n_cells=50).var_names)
    real = pd.Series(np.random.default_rng(2).normal(size=len(symbols)), index=symbols)
    sources = ["bundled"] + ([SHARED_GENESETS / "h.all.v7.0.symbols.gmt"] if SHARED_GENESETS.is_dir() else [])
    res = prerank(real, sources, permutations=200)
    assert set(res["gene_set"]) == {Path(str(s)).stem if s != "bundled" else "ad_genesets" for s in sources}
    assert not ora(symbols[:100], sources, background=symbols).empty


def test_library_names_are_refused_with_the_fix():
    for name in ("GO_Biological_Process_2021", "KEGG_2021_Human", "MSigDB_Hallmark_2020"):
        with pytest.raises(DataError, match="pass a local .gmt path; library names would call a server"):
            load_gene_sets(name)
        with pytest.raises(DataError, match="library names would call a server"):
            prerank(pd.Series([1.0, 0.0], index=["A", "B"]), name)
    with pytest.raises(DataError, match="library names would call a server"):
        load_gene_sets(["bundled", "KEGG_2021_Human"])


# ---------------------------------------------------------------------------------------------------------------
# loading


def test_load_gene_sets_sources(tmp_path):
    gmt = tmp_path / "mine.gmt"
    gmt.write_text("SET_A\tdesc\tAPOE\tTREM2\tTREM2\t\nSET_B\t\tGFAP,1.0\tSARS coronavirus, complete genome\n")
    libs = load_gene_sets([gmt, str(gmt), {"X": ["A", " B ", ""]}, {"lib": {"Y": ("C",)}}, "bundled"])
    assert list(libs) == ["mine", "mine_2", "custom", "lib", "ad_genesets"]
    assert libs["mine"] == {"SET_A": ["APOE", "TREM2"], "SET_B": ["GFAP", "SARS coronavirus, complete genome"]}
    assert libs["custom"] == {"X": ["A", "B"]}
    assert libs["lib"] == {"Y": ["C"]}
    assert load_gene_sets(libs) == libs  # what it returns, it takes back


def test_load_gene_sets_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_gene_sets(str(tmp_path / "missing.gmt"))
    bad = tmp_path / "bad.gmt"
    bad.write_text("GOOD\tdesc\tAPOE\tTREM2\nBAD LINE WITH SPACES APOE TREM2\n")
    with pytest.raises(DataError, match="line 2"):
        load_gene_sets(bad)
    empty_set = tmp_path / "empty_set.gmt"
    empty_set.write_text("NOGENES\tdesc\t\n")
    with pytest.raises(DataError, match="lists no genes"):
        read_gmt(empty_set)
    binary = tmp_path / "binary.gmt"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(DataError, match="not UTF-8"):
        read_gmt(binary)
    with pytest.raises(DataError, match="not a list of genes"):
        load_gene_sets({"A": "APOE"})
    with pytest.raises(DataError, match="empty"):
        load_gene_sets([])
    with pytest.raises(DataError, match="not supported"):
        load_gene_sets(42)
    with pytest.raises(DataError, match="directory"):
        load_gene_sets(tmp_path)


@needs_shared
@pytest.mark.parametrize(
    "name", sorted(p.name for p in SHARED_GENESETS.glob("*.gmt")) if SHARED_GENESETS.is_dir() else ["none"]
)
def test_every_shared_gmt_loads(name):
    path = SHARED_GENESETS / name
    sets = read_gmt(path)
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert len(sets) == n_lines
    assert all(genes for genes in sets.values())
    assert list(load_gene_sets(path)) == [path.stem]


@needs_shared
def test_shared_gmts_hold_the_ad_sets_we_rely_on():
    assert "Amyloid fiber formation" in read_gmt(SHARED_GENESETS / "ReactomePathways.gmt")
    assert "WP_ALZHEIMERS_DISEASE" in read_gmt(SHARED_GENESETS / "wikipathway.v7.2.symbols.gmt")


@needs_shared
def test_prerank_against_go_bp_runs_on_the_full_library():
    genes = [g for g in synthetic_ad(n_cells=50).var_names]
    scores = pd.Series(np.random.default_rng(0).normal(size=len(genes)), index=genes)
    res = prerank(scores, GO_BP, permutations=1000, min_size=5, max_size=500)
    assert len(res) > 1000  # GO BP cut to ~1,000 genes still leaves well over a thousand sets
    assert res["fdr"].between(0, 1).all()


# ---------------------------------------------------------------------------------------------------------------
# the bundled gene sets

REQUIRED_SETS = {
    "DAM_STAGE_1", "DAM_STAGE_2", "HOMEOSTATIC_MICROGLIA", "AD_RISK_LOCI_BELLENGUEZ2022", "AMYLOID_PROCESSING",
    "TAU_PATHOLOGY", "COMPLEMENT", "SYNAPTIC", "MYELINATION", "INTERFERON_RESPONSE",
    "MARKER_EXCITATORY_NEURON", "MARKER_INHIBITORY_NEURON", "MARKER_ASTROCYTE", "MARKER_MICROGLIA",
    "MARKER_OLIGODENDROCYTE", "MARKER_OPC", "MARKER_ENDOTHELIAL",
}


def test_bundled_gmt_parses_with_citations():
    sets = read_gmt(BUNDLED_GMT)
    assert REQUIRED_SETS <= set(sets)
    assert load_gene_sets("bundled") == {"ad_genesets": sets}
    for name, description in gmt_descriptions(BUNDLED_GMT).items():
        assert re.search(r"\b(19|20)\d\d\b", description), f"{name}: no year in {description!r}"
        assert re.search(r"[A-Z][A-Za-z'\-]+ [A-Z]{1,3}\b", description), f"{name}: no author in {description!r}"
    symbol = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)?$")
    for name, genes in sets.items():
        assert len(genes) >= 5, name
        assert all(symbol.match(g) for g in genes), (name, [g for g in genes if not symbol.match(g)])
    assert {"APOE", "TREM2", "BIN1", "CLU", "PICALM", "SORL1", "ABCA7"} <= set(sets["AD_RISK_LOCI_BELLENGUEZ2022"])
    assert {"TREM2", "LPL", "CST7", "ITGAX"} <= set(sets["DAM_STAGE_2"])
    assert {"C1QA", "C1QB", "C1QC", "C3", "C4A", "C4B", "CR1"} <= set(sets["COMPLEMENT"])
    assert {"APP", "PSEN1", "PSEN2", "BACE1", "ADAM10"} <= set(sets["AMYLOID_PROCESSING"])
    assert {"MAPT", "GSK3B", "CDK5"} <= set(sets["TAU_PATHOLOGY"])


def test_no_restricted_library_is_shipped():
    shipped = [p.name.lower() for p in BUNDLED_GMT.parent.iterdir()]
    assert not [n for n in shipped if "kegg" in n or "disgenet" in n]
    text = BUNDLED_GMT.read_text().lower()
    assert "kegg" not in text and "disgenet" not in text


@needs_shared
def test_bundled_genes_are_real_symbols():
    # every bundled gene appears in at least one of the public libraries beside the repo
    known = set()
    for path in SHARED_GENESETS.glob("*.gmt"):
        for genes in read_gmt(path).values():
            known.update(genes)
    unknown = {g for genes in read_gmt(BUNDLED_GMT).values() for g in genes} - known
    assert not unknown


def test_bundled_markers_agree_with_the_synthetic_data():
    sets = read_gmt(BUNDLED_GMT)
    for cell_type, genes in MARKERS.items():
        name = "MARKER_" + cell_type.upper().replace(" ", "_")
        assert set(genes) <= set(sets[name]), name


# ---------------------------------------------------------------------------------------------------------------
# end to end on the synthetic data


def test_prerank_recovers_the_planted_microglia_programs():
    adata = synthetic_ad(seed=0)
    truth = adata.uns[TRUTH_KEY]["programs"]
    micro = (adata.obs["cell_type"] == "microglia").to_numpy()
    is_ad = (adata.obs["condition"] == "AD").to_numpy()
    X = adata.X.astype(np.float64)
    expr = sp.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X
    detected = np.asarray((X[micro] > 0).mean(axis=0)).ravel() > 0.1
    mean_ad = np.asarray(expr[micro & is_ad].mean(axis=0)).ravel()
    mean_ctrl = np.asarray(expr[micro & ~is_ad].mean(axis=0)).ravel()
    scores = pd.Series(np.log2((mean_ad + 1) / (mean_ctrl + 1)), index=adata.var_names)[detected]
    res = prerank(scores, "bundled", permutations=1000, seed=0).set_index("term")
    for term in ("DAM_STAGE_2", "INTERFERON_RESPONSE"):
        assert res.loc[term, "nes"] > 0 and res.loc[term, "fdr"] < 0.05, term
    assert res.loc["HOMEOSTATIC_MICROGLIA", "nes"] < 0 and res.loc["HOMEOSTATIC_MICROGLIA", "fdr"] < 0.05
    assert set(res.index[:3]) <= {"DAM_STAGE_1", "DAM_STAGE_2", "INTERFERON_RESPONSE", "HOMEOSTATIC_MICROGLIA"}
    # ORA on the programme's genes against the same background finds the same
    dam = [g for g in truth["dam_microglia"]["genes"] if g in scores.index]
    top = ora(dam, "bundled", background=list(scores.index)).iloc[0]
    assert top["term"] in {"DAM_STAGE_1", "DAM_STAGE_2"} and top["fdr"] < 0.05
