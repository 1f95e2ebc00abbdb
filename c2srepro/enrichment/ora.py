"""Over-representation analysis of many gene lists at once, with gseapy.enrich's statistics.

For each library and each query (a gene list), with background U of size N (the library's
genes by default; a given gene list, which also restricts every set to U; or a given number):

1. Case, as gseapy decides it: a query that is not all Entrez ids and whose stripped entries
   are less than 90% upper case (``str.isupper``, blanks and duplicates counted) is upper-cased
   against a library whose first 10 sets (in term order, the order ``to_dict`` gives gseapy)
   are each at least 90% upper case, and U is upper-cased with it (the library's genes
   upper-cased when no background is given, so set members that are not upper case drop out of
   the sets). Any other query is matched case-sensitively.
2. Each library's sorted gene index and gene x term 0/1 matrix M are built once and kept on the
   library object (and M restricted to each of the last few gene-list backgrounds), so a call
   costs only its queries. A query's genes map to M's rows; its duplicates count once. Q is the
   query x gene 0/1 matrix.
3. k = |query & U| (the whole query when N is a number), m = |term & U|, and the overlaps
   X = Q @ M, one sparse product; a term with x = 0 is not reported.
4. For the distinct (x, m, k) triples only:
       p  = P(X >= x) = hypergeom.sf(x - 1, N, m, k)                       (hypergeometric tail)
       OR = ((x + 1/2)(N - m - k + x + 1/2)) / ((m - x + 1/2)(k - x + 1/2))  (Haldane-corrected)
       combined score = -ln(p) * OR                        (infinite when p underflows to 0)
   evaluated with the same floating-point operations as gseapy, so results agree bit for bit.
5. Benjamini-Hochberg FDR per query per library over its reported terms: with the p-values
   sorted ascending and ranked i = 1..n, q_(i) = min_{j >= i} p_(j) n / j, capped at 1.
6. The overlap genes of each (query, term) pair come from expanding every (query, gene) entry
   of Q over the gene's terms and sorting by (query, term, gene); they are joined with ";" in
   sorted order (gseapy joins them in set order, so compare them as sets).
7. ``enrich_best`` keeps, per (query, library), only the row with the smallest FDR (then the
   largest combined score, then the first term), testing the lists in chunks: memory stays
   bounded however many lists there are (Table 4 at the paper's scale has 47 million rows), and
   the FDR comes from one sort per chunk instead of step 5's per-query cumulative minimum
   (``_best_rows``); the values are step 5's, bit for bit.

Differences from gseapy.enrich: an all-Entrez-id query is matched as strings (gseapy converts
it and the library to integers, and fails on a library of symbols); blank entries are dropped
(gseapy keeps one empty string, which counts in k when the background is a number, though
blanks do count in step 1's case rule here too); a query that is empty or shares no gene with
the background gives no rows and a logged warning instead of an exception; a gene-list
background that shares no gene with a library is an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from jaxtyping import Float, Int
from scipy.stats import hypergeom

from c2srepro.enrichment.libraries import GeneSetLibrary, PreparedSets, is_entrez_id, is_upper_case, load_library

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
# Tail probabilities kept between calls (see _TailCache); about 100 bytes each.
TAIL_CACHE_SIZE = 2**18
# Lists per chunk in enrich_best: ~240 (list, term) rows per 20-gene list against KEGG + GO BP,
# so about a million rows and ~100 MB of working arrays per chunk.
DEFAULT_CHUNK_SIZE = 4096
_KEY_BITS = 21  # m, k and x each below 2**21 genes pack into one int64 key


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
    library's own genes), a gene list (also filters the sets) or a number of genes. Genes are
    matched as gseapy matches them (see the module docstring for its case rule).
    Returns one row per (query, library, term) with x >= 1, sorted by query (input order),
    library (input order) and term, in gseapy's columns plus ``query``; ``with_genes=False``
    leaves the ``Genes`` column empty to save time and memory on very large runs.

    Pass ``GeneSetLibrary`` objects rather than names when calling repeatedly: a library
    prepares its matrices on first use and keeps them, while a name is loaded afresh each call.
    """
    names, queries, keeps_case = _normalise_queries(gene_lists)
    libraries = _normalise_libraries(library)
    bg_genes, bg_size = _normalise_background(background)
    _warn_empty(names, queries)
    return _enrich_lists(names, queries, keeps_case, libraries, bg_genes, bg_size, with_genes=with_genes, best=False)


def enrich_best(
    gene_lists: Mapping[object, Sequence[str]] | Sequence[str],
    library: GeneSetLibrary | str | Sequence[GeneSetLibrary | str],
    *,
    background: Sequence[str] | int | None = None,
    with_genes: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> pd.DataFrame:
    """The best term of every (gene list, library), without holding every (list, term) row.

    Takes ``enrich``'s arguments and returns, of the rows ``enrich`` would return, for each
    (query, Gene_set) the one with the smallest ``Adjusted P-value``, ties broken by the larger
    ``Combined Score``, then by the first term in sorted order; same columns and row order, the
    same values bit for bit. The lists are tested ``chunk_size`` at a time, so memory grows with
    ``chunk_size`` times the terms a list overlaps, not with the number of lists; the overlap
    genes are joined for the best rows only.
    """
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"enrich_best: chunk_size must be a positive integer (lists per chunk), got {chunk_size!r}")
    names, queries, keeps_case = _normalise_queries(gene_lists)
    libraries = _normalise_libraries(library)
    bg_genes, bg_size = _normalise_background(background)
    _warn_empty(names, queries)
    frames = [
        _enrich_lists(
            names[start : start + chunk_size],
            queries[start : start + chunk_size],
            keeps_case[start : start + chunk_size],
            libraries,
            bg_genes,
            bg_size,
            with_genes=with_genes,
            best=True,
        )
        for start in range(0, len(names), chunk_size)
    ]
    if not frames:
        return _empty_table()
    return pd.concat(frames, ignore_index=True)


def _warn_empty(names: list, queries: list[list[str]]) -> None:
    empty = [names[i] for i, genes in enumerate(queries) if not genes]
    if empty:
        log.warning(
            "enrich: %d of %d gene lists are empty (e.g. %s); they get no rows", len(empty), len(names), empty[:5]
        )


def _empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: np.array([], dtype=object) for c in COLUMNS})


def _enrich_lists(
    names: list,
    queries: list[list[str]],
    keeps_case: np.ndarray,
    libraries: list[GeneSetLibrary],
    bg_genes: frozenset[str] | None,
    bg_size: int | None,
    *,
    with_genes: bool,
    best: bool,
) -> pd.DataFrame:
    """``enrich``'s table for normalised inputs; ``best``: only each (query, library)'s best row."""
    # Names may be any hashable (tuples too): fill an object array element by element.
    name_array = np.empty(len(names), dtype=object)
    for i, name in enumerate(names):
        name_array[i] = name
    q_rows = np.repeat(np.arange(len(queries), dtype=np.int64), [len(g) for g in queries])
    flat = np.empty(len(q_rows), dtype=object)
    flat[:] = [g for genes in queries for g in genes]
    # gseapy upper-cases a given background with the query; made once, and only if needed.
    upper_bg = (
        frozenset(str(g).upper() for g in bg_genes)
        if bg_genes is not None and not keeps_case.all() and any(lib.upper_case for lib in libraries)
        else None
    )

    frames = []
    for pos, lib in enumerate(libraries):
        # 1. Queries gseapy would upper-case against this library form their own group.
        groups = [(keeps_case, False), (~keeps_case, True)] if lib.upper_case else [(np.ones_like(keeps_case), False)]
        for members, to_upper in groups:
            if not members.any():
                continue
            entries = members[q_rows]
            genes = flat[entries]
            if to_upper:
                genes = np.array([g.upper() for g in genes], dtype=object)
            prepared, size = _prepared_for(lib, upper_bg if to_upper else bg_genes, bg_size, to_upper=to_upper)
            local = np.cumsum(members) - 1  # global query index -> index within the group
            frame = _enrich_group(
                local[q_rows[entries]],
                genes,
                np.flatnonzero(members),
                name_array,
                lib,
                prepared,
                size,
                number_background=bg_size is not None,
                with_genes=with_genes,
                best=best,
            )
            frame["_order"] = frame.pop("_query") * len(libraries) + pos
            frames.append(frame)
    if not frames:
        return _empty_table()
    order_keys = [f.pop("_order") for f in frames]
    columns = {c: np.concatenate([f[c] for f in frames]) for c in frames[0]}
    order = np.argsort(np.concatenate(order_keys), kind="stable")
    return pd.DataFrame({c: columns[c][order] for c in COLUMNS}, copy=False)


def _prepared_for(
    lib: GeneSetLibrary, bg_genes: frozenset[str] | None, bg_size: int | None, *, to_upper: bool
) -> tuple[PreparedSets, int]:
    """The library's kept matrices for this background, and N."""
    if bg_size is not None:
        return lib.prepared, bg_size
    if bg_genes is not None:
        prepared = lib.prepared_within(bg_genes)
        return prepared, len(bg_genes)
    # No background: the library's genes, upper-cased for an upper-cased query. For a library
    # upper case throughout that is the same object, and only a mixed-case one needs restricted
    # matrices.
    universe = lib.upper_case_genes if to_upper else lib.genes
    return (lib.prepared if universe is lib.genes else lib.prepared_within(universe)), len(universe)


def _normalise_queries(gene_lists: Mapping | Sequence[str]) -> tuple[list, list[list[str]], np.ndarray]:
    """Names, stripped non-empty genes per list, and whether gseapy would keep each list's case."""
    if isinstance(gene_lists, str):
        raise ValueError("enrich: gene_lists is one string; pass a list of genes or a dict {name: genes}")
    if isinstance(gene_lists, Mapping):
        items = list(gene_lists.items())
    else:
        items = [(SINGLE_QUERY_NAME, gene_lists)]
    names, queries, keeps_case = [], [], []
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
        # gseapy judges the case on the stripped list as given (blanks and duplicates count)
        # and never changes the case of a list of Entrez ids.
        keeps_case.append(not cleaned or all(is_entrez_id(g) for g in cleaned) or is_upper_case(cleaned))
    return names, queries, np.array(keeps_case, dtype=bool)


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


def _enrich_group(
    rows: Int[np.ndarray, "entries"],
    genes: np.ndarray,
    query_ids: Int[np.ndarray, "queries"],
    names: np.ndarray,
    lib: GeneSetLibrary,
    prepared: PreparedSets,
    N: int,
    *,
    number_background: bool,
    with_genes: bool,
    best: bool,
) -> dict[str, np.ndarray]:
    """Rows for one library and the queries ``query_ids`` whose genes are ``genes`` at ``rows``
    (``best``: only each query's best row, see ``enrich_best``)."""
    n_queries = len(query_ids)
    n_lib = len(prepared.genes)
    if number_background and N < n_lib:
        raise ValueError(
            f"enrich: background size {N} is smaller than library {lib.name!r}'s "
            f"{n_lib} genes; pass a larger number or a gene list"
        )
    # 2. Distinct (query, gene) pairs, sorted by query; each distinct gene looked up once.
    codes, distinct = pd.factorize(genes)
    pairs = np.unique(rows * max(len(distinct), 1) + codes)
    q_of = pairs // max(len(distinct), 1)
    g_of = pairs % max(len(distinct), 1)
    lib_pos = prepared.genes.get_indexer(distinct)  # -1: not a library gene
    if number_background:
        in_bg = np.ones(len(distinct), dtype=bool)
    elif prepared.background is None:
        in_bg = lib_pos >= 0
    else:
        in_bg = np.fromiter((g in prepared.background for g in distinct), dtype=bool, count=len(distinct))
    # 3. k per query: the part of the query inside the background (all of it for a number).
    k_query = np.bincount(q_of[in_bg[g_of]], minlength=n_queries).astype(np.int64)
    if number_background and (k_query > N).any():
        raise ValueError(f"enrich: a gene list has more genes than the background size {N}")
    kept = (lib_pos[g_of] >= 0) & in_bg[g_of]
    Q = sp.csr_matrix(
        (
            np.ones(int(kept.sum()), dtype=np.int32),
            lib_pos[g_of[kept]],
            np.r_[0, np.cumsum(np.bincount(q_of[kept], minlength=n_queries))],
        ),
        shape=(n_queries, n_lib),
    )
    _warn_unmatched(
        names[query_ids],
        np.bincount(q_of, minlength=n_queries),
        k_query,
        np.diff(Q.indptr),
        lib,
        number_background=number_background,
    )

    M = prepared.membership
    X = (Q @ M).tocsr()  # [queries, terms] overlap counts x
    X.sum_duplicates()
    X.eliminate_zeros()
    X.sort_indices()
    q_idx = np.repeat(np.arange(n_queries, dtype=np.int64), np.diff(X.indptr))
    t_idx = X.indices.astype(np.int64)
    x = X.data.astype(np.int64)
    m_term = prepared.sizes
    m = m_term[t_idx]
    k = k_query[q_idx]

    # 4. Statistics for the distinct (x, m, k) triples, broadcast back to all pairs.
    key = (x * (int(m_term.max(initial=0)) + 1) + m) * (int(k_query.max(initial=0)) + 1) + k
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    ux, um, uk = x[first], m[first], k[first]
    u_p = _hypergeom_tail(ux, N, um, uk)
    # Same operation order as gseapy (integer part first, then + 0.5) for identical floats.
    u_or = ((ux + _HALDANE) * (N - um - uk + ux + _HALDANE)) / ((um - ux + _HALDANE) * (uk - ux + _HALDANE))
    with np.errstate(divide="ignore"):
        u_cs = -1 * np.log(u_p) * u_or
    u_overlap = np.array([f"{a}/{b}" for a, b in zip(ux.tolist(), um.tolist())], dtype=object)
    p = u_p[inverse]

    if best:
        level = np.unique(u_p, return_inverse=True)[1].reshape(-1)[inverse]
        picked, fdr = _best_rows(X.indptr, p, u_cs[inverse], level)
        q_sel, t_sel, triple = q_idx[picked], t_idx[picked], inverse[picked]
        return {
            "query": names[query_ids[q_sel]],
            "Gene_set": np.full(len(picked), lib.name, dtype=object),
            "Term": prepared.terms[t_sel],
            "Overlap": u_overlap[triple],
            "P-value": u_p[triple],
            "Adjusted P-value": fdr,
            "Odds Ratio": u_or[triple],
            "Combined Score": u_cs[triple],
            "Genes": (
                _pair_genes(Q, M, prepared.genes, q_sel, t_sel)
                if with_genes
                else np.full(len(picked), "", dtype=object)
            ),
            "_query": query_ids[q_sel],
        }
    return {
        "query": names[query_ids[q_idx]],
        "Gene_set": np.full(len(q_idx), lib.name, dtype=object),
        "Term": prepared.terms[t_idx],
        "Overlap": u_overlap[inverse],
        "P-value": p,
        "Adjusted P-value": _bh_per_query(p, q_idx),
        "Odds Ratio": u_or[inverse],
        "Combined Score": u_cs[inverse],
        "Genes": _overlap_genes(Q, M, prepared.genes, x) if with_genes else np.full(len(q_idx), "", dtype=object),
        "_query": query_ids[q_idx],
    }


class _TailCache:
    """``hypergeom.sf`` values by background size N, then by packed (m, k, x), shared by all calls.

    Boost's hypergeometric tail costs 50-75 microseconds per value at N ~ 10^4, most of a
    one-list call; lists of similar lengths against one library meet the same (x, m, k) again
    and again, and the values must stay scipy's own for results identical to gseapy. Emptied
    when full, so it never holds more than ``TAIL_CACHE_SIZE`` values.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_size: dict[int, dict[int, float]] = {}
        self.count = 0

    def clear(self) -> None:
        with self.lock:
            self.by_size = {}
            self.count = 0


_TAILS = _TailCache()


def _hypergeom_tail(
    x: Int[np.ndarray, "n"], N: int, m: Int[np.ndarray, "n"], k: Int[np.ndarray, "n"]
) -> np.ndarray:
    """P(X >= x) = ``hypergeom.sf(x - 1, N, m, k)``, computing only values not seen before."""
    if len(x) == 0 or max(int(m.max()), int(k.max())) >= 2**_KEY_BITS:
        return hypergeom.sf(x - 1, N, m, k)
    keys = ((m << _KEY_BITS | k) << _KEY_BITS | x).tolist()
    known = _TAILS.by_size.get(N, {})
    p = np.array([known.get(key, -1.0) for key in keys])
    missing = np.flatnonzero(p < 0)
    if len(missing):
        p[missing] = hypergeom.sf(x[missing] - 1, N, m[missing], k[missing])
        if len(missing) <= TAIL_CACHE_SIZE:
            with _TAILS.lock:
                if _TAILS.count + len(missing) > TAIL_CACHE_SIZE:
                    _TAILS.by_size, _TAILS.count = {}, 0
                table = _TAILS.by_size.setdefault(N, {})
                before = len(table)
                table.update(zip([keys[i] for i in missing.tolist()], p[missing].tolist()))
                _TAILS.count += len(table) - before
    return p


def _warn_unmatched(
    names: np.ndarray,
    n_genes: Int[np.ndarray, "queries"],
    k_query: Int[np.ndarray, "queries"],
    n_matched: Int[np.ndarray, "queries"],
    lib: GeneSetLibrary,
    *,
    number_background: bool,
) -> None:
    """Warn about gene lists that hold genes but cannot get a row."""
    outside = names[(n_genes > 0) & (k_query == 0)].tolist()
    # With a number as background every gene counts in k, so look at the library instead.
    unmatched = names[(n_genes > 0) & (n_matched == 0)].tolist() if number_background else []
    for lists, what in ((outside, f"the background of {lib.name}"), (unmatched, f"library {lib.name}")):
        if lists:
            log.warning(
                "enrich: %d of %d gene lists share no gene with %s (e.g. %s); they get no rows for it%s",
                len(lists),
                len(names),
                what,
                lists[:5],
                _case_hint(lib),
            )


def _case_hint(lib: GeneSetLibrary) -> str:
    # A library whose genes are not upper case (another species, other identifiers) is the
    # usual reason why an upper-case list matches nothing: say so.
    if lib.upper_case:
        return ""
    example = next((g for g in lib.prepared.genes if not g.isupper()), None)
    if example is None:
        return ""
    return (
        f"; {lib.name}'s genes are not upper case (e.g. {example!r}) and are matched case-sensitively, as "
        "gseapy does: check the species and the identifiers"
    )


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
    # Running minimum from the largest rank down, restarted at each query (one query, the
    # common one-list call, needs no grouping).
    if len(starts) == 1:
        reversed_min = np.minimum.accumulate(raw[::-1])[::-1]
    else:
        reversed_min = pd.Series(raw[::-1]).groupby(q_sorted[::-1]).cummin().to_numpy()[::-1]
    fdr = np.empty_like(p)
    fdr[order] = np.minimum(reversed_min, 1.0)
    return fdr


def _best_rows(
    indptr: Int[np.ndarray, "queries+1"],
    p: Float[np.ndarray, "rows"],
    score: Float[np.ndarray, "rows"],
    level: Int[np.ndarray, "rows"],
) -> tuple[Int[np.ndarray, "best"], Float[np.ndarray, "best"]]:
    """Per query with rows (``indptr`` delimits each query's rows), the row ``enrich_best`` keeps
    and its FDR; ``level`` ranks the distinct p-values (equal p, equal level).

    The smallest BH q-value of a query is min_j p_(j) n / j (capped at 1), because q_(i) is
    min_{j >= i} p_(j) n / j. Every term with p at most p_(J), J the largest minimising j, shares
    it, and no other term does. Within a run of equal p-values p n / j falls with j (or is 0
    throughout), so only a run's last rank, the count of the query's p-values <= p, can
    minimise: those counts come from one sort of (query, level) keys, instead of sorting every
    row by p and a cumulative minimum per query as ``_bh_per_query`` does. The arithmetic is
    ``_bh_per_query``'s, so the FDR is the same double.
    """
    counts = np.diff(indptr).astype(np.int64)
    sizes = counts[counts > 0]
    if len(sizes) == 0:
        return np.array([], dtype=np.int64), np.array([], dtype=np.float64)
    starts = np.cumsum(sizes) - sizes
    per_row = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    key = per_row * (int(level.max()) + 1) + level
    rank = np.searchsorted(np.sort(key), key, side="right") - starts[per_row]
    raw = p / (rank / sizes[per_row].astype(np.float64))
    smallest = np.minimum.reduceat(raw, starts)
    at_min = smallest[per_row]
    cutoff = np.maximum.reduceat(np.where(raw == at_min, level, -1), starts)
    # The cap at 1 moves no term across the minimum: min_j p_(j) n / j <= p_(n) <= 1.
    candidate = level <= cutoff[per_row]
    top_score = np.maximum.reduceat(np.where(candidate, score, -np.inf), starts)
    # Rows run in term order within a query: the first winner is the first term in sorted order.
    winners = np.flatnonzero(candidate & (score == top_score[per_row]))
    first = winners[np.r_[True, per_row[winners][1:] != per_row[winners][:-1]]]
    return first, np.minimum(smallest, 1.0)


def _pair_genes(
    Q: sp.csr_matrix, M: sp.csr_matrix, vocab: pd.Index, queries: np.ndarray, terms: np.ndarray
) -> np.ndarray:
    """';'-joined overlap genes of each (queries[i], terms[i]) pair, genes in sorted order."""
    if len(queries) == 0:
        return np.array([], dtype=object)
    shared = Q[queries].multiply(M.T.tocsr()[terms]).tocsr()
    shared.eliminate_zeros()
    shared.sort_indices()
    return _join_runs(vocab.to_numpy(dtype=object)[shared.indices], np.diff(shared.indptr))


def _join_runs(genes: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``genes`` cut into consecutive runs of ``lengths`` (each at least 1), each run ';'-joined."""
    total = len(genes)
    # One string for everything: ";" between genes of a run, "\0" after each run's last gene.
    last = np.zeros(total, dtype=bool)
    last[np.cumsum(lengths) - 1] = True
    seps = np.full(total, ";", dtype=object)  # object dtype: a numpy str would drop a trailing NUL
    seps[last] = "\0"
    interleaved = np.empty(2 * total, dtype=object)
    interleaved[0::2] = genes
    interleaved[1::2] = seps
    return np.array("".join(interleaved.tolist()).split("\0")[:-1], dtype=object)


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
    return _join_runs(vocab.to_numpy(dtype=object)[key % n_genes], x)
