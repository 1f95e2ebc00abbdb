"""The paper's greedy circuit read off an attribution graph, its genes and its drawing, on a small random GPT-NeoX model."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from _reference_circuit import reference_circuit
from _tiny_neox import GENES, TOKENS, sentence_replacement
from matplotlib.figure import Figure

from c2srepro.attribution import Node, build_graph, draw_circuit, greedy_paths
from c2srepro.attribution.circuit import circuit_genes
from c2srepro.attribution.contributions import attribute
from c2srepro.attribution.plots import circuit_columns


@pytest.fixture(scope="module")
def rep():
    return sentence_replacement()


@pytest.fixture(scope="module")
def target(rep):
    layer, position = rep.n_layers - 1, rep.n_pos - 1
    feature, _ = rep.top_features(layer, position, 1)[0]
    return Node.feature(layer, position, feature)


@pytest.fixture(scope="module")
def graph(rep, target):
    return build_graph(rep, target, tokens=TOKENS, genes=GENES)


@pytest.fixture(scope="module")
def circuit(graph):
    return greedy_paths(graph, k=6, depth=3)


def check_against_reference(rep, target, found, **search):
    influence, edges = reference_circuit(rep, target, **search)
    circuit = found.to_networkx()
    assert sorted(circuit.nodes) == sorted(set(influence) | {n for edge in edges for n in edge})
    assert sorted(circuit.edges) == sorted(edges)
    for (u, v), weight in edges.items():
        assert circuit.edges[u, v]["weight"] == pytest.approx(weight, rel=1e-9, abs=1e-13)
    for node, data in circuit.nodes(data=True):
        assert data["influence"] == pytest.approx(influence.get(node, 0.0), rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("k, depth, threshold", [(6, 3, 0.0), (4, 1, 0.0), (3, 2, 0.0), (50, 1, 0.05)])
def test_greedy_paths_are_the_papers_search(rep, target, graph, k, depth, threshold):
    found = greedy_paths(graph, k=k, depth=depth, threshold=threshold)
    check_against_reference(rep, target, found, k=k, depth=depth, threshold=threshold)
    assert found.info["search"] | {"influence": None} == {"k": k, "depth": depth, "threshold": threshold,
                                                           "kinds": ["feature", "error", "embedding"],
                                                           "target": target.id, "influence": None}


def test_greedy_paths_of_a_logit_target(rep):
    answer = rep.answer_node(rep.n_pos - 1)
    graph = build_graph(rep, answer, tokens=TOKENS, genes=GENES)
    check_against_reference(rep, answer, greedy_paths(graph, k=5, depth=2), k=5, depth=2)


def test_circuit_is_a_dag_pointing_forward(circuit, target):
    dag = circuit.to_networkx()
    assert nx.is_directed_acyclic_graph(dag)
    assert dag.graph["target"] == target.id and dag.out_degree(target.id) == 0
    for u, v in dag.edges:
        assert dag.nodes[u]["layer"] < dag.nodes[v]["layer"]
        assert dag.nodes[u]["position"] <= dag.nodes[v]["position"]
    for node in dag.nodes:
        assert node == target.id or nx.has_path(dag, node, target.id)
    assert "feature" in {d["kind"] for _, d in dag.nodes(data=True)}
    assert nx.dag_longest_path_length(dag, weight=None) >= 2  # paths were extended


def test_path_weights_split_conservatively(rep, target, graph):
    # Two steps, unbounded width: a first-hop feature's edge into the target is split among its own
    # sources in the graph (features, errors, tokens) plus its row's constant (biases, reading bias).
    circuit = greedy_paths(graph, k=10**6, depth=2).to_networkx()
    for u, _, data in circuit.in_edges(target.id, data=True):
        if circuit.nodes[u]["kind"] != "feature":
            continue
        result = attribute(rep, Node.feature(circuit.nodes[u]["layer"], circuit.nodes[u]["position"],
                                             circuit.nodes[u]["feature"]))
        share = data["weight"] / result.value
        below = sum(share * d["weight"] for _, _, d in circuit.in_edges(u, data=True))
        constant = result.value - sum(d["weight"] for _, _, d in circuit.in_edges(u, data=True))
        assert below + share * constant == pytest.approx(data["weight"], rel=1e-8)


def test_circuit_genes_follow_prompt_order(graph):
    circuit = greedy_paths(graph, k=40, depth=3)
    genes = circuit_genes(circuit)
    assert genes and genes == list(dict.fromkeys(g for g in GENES if g in genes))
    touched = {GENES[p] for p in circuit.nodes["position"] if GENES[p] is not None}
    assert set(genes) == touched


def test_greedy_search_errors(graph, rep):
    with pytest.raises(ValueError, match="k and depth must be >= 1"):
        greedy_paths(graph, k=0)
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        greedy_paths(graph, kinds=("attention",))
    with pytest.raises(ValueError, match="is not a target of this graph"):
        greedy_paths(graph, target=Node.embedding(0))


def test_draw_circuit(circuit):
    fig = draw_circuit(circuit)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == circuit.nodes["position"].nunique()
    assert any("[" in label for label in labels) == bool(circuit_genes(circuit))
    assert len(ax.lines) == int((circuit.adjacency != 0).sum())


def test_draw_circuit_compresses_positions_to_those_it_touches(rep, graph):
    # Keep three nodes of a 12-token prompt (token 2, a feature at 3, the target at 11): three columns.
    target_index = graph.targets[0]
    feature = next(i for i in graph.indices("feature").tolist() if graph.nodes["position"].iloc[i] == 3
                   and graph.adjacency[target_index, i] != 0)
    token = next(i for i in graph.indices("embedding").tolist() if graph.nodes["position"].iloc[i] == 2)
    keep = torch.zeros(graph.n_nodes, dtype=torch.bool)
    keep[[target_index, feature, token]] = True
    small = graph.subgraph(keep)
    dag = small.to_networkx()
    assert circuit_columns(dag) == {2: 0, 3: 1, 11: 2}
    assert circuit_columns(dag, compress=False) == {2: 2, 3: 3, 11: 11}
    (ax,) = draw_circuit(small).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2: V [VWF]", "3: WF [VWF]", "11: ."]
    assert list(ax.get_xticks()) == [0, 1, 2] and ax.get_xlim()[1] < 3
    assert len(ax.lines) == small.adjacency.count_nonzero()
    (ax_full,) = draw_circuit(small, compress=False, figsize=(8, 5)).axes
    assert list(ax_full.get_xticks()) == [2, 3, 11]
