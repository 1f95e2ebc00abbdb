"""Figures of the book (matplotlib/seaborn); each returns its Figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns


def plot_confusion(confusion: pd.DataFrame, *, title: str = "Held-out cells"):
    """Row-normalised confusion matrix, counts annotated."""
    fractions = confusion.div(confusion.sum(axis=1).clip(lower=1), axis=0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(confusion), 0.8 + 0.5 * len(confusion)))
    sns.heatmap(fractions, annot=confusion, fmt="d", cmap="Blues", vmin=0, vmax=1, cbar_kws={"label": "fraction of row"}, ax=ax)
    ax.set_xlabel("predicted cell type")
    ax.set_ylabel("annotated cell type")
    ax.set_title(title)
    fig.tight_layout()
    return fig
