"""Over-representation analysis of many gene lists at once, with gseapy.enrich's statistics.

For each library and each query (a gene list), with background U of size N (the library's
genes by default; a given gene list, which also restricts every set to U; or a given number):

1. Genes are mapped to one sorted vocabulary; a query's duplicates count once. Q is the
   query x gene 0/1 matrix, M the gene x term 0/1 matrix with rows outside U zeroed (sparse).
2. k = |query & U| (the whole query when N is a number), m = |term & U|, and the overlaps
   X = Q @ M, one sparse product; a term with x = 0 is not reported.
3. For the distinct (x, m, k) triples only:
       p  = P(X >= x) = hypergeom.sf(x - 1, N, m, k)                       (hypergeometric tail)
       OR = ((x + 1/2)(N - m - k + x + 1/2)) / ((m - x + 1/2)(k - x + 1/2))  (Haldane-corrected)
       combined score = -ln(p) * OR                        (infinite when p underflows to 0)
   evaluated with the same floating-point operations as gseapy, so results agree bit for bit.
4. Benjamini-Hochberg FDR per query per library over its reported terms: with the p-values
   sorted ascending and ranked i = 1..n, q_(i) = min_{j >= i} p_(j) n / j, capped at 1.
5. The overlap genes of each (query, term) pair come from expanding every (query, gene) entry
   of Q over the gene's terms and sorting by (query, term, gene); they are joined with ";" in
   sorted order (gseapy joins them in set order, so compare them as sets).

Differences from gseapy.enrich: genes are matched case-sensitively (gseapy upper-cases a
mostly lower-case query when the library is upper-case, and reads all-digit queries as Entrez
ids), and a query that is empty or shares no gene with the background gives no rows and a
logged warning instead of an exception.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import hypergeom

from c2srepro.enrichment.libraries import GeneSetLibrary, load_library

log = logging.getLogger(__name__)

COLUMNS = [
    "query",
    "Gene_set",
    "Term",
    "Overlap",
    "P-value",
    "Adjusted P-value",
    "Odds Ratio",
    "Combined Score",
    "Genes",
]
SINGLE_QUERY_NAME = "query"
_HALDANE = 0.5


def enrich(
    gene_lists: Mapping[object, Sequence[str]] | Sequence[str],
    library: GeneSetLibrary | str | Sequence[GeneSetLibrary | str],
    *,
    background: Sequence[str] | int | None = None,
    with_genes: bool = True,
) -> pd.DataFrame:
    """Hypergeometric over-representation of every gene list in every library.

    ``gene_lists`` is ``{name: genes}`` or one list of genes (named ``"query"``); ``library``
    one library, a name for ``load_library``, or several. ``background`` is None (each
    library's own genes), a gene list (also filters the sets) or a number of genes.
    Returns one row per (query, library, term) with x >= 1, sorted by query (input order),
    library (input order) and term, in gseapy's columns plus ``query``; ``with_genes=False``
    leaves the ``Genes`` column empty to save time and memory on very large runs.
    """
    names, queries = _normalise_queries(gene_lists)
    libraries = _normalise_libraries(library)
    bg_genes, bg_size = _normalise_background(background)

    # 1. One vocabulary for queries, libraries and background, sorted so that index order is
    #    symbol order (the Genes column comes out sorted without another sort).
    pieces = [np.array(sorted(lib.genes), dtype=object) for lib in libraries]
    flat = np.array([g for genes in queries for g in genes], dtype=object)
    pieces.append(flat)
    if bg_genes is not None:
        pieces.append(np.array(sorted(bg_genes), dtype=object))
    vocab = pd.Index(np.unique(np.concatenate(pieces)))
    q_rows = np.repeat(np.arange(len(queries), dtype=np.int64), [len(g) for g in queries])
    q_cols = vocab.get_indexer(flat)
    # Duplicates within a query collapse because the CSR conversion sums them; clip back to 1.
    Q = sp.csr_matrix(
        (np.ones(len(flat), dtype=np.int32), (q_rows, q_cols)), shape=(len(queries), len(vocab))
    )
    Q.sum_duplicates()
    Q.data[:] = 1

    empty = [names[i] for i, genes in enumerate(queries) if not genes]
    if empty:
        log.warning(
            "enrich: %d of %d gene lists are empty (e.g. %s); they get no rows", len(empty), len(names), empty[:5]
        )

    # Names may be any hashable (tuples too): fill an object array element by element.
    name_array = np.empty(len(names), dtype=object)
    for i, name in enumerate(names):
        name_array[i] = name
    frames = [
        _enrich_library(Q, vocab, name_array, lib, bg_genes, bg_size, with_genes=with_genes, lib_pos=pos)
        for pos, lib in enumerate(libraries)
    ]
    order_keys = [f.pop("_order") for f in frames]
    columns = {c: np.concatenate([f[c] for f in frames]) for c in frames[0]}
    order = np.argsort(np.concatenate(order_keys), kind="stable")
    table = pd.DataFrame({c: v[order] for c, v in columns.items()}, columns=COLUMNS)
    return table.reset_index(drop=True)


def _normalise_queries(gene_lists: Mapping | Sequence[str]) -> tuple[list, list[list[str]]]:
    if isinstance(gene_lists, str):
        raise ValueError("enrich: gene_lists is one string; pass a list of genes or a dict {name: genes}")
    if isinstance(gene_lists, Mapping):
        items = list(gene_lists.items())
    else:
        items = [(SINGLE_QUERY_NAME, gene_lists)]
    names, queries = [], []
    for name, genes in items:
        if isinstance(genes, str):
            raise ValueError(f"enrich: gene list {name!r} is one string; split it into genes")
        try:
            # gseapy strips whitespace around each gene; keep that so symbols match the same way.
            cleaned = [g.strip() for g in genes]
        except (AttributeError, TypeError):
            raise ValueError(
                f"enrich: gene list {name!r} holds non-string entries (first: "
                f"{next((g for g in genes if not isinstance(g, str)), None)!r}); pass gene symbols as "
                "strings, or a dict {name: genes} for several lists"
            ) from None
        names.append(name)
        queries.append([g for g in cleaned if g])
    return names, queries


def _normalise_libraries(library) -> list[GeneSetLibrary]:
    if isinstance(library, (GeneSetLibrary, str)):
        library = [library]
    libraries = [load_library(lib) if isinstance(lib, str) else lib for lib in library]
    if not libraries:
        raise ValueError("enrich: no gene set library given")
    for lib in libraries:
        if not isinstance(lib, GeneSetLibrary):
            raise ValueError(f"enrich: expected GeneSetLibrary objects or names, got {type(lib).__name__}")
    seen = [lib.name for lib in libraries]
    if len(set(seen)) < len(seen):
        raise ValueError(f"enrich: library names must be distinct (they fill the Gene_set column), got {seen}")
    return libraries


def _normalise_background(background) -> tuple[frozenset[str] | None, int | None]:
    if background is None:
        return None, None
    if isinstance(background, (bool, np.bool_)):
        raise ValueError("enrich: background must be None, a list of genes or a number of genes, not a bool")
    if isinstance(background, (int, np.integer)):
        if background < 1:
            raise ValueError(f"enrich: background size must be positive, got {background}")
        return None, int(background)
    if isinstance(background, str):
        raise ValueError(
            "enrich: background is one string; pass a list of genes (gseapy's BioMart names need internet)"
        )
    genes = frozenset(background)
    if not genes:
        raise ValueError("enrich: background gene list is empty; pass None to use each library's genes")
    return genes, None


def _enrich_library(
    Q: sp.csr_matrix,
    vocab: pd.Index,
    names: np.ndarray,
    lib: GeneSetLibrary,
    bg_genes: frozenset[str] | None,
    bg_size: int | None,
    *,
    with_genes: bool,
    lib_pos: int,
) -> dict[str, np.ndarray]:
    n_queries = Q.shape[0]
    M = lib.to_membership(vocab)  # [genes, terms]
    in_bg = np.zeros(len(vocab), dtype=np.int32)
    if bg_genes is not None:
        in_bg[vocab.get_indexer(sorted(bg_genes))] = 1
        if not in_bg[vocab.get_indexer(sorted(lib.genes))].any():
            raise ValueError(
                f"enrich: the background shares no gene with library {lib.name!r}; check that both use "
                "the same identifiers (symbols vs Ensembl ids)"
            )
        M = (sp.diags(in_bg, dtype=np.int32) @ M).tocsr()
        M.eliminate_zeros()
        N = len(bg_genes)
    else:
        in_bg[vocab.get_indexer(sorted(lib.genes))] = 1
        N = bg_size if bg_size is not None else len(lib.genes)
    m_term = np.asarray(M.sum(axis=0)).ravel().astype(np.int64)  # [terms]

    # 2. k per query: the part of the query inside the background (all of it for a number).
    if bg_size is not None:
        if bg_size < len(lib.genes):
            raise ValueError(
                f"enrich: background size {bg_size} is smaller than library {lib.name!r}'s "
                f"{len(lib.genes)} genes; pass a larger number or a gene list"
            )
        k_query = np.diff(Q.indptr).astype(np.int64)
        if (k_query > N).any():
            raise ValueError(f"enrich: a gene list has more genes than the background size {N}")
    else:
        k_query = (Q @ in_bg).astype(np.int64)  # [queries]
    lost = names[(k_query == 0) & (np.diff(Q.indptr) > 0)].tolist()
    if lost:
        log.warning(
            "enrich: %d of %d gene lists share no gene with the background of %s (e.g. %s); they get no rows for it",
            len(lost),
            n_queries,
            lib.name,
            lost[:5],
        )

    X = (Q @ M).tocsr()  # [queries, terms] overlap counts x
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    q_idx = np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(X.indptr))
    t_idx = X.indices.astype(np.int64)
    x = X.data.astype(np.int64)
    m = m_term[t_idx]
    k = k_query[q_idx]

    # 3. Statistics for the distinct (x, m, k) triples, broadcast back to all pairs.
    key = (x * (int(m_term.max(initial=0)) + 1) + m) * (int(k_query.max(initial=0)) + 1) + k
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    ux, um, uk = x[first], m[first], k[first]
    u_p = hypergeom.sf(ux - 1, N, um, uk)
    # Same operation order as gseapy (integer part first, then + 0.5) for identical floats.
    u_or = ((ux + _HALDANE) * (N - um - uk + ux + _HALDANE)) / ((um - ux + _HALDANE) * (uk - ux + _HALDANE))
    with np.errstate(divide="ignore"):
        u_cs = -1 * np.log(u_p) * u_or
    u_overlap = np.array([f"{a}/{b}" for a, b in zip(ux.tolist(), um.tolist())], dtype=object)
    p = u_p[inverse]

    return {
        "query": names[q_idx],
        "Gene_set": np.full(len(q_idx), lib.name, dtype=object),
        "Term": np.array(lib.terms, dtype=object)[t_idx],
        "Overlap": u_overlap[inverse],
        "P-value": p,
        "Adjusted P-value": _bh_per_query(p, q_idx),
        "Odds Ratio": u_or[inverse],
        "Combined Score": u_cs[inverse],
        "Genes": _overlap_genes(Q, M, vocab, x) if with_genes else np.full(len(q_idx), "", dtype=object),
        "_order": q_idx * 65536 + lib_pos,
    }


def _bh_per_query(p: np.ndarray, q_idx: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg within each query's reported terms (gseapy's fdrcorrection, grouped)."""
    if len(p) == 0:
        return p.copy()
    order = np.lexsort((p, q_idx))
    q_sorted = q_idx[order]
    starts = np.flatnonzero(np.r_[True, q_sorted[1:] != q_sorted[:-1]])
    sizes = np.diff(np.r_[starts, len(p)])
    rank = np.arange(len(p)) - np.repeat(starts, sizes) + 1
    n = np.repeat(sizes, sizes)
    raw = p[order] / (rank / n.astype(np.float64))  # eq. (BH): p_(i) n / i
    # Running minimum from the largest rank down, restarted at each query.
    reversed_min = pd.Series(raw[::-1]).groupby(q_sorted[::-1]).cummin().to_numpy()[::-1]
    fdr = np.empty_like(p)
    fdr[order] = np.minimum(reversed_min, 1.0)
    return fdr


def _overlap_genes(Q: sp.csr_matrix, M: sp.csr_matrix, vocab: pd.Index, x: np.ndarray) -> np.ndarray:
    """';'-joined overlap genes per reported (query, term), in the (query, term) order of X."""
    n_terms = M.shape[1]
    n_genes = M.shape[0]
    g_of = Q.indices.astype(np.int64)
    q_of = np.repeat(np.arange(Q.shape[0], dtype=np.int64), np.diff(Q.indptr))
    fan = np.diff(M.indptr)[g_of]  # terms per (query, gene) entry
    total = int(fan.sum())
    if total == 0:
        return np.array([], dtype=object)
    starts = np.repeat(M.indptr[g_of].astype(np.int64), fan)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(fan) - fan, fan)
    t_exp = M.indices[starts + offsets].astype(np.int64)
    key = (np.repeat(q_of, fan) * n_terms + t_exp) * n_genes + np.repeat(g_of, fan)
    key.sort()
    genes = vocab.to_numpy(dtype=object)[key % n_genes]
    # One string for everything: ";" between genes of a pair, "\0" after each pair's last gene.
    last = np.zeros(total, dtype=bool)
    last[np.cumsum(x) - 1] = True
    seps = np.full(total, ";", dtype=object)  # object dtype: a numpy str would drop a trailing NUL
    seps[last] = "\0"
    interleaved = np.empty(2 * total, dtype=object)
    interleaved[0::2] = genes
    interleaved[1::2] = seps
    joined = "".join(interleaved.tolist()).split("\0")[:-1]
    return np.array(joined, dtype=object)
