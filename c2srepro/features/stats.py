"""Per-layer transcoder feature statistics: the tables, the gene ranking, save and load.

What one ``LayerFeatureStats`` holds (``collect_feature_stats`` fills it from a corpus):

1. Per feature f over the N counted tokens: firing tokens n_f = #{t: z_f(t) > 0}, the firing
   frequency E(f) = n_f / N and log10 E(f) (-inf for a dead feature), mean activation over all
   counted tokens and over firing tokens, maximum activation, the firing tokens that lie inside
   a gene, and whether the feature is live (log10 E(f) >= ``live_threshold``).
2. Per gene g: occurrences O_g, an occurrence being one gene of one prompt (the run of sub-word
   tokens its symbol splits into, counted once).
3. Per (feature, gene), sparse: firing occurrences F_fg (occurrences with at least one firing
   token), firing tokens and summed activation over those tokens.
4. Gene ranking of a feature (paper, "Identification of Tokens and Corresponding Genes"): genes
   in descending activation frequency F_fg / O_g, ties broken by F_fg (more evidence first),
   then by symbol. Genes with O_g < ``min_occurrences`` are left out, so that a gene seen once
   and fired on once (frequency 1) cannot top the list. The frequency counts occurrences, not
   tokens, so it lies in [0, 1] and a symbol split into many tokens is not favoured.
5. Top activating examples: per feature the largest activations with prompt, position, token,
   gene and a context window.
6. Saved as ``meta.json``, ``features.csv``, ``examples.csv`` and ``genes.npz`` in one
   directory that is written beside its target and swapped into place, so a reader sees the old
   or the new statistics, never a mixture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from c2srepro._cache import atomic_directory, write_json_atomic
from c2srepro.transcoder.model import LAYER_DIRECTORY

POSITION_MODES = ("all", "genes", "prompt")
STATS_FORMAT = "c2srepro-feature-stats/1"
META_FILENAME = "meta.json"
FEATURES_FILENAME = "features.csv"
EXAMPLES_FILENAME = "examples.csv"
GENES_FILENAME = "genes.npz"


# Table 4 counts features with log10 E(f) >= -3 as live; Figure 3 / Table 3 use -4.
LIVE_THRESHOLD_TABLE4 = -3.0
LIVE_THRESHOLD_FIGURE3 = -4.0
# 25 genes: enough for an over-representation test to reach FDR < 0.05 with a handful of
# genes shared with a pathway, few enough that the list stays the feature's most specific genes
# (further down the frequency ranking come genes the feature fires on only now and then, which
# add chance overlaps with large GO terms rather than signal). The paper's circuit case study
# enriches 9 genes.
DEFAULT_TOP_GENES = 25
# A gene must occur in at least 5 prompts before its frequency is trusted (1/1 and 2/2 are noise).
DEFAULT_MIN_OCCURRENCES = 5

FEATURE_COLUMNS = [
    "feature",
    "n_fire",
    "freq",
    "log10_freq",
    "mean_act",
    "mean_act_firing",
    "max_act",
    "n_fire_gene_tokens",
    "gene_share",
    "n_genes_fired",
    "live",
]
EXAMPLE_COLUMNS = ["feature", "rank", "activation", "prompt", "position", "token_id", "token", "gene", "context"]
GENE_TABLE_COLUMNS = ["gene", "occurrences", "firing_occurrences", "firing_tokens", "frequency", "act_sum", "mean_act"]


def feature_key(layer: int, feature: int) -> str:
    """The name of a feature across layers, e.g. ``"L12/F6027"``."""
    return f"L{layer}/F{feature}"


@dataclass
class LayerFeatureStats:
    """Statistics of one layer's transcoder features over a corpus (see the module docstring).

    ``gene_fire_occurrences``, ``gene_fire_tokens`` and ``gene_act_sum`` are [d_tc, n_genes]
    sparse matrices whose columns follow ``genes``; ``gene_occurrences`` is [n_genes].
    """

    layer: int
    positions: str
    n_tokens: int
    n_prompts: int
    features: pd.DataFrame
    examples: pd.DataFrame
    genes: list[str]
    gene_occurrences: np.ndarray
    gene_fire_occurrences: sp.csr_matrix
    gene_fire_tokens: sp.csr_matrix
    gene_act_sum: sp.csr_matrix
    live_threshold: float = LIVE_THRESHOLD_TABLE4

    @classmethod
    def from_counts(
        cls,
        *,
        layer: int,
        positions: str,
        n_tokens: int,
        n_fire: np.ndarray,
        act_sum: np.ndarray,
        act_max: np.ndarray,
        genes: Sequence[str],
        gene_occurrences: np.ndarray,
        pair_feature: np.ndarray,
        pair_gene: np.ndarray,
        pair_fire_occurrences: np.ndarray,
        pair_fire_tokens: np.ndarray,
        pair_act_sum: np.ndarray,
        examples: pd.DataFrame | None = None,
        n_prompts: int = 0,
        live_threshold: float = LIVE_THRESHOLD_TABLE4,
    ) -> "LayerFeatureStats":
        """Build the tables from raw counts: per feature [d_tc] arrays and (feature, gene) triples."""
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if n_tokens <= 0:
            raise ValueError(f"n_tokens must be positive, got {n_tokens}")
        n_fire = np.asarray(n_fire, dtype=np.int64)
        d_tc = len(n_fire)
        if len(set(genes)) != len(genes):
            raise ValueError("genes holds a symbol twice: the gene vocabulary must be unique")
        shape = (d_tc, len(genes))

        def matrix(values, dtype):
            m = sp.csr_matrix((np.asarray(values, dtype=dtype), (pair_feature, pair_gene)), shape=shape)
            m.sum_duplicates()
            m.sort_indices()
            return m

        fire_occ = matrix(pair_fire_occurrences, np.int64)
        fire_tok = matrix(pair_fire_tokens, np.int64)
        gene_act = matrix(pair_act_sum, np.float64)
        occurrences = np.asarray(gene_occurrences, dtype=np.int64)
        if len(occurrences) != len(genes):
            raise ValueError(f"{len(occurrences)} gene occurrence counts for {len(genes)} genes")
        if (fire_occ.data > occurrences[fire_occ.indices]).any():
            raise ValueError("a gene has more firing occurrences than occurrences: the counts are inconsistent")

        act_sum = np.asarray(act_sum, dtype=np.float64)
        freq = n_fire / n_tokens  # E(f)
        with np.errstate(divide="ignore", invalid="ignore"):
            log10_freq = np.log10(freq)
            mean_firing = np.where(n_fire > 0, act_sum / n_fire, np.nan)
        n_fire_gene = fire_tok.sum(axis=1).A1.astype(np.int64)
        with np.errstate(divide="ignore", invalid="ignore"):
            gene_share = np.where(n_fire > 0, n_fire_gene / n_fire, np.nan)
        features = pd.DataFrame(
            {
                "feature": np.arange(d_tc, dtype=np.int64),
                "n_fire": n_fire,
                "freq": freq,
                "log10_freq": log10_freq,
                "mean_act": act_sum / n_tokens,
                "mean_act_firing": mean_firing,
                "max_act": np.asarray(act_max, dtype=np.float64),
                "n_fire_gene_tokens": n_fire_gene,
                "gene_share": gene_share,
                "n_genes_fired": np.diff(fire_occ.indptr).astype(np.int64),
                "live": log10_freq >= live_threshold,
            },
            columns=FEATURE_COLUMNS,
        )
        if examples is None:
            examples = pd.DataFrame(columns=EXAMPLE_COLUMNS)
        return cls(
            layer=int(layer),
            positions=positions,
            n_tokens=int(n_tokens),
            n_prompts=int(n_prompts),
            features=features,
            examples=examples.reset_index(drop=True),
            genes=list(genes),
            gene_occurrences=occurrences,
            gene_fire_occurrences=fire_occ,
            gene_fire_tokens=fire_tok,
            gene_act_sum=gene_act,
            live_threshold=float(live_threshold),
        )

    # ------------------------------------------------------------------ queries

    @property
    def d_tc(self) -> int:
        return len(self.features)

    def live_features(self, threshold: float | None = None) -> np.ndarray:
        """Ids of the features with log10 E(f) >= ``threshold`` (default ``self.live_threshold``)."""
        threshold = self.live_threshold if threshold is None else threshold
        return self.features["feature"].to_numpy()[self.features["log10_freq"].to_numpy() >= threshold]

    def check_feature(self, feature: int) -> int:
        """``feature`` as an int, or a ValueError naming the valid range."""
        if not 0 <= int(feature) < self.d_tc:
            raise ValueError(f"feature {feature} does not exist: layer {self.layer} has features 0..{self.d_tc - 1}")
        return int(feature)

    def gene_table(self, feature: int, *, min_occurrences: int = DEFAULT_MIN_OCCURRENCES) -> pd.DataFrame:
        """The genes ``feature`` fires on, ranked (module docstring, step 4), all of them."""
        f = self.check_feature(feature)
        _check_min_occurrences(min_occurrences)
        lo, hi = self.gene_fire_occurrences.indptr[f], self.gene_fire_occurrences.indptr[f + 1]
        cols = self.gene_fire_occurrences.indices[lo:hi]
        fire_occ = self.gene_fire_occurrences.data[lo:hi]
        occ = self.gene_occurrences[cols]
        # The three matrices share their sparsity pattern: every firing occurrence has >= 1 token.
        tokens = self.gene_fire_tokens[f].toarray().ravel()[cols]
        act = self.gene_act_sum[f].toarray().ravel()[cols]
        table = pd.DataFrame(
            {
                "gene": np.asarray(self.genes, dtype=object)[cols],
                "occurrences": occ,
                "firing_occurrences": fire_occ,
                "firing_tokens": tokens,
                "frequency": fire_occ / occ,
                "act_sum": act,
                "mean_act": act / np.maximum(tokens, 1),
            },
            columns=GENE_TABLE_COLUMNS,
        )
        table = table[(table["occurrences"] >= min_occurrences) & (table["firing_occurrences"] > 0)]
        table = table.sort_values(
            ["frequency", "firing_occurrences", "gene"], ascending=[False, False, True], kind="stable"
        )
        return table.reset_index(drop=True)

    def ranked_genes(
        self,
        features: Sequence[int] | None = None,
        *,
        top_n: int | None = DEFAULT_TOP_GENES,
        min_occurrences: int = DEFAULT_MIN_OCCURRENCES,
    ) -> dict[int, list[str]]:
        """{feature: its top ``top_n`` genes} (all ranked genes when ``top_n`` is None); a
        feature that fires on no eligible gene gets an empty list. Default: the live features."""
        if top_n is not None and top_n < 1:
            raise ValueError(f"top_n must be >= 1 or None, got {top_n}")
        _check_min_occurrences(min_occurrences)
        features = self.live_features() if features is None else [self.check_feature(f) for f in features]
        fire = self.gene_fire_occurrences
        names = np.asarray(self.genes, dtype=object)
        symbol_rank = np.argsort(np.argsort(names.astype(str), kind="stable"), kind="stable")
        out: dict[int, list[str]] = {}
        for f in features:
            lo, hi = fire.indptr[f], fire.indptr[f + 1]
            cols, counts = fire.indices[lo:hi], fire.data[lo:hi]
            occ = self.gene_occurrences[cols]
            keep = (occ >= min_occurrences) & (counts > 0)
            cols, counts, occ = cols[keep], counts[keep], occ[keep]
            order = np.lexsort((symbol_rank[cols], -counts, -(counts / occ)))
            out[int(f)] = names[cols[order][:top_n]].tolist()
        return out

    def gene_lists(
        self,
        *,
        top_n: int | None = DEFAULT_TOP_GENES,
        min_occurrences: int = DEFAULT_MIN_OCCURRENCES,
        live_threshold: float | None = None,
    ) -> dict[str, list[str]]:
        """{``feature_key(layer, f)``: top genes} for every live feature (empty list: no genes)."""
        ranked = self.ranked_genes(self.live_features(live_threshold), top_n=top_n, min_occurrences=min_occurrences)
        return {feature_key(self.layer, f): genes for f, genes in ranked.items()}

    def top_examples(self, feature: int, n: int | None = None) -> pd.DataFrame:
        """The kept top-activating tokens of ``feature``, largest activation first."""
        f = self.check_feature(feature)
        rows = self.examples[self.examples["feature"] == f].sort_values("rank")
        return (rows if n is None else rows.head(n)).reset_index(drop=True)

    def gene_universe(self, *, min_occurrences: int = DEFAULT_MIN_OCCURRENCES) -> list[str]:
        """Genes of the corpus that occur often enough to enter a ranked list (sorted)."""
        _check_min_occurrences(min_occurrences)
        return [g for g, o in zip(self.genes, self.gene_occurrences.tolist()) if o >= min_occurrences]

    # ------------------------------------------------------------------ save / load

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the statistics into ``directory`` (replaced as a whole, atomically)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.features.to_csv(tmp / FEATURES_FILENAME, index=False)
            self.examples.to_csv(tmp / EXAMPLES_FILENAME, index=False)
            coo = self.gene_fire_occurrences.tocoo()
            np.savez_compressed(
                tmp / GENES_FILENAME,
                genes=np.asarray(self.genes, dtype=str),
                occurrences=self.gene_occurrences,
                pair_feature=coo.row.astype(np.int64),
                pair_gene=coo.col.astype(np.int64),
                fire_occurrences=coo.data.astype(np.int64),
                fire_tokens=_aligned(self.gene_fire_tokens, coo),
                act_sum=_aligned(self.gene_act_sum, coo),
            )
            meta = {
                "format": STATS_FORMAT,
                "layer": self.layer,
                "positions": self.positions,
                "n_tokens": self.n_tokens,
                "n_prompts": self.n_prompts,
                "d_tc": self.d_tc,
                "live_threshold": self.live_threshold,
            }
            write_json_atomic(tmp / META_FILENAME, meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "LayerFeatureStats":
        directory = Path(directory)
        meta_path = directory / META_FILENAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: is {directory} saved by LayerFeatureStats.save()?")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{meta_path} is not a {STATS_FORMAT} file (format {meta.get('format')!r})")
        features = pd.read_csv(directory / FEATURES_FILENAME, float_precision="round_trip")
        features["live"] = features["live"].astype(bool)
        # Token strings such as "NA" or "nan" are real tokens: no NA parsing; "" marks no gene.
        examples = pd.read_csv(
            directory / EXAMPLES_FILENAME, keep_default_na=False, na_values=[], float_precision="round_trip",
            dtype={"token": str, "gene": str, "context": str},
        )
        examples["gene"] = examples["gene"].map(lambda g: g or None).astype(object)
        arrays = np.load(directory / GENES_FILENAME, allow_pickle=False)
        genes = arrays["genes"].tolist()
        shape = (int(meta["d_tc"]), len(genes))
        triples = (arrays["pair_feature"], arrays["pair_gene"])

        def matrix(values):
            m = sp.csr_matrix((values, triples), shape=shape)
            m.sort_indices()
            return m

        return cls(
            layer=int(meta["layer"]),
            positions=meta["positions"],
            n_tokens=int(meta["n_tokens"]),
            n_prompts=int(meta["n_prompts"]),
            features=features,
            examples=examples,
            genes=genes,
            gene_occurrences=arrays["occurrences"].astype(np.int64),
            gene_fire_occurrences=matrix(arrays["fire_occurrences"]),
            gene_fire_tokens=matrix(arrays["fire_tokens"]),
            gene_act_sum=matrix(arrays["act_sum"]),
            live_threshold=float(meta["live_threshold"]),
        )


def save_feature_stats(stats: Mapping[int, LayerFeatureStats], directory: str | os.PathLike) -> Path:
    """Save each layer's statistics in ``directory/layer_XX``; ``directory`` is replaced as a whole
    (no layer of an earlier, larger set stays behind)."""
    directory = Path(directory)
    for layer, layer_stats in sorted(stats.items()):
        if layer_stats.layer != layer:
            raise ValueError(f"statistics stored under layer {layer} say they are for layer {layer_stats.layer}")
    with atomic_directory(directory) as staging:
        for layer, layer_stats in sorted(stats.items()):
            layer_stats.save(staging / LAYER_DIRECTORY.format(layer=layer))
    return directory


def load_feature_stats(
    directory: str | os.PathLike, *, layers: Sequence[int] | None = None
) -> dict[int, LayerFeatureStats]:
    """{layer: LayerFeatureStats} from ``directory/layer_XX`` (all layers found by default)."""
    directory = Path(directory)
    found = {int(p.name.split("_")[1]): p for p in directory.glob("layer_*") if (p / META_FILENAME).is_file()}
    if not found:
        raise FileNotFoundError(
            f"no feature statistics in {directory}: expected layer_XX directories from save_feature_stats"
        )
    wanted = sorted(found) if layers is None else sorted(set(layers))
    missing = [layer for layer in wanted if layer not in found]
    if missing:
        raise FileNotFoundError(f"no feature statistics for layers {missing} in {directory} (it has {sorted(found)})")
    return {layer: LayerFeatureStats.load(found[layer]) for layer in wanted}


def _check_min_occurrences(min_occurrences: int) -> None:
    if min_occurrences < 1:
        raise ValueError(f"min_occurrences must be >= 1, got {min_occurrences}")


def _aligned(matrix: sp.csr_matrix, pattern: sp.coo_matrix) -> np.ndarray:
    """``matrix``'s values at the (row, col) entries of ``pattern`` (zero where absent)."""
    if pattern.nnz == 0:
        return np.empty(0, dtype=matrix.dtype)
    return np.asarray(matrix[pattern.row, pattern.col], dtype=matrix.dtype).ravel()
