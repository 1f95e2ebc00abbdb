"""Figures of the feature chapters; each returns its matplotlib Figure.

1. ``plot_feature_frequency``: Figure 3, the histogram of log10 E(f) over one layer's features
   that fire at all, with the live threshold marked and the live / dead counts in the title.
2. ``plot_interpretable_fraction``: Table 4 as a line plot, the fraction of live features with
   an enriched term per layer beside each null control's fraction.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from c2srepro.features.stats import LIVE_THRESHOLD_FIGURE3, LayerFeatureStats

_NULL_LABELS = {"random_fraction": "random gene lists (null)", "permutation_fraction": "permuted gene labels (null)"}


def plot_feature_frequency(
    stats: LayerFeatureStats, *, threshold: float = LIVE_THRESHOLD_FIGURE3, bins: int = 40, ax=None
):
    """Histogram of log10 E(f) for one layer, the live threshold as a dashed line."""
    log_freq = stats.features["log10_freq"].to_numpy()
    firing = log_freq[np.isfinite(log_freq)]
    live = int((log_freq >= threshold).sum())
    dead = int((~np.isfinite(log_freq)).sum())
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.0, 3.6))
    ax.hist(firing, bins=bins, color="#4c72b0", edgecolor="white")
    ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"live: log10 E(f) >= {threshold:g}")
    ax.set_xlabel("log10 E(f)  (firing frequency per token)")
    ax.set_ylabel("features")
    ax.set_title(f"Layer {stats.layer}: {live} live of {stats.d_tc} features ({dead} never fire)")
    ax.legend(loc="upper left", frameon=False)
    fig.tight_layout()
    return fig


def plot_interpretable_fraction(summary: pd.DataFrame, *, ax=None):
    """Fraction of live features with a term at FDR < 0.05 per layer, with the null fractions.

    ``summary`` is ``Table4.summary`` (columns layer, fraction, and ``*_fraction`` per null).
    """
    missing = [c for c in ("layer", "fraction") if c not in summary.columns]
    if missing:
        raise ValueError(f"summary lacks columns {missing}: pass Table4.summary")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.5, 3.6))
    ax.plot(summary["layer"], summary["fraction"], marker="o", color="#4c72b0", label="transcoder features")
    nulls = [c for c in summary.columns if c.endswith("_fraction") and c != "fraction"]
    for column, color in zip(nulls, ("#8c8c8c", "#dd8452", "#55a868")):
        ax.plot(
            summary["layer"], summary[column], marker="s", linestyle="--", color=color,
            label=_NULL_LABELS.get(column, column.removesuffix("_fraction")),
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction biologically interpretable")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(summary["layer"].tolist())
    ax.legend(frameon=False, loc="lower right")
    fig.tight_layout()
    return fig
