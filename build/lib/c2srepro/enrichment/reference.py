"""gseapy.enrich as the independent reference for ``c2srepro.enrichment.enrich``.

1. ``gseapy_enrich`` runs one gene list through gseapy's own loop over terms, with the library
   passed as a dict (a string without ``.gmt`` would make gseapy look it up on Enrichr online)
   and ``outdir=None`` so nothing is written.
2. ``gseapy_enrich_many`` does so for every list and library and lays the rows out as
   ``enrich`` does (``query`` column, library names in ``Gene_set``, sorted by query, library,
   term); an empty list or one without hits gives no rows, as in ``enrich``.
3. ``compare_enrichment`` matches two such tables on (query, Gene_set, Term) and reports the
   largest relative difference of each statistic; overlap genes are compared as sets because
   gseapy joins them in set-iteration order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from c2srepro.enrichment.libraries import GeneSetLibrary
from c2srepro.enrichment.ora import COLUMNS

STAT_COLUMNS = ("P-value", "Adjusted P-value", "Odds Ratio", "Combined Score")


def gseapy_enrich(
    gene_list: Sequence[str], library: GeneSetLibrary, *, background: Sequence[str] | int | None = None
) -> pd.DataFrame:
    """gseapy.enrich on one gene list and one library, gseapy's columns, ``Gene_set`` = library name."""
    import gseapy  # heavy import, needed only for cross-checks

    genes = list(gene_list)
    if not [g for g in genes if str(g).strip()]:
        return pd.DataFrame(columns=COLUMNS[1:])
    bg = list(background) if background is not None and not isinstance(background, int) else background
    result = gseapy.enrich(
        gene_list=genes, gene_sets=library.to_dict(), background=bg, outdir=None, no_plot=True, verbose=False
    )
    table = result.res2d
    if table is None or len(table) == 0:
        return pd.DataFrame(columns=COLUMNS[1:])
    table = table.copy()
    table["Gene_set"] = library.name
    return table[COLUMNS[1:]].reset_index(drop=True)


def gseapy_enrich_many(
    gene_lists: Mapping[object, Sequence[str]],
    libraries: GeneSetLibrary | Sequence[GeneSetLibrary],
    *,
    background: Sequence[str] | int | None = None,
) -> pd.DataFrame:
    """``gseapy_enrich`` for every (list, library), laid out like ``enrich``'s table."""
    if isinstance(libraries, GeneSetLibrary):
        libraries = [libraries]
    frames = []
    for name, genes in gene_lists.items():
        for lib in libraries:
            table = gseapy_enrich(genes, lib, background=background)
            if len(table):
                table.insert(0, "query", [name] * len(table))
                frames.append(table)
    if not frames:
        return pd.DataFrame(columns=COLUMNS)
    return pd.concat(frames, ignore_index=True)


@dataclass
class EnrichmentComparison:
    """How two enrichment tables differ; ``max_rel_diff`` per statistic over the shared rows."""

    n_ours: int
    n_reference: int
    only_ours: list[tuple] = field(default_factory=list)
    only_reference: list[tuple] = field(default_factory=list)
    max_rel_diff: dict[str, float] = field(default_factory=dict)
    overlap_mismatches: int = 0
    genes_mismatches: int = 0

    def identical(self, rtol: float = 1e-9) -> bool:
        """Same rows, same overlaps and overlap genes, every statistic within ``rtol``."""
        return (
            not self.only_ours
            and not self.only_reference
            and self.overlap_mismatches == 0
            and self.genes_mismatches == 0
            and all(v <= rtol for v in self.max_rel_diff.values())
        )


def _relative_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # covers equal infinities and exact zeros
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(a - b) / np.maximum(np.abs(a), np.abs(b))
    return np.where(same, 0.0, np.nan_to_num(rel, nan=np.inf))


def compare_enrichment(ours: pd.DataFrame, reference: pd.DataFrame) -> EnrichmentComparison:
    """Match rows on (query, Gene_set, Term) and measure the differences."""
    left = ours.assign(_q=ours["query"].map(repr))
    right = reference.assign(_q=reference["query"].map(repr))
    key = ["_q", "Gene_set", "Term"]
    merged = left.merge(right, on=key, how="outer", suffixes=("", "_ref"), indicator=True)
    only_ours = [tuple(r) for r in merged.loc[merged["_merge"] == "left_only", key].itertuples(index=False)]
    only_ref = [tuple(r) for r in merged.loc[merged["_merge"] == "right_only", key].itertuples(index=False)]
    both = merged[merged["_merge"] == "both"]
    diffs = {
        col: float(_relative_difference(both[col].to_numpy(), both[f"{col}_ref"].to_numpy()).max(initial=0.0))
        for col in STAT_COLUMNS
    }
    overlap_bad = int((both["Overlap"].astype(str) != both["Overlap_ref"].astype(str)).sum())
    genes_bad = sum(
        set(str(a).split(";")) != set(str(b).split(";")) for a, b in zip(both["Genes"], both["Genes_ref"])
    )
    return EnrichmentComparison(
        n_ours=len(ours),
        n_reference=len(reference),
        only_ours=only_ours,
        only_reference=only_ref,
        max_rel_diff=diffs,
        overlap_mismatches=overlap_bad,
        genes_mismatches=genes_bad,
    )
