"""Attribution and circuits on a linearised transcoder replacement of a GPT-NeoX (Pythia/C2S) model.

Typical use::

    rep = build_replacement(model, transcoders, input_ids)       # linearised.py
    target = Node.feature(23, rep.n_pos - 1, 2692)                 # or rep.answer_node(answer_start)
    contributions = attribute(rep, target)                         # contributions.py (exact, eq. 5)
    graph = find_circuit(rep, target, k=10, depth=3, genes=genes, tokens=tokens)   # circuit.py
    save_circuit(graph, "circuit.json"); fig = draw_circuit(graph)  # graph.py
    faithfulness = ablate(rep, graph, n_random=20)                 # ablation.py
"""

from c2srepro.attribution.ablation import ablate, candidate_pool
from c2srepro.attribution.contributions import Attribution, HeadPaths, attribute, attribute_many, head_contributions
from c2srepro.attribution.circuit import circuit_features, circuit_genes, find_circuit, graph_node
from c2srepro.attribution.graph import circuit_from_json, circuit_to_json, draw_circuit, load_circuit, save_circuit
from c2srepro.attribution.linearised import LinearisedReplacement, build_replacement, replacement_forward
from c2srepro.attribution.nodes import Node

__all__ = [
    "Attribution",
    "HeadPaths",
    "LinearisedReplacement",
    "Node",
    "ablate",
    "attribute",
    "attribute_many",
    "build_replacement",
    "candidate_pool",
    "circuit_features",
    "circuit_from_json",
    "circuit_genes",
    "circuit_to_json",
    "draw_circuit",
    "find_circuit",
    "graph_node",
    "head_contributions",
    "load_circuit",
    "replacement_forward",
    "save_circuit",
]
