"""Files that circuit-tracer's graph viewer opens: an attribution graph and its features' examples.

circuit-tracer (decoderesearch/circuit-tracer, ``circuit_tracer/frontend``) serves a folder with
``graph-metadata.json`` (``{"graphs": [metadata, ...]}``, the viewer's list of graphs), one
``<slug>.json`` per graph, read by its ``graph_models.Model`` (``metadata``, ``qParams``, ``nodes``,
``links``), and, for the feature panel, one ``<featureIndex>.json`` per feature
(``feature_models.Model``). :func:`export_viewer_files` writes that folder from an
:class:`~c2srepro.attribution.full_graph.Graph`:

1. Prune (optional, :func:`~c2srepro.attribution.full_graph.prune_graph` with circuit-tracer's
   default thresholds) and read each node's ``influence`` as the viewer does: the cumulative share
   of total influence of the node and every stronger one (its pruning slider keeps the nodes with
   ``influence <= threshold``).
2. Nodes in circuit-tracer's id grammar: feature ``{layer}_{feature}_{pos}`` (its ``feature`` is
   the Cantor pairing of layer and feature, the name of its feature file), error
   ``0_{layer}_{pos}``, token ``E_{token_id}_{pos}``, logit ``{n_layers + 1}_{token_id}_{pos}``;
   ``jsNodeId`` likewise. The viewer labels token and error nodes from ``metadata.prompt_tokens``,
   so each gene token is written there as ``token [GENE]``; a feature's ``clerp`` (the label the
   viewer's feature panel shows) names its token, gene and its ``feature_labels`` entry (e.g. the
   atlas's top genes, cell type and term, :meth:`c2srepro.features.FeatureAtlas.labels`), else
   (with feature statistics) its top genes; a logit's reads ``Output "..." (p=...)``.
3. Links: one per nonzero kept edge, ``{"source", "target", "weight"}`` (weight = A[target, source]);
   nodes left without a link are dropped, except tokens and logits (as circuit-tracer does).
4. ``metadata`` (slug, scan, prompt, prompt tokens, node threshold, schema version 1) and empty
   ``qParams``; ``scan`` is ``./graph_data/<scan>``, a local path, so the viewer fetches feature
   files from ``<folder>/<scan>/<featureIndex>.json``, which step 5 writes.
5. Feature files from :func:`c2srepro.features.example_activations`: the feature's top examples
   as one quantile, each with its window's tokens and z_f at every token (``tokens_acts_list``)
   and the example's token as ``train_token_ind``; ``act_max`` and ``activation_frequency`` are
   the corpus statistics'. c2srepro keeps no activation histogram and no logit lens of a feature,
   so ``histogram``, ``quantile_values``, ``top_logits`` and ``bottom_logits`` are empty.
6. Every file is written atomically; ``graph-metadata.json`` keeps the other graphs it lists
   (one entry per slug), so several graphs share a folder as in circuit-tracer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from c2srepro._cache import atomic_path
from c2srepro.attribution.full_graph import Graph, prune_graph
from c2srepro.features.collect import ExampleWindow
from c2srepro.features.stats import LayerFeatureStats, feature_key

METADATA_FILENAME = "graph-metadata.json"
SCAN = "c2srepro"  # the folder of feature files a graph names (metadata.scan), by default
VIEWER_SCHEMA_VERSION = 1  # the graph schema version circuit-tracer's viewer reads (Metadata.schema_version)
FEATURE_TYPES = {
    "feature": "cross layer transcoder",  # the viewer's name for any transcoder feature
    "error": "mlp reconstruction error",
    "embedding": "embedding",
    "logit": "logit",
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TOP_GENES_IN_LABEL = 5


def cantor_pairing(layer: int, feature: int) -> int:
    """The viewer's one-integer name of (layer, feature): (l + f)(l + f + 1) / 2 + f."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def _check_name(what: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} must be letters, digits, '.', '_' or '-' (it names a file and a URL path), "
                         f"got {name!r}")
    return name


def _as_graph(graph) -> Graph:
    if isinstance(graph, Graph):
        return graph
    if isinstance(graph, (str, os.PathLike)):
        return Graph.load(graph)  # refuses another schema version, naming it
    raise TypeError(f"expected a Graph (build_graph) or the path of a saved one, got {type(graph).__name__}")


def _prompt_tokens(graph: Graph, tokenizer) -> tuple[list[str], list[str]]:
    """The prompt's token strings (as the tokenizer decodes them, else as the graph holds them),
    and the same with each gene token's gene: ``token [GENE]``."""
    if tokenizer is not None:
        tokens = [tokenizer.decode([i]) for i in graph.input_ids]
    else:
        tokens = graph.info.get("tokens") or [str(i) for i in graph.input_ids]
    genes = graph.info.get("genes") or [None] * graph.n_pos
    return list(tokens), [t if g is None else f"{t} [{g}]" for t, g in zip(tokens, genes)]


def viewer_graph(
    graph: Graph | str | os.PathLike,
    *,
    slug: str,
    scan: str = SCAN,
    prune: bool = True,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    stats: Mapping[int, LayerFeatureStats] | None = None,
    tokenizer=None,
    logit_probabilities: Mapping[int, float] | None = None,
    feature_labels: Mapping[tuple[int, int], str] | None = None,
) -> dict:
    """The graph as the JSON of circuit-tracer's ``graph_models.Model`` (module docstring, steps 1-4).

    stats: feature statistics per layer, for the top genes in feature labels; feature_labels:
    (layer, feature) -> the text that labels it instead (``FeatureAtlas.labels()``). tokenizer: decodes
    the prompt's and the logit targets' tokens (else the graph's ``tokens`` and ``<id>``).
    logit_probabilities: {token id: probability} of the logit targets, shown in their labels
    (else ``p=?``).
    """
    graph = _as_graph(graph)
    _check_name("slug", slug)
    _check_name("scan", scan)
    pruning = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    if prune:
        keep, edges = pruning.node_mask, pruning.edge_mask
    else:
        keep = torch.ones(graph.n_nodes, dtype=torch.bool)
        edges = graph.adjacency != 0
    tokens, labelled = _prompt_tokens(graph, tokenizer)
    top_genes = _top_genes(graph, keep, stats)
    described = {key: f"; {text}" for key, text in (feature_labels or {}).items() if text}
    described |= {key: f"; top genes {', '.join(genes)}" for key, genes in top_genes.items() if key not in described}
    nodes, ids = {}, {}
    for index in keep.nonzero().flatten().tolist():
        row = graph.nodes.iloc[index]
        node = _viewer_node(row, graph.n_layers, float(pruning.cumulative[index]), tokens, described,
                            tokenizer, logit_probabilities)
        nodes[index] = node
        ids[index] = node["node_id"]
    targets, sources = (edges & (graph.adjacency != 0)).nonzero(as_tuple=True)
    weights = graph.adjacency[targets, sources].tolist()
    links = [{"source": ids[s], "target": ids[t], "weight": w}
             for t, s, w in zip(targets.tolist(), sources.tolist(), weights)]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    kept = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = {
        "slug": slug,
        "scan": f"./graph_data/{scan}",
        "transcoder_list": [],
        "prompt_tokens": labelled,
        "prompt": "".join(tokens),
        "node_threshold": node_threshold if prune else None,
        "schema_version": VIEWER_SCHEMA_VERSION,
        "info": {"source": "c2srepro", "edge_threshold": edge_threshold if prune else None,
                 "scores": graph.scores(), "n_layers": graph.n_layers},
    }
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": kept, "links": links}


def _top_genes(graph: Graph, keep, stats) -> dict[tuple[int, int], list[str]]:
    if stats is None:
        return {}
    table = graph.nodes.iloc[keep.nonzero().flatten().numpy()]
    features = table[table["kind"] == "feature"]
    out = {}
    for layer, group in features.groupby("layer"):
        if int(layer) not in stats:
            raise ValueError(f"the graph has features of layer {layer} but stats has no layer {layer}: "
                             "collect feature statistics on every layer of the graph")
        ranked = stats[int(layer)].ranked_genes(sorted({int(f) for f in group["feature"]}), top_n=TOP_GENES_IN_LABEL)
        out.update({(int(layer), f): genes for f, genes in ranked.items()})
    return out


def _viewer_node(row, n_layers: int, influence: float, tokens: Sequence[str], described, tokenizer,
                 probabilities) -> dict:
    kind, layer, position = row["kind"], int(row["layer"]), int(row["position"])
    activation = None if row["activation"] is None or np.isnan(row["activation"]) else float(row["activation"])
    node = {"ctx_idx": position, "feature_type": FEATURE_TYPES[kind], "influence": influence,
            "activation": activation, "is_target_logit": False, "token_prob": 0.0, "clerp": ""}
    if kind == "feature":
        feature = int(row["feature"])
        gene = f" in {row['gene']}" if row["gene"] is not None else ""
        clerp = f'{feature_key(layer, feature)} on "{tokens[position]}"{gene}'
        node.update(node_id=f"{layer}_{feature}_{position}", jsNodeId=f"{layer}_{feature}-0",
                    feature=cantor_pairing(layer, feature), layer=str(layer),
                    clerp=clerp + described.get((layer, feature), ""))
    elif kind == "error":
        node.update(node_id=f"0_{layer}_{position}", jsNodeId=f"{layer}_{position}-0", feature=-1, layer=str(layer))
    elif kind == "embedding":
        token_id = int(row["token_id"])
        node.update(node_id=f"E_{token_id}_{position}", jsNodeId=f"E_{token_id}-{position}", feature=position,
                    layer="E")
    elif pd.isna(row["logit_token"]):  # a target read along a direction (a label, a contrast): no token of its own
        viewer_layer = str(n_layers + 1)
        name = str(row["node_id"]).rsplit("@", 1)[0]
        node.update(node_id=f"{viewer_layer}_{name}_{position}", jsNodeId=f"L_{name}-{position}", feature=-1,
                    layer=viewer_layer, is_target_logit=bool(row["is_target"]), token_prob=0.0,
                    clerp=f'Output "{name}" (p=?)')
    else:
        token_id, viewer_layer = int(row["logit_token"]), str(n_layers + 1)
        text = tokenizer.decode([token_id]) if tokenizer is not None else f"<{token_id}>"
        p = None if probabilities is None else probabilities.get(token_id)
        node.update(node_id=f"{viewer_layer}_{token_id}_{position}", jsNodeId=f"L_{token_id}-{position}",
                    feature=token_id, layer=viewer_layer, is_target_logit=bool(row["is_target"]),
                    token_prob=0.0 if p is None else float(p),
                    # the viewer parses the probability out of this label: it must read "(p=...)"
                    clerp=f'Output "{text}" (p={"?" if p is None else f"{p:.3f}"})')
    return node


def viewer_feature(
    *, layer: int, feature: int, windows: Sequence[ExampleWindow], stats: LayerFeatureStats, scan: str = SCAN
) -> dict:
    """One feature file, circuit-tracer's ``feature_models.Model`` (module docstring, step 5)."""
    row = stats.features.iloc[stats.check_feature(feature)]
    examples = [{"tokens_acts_list": [float(a) for a in w.activations], "train_token_ind": w.center,
                 "is_repeated_datapoint": False, "tokens": list(w.tokens)} for w in windows]
    return {
        "transcoder_id": f"{scan}/layer_{layer}",
        "index": cantor_pairing(layer, feature),
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}],
        "top_logits": [],
        "bottom_logits": [],
        "act_min": 0.0,
        "act_max": float(row["max_act"]),
        "quantile_values": [],
        "histogram": [],
        "activation_frequency": float(row["freq"]),
    }


def export_viewer_files(
    graph: Graph | str | os.PathLike,
    directory: str | os.PathLike,
    *,
    examples: Mapping[tuple[int, int], Sequence[ExampleWindow]] | None = None,
    **viewer_options,
) -> Path:
    """Write ``<slug>.json``, update ``graph-metadata.json`` and write the feature files; returns the graph file.

    examples: :func:`c2srepro.features.example_activations` for (at least) every feature node
    the exported graph keeps (:func:`viewer_features` lists them); needs ``stats``. Without it
    the graph opens and the feature panel stays empty. ``viewer_options`` (``slug`` required, ``scan``,
    ``prune``, thresholds, ``stats``, ``tokenizer``, ``logit_probabilities``, ``feature_labels``):
    :func:`viewer_graph`'s keyword arguments.
    """
    data = viewer_graph(graph, **viewer_options)
    stats = viewer_options.get("stats")
    scan = viewer_options.get("scan", SCAN)
    directory = Path(directory)
    listing = _read_listing(directory / METADATA_FILENAME)
    features = _features_of(data)
    if examples is not None:
        if stats is None:
            raise ValueError("examples need stats= (the feature statistics they were read from) for the feature files")
        missing = [feature_key(*f) for f in features if f not in examples]
        if missing:
            raise ValueError(f"no examples for {len(missing)} features of the exported graph ({', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}): pass example_activations(..., "
                             "features=viewer_features(graph, ...)) with the same pruning")
        for layer, feature in features:
            document = viewer_feature(layer=layer, feature=feature, windows=examples[(layer, feature)],
                                      stats=stats[layer], scan=scan)
            _write_json(directory / scan / f"{cantor_pairing(layer, feature)}.json", document)
    slug = data["metadata"]["slug"]
    path = _write_json(directory / f"{slug}.json", data)
    listing["graphs"] = [g for g in listing["graphs"] if g.get("slug") != slug] + [data["metadata"]]
    _write_json(directory / METADATA_FILENAME, listing)
    return path


def viewer_features(
    graph: Graph | str | os.PathLike,
    *,
    prune: bool = True,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> list[tuple[int, int]]:
    """The (layer, feature) pairs of the feature nodes that :func:`viewer_graph` keeps."""
    data = viewer_graph(graph, slug="features", prune=prune, node_threshold=node_threshold,
                        edge_threshold=edge_threshold)
    return _features_of(data)


def _features_of(data: dict) -> list[tuple[int, int]]:
    pairs = {(int(n["layer"]), int(n["node_id"].split("_")[1]))
             for n in data["nodes"] if n["feature_type"] == FEATURE_TYPES["feature"]}
    return sorted(pairs)


def _read_listing(path: Path) -> dict:
    if not path.exists():
        return {"graphs": []}
    try:
        listing = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON ({error}); remove it or export into another folder") from error
    if not isinstance(listing, dict) or not isinstance(listing.get("graphs"), list):
        raise ValueError(f"{path} is not circuit-tracer's graph list (an object with a 'graphs' list); "
                         "remove it or export into another folder")
    return listing


def _write_json(path: Path, data) -> Path:
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(data, allow_nan=False))
    return path
