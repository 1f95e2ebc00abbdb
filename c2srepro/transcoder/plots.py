"""Figures of the transcoder variants (matplotlib); each returns its Figure.

``plot_frontier``: the sparsity frontier of ``bench/bench_frontier.py``, drawn in two panels:
1. mean L0 (log scale) against the fraction of loss recovered, and
2. mean L0 against the FVU,
one curve per variant (its settings joined in order of L0), the paper's setting (rows with
``paper_setting`` true) ringed in black, dashed curves for variants with a skip path.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
import pandas as pd

FRONTIER_COLUMNS = ("variant", "setting", "l0", "fraction_loss_recovered", "fvu", "dead_fraction", "paper_setting")


def plot_frontier(frame: pd.DataFrame, *, title: str | None = None):
    """L0 against fraction of loss recovered (left) and FVU (right), one curve per variant."""
    missing = [column for column in FRONTIER_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"the frontier table lacks columns {missing}: it should come from bench/bench_frontier.py")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {name: f"C{i}" for i, name in enumerate(sorted({v.split("+")[0] for v in frame["variant"]}))}
    paper = frame[frame["paper_setting"].astype(bool)]
    for ax, metric, label in zip(axes, ("fraction_loss_recovered", "fvu"), ("fraction of loss recovered", "FVU")):
        for variant, group in frame.groupby("variant", sort=True):
            group = group.sort_values("l0")
            ax.plot(group["l0"], group[metric], marker="o", markersize=4, color=colours[variant.split("+")[0]],
                    linestyle="--" if variant.endswith("+skip") else "-", label=variant)
        ax.scatter(paper["l0"], paper[metric], s=170, facecolors="none", edgecolors="black", linewidths=1.5,
                   label="paper's setting", zorder=5)
        ax.set(xscale="log", xlabel="mean L0 (active features per token)", ylabel=label)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # counts, not powers of ten
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
