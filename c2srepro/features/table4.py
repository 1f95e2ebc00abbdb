"""Table 4: the share of live features whose gene lists are enriched for a pathway, per layer,
beside the share reached by random gene lists of the same sizes (the null control).

1. Per layer, the live features (log10 E(f) >= -3) and their ranked gene lists (top ``top_n``
   genes by activation frequency among genes seen at least ``min_occurrences`` times).
2. All lists of a layer are tested by the over-representation engine against every library
   (the paper: KEGG_2021_Human and GO Biological Process), in chunks that keep only each
   library's best term per list (``enrich_best``), so memory does not grow with the number of
   (list, term) pairs. A feature is biologically interpretable when some term has
   Benjamini-Hochberg adjusted p (FDR) < ``fdr`` in some library; its top term is the one with
   the smallest FDR (then the largest combined score, then library and term name).
3. A live feature without an eligible gene (it fires only on template tokens, or only on rare
   genes) gets status ``"no genes"``; it stays in the denominator, as in the paper's fraction
   of live features, and is never interpretable. A list that overlaps no term gets ``"no terms"``.
4. Null controls, seeded per (seed, layer) so that the same seed gives the same lists:
   ``"random"`` draws each list anew, same size, without replacement, from the corpus gene
   universe (genes that occur at least ``min_occurrences`` times, the genes a list may hold);
   ``"permutation"`` relabels the universe by one random permutation and maps every list
   through it, keeping the overlap structure between the features' lists but not the genes.
   Each gives a ``<kind>_fraction`` column, the share a layer would reach by chance.
5. ``background``: ``"library"`` (each library's own genes, as Enrichr and the paper) or
   ``"corpus"`` (the gene universe of step 4; stricter, since the lists can only hold such
   genes), or an explicit gene list.
6. The book's Table 4 (``table4.csv``) is :func:`compare_backgrounds`: the library-background
   summary (``SUMMARY_COLUMNS`` and one :func:`null_column` per null kind) with the corpus
   background's fraction and random-list fraction beside it, prefixed ``corpus_background_``.
   These names are the table's schema; readers of the CSV (the scorecard) use the constants.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from c2srepro._cache import atomic_directory
from c2srepro.enrichment import GeneSetLibrary, enrich_best, load_library
from c2srepro.features.stats import (
    DEFAULT_MIN_OCCURRENCES,
    DEFAULT_TOP_GENES,
    LAYER_DIRECTORY,
    LIVE_THRESHOLD_TABLE4,
    LayerFeatureStats,
)

log = logging.getLogger(__name__)

INTERPRETABLE_FDR = 0.05
NULL_KINDS = ("random", "permutation")
PAPER_LIBRARIES = ("KEGG_2021_Human", "GO_Biological_Process_2025")
STATUSES = ("interpretable", "not significant", "no terms", "no genes")
FEATURE_TABLE_COLUMNS = [
    "layer",
    "feature",
    "log10_freq",
    "n_genes",
    "genes",
    "status",
    "interpretable",
    "top_term",
    "top_fdr",
    "library",
    "overlap",
    "overlap_genes",
]
SUMMARY_COLUMNS = ["layer", "live_features", "with_genes", "no_genes", "interpretable", "fraction"]
CORPUS_PREFIX = "corpus_background_"


def null_column(kind: str) -> str:
    """The summary column holding the share of live features that null ``kind`` makes interpretable."""
    if kind not in NULL_KINDS:
        raise ValueError(f"null kind must be one of {NULL_KINDS}, got {kind!r}")
    return f"{kind}_fraction"


RANDOM_FRACTION = null_column("random")
CORPUS_FRACTION = CORPUS_PREFIX + "fraction"
CORPUS_RANDOM_FRACTION = CORPUS_PREFIX + RANDOM_FRACTION


@dataclass
class Table4:
    """``summary``: one row per layer; ``features``: one row per live feature; ``nulls``: one
    row per (null kind, live feature), same columns as ``features`` plus ``kind``; ``settings``:
    the options and libraries (name, version, stand-in) that produced them, for provenance."""

    summary: pd.DataFrame
    features: pd.DataFrame
    nulls: pd.DataFrame
    settings: dict[str, Any]


def _libraries(libraries) -> list[GeneSetLibrary]:
    if isinstance(libraries, (str, GeneSetLibrary)):
        libraries = [libraries]
    loaded = [load_library(lib) if isinstance(lib, str) else lib for lib in libraries]
    if not loaded:
        raise ValueError("no gene set library given: pass e.g. ['KEGG_2021_Human', 'GO_Biological_Process_2023']")
    return loaded


def _background(stats: LayerFeatureStats, background, min_occurrences: int):
    if isinstance(background, str):
        if background == "library":
            return None
        if background == "corpus":
            return stats.gene_universe(min_occurrences=min_occurrences)
        raise ValueError(f"background must be 'library', 'corpus' or a list of genes, got {background!r}")
    return list(background)


def best_terms(
    gene_lists: Mapping[int, Sequence[str]],
    libraries: Sequence[GeneSetLibrary],
    *,
    background=None,
    fdr: float = INTERPRETABLE_FDR,
    with_genes: bool = True,
) -> pd.DataFrame:
    """Per gene list (index: its key), the status and top term of step 2-3 of the module docstring."""
    keys = list(gene_lists)
    table = pd.DataFrame(
        {
            "n_genes": [len(gene_lists[k]) for k in keys],
            "genes": [";".join(gene_lists[k]) for k in keys],
            "status": "no genes",
            "interpretable": False,
            "top_term": "",
            "top_fdr": np.nan,
            "library": "",
            "overlap": "",
            "overlap_genes": "",
        },
        index=pd.Index(keys, dtype=object),
    )
    queries = {k: list(v) for k, v in gene_lists.items() if len(v) > 0}
    if not queries:
        return table
    table.loc[list(queries), "status"] = "no terms"
    # The best term of each library per list, in chunks: the best over all (list, term) rows is
    # the best of these, and the full table would not fit in memory at the paper's scale.
    result = enrich_best(queries, libraries, background=background, with_genes=with_genes)
    if result.empty:
        return table
    result = result.sort_values(
        ["query", "Adjusted P-value", "Combined Score", "Gene_set", "Term"],
        ascending=[True, True, False, True, True],
        kind="stable",
    )
    top = result.groupby("query", sort=False).head(1).set_index("query")
    table.loc[top.index, "top_term"] = top["Term"]
    table.loc[top.index, "top_fdr"] = top["Adjusted P-value"].astype(float)
    table.loc[top.index, "library"] = top["Gene_set"]
    table.loc[top.index, "overlap"] = top["Overlap"]
    table.loc[top.index, "overlap_genes"] = top["Genes"]
    significant = top.index[top["Adjusted P-value"].to_numpy() < fdr]
    table.loc[top.index, "status"] = "not significant"
    table.loc[significant, "status"] = "interpretable"
    table.loc[significant, "interpretable"] = True
    return table


def null_gene_lists(
    stats: LayerFeatureStats,
    gene_lists: Mapping[int, Sequence[str]],
    *,
    kind: str = "random",
    seed: int = 0,
    min_occurrences: int = DEFAULT_MIN_OCCURRENCES,
) -> dict[int, list[str]]:
    """Gene lists of the same sizes under the null ``kind`` (module docstring, step 4)."""
    if kind not in NULL_KINDS:
        raise ValueError(f"null kind must be one of {NULL_KINDS}, got {kind!r}")
    universe = np.asarray(stats.gene_universe(min_occurrences=min_occurrences), dtype=object)
    rng = np.random.default_rng([seed, stats.layer, NULL_KINDS.index(kind)])
    if kind == "permutation":
        relabel = dict(zip(universe.tolist(), universe[rng.permutation(len(universe))].tolist()))
        outside = sorted({g for genes in gene_lists.values() for g in genes} - set(relabel))
        if outside:
            raise ValueError(
                f"genes {outside[:5]} are not in the layer's gene universe (min_occurrences={min_occurrences}); "
                "use the same min_occurrences for the lists and the null"
            )
        return {f: [relabel[g] for g in genes] for f, genes in gene_lists.items()}
    out = {}
    for f in sorted(gene_lists):
        size = len(gene_lists[f])
        if size > len(universe):
            raise ValueError(f"a gene list of {size} genes is longer than the gene universe ({len(universe)} genes)")
        out[f] = universe[rng.choice(len(universe), size=size, replace=False)].tolist()
    return out


def enrich_layer(
    stats: LayerFeatureStats,
    libraries,
    *,
    top_n: int | None = DEFAULT_TOP_GENES,
    min_occurrences: int = DEFAULT_MIN_OCCURRENCES,
    live_threshold: float = LIVE_THRESHOLD_TABLE4,
    fdr: float = INTERPRETABLE_FDR,
    background="library",
    nulls: Sequence[str] = ("random",),
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per live feature table, per (null kind, live feature) table) for one layer."""
    if not 0.0 < fdr <= 1.0:
        raise ValueError(f"fdr must be in (0, 1], got {fdr}")
    unknown = [k for k in nulls if k not in NULL_KINDS]
    if unknown:
        raise ValueError(f"unknown null kinds {unknown}; choose from {NULL_KINDS}")
    libraries = _libraries(libraries)
    bg = _background(stats, background, min_occurrences)
    live = stats.live_features(live_threshold)
    if len(live) == 0:
        log.warning("layer %d has no live features (log10 E(f) >= %g): its fraction is undefined", stats.layer, live_threshold)
    lists = stats.ranked_genes(live, top_n=top_n, min_occurrences=min_occurrences)

    def frame(table: pd.DataFrame) -> pd.DataFrame:
        table = table.rename_axis("feature").reset_index()
        table["feature"] = table["feature"].astype(np.int64)
        table.insert(0, "layer", stats.layer)
        table.insert(2, "log10_freq", stats.features["log10_freq"].to_numpy()[table["feature"].to_numpy()])
        return table

    features = frame(best_terms(lists, libraries, background=bg, fdr=fdr))[FEATURE_TABLE_COLUMNS]
    null_frames = []
    for kind in nulls:
        drawn = null_gene_lists(stats, lists, kind=kind, seed=seed, min_occurrences=min_occurrences)
        null = frame(best_terms(drawn, libraries, background=bg, fdr=fdr, with_genes=False))
        null.insert(0, "kind", kind)
        null_frames.append(null)
    nulls_table = (
        pd.concat(null_frames, ignore_index=True)
        if null_frames
        else pd.DataFrame(columns=["kind"] + FEATURE_TABLE_COLUMNS)
    )
    return features, nulls_table


def summarize(features: pd.DataFrame, nulls: pd.DataFrame, *, layers: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per layer (``layers``, default those in ``features``; a layer without live
    features gets zeros): live features, with/without genes, interpretable, fraction and
    ``<kind>_fraction`` per null kind (fractions are of all live features; NaN for none)."""
    layers = sorted(set(features["layer"].tolist())) if layers is None else sorted(layers)
    rows = []
    for layer in layers:
        group = features[features["layer"] == layer]
        live = len(group)
        row = {
            "layer": int(layer),
            "live_features": live,
            "with_genes": int((group["status"] != "no genes").sum()),
            "no_genes": int((group["status"] == "no genes").sum()),
            "interpretable": int(group["interpretable"].sum()),
        }
        row["fraction"] = row["interpretable"] / live if live else np.nan
        for kind in pd.unique(nulls["kind"]):
            null = nulls[(nulls["layer"] == layer) & (nulls["kind"] == kind)]
            row[null_column(kind)] = null["interpretable"].sum() / live if live else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def table4(
    stats: Mapping[int, LayerFeatureStats],
    libraries=PAPER_LIBRARIES,
    *,
    top_n: int | None = DEFAULT_TOP_GENES,
    min_occurrences: int = DEFAULT_MIN_OCCURRENCES,
    live_threshold: float = LIVE_THRESHOLD_TABLE4,
    fdr: float = INTERPRETABLE_FDR,
    background="library",
    nulls: Sequence[str] = ("random",),
    seed: int = 0,
    progress: bool = True,
) -> Table4:
    """The paper's Table 4 over all layers of ``stats`` ({layer: LayerFeatureStats}), with the
    null-control fractions beside it. Library names go through ``load_library`` (the paper's
    GO_Biological_Process_2025 becomes its offline stand-in, with a logged warning)."""
    if isinstance(stats, LayerFeatureStats):
        stats = {stats.layer: stats}
    if not stats:
        raise ValueError("no layers given: pass {layer: LayerFeatureStats}")
    libraries = _libraries(libraries)
    if not isinstance(background, str):
        background = list(background)  # read once, used for every layer
    feature_frames, null_frames = [], []
    for layer in tqdm(sorted(stats), desc="Table 4 enrichment", disable=not progress):
        features, null = enrich_layer(
            stats[layer], libraries, top_n=top_n, min_occurrences=min_occurrences, live_threshold=live_threshold,
            fdr=fdr, background=background, nulls=nulls, seed=seed,
        )
        feature_frames.append(features)
        null_frames.append(null)
    features = pd.concat(feature_frames, ignore_index=True)
    null_table = pd.concat(null_frames, ignore_index=True)
    settings = {
        "top_n": top_n,
        "min_occurrences": min_occurrences,
        "live_threshold": live_threshold,
        "fdr": fdr,
        "background": background if isinstance(background, str) else f"{len(background)} given genes",
        "nulls": list(nulls),
        "seed": seed,
        "libraries": [
            {"name": lib.name, "version": lib.version, "stand_in_for": lib.stand_in_for} for lib in libraries
        ],
    }
    return Table4(summarize(features, null_table, layers=sorted(stats)), features, null_table, settings)


def compare_backgrounds(library: Table4, corpus: Table4) -> pd.DataFrame:
    """The book's Table 4 (module docstring, step 6): ``library``'s summary (a :func:`table4` with
    ``background="library"``) and, per layer, ``corpus``'s fraction (``CORPUS_FRACTION``) and
    random-list fraction (``CORPUS_RANDOM_FRACTION``, when its nulls include ``"random"``)."""
    left, right = library.summary, corpus.summary
    if left["layer"].tolist() != right["layer"].tolist():
        raise ValueError(
            f"the two Table 4 runs cover different layers ({left['layer'].tolist()} and {right['layer'].tolist()}): "
            "run table4() on the same feature statistics for both backgrounds"
        )
    combined = left.copy()
    combined[CORPUS_FRACTION] = right["fraction"].to_numpy()
    if RANDOM_FRACTION in right:
        combined[CORPUS_RANDOM_FRACTION] = right[RANDOM_FRACTION].to_numpy()
    return combined


def write_feature_tables(features: pd.DataFrame, directory: str | os.PathLike) -> list[Path]:
    """Write ``directory/layer_XX.csv`` per layer (one row per live feature: genes, status, top
    term, FDR, library); ``directory`` is replaced as a whole, atomically (no table of an earlier,
    larger set stays behind). Returns the paths written."""
    missing = [c for c in FEATURE_TABLE_COLUMNS if c not in features.columns]
    if missing:
        raise ValueError(
            f"features table lacks columns {missing}: pass Table4.features or enrich_layer()'s first result"
        )
    directory = Path(directory)
    names = []
    with atomic_directory(directory) as staging:
        for layer, group in features.groupby("layer", sort=True):
            names.append(f"{LAYER_DIRECTORY.format(layer=int(layer))}.csv")
            group.drop(columns="layer").to_csv(staging / names[-1], index=False)
    return [directory / name for name in names]
