"""Attribution and circuits on a linearised transcoder replacement of a GPT-NeoX (Pythia/C2S) model.

Typical use::

    rep = build_replacement(model, transcoders, input_ids)       # linearised.py
    target = Node.feature(23, rep.n_pos - 1, 2692)                 # or rep.answer_node(answer_start)
    contributions = attribute(rep, target)                         # contributions.py (exact, eq. 5)
    graph = find_circuit(rep, target, k=10, depth=3, genes=genes, tokens=tokens)   # circuit.py
    save_circuit(graph, "circuit.json"); fig = draw_circuit(graph)  # graph.py
    faithfulness = ablate(rep, graph, n_random=20)                 # ablation.py
    full = build_graph(rep, target, max_feature_nodes=500, genes=genes)   # full_graph.py: every node
    pruned = full.prune(); full.scores(); gene_view(full).genes; greedy_paths(full, k=10, depth=3)
    spliced = SplicedModel(model, transcoders, tokenizer, input_ids, labels)   # intervene.py: the real model
    spliced.run([zero_features(3, [12, 40], positions=[7])], freeze_attention=False).table()
    export_viewer_files(full, "viewer-data", slug="cell0")       # export.py: circuit-tracer's viewer
"""

from c2srepro.attribution.ablation import ablate, candidate_pool
from c2srepro.attribution.contributions import Attribution, HeadPaths, attribute, attribute_many, head_contributions
from c2srepro.attribution.circuit import circuit_features, circuit_genes, find_circuit, graph_node
from c2srepro.attribution.export import export_viewer_files, viewer_feature, viewer_features, viewer_graph
from c2srepro.attribution.full_graph import (
    Graph,
    GeneGraph,
    Pruning,
    build_graph,
    gene_view,
    greedy_paths,
    prune_graph,
)
from c2srepro.attribution.graph import circuit_from_json, circuit_to_json, draw_circuit, load_circuit, save_circuit
from c2srepro.attribution.intervene import (
    Intervention,
    InterventionResult,
    SplicedModel,
    SwitchOffResult,
    clamp_features,
    intervene,
    scale_features,
    set_features,
    switch_off_top_features,
    zero_features,
    zero_nodes,
)
from c2srepro.attribution.linearised import LinearisedReplacement, build_replacement, replacement_forward
from c2srepro.attribution.nodes import Node

__all__ = [
    "Attribution",
    "Graph",
    "GeneGraph",
    "HeadPaths",
    "Intervention",
    "InterventionResult",
    "LinearisedReplacement",
    "Node",
    "Pruning",
    "SplicedModel",
    "SwitchOffResult",
    "ablate",
    "attribute",
    "attribute_many",
    "build_graph",
    "build_replacement",
    "candidate_pool",
    "circuit_features",
    "circuit_from_json",
    "circuit_genes",
    "circuit_to_json",
    "clamp_features",
    "draw_circuit",
    "export_viewer_files",
    "find_circuit",
    "gene_view",
    "graph_node",
    "greedy_paths",
    "head_contributions",
    "intervene",
    "load_circuit",
    "prune_graph",
    "replacement_forward",
    "save_circuit",
    "scale_features",
    "set_features",
    "switch_off_top_features",
    "viewer_feature",
    "viewer_features",
    "viewer_graph",
    "zero_features",
    "zero_nodes",
]
