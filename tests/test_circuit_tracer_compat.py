"""Graph scores, node influence and renormalised pruning equal circuit-tracer's own functions, loaded
from its pinned wheel and run on the same adjacency and target weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _circuit_tracer import functions
from _tiny_neox import GENES, TOKENS, sentence_replacement

from c2srepro.attribution.full_graph import build_graph, prune_graph
from c2srepro.attribution.targets import LogitTarget

NAMES = ("normalize_matrix", "compute_influence", "compute_node_influence", "compute_edge_influence",
         "find_threshold", "PruneResult", "prune_graph", "compute_graph_scores")


@pytest.fixture(scope="module")
def tracer():
    return functions("circuit_tracer/graph.py", NAMES)


@pytest.fixture(scope="module")
def graph():
    rep = sentence_replacement()
    targets = [LogitTarget(5), LogitTarget(17), LogitTarget(40, demeaned=False)]
    graph = build_graph(rep, targets, target_weights=[0.5, 0.3, 0.2], max_feature_nodes=60, tokens=TOKENS, genes=GENES)
    # circuit-tracer's functions build their logit weights in float32.
    graph.adjacency = graph.adjacency.to(torch.float32)
    graph.target_weights = graph.target_weights.to(torch.float32)
    return graph


def as_tracer_graph(graph):
    """The fields of circuit-tracer's Graph its scoring and pruning read (same node order)."""
    n_logits = len(graph.targets)
    assert graph.targets == list(range(graph.n_nodes - n_logits, graph.n_nodes))  # logits last, as there
    return SimpleNamespace(
        adjacency_matrix=graph.adjacency, input_tokens=torch.tensor(graph.input_ids),
        logit_targets=[None] * n_logits, selected_features=graph.indices("feature"),
        logit_probabilities=graph.target_weights[graph.targets], cfg=SimpleNamespace(n_layers=graph.n_layers),
    )


def test_scores_and_influence_equal_circuit_tracers(tracer, graph):
    replacement, completeness = tracer["compute_graph_scores"](as_tracer_graph(graph))
    scores = graph.scores()
    assert scores["replacement"] == pytest.approx(replacement, rel=1e-6)
    assert scores["completeness"] == pytest.approx(completeness, rel=1e-6)
    assert 0.0 < completeness < 1.0 and 0.0 < replacement < 1.0
    reference = tracer["compute_node_influence"](graph.adjacency, graph.target_weights)
    torch.testing.assert_close(graph.node_influence(), reference, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.7)])
def test_renormalised_pruning_equals_circuit_tracers_masks(tracer, graph, thresholds):
    node_threshold, edge_threshold = thresholds
    theirs = tracer["prune_graph"](as_tracer_graph(graph), node_threshold, edge_threshold)
    ours = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold, edge_scores="renormalised")
    assert torch.equal(ours.node_mask, theirs.node_mask)
    assert torch.equal(ours.edge_mask, theirs.edge_mask)
    torch.testing.assert_close(ours.cumulative, theirs.cumulative_scores)
    assert 0 < int(ours.node_mask.sum()) < graph.n_nodes
    monotone = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    assert not torch.equal(monotone.edge_mask, ours.edge_mask)  # the two options differ


def test_unknown_edge_scores_option(graph):
    with pytest.raises(ValueError, match="edge_scores must be one of"):
        prune_graph(graph, edge_scores="circuit-tracer")
