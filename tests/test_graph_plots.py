"""The interactive graph view: what it draws, its hover data, its path highlighting, offline HTML."""

from __future__ import annotations

import networkx as nx
import pandas as pd
import pytest
from _tiny_neox import GENES, TOKENS, sentence_replacement

from c2srepro.attribution import build_graph, gene_view
from c2srepro.attribution.plots import CLICK_COLUMN, graph_figure, path_edges
from c2srepro.biology.casestudy import influential_genes
from c2srepro.book.display import interactive


@pytest.fixture(scope="module")
def graph():
    rep = sentence_replacement()
    return build_graph(rep, rep.logit_node(rep.n_pos - 1, 5), tokens=TOKENS, genes=GENES)


def _nodes(fig) -> dict[str, list]:
    """Hover data of every drawn node, by node id."""
    return {row[0]: row for trace in fig.data if trace.customdata is not None for row in trace.customdata}


def test_path_edges_are_the_edges_of_paths_through_the_node():
    dag = nx.DiGraph([("a", "b"), ("d", "b"), ("b", "c"), ("b", "e"), ("x", "c"), ("c", "t"), ("e", "t"), ("x", "t")])
    assert set(path_edges(dag, "b")) == {("a", "b"), ("d", "b"), ("b", "c"), ("b", "e"), ("c", "t"), ("e", "t")}
    assert set(path_edges(dag, "t")) == set(dag.edges)  # every path ends at the target


def test_figure_draws_the_pruned_gene_view_with_full_graph_influence(graph):
    fig = graph_figure(graph, node_threshold=1.0, edge_threshold=1.0)
    drawn = _nodes(fig)
    full = gene_view(graph)
    influence = dict(zip(full.nodes["node_id"], full.nodes["influence"]))
    assert {"gene:VWF", "gene:PTPRB", "gene:KHDRBS1"} <= set(drawn)  # sub-word tokens merged into genes
    assert not any(node.startswith("emb@") and GENES[int(node.split("@")[1])] for node in drawn)
    target = graph.node(graph.targets[0]).id
    assert drawn[target][1].endswith("(target)")
    for node, row in drawn.items():
        # hover: id, kind, layer, position, token, gene, activation, top genes, influence, link hint, link
        assert len(row) == CLICK_COLUMN + 1
        assert float(row[8]) == pytest.approx(influence[node], rel=1e-3, abs=1e-6)
    # A gene's influence is its tokens' summed influence in the token-level graph.
    tokens = graph.node_influence()
    vwf = [i for i, (k, p) in enumerate(zip(graph.nodes["kind"], graph.nodes["position"]))
           if k == "embedding" and GENES[p] == "VWF"]
    assert float(drawn["gene:VWF"][8]) == pytest.approx(float(tokens[vwf].sum()), rel=1e-3)


def test_pruning_thresholds_shrink_what_is_drawn(graph):
    everything = _nodes(graph_figure(graph, node_threshold=1.0, edge_threshold=1.0))
    pruned = _nodes(graph_figure(graph, node_threshold=0.5, edge_threshold=0.9))
    assert set(pruned) < set(everything)


def test_top_genes_show_on_feature_nodes(graph):
    feature = next(graph.node(i) for i in graph.indices("feature").tolist())
    fig = graph_figure(graph, node_threshold=1.0, edge_threshold=1.0,
                       top_genes={(feature.layer, feature.index): ["CD14", "LYZ"]})
    drawn = _nodes(fig)
    assert drawn[feature.id][7] == "CD14, LYZ"
    others = [row[7] for node, row in drawn.items() if row[1].startswith("transcoder") and node != feature.id]
    assert others and set(others) == {"unknown"}


def test_links_make_feature_nodes_open_their_card(graph):
    feature = next(graph.node(i) for i in graph.indices("feature").tolist())
    fig = graph_figure(graph, node_threshold=1.0, edge_threshold=1.0,
                       links={(feature.layer, feature.index): "A2-feature-atlas.html#card"})
    drawn = _nodes(fig)
    assert fig.layout.meta == {"click_opens": CLICK_COLUMN}
    assert drawn[feature.id][CLICK_COLUMN] == "A2-feature-atlas.html#card"
    assert drawn[feature.id][9] == "<br>click: open its card"
    assert all(row[CLICK_COLUMN] == "" and row[9] == "" for node, row in drawn.items() if node != feature.id)
    page = interactive(fig).figure_html()
    assert "plotly_click" in page and f"customdata[{CLICK_COLUMN}]" in page
    plain = graph_figure(graph, node_threshold=1.0, edge_threshold=1.0)
    assert plain.layout.meta is None and "plotly_click" not in interactive(plain).figure_html()


def test_the_menu_highlights_one_nodes_paths(graph):
    fig = graph_figure(graph, node_threshold=1.0, edge_threshold=1.0, n_highlight=3)
    menu = fig.layout.updatemenus[0]
    assert len(menu.buttons) == 4 and menu.buttons[0].label == "paths of: no node"
    n_traces = len(fig.data)
    highlights = [i for i, trace in enumerate(fig.data) if trace.visible is False]
    assert len(highlights) == 3
    for number, button in enumerate(menu.buttons):
        visible = button.args[0]["visible"]
        assert len(visible) == n_traces
        shown = [i for i in highlights if visible[i]]
        assert shown == ([] if number == 0 else [highlights[number - 1]])
        assert all(visible[i] for i in range(n_traces) if i not in highlights)
    # Each highlight trace draws at least the node's edge on to the target.
    assert all(list(fig.data[i].x).count(None) >= 1 for i in highlights)


def test_interactive_embeds_plotly_and_is_reproducible(graph):
    fig = graph_figure(graph)
    shown = interactive(fig)
    library, page = shown.library_html(), shown.figure_html()
    assert library.count("plotly.js v") == 1 and "plotly.js v" not in page and "Plotly.newPlot" in page
    again = interactive(graph_figure(graph))
    assert page == again.figure_html()  # the element id follows the content
    with pytest.raises(TypeError, match="plotly Figure"):
        interactive("not a figure")
    with pytest.raises(ValueError, match="n_highlight must be >= 0"):
        graph_figure(graph, n_highlight=-1)


def test_influential_genes_carry_the_threshold_share():
    genes = pd.DataFrame({"gene": ["A", "B", "C", "D"], "influence": [0.1, 0.5, 0.3, 0.1]})
    assert influential_genes(genes, threshold=0.5) == ["B"]
    assert influential_genes(genes, threshold=0.8) == ["B", "C"]
    assert influential_genes(genes, threshold=0.81) == ["B", "C", "A"]
    assert influential_genes(genes, threshold=1.0) == ["B", "C", "A", "D"]
    assert influential_genes(genes.iloc[:0]) == []
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\]"):
        influential_genes(genes, threshold=0.0)
    with pytest.raises(ValueError, match="lacks columns"):
        influential_genes(genes.rename(columns={"influence": "score"}))
