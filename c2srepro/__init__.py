"""c2srepro: transcoder circuit analysis for single-cell foundation models (cell2sentence).

The package is laid out as its data flow, and the front door names one function per step::

    import c2srepro as c2s

    cells = c2s.cell_sentences(adata, use_raw=True, label_column="cell_type")    # data/: AnnData -> sentences
    model, tokenizer = c2s.load_c2s_model("vandijklab/C2S-Pythia-410m-cell-type-prediction")  # models/
    prompts = c2s.encode_prompts(cells, tokenizer)                              # data/: tokens + gene map
    activations = c2s.harvest_activations(model, prompts)                       # transcoder/
    transcoders = c2s.train_transcoders(activations, c2s.TrainConfig(), steps=300).transcoders
    features = c2s.feature_activations(adata, model, tokenizer, transcoders, layer=3, use_raw=True)  # features/
    table = c2s.enrich(genes, "KEGG_2021_Human")                                # enrichment/
    atlas = c2s.feature_atlas(stats, table4_features=table4.features)  # features/: atlas.search(gene="NKG7")
    replacement = c2s.ReplacementModel(model, transcoders, tokenizer)           # attribution/
    graph = replacement.attribute(cells[0], c2s.LabelTarget(label, candidates=labels))
    replacement.intervene(cells[0], c2s.zero_nodes(graph.top_features(10)), labels=labels)

``biology/`` reads circuits as biology (marker terms, controls); ``book/`` is the reproduction of
the paper built on top, and nothing in the library imports it. Names load on first use, so
``import c2srepro`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# front-door name -> the module that defines it
_FRONT_DOOR = {
    "cell_sentences": "c2srepro.data.cells",
    "encode_prompts": "c2srepro.data.prompts",
    "load_c2s_model": "c2srepro.models.load",
    "harvest_activations": "c2srepro.transcoder.harvest",
    "TrainConfig": "c2srepro.transcoder.config",
    "train_transcoders": "c2srepro.transcoder.train",
    "feature_activations": "c2srepro.features.anndata",
    "enrich": "c2srepro.enrichment.ora",
    "feature_atlas": "c2srepro.features.atlas",
    "ReplacementModel": "c2srepro.attribution.replacement",
    "LabelTarget": "c2srepro.attribution.targets",
    "zero_nodes": "c2srepro.attribution.intervene",
}

__all__ = sorted(_FRONT_DOOR)


def __getattr__(name: str) -> Any:
    module = _FRONT_DOOR.get(name)
    if module is None:
        raise AttributeError(f"module 'c2srepro' has no attribute {name!r}; the front door has {__all__}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
