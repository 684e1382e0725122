"""Dataset manifests, downloads and harmonisation.

Downloads run against a small HTTP server on 127.0.0.1 started here (it understands Range, so resuming is
really exercised); nothing touches the internet. Harmonisation runs on the real Grubman 2019 files in
../shared/data when they are there.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scsuperweight import _cli_data
from scsuperweight.data import manifests
from scsuperweight.data.manifests import ControlledAccessError
from scsuperweight.errors import DataError

REPO_MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifests"
SHARED = Path(__file__).resolve().parents[2] / "shared"
SMALL48 = SHARED / "data" / "grubman2019_GSE138852_small48.h5ad"
COVARIATES = SHARED / "data" / "grubman2019_GSE138852_covariates.csv.gz"

EXPECTED = {
    "seaad_mtg", "grubman2019", "mathys2019", "lau2020", "morabito2021", "gerrits2021", "leng2021",
    "sadick2022", "kerenshaul2017", "zhou2020",
}

PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, size=200_003, dtype=np.uint8))
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# --------------------------------------------------------------------------------------------------
# a loopback HTTP server that honours (or, on request, ignores) Range


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    seen: list[dict] = []
    honour_range = True
    truncate_after: int | None = None  # promise the whole body, send only this many bytes, hang up

    def do_GET(self):  # noqa: N802 (http.server's name)
        body = self.files.get(self.path)
        rng = self.headers.get("Range")
        record = {"path": self.path, "range": rng, "status": None, "sent": 0}
        self.seen.append(record)
        if body is None:
            record["status"] = 404
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if match and self.honour_range:
            start = int(match.group(1))
            if start >= len(body):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            record["status"] = 206
        else:
            self.send_response(200)
            record["status"] = 200
        chunk = body[start:]
        self.send_header("Content-Length", str(len(chunk)))
        self.end_headers()
        if self.truncate_after is not None:
            chunk = chunk[: self.truncate_after]
            self.close_connection = True
        # recorded before writing: the client can finish reading (and the test look) before write() returns here
        record["sent"] = len(chunk)
        self.wfile.write(chunk)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"files": {"/data/payload.bin": PAYLOAD}, "seen": [],
                                            "honour_range": True, "truncate_after": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _manifest(url: str | None, sha: str | None = PAYLOAD_SHA, **extra) -> dict:
    """An open-access manifest with one downloadable file, built from grubman2019's fields."""
    m = copy.deepcopy(manifests.load_manifest("grubman2019"))
    m.update(name="testset", unverified=[], **extra)
    m["files"] = [{
        "name": "payload.bin", "url": url, "sha256": sha, "size": None, "description": "test payload",
        "raw_counts_location": None, "role": "other",
    }]
    return m


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# manifests and schema


def test_every_manifest_validates_and_lists():
    files = sorted(p.stem for p in REPO_MANIFESTS.glob("*.json") if p.name != "schema.json")
    assert set(files) == EXPECTED
    for name in files:
        m = manifests.load_manifest(name)
        assert m["name"] == name
        assert set(m["columns"]) == set(manifests.STANDARD_COLUMNS)
        assert set(v for v in m["condition_values"].values()) <= {"AD", "control", None}
    table = manifests.list_manifests()
    assert set(table["name"]) == EXPECTED
    access = dict(zip(table["name"], table["access"]))
    assert access["mathys2019"] == "controlled" and access["seaad_mtg"] == "open"
    assert dict(zip(table["name"], table["species"]))["kerenshaul2017"] == "mouse"


def test_schema_file_is_json_schema_shaped():
    schema = json.loads((REPO_MANIFESTS / "schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert {"name", "access", "files", "columns", "condition_values", "verified"} <= set(schema["required"])
    assert schema["properties"]["access"]["enum"] == ["open", "controlled"]


def test_manifests_hold_no_credentials():
    for path in REPO_MANIFESTS.glob("*.json"):
        text = path.read_text().lower()
        for word in ("password", "x-amz-signature", "token=", "apikey", "api_key", "@synapse"):
            assert word not in text, (path.name, word)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (lambda m: m.pop("citation"), "citation", "missing required field"),
        (lambda m: m.update(access="public"), "access", '"open", "controlled"'),
        (lambda m: m["files"][0].update(sha256="abc"), "files[0].sha256", "does not match"),
        (lambda m: m["files"][0].update(name="../evil.h5ad"), "files[0].name", "path separator"),
        (lambda m: m["files"][0].update(url="https://user:pw@example.org/x"), "files[0].url", "password"),
        (lambda m: m["columns"].update(cell_type=3), "columns.cell_type", "expected null or a string or a list"),
        (lambda m: m["condition_values"].update(ct="healthy"), "condition_values.ct", '"AD", "control", null'),
        (lambda m: m.update(licnce="x"), "licnce", "did you mean 'licence'"),
        (lambda m: m.update(access="controlled", access_instructions=None), "access_instructions", "required"),
    ],
)
def test_broken_manifest_names_file_and_field(tmp_path, monkeypatch, change, field, words):
    m = json.loads((REPO_MANIFESTS / "grubman2019.json").read_text())
    change(m)
    (tmp_path / "grubman2019.json").write_text(json.dumps(m))
    monkeypatch.setenv(manifests.ENV_VAR, str(tmp_path))
    with pytest.raises(DataError) as info:
        manifests.load_manifest("grubman2019")
    message = str(info.value)
    assert "grubman2019.json" in message
    assert f"{field}:" in message
    assert words in message
    assert "\n" not in message


def test_manifest_name_must_match_file(tmp_path, monkeypatch):
    m = json.loads((REPO_MANIFESTS / "grubman2019.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps(m))
    monkeypatch.setenv(manifests.ENV_VAR, str(tmp_path))
    with pytest.raises(DataError, match=r"other\.json: invalid manifest: name: 'grubman2019' must equal"):
        manifests.load_manifest("other")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(DataError, match="did you mean grubman2019") as info:
        manifests.load_manifest("grubmann")
    assert "scsuperweight data list" in str(info.value)
    with pytest.raises(DataError, match="seaad_mtg"):
        manifests.load_manifest("seaad")


def test_manifest_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(manifests.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="SSW_MANIFESTS=.*not a folder"):
        manifests.manifest_dir()
    monkeypatch.setenv(manifests.ENV_VAR, str(tmp_path))
    assert manifests.manifest_dir() == tmp_path
    assert manifests.list_manifests().empty
    monkeypatch.delenv(manifests.ENV_VAR)
    assert manifests.manifest_dir() == REPO_MANIFESTS


# --------------------------------------------------------------------------------------------------
# fetch


def test_fetch_whole_file(server, tmp_path):
    base, handler = server
    path = manifests.fetch(_manifest(f"{base}/data/payload.bin"), tmp_path, progress=False)
    assert path == tmp_path.resolve() / "payload.bin"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "payload.bin.part").exists()
    assert [r["range"] for r in handler.seen] == [None]


def test_fetch_resumes_a_partial_download_with_range(server, tmp_path):
    base, handler = server
    half = len(PAYLOAD) // 2
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD[:half])
    path = manifests.fetch(_manifest(f"{base}/data/payload.bin"), tmp_path, progress=False)
    assert handler.seen == [{"path": "/data/payload.bin", "range": f"bytes={half}-", "status": 206,
                             "sent": len(PAYLOAD) - half}]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PAYLOAD_SHA
    assert not (tmp_path / "payload.bin.part").exists()


def test_fetch_interrupted_then_resumed(server, tmp_path):
    base, handler = server
    handler.truncate_after = 70_000
    manifest = _manifest(f"{base}/data/payload.bin")
    with pytest.raises(DataError, match="stopped after 70000 .*run the same command again to resume") as info:
        manifests.fetch(manifest, tmp_path, progress=False)
    assert "\n" not in str(info.value)
    assert (tmp_path / "payload.bin.part").stat().st_size == 70_000
    assert not (tmp_path / "payload.bin").exists()
    handler.truncate_after = None
    path = manifests.fetch(manifest, tmp_path, progress=False)
    assert handler.seen[-1]["range"] == "bytes=70000-" and handler.seen[-1]["status"] == 206
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PAYLOAD_SHA


def test_fetch_restarts_when_the_server_ignores_range(server, tmp_path):
    base, handler = server
    handler.honour_range = False
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD[:1000])
    path = manifests.fetch(_manifest(f"{base}/data/payload.bin"), tmp_path, progress=False)
    assert handler.seen[0]["range"] == "bytes=1000-" and handler.seen[0]["status"] == 200
    assert path.read_bytes() == PAYLOAD  # the prefix was not written twice


def test_fetch_complete_part_file_answered_416(server, tmp_path):
    base, handler = server
    (tmp_path / "payload.bin.part").write_bytes(PAYLOAD)
    path = manifests.fetch(_manifest(f"{base}/data/payload.bin"), tmp_path, progress=False)
    assert [r["status"] for r in handler.seen] == [416]
    assert path.read_bytes() == PAYLOAD


def test_fetch_checksum_mismatch_leaves_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(DataError, match="checksum mismatch for payload.bin") as info:
        manifests.fetch(_manifest(f"{base}/data/payload.bin", sha="0" * 64), tmp_path, progress=False)
    assert PAYLOAD_SHA in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_fetch_skips_an_existing_verified_file(server, tmp_path):
    base, handler = server
    (tmp_path / "payload.bin").write_bytes(PAYLOAD)
    manifests.fetch(_manifest(f"{base}/data/payload.bin"), tmp_path, progress=False)
    assert handler.seen == []


@pytest.mark.parametrize("bad", ["..%2F..%2Fevil.bin", "%2Fetc%2Fpasswd", "..", "a%5Cb.bin"])
def test_fetch_refuses_names_outside_dest(server, tmp_path, bad):
    base, handler = server
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="refusing to write"):
        manifests.fetch(_manifest(None), dest, url=f"{base}/data/{bad}", progress=False)
    assert handler.seen == []
    assert not dest.exists() or list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["dest"])


def test_fetch_refuses_traversal_in_a_dict_manifest(tmp_path, no_network):
    m = _manifest("http://127.0.0.1:9/x")
    m["files"][0]["name"] = "../../escape.bin"
    with pytest.raises(DataError, match=r"files\[0\]\.name: '\.\./\.\./escape\.bin' is refused"):
        manifests.fetch(m, tmp_path, progress=False)


def test_fetch_unreachable_server_gives_one_clear_line(tmp_path):
    port = _closed_port()
    with pytest.raises(DataError) as info:
        manifests.fetch(_manifest(f"http://127.0.0.1:{port}/data/payload.bin"), tmp_path, progress=False,
                        timeout=5)
    message = str(info.value)
    assert message.startswith("could not reach 127.0.0.1: ")
    assert f"download it by hand to {tmp_path.resolve() / 'payload.bin'}" in message
    assert "`scsuperweight data validate testset" in message
    assert "\n" not in message
    assert not (tmp_path / "payload.bin").exists()


def test_fetch_http_error(server, tmp_path):
    base, _ = server
    with pytest.raises(DataError, match=r"answered HTTP 404"):
        manifests.fetch(_manifest(f"{base}/data/missing.bin"), tmp_path, progress=False)


def test_fetch_controlled_dataset_gives_instructions_without_network(tmp_path, no_network):
    with pytest.raises(ControlledAccessError) as info:
        manifests.fetch("mathys2019", tmp_path)
    assert "controlled-access" in str(info.value)
    assert "synapse.org" in str(info.value) and "syn18485175" in str(info.value)
    assert "Synapse account" in info.value.instructions
    assert isinstance(info.value, DataError)
    assert list(tmp_path.iterdir()) == []


def test_fetch_without_url_says_where_to_look(tmp_path, no_network):
    with pytest.raises(DataError, match=r"no download URL is recorded .*--url URL"):
        manifests.fetch("seaad_mtg", tmp_path)
    with pytest.raises(DataError, match="2 downloadable files"):
        manifests.fetch("grubman2019", tmp_path)
    with pytest.raises(DataError, match="did you mean 'GSE138852_counts.csv.gz'"):
        manifests.fetch("grubman2019", tmp_path, file="GSE138852_count.csv.gz")


def test_fetch_with_url_for_a_pattern_entry(server, tmp_path, monkeypatch):
    base, handler = server
    handler.files["/MTG/RNAseq/donors_objects/H20.33.001.h5ad"] = b"donor-bytes"
    path = manifests.fetch("seaad_mtg", tmp_path, url=f"{base}/MTG/RNAseq/donors_objects/H20.33.001.h5ad",
                           progress=False)
    assert path.name == "H20.33.001.h5ad" and path.read_bytes() == b"donor-bytes"


# --------------------------------------------------------------------------------------------------
# harmonisation


def _seaad_like(x_log: bool = True) -> ad.AnnData:
    """Six cells with SEA-AD's column names: X log-normalised, counts in layers['UMIs']."""
    rng = np.random.default_rng(1)
    counts = rng.poisson(3, size=(6, 4)).astype(np.float32)
    obs = pd.DataFrame({
        "Subclass": ["Astrocyte", "Microglia-PVM", "L2/3 IT", "Astrocyte", "Oligodendrocyte", "Sst"],
        "Overall AD neuropathological Change": ["Not AD", "low", "Intermediate", "High", "High", "Unknown"],
        "Donor ID": ["H1", "H1", "H2", "H3", "H3", "H4"],
        "Braak": ["Braak II", "Braak II", "Braak IV", "Braak VI", "Braak VI", "Braak V"],
        "Sex": ["Female", "Female", "Male", "Female", "Female", "Male"],
        "Age at Death": ["90+ years", "90+ years", "88", "79", "79", "85"],
    }, index=[f"cell{i}" for i in range(6)])
    X = np.log1p(counts) if x_log else counts
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["APOE", "GFAP", "AQP4", "TREM2"]),
                      layers={"UMIs": counts})


def test_harmonize_seaad_like_maps_condition_and_finds_counts_in_layer():
    adata = _seaad_like()
    report = manifests.harmonize(adata, "seaad_mtg")
    assert adata.obs["condition"].astype(object).tolist() == ["control", "control", "AD", "AD", "AD", np.nan]
    assert report["condition"]["AD"] == 3 and report["condition"]["control"] == 2
    assert report["condition"]["unmapped"] == {"Unknown": 1}  # 'low' matched 'Low' case-insensitively
    assert adata.obs["donor"].tolist() == ["H1", "H1", "H2", "H3", "H3", "H4"]
    assert adata.obs["cell_type"].tolist()[1] == "Microglia-PVM"
    assert adata.obs["age"].tolist()[0] == "90+ years"
    assert report["counts"]["location"] == "layers['UMIs']" and report["counts"]["ok"]
    assert any("Unknown" in w for w in report["warnings"])
    json.dumps(report)  # plain values only


def test_harmonize_rejects_normalised_counts_and_points_to_the_layer():
    adata = _seaad_like()
    with pytest.raises(DataError, match=r"X holds non-integer values .*layers\['UMIs'\]"):
        manifests.harmonize(adata, "seaad_mtg", counts_location="X")
    report = manifests.harmonize(_seaad_like(), "seaad_mtg", counts_location="X", strict=False)
    assert report["counts"]["ok"] is False and report["counts"]["alternatives"] == ["layers['UMIs']"]


def test_harmonize_condition_overrides_leave_cells_out():
    adata = _seaad_like()
    report = manifests.harmonize(adata, "seaad_mtg", condition_values={"Low": None, "Unknown": "AD"})
    assert report["condition"]["excluded"] == {"low": 1}
    assert report["condition"]["AD"] == 4 and report["condition"]["control"] == 1


def test_harmonize_missing_columns_lists_what_is_there():
    adata = _seaad_like()
    adata.obs = adata.obs.rename(columns={"Donor ID": "donor_name"})
    with pytest.raises(DataError) as info:
        manifests.harmonize(adata, "seaad_mtg")
    message = str(info.value)
    assert "donor (looked for 'Donor ID', 'donor_id')" in message
    assert "obs has: Subclass, Overall AD neuropathological Change, donor_name" in message
    assert "--map NAME=COLUMN" in message
    report = manifests.harmonize(adata, "seaad_mtg", columns={"donor": "donor_name"})
    assert report["columns"]["donor"]["source"] == "donor_name"


@pytest.fixture
def small48():
    if not SMALL48.is_file():
        pytest.skip(f"shared data not found at {SMALL48} (the ../shared checkout is absent)")
    return SMALL48


@pytest.fixture
def covariates():
    if not COVARIATES.is_file():
        pytest.skip(f"shared data not found at {COVARIATES} (the ../shared checkout is absent)")
    return COVARIATES


def test_validate_grubman_small48(small48):
    adata, report = manifests.validate(small48, "grubman2019")
    assert adata.n_obs == 48
    assert report["condition"] == {"source": "diagnosis", "AD": 11, "control": 37, "excluded": {},
                                   "unmapped": {}, "missing": 0}
    assert (adata.obs["condition"] == "AD").sum() == 11
    assert (adata.obs.loc[adata.obs["diagnosis"] == "ct", "condition"] == "control").all()
    assert report["columns"]["cell_type"]["source"] == "cell_type"
    assert report["columns"]["donor"]["source"] == "library"
    assert adata.obs["donor"].astype(str).equals(adata.obs["library"].astype(str))
    assert report["columns"]["braak"]["status"] == "not in manifest"
    assert report["counts"]["ok"] and report["counts"]["checked_cells"] == 48
    assert report["gene_ids"]["looks_like"] == "symbol"
    assert report["warnings"] == []


def test_validate_grubman_covariates_csv(covariates):
    adata, report = manifests.validate(covariates, "grubman2019")
    assert adata.n_obs == 13214 and adata.n_vars == 0
    assert report["condition"]["AD"] == 6673 and report["condition"]["control"] == 6541
    assert report["columns"]["cell_type"]["source"] == "oupSample.cellType"
    assert adata.obs["cell_type"].value_counts()["oligo"] == 7432
    # no donor column in the covariates: the donor pair comes from the barcode suffix
    assert report["columns"]["donor"]["source"].startswith("index_regex:")
    assert sorted(adata.obs["donor"].unique()) == ["AD1_AD2", "AD3_AD4", "AD5_AD6", "Ct1_Ct2", "Ct3_Ct4", "Ct5_Ct6"]
    assert report["counts"]["checked"] is False


def test_validate_joins_an_obs_table(small48, covariates, tmp_path):
    adata = ad.read_h5ad(small48)
    adata.obs = adata.obs[[]]  # counts only, as the GEO counts file would give
    bare = tmp_path / "bare.h5ad"
    adata.write_h5ad(bare)
    adata, report = manifests.validate(bare, "grubman2019", obs=covariates)
    assert report["obs_join"]["matched"] == 48
    assert report["columns"]["condition"]["source"] == "oupSample.batchCond"
    assert (adata.obs["condition"] == "AD").sum() == 11


def test_validate_counts_csv_genes_by_cells(tmp_path):
    counts = pd.DataFrame([[1, 0, 3], [0, 2, 5]], index=["APOE", "GFAP"],
                          columns=["AAAC_AD1_AD2", "CCCG_Ct1_Ct2", "GGGT_Ct1_Ct2"])
    path = tmp_path / "GSE138852_counts.csv.gz"
    counts.to_csv(path)
    cov = pd.DataFrame({"oupSample.batchCond": ["AD", "ct", "ct"], "oupSample.cellType": ["astro", "mg", "oligo"]},
                       index=counts.columns)
    cov_path = tmp_path / "GSE138852_covariates.csv.gz"
    cov.to_csv(cov_path)
    adata, report = manifests.validate(path, "grubman2019", obs=cov_path)
    assert adata.shape == (3, 2)
    assert adata.X.toarray().tolist() == [[1, 0], [0, 2], [3, 5]]
    assert adata.obs["condition"].tolist() == ["AD", "control", "control"]
    assert adata.obs["donor"].tolist() == ["AD1_AD2", "Ct1_Ct2", "Ct1_Ct2"]
    assert report["counts"]["ok"]


# --------------------------------------------------------------------------------------------------
# CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scsuperweight")
    _cli_data.add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("argv", [["data"], ["data", "list"], ["data", "fetch"], ["data", "validate"]])
def test_cli_help_has_examples(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _cli([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "scsuperweight data" in out


def test_cli_list(capsys):
    assert _cli(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out
    assert _cli(["data", "list", "mathys2019"]) == 0
    assert "Synapse account" in capsys.readouterr().out


def test_cli_fetch(server, tmp_path, monkeypatch, capsys):
    base, _ = server
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "testset.json").write_text(json.dumps(_manifest(f"{base}/data/payload.bin")))
    monkeypatch.setenv(manifests.ENV_VAR, str(folder))
    assert _cli(["data", "fetch", "testset", "--dest", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "payload.bin").read_bytes() == PAYLOAD
    assert str(tmp_path / "out" / "payload.bin") in capsys.readouterr().out


def test_cli_fetch_controlled_raises_data_error(tmp_path, no_network):
    with pytest.raises(DataError, match="controlled-access"):
        _cli(["data", "fetch", "mathys2019", "--dest", str(tmp_path)])


def test_cli_validate_writes_harmonised_h5ad(small48, tmp_path, capsys):
    out = tmp_path / "g.h5ad"
    report = tmp_path / "r.json"
    assert _cli(["data", "validate", "grubman2019", str(small48), "--out", str(out), "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "condition: AD 11, control 37" in text
    back = ad.read_h5ad(out)
    assert (back.obs["condition"] == "AD").sum() == 11
    assert json.loads(report.read_text())["condition"]["control"] == 37


def test_cli_validate_bad_pairs(small48):
    with pytest.raises(DataError, match="expected KEY=VALUE"):
        _cli(["data", "validate", "grubman2019", str(small48), "--map", "condition"])
    with pytest.raises(DataError, match="not a standard column"):
        _cli(["data", "validate", "grubman2019", str(small48), "--map", "disease=diagnosis"])
    with pytest.raises(DataError, match="AD, control or none"):
        _cli(["data", "validate", "grubman2019", str(small48), "--condition-value", "ct=healthy"])
