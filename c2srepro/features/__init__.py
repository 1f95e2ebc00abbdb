"""Interpretation of transcoder features: corpus statistics, Table 3, Table 4 and Figure 3, the
features of cells as an AnnData for scanpy, and the searchable feature atlas."""

from c2srepro.features.anndata import feature_activations, feature_activations_by_layer, feature_name
from c2srepro.features.atlas import (
    FeatureAtlas,
    feature_anchor,
    feature_atlas,
    feature_card_url,
    load_cell_activations,
    save_cell_activations,
    specificity_auroc,
)

from c2srepro.features.collect import ExampleWindow, collect_feature_stats, example_activations
from c2srepro.features.interpret import (
    InterpretRule,
    activating_tokens,
    interpret_features,
    read_human_labels,
    sample_live_features,
    symbol_family,
    table3,
)
from c2srepro.features.plots import plot_feature_frequency, plot_interpretable_fraction
from c2srepro.features.stats import (
    LIVE_THRESHOLD_FIGURE3,
    LIVE_THRESHOLD_TABLE4,
    POSITION_MODES,
    LayerFeatureStats,
    feature_key,
    load_feature_stats,
    save_feature_stats,
)
from c2srepro.features.table4 import (
    CORPUS_FRACTION,
    CORPUS_RANDOM_FRACTION,
    RANDOM_FRACTION,
    Table4,
    best_terms,
    compare_backgrounds,
    enrich_layer,
    null_column,
    null_gene_lists,
    summarize,
    table4,
    write_feature_tables,
)

__all__ = [
    "CORPUS_FRACTION",
    "FeatureAtlas",
    "CORPUS_RANDOM_FRACTION",
    "ExampleWindow",
    "LIVE_THRESHOLD_FIGURE3",
    "LIVE_THRESHOLD_TABLE4",
    "POSITION_MODES",
    "RANDOM_FRACTION",
    "InterpretRule",
    "LayerFeatureStats",
    "Table4",
    "activating_tokens",
    "best_terms",
    "collect_feature_stats",
    "compare_backgrounds",
    "enrich_layer",
    "example_activations",
    "feature_activations",
    "feature_activations_by_layer",
    "feature_anchor",
    "feature_atlas",
    "feature_card_url",
    "feature_key",
    "feature_name",
    "interpret_features",
    "load_cell_activations",
    "load_feature_stats",
    "null_column",
    "null_gene_lists",
    "plot_feature_frequency",
    "plot_interpretable_fraction",
    "read_human_labels",
    "sample_live_features",
    "save_cell_activations",
    "save_feature_stats",
    "specificity_auroc",
    "summarize",
    "symbol_family",
    "table3",
    "table4",
    "write_feature_tables",
]
