"""Figures of the faithfulness benchmark (:mod:`c2srepro.biology.benchmark`): curves with bands, NAOPC by type,
one cell's predicted against observed effects."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from c2srepro.biology.benchmark import ANTI_ORACLE, ORACLE

_CURVE_LABELS = {
    "deletion": "drop of the target when the top k genes are removed",
    "insertion": "target with the top k genes alone",
    "controls": "drop of the target (oracle's top k genes)",
}


def _colours(names: Sequence[str]) -> dict[str, tuple]:
    # the bounds are grey, so the predictors' colours read as the comparison
    palette = iter(plt.cm.tab10.colors)
    return {n: ((0.25, 0.25, 0.25) if n == ORACLE else (0.65, 0.65, 0.65) if n == ANTI_ORACLE else next(palette))
            for n in names}


def plot_curves(curves: pd.DataFrame, *, curve: str = "deletion", target: str = "target", ax=None):
    """Mean curve of each ordering over cells with its 95% bootstrap band (:func:`pooled_curves`' table)."""
    if curve not in _CURVE_LABELS:
        raise ValueError(f"curve must be one of {list(_CURVE_LABELS)}, got {curve!r}")
    missing = {"ordering", "k", "mean", "low", "high"} - set(curves.columns)
    if missing:
        raise ValueError(f"curves lack columns {sorted(missing)}: pass pooled_curves(...)'s table")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    names = list(dict.fromkeys(curves["ordering"]))
    colours = _colours(names)
    for name in names:
        rows = curves[curves["ordering"] == name].sort_values("k")
        dashed = name in (ORACLE, ANTI_ORACLE)
        ax.plot(rows["k"], rows["mean"], color=colours[name], lw=1.4, ls="--" if dashed else "-", label=name)
        ax.fill_between(rows["k"], rows["low"], rows["high"], color=colours[name], alpha=0.15, lw=0)
    ax.set_xlabel("k (genes)")
    ax.set_ylabel(f"{_CURVE_LABELS[curve]}\n({target})", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=6, ncol=2, frameon=False)
    return ax


def plot_naopc_by_type(scores: pd.DataFrame, *, column: str = "naopc_deletion", orderings: Sequence[str] | None = None,
                       ax=None):
    """Per ordering, the distribution over cells of one score (boxes), grouped by cell type (:func:`scores_table`)."""
    missing = {"cell_type", "ordering", column} - set(scores.columns)
    if missing:
        raise ValueError(f"scores lack columns {sorted(missing)}: pass scores_table(...)'s table")
    orderings = list(dict.fromkeys(scores["ordering"])) if orderings is None else list(orderings)
    types = sorted(scores["cell_type"].dropna().unique())
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.6))
    colours = _colours(orderings)
    width = 0.8 / len(orderings)
    for j, name in enumerate(orderings):
        data = [scores.loc[(scores["cell_type"] == t) & (scores["ordering"] == name), column].dropna() for t in types]
        positions = [i + (j - (len(orderings) - 1) / 2) * width for i in range(len(types))]
        boxes = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
        for box in boxes["boxes"]:
            box.set_facecolor(colours[name])
        ax.plot([], [], color=colours[name], lw=6, label=name)
    ax.set_xticks(range(len(types)), [t.replace("/", "/\n") for t in types], fontsize=6)
    ax.set_ylabel(column.replace("_", " "))
    ax.legend(fontsize=6, ncol=4, loc="lower right", frameon=False)
    return ax


def plot_predicted_vs_observed(genes: pd.DataFrame, predictor: str, *, observed: str = "observed", label: str = "label",
                               n_named: int = 5, ax=None):
    """One cell: a predictor against the observed removal effect, both positive where the gene supports the label."""
    missing = {"gene", predictor, observed} - set(genes.columns)
    if missing:
        raise ValueError(f"genes lack columns {sorted(missing)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3.6, 3.2))
    if "sentence_rank" in genes.columns:
        ax.scatter(genes[predictor], genes[observed], c=genes["sentence_rank"], cmap="viridis_r", s=14)
    else:
        ax.scatter(genes[predictor], genes[observed], s=14)
    for _, row in genes.reindex(genes[observed].abs().sort_values(ascending=False).index[:n_named]).iterrows():
        ax.annotate(row["gene"], (row[predictor], row[observed]), fontsize=6)
    ax.axhline(0, color="0.7", lw=0.6)
    ax.axvline(0, color="0.7", lw=0.6)
    ax.set_xlabel(f"{predictor}: predicted support for {label}", fontsize=8)
    ax.set_ylabel(f"observed: drop of {label} when removed", fontsize=8)
    return ax
