"""Circuits of whole cell types: influence aggregated over a type's cells, contrasted under a null.

1. Per cell (:func:`cell_influence`): from its attribution graph, each gene's influence on the
   answer (token nodes merged, :func:`c2srepro.attribution.gene_view`) and each feature's
   (``L<layer>/<feature>``, summed over positions), and whether the influence-pruned graph holds
   it: a gene when one of its token nodes keeps an outgoing edge, a feature when its node is kept.
2. :func:`cohort_anndata`: cells x genes (or features) as an AnnData, influence in ``X`` and in
   ``layers["influence"]``, the 0/1 pruned-graph membership in ``layers["in_pruned"]``, the cell
   type in ``obs["type"]``, and 0/1 "the gene is in the cell's sentence" in
   ``layers["in_sentence"]``; a gene absent from a cell's sentence has influence 0. So
   ``sc.tl.rank_genes_groups(cohort, "type")`` ranks genes by influence as it ranks them by
   expression. :func:`aggregate` gives per type the mean influence and the fraction of cells
   whose pruned graph holds the gene.
3. :func:`permutation_null`: for each type T and gene g the statistic
   d = mean of g over T's cells - mean over the other cells; the type labels are shuffled among
   the cells ``n_permutations`` times (one seeded generator, ``rng.permutation`` per round), and
   p = (1 + #{rounds with d_perm >= d}) / (1 + n_permutations) for "drives T's answer more than
   other types'", with Benjamini-Hochberg FDR over the genes of each type.
4. :func:`compare_rankings`: ``rank_genes_groups`` (Wilcoxon) on influence and on expression of
   the same cells; per type the overlap of the two top-``n`` lists.
5. :func:`prerank_types`: ``gseapy.prerank`` (GSEA on a ranked list) of each type's contrast d
   against a gene set library. Only genes in the sentence of at least one of the type's cells are
   ranked (the others' d says nothing about the type's own answers), and equal values of d are
   ordered by the gene's mean influence over the type's cells, then by symbol: each tie is split by
   offsets far below the smallest gap between distinct values (:func:`break_ties`), so the result
   does not depend on gseapy's order for ties. Per type the best own marker term (a label-map term,
   :func:`c2srepro.biology.casestudy.label_marker_terms`), its place among the terms by NES and
   its FDR. :func:`shuffled_cohort` permutes the type labels (seeded) for the control.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch
from scipy.stats import false_discovery_control
from tqdm import tqdm

from c2srepro.attribution.full_graph import Graph, gene_view
from c2srepro.enrichment.libraries import GeneSetLibrary

log = logging.getLogger(__name__)

TYPE_COLUMN = "type"


@dataclass(frozen=True)
class CellInfluence:
    """One cell's gene and feature influence (indexed by gene / ``L<layer>/<feature>``)."""

    cell_id: str
    label: str
    genes: pd.DataFrame  # columns influence, in_pruned
    features: pd.DataFrame  # columns influence, in_pruned


def cell_influence(
    graph: Graph, *, cell_id: str, label: str, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> CellInfluence:
    """Gene and feature influence of one cell's graph, and pruned-graph membership (module docstring, step 1)."""
    genes = gene_view(graph).genes.set_index("gene")[["influence"]]
    pruned = graph.prune(node_threshold=node_threshold, edge_threshold=edge_threshold)
    has_out = (pruned.adjacency != 0).any(dim=0).numpy()
    tokens = pruned.nodes[(pruned.nodes["kind"] == "embedding") & has_out]
    genes["in_pruned"] = genes.index.isin(tokens["gene"].dropna())

    nodes = graph.nodes
    features = nodes["kind"].to_numpy() == "feature"
    names = ("L" + nodes["layer"].astype(str) + "/" + nodes["feature"].astype(str))[features]
    influence = graph.node_influence().to(torch.float64).numpy()[features]
    kept = set(pruned.nodes.loc[pruned.nodes["kind"] == "feature", "node_id"])
    in_pruned = nodes.loc[features, "node_id"].isin(kept).to_numpy()
    frame = pd.DataFrame({"name": names.to_numpy(), "influence": influence, "in_pruned": in_pruned})
    feature_table = frame.groupby("name").agg(influence=("influence", "sum"), in_pruned=("in_pruned", "any"))
    return CellInfluence(cell_id, label, genes, feature_table)


def cohort_anndata(cells: Sequence[CellInfluence], *, kind: str = "genes") -> ad.AnnData:
    """Cells x genes (``kind="genes"``) or x features (``"features"``) of influence (module docstring, step 2)."""
    if kind not in ("genes", "features"):
        raise ValueError(f"kind must be 'genes' or 'features', got {kind!r}")
    if not cells:
        raise ValueError("no cells: compute cell_influence for at least one cell")
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"cell ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    tables = [getattr(c, kind) for c in cells]
    names = list(dict.fromkeys(name for t in tables for name in t.index))
    influence = np.zeros((len(cells), len(names)))
    in_pruned = np.zeros((len(cells), len(names)))
    in_sentence = np.zeros((len(cells), len(names)))
    column = {name: j for j, name in enumerate(names)}
    for i, t in enumerate(tables):
        cols = [column[n] for n in t.index]
        influence[i, cols] = t["influence"].to_numpy()
        in_pruned[i, cols] = t["in_pruned"].to_numpy(dtype=float)
        in_sentence[i, cols] = 1.0
    obs = pd.DataFrame({TYPE_COLUMN: pd.Categorical([c.label for c in cells])}, index=ids)
    cohort = ad.AnnData(X=influence.copy(), obs=obs, var=pd.DataFrame(index=pd.Index(names, name=kind[:-1])))
    cohort.layers["influence"] = influence
    cohort.layers["in_pruned"] = in_pruned
    cohort.layers["in_sentence"] = in_sentence
    return cohort


def _require_types(cohort: ad.AnnData, groupby: str) -> np.ndarray:
    if not isinstance(cohort, ad.AnnData):
        raise TypeError(f"expected an AnnData cohort (cohort_anndata(...)), got {type(cohort).__name__}")
    if groupby not in cohort.obs.columns:
        raise ValueError(f"{groupby!r} is not in the cohort's obs; available: {list(cohort.obs.columns)}")
    labels = cohort.obs[groupby].astype(str).to_numpy()
    if len(set(labels)) < 2:
        raise ValueError(f"a contrast needs at least two cell types in obs[{groupby!r}], got {sorted(set(labels))}")
    return labels


def aggregate(cohort: ad.AnnData, *, groupby: str = TYPE_COLUMN) -> pd.DataFrame:
    """Per (type, gene): mean influence and the fraction of the type's cells whose pruned graph holds it."""
    labels = _require_types(cohort, groupby)
    influence = pd.DataFrame(np.asarray(cohort.layers["influence"]), columns=cohort.var_names)
    pruned = pd.DataFrame(np.asarray(cohort.layers["in_pruned"]), columns=cohort.var_names)
    mean = influence.groupby(labels).mean().stack().rename("mean_influence")
    held = pruned.groupby(labels).mean().stack().rename("fraction_in_pruned")
    table = pd.concat([mean, held], axis=1).rename_axis([groupby, cohort.var_names.name or "name"]).reset_index()
    return table


def _contrast(values: np.ndarray, onehot: np.ndarray) -> np.ndarray:
    """[types, genes]: mean over each type's cells minus mean over the other cells."""
    counts = onehot.sum(axis=0)[:, None]
    inside = onehot.T @ values
    total = values.sum(axis=0, keepdims=True)
    return inside / counts - (total - inside) / (len(values) - counts)


def permutation_null(
    cohort: ad.AnnData,
    *,
    groupby: str = TYPE_COLUMN,
    layer: str | None = "influence",
    n_permutations: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Per (type, gene): the contrast, its permutation p-value and FDR (module docstring, step 3)."""
    labels = _require_types(cohort, groupby)
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    values = np.asarray(cohort.X if layer is None else cohort.layers[layer], dtype=float)
    types = sorted(set(labels))
    onehot = (labels[:, None] == np.array(types)[None, :]).astype(float)
    observed = _contrast(values, onehot)
    exceed = np.zeros_like(observed)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(n_permutations), desc="permutation null", disable=not progress):
        exceed += _contrast(values, onehot[rng.permutation(len(labels))]) >= observed
    p = (1.0 + exceed) / (1.0 + n_permutations)
    fdr = np.vstack([false_discovery_control(row, method="bh") for row in p])
    names = cohort.var_names
    return pd.DataFrame({
        groupby: np.repeat(types, len(names)),
        names.name or "name": np.tile(np.asarray(names), len(types)),
        "contrast": observed.ravel(),
        "p_value": p.ravel(),
        "fdr": fdr.ravel(),
    })


def top_by_type(null: pd.DataFrame, *, n: int = 10, groupby: str = TYPE_COLUMN) -> pd.DataFrame:
    """The ``n`` genes of largest contrast per type (p-value and FDR beside them)."""
    return (null.sort_values([groupby, "contrast"], ascending=[True, False], kind="stable")
            .groupby(groupby, sort=True).head(n).reset_index(drop=True))


def compare_rankings(
    influence: ad.AnnData, expression: ad.AnnData, *, groupby: str = TYPE_COLUMN, n: int = 20
) -> pd.DataFrame:
    """Per type: the top-``n`` genes by influence and by expression (Wilcoxon ``rank_genes_groups``
    on each, over the same cells) and their overlap."""
    import scanpy as sc

    _require_types(influence, groupby)
    if groupby not in expression.obs.columns:
        raise ValueError(f"{groupby!r} is not in the expression AnnData's obs; available: {list(expression.obs.columns)}")
    if list(influence.obs_names) != list(expression.obs_names):
        raise ValueError("the influence and expression AnnData must hold the same cells in the same order")
    ranked = {}
    for name, adata in (("influence", influence), ("expression", expression)):
        copy = adata.copy()
        copy.obs[groupby] = copy.obs[groupby].astype("category")
        sc.tl.rank_genes_groups(copy, groupby, method="wilcoxon")
        ranked[name] = copy.uns["rank_genes_groups"]["names"]
    rows = []
    for group in sorted(set(influence.obs[groupby].astype(str))):
        by_influence = [str(g) for g in ranked["influence"][group][:n]]
        by_expression = [str(g) for g in ranked["expression"][group][:n]]
        rows.append({groupby: group, "top_influence": ", ".join(by_influence[:5]),
                     "top_expression": ", ".join(by_expression[:5]),
                     f"overlap_top{n}": len(set(by_influence) & set(by_expression))})
    return pd.DataFrame(rows)


def shuffled_cohort(cohort: ad.AnnData, *, groupby: str = TYPE_COLUMN, seed: int = 0) -> ad.AnnData:
    """A copy with the type labels permuted among the cells (the label-shuffled control)."""
    labels = _require_types(cohort, groupby)
    copy = cohort.copy()
    copy.obs[groupby] = pd.Categorical(labels[np.random.default_rng(seed).permutation(len(labels))])
    return copy


def break_ties(values: pd.Series, tiebreak: pd.Series) -> pd.Series:
    """``values`` with each run of equal values split, in descending ``tiebreak`` and then ascending name,
    by offsets below a third of the smallest gap between distinct values (module docstring, step 5)."""
    order = np.lexsort((values.index.to_numpy(dtype=str), -tiebreak.reindex(values.index).to_numpy(dtype=float),
                        -values.to_numpy(dtype=float)))
    ranked = values.to_numpy(dtype=float)[order]
    gaps = np.diff(np.unique(ranked))
    scale = gaps.min() if gaps.size else (abs(float(ranked[0])) or 1.0)
    n = len(ranked)
    tie_start = np.maximum.accumulate(np.where(np.r_[True, np.diff(ranked) != 0], np.arange(n), 0))
    out = np.empty(n)
    out[order] = ranked - scale / 3 * (np.arange(n) - tie_start) / n
    return pd.Series(out, index=values.index, name=values.name)


def prerank(ranking: pd.Series, library: GeneSetLibrary, *, permutation_num: int = 1000, seed: int = 0,
            min_size: int = 5, max_size: int = 500) -> pd.DataFrame:
    """``gseapy.prerank`` of one ranked gene list (gene -> score) against ``library``; its ``res2d``
    sorted by NES (descending), one thread, nothing written to disk."""
    import gseapy

    if not isinstance(library, GeneSetLibrary):
        raise TypeError(f"library must be a GeneSetLibrary (load_library(name)), got {type(library).__name__}")
    ranking = ranking.dropna()
    if ranking.index.has_duplicates:
        raise ValueError(f"the ranking repeats genes: {sorted(set(ranking.index[ranking.index.duplicated()]))[:5]}")
    overlap = ranking.index.isin(list(library.genes))
    if not overlap.any():
        raise ValueError(f"no gene of the ranking is in library {library.name!r}: check the symbols' case")
    ranked = set(ranking.index)
    sizes = [len(genes & ranked) for genes in library.sets.values()]
    if not any(min_size <= size <= max_size for size in sizes):
        # gseapy raises on a library with no testable set; an empty table says the same plainly
        log.info("prerank: no set of %s has %d..%d of the ranking's genes", library.name, min_size, max_size)
        return pd.DataFrame(columns=["Name", "Term", "ES", "NES", "NOM p-val", "FDR q-val", "FWER p-val",
                                     "Tag %", "Gene %", "Lead_genes"])
    result = gseapy.prerank(rnk=ranking, gene_sets=library.to_dict(), permutation_num=permutation_num, seed=seed,
                            min_size=min_size, max_size=max_size, threads=1, outdir=None, no_plot=True,
                            verbose=False)
    table = result.res2d.copy()
    for column in ("ES", "NES", "NOM p-val", "FDR q-val", "FWER p-val"):
        table[column] = table[column].astype(float)
    return table.sort_values(["NES", "Term"], ascending=[False, True], kind="stable").reset_index(drop=True)


def prerank_types(
    cohort: ad.AnnData,
    library: GeneSetLibrary,
    own_terms: Mapping[str, Sequence[str]],
    *,
    groupby: str = TYPE_COLUMN,
    types: Sequence[str] | None = None,
    permutation_num: int = 1000,
    seed: int = 0,
    min_size: int = 5,
    max_size: int = 500,
) -> pd.DataFrame:
    """Per type: prerank of its contrast (module docstring, step 5), the top term, and the best own term
    (``own_terms[type]``) with its place by NES (1 = first), NES and FDR."""
    labels = _require_types(cohort, groupby)
    types = sorted(set(labels)) if types is None else list(types)
    unknown = sorted(set(types) - set(labels))
    if unknown:
        raise ValueError(f"types {unknown} have no cells in the cohort; its types: {sorted(set(labels))}")
    if "in_sentence" not in cohort.layers:
        raise ValueError("the cohort has no layers['in_sentence']: build it with cohort_anndata (c2srepro >= 0.2)")
    values = np.asarray(cohort.layers["influence"], dtype=float)
    in_sentence = np.asarray(cohort.layers["in_sentence"], dtype=bool)
    all_types = sorted(set(labels))
    contrast = _contrast(values, (labels[:, None] == np.array(all_types)[None, :]).astype(float))
    rows = []
    for group in types:
        own_cells = labels == group
        ranked = in_sentence[own_cells].any(axis=0)
        ranking = break_ties(pd.Series(contrast[all_types.index(group)][ranked], index=cohort.var_names[ranked]),
                             pd.Series(values[own_cells][:, ranked].mean(axis=0), index=cohort.var_names[ranked]))
        table = prerank(ranking, library, permutation_num=permutation_num, seed=seed, min_size=min_size,
                        max_size=max_size)
        own = table[table["Term"].isin(list(own_terms.get(group, ())))]
        row = {groupby: group, "top_term": table["Term"].iloc[0] if len(table) else None,
               "top_fdr": table["FDR q-val"].iloc[0] if len(table) else np.nan,
               "own_term": None, "own_place": np.nan, "own_nes": np.nan, "own_fdr": np.nan}
        if len(own):
            best = own.index[0]
            row.update(own_term=own["Term"].iloc[0], own_place=int(best) + 1, own_nes=float(own["NES"].iloc[0]),
                       own_fdr=float(own["FDR q-val"].iloc[0]))
        row["own_first"] = row["own_place"] == 1
        rows.append(row)
    return pd.DataFrame(rows)
