"""Greedy computational-path search: the circuit behind one target (paper, "Finding Computational Subgraphs").

A path v_d -> ... -> v_1 -> target carries the share of the target that flows along it. With
c(v -> u) the exact contribution of source v to u (:mod:`c2srepro.attribution.contributions`) and z_u
the activation of feature u (which, u firing, equals its pre-activation = sum of its contributions):

    w(v_1 -> target)          = c(v_1 -> target)
    w(v_{i+1} -> v_i -> ...)  = w(v_i -> ...) * c(v_{i+1} -> v_i) / z_{v_i}

so the extensions of a path through all of v_i's sources (plus v_i's reading bias) add up to the
path's own weight: the path weights conserve the target's value.

1. Attribute the target (step 1 of the paper: search for upstream nodes that strongly contribute).
2. Keep the ``k`` paths of largest |w| (step 2: retain only top contributors), dropping any with
   |w| < ``threshold`` * |target value|.
3. Extend every kept path whose first node is a transcoder feature by that feature's own sources
   (one batched attribution pass for all new features), and again keep the top ``k`` extended paths
   over the whole beam. Embeddings, error terms and biases are leaves.
4. Repeat step 3 until ``depth`` edges (step 3: iterate).
5. Merge all kept paths into one networkx DiGraph: nodes are the paths' nodes, an edge v -> u
   carries weight c(v -> u), and a node's ``influence`` is the summed weight of the kept paths
   that start at it (the target's influence is its value). Edges point from lower to higher layer
   (embeddings at layer -1, logits at n_layers), so the graph is a DAG.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

import networkx as nx

from c2srepro.attribution.contributions import Attribution, attribute_many
from c2srepro.attribution.linearised import LinearisedReplacement
from c2srepro.attribution.nodes import SOURCE_KINDS, Node

logger = logging.getLogger(__name__)

_MAX_BATCH = 16  # targets per shared backward pass (memory: batch x pos x d_model)


def _check_per_token(name: str, values: Sequence | None, n_pos: int) -> None:
    if values is not None and len(values) != n_pos:
        raise ValueError(f"{name} must have one entry per prompt token ({n_pos}), got {len(values)}")


def node_attributes(
    rep: LinearisedReplacement,
    node: Node,
    *,
    tokens: Sequence[str] | None,
    genes: Sequence[str | None] | None,
) -> dict:
    """The networkx attributes of a node (schema in :mod:`c2srepro.attribution.graph`)."""
    token_id = int(rep.input_ids[node.position])
    if node.kind == "feature":
        activation = float(rep.active[node.layer].activation[rep.active_index(node)])
    elif node.kind == "logit":
        activation = rep.value(node)
    else:
        activation = None
    return {
        "kind": node.kind,
        "layer": node.layer,
        "position": node.position,
        "feature": node.index if node.kind == "feature" else None,
        "logit_token": node.index if node.kind == "logit" else None,
        "token_id": token_id,
        "token": tokens[node.position] if tokens is not None else str(token_id),
        "gene": genes[node.position] if genes is not None else None,
        "activation": activation,
        "influence": 0.0,
    }


SearchPath = tuple[Hashable, ...]  # head (the most upstream node) first, the target last


def check_search(k: int, depth: int, threshold: float) -> None:
    """The search's sizes, shared by both entry points."""
    if k < 1 or depth < 1:
        raise ValueError(f"k and depth must be >= 1, got k={k}, depth={depth}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (a fraction of |target value|), got {threshold}")


def beam_search(
    target: Hashable,
    target_value: float,
    *,
    k: int,
    depth: int,
    threshold: float,
    expandable: Callable[[Hashable], bool],
    sources: Callable[[Hashable], Sequence[tuple[Hashable, float]]],
    value: Callable[[Hashable], float],
    prepare: Callable[[list[Hashable]], None] | None = None,
) -> list[tuple[SearchPath, float]]:
    """Steps 2-4 of the module docstring over any node type: every path kept at some step, with its weight.

    expandable(node): whether the node has sources to extend by (a feature or logit; a computed row);
    sources(node): its ``k`` largest (source, contribution) pairs; value(node): its value, which
    the contributions add up to; prepare(nodes): called with each step's new heads before their
    sources are asked for (one batched attribution pass instead of one per head).
    """
    cutoff = threshold * abs(target_value)
    beam: list[tuple[SearchPath, float]] = [((target,), target_value)]
    kept: list[tuple[SearchPath, float]] = []
    for step in range(depth):
        extend = [(path, w) for path, w in beam if expandable(path[0])]
        if prepare is not None:
            prepare(list(dict.fromkeys(path[0] for path, _ in extend)))
        candidates = []
        for path, w in extend:
            head = path[0]
            # Conservation: a feature head's share w is split in proportion to its sources.
            scale = 1.0 if head == target else w / value(head)
            candidates.extend(((source, *path), c * scale) for source, c in sources(head))
        candidates.sort(key=lambda item: -abs(item[1]))
        beam = [(path, w) for path, w in candidates[:k] if abs(w) >= cutoff and w != 0.0]
        logger.info("circuit search step %d: kept %d of %d candidate paths", step + 1, len(beam), len(candidates))
        kept.extend(beam)
        if not beam:
            break
    return kept


def find_circuit(
    rep: LinearisedReplacement,
    target: Node,
    *,
    k: int = 10,
    depth: int = 3,
    threshold: float = 0.0,
    kinds: Sequence[str] = ("feature", "error", "embedding"),
    genes: Sequence[str | None] | None = None,
    tokens: Sequence[str] | None = None,
) -> nx.DiGraph:
    """The greedy path search of the module docstring, merged into one attribution graph.

    target: an active feature (``Node.feature``) or a logit (``rep.logit_node`` / ``rep.answer_node``).
    k: paths kept per step (beam width); depth: maximum path length in edges;
    threshold: drop paths carrying less than this fraction of |target value|;
    kinds: source kinds the search may use ("bias" is excluded by default; "feature" is needed
        for paths longer than one edge);
    genes / tokens: per-token gene symbol (None for template text) and token string, stored on nodes.
    """
    rep.check_target(target)
    check_search(k, depth, threshold)
    unknown = set(kinds) - set(SOURCE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {SOURCE_KINDS}, got {list(kinds)}")
    _check_per_token("genes", genes, rep.n_pos)
    _check_per_token("tokens", tokens, rep.n_pos)

    target_value = rep.value(target)
    attributions: dict[Node, Attribution] = {}

    def prepare(heads: list[Node]) -> None:
        new = [head for head in heads if head not in attributions]
        for start in range(0, len(new), _MAX_BATCH):
            batch = new[start : start + _MAX_BATCH]
            attributions.update(zip(batch, attribute_many(rep, batch)))

    kept = beam_search(
        target, target_value, k=k, depth=depth, threshold=threshold, prepare=prepare,
        expandable=lambda node: node.kind in ("feature", "logit"),
        sources=lambda node: attributions[node].top(k, kinds=kinds),
        value=lambda node: attributions[node].value,
    )

    graph = nx.DiGraph(
        target=target.id,
        target_value=target_value,
        n_layers=rep.n_layers,
        input_ids=[int(i) for i in rep.input_ids],
        prompt_tokens=list(tokens) if tokens is not None else [str(int(i)) for i in rep.input_ids],
        genes=list(genes) if genes is not None else None,
        search={"k": k, "depth": depth, "threshold": threshold, "kinds": list(kinds)},
    )
    graph.add_node(target.id, **node_attributes(rep, target, tokens=tokens, genes=genes))
    graph.nodes[target.id]["influence"] = target_value
    for path, w in kept:
        for node in path:
            if node.id not in graph:
                graph.add_node(node.id, **node_attributes(rep, node, tokens=tokens, genes=genes))
        graph.nodes[path[0].id]["influence"] += w
        for source, sink in zip(path[:-1], path[1:]):
            if not graph.has_edge(source.id, sink.id):
                graph.add_edge(source.id, sink.id, weight=attributions[sink].contribution(source))
    return graph


def graph_node(graph: nx.DiGraph, node_id: str) -> Node:
    """The :class:`Node` behind a graph node id (from its attributes)."""
    data = graph.nodes[node_id]
    index = data["feature"] if data["kind"] == "feature" else data["logit_token"]
    return Node(data["kind"], data["layer"], data["position"], index)


def circuit_features(graph: nx.DiGraph) -> list[Node]:
    """The transcoder-feature nodes of a circuit, target excluded."""
    target = graph.graph["target"]
    return [graph_node(graph, n) for n, d in graph.nodes(data=True) if d["kind"] == "feature" and n != target]


def circuit_genes(graph: nx.DiGraph) -> list[str]:
    """Distinct genes of the circuit's nodes, in order of first position (the paper's circuit gene list)."""
    positions = sorted({(d["position"], d["gene"]) for _, d in graph.nodes(data=True) if d["gene"] is not None})
    return list(dict.fromkeys(gene for _, gene in positions))
