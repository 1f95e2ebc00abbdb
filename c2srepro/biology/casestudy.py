"""The biological reading of a circuit: its genes' marker terms, a same-prompt control, and the summary.

The paper (case study, Figures 4-5) takes the genes of a circuit's gene-token nodes, runs an
over-representation test against a cell-type marker library and reports the term with the highest
combined score among those with FDR < 0.05 ("Endothelial cell: heart", FDR 0.0013, score 315.17).

1. Label map. ``label_to_marker_terms.csv`` (package data) lists, for each (dataset, label, library), the
   marker terms that count as the label's own type: ``exact`` terms (the finest term of the library
   that contains the labelled population) and ``broad`` ones (an enclosing or overlapping type, or the
   same type recorded for another tissue; left out with ``strict=True``). The ``note`` column says why
   where the choice is not obvious. :func:`label_marker_terms` reads it.
2. Enrichment. :func:`circuit_enrichment` runs the vectorised engine (:func:`c2srepro.enrichment.enrich`)
   on the circuit genes and sorts each library's terms with FDR < ``fdr`` first, then by combined
   score (descending), p-value (ascending) and term. :func:`top_marker_term` returns the first of
   those: the highest combined score among terms with FDR < ``fdr``, or None when no term passes.
3. Control (not in the paper). A circuit's genes are drawn from its own prompt, whose genes (the
   cell's top genes) already carry the cell's type. :func:`prompt_subset_control` draws ``n_random``
   subsets of the prompt's genes of the circuit's size (seeded, uniform without replacement), runs
   all of them and the circuit in one enrichment call, and places the circuit among them:
       s(q)   = score of q's top term (best score among terms with FDR < fdr; 0 when none passes)
       s_T(q) = best score of q's terms in ``target_terms`` (any FDR; 0 when none overlaps)
       percentile = 100 (#{r: s(r) < s(c)} + #{r: s(r) = s(c)} / 2) / n_random    (mid-rank for ties)
       p_value    = (1 + #{r: s(r) >= s(c)}) / (1 + n_random)
   and the fraction of random subsets whose top term is in ``target_terms``: the rate at which
   "the top term is the cell's own type" happens by drawing genes from the prompt alone.
4. :func:`own_type_rate` runs step 2 for many cells' circuits in one call and reports, per cell, the
   top term and whether it is in the cell's own-type terms (step 1), and the rate over cells.
   :func:`traced_own_type_rate` first builds those circuits: for the first ``n_cells`` cells the
   model classifies correctly, the attribution graph of one question about the answer
   (:meth:`c2srepro.attribution.ReplacementModel.answer_target`) and its influential genes (below).

Influential genes of a full graph: :func:`influential_genes` takes the gene view's table
(:func:`c2srepro.attribution.gene_view`, genes ranked by their influence on the target) and keeps
the fewest top-ranked genes whose cumulative share of the genes' total influence reaches
``threshold``: the node rule of influence pruning, applied to gene nodes (pruning itself keeps every
token node, so it names no gene list of its own).
5. :func:`summarise_circuit` gathers a traced cell's graph, genes, enrichment, control, ablations
   (:func:`c2srepro.attribution.ablate`) and own-type rate into one :class:`CircuitSummary`, whose
   ``to_dict`` is ``circuit_summary.json``; ``CircuitSummary.from_dict`` reads it back and names
   any field missing or unknown. :func:`pick_cell` chooses the traced cell.

Scores: "Combined Score" (the paper's enrichment score), "Odds Ratio", or "P-value" / "Adjusted
P-value" (taken as -log10 so that higher is better, as for the others).
"""

from __future__ import annotations

import importlib.resources
import io
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
from tqdm import tqdm

from c2srepro.attribution.ablation import AblationResult, empirical_p_value
from c2srepro.attribution.circuit import circuit_genes
from c2srepro.attribution.full_graph import Graph
from c2srepro.data.cells import CellSentence
from c2srepro.enrichment import GeneSetLibrary, enrich, load_library

if TYPE_CHECKING:
    from c2srepro.attribution.replacement import ReplacementModel

logger = logging.getLogger(__name__)

LABEL_MAP_NAME = "label_to_marker_terms.csv"  # package data of c2srepro.biology
LABEL_MAP_COLUMNS = ("dataset", "label", "library", "term", "level", "note")
LEVELS = ("exact", "broad")
# A dataset given as a path is known by its file name: the paper's atlas file.
DATASET_ALIASES = {"Global_raw.h5ad": "heart_cell_atlas_v2", "smoke-atlas": "heart_cell_atlas_v2"}
SCORES = ("Combined Score", "Odds Ratio", "P-value", "Adjusted P-value")
_P_SCORES = ("P-value", "Adjusted P-value")
DEFAULT_FDR = 0.05


class MarkerTerm(NamedTuple):
    """The top marker term of an enrichment: ``(term, fdr, combined_score, odds_ratio)``."""

    term: str
    fdr: float
    combined_score: float
    odds_ratio: float


# ---------------------------------------------------------------------------------------------
# 1. Label map


def read_label_map(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The label map table (``LABEL_MAP_COLUMNS``), checked for missing values, levels and duplicates."""
    if path is None:
        resource = importlib.resources.files("c2srepro.biology") / LABEL_MAP_NAME
        path, text = Path(LABEL_MAP_NAME), resource.read_text(encoding="utf-8")
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"label map {path} not found (omit path= to read the one c2srepro ships)")
        text = path.read_text(encoding="utf-8")
    # Only whole lines starting with "#" are comments: a "#" inside a note or term is kept.
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith("#")]
    table = pd.read_csv(io.StringIO("".join(lines)), dtype=str, keep_default_na=False)
    missing = [c for c in LABEL_MAP_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"label map {path} lacks columns {missing}; expected {list(LABEL_MAP_COLUMNS)}")
    for column in ("dataset", "label", "library", "term"):
        empty = table.index[table[column].str.strip() == ""].tolist()
        if empty:
            raise ValueError(f"label map {path}: empty {column!r} in data rows {empty[:5]}")
    bad_levels = sorted(set(table["level"]) - set(LEVELS))
    if bad_levels:
        raise ValueError(f"label map {path}: level must be one of {LEVELS}, got {bad_levels}")
    duplicated = table.duplicated(["dataset", "label", "library", "term"])
    if duplicated.any():
        first = table[duplicated].iloc[0]
        raise ValueError(
            f"label map {path}: term {first['term']!r} listed twice for ({first['dataset']}, {first['label']}, "
            f"{first['library']})"
        )
    return table[list(LABEL_MAP_COLUMNS)]


def dataset_key(dataset: str | os.PathLike) -> str:
    """The label map's name for ``dataset``: a known file name (``DATASET_ALIASES``) or the name itself."""
    name = Path(dataset).name
    return DATASET_ALIASES.get(name, str(dataset))


def _library_name(library: GeneSetLibrary | str) -> str:
    return library.name if isinstance(library, GeneSetLibrary) else str(library)


def label_marker_terms(
    dataset: str | os.PathLike,
    label: str,
    library_name: GeneSetLibrary | str,
    *,
    strict: bool = False,
    path: str | os.PathLike | None = None,
) -> list[str]:
    """The marker terms of ``library_name`` that count as ``label``'s own type in ``dataset``.

    ``dataset`` is a label-map name (``pbmc68k_reduced``, ``heart_cell_atlas_v2``) or a path whose file
    name is a known alias; ``strict`` keeps only the ``exact`` terms. Raises ValueError naming the
    mapped datasets, libraries or labels when the combination is not in the map.
    """
    table = read_label_map(path)
    key, library = dataset_key(dataset), _library_name(library_name)
    rows = table[table["dataset"] == key]
    if rows.empty:
        raise ValueError(
            f"dataset {str(dataset)!r} is not in the label map; mapped datasets: "
            f"{sorted(table['dataset'].unique())} (add rows to {LABEL_MAP_NAME})"
        )
    rows = rows[rows["library"] == library]
    if rows.empty:
        raise ValueError(
            f"library {library!r} has no label map for {key}; mapped libraries: "
            f"{sorted(table.loc[table['dataset'] == key, 'library'].unique())}"
        )
    chosen = rows[rows["label"] == label]
    if chosen.empty:
        raise ValueError(
            f"label {label!r} is unmapped for ({key}, {library}); mapped labels: {sorted(rows['label'].unique())} "
            f"(add rows to {LABEL_MAP_NAME})"
        )
    if strict:
        chosen = chosen[chosen["level"] == "exact"]
    return chosen["term"].tolist()


# ---------------------------------------------------------------------------------------------
# 2. Enrichment of a circuit's genes


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def _check_fdr(fdr: float) -> None:
    if not 0 < fdr <= 1:
        raise ValueError(f"fdr must lie in (0, 1], got {fdr}")


def _score_values(table: pd.DataFrame, score: str) -> np.ndarray:
    """The ranking score, higher is better (p-values as -log10)."""
    values = table[score].to_numpy(dtype=float)
    if score in _P_SCORES:
        with np.errstate(divide="ignore"):
            values = -np.log10(values)
    return values


def _rank_terms(table: pd.DataFrame, *, fdr: float, score: str, by: Sequence[str]) -> pd.DataFrame:
    """Rows sorted within ``by`` groups: FDR < fdr first, then score desc, p-value asc, term."""
    ranked = table.assign(
        significant=table["Adjusted P-value"].to_numpy() < fdr,
        _score=_score_values(table, score),
    )
    ranked = ranked.sort_values(
        [*by, "significant", "_score", "P-value", "Term"],
        ascending=[True] * len(by) + [False, False, True, True],
        kind="stable",
    )
    return ranked.drop(columns="_score").reset_index(drop=True)


def _clean_genes(genes: Sequence[str | None], what: str) -> list[str]:
    if isinstance(genes, str):
        raise ValueError(f"{what} is one string; pass a list of gene symbols")
    cleaned = list(dict.fromkeys(g for g in genes if g is not None))
    if not all(isinstance(g, str) and g for g in cleaned):
        raise ValueError(f"{what} must hold non-empty gene symbols (strings)")
    return cleaned


def circuit_enrichment(
    genes: Sequence[str],
    libraries: GeneSetLibrary | str | Sequence[GeneSetLibrary | str],
    *,
    background: Sequence[str] | int | None = None,
    fdr: float = DEFAULT_FDR,
) -> pd.DataFrame:
    """Enrichment of a circuit's gene list, each library's terms ranked as the paper reports them.

    Columns: enrich's (query, Gene_set, Term, Overlap, P-value, Adjusted P-value, Odds Ratio, Combined
    Score, Genes) plus ``significant`` (Adjusted P-value < fdr). Libraries stay in input order; within
    one, significant terms come first, by combined score (descending). ``background`` as in ``enrich``
    (None: each library's own genes). Raises ValueError on an empty gene list. A library none of
    whose terms holds a gene of the list has no rows; ``table.attrs["libraries"]`` names every
    library tested, so that :func:`top_marker_term` and :func:`summarise_circuit` report no term
    for it rather than an unknown library.
    """
    _check_fdr(fdr)
    genes = _clean_genes(genes, "genes")
    if not genes:
        raise ValueError("circuit_enrichment: the gene list is empty (the circuit has no gene-token nodes)")
    table = enrich(genes, libraries, background=background)
    # Library order is the input order: keep it through the sort with a positional key.
    order = {name: i for i, name in enumerate(dict.fromkeys(table["Gene_set"]))}
    table = table.assign(_library=table["Gene_set"].map(order))
    ranked = _rank_terms(table, fdr=fdr, score="Combined Score", by=["_library"]).drop(columns="_library")
    tested = libraries if isinstance(libraries, (list, tuple)) else [libraries]
    ranked.attrs["libraries"] = [_library_name(library) for library in tested]
    return ranked


def _library_rows(enrichment: pd.DataFrame, library: GeneSetLibrary | str | None) -> pd.DataFrame:
    if library is not None:
        name = _library_name(library)
        present = set(enrichment["Gene_set"])
        if present and name not in present and name not in enrichment.attrs.get("libraries", ()):
            raise ValueError(f"library {name!r} is not in the enrichment (it has {sorted(present)})")
        return enrichment[enrichment["Gene_set"] == name]
    names = enrichment["Gene_set"].unique()
    if len(names) > 1:
        raise ValueError(f"the enrichment holds several libraries {sorted(names)}; pass library= to pick one")
    return enrichment


def top_marker_term(
    enrichment_df: pd.DataFrame,
    *,
    fdr: float = DEFAULT_FDR,
    library: GeneSetLibrary | str | None = None,
    score: str = "Combined Score",
) -> MarkerTerm | None:
    """The term of highest ``score`` among those with FDR < ``fdr`` (the paper's pick), or None.

    ``library`` selects one Gene_set when the table holds several. Ties go to the smaller p-value,
    then the term name.
    """
    _check_fdr(fdr)
    _check_score(score)
    needed = {"Gene_set", "Term", "P-value", "Adjusted P-value", "Odds Ratio", "Combined Score"}
    missing = sorted(needed - set(enrichment_df.columns))
    if missing:
        raise ValueError(f"top_marker_term: the table lacks columns {missing}; pass enrich()'s output")
    rows = _library_rows(enrichment_df, library)
    rows = rows[rows["Adjusted P-value"].to_numpy() < fdr]
    if rows.empty:
        return None
    best = _rank_terms(rows, fdr=fdr, score=score, by=[]).iloc[0]
    return MarkerTerm(
        term=str(best["Term"]),
        fdr=float(best["Adjusted P-value"]),
        combined_score=float(best["Combined Score"]),
        odds_ratio=float(best["Odds Ratio"]),
    )


def top_marker_ties(
    enrichment_df: pd.DataFrame, *, fdr: float = DEFAULT_FDR, score: str = "Combined Score"
) -> list[str]:
    """Every term tied with the top term (same score and p-value, FDR < ``fdr``), in rank order.

    Terms with identical overlap and set size tie exactly; which one ``top_marker_term`` names
    first is then only the alphabet, so "the top term is the cell's own type" asks whether any of
    them is.
    """
    rows = enrichment_df[enrichment_df["Adjusted P-value"].to_numpy() < fdr]
    if rows.empty:
        return []
    ranked = _rank_terms(rows, fdr=fdr, score=score, by=[])
    values = _score_values(ranked, score)
    tied = (values == values[0]) & (ranked["P-value"].to_numpy() == ranked["P-value"].iloc[0])
    return ranked.loc[tied, "Term"].astype(str).tolist()


def influential_genes(genes: pd.DataFrame, *, threshold: float = 0.8) -> list[str]:
    """The fewest top genes of a gene view's table (``gene_view(graph).genes``) that carry
    ``threshold`` of the genes' total influence, in influence order (module docstring)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (a share of the genes' total influence), got {threshold}")
    missing = sorted({"gene", "influence"} - set(genes.columns))
    if missing:
        raise ValueError(f"influential_genes: the table lacks columns {missing}; pass gene_view(graph).genes")
    ranked = genes.sort_values("influence", ascending=False, kind="stable")
    total = float(ranked["influence"].sum())
    if not len(ranked) or total <= 0:
        return []
    share = ranked["influence"].cumsum().to_numpy() / total
    n = min(int(np.searchsorted(share, threshold - 1e-12)) + 1, len(ranked))
    return ranked["gene"].iloc[:n].tolist()


# ---------------------------------------------------------------------------------------------
# 3. The same-prompt random-subset control


def _query_summaries(
    table: pd.DataFrame, n_queries: int, *, score: str, fdr: float, target_terms: frozenset[str] | None
) -> tuple[np.ndarray, list[str | None], np.ndarray | None]:
    """Per query (names 0..n-1): top-term score (0 if none significant), the terms tied at the top, best target score."""
    best = np.zeros(n_queries)
    top: list[list[str]] = [[] for _ in range(n_queries)]  # each query's terms tied at the top
    significant = table[table["Adjusted P-value"].to_numpy() < fdr]
    if len(significant):
        ranked = _rank_terms(significant, fdr=fdr, score=score, by=["query"])
        values = _score_values(ranked, score)
        first = ranked.groupby("query", sort=False).cumcount().to_numpy() == 0
        queries = ranked["query"].to_numpy(dtype=np.int64)
        best[queries[first]] = values[first]
        lead_p = ranked["P-value"].where(first).groupby(ranked["query"]).transform("first").to_numpy()
        tied = (values == best[queries]) & (ranked["P-value"].to_numpy() == lead_p)
        for q, term in zip(queries[tied].tolist(), ranked.loc[tied, "Term"].tolist()):
            top[q].append(term)
    target = None
    if target_terms is not None:
        target = np.zeros(n_queries)
        hits = table[table["Term"].isin(target_terms)]
        if len(hits):
            per_query = pd.Series(_score_values(hits, score), index=hits["query"].to_numpy(dtype=np.int64))
            per_query = per_query.groupby(level=0).max()
            target[per_query.index.to_numpy()] = per_query.to_numpy()
    return best, top, target


def _placement(circuit: float, random: np.ndarray) -> tuple[float, float]:
    """(mid-rank percentile, empirical p-value) of ``circuit`` among ``random`` (higher is better)."""
    below = int((random < circuit).sum())
    tied = int((random == circuit).sum())
    percentile = 100.0 * (below + 0.5 * tied) / len(random)
    return percentile, empirical_p_value(circuit, random)


def prompt_subset_control(
    circuit_genes: Sequence[str],
    prompt_genes: Sequence[str | None],
    library: GeneSetLibrary | str,
    *,
    n_random: int = 1000,
    seed: int = 0,
    score: str = "Combined Score",
    target_terms: Sequence[str] | None = None,
    background: Sequence[str] | int | None = None,
    fdr: float = DEFAULT_FDR,
) -> dict:
    """Where the circuit's marker-term score falls among same-size random subsets of its prompt's genes.

    circuit_genes: the circuit's gene list (each must be one of the prompt's genes);
    prompt_genes: the prompt's genes, e.g. a cell sentence or a prompt's ``gene_of_token`` (None
        entries and repeats are dropped);
    library: one library (or a name for ``load_library``); target_terms: the cell's own-type terms
        (e.g. from :func:`label_marker_terms`), for the own-type statistics.
    Returns a JSON-ready dict: library, score, fdr, n_genes, n_prompt_genes, n_random, seed,
    circuit_top_term, circuit_score, random_scores, percentile, p_value, random_mean; with
    target_terms also target_terms, circuit_target_score, random_target_scores, target_percentile,
    target_p_value, circuit_top_is_target, random_top_is_target_fraction. The formulas are in the
    module docstring (step 3).
    """
    _check_score(score)
    _check_fdr(fdr)
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    circuit = _clean_genes(circuit_genes, "circuit_genes")
    prompt = _clean_genes(prompt_genes, "prompt_genes")
    if not circuit:
        raise ValueError("prompt_subset_control: the circuit gene list is empty; there is nothing to place")
    outside = [g for g in circuit if g not in set(prompt)]
    if outside:
        raise ValueError(
            f"circuit genes {outside[:5]} are not among the prompt's genes; pass the genes of the prompt the "
            "circuit was traced on"
        )
    if len(circuit) >= len(prompt):
        raise ValueError(
            f"the circuit has {len(circuit)} genes and the prompt {len(prompt)}: every same-size subset is the "
            "circuit itself, so there is no control"
        )
    lib = load_library(library) if isinstance(library, str) else library
    targets = None
    if target_terms is not None:
        targets = frozenset(target_terms)
        unknown = sorted(targets - set(lib.terms))
        if unknown or not targets:
            raise ValueError(f"target_terms must be non-empty terms of {lib.name!r}; not in it: {unknown[:5]}")

    # Seeded uniform subsets without replacement: the first k of a random permutation per row.
    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((n_random, len(prompt))), axis=1)[:, : len(circuit)]  # [n_random, k]
    prompt_array = np.array(prompt, dtype=object)
    queries = {0: circuit} | {i + 1: prompt_array[row].tolist() for i, row in enumerate(picks)}
    table = enrich(queries, lib, background=background, with_genes=False)
    best, top, target = _query_summaries(table, n_random + 1, score=score, fdr=fdr, target_terms=targets)

    percentile, p_value = _placement(best[0], best[1:])
    result = {
        "library": lib.name,
        "score": score,
        "fdr": fdr,
        "n_genes": len(circuit),
        "n_prompt_genes": len(prompt),
        "n_random": n_random,
        "seed": seed,
        "circuit_top_term": top[0][0] if top[0] else None,
        "circuit_top_tied_terms": top[0],
        "circuit_score": float(best[0]),
        "random_scores": best[1:].tolist(),
        "random_mean": float(best[1:].mean()),
        "percentile": percentile,
        "p_value": p_value,
    }
    if targets is not None:
        target_percentile, target_p = _placement(target[0], target[1:])
        result |= {
            "target_terms": sorted(targets),
            "circuit_target_score": float(target[0]),
            "random_target_scores": target[1:].tolist(),
            "target_percentile": target_percentile,
            "target_p_value": target_p,
            "circuit_top_is_target": bool(targets.intersection(top[0])),
            "random_top_is_target_fraction": float(np.mean([bool(targets.intersection(t)) for t in top[1:]])),
        }
    logger.info(
        "prompt-subset control (%s, %d genes of %d): circuit %s %.4g at percentile %.1f of %d random subsets",
        lib.name, len(circuit), len(prompt), score, best[0], percentile, n_random,
    )
    return result


# ---------------------------------------------------------------------------------------------
# 4. Own-type rate over many cells


def own_type_rate(
    cells: Sequence[tuple[str, Sequence[str]]],
    library: GeneSetLibrary | str,
    *,
    dataset: str | os.PathLike,
    background: Sequence[str] | int | None = None,
    fdr: float = DEFAULT_FDR,
    strict: bool = False,
) -> tuple[pd.DataFrame, float]:
    """How often a cell's top marker term (:func:`top_marker_term`) is the cell's own type.

    cells: ``(cell label, circuit genes)`` per cell, labels as in the label map of ``dataset``.
    Returns ``(rows, rate)``: one row per cell (cell, label, n_genes, top_term, top_fdr,
    top_combined_score, own_type, own_rank = 1-based rank of the best own-type term in the sorted
    enrichment, NaN when none overlaps) and the fraction of cells with own_type True. A cell with no
    genes is kept with top_term None and own_type False (its circuit named no type).
    """
    _check_fdr(fdr)
    if not cells:
        raise ValueError("own_type_rate: no cells given")
    lib = load_library(library) if isinstance(library, str) else library
    labels = [label for label, _ in cells]
    own_terms = {label: set(label_marker_terms(dataset, label, lib, strict=strict)) for label in dict.fromkeys(labels)}
    gene_lists = {i: _clean_genes(genes, f"genes of cell {i}") for i, (_, genes) in enumerate(cells)}
    table = enrich(gene_lists, lib, background=background, with_genes=False)
    ranked = _rank_terms(table, fdr=fdr, score="Combined Score", by=["query"])
    ranked["rank"] = ranked.groupby("query", sort=False).cumcount() + 1
    rows = []
    for i, label in enumerate(labels):
        terms = ranked[ranked["query"] == i]
        top = top_marker_term(terms, fdr=fdr)
        own_hits = terms.loc[terms["Term"].isin(own_terms[label]), "rank"]
        rows.append({
            "cell": i,
            "label": label,
            "n_genes": len(gene_lists[i]),
            "top_term": top.term if top else None,
            "top_fdr": top.fdr if top else math.nan,
            "top_combined_score": top.combined_score if top else math.nan,
            "own_type": bool(set(top_marker_ties(terms, fdr=fdr)) & set(own_terms[label])),
            "own_rank": float(own_hits.min()) if len(own_hits) else math.nan,
        })
    frame = pd.DataFrame(rows)
    return frame, float(frame["own_type"].mean())


def traced_own_type_rate(
    replacement: "ReplacementModel",
    cells: Sequence[CellSentence],
    predicted: Sequence[str],
    library: GeneSetLibrary | str,
    *,
    dataset: str | os.PathLike,
    n_cells: int,
    candidates: Sequence[str],
    target: str = "label_vs_candidates",
    max_feature_nodes: int | None = None,
    gene_threshold: float = 0.8,
    fdr: float = DEFAULT_FDR,
    strict: bool = False,
    progress: bool = True,
) -> tuple[pd.DataFrame, float | None]:
    """:func:`own_type_rate` over the first ``n_cells`` of ``cells`` whose prediction (``predicted``,
    one per cell) is their label (module docstring, step 4).

    Each cell's genes are the :func:`influential_genes` (``gene_threshold``) of its attribution
    graph (``max_feature_nodes``) for the target of kind ``target`` of its own answer
    (:meth:`~c2srepro.attribution.ReplacementModel.answer_target`, among ``candidates``). Returns
    ``(rows, rate)``; with no correctly classified cell, an empty table and None.
    """
    if len(cells) != len(predicted):
        raise ValueError(f"{len(cells)} cells but {len(predicted)} predictions: pass one prediction per cell")
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    correct = [(cell, label) for cell, label in zip(cells, predicted) if cell.label == label][:n_cells]
    if not correct:
        return pd.DataFrame(), None

    def genes_of(cell: CellSentence, label: str) -> list[str]:
        question = replacement.answer_target(target, cell, label, candidates=candidates)
        graph = replacement.attribute(cell, question, max_feature_nodes=max_feature_nodes)
        return influential_genes(graph.genes(), threshold=gene_threshold)

    traced = [(cell.label, genes_of(cell, label))
              for cell, label in tqdm(correct, desc="tracing cells", disable=not progress)]
    return own_type_rate(traced, library, dataset=dataset, fdr=fdr, strict=strict)


# ---------------------------------------------------------------------------------------------
# 5. The circuit summary




def pick_cell(
    cells: Sequence[CellSentence], predicted: Sequence[str], choice: int | str
) -> tuple[CellSentence, str]:
    """The cell to trace and the model's prediction for it: an index among ``cells``, or a label,
    meaning the first cell carrying it that the model classifies correctly (the paper traces a
    correct prediction)."""
    if len(cells) != len(predicted):
        raise ValueError(f"{len(cells)} cells but {len(predicted)} predictions")
    if isinstance(choice, int):
        if not 0 <= choice < len(cells):
            raise ValueError(f"cell index {choice} is out of range: there are {len(cells)} cells (0..{len(cells) - 1})")
        return cells[choice], predicted[choice]
    labelled = [i for i, c in enumerate(cells) if c.label == choice]
    if not labelled:
        known = sorted({c.label for c in cells})
        raise ValueError(f"no cell is labelled {choice!r}; labels: {known}")
    correct = [i for i in labelled if predicted[i] == choice]
    if not correct:
        raise ValueError(
            f"the model classifies none of the {len(labelled)} cells labelled {choice!r} correctly; "
            "pick another label or a cell index"
        )
    return cells[correct[0]], predicted[correct[0]]


def graph_size(graph: Graph) -> dict[str, int]:
    """Nodes by kind (feature, error, embedding, logit), all nodes, and edges (nonzero adjacency entries)."""
    counts = graph.nodes["kind"].value_counts()
    return {**{kind: int(counts.get(kind, 0)) for kind in ("feature", "error", "embedding", "logit")},
            "nodes": graph.n_nodes, "edges": int((graph.adjacency != 0).sum())}


@dataclass(frozen=True)
class CircuitSummary:
    """One traced cell's circuit (module docstring, step 5): ``circuit_summary.json``."""

    cell_id: str
    cell_label: str
    predicted_label: str
    target: dict  # the graph's target: Target.to_dict() with node_id and value
    n_active_features: int
    max_feature_nodes: int | None
    graph_size: dict  # graph_size() of the full graph
    pruned_graph_size: dict
    node_threshold: float
    edge_threshold: float
    gene_threshold: float
    replacement_score: float
    completeness_score: float
    genes: list  # the influential genes, in influence order
    gene_influence: list  # per prompt gene: gene, influence, influence_rank, sentence_rank
    greedy_target: dict  # the greedy circuit's target (the paper's Figure 5)
    greedy_k: int
    greedy_depth: int
    greedy_genes: list
    greedy_top_marker_term: str | None
    top_marker_library: str | None
    top_marker_term: str | None
    top_marker_fdr: float | None
    top_marker_combined_score: float | None
    top_marker_odds_ratio: float | None
    top_marker_tied_terms: list
    top_marker_matches_cell_type: bool
    prompt_subset_percentile: float | None
    prompt_subset_p_value: float | None
    prompt_subset_target_percentile: float | None
    prompt_subset_random_top_is_target_fraction: float | None
    ablation: dict | None  # AblationResult.summary(): the pruned graph's features off
    intervention: dict | None  # AblationResult.summary(): the graph's top features off in the real model
    own_type_rate: float | None
    own_type_rate_cells: int
    targets: list  # per target kind asked of the same cell: its top genes, scores and pruned size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CircuitSummary":
        """Read a summary back; a field missing or unknown is an error that names it (a file of
        another c2srepro version: rerun chapter 6)."""
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - set(data)), sorted(set(data) - names - {"provenance"})
        if missing or unknown:
            raise ValueError(f"not a circuit summary of this c2srepro: fields missing {missing}, unknown {unknown}; "
                             "rerun chapter 6 (06-circuit) to write it again")
        return cls(**{name: data[name] for name in names})


def _finite_or_none(value) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def summarise_circuit(
    *,
    cell: CellSentence,
    predicted_label: str,
    graph: Graph,
    pruned: Graph,
    genes: Sequence[str],
    greedy: Graph,
    enrichment: pd.DataFrame | None,
    greedy_enrichment: pd.DataFrame | None,
    control: Mapping | None,
    ablation: AblationResult | None,
    intervention: AblationResult | None,
    own_type: tuple[pd.DataFrame, float | None],
    targets: pd.DataFrame,
    library: GeneSetLibrary | str,
    dataset: str | os.PathLike | None = None,
    target_terms: Sequence[str] | None = None,
    gene_threshold: float,
    fdr: float = DEFAULT_FDR,
    strict: bool = False,
) -> CircuitSummary:
    """The :class:`CircuitSummary` of one traced cell (module docstring, step 5).

    graph / pruned: its attribution graph and ``graph.prune(...)``; genes: the graph's
    :func:`influential_genes`; greedy: the paper's greedy circuit
    (:func:`~c2srepro.attribution.full_graph.greedy_paths`); enrichment / greedy_enrichment:
    :func:`circuit_enrichment` of their genes in ``library`` (None for no genes); control:
    :func:`prompt_subset_control`'s dict; ablation / intervention: :func:`c2srepro.attribution.ablate`;
    own_type: :func:`traced_own_type_rate`'s ``(rows, rate)``; targets: the table comparing target
    kinds. The own-type terms are ``target_terms`` or, with ``dataset``, :func:`label_marker_terms` of
    the cell's label in ``library``.
    """
    if target_terms is None and dataset is None:
        raise ValueError("summarise_circuit: pass dataset= (to look up the label map) or target_terms=")
    if len(graph.targets) != 1:
        raise ValueError(f"summarise_circuit reads a graph of one target, got {len(graph.targets)}")
    library_name = _library_name(library)
    rows = _library_rows(enrichment, library) if enrichment is not None else None
    top = top_marker_term(rows, fdr=fdr) if rows is not None else None
    ties = top_marker_ties(rows, fdr=fdr) if rows is not None else []
    own = set(target_terms) if target_terms is not None else set(
        label_marker_terms(dataset, cell.label, library_name, strict=strict))
    greedy_top = (top_marker_term(_library_rows(greedy_enrichment, library), fdr=fdr)
                  if greedy_enrichment is not None else None)
    search = greedy.info["search"]
    gene_table = graph.genes()
    control = control or {}
    rate_rows, rate = own_type
    scores = graph.scores()
    return CircuitSummary(
        cell_id=cell.cell_id,
        cell_label=cell.label,
        predicted_label=predicted_label,
        target=graph.info["targets"][0],
        n_active_features=int(graph.info["n_active"]),
        max_feature_nodes=graph.info.get("max_feature_nodes"),
        graph_size=graph_size(graph),
        pruned_graph_size=graph_size(pruned),
        node_threshold=float(pruned.info["pruning"]["node_threshold"]),
        edge_threshold=float(pruned.info["pruning"]["edge_threshold"]),
        gene_threshold=float(gene_threshold),
        replacement_score=scores["replacement"],
        completeness_score=scores["completeness"],
        genes=list(genes),
        gene_influence=gene_table[["gene", "influence", "influence_rank", "sentence_rank"]].to_dict("records"),
        greedy_target=next(t for t in greedy.info["targets"] if t["node_id"] == search["target"]),
        greedy_k=int(search["k"]),
        greedy_depth=int(search["depth"]),
        greedy_genes=circuit_genes(greedy),
        greedy_top_marker_term=greedy_top.term if greedy_top else None,
        top_marker_library=library_name,
        top_marker_term=top.term if top else None,
        top_marker_fdr=top.fdr if top else None,
        top_marker_combined_score=top.combined_score if top else None,
        top_marker_odds_ratio=_finite_or_none(top.odds_ratio) if top else None,
        top_marker_tied_terms=list(ties),
        top_marker_matches_cell_type=bool(set(ties) & own),
        prompt_subset_percentile=control.get("percentile"),
        prompt_subset_p_value=control.get("p_value"),
        prompt_subset_target_percentile=control.get("target_percentile"),
        prompt_subset_random_top_is_target_fraction=control.get("random_top_is_target_fraction"),
        ablation=ablation.summary() if ablation is not None else None,
        intervention=intervention.summary() if intervention is not None else None,
        own_type_rate=rate,
        own_type_rate_cells=len(rate_rows),
        # a question with no answer on the cell (its row says why) holds null, not NaN, in the JSON
        targets=targets.astype(object).where(targets.notna(), None).to_dict("records"),
    )


def compare_targets(
    replacement: "ReplacementModel",
    cell: CellSentence,
    label: str,
    *,
    candidates: Sequence[str],
    kinds: Sequence[str],
    max_feature_nodes: int | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    gene_threshold: float = 0.8,
    n_top_genes: int = 10,
    graphs: Mapping[str, Graph] | None = None,
    keep: Sequence[str] | None = None,
) -> tuple[dict[str, Graph], pd.DataFrame]:
    """The same cell asked several questions about its answer ``label``: one attribution graph per
    target kind (:meth:`~c2srepro.attribution.ReplacementModel.answer_target`), and a table of what
    each explains: the target and its value, the top ``n_top_genes`` genes by influence, the number
    of influential genes (``gene_threshold``), the replacement and completeness scores and the pruned
    graph's size. ``graphs``: graphs already built, by kind, reused; ``keep``: the kinds whose graphs
    are returned (default: all; a graph at a real model's shape holds hundreds of MB). A kind whose
    target does not exist on this cell (no feature fires on the final token) gets a row saying so
    and no graph."""
    from c2srepro.attribution.replacement import TARGET_KINDS

    unknown = [kind for kind in kinds if kind not in TARGET_KINDS]
    if unknown:
        raise ValueError(f"target kinds {unknown} are not among {TARGET_KINDS}")
    built = dict(graphs or {})
    rows = []
    for kind in kinds:
        if kind not in built:
            try:
                question = replacement.answer_target(kind, cell, label, candidates=candidates)
            except ValueError as error:  # the question has no answer on this cell: say why in its row
                rows.append({"target kind": kind, "target": None, "value": None, "note": str(error)})
                continue
            built[kind] = replacement.attribute(cell, question, max_feature_nodes=max_feature_nodes)
        graph = built[kind]
        genes = graph.genes()
        pruned = graph.prune(node_threshold=node_threshold, edge_threshold=edge_threshold)
        scores = graph.scores()
        target = graph.info["targets"][0]
        rows.append({
            "target kind": kind, "target": target["node_id"], "value": target["value"],
            "top genes": ", ".join(genes["gene"].head(n_top_genes)),
            "influential genes": len(influential_genes(genes, threshold=gene_threshold)),
            "replacement": scores["replacement"], "completeness": scores["completeness"],
            "pruned nodes": pruned.n_nodes, "pruned features": graph_size(pruned)["feature"], "note": "",
        })
        if keep is not None and kind not in keep:
            del built[kind]
    return built, pd.DataFrame(rows)
