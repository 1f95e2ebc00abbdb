"""An attribution graph to explore: the pruned, gene-level graph as an interactive plotly figure.

:func:`graph_figure` draws what :func:`c2srepro.attribution.full_graph.gene_view` makes of an
influence-pruned :class:`~c2srepro.attribution.full_graph.Graph`; :func:`draw_circuit` is the
static drawing for print (the paper's Figure 5) of a small graph, such as a greedy circuit.

1. Influence: each node's influence on the targets is read on the whole graph and summed over each
   gene's tokens (``gene_view(graph)``), so a node shows the share it carries in the full graph, not
   in what pruning left of it.
2. Pruning: ``graph.prune(node_threshold, edge_threshold)``, then the gene view of the pruned graph
   (a gene's token nodes merged, its kept edges summed). Pruning keeps every token node, so the
   node rule is applied to the gene and template-token nodes here: only the most influential ones
   that carry ``node_threshold`` of their summed influence are drawn. Nodes left without an edge
   are not drawn.
3. Layout as :func:`draw_circuit`: layers up (embeddings and genes at
   the bottom, logits on top), prompt positions across, a column only for the positions drawn; a
   gene sits at its first token. Node area grows with influence.
4. Edges are line segments, one trace per sign and width class (|weight| over the largest: below
   0.1, 0.1-0.3, above 0.3), since a plotly trace has one line width; blue positive, red negative.
   Nodes are one trace per kind; hovering one shows its id, kind, layer, position, token, gene,
   activation (or logit), its feature's top genes where ``top_genes`` names them, and its influence.
   With ``links`` ((layer, feature) -> URL, e.g. the feature's card in the book's feature atlas), a
   feature node's hover says so and a click on it opens the URL: the URL is the node's last
   ``customdata`` entry and ``layout.meta["click_opens"]`` names that entry, which
   :func:`c2srepro.book.display.interactive` turns into plotly's click event.
5. Paths: for the ``n_highlight`` most influential nodes, the edges of every path through the node
   (from its ancestors into it, and from it on to the targets) form one hidden trace; a dropdown
   (plotly's own ``updatemenus``, no hand-written JavaScript) shows one of them and dims the rest.

The figure needs plotly (imported when called). To show it offline, embed plotly.js in the page:
``fig.to_html(include_plotlyjs=True)``, as :func:`c2srepro.book.display.interactive` does; plotly's
notebook renderers ``notebook_connected`` and ``plotly_mimetype`` load it from a CDN.

The static drawing puts layers up (embeddings at the bottom, logits at the top) and positions
across, labels the positions the graph touches with their token and gene, and scales edge width by
|weight| (blue positive, red negative). With ``compress=True`` (the default) only the positions the
graph touches get a column, in prompt order, so a circuit over a few dozen of a prompt's hundreds
of tokens stays legible at page width; the tick labels keep each column's position
(``"311: V [VWF]"``). The figure widens with the number of columns unless ``figsize`` is given.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from c2srepro.attribution.full_graph import Graph, gene_view
from c2srepro.attribution.nodes import KIND_LABELS

_COLOURS = {"feature": "#4c72b0", "error": "#8c8c8c", "embedding": "#55a868", "bias": "#ccb974", "logit": "#c44e52"}
COLOURS = {**_COLOURS, "embedding": "#b7d7b7", "gene": _COLOURS["embedding"]}
KIND_NAMES = {**KIND_LABELS, "gene": "gene (its tokens merged)", "embedding": "template token"}
WIDTH_CLASSES = ((0.0, 0.8), (0.1, 2.0), (0.3, 4.0))  # (lower bound of |w| / max |w|, line width)
_HOVER = ("%{customdata[0]}<br>%{customdata[1]}<br>layer %{customdata[2]}, position %{customdata[3]}"
          "<br>token %{customdata[4]}<br>gene %{customdata[5]}<br>%{customdata[6]}"
          "<br>top genes: %{customdata[7]}<br>influence %{customdata[8]}%{customdata[9]}<extra></extra>")
CLICK_COLUMN = 10  # the customdata entry holding a node's URL (module docstring, step 4)
MENU_ROW = 50  # pixels between the legend and the node menu above it


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as error:
        raise ImportError("graph_figure needs plotly: `pip install plotly` "
                          "(c2srepro lists it as a dependency)") from error
    return go


def _text(raw) -> str:
    # Byte-level BPE spells a leading space "Ġ" and a newline "Ċ"; the figure shows the text.
    text = str(raw).replace("Ġ", " ").replace("Ċ", "\\n")
    return text.strip() or repr(text)


def _drawn_graph(graph: Graph, node_threshold: float, edge_threshold: float) -> nx.DiGraph:
    """Steps 1-2: the pruned gene view as a networkx DAG (edges source -> target, weight = A[t, s])."""
    influence = dict(zip(*(gene_view(graph).nodes[c] for c in ("node_id", "influence"))))
    view = gene_view(graph.prune(node_threshold=node_threshold, edge_threshold=edge_threshold))
    adjacency = view.adjacency.cpu().numpy()
    targets, sources = np.nonzero(adjacency)
    ids = view.nodes["node_id"].to_numpy()
    drawn = nx.DiGraph(n_layers=graph.n_layers)
    kinds = view.nodes["kind"].to_numpy()
    inputs = np.flatnonzero((kinds == "gene") | (kinds == "embedding"))
    full = np.array([influence.get(ids[i], 0.0) for i in inputs])
    order = np.argsort(-full, kind="stable")
    share = np.cumsum(full[order]) / max(full.sum(), 1e-30)
    shown = set(inputs[order[: int(np.searchsorted(share, node_threshold - 1e-12)) + 1]].tolist())
    hidden = set(inputs.tolist()) - shown
    edges = [(t, s) for t, s in zip(targets.tolist(), sources.tolist()) if s not in hidden]
    keep = {i for edge in edges for i in edge} | set(np.flatnonzero(view.nodes["is_target"].to_numpy()).tolist())
    for i in sorted(keep):
        row = view.nodes.iloc[i]
        drawn.add_node(ids[i], kind=row["kind"], layer=int(row["layer"]), position=int(row["position"]),
                       feature=None if pd.isna(row["feature"]) else int(row["feature"]), token=row["token"],
                       gene=row["gene"], activation=None if pd.isna(row["activation"]) else float(row["activation"]),
                       is_target=bool(row["is_target"]), influence=float(influence.get(ids[i], row["influence"])))
    for t, s in edges:
        drawn.add_edge(ids[s], ids[t], weight=float(adjacency[t, s]))
    return drawn


def path_edges(graph: nx.DiGraph, node: str) -> list[tuple[str, str]]:
    """The edges of every path through ``node``: into it from its ancestors, out of it to its descendants."""
    up, down = nx.ancestors(graph, node) | {node}, nx.descendants(graph, node) | {node}
    return [(u, v) for u, v in graph.edges if (u in up and v in up) or (u in down and v in down)]


def _segments(xy, edges) -> tuple[list, list]:
    xs, ys = [], []
    for u, v in edges:
        xs += [xy[u][0], xy[v][0], None]
        ys += [xy[u][1], xy[v][1], None]
    return xs, ys


def graph_figure(
    graph: Graph,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    top_genes: Mapping[tuple[int, int], str | Sequence[str]] | None = None,
    n_highlight: int = 25,
    height: int = 640,
    title: str | None = None,
    links: Mapping[tuple[int, int], str] | None = None,
):
    """The pruned gene-level graph of ``graph`` as a ``plotly.graph_objects.Figure`` (module docstring).

    node_threshold / edge_threshold: influence pruning's (circuit-tracer's defaults);
    top_genes: (layer, feature) -> the feature's top genes (a string or a list), shown on hover;
    n_highlight: how many of the most influential nodes get a "highlight its paths" entry;
    links: (layer, feature) -> the URL a click on the feature's node opens (module docstring, step 4).
    """
    go = _plotly()
    if n_highlight < 0:
        raise ValueError(f"n_highlight must be >= 0, got {n_highlight}")
    drawn = _drawn_graph(graph, node_threshold, edge_threshold)
    columns = circuit_columns(drawn)
    xy = _layout(drawn, columns)
    top_genes = top_genes or {}

    fig = go.Figure()
    weights = [abs(d["weight"]) for _, _, d in drawn.edges(data=True)]
    largest = max(weights, default=1.0) or 1.0
    n_edge_traces = 0
    for sign, colour in ((1, "#2a6fdb"), (-1, "#d62728")):
        for i, (low, width) in enumerate(WIDTH_CLASSES):
            high = WIDTH_CLASSES[i + 1][0] if i + 1 < len(WIDTH_CLASSES) else math.inf
            edges = [(u, v) for u, v, d in drawn.edges(data=True)
                     if (d["weight"] > 0) == (sign > 0) and low <= abs(d["weight"]) / largest < high]
            xs, ys = _segments(xy, edges)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": width}, opacity=0.5,
                                     hoverinfo="skip", showlegend=False))
            n_edge_traces += 1

    influences = np.array([abs(d["influence"]) for _, d in drawn.nodes(data=True)])
    scale = float(influences.max()) if len(influences) and influences.max() > 0 else 1.0
    for kind in COLOURS:
        ids = [n for n, d in drawn.nodes(data=True) if d["kind"] == kind]
        if not ids:
            continue
        data = [drawn.nodes[n] for n in ids]
        custom = [[
            n, KIND_NAMES[d["kind"]] + (" (target)" if d["is_target"] else ""), d["layer"], d["position"],
            _text(d["token"]), d["gene"] or "-",
            ("logit" if d["kind"] == "logit" else "activation")
            + (f" {d['activation']:.4g}" if d["activation"] is not None else " -"),
            _top(top_genes, d), f"{d['influence']:.4g}",
            *_link(links or {}, d),
        ] for n, d in zip(ids, data)]
        fig.add_trace(go.Scatter(
            x=[xy[n][0] for n in ids], y=[xy[n][1] for n in ids], mode="markers", name=KIND_NAMES[kind],
            marker={"color": COLOURS[kind], "size": [8 + 22 * math.sqrt(abs(d["influence"]) / scale) for d in data],
                    "line": {"color": ["black" if d["is_target"] else "white" for d in data],
                             "width": [3 if d["is_target"] else 1 for d in data]}},
            customdata=custom, hovertemplate=_HOVER,
        ))
    n_base = len(fig.data)

    ranked = sorted((n for n, d in drawn.nodes(data=True) if not d["is_target"]),
                    key=lambda n: -abs(drawn.nodes[n]["influence"]))[:n_highlight]
    for node in ranked:
        xs, ys = _segments(xy, path_edges(drawn, node))
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", visible=False, hoverinfo="skip", showlegend=False,
                                 line={"color": "#ff7f0e", "width": 3},
                                 marker={"symbol": "circle-open", "size": 14, "color": "#ff7f0e"}))
    buttons = [{"label": "paths of: no node", "method": "restyle",
                "args": [{"visible": [True] * n_base + [False] * len(ranked),
                          "opacity": [0.5] * n_edge_traces + [1.0] * (len(fig.data) - n_edge_traces)}]}]
    for i, node in enumerate(ranked):
        d = drawn.nodes[node]
        label = f"paths of: {node}" + (f" [{d['gene']}]" if d["gene"] and d["kind"] != "gene" else "")
        buttons.append({"label": label, "method": "restyle", "args": [{
            "visible": [True] * n_base + [j == i for j in range(len(ranked))],
            "opacity": [0.12] * n_edge_traces + [1.0] * (len(fig.data) - n_edge_traces)}]})

    positions = sorted(columns)
    tokens = graph.nodes[graph.nodes["kind"] == "embedding"].set_index("position")
    gene_at = {d["position"]: d["gene"] for _, d in drawn.nodes(data=True) if d["kind"] == "gene"}
    labels = [f"{p}: {gene_at[p]}" if p in gene_at else
              f"{p}: {_text(tokens.at[p, 'token'])}" + (f" [{tokens.at[p, 'gene']}]" if tokens.at[p, "gene"] else "")
              for p in positions]
    n_layers = graph.n_layers
    fig.update_layout(
        title=title, height=height, autosize=True, template="plotly_white", hovermode="closest",
        # the node menu sits above the legend, which wraps to a second row on a narrow page
        margin={"l": 50, "r": 10, "t": (100 if title else 70) + (MENU_ROW if ranked else 0), "b": 120},
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1.0, "xanchor": "right"},
        xaxis={"tickvals": [columns[p] for p in positions], "ticktext": labels, "tickangle": -90,
               "tickfont": {"size": 9}, "title": "prompt position: token [gene] (positions drawn only)",
               "showgrid": False, "zeroline": False},
        yaxis={"tickvals": list(range(-1, n_layers + 1)), "ticktext": ["emb", *map(str, range(n_layers)), "logit"],
               "title": "layer", "range": [-1.7, n_layers + 0.7], "zeroline": False},
        meta={"click_opens": CLICK_COLUMN} if links else None,
        updatemenus=[{"buttons": buttons, "direction": "down", "showactive": True, "x": 0.0, "xanchor": "left",
                      "y": 1.02, "yanchor": "bottom", "pad": {"b": MENU_ROW}}] if ranked else [],
    )
    return fig


def _link(links: Mapping, data: dict) -> tuple[str, str]:
    url = links.get((data["layer"], data["feature"]), "") if data["kind"] == "feature" else ""
    return ("<br>click: open its card" if url else ""), url


def _top(top_genes: Mapping, data: dict) -> str:
    if data["kind"] != "feature":
        return "-"
    genes = top_genes.get((data["layer"], data["feature"]))
    if genes is None:
        return "unknown"
    return genes if isinstance(genes, str) else ", ".join(genes)


# ---------------------------------------------------------------------- the static drawing


def circuit_columns(graph: nx.DiGraph, *, compress: bool = True) -> dict[int, int]:
    """{prompt position: x column} for the positions the circuit touches: consecutive columns in
    prompt order when ``compress``, else the position itself."""
    positions = sorted({d["position"] for _, d in graph.nodes(data=True)})
    return {p: (i if compress else p) for i, p in enumerate(positions)}


def _layout(graph: nx.DiGraph, columns: dict[int, int]) -> dict[str, tuple[float, float]]:
    """x = the position's column (nodes sharing a layer and position spread within it), y = layer."""
    cells: dict[tuple[int, int], list[str]] = defaultdict(list)
    for node_id, data in graph.nodes(data=True):
        cells[(data["layer"], data["position"])].append(node_id)
    xy = {}
    for (layer, position), members in cells.items():
        members.sort()
        width = min(0.8, 0.25 * (len(members) - 1))
        for i, node_id in enumerate(members):
            offset = 0.0 if len(members) == 1 else width * (i / (len(members) - 1) - 0.5)
            xy[node_id] = (columns[position] + offset, layer)
    return xy


def _position_label(graph: nx.DiGraph, position: int, *, with_position: bool) -> str:
    # Byte-level BPE spells a leading space "Ġ" and a newline "Ċ"; the label shows the text.
    raw = str(graph.graph["prompt_tokens"][position]).replace("Ġ", " ").replace("Ċ", "\n")
    token = raw.strip() or repr(raw)
    genes = graph.graph["genes"]
    gene = genes[position] if genes is not None else None
    text = f"{token} [{gene}]" if gene else token
    return f"{position}: {text}" if with_position else text


def draw_circuit(
    circuit: Graph,
    *,
    figsize: tuple[float, float] | None = None,
    label_features: bool = True,
    compress: bool = True,
    fontsize: float = 8.0,
) -> Figure:
    """Draw a circuit: layers up, positions across (only those it touches when ``compress``), gene
    tokens labelled in green, edge width by |attribution|. ``figsize`` None: 0.32 inch per column
    (at least 7 wide) by 0.55 inch per layer (at least 5 high). Meant for a small graph (a greedy
    circuit, :func:`~c2srepro.attribution.full_graph.greedy_paths`, or a strongly pruned one)."""
    graph = circuit.to_networkx()
    columns = circuit_columns(graph, compress=compress)
    n_layers = graph.graph["n_layers"]
    if figsize is None:
        span = len(columns) if compress else max(columns.values(), default=0) + 1
        figsize = (max(7.0, 2.5 + 0.32 * span), max(5.0, 2.2 + 0.55 * (n_layers + 2)))
    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.add_subplot()
    xy = _layout(graph, columns)
    weights = [abs(d["weight"]) for _, _, d in graph.edges(data=True)]
    max_weight = max(weights, default=1.0) or 1.0
    for u, v, d in sorted(graph.edges(data=True), key=lambda e: abs(e[2]["weight"])):
        (x0, y0), (x1, y1) = xy[u], xy[v]
        colour = "#2a6fdb" if d["weight"] >= 0 else "#d62728"
        width = 0.3 + 4.0 * abs(d["weight"]) / max_weight
        ax.plot([x0, x1], [y0, y1], color=colour, alpha=0.6, linewidth=width, zorder=1)
    target = graph.graph["target"]
    for kind, colour in _COLOURS.items():
        ids = [n for n, d in graph.nodes(data=True) if d["kind"] == kind]
        if ids:
            ax.scatter([xy[n][0] for n in ids], [xy[n][1] for n in ids], s=40, color=colour, edgecolor="black",
                       linewidth=0.5, zorder=2)
    tx, ty = xy[target]
    ax.scatter([tx], [ty], s=160, facecolor="none", edgecolor="black", linewidth=1.5, zorder=3)
    if label_features:
        for node_id, data in graph.nodes(data=True):
            if data["kind"] == "feature":
                ax.annotate(str(data["feature"]), xy[node_id], xytext=(3, 3), textcoords="offset points",
                            fontsize=fontsize - 2)

    positions = sorted(columns)
    labels = [_position_label(graph, p, with_position=compress) for p in positions]
    ax.set_xticks([columns[p] for p in positions], labels, rotation=90, fontsize=fontsize)
    genes = graph.graph["genes"]
    for tick, position in zip(ax.get_xticklabels(), positions):
        if genes is not None and genes[position]:
            tick.set_color("#1b7837")
            tick.set_fontweight("bold")
    if compress:
        ax.set_xlim(-0.7, len(positions) - 0.3)
    ax.set_yticks(range(-1, n_layers + 1), ["emb", *map(str, range(n_layers)), "logit"], fontsize=fontsize)
    ax.set_ylim(-1.7, n_layers + 0.7)
    ax.set_xlabel(("prompt position: token [gene] of the positions the circuit touches" if compress
                   else "token position") + " (gene tokens in green)", fontsize=fontsize + 1)
    ax.set_ylabel("layer")
    ax.set_title(f"circuit for {target} (value {graph.graph['target_value']:.3g})", fontsize=fontsize + 2)
    present = {d["kind"] for _, d in graph.nodes(data=True)}
    handles = [
        Line2D([], [], marker="o", linestyle="", color=c, label=KIND_LABELS[k])
        for k, c in _COLOURS.items()
        if k in present
    ]
    handles += [
        Line2D([], [], color="#2a6fdb", label="positive edge"),
        Line2D([], [], color="#d62728", label="negative edge"),
    ]
    # Above the plot, in one row: a legend at the side would take the width the columns need.
    fig.legend(handles=handles, fontsize=fontsize, loc="outside upper center", ncol=len(handles), frameon=False)
    return fig
