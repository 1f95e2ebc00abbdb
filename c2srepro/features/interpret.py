"""Table 3: randomly chosen live features, their activating tokens, and gene-level interpretability.

The paper's judgement was human: a feature is "gene-level interpretable" when it consistently
fires on tokens of specific genes or of a gene family. ``InterpretRule`` is an automatic,
documented stand-in, which a CSV of human labels overrides feature by feature.

1. Sample ``n`` live features (log10 E(f) >= -4, the paper's Figure 3 threshold) with a seeded
   generator, in the sampled order.
2. Activating tokens: among the feature's top examples, the dominant token string (most
   frequent; ties go to the one reaching the higher activation) and the genes it lies in, e.g.
   ``"PSD token in PSD3"``; when no token holds ``min_token_share`` of the examples the summary
   lists the three most frequent ones as ``"mixed tokens: ..."``.
3. The rule, on C_g = firing tokens of the feature inside gene g, G = sum_g C_g and n_f = all
   firing tokens:
     a. No when G < ``min_gene_firings`` (too little evidence) or G / n_f < ``min_gene_share``
        (it fires mostly on template text, e.g. a delimiter or position feature);
     b. Yes ("specific genes") when the ``top_genes`` genes with the largest C_g hold at least
        ``min_top_share`` of G;
     c. Yes ("family") when the genes of one symbol family (same leading run of letters of at
        least ``min_stem_length``: PTPN11, PTPN12 -> PTPN; FOXO1, FOXO3 -> FOXO) number at least
        ``min_family_genes`` and hold at least ``min_family_share`` of G;
     d. No otherwise (diffuse over many unrelated genes, like a sub-word shared by many symbols).
4. Human labels (CSV with columns ``feature`` and ``gene_level_interpretable``, values yes/no,
   true/false or 1/0, an optional ``layer`` column) replace the rule's answer for the features
   they name; the ``source`` column says which answer is shown.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from c2srepro.features.stats import LIVE_THRESHOLD_FIGURE3, LayerFeatureStats
from c2srepro._config import config_from_dict

log = logging.getLogger(__name__)

TABLE3_FEATURES = 20
HUMAN_LABEL_COLUMNS = ("feature", "gene_level_interpretable")
_TRUE = {"yes", "y", "true", "1"}
_FALSE = {"no", "n", "false", "0"}
_STEM = re.compile(r"[A-Za-z]+")
TABLE3_COLUMNS = [
    "feature",
    "log10_freq",
    "activating_tokens",
    "gene_level_interpretable",
    "source",
    "rule",
    "rule_reason",
    "top_genes",
    "gene_share",
    "top_share",
    "family",
    "family_share",
]


@dataclass
class InterpretRule:
    """Thresholds of the automatic gene-level interpretability rule (module docstring, step 3)."""

    min_gene_firings: int = 5
    min_gene_share: float = 0.5
    top_genes: int = 3
    min_top_share: float = 0.5
    min_family_genes: int = 2
    min_family_share: float = 0.5
    min_stem_length: int = 3
    min_token_share: float = 0.5

    def __post_init__(self) -> None:
        for name in ("min_gene_share", "min_top_share", "min_family_share", "min_token_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"InterpretRule.{name} must be in (0, 1], got {value}")
        for name in ("min_gene_firings", "top_genes", "min_family_genes", "min_stem_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"InterpretRule.{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InterpretRule":
        return config_from_dict(cls, data)


def sample_live_features(
    stats: LayerFeatureStats, *, n: int = TABLE3_FEATURES, live_threshold: float = LIVE_THRESHOLD_FIGURE3, seed: int = 0
) -> np.ndarray:
    """``n`` live features drawn without replacement (all of them, shuffled, when fewer are live)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    live = stats.live_features(live_threshold)
    if len(live) < n:
        log.warning(
            "layer %d has %d live features (log10 E(f) >= %g), fewer than %d", stats.layer, len(live), live_threshold, n
        )
    return np.random.default_rng(seed).permutation(live)[: min(n, len(live))]


def symbol_family(symbol: str, *, min_stem_length: int = 3) -> str | None:
    """The leading run of letters of a gene symbol (PTPN11 -> PTPN), None if shorter than ``min_stem_length``."""
    match = _STEM.match(symbol)
    stem = match.group(0).upper() if match else ""
    return stem if len(stem) >= min_stem_length else None


def activating_tokens(examples: pd.DataFrame, *, max_genes: int = 3, min_token_share: float = 0.5) -> str:
    """A Table-3-style summary of top examples (columns token, gene, rank): module docstring, step 2."""
    if examples.empty:
        return "no firing examples"
    ordered = examples.sort_values("rank", kind="stable")
    tokens = ordered["token"].tolist()
    # Counter keeps first appearance order, and a stable sort keeps it among equal counts.
    counts = sorted(Counter(tokens).items(), key=lambda item: -item[1])
    token, count = counts[0]
    if count / len(tokens) < min_token_share:
        listed = ", ".join(f"{t} ({c})" for t, c in counts[:3])
        return f"mixed tokens: {listed}"
    genes = [g for t, g in zip(tokens, ordered["gene"].tolist()) if t == token and pd.notna(g)]
    if not genes:
        return f"{token} token in template text"
    gene_counts = [g for g, _ in sorted(Counter(genes).items(), key=lambda item: -item[1])]
    names = ", ".join(gene_counts[:max_genes])
    more = ", ..." if len(gene_counts) > max_genes else ""
    return f"{token} token in {names}{more}"


def _judge(stats: LayerFeatureStats, feature: int, rule: InterpretRule) -> dict[str, Any]:
    """The rule's verdict on one feature with the numbers it rests on."""
    n_fire = int(stats.features.at[feature, "n_fire"])
    row = stats.gene_fire_tokens[feature]
    counts = row.data.astype(np.float64)
    genes = np.asarray(stats.genes, dtype=object)[row.indices]
    total = counts.sum()
    out: dict[str, Any] = {
        "top_genes": "",
        "gene_share": total / n_fire if n_fire else np.nan,
        "top_share": np.nan,
        "family": "",
        "family_share": np.nan,
    }
    if total > 0:
        order = np.lexsort((genes.astype(str), -counts))
        top = order[: rule.top_genes]
        out["top_genes"] = ", ".join(genes[top])
        out["top_share"] = counts[top].sum() / total
        share: dict[str, float] = {}
        size: Counter = Counter()
        for gene, count in zip(genes.tolist(), counts.tolist()):
            family = symbol_family(gene, min_stem_length=rule.min_stem_length)
            if family is not None:
                share[family] = share.get(family, 0.0) + count
                size[family] += 1
        # Largest share first, ties by family name.
        eligible = [f for f in sorted(share, key=lambda f: (-share[f], f)) if size[f] >= rule.min_family_genes]
        if eligible:
            out["family"] = f"{eligible[0]}*"
            out["family_share"] = share[eligible[0]] / total

    if n_fire == 0:
        verdict, reason = False, "never fires"
    elif total < rule.min_gene_firings:
        verdict, reason = False, f"{int(total)} gene-token firings (< {rule.min_gene_firings})"
    elif out["gene_share"] < rule.min_gene_share:
        verdict, reason = False, f"fires mostly outside genes ({out['gene_share']:.0%} on gene tokens)"
    elif out["top_share"] >= rule.min_top_share:
        verdict, reason = True, f"top {rule.top_genes} genes hold {out['top_share']:.0%} of gene firings"
    elif out["family"] and out["family_share"] >= rule.min_family_share:
        verdict, reason = True, f"family {out['family']} holds {out['family_share']:.0%} of gene firings"
    else:
        verdict, reason = False, f"diffuse over {len(genes)} genes"
    out["rule"] = "Yes" if verdict else "No"
    out["rule_reason"] = reason
    return out


def interpret_features(
    stats: LayerFeatureStats, features: Sequence[int], *, rule: InterpretRule | None = None
) -> pd.DataFrame:
    """The Table 3 columns for ``features`` (in the given order), judged by ``rule`` alone."""
    rule = rule or InterpretRule()
    # One pass over the examples for all features (a filter per feature is slow for thousands).
    by_feature = dict(tuple(stats.examples.groupby("feature", sort=False)))
    none = stats.examples.iloc[:0]
    rows = []
    for feature in features:
        f = stats.check_feature(feature)
        row = {
            "feature": f,
            "log10_freq": float(stats.features.at[f, "log10_freq"]),
            "activating_tokens": activating_tokens(by_feature.get(f, none), min_token_share=rule.min_token_share),
        }
        row.update(_judge(stats, f, rule))
        row["gene_level_interpretable"] = row["rule"]
        row["source"] = "rule"
        rows.append(row)
    return pd.DataFrame(rows, columns=TABLE3_COLUMNS)


def read_human_labels(path: str | os.PathLike, *, layer: int | None = None) -> dict[int, str]:
    """{feature: "Yes"/"No"} from a CSV of human labels (module docstring, step 4)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in HUMAN_LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"human label file {path} lacks column(s) {missing}: it needs {list(HUMAN_LABEL_COLUMNS)} "
            f"(optionally 'layer'); found {list(table.columns)}"
        )
    if layer is not None and "layer" in table.columns:
        table = table[table["layer"].str.strip() == str(layer)]
    labels: dict[int, str] = {}
    for line, (feature, value) in enumerate(zip(table["feature"], table["gene_level_interpretable"]), start=2):
        word = value.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError(
                f"human label file {path}, row {line}: gene_level_interpretable is {value!r}; "
                "use yes/no, true/false or 1/0"
            )
        try:
            key = int(feature)
        except ValueError:
            raise ValueError(f"human label file {path}, row {line}: feature {feature!r} is not an integer id") from None
        labels[key] = "Yes" if word in _TRUE else "No"
    return labels


def table3(
    stats: LayerFeatureStats,
    *,
    n: int = TABLE3_FEATURES,
    seed: int = 0,
    live_threshold: float = LIVE_THRESHOLD_FIGURE3,
    rule: InterpretRule | None = None,
    human_labels: str | os.PathLike | None = None,
    features: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The paper's Table 3 for one layer: ``n`` seeded random live features (or ``features``),
    their log10 E(f), activating tokens and gene-level interpretability (rule or human label)."""
    if features is None:
        features = sample_live_features(stats, n=n, live_threshold=live_threshold, seed=seed)
    table = interpret_features(stats, features, rule=rule)
    if human_labels is not None:
        labels = read_human_labels(human_labels, layer=stats.layer)
        named = table["feature"].isin(list(labels))
        table.loc[named, "gene_level_interpretable"] = table.loc[named, "feature"].map(labels)
        table.loc[named, "source"] = "human"
        unused = sorted(set(labels) - set(table["feature"]))
        if unused:
            log.info("human labels for features %s are not in this table", unused[:10])
    return table
