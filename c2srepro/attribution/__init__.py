"""Attribution graphs of a C2S model through its transcoders, at circuit-tracer's shape.

Typical use::

    replacement = ReplacementModel(model, transcoders, tokenizer)    # replacement.py (or .load(...))
    graph = replacement.attribute(cell, LabelTarget(label, candidates=labels), max_feature_nodes=512)
    graph.scores(); graph.prune(); graph.genes(); graph.save("graph.safetensors")   # full_graph.py
    circuit = greedy_paths(graph, k=10, depth=3)                     # the paper's beam search: a Graph
    replacement.intervene(cell, zero_nodes(graph.top_features(10)), labels=labels)  # intervene.py
    ablate(replacement, cell, graph.top_features(10), labels=labels)   # ablation.py: against random sets
    draw_circuit(circuit)                                            # plots.py (graph_figure: interactive)
    export_viewer_files(graph, "viewer-data", slug="cell0")         # export.py: circuit-tracer's viewer

Targets (targets.py): ``FeatureTarget``, ``LogitTarget`` (demeaned by default), ``LabelTarget``
(teacher-forced answer log-probability, optionally among candidates), ``ContrastTarget``,
``DirectionTarget``. Everything else is importable by its module path: ``linearised``
(the frozen replacement), ``contributions`` (exact attributions, attention paths), ``circuit``
(the greedy search's algorithm), ``plots``, ``ablation``, ``intervene``, ``export``, ``nodes``.
"""

from c2srepro.attribution.ablation import ablate
from c2srepro.attribution.export import export_viewer_files
from c2srepro.attribution.full_graph import Graph, build_graph, gene_view, greedy_paths, prune_graph
from c2srepro.attribution.intervene import scale_features, set_features, zero_features, zero_nodes
from c2srepro.attribution.linearised import build_replacement
from c2srepro.attribution.nodes import Node
from c2srepro.attribution.plots import draw_circuit
from c2srepro.attribution.replacement import ReplacementModel
from c2srepro.attribution.targets import ContrastTarget, DirectionTarget, FeatureTarget, LabelTarget, LogitTarget

__all__ = [
    "ContrastTarget",
    "DirectionTarget",
    "FeatureTarget",
    "Graph",
    "LabelTarget",
    "LogitTarget",
    "Node",
    "ReplacementModel",
    "ablate",
    "build_graph",
    "build_replacement",
    "draw_circuit",
    "export_viewer_files",
    "gene_view",
    "greedy_paths",
    "prune_graph",
    "scale_features",
    "set_features",
    "zero_features",
    "zero_nodes",
]
