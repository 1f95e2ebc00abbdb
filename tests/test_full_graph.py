"""The full attribution graph: rows against torch autograd, exact transcoders, pruning, scores, genes, files."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch
from _tc_models import small_model
from _tiny_neox import GENES, TOKENS, sentence_replacement
from safetensors.torch import load_file, save_file

from c2srepro.attribution import Node, build_replacement
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.attribution.full_graph import (
    Graph,
    build_graph,
    gene_view,
    greedy_paths,
    prune_graph,
)
from c2srepro.attribution.full_graph import _partial_influence
from c2srepro.transcoder import Transcoder, TranscoderConfig

@pytest.fixture(scope="module")
def rep():
    return sentence_replacement()


def top_feature(rep, layer, position):
    return Node.feature(layer, position, rep.top_features(layer, position, 1)[0][0])


@pytest.fixture(scope="module")
def targets(rep):
    return [rep.logit_node(rep.n_pos - 1, 5), top_feature(rep, rep.n_layers - 1, rep.n_pos - 2)]


@pytest.fixture(scope="module")
def graph(rep, targets):
    return build_graph(rep, targets, target_weights=[3.0, 1.0], batch_size=7, tokens=TOKENS, genes=GENES)


def autograd_row(rep, graph, node):
    """d node / d source x source for every graph node as source, by autograd on the frozen replacement."""
    acts = [z.detach().clone().requires_grad_() for z in replacement_forward(rep).activations]
    emb = rep.weights.embed[rep.input_ids].clone().requires_grad_()
    err = rep.errors.clone().requires_grad_()
    value = replacement_forward(rep, feature_acts=acts, embeddings=emb, errors=err).value(node)
    emb_grad, err_grad, *act_grads = torch.autograd.grad(value, [emb, err, *acts], materialize_grads=True)
    row = torch.zeros(graph.n_nodes, dtype=torch.float64)
    for i, row_data in graph.nodes.iterrows():
        layer, position = int(row_data["layer"]), int(row_data["position"])
        if row_data["kind"] == "feature":
            feature = int(row_data["feature"])
            row[i] = acts[layer][position, feature] * act_grads[layer][position, feature]
        elif row_data["kind"] == "error":
            row[i] = err[layer, position] @ err_grad[layer, position]
        elif row_data["kind"] == "embedding":
            row[i] = emb[position] @ emb_grad[position]
    return row, float(value.detach())


def test_rows_equal_autograd_on_the_linearised_replacement(rep, graph, targets):
    computed = graph.nodes.index[graph.nodes["computed"]].tolist()
    assert len(graph.indices("feature")) == rep.n_active  # uncapped: every active feature is a node
    assert len(computed) == rep.n_active + 1  # every feature row and the logit target's
    sample = [graph.index_of(t) for t in targets] + computed[:: max(1, len(computed) // 25)]
    for index in sample:
        node = graph.node(index)
        reference, value = autograd_row(rep, graph, node)
        torch.testing.assert_close(graph.adjacency[index], reference, atol=1e-12, rtol=1e-9)
        assert graph.nodes["value"].iloc[index] == pytest.approx(value, rel=1e-10, abs=1e-12)
    # Error and token rows are sources only; earlier positions reach the logit through attention.
    sources = torch.cat([graph.indices("error"), graph.indices("embedding")])
    assert float(graph.adjacency[sources].abs().sum()) == 0.0
    logit = graph.index_of(targets[0])
    assert graph.adjacency[logit, graph.indices("embedding")[:-1]].abs().max() > 1e-6


def test_rows_and_constants_add_up_to_each_value(rep, graph):
    rows = graph.nodes[graph.nodes["computed"]]
    sums = graph.adjacency[rows.index].sum(1).numpy() + rows["constant"].to_numpy()
    assert sums == pytest.approx(rows["value"].to_numpy(), rel=1e-10, abs=1e-12)
    assert (rows["dropped"] == 0.0).all()  # uncapped: no feature is left out
    features = rows[rows["kind"] == "feature"]
    # A firing feature's value (pre-activation) is its activation.
    assert features["value"].to_numpy() == pytest.approx(features["activation"].to_numpy(), rel=1e-9, abs=1e-12)
    logit = rows[rows["kind"] == "logit"].iloc[0]
    assert logit["value"] == pytest.approx(float(rep.run.logits[logit["position"], logit["logit_token"]]), rel=1e-10)


def test_targets_and_their_weights(graph, targets):
    assert [graph.node(i) for i in graph.targets] == sorted(targets, key=lambda t: t.kind != "feature")
    weights = graph.target_weights
    assert float(weights.sum()) == pytest.approx(1.0)
    assert float(weights[graph.index_of(targets[0])]) == pytest.approx(0.75)
    assert int((weights != 0).sum()) == 2


def exact_setup():
    """A float64 ReLU model with transcoders equal to its MLPs (error nodes zero)."""
    model = small_model(n_layers=2, d_model=32, act="relu").double()
    transcoders = []
    for layer, block in enumerate(model.gpt_neox.layers):
        tc = Transcoder(TranscoderConfig(d_model=32, d_transcoder=128, layer=layer)).double()
        with torch.no_grad():
            tc.W_enc.copy_(block.mlp.dense_h_to_4h.weight.T)
            tc.b_enc.copy_(block.mlp.dense_h_to_4h.bias)
            tc.W_dec.copy_(block.mlp.dense_4h_to_h.weight.T)
            tc.b_dec.copy_(block.mlp.dense_4h_to_h.bias)
        transcoders.append(tc)
    ids = torch.randint(0, 101, (9,), generator=torch.Generator().manual_seed(2))
    return build_replacement(model, transcoders, ids)


def test_exact_transcoders_give_completeness_one_and_autograd_edges():
    rep = exact_setup()
    assert float(rep.errors.abs().max()) < 1e-12
    target = rep.logit_node(rep.n_pos - 1, int(rep.run.logits[-1].argmax()))
    graph = build_graph(rep, target)
    scores = graph.scores()
    assert scores["completeness"] == pytest.approx(1.0, abs=1e-9)
    assert scores["replacement"] == pytest.approx(1.0, abs=1e-9)
    assert float(graph.adjacency[:, graph.indices("error")].abs().max()) < 1e-12
    computed = graph.nodes.index[graph.nodes["computed"]].tolist()
    for index in [graph.index_of(target)] + computed[:: max(1, len(computed) // 10)]:
        reference, _ = autograd_row(rep, graph, graph.node(index))
        torch.testing.assert_close(graph.adjacency[index], reference, atol=1e-12, rtol=1e-9)


def test_scores_are_fractions_and_fall_with_error(graph):
    scores = graph.scores()
    assert 0.0 < scores["replacement"] < 1.0 and 0.0 < scores["completeness"] < 1.0
    # Doubling every error edge moves influence from tokens-through-features to errors.
    heavier = Graph(graph.adjacency.clone(), graph.nodes, graph.target_weights, graph.input_ids,
                               graph.n_layers, graph.info)
    errors = graph.indices("error")
    heavier.adjacency[:, errors] *= 2.0
    assert heavier.scores()["replacement"] < scores["replacement"]
    assert heavier.scores()["completeness"] < scores["completeness"]


def test_feature_cap_keeps_the_most_influential_rows(rep, graph, targets):
    capped = build_graph(rep, targets, target_weights=[3.0, 1.0], max_feature_nodes=30, batch_size=4,
                         update_interval=2, tokens=TOKENS, genes=GENES)
    features = capped.nodes[capped.nodes["kind"] == "feature"]
    assert len(features) == 30 and features["computed"].all()
    assert capped.n_nodes == 30 + (rep.n_layers + 1) * rep.n_pos + 1
    # Each capped row is the uncapped row restricted to the kept columns.
    full_index = torch.tensor([graph.index_of(capped.node(i)) for i in range(capped.n_nodes)])
    for i in capped.nodes.index[capped.nodes["computed"]]:
        torch.testing.assert_close(capped.adjacency[i], graph.adjacency[full_index[i]][full_index], rtol=0, atol=1e-13)
    # What the cap leaves out is kept per row, so every row still adds up to its value exactly.
    rows = capped.nodes[capped.nodes["computed"]]
    sums = capped.adjacency[rows.index].sum(1).numpy() + rows["constant"].to_numpy() + rows["dropped"].to_numpy()
    assert sums == pytest.approx(rows["value"].to_numpy(), rel=1e-10, abs=1e-12)
    assert capped.nodes["value"].iloc[capped.targets].to_numpy() == pytest.approx(
        graph.nodes["value"].iloc[graph.targets].to_numpy(), rel=1e-10)
    assert rows["dropped"].abs().max() > 1e-6
    # The first picks are the features the targets' own rows point to most strongly.
    direct = capped.adjacency.new_zeros(graph.n_nodes)
    normalised = graph.adjacency.abs() / graph.adjacency.abs().sum(1, keepdim=True).clamp(min=1e-30)
    for target in targets:
        direct += graph.target_weights[graph.index_of(target)] * normalised[graph.index_of(target)]
    strongest = direct[graph.indices("feature")].topk(5).indices
    strongest_ids = set(graph.nodes["node_id"].iloc[graph.indices("feature")[strongest].numpy()])
    assert strongest_ids <= set(features["node_id"])


def _series_over_all_columns(rows, weights, col_of_row):
    """The capped build's influence as first written: the series over every column, carried on
    through the rows of the nodes that have one (the reference for the [row, row] shortcut)."""
    normalised = rows.abs() / rows.abs().sum(1, keepdim=True).clamp(min=1e-30)
    current, influence = weights[col_of_row], torch.zeros(rows.shape[1], dtype=rows.dtype)
    while True:
        current = current @ normalised
        if not bool(current.any()):
            return influence
        influence += current
        current = current[col_of_row]


def test_partial_influence_equals_the_series_over_all_columns(rep, graph):
    generator = torch.Generator().manual_seed(0)
    computed = graph.nodes.index[graph.nodes["computed"]].to_numpy()
    picked = torch.as_tensor(computed[torch.randperm(len(computed), generator=generator)[:40].numpy()])
    rows = graph.adjacency[picked]
    weights = torch.rand(graph.n_nodes, generator=generator, dtype=rows.dtype)
    reference = _series_over_all_columns(rows, weights, picked)
    blocks = list(rows.split(7))  # as build_graph keeps them: one block per backward pass
    torch.testing.assert_close(_partial_influence(blocks, weights, picked), reference, rtol=1e-12, atol=1e-15)
    assert reference[picked].abs().sum() > 0  # influence did travel on through computed rows


@pytest.mark.parametrize(("cap", "batch_size", "update_interval"), [(30, 4, 2), (45, 3, 5)])
def test_feature_cap_picks_what_the_influence_series_picks(rep, graph, targets, cap, batch_size, update_interval):
    """The capped build's picks, replayed on the uncapped graph's rows with the reference series."""
    capped = build_graph(rep, targets, target_weights=[3.0, 1.0], max_feature_nodes=cap, batch_size=batch_size,
                         update_interval=update_interval)
    features = graph.indices("feature")
    col_of_row = [graph.index_of(t) for t in targets]
    weights = graph.target_weights.abs()
    visited = torch.zeros(graph.n_nodes, dtype=torch.bool)
    visited[col_of_row] = True
    while int(visited[features].sum()) < cap:
        influence = _series_over_all_columns(graph.adjacency[col_of_row], weights, torch.tensor(col_of_row))
        unvisited = features[~visited[features]]
        queue = min(update_interval * batch_size, cap - int(visited[features].sum()))
        picks = unvisited[influence[unvisited].argsort(descending=True, stable=True)[:queue]]
        visited[picks] = True
        col_of_row += picks.tolist()
    expected = set(graph.nodes["node_id"].iloc[features[visited[features]].numpy()])
    assert set(capped.nodes["node_id"].iloc[capped.indices("feature").numpy()]) == expected


def test_row_major_and_column_major_decoders_give_the_same_graph(rep, targets):
    """Rows gather decoders from W_dec as stored: rows of a row-major one, columns of a transpose."""
    def flipped(w):
        return w.T.contiguous().T if w.is_contiguous() else w.contiguous()

    other = dataclasses.replace(
        rep, transcoders=[dataclasses.replace(tc, W_dec=flipped(tc.W_dec)) for tc in rep.transcoders])
    assert [tc.W_dec.is_contiguous() for tc in other.transcoders] != [tc.W_dec.is_contiguous() for tc in rep.transcoders]
    a = build_graph(rep, targets, max_feature_nodes=25, batch_size=6)
    b = build_graph(other, targets, max_feature_nodes=25, batch_size=6)
    assert a.nodes["node_id"].tolist() == b.nodes["node_id"].tolist()
    torch.testing.assert_close(a.adjacency, b.adjacency, rtol=1e-12, atol=1e-14)


def test_pruning_keeps_targets_and_is_monotone(graph):
    grid = [0.3, 0.5, 0.8, 0.9, 1.0]
    previous_nodes = None
    for node_threshold in grid:
        previous_edges = None
        for edge_threshold in grid:
            pruning = prune_graph(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
            assert pruning.node_mask[graph.targets].all()
            assert pruning.node_mask[graph.indices("embedding")].all()
            if previous_edges is not None:
                assert bool((previous_edges.node_mask <= pruning.node_mask).all())
                assert bool((previous_edges.edge_mask <= pruning.edge_mask).all())
            previous_edges = pruning
        if previous_nodes is not None:
            assert bool((previous_nodes.node_mask <= pruning.node_mask).all())
            assert bool((previous_nodes.edge_mask <= pruning.edge_mask).all())
        previous_nodes = pruning
    default = prune_graph(graph)
    kept = int(default.node_mask.sum())
    assert int(prune_graph(graph, node_threshold=0.3, edge_threshold=0.3).node_mask.sum()) < kept < graph.n_nodes
    # Kept edges join kept nodes, and every kept feature that is not a target has edges both ways.
    assert bool((default.edge_mask <= default.node_mask[:, None] & default.node_mask[None, :]).all())
    for i in default.node_mask.nonzero().flatten().tolist():
        row = graph.nodes.iloc[i]
        if row["kind"] == "feature" and not row["is_target"]:
            assert default.edge_mask[i].any() and default.edge_mask[:, i].any()
    assert float(default.cumulative.max()) == pytest.approx(1.0)


def test_pruned_graph_is_a_graph_again(graph, tmp_path):
    pruned = graph.prune()
    assert pruned.n_nodes == int(prune_graph(graph).node_mask.sum())
    assert set(graph.nodes["node_id"].iloc[graph.targets]) == set(pruned.nodes["node_id"].iloc[pruned.targets])
    again = pruned.prune(node_threshold=0.5)
    assert again.n_nodes <= pruned.n_nodes
    pruned.save(tmp_path / "pruned.safetensors")
    reloaded = Graph.load(tmp_path / "pruned.safetensors")
    assert reloaded.prune(node_threshold=0.5).nodes["node_id"].tolist() == again.nodes["node_id"].tolist()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_thresholds_outside_zero_one(graph, bad):
    with pytest.raises(ValueError, match=rf"node_threshold must be in \(0, 1\].*got {bad}"):
        prune_graph(graph, node_threshold=bad)
    with pytest.raises(ValueError, match=rf"edge_threshold must be in \(0, 1\].*got {bad}"):
        graph.prune(edge_threshold=bad)


def test_save_and_load_round_trip(graph, tmp_path):
    path = graph.save(tmp_path / "graph.safetensors")
    loaded = Graph.load(path)
    assert torch.equal(loaded.adjacency, graph.adjacency)
    assert torch.equal(loaded.target_weights, graph.target_weights)
    pd.testing.assert_frame_equal(loaded.nodes, graph.nodes)
    assert loaded.input_ids == graph.input_ids and loaded.info == graph.info
    assert loaded.scores() == graph.scores()
    assert [p.name for p in tmp_path.iterdir()] == ["graph.safetensors"]  # no temporary left behind


def test_other_schema_version_and_other_files_are_refused(graph, tmp_path):
    path = graph.save(tmp_path / "graph.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(load_file(path), str(tmp_path / "v2.safetensors"), metadata={**metadata, "schema_version": "2"})
    with pytest.raises(ValueError, match="has graph schema version 2, but this c2srepro reads version 1; rebuild"):
        Graph.load(tmp_path / "v2.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="is not a c2srepro-full-attribution-graph file"):
        Graph.load(tmp_path / "other.safetensors")


def test_gene_view_merges_tokens_and_conserves_influence(graph):
    view = gene_view(graph)
    influence = graph.node_influence()
    tokens = graph.indices("embedding")
    gene_nodes = view.nodes[view.nodes["kind"] == "gene"]
    template = view.nodes[view.nodes["kind"] == "embedding"]
    assert sorted(gene_nodes["gene"]) == ["KHDRBS1", "PTPRB", "VWF"]
    assert len(template) == sum(g is None for g in GENES)  # template tokens stay separate nodes
    assert float(view.nodes["influence"].sum()) == pytest.approx(float(influence.sum()), rel=1e-12)
    assert float(gene_nodes["influence"].sum() + template["influence"].sum()) == pytest.approx(
        float(influence[tokens].sum()), rel=1e-12)
    for gene in ("VWF", "PTPRB", "KHDRBS1"):
        positions = [p for p, g in enumerate(GENES) if g == gene]
        expected = sum(float(influence[tokens[p]]) for p in positions)
        row = view.genes[view.genes["gene"] == gene].iloc[0]
        assert row["influence"] == pytest.approx(expected, rel=1e-12)
        assert row["positions"] == positions
    assert view.nodes.loc[view.nodes["node_id"] == "gene:VWF", "token"].iloc[0] == "V|WF"
    # Edges are summed: every row keeps its total, and a gene's column is its tokens' columns summed.
    torch.testing.assert_close(view.adjacency.sum(1)[: graph.n_nodes - graph.n_pos - 1],
                               graph.adjacency.sum(1)[: graph.n_nodes - graph.n_pos - 1])
    vwf = int(view.nodes.index[view.nodes["node_id"] == "gene:VWF"][0])
    torch.testing.assert_close(view.adjacency[:, vwf][: graph.n_nodes - graph.n_pos - 1],
                               graph.adjacency[:, tokens[[2, 3]]].sum(1)[: graph.n_nodes - graph.n_pos - 1])
    assert view.genes["influence"].is_monotonic_decreasing
    assert view.genes["influence_rank"].tolist() == [1, 2, 3]
    assert dict(zip(view.genes["gene"], view.genes["sentence_rank"])) == {"VWF": 1, "PTPRB": 2, "KHDRBS1": 3}


def test_bad_inputs(rep, graph, targets):
    layer, position = 1, 4
    firing = set(rep.active[layer].feature[rep.active[layer].position == position].tolist())
    silent = next(f for f in range(rep.transcoders[layer].d_tc) if f not in firing)
    with pytest.raises(ValueError, match=f"feature {silent} at layer 1, position 4 does not fire"):
        build_graph(rep, Node.feature(layer, position, silent))
    with pytest.raises(ValueError, match="position 12 is past the prompt: the replacement was run on 12 tokens"):
        build_graph(rep, rep.logit_node(12, 0))
    with pytest.raises(ValueError, match="targets must be distinct"):
        build_graph(rep, [targets[0], targets[0]])
    with pytest.raises(ValueError, match="target_weights must be nonzero"):
        build_graph(rep, targets, target_weights=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"genes must have one entry per prompt token \(12\), got 3"):
        build_graph(rep, targets, genes=["A", None, "B"])
    with pytest.raises(ValueError, match="the graph has 2 targets; say which one"):
        greedy_paths(graph)
    with pytest.raises(ValueError, match="is not a target of this graph"):
        greedy_paths(graph, target=graph.node(0))
    with pytest.raises(ValueError, match="built without genes; pass genes="):
        gene_view(build_graph(rep, targets[0], max_feature_nodes=3))
    with pytest.raises(ValueError, match="is not in this graph"):
        graph.index_of(Node.feature(layer, position, silent))
