"""A searchable atlas of transcoder features, built from stored results without running the model.

For every live feature of every layer (log10 E(f) >= ``live_threshold``, Table 4's -3 by default):

1. Firing: E(f), its log10, the mean activation over firing tokens, the maximum and the share of
   firings inside genes, from the layer's :class:`LayerFeatureStats` (chapter 4).
2. Genes: its first ``n_genes`` genes of :meth:`LayerFeatureStats.gene_table` (genes by the share
   of their occurrences the feature fires on, ``min_occurrences`` as in Table 4), and the tokens
   it fires on (:func:`activating_tokens` over its kept top examples).
3. Cells: per layer a cells x features AnnData of cell-level activations
   (:func:`feature_activations`: a feature's maximum over the cell's counted tokens), with the cell
   type in ``obs[groupby]``; the book passes its held-out cells. Per feature its ``n_cells`` most
   active cells; per (feature, type) the mean activation, the share of the type's cells where it
   is active and a specificity AUROC: the probability that a cell of the type has a larger
   activation than a cell of another type, ties counted half (the Mann-Whitney U statistic over
   n_type x n_rest, which is ``sklearn.metrics.roc_auc_score`` of the activation for "is this
   type"). 0.5: no preference; 1: every cell of the type above every other cell.
4. Terms: the feature's gene list as Table 4 tested it (the ``genes`` column of chapter 5's
   per-layer tables) against each library with :func:`c2srepro.enrichment.enrich` (library
   background, Benjamini-Hochberg FDR per feature and library, as Table 4); kept are the
   ``n_terms`` best terms per library with FDR < ``fdr``. Table 4's own verdict (status, top
   term, its FDR and library) is copied as it was written.
5. Table 3's automatic rule (:func:`interpret_features`): gene-level interpretable or not, and why.
6. Graphs: a cohort of attribution graphs as a cells x features AnnData of node influence
   (``c2srepro.biology.cohort.cohort_anndata(kind="features")``: var names ``L<layer>/<feature>``,
   layers ``influence`` and ``in_pruned``, the cell type in ``obs[groupby]``); per feature the
   graphs holding it, those whose pruned graph keeps it, and its largest influence.

Every feature has an anchor, :func:`feature_anchor` (``L03-F0123``), the id of its card on the
book's atlas page (:func:`feature_card_url`), stable across runs and profiles.

Searches return DataFrames, one row per matching feature; a gene, term or cell type that
matches nothing gives an empty table whose ``attrs["message"]`` (also logged) names the
nearest known ones.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from jaxtyping import Bool, Float
from scipy.stats import rankdata

from c2srepro._cache import atomic_directory, write_json_atomic
from c2srepro.enrichment import GeneSetLibrary, enrich, load_library
from c2srepro.features.interpret import InterpretRule, interpret_features
from c2srepro.features.stats import (
    DEFAULT_MIN_OCCURRENCES,
    LIVE_THRESHOLD_TABLE4,
    LayerFeatureStats,
    feature_key,
)
from c2srepro.features.table4 import INTERPRETABLE_FDR
from c2srepro.transcoder.model import LAYER_DIRECTORY

log = logging.getLogger(__name__)

ATLAS_FORMAT = "c2srepro-feature-atlas/1"
ATLAS_PAGE = "A2-feature-atlas.html"
SETTINGS_FILENAME = "atlas.json"
TABLES = ("features", "genes", "examples", "cells", "types", "terms", "graphs")
_GRAPH_NAME = re.compile(r"^L(\d+)/F?(\d+)$")

FEATURE_COLUMNS = [
    "anchor", "key", "layer", "feature", "freq", "log10_freq", "mean_act_firing", "max_act", "gene_share",
    "top_genes", "activating_tokens", "cell_frequency", "top_type", "top_auroc", "top_cells",
    "status", "top_term", "top_fdr", "library", "n_terms", "terms", "table3", "table3_reason",
    "n_graphs", "n_pruned", "max_influence",
]
GENE_COLUMNS = ["layer", "feature", "rank", "gene", "frequency", "firing_occurrences", "occurrences", "mean_act"]
# What for_type() returns beside the feature's summary.
TYPE_RESULT_COLUMNS = ["layer", "feature", "cell_type", "auroc", "mean_activation", "fraction_active"]
EXAMPLE_COLUMNS = ["layer", "feature", "rank", "activation", "token", "gene", "context"]
CELL_COLUMNS = ["layer", "feature", "rank", "cell_id", "cell_type", "activation"]
TYPE_COLUMNS = ["layer", "feature", "cell_type", "n_cells", "mean_activation", "median_activation", "max_activation",
                "fraction_active", "auroc"]
TERM_COLUMNS = ["layer", "feature", "library", "rank", "term", "fdr", "overlap", "genes"]
GRAPH_COLUMNS = ["layer", "feature", "cell_id", "cell_type", "influence", "in_pruned"]
# The columns a search shows first: enough to pick a feature and open its card.
SUMMARY_COLUMNS = ["anchor", "key", "layer", "feature", "log10_freq", "top_genes", "top_type", "top_auroc", "top_term",
                   "top_fdr", "table3", "n_graphs"]


def feature_anchor(layer: int, feature: int) -> str:
    """The id of a feature's card on the atlas page, e.g. ``"L03-F0123"`` (numbers zero-padded
    to at least 2 and 4 digits, so ids of one layer sort by feature)."""
    if int(layer) < 0 or int(feature) < 0:
        raise ValueError(f"layer and feature must be >= 0, got layer {layer}, feature {feature}")
    return f"L{int(layer):02d}-F{int(feature):04d}"


def feature_card_url(layer: int, feature: int, *, page: str = ATLAS_PAGE) -> str:
    """The link to a feature's card, relative to the book's chapter folder: ``A2-feature-atlas.html#L03-F0123``."""
    return f"{page}#{feature_anchor(layer, feature)}"


def specificity_auroc(
    activations: Float[np.ndarray, "cell feature"], is_type: Bool[np.ndarray, " cell"]
) -> Float[np.ndarray, " feature"]:
    """Per column, the AUROC of the activation for ``is_type`` against the rest (module docstring,
    step 3): (rank sum of the type's cells - n1 (n1 + 1) / 2) / (n1 n0), average ranks for ties."""
    activations = np.asarray(activations, dtype=np.float64)
    is_type = np.asarray(is_type, dtype=bool)
    if activations.ndim != 2 or len(is_type) != activations.shape[0]:
        raise ValueError(f"need activations [cells, features] and one flag per cell; got {activations.shape} "
                         f"and {is_type.shape}")
    n1 = int(is_type.sum())
    n0 = len(is_type) - n1
    if n1 == 0 or n0 == 0:
        raise ValueError(f"an AUROC needs cells of the type and others; got {n1} of the type, {n0} others")
    ranks = rankdata(activations, axis=0)
    return (ranks[is_type].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


@dataclass
class FeatureAtlas:
    """The atlas's tables (module docstring): ``features`` one row per live feature (index: its
    anchor), the others long tables keyed by (layer, feature). ``settings``: the options that
    made it, and the gene set libraries (name, version)."""

    features: pd.DataFrame
    genes: pd.DataFrame
    examples: pd.DataFrame
    cells: pd.DataFrame
    types: pd.DataFrame
    terms: pd.DataFrame
    graphs: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        layers = sorted(self.features["layer"].unique().tolist())
        return (f"FeatureAtlas: {len(self.features)} live features in layers {layers}, "
                f"{self.types['cell_type'].nunique()} cell types, {len(self.terms)} terms at FDR < "
                f"{self.settings.get('fdr')}, {self.graphs['cell_id'].nunique()} graphs")

    # ------------------------------------------------------------------ questions

    def search(self, *, gene: str | None = None, term: str | None = None, layer: int | None = None) -> pd.DataFrame:
        """Features whose top genes hold ``gene`` (a symbol, any case; best gene rank first), or
        with a term at FDR < fdr containing ``term`` (any case; smallest FDR first), optionally in
        one ``layer``. Nothing found: an empty table whose ``attrs["message"]`` names near matches."""
        if (gene is None) == (term is None):
            raise ValueError("search takes one of gene= or term=, e.g. atlas.search(gene='NKG7')")
        if gene is not None:
            hits = self.genes[self.genes["gene"].str.upper() == str(gene).strip().upper()]
            hits = hits.sort_values(["rank", "frequency"], ascending=[True, False], kind="stable")
            extra = hits.rename(columns={"rank": "gene_rank", "frequency": "gene_frequency"})[
                ["layer", "feature", "gene", "gene_rank", "gene_frequency"]]
            known, asked, what = self.genes["gene"].unique(), str(gene), "gene"
        else:
            wanted = str(term).strip().lower()
            hits = self.terms[self.terms["term"].str.lower().str.contains(wanted, regex=False)]
            hits = hits.sort_values(["fdr", "rank"], kind="stable").drop_duplicates(["layer", "feature"])
            extra = hits.rename(columns={"term": "matched_term", "fdr": "matched_fdr", "library": "matched_library"})[
                ["layer", "feature", "matched_term", "matched_fdr", "matched_library"]]
            known, asked, what = self.terms["term"].unique(), str(term), "term"
        if layer is not None:
            extra = extra[extra["layer"] == int(layer)]
        if extra.empty:
            return self._nothing(what, asked, known, columns=extra)
        return self._with_summary(extra)

    def for_type(self, cell_type: str, *, min_cells: int = 1) -> pd.DataFrame:
        """Features by their specificity AUROC for ``cell_type`` (exact label, else the one label
        it matches ignoring case), most specific first, with the type's mean activation and the
        share of its cells where the feature is active."""
        labels = self.types["cell_type"].unique()
        label = next((t for t in labels if t == cell_type), None)
        if label is None:
            folded = [t for t in labels if t.lower() == str(cell_type).strip().lower()]
            label = folded[0] if len(folded) == 1 else None
        if label is None:
            return self._nothing("cell type", str(cell_type), labels, columns=self.types[TYPE_RESULT_COLUMNS])
        rows = self.types[(self.types["cell_type"] == label) & (self.types["n_cells"] >= min_cells)]
        rows = rows.sort_values(["auroc", "mean_activation"], ascending=False, kind="stable")
        return self._with_summary(rows[TYPE_RESULT_COLUMNS])

    def labels(self, *, n_genes: int = 5, min_auroc: float = 0.7) -> dict[tuple[int, int], str]:
        """One line per feature for another viewer (circuit-tracer's feature label): its first
        ``n_genes`` top genes, the cell type it is most specific to where that AUROC reaches
        ``min_auroc``, and its top term at FDR < fdr."""
        if n_genes < 1:
            raise ValueError(f"n_genes must be >= 1, got {n_genes}")
        labels = {}
        for row in self.features.itertuples(index=False):
            genes = str(row.top_genes).split()[:n_genes] if isinstance(row.top_genes, str) else []
            parts = [f"top genes {', '.join(genes)}"] if genes else []
            if isinstance(row.top_type, str) and row.top_auroc >= min_auroc:
                parts.append(f"type {row.top_type} (AUROC {row.top_auroc:.2f})")
            if isinstance(row.top_term, str) and row.top_term:
                parts.append(f"term {row.top_term}")
            labels[(int(row.layer), int(row.feature))] = "; ".join(parts)
        return labels

    def card(self, layer: int, feature: int) -> dict[str, Any]:
        """Everything the atlas holds on one feature: ``summary`` (its row of ``features``) and
        its rows of every other table, under the table's name."""
        out: dict[str, Any] = {"summary": self._row(layer, feature)}
        for name in TABLES[1:]:
            table = getattr(self, name)
            out[name] = table[(table["layer"] == layer) & (table["feature"] == feature)].reset_index(drop=True)
        return out

    def cards(self, features: Sequence[tuple[int, int]]) -> Iterator[dict[str, Any]]:
        """:meth:`card` of each (layer, feature) in turn, every table grouped once (fast for many)."""
        rows = [self._row(layer, feature) for layer, feature in features]  # unknown features fail first
        if not rows:
            return
        wanted = pd.MultiIndex.from_tuples([(int(r["layer"]), int(r["feature"])) for r in rows])
        grouped = {}
        for name in TABLES[1:]:
            table = getattr(self, name)
            table = table[pd.MultiIndex.from_frame(table[["layer", "feature"]].astype(np.int64)).isin(wanted)]
            grouped[name] = {key: part.reset_index(drop=True) for key, part in
                             table.groupby(["layer", "feature"], sort=False)}
        for row in rows:
            key = (int(row["layer"]), int(row["feature"]))
            yield {"summary": row, **{name: grouped[name].get(key, getattr(self, name).iloc[:0]) for name in TABLES[1:]}}

    def _row(self, layer: int, feature: int) -> pd.Series:
        anchor = feature_anchor(layer, feature)
        if anchor not in self.features.index:
            raise ValueError(f"feature {feature_key(layer, feature)} is not in the atlas: it holds the live features "
                             f"(log10 E(f) >= {self.settings.get('live_threshold')}) of layers "
                             f"{sorted(self.features['layer'].unique().tolist())}")
        return self.features.loc[anchor]

    def _with_summary(self, rows: pd.DataFrame) -> pd.DataFrame:
        summary = self.features[[c for c in SUMMARY_COLUMNS if c not in ("layer", "feature")] + ["layer", "feature"]]
        merged = rows.merge(summary, on=["layer", "feature"], how="left", sort=False)
        first = ["anchor", "layer", "feature"]
        return merged[first + [c for c in merged.columns if c not in first]].reset_index(drop=True)

    def _nothing(self, what: str, asked: str, known, columns: pd.DataFrame) -> pd.DataFrame:
        known = sorted({str(k) for k in known})
        # Names sharing a word with the query first ("NK cell" -> "CD56+ NK"), then spelling neighbours.
        words = {w for w in re.findall(r"[\w+-]+", asked.lower()) if len(w) > 1}
        sharing = [k for k in known if words & set(re.findall(r"[\w+-]+", k.lower()))]
        near = list(dict.fromkeys(sharing[:5] + difflib.get_close_matches(asked, known, n=5, cutoff=0.5)))[:5]
        if what == "term" and not near:  # a word of a long term name is closer to that word than to the whole name
            vocabulary = sorted({w.lower() for k in known for w in re.findall(r"[A-Za-z][\w-]+", k)})
            near = difflib.get_close_matches(asked.lower(), vocabulary, n=5, cutoff=0.6)
        message = (f"no feature of the atlas has the {what} {asked!r}; nearest: {', '.join(near)}" if near
                   else f"no feature of the atlas has the {what} {asked!r}, nor anything close")
        log.warning("%s", message)
        # The columns a hit would have carried (gene_rank, matched_term, ...), so code that selects them runs.
        empty = self._with_summary(columns.iloc[:0])
        empty.attrs["message"] = message
        return empty

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike) -> Path:
        """Write each table as ``<name>.csv`` and the settings as ``atlas.json`` into ``directory``
        (replaced as a whole, atomically)."""
        directory = Path(directory)
        with atomic_directory(directory) as staging:
            for name in TABLES:
                getattr(self, name).to_csv(staging / f"{name}.csv", index=False)
            write_json_atomic(staging / SETTINGS_FILENAME, {"format": ATLAS_FORMAT, **self.settings})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FeatureAtlas":
        directory = Path(directory)
        path = directory / SETTINGS_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} written by FeatureAtlas.save()?")
        settings = json.loads(path.read_text())
        if settings.pop("format", None) != ATLAS_FORMAT:
            raise ValueError(f"{path} is not a {ATLAS_FORMAT} file")
        # Gene symbols and tokens such as "NA" are data: no NA parsing of text.
        tables = {name: pd.read_csv(directory / f"{name}.csv", keep_default_na=False, na_values={
            c: [""] for c in ("freq", "log10_freq", "mean_act_firing", "max_act", "gene_share", "cell_frequency",
                              "top_auroc", "top_fdr", "max_influence", "auroc", "mean_activation", "fraction_active",
                              "fdr", "frequency", "mean_act", "activation", "influence", "median_activation",
                              "max_activation")})
            for name in TABLES}
        tables["features"].index = pd.Index(tables["features"]["anchor"].tolist())
        return cls(**tables, settings=settings)


def feature_atlas(
    stats: Mapping[int, LayerFeatureStats],
    *,
    table4_features: pd.DataFrame | None = None,
    cells: Mapping[int, ad.AnnData] | None = None,
    graphs: ad.AnnData | None = None,
    libraries: Sequence[GeneSetLibrary | str] = (),
    groupby: str = "cell_type",
    live_threshold: float = LIVE_THRESHOLD_TABLE4,
    fdr: float = INTERPRETABLE_FDR,
    n_genes: int = 10,
    n_examples: int = 5,
    n_cells: int = 5,
    n_terms: int = 3,
    min_occurrences: int = DEFAULT_MIN_OCCURRENCES,
    rule: InterpretRule | None = None,
) -> FeatureAtlas:
    """The feature atlas of ``stats`` ({layer: LayerFeatureStats}, chapter 4), module docstring.

    ``table4_features``: Table 4's per-feature table (``Table4.features``, or chapter 5's
    ``features/layer_XX.csv`` with a ``layer`` column): its gene lists are tested against
    ``libraries`` and its verdicts copied. ``cells``: {layer: cells x features AnnData of
    cell-level activations} with the cell type in ``obs[groupby]``. ``graphs``: a cells x
    features cohort of graph influence with ``obs[groupby]``. Each is optional; what is not given
    leaves its columns empty. Nothing here runs the model.
    """
    if isinstance(stats, LayerFeatureStats):
        stats = {stats.layer: stats}
    if not stats:
        raise ValueError("no layers given: pass {layer: LayerFeatureStats}, e.g. load_feature_stats(results/feature_stats)")
    if not 0.0 < fdr <= 1.0:
        raise ValueError(f"fdr must be in (0, 1], got {fdr}")
    for name, value in (("n_genes", n_genes), ("n_examples", n_examples), ("n_cells", n_cells), ("n_terms", n_terms)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if table4_features is not None:
        missing = [c for c in ("layer", "feature", "genes", "status", "top_term", "top_fdr", "library")
                   if c not in table4_features.columns]
        if missing:
            raise ValueError(f"table4_features lacks columns {missing}: pass Table4.features, or chapter 5's "
                             "features/layer_XX.csv tables concatenated with a 'layer' column")
    libraries = [load_library(lib) if isinstance(lib, str) else lib for lib in libraries]
    if table4_features is not None and not libraries:
        raise ValueError("table4_features without libraries: pass the libraries Table 4 tested, e.g. "
                         "['GO_Biological_Process_2025', 'KEGG_2021_Human']")

    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    for layer in sorted(stats):
        layer_stats = stats[layer]
        if layer_stats.layer != layer:
            raise ValueError(f"statistics stored under layer {layer} say they are for layer {layer_stats.layer}")
        live = layer_stats.live_features(live_threshold)
        rows = layer_stats.features.set_index("feature").loc[live].reset_index()
        rows.insert(0, "layer", layer)
        judged = interpret_features(layer_stats, live, rule=rule)
        rows["activating_tokens"] = judged["activating_tokens"].to_numpy()
        rows["table3"] = judged["rule"].to_numpy()
        rows["table3_reason"] = judged["rule_reason"].to_numpy()
        parts["features"].append(rows)
        parts["genes"].append(_genes(layer_stats, live, n_genes, min_occurrences))
        parts["examples"].append(_examples(layer_stats, live, n_examples))
        if cells is not None:
            if layer not in cells:
                raise ValueError(f"cells has no AnnData for layer {layer}; it has layers {sorted(cells)}")
            top, by_type = _cells(cells[layer], layer, live, groupby=groupby, n_cells=n_cells)
            parts["cells"].append(top)
            parts["types"].append(by_type)

    features = pd.concat(parts["features"], ignore_index=True)
    genes = _concat(parts["genes"], GENE_COLUMNS)
    cell_table = _concat(parts["cells"], CELL_COLUMNS)
    types = _concat(parts["types"], TYPE_COLUMNS)
    terms = (_terms(table4_features, features, libraries, fdr=fdr, n_terms=n_terms)
             if table4_features is not None else pd.DataFrame(columns=TERM_COLUMNS))
    graph_table = _graphs(graphs, features, groupby=groupby) if graphs is not None else pd.DataFrame(columns=GRAPH_COLUMNS)

    table = _summary(features, genes, cell_table, types, terms, graph_table, table4_features, n_genes=n_genes)
    settings = {
        "live_threshold": live_threshold, "fdr": fdr, "n_genes": n_genes, "n_examples": n_examples,
        "n_cells": n_cells, "n_terms": n_terms, "min_occurrences": min_occurrences, "groupby": groupby,
        "rule": (rule or InterpretRule()).to_dict(),
        "libraries": [{"name": lib.name, "version": lib.version, "stand_in_for": lib.stand_in_for} for lib in libraries],
        "layers": sorted(int(layer) for layer in stats),
        "cells": {str(layer): int(a.n_obs) for layer, a in (cells or {}).items() if layer in stats},  # JSON keys
        "graphs": int(graphs.n_obs) if graphs is not None else 0,
    }
    return FeatureAtlas(table, genes, _concat(parts["examples"], EXAMPLE_COLUMNS), cell_table, types, terms,
                        graph_table, settings)


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _genes(stats: LayerFeatureStats, live: np.ndarray, n_genes: int, min_occurrences: int) -> pd.DataFrame:
    """The first ``n_genes`` rows of ``stats.gene_table(f)`` for every live f, in one pass over
    the sparse counts (a table per feature is slow for thousands of features)."""
    fire = stats.gene_fire_occurrences.tocoo()
    occurrences = stats.gene_occurrences[fire.col]
    keep = np.isin(fire.row, live) & (occurrences >= min_occurrences) & (fire.data > 0)
    row, col, fired, occurrences = fire.row[keep], fire.col[keep], fire.data[keep], occurrences[keep]
    frequency = fired / occurrences
    names = np.asarray(stats.genes, dtype=object)
    symbol_rank = np.argsort(np.argsort(names.astype(str), kind="stable"), kind="stable")
    # gene_table's order within a feature: frequency, then firing occurrences (descending), then symbol.
    order = np.lexsort((symbol_rank[col], -fired, -frequency, row))
    row, col, fired, occurrences, frequency = row[order], col[order], fired[order], occurrences[order], frequency[order]
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    rank = np.arange(len(row)) - np.repeat(starts, np.diff(np.r_[starts, len(row)]))
    top = rank < n_genes
    row, col, fired, occurrences, frequency, rank = (a[top] for a in (row, col, fired, occurrences, frequency, rank))
    tokens = _entries(stats.gene_fire_tokens, row, col)
    act = _entries(stats.gene_act_sum, row, col)
    return pd.DataFrame({
        "layer": stats.layer, "feature": row.astype(np.int64), "rank": rank + 1, "gene": names[col],
        "frequency": frequency, "firing_occurrences": fired.astype(np.int64), "occurrences": occurrences.astype(np.int64),
        "mean_act": act / np.maximum(tokens, 1),
    }, columns=GENE_COLUMNS)


def _entries(matrix, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """matrix[row[i], col[i]] as float64; scipy gives a sparse matrix, not a dense one, for no entries."""
    if len(row) == 0:
        return np.zeros(0, dtype=np.float64)
    return np.asarray(matrix[row, col], dtype=np.float64).ravel()


def _examples(stats: LayerFeatureStats, live: np.ndarray, n_examples: int) -> pd.DataFrame:
    kept = stats.examples[stats.examples["feature"].isin(live) & (stats.examples["rank"] < n_examples)]
    # "" for a token outside genes, as the CSV holds it
    kept = kept.sort_values(["feature", "rank"], kind="stable").assign(layer=stats.layer, gene=kept["gene"].fillna(""))
    return kept[EXAMPLE_COLUMNS].reset_index(drop=True)


def _cells(
    adata: ad.AnnData, layer: int, live: np.ndarray, *, groupby: str, n_cells: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The top cells per feature and the per-(feature, type) table of one layer (step 3)."""
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"cells[{layer}] must be an AnnData of cell-level activations (feature_activations), "
                        f"got {type(adata).__name__}")
    if groupby not in adata.obs.columns:
        raise ValueError(f"cells[{layer}].obs has no column {groupby!r} (the cell type); it has "
                         f"{list(adata.obs.columns)}: pass groupby=")
    if adata.n_vars <= int(live.max(initial=-1)):
        raise ValueError(f"cells[{layer}] has {adata.n_vars} features, but the statistics of layer {layer} have live "
                         f"feature {int(live.max())}: pass the activations of the same transcoders")
    matrix = adata.X[:, live]
    values = np.asarray(matrix.toarray() if sp.issparse(matrix) else matrix, dtype=np.float64)  # [cell, live]
    labels = adata.obs[groupby].astype(str).to_numpy()
    ids = adata.obs_names.to_numpy()

    order = np.argsort(-values, axis=0, kind="stable")[:n_cells]  # [n_cells, live]
    rank, column = np.meshgrid(np.arange(order.shape[0]), np.arange(len(live)), indexing="ij")
    picked = values[order, column]
    keep = (picked > 0).ravel()
    top = pd.DataFrame({
        "layer": layer, "feature": live[column.ravel()], "rank": rank.ravel() + 1,
        "cell_id": ids[order.ravel()], "cell_type": labels[order.ravel()], "activation": picked.ravel(),
    })[keep].sort_values(["feature", "rank"], kind="stable")

    frames = []
    kinds = sorted(set(labels))
    for kind in kinds:
        is_type = labels == kind
        frames.append(pd.DataFrame({
            "layer": layer, "feature": live, "cell_type": kind, "n_cells": int(is_type.sum()),
            "mean_activation": values[is_type].mean(axis=0), "median_activation": np.median(values[is_type], axis=0),
            "max_activation": values[is_type].max(axis=0), "fraction_active": (values[is_type] > 0).mean(axis=0),
            "auroc": specificity_auroc(values, is_type) if len(kinds) > 1 else np.nan,
        }))
    by_type = pd.concat(frames, ignore_index=True).sort_values(["feature", "cell_type"], kind="stable")
    return top[CELL_COLUMNS].reset_index(drop=True), by_type[TYPE_COLUMNS].reset_index(drop=True)


def _terms(table4: pd.DataFrame, features: pd.DataFrame, libraries, *, fdr: float, n_terms: int) -> pd.DataFrame:
    """The best ``n_terms`` terms per (feature, library) at FDR < ``fdr`` (step 4)."""
    live = set(zip(features["layer"].tolist(), features["feature"].tolist()))
    lists = {}
    for layer, feature, genes in table4[["layer", "feature", "genes"]].itertuples(index=False):
        key = (int(layer), int(feature))
        if key in live and isinstance(genes, str) and genes:
            lists[key] = genes.split(";")
    if not lists:
        return pd.DataFrame(columns=TERM_COLUMNS)
    result = enrich(lists, libraries, with_genes=True)
    result = result[result["Adjusted P-value"] < fdr]
    # Table 4's order within a feature: FDR, then combined score, library and term.
    result = result.sort_values(["query", "Gene_set", "Adjusted P-value", "Combined Score", "Term"],
                                ascending=[True, True, True, False, True], kind="stable")
    result = result.groupby(["query", "Gene_set"], sort=False).head(n_terms)
    keys = result["query"].tolist()
    table = pd.DataFrame({
        "layer": [k[0] for k in keys], "feature": [k[1] for k in keys], "library": result["Gene_set"].to_numpy(),
        "rank": result.groupby(["query", "Gene_set"], sort=False).cumcount().to_numpy() + 1,
        "term": result["Term"].to_numpy(), "fdr": result["Adjusted P-value"].astype(float).to_numpy(),
        "overlap": result["Overlap"].to_numpy(), "genes": result["Genes"].to_numpy(),
    })
    return table.sort_values(["layer", "feature", "library", "rank"], kind="stable")[TERM_COLUMNS].reset_index(drop=True)


def _graphs(cohort: ad.AnnData, features: pd.DataFrame, *, groupby: str) -> pd.DataFrame:
    """One row per (feature of the atlas, graph holding it) of the cohort (step 6)."""
    if not isinstance(cohort, ad.AnnData) or "influence" not in cohort.layers or "in_pruned" not in cohort.layers:
        raise ValueError("graphs must be a cells x features AnnData with layers 'influence' and 'in_pruned' "
                         "(c2srepro.biology.cohort.cohort_anndata(..., kind='features'))")
    if groupby not in cohort.obs.columns:
        raise ValueError(f"graphs.obs has no column {groupby!r} (the cell type); it has {list(cohort.obs.columns)}")
    parsed = [_GRAPH_NAME.match(str(name)) for name in cohort.var_names]
    bad = [name for name, m in zip(cohort.var_names, parsed) if m is None]
    if bad:
        raise ValueError(f"graph feature names {bad[:3]} are not L<layer>/<feature> (cohort_anndata's names)")
    layers = np.array([int(m.group(1)) for m in parsed])
    ids = np.array([int(m.group(2)) for m in parsed])
    influence = np.asarray(cohort.layers["influence"], dtype=np.float64)
    pruned = np.asarray(cohort.layers["in_pruned"]).astype(bool)
    cell, column = np.nonzero(influence != 0)  # a graph holds the nodes it gives an influence
    table = pd.DataFrame({
        "layer": layers[column], "feature": ids[column], "cell_id": cohort.obs_names.to_numpy()[cell],
        "cell_type": cohort.obs[groupby].astype(str).to_numpy()[cell], "influence": influence[cell, column],
        "in_pruned": pruned[cell, column],
    })
    table = table.merge(features[["layer", "feature"]], on=["layer", "feature"])
    return table.sort_values(["layer", "feature", "influence"], ascending=[True, True, False],
                             kind="stable")[GRAPH_COLUMNS].reset_index(drop=True)


def _joined(table: pd.DataFrame, keys: pd.MultiIndex, fmt, *, sep: str = "; ") -> list[str]:
    """Per (layer, feature) of ``keys``, the rows of ``table`` formatted by ``fmt`` and joined."""
    if table.empty:
        return [""] * len(keys)
    text = table.assign(_text=[fmt(r) for r in table.itertuples(index=False)])
    joined = text.groupby(["layer", "feature"], sort=False)["_text"].agg(sep.join)
    return joined.reindex(keys).fillna("").tolist()


def _summary(features, genes, cells, types, terms, graphs, table4, *, n_genes: int) -> pd.DataFrame:
    keys = pd.MultiIndex.from_frame(features[["layer", "feature"]].astype(np.int64))
    out = features.copy()
    out["anchor"] = [feature_anchor(l, f) for l, f in keys]
    out["key"] = [feature_key(l, f) for l, f in keys]
    out["top_genes"] = _joined(genes, keys, lambda r: r.gene, sep=" ")
    out["top_cells"] = _joined(cells, keys, lambda r: f"{r.cell_id} ({r.cell_type}, {r.activation:.3g})")
    if len(types):
        best = (types.dropna(subset=["auroc"]).sort_values(["auroc", "mean_activation"], ascending=False, kind="stable")
                .drop_duplicates(["layer", "feature"]).set_index(["layer", "feature"]))
        out["top_type"] = best["cell_type"].reindex(keys).fillna("").to_numpy()
        out["top_auroc"] = best["auroc"].reindex(keys).to_numpy()
        active = types.assign(_n=types["n_cells"] * types["fraction_active"]).groupby(["layer", "feature"])
        out["cell_frequency"] = (active["_n"].sum() / active["n_cells"].sum()).reindex(keys).to_numpy()
    else:
        out["top_type"], out["top_auroc"], out["cell_frequency"] = "", np.nan, np.nan
    if table4 is not None:
        verdict = table4.astype({"layer": np.int64, "feature": np.int64}).set_index(["layer", "feature"])
        for column in ("status", "top_term", "top_fdr", "library"):
            out[column] = verdict[column].reindex(keys).to_numpy()
        out[["status", "top_term", "library"]] = out[["status", "top_term", "library"]].fillna("")
    else:
        out["status"], out["top_term"], out["top_fdr"], out["library"] = "", "", np.nan, ""
    out["n_terms"] = terms.groupby(["layer", "feature"]).size().reindex(keys).fillna(0).astype(np.int64).to_numpy()
    out["terms"] = _joined(terms, keys, lambda r: f"{r.term} ({r.fdr:.2g})")
    if len(graphs):
        held = graphs.groupby(["layer", "feature"])
        out["n_graphs"] = held.size().reindex(keys).fillna(0).astype(np.int64).to_numpy()
        out["n_pruned"] = held["in_pruned"].sum().reindex(keys).fillna(0).astype(np.int64).to_numpy()
        out["max_influence"] = held["influence"].max().reindex(keys).to_numpy()
    else:
        out["n_graphs"], out["n_pruned"], out["max_influence"] = 0, 0, np.nan
    out.index = pd.Index(out["anchor"].tolist())
    return out[FEATURE_COLUMNS]


def save_cell_activations(cells: Mapping[int, ad.AnnData], directory: str | os.PathLike) -> Path:
    """Write {layer: cells x features AnnData} as ``directory/layer_XX.h5ad`` (the directory
    replaced as a whole, atomically)."""
    directory = Path(directory)
    with atomic_directory(directory) as staging:
        for layer, adata in sorted(cells.items()):
            adata.write_h5ad(staging / f"{LAYER_DIRECTORY.format(layer=int(layer))}.h5ad")
    return directory


def load_cell_activations(directory: str | os.PathLike) -> dict[int, ad.AnnData]:
    """{layer: AnnData} from ``directory/layer_XX.h5ad`` (written by :func:`save_cell_activations`)."""
    directory = Path(directory)
    found = sorted(directory.glob("layer_*.h5ad"))
    if not found:
        raise FileNotFoundError(f"no cell activations in {directory}: expected layer_XX.h5ad files from "
                                "save_cell_activations")
    return {int(p.stem.split("_")[1]): ad.read_h5ad(p) for p in found}
