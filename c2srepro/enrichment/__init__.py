"""Gene set enrichment: libraries (offline stand-ins for the paper's Enrichr libraries) and a
vectorised over-representation test with gseapy.enrich's statistics."""

from c2srepro.enrichment.libraries import (
    CELLMARKER_NAME,
    STAND_INS,
    GeneSetLibrary,
    PreparedSets,
    StaleDownloadError,
    download_enrichr_library,
    is_upper_case,
    load_builtin_pickle,
    load_cellconsensus,
    load_cellmarker,
    load_library,
    load_pyenrichr_library,
    offline_libraries,
    parse_gmt_text,
    pyenrichr_libraries,
    read_gmt,
    union_genes,
    write_gmt,
)
from c2srepro.enrichment.ora import enrich, enrich_best
from c2srepro.enrichment.reference import (
    EnrichmentComparison,
    compare_enrichment,
    gseapy_enrich,
    gseapy_enrich_many,
)

__all__ = [
    "CELLMARKER_NAME",
    "STAND_INS",
    "EnrichmentComparison",
    "GeneSetLibrary",
    "PreparedSets",
    "StaleDownloadError",
    "compare_enrichment",
    "download_enrichr_library",
    "enrich",
    "enrich_best",
    "gseapy_enrich",
    "gseapy_enrich_many",
    "is_upper_case",
    "load_builtin_pickle",
    "load_cellconsensus",
    "load_cellmarker",
    "load_library",
    "load_pyenrichr_library",
    "offline_libraries",
    "parse_gmt_text",
    "pyenrichr_libraries",
    "read_gmt",
    "union_genes",
    "write_gmt",
]
