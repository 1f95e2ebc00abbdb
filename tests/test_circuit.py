"""Circuit search, JSON export, drawing and ablation on a small random GPT-NeoX model."""

from __future__ import annotations

import networkx as nx
import pytest
from _tiny_neox import GENES, TOKENS, sentence_replacement
from matplotlib.figure import Figure

from c2srepro.attribution import Node, ablate
from c2srepro.attribution.ablation import candidate_pool
from c2srepro.attribution.circuit import circuit_features, circuit_genes, find_circuit, graph_node
from c2srepro.attribution.contributions import attribute
from c2srepro.attribution.graph import circuit_from_json, circuit_to_json, draw_circuit, load_circuit, save_circuit
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.attribution.graph import circuit_columns

@pytest.fixture(scope="module")
def rep():
    return sentence_replacement()


@pytest.fixture(scope="module")
def target(rep):
    layer, position = rep.n_layers - 1, rep.n_pos - 1
    feature, _ = rep.top_features(layer, position, 1)[0]
    return Node.feature(layer, position, feature)


@pytest.fixture(scope="module")
def circuit(rep, target):
    return find_circuit(rep, target, k=6, depth=3, genes=GENES, tokens=TOKENS)


def test_circuit_is_a_dag_pointing_forward(circuit, target):
    assert nx.is_directed_acyclic_graph(circuit)
    assert circuit.graph["target"] == target.id
    assert circuit.out_degree(target.id) == 0
    for u, v in circuit.edges:
        assert circuit.nodes[u]["layer"] < circuit.nodes[v]["layer"]
        assert circuit.nodes[u]["position"] <= circuit.nodes[v]["position"]
    for node in circuit.nodes:
        assert node == target.id or nx.has_path(circuit, node, target.id)
    kinds = {d["kind"] for _, d in circuit.nodes(data=True)}
    assert "feature" in kinds and "bias" not in kinds
    # Paths are extended: some node sits two edges below the target.
    assert nx.dag_longest_path_length(circuit, weight=None) >= 2


def test_circuit_edges_are_exact_contributions(rep, circuit):
    for u, v, data in circuit.edges(data=True):
        sink = graph_node(circuit, v)
        assert data["weight"] == attribute(rep, sink).contribution(graph_node(circuit, u))
        assert data["weight"] != 0.0


def test_search_respects_k_depth_and_threshold(rep, target):
    value = rep.value(target)
    shallow = find_circuit(rep, target, k=4, depth=1)
    assert shallow.in_degree(target.id) == shallow.number_of_nodes() - 1 == 4
    top = attribute(rep, target).top(4)
    assert {n.id for n, _ in top} == set(shallow.predecessors(target.id))
    for node, c in top:
        assert shallow.nodes[node.id]["influence"] == pytest.approx(c)
    deep = find_circuit(rep, target, k=3, depth=2)
    assert nx.dag_longest_path_length(deep, weight=None) <= 2
    assert deep.number_of_nodes() <= 1 + 3 + 3
    strict = find_circuit(rep, target, k=50, depth=1, threshold=0.05)
    weights = [d["weight"] for _, _, d in strict.in_edges(target.id, data=True)]
    assert weights and min(abs(w) for w in weights) >= 0.05 * abs(value)
    assert strict.number_of_nodes() - 1 < 50


def test_one_step_with_all_sources_conserves_the_target(rep, target):
    result = attribute(rep, target)
    n_sources = sum(int((f != 0).sum()) for f in result.features) + int((result.error != 0).sum())
    n_sources += int((result.embedding != 0).sum()) + int((result.bias != 0).sum())
    graph = find_circuit(rep, target, k=n_sources, depth=1, kinds=("feature", "error", "embedding", "bias"))
    incoming = sum(d["weight"] for _, _, d in graph.in_edges(target.id, data=True))
    assert incoming + result.reading_bias == pytest.approx(rep.value(target), rel=1e-9)


def test_path_weights_split_conservatively(rep, target):
    # Two steps, unbounded width: each first-hop feature's influence equals its edge weight into the
    # target (its own sources split that share among themselves, plus its reading bias).
    graph = find_circuit(rep, target, k=10**6, depth=2, kinds=("feature", "error", "embedding", "bias"))
    for u, _, data in graph.in_edges(target.id, data=True):
        node = graph_node(graph, u)
        if node.kind != "feature":
            continue
        result = attribute(rep, node)
        share = data["weight"] / result.value
        below = sum(share * d["weight"] for _, _, d in graph.in_edges(u, data=True))
        assert below + share * result.reading_bias == pytest.approx(data["weight"], rel=1e-8)


def test_logit_target_and_node_attributes(rep, circuit):
    answer = rep.answer_node(rep.n_pos - 1)
    graph = find_circuit(rep, answer, k=5, depth=2, genes=GENES, tokens=TOKENS)
    data = graph.nodes[answer.id]
    assert data["kind"] == "logit" and data["layer"] == rep.n_layers
    assert data["activation"] == pytest.approx(float(rep.run.logits[-2, rep.input_ids[-1]]))
    for _, d in circuit.nodes(data=True):
        assert d["token"] == TOKENS[d["position"]] and d["gene"] == GENES[d["position"]]
        assert d["token_id"] == int(rep.input_ids[d["position"]])
        if d["kind"] == "feature":
            assert d["activation"] > 0 and isinstance(d["feature"], int)
    genes = circuit_genes(circuit)
    assert genes == list(dict.fromkeys(g for g in GENES if g in genes))
    assert all(f.kind == "feature" for f in circuit_features(circuit))


def test_json_round_trip(tmp_path, circuit):
    path = save_circuit(circuit, tmp_path / "circuit.json")
    loaded = load_circuit(path)
    assert nx.utils.graphs_equal(loaded, circuit)
    assert dict(loaded.nodes(data=True)) == dict(circuit.nodes(data=True))
    assert loaded.graph == circuit.graph
    data = circuit_to_json(circuit)
    assert {"node_id", "layer", "ctx_idx", "feature", "activation", "influence"} <= set(data["nodes"][0])
    assert {"source", "target", "weight"} == set(data["links"][0])
    assert data["metadata"]["prompt_tokens"] == TOKENS
    assert sum(n["is_target"] for n in data["nodes"]) == 1
    with pytest.raises(ValueError, match="not a c2srepro-attribution-graph/1 graph"):
        circuit_from_json({"metadata": {}, "nodes": [], "links": []})


def test_draw_circuit(circuit):
    fig = draw_circuit(circuit)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == len({d["position"] for _, d in circuit.nodes(data=True)})
    assert any("[" in label for label in labels) == bool(circuit_genes(circuit))
    assert len(ax.lines) == circuit.number_of_edges()


def test_draw_circuit_compresses_positions_to_those_it_touches():
    # A circuit over positions 3, 40 and 41 of a 50-token prompt: three columns, not fifty.
    tokens = [f"t{i}" for i in range(50)]
    tokens[40] = "ĠV"  # byte-level BPE's leading space
    genes = [None] * 50
    genes[40] = genes[41] = "VWF"
    graph = nx.DiGraph(target="L1F2@41", target_value=1.0, n_layers=2, prompt_tokens=tokens, genes=genes)
    for node_id, kind, layer, position, feature in [("emb@3", "embedding", -1, 3, None), ("L0F5@40", "feature", 0, 40, 5),
                                                    ("L1F2@41", "feature", 1, 41, 2)]:
        graph.add_node(node_id, kind=kind, layer=layer, position=position, feature=feature, gene=genes[position])
    graph.add_edge("emb@3", "L0F5@40", weight=0.5)
    graph.add_edge("L0F5@40", "L1F2@41", weight=-0.2)
    assert circuit_columns(graph) == {3: 0, 40: 1, 41: 2}
    assert circuit_columns(graph, compress=False) == {3: 3, 40: 40, 41: 41}

    (ax,) = draw_circuit(graph).axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3: t3", "40: V [VWF]", "41: t41 [VWF]"]
    assert list(ax.get_xticks()) == [0, 1, 2]
    assert ax.get_xlim()[1] < 3
    assert len(ax.lines) == 2
    assert sorted({x for line in ax.lines for x in line.get_xdata()}) == [0, 1, 2]  # edges join the columns

    (ax_full,) = draw_circuit(graph, compress=False, figsize=(8, 5)).axes
    assert list(ax_full.get_xticks()) == [3, 40, 41]
    assert [t.get_text() for t in ax_full.get_xticklabels()] == ["t3", "V [VWF]", "t41 [VWF]"]


def test_ablation_direct_mode_is_the_sum_of_contributions(rep, circuit, target):
    result = ablate(rep, circuit, n_random=5, seed=3, propagate=False)
    direct = attribute(rep, target)
    features = circuit_features(circuit)
    expected = max(direct.value - sum(direct.contribution(f) for f in features), 0.0)
    assert result["mode"] == "direct" and result["n_features"] == len(features)
    assert result["clean"] == pytest.approx(direct.value)
    assert result["circuit_value"] == pytest.approx(expected)
    assert len(result["random_drops"]) == 5
    assert 0 < result["p_value"] <= 1
    # The circuit holds the strongest contributors: it beats random sets of the same size.
    assert result["circuit_drop"] > result["random_mean"]


def test_ablation_rerun_modes(rep, target):
    # A layer-(L-2) feature at the target position feeds the target with nothing in between to
    # propagate through, so the frozen re-run equals the direct (linear) drop exactly.
    below = attribute(rep, target)
    layer = target.layer - 1
    act = rep.active[layer]
    here = (act.position == target.position).nonzero().flatten()
    i = int(here[below.features[layer][here].abs().argmax()])
    feature = Node.feature(layer, act.position[i], act.feature[i])
    direct = ablate(rep, [feature], target, n_random=3, propagate=False)
    frozen = ablate(rep, [feature], target, n_random=3, propagate=True, freeze=True)
    assert frozen["mode"] == "frozen"
    assert frozen["clean"] == pytest.approx(rep.value(target), rel=1e-10)
    assert frozen["circuit_drop"] == pytest.approx(direct["circuit_drop"], rel=1e-9)
    recomputed = ablate(rep, [feature], target, n_random=3, propagate=True, freeze=False)
    assert recomputed["mode"] == "recomputed"
    assert recomputed["clean"] == pytest.approx(frozen["clean"], rel=1e-10)
    # Same seed, same random sets: frozen re-runs are reproducible.
    again = ablate(rep, [feature], target, n_random=3, propagate=True, freeze=True)
    assert again["random_drops"] == frozen["random_drops"]


def test_ablation_pool_is_upstream_active_features(rep, target):
    pool = candidate_pool(rep, target)
    assert pool and all(n.layer < target.layer and n.position <= target.position for n in pool)
    assert len(pool) == sum(
        int((a.position <= target.position).sum()) for a in rep.active[: target.layer]
    )


def test_circuit_and_ablation_errors(rep, target):
    silent = next(f for f in range(rep.transcoders[1].d_tc) if rep.pre_activation(1, 2, f) <= 0)
    with pytest.raises(ValueError, match=f"feature {silent} at layer 1, position 2 does not fire"):
        find_circuit(rep, Node.feature(1, 2, silent))
    with pytest.raises(ValueError, match=r"genes must have one entry per prompt token \(12\), got 3"):
        find_circuit(rep, target, genes=["A", "B", "C"])
    with pytest.raises(ValueError, match="kinds must be a non-empty subset"):
        find_circuit(rep, target, kinds=("attention",))
    with pytest.raises(ValueError, match="k and depth must be >= 1"):
        find_circuit(rep, target, k=0)
    with pytest.raises(ValueError, match="pass target="):
        ablate(rep, [target])
    later = Node.feature(target.layer, target.position, target.index)
    with pytest.raises(ValueError, match="not active features upstream"):
        ablate(rep, [later], target)
    lonely = find_circuit(rep, target, k=1, depth=1, kinds=("embedding",))
    with pytest.raises(ValueError, match="no feature nodes to ablate"):
        ablate(rep, lonely)
    with pytest.raises(ValueError, match="only feature nodes can be ablated"):
        replacement_forward(rep, ablate=[Node.error(0, 0)])
