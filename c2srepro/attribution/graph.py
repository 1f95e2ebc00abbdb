"""Attribution graphs on disk and on paper: JSON export/import and a layer-by-position drawing.

JSON schema ``c2srepro-attribution-graph/1`` (modelled on the attribution-graph JSON that
circuit-tracer's viewer reads: ``metadata`` / ``nodes`` / ``links``)::

    {
      "metadata": {
        "schema": "c2srepro-attribution-graph/1",
        "prompt_tokens": [str, ...],        # one per prompt position
        "input_ids": [int, ...],
        "genes": [str | null, ...] | null,  # gene symbol each token lies in, null for template text
        "target": node_id, "target_value": float, "n_layers": int,
        "search": {"k": int, "depth": int, "threshold": float, "kinds": [str, ...]}
      },
      "nodes": [{
        "node_id": str,                     # e.g. "L23F2692@311", "L4error@7", "emb@0", "logit538@310"
        "kind": "feature" | "error" | "embedding" | "bias" | "logit",
        "feature_type": str,                # viewer-style name of the kind, e.g. "transcoder"
        "layer": int,                       # -1 for embeddings, n_layers for logits
        "ctx_idx": int,                     # token position
        "feature": int | null,              # transcoder feature id (feature nodes)
        "logit_token": int | null,          # token id whose logit this is (logit nodes)
        "token_id": int, "token": str, "gene": str | null,   # the token at ctx_idx
        "activation": float | null,         # feature activation z, or the logit; null otherwise
        "influence": float,                 # summed weight of the kept paths starting here
        "is_target": bool
      }, ...],
      "links": [{"source": node_id, "target": node_id, "weight": float}, ...]   # exact contribution
    }

The drawing puts layers up (embeddings at the bottom, logits at the top) and positions across,
labels the positions the circuit touches with their token and gene, and scales edge width by
|weight| (blue positive, red negative). With ``compress=True`` (the default) only the positions the
circuit touches get a column, in prompt order, so a circuit over a few dozen of a prompt's hundreds
of tokens stays legible at page width; the tick labels keep each column's position
(``"311: V [VWF]"``), and a thin grey band marks where untouched positions were skipped. The figure
widens with the number of columns unless ``figsize`` is given.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import networkx as nx
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from c2srepro._cache import write_json_atomic

SCHEMA = "c2srepro-attribution-graph/1"
FEATURE_TYPES = {
    "feature": "transcoder",
    "error": "mlp reconstruction error",
    "embedding": "embedding",
    "bias": "bias",
    "logit": "logit",
}
_NODE_FIELDS = ("kind", "layer", "feature", "logit_token", "token_id", "token", "gene", "activation", "influence")
_GRAPH_FIELDS = ("target", "target_value", "n_layers", "input_ids", "prompt_tokens", "genes", "search")
_COLOURS = {"feature": "#4c72b0", "error": "#8c8c8c", "embedding": "#55a868", "bias": "#ccb974", "logit": "#c44e52"}


def circuit_to_json(graph: nx.DiGraph) -> dict:
    """The JSON-ready dict of a circuit from :func:`c2srepro.attribution.circuit.find_circuit`."""
    target = graph.graph["target"]
    nodes = [
        {
            "node_id": node_id,
            "feature_type": FEATURE_TYPES[data["kind"]],
            "ctx_idx": data["position"],
            "is_target": node_id == target,
            **{field: data[field] for field in _NODE_FIELDS},
        }
        for node_id, data in graph.nodes(data=True)
    ]
    links = [{"source": u, "target": v, "weight": d["weight"]} for u, v, d in graph.edges(data=True)]
    metadata = {"schema": SCHEMA, **{field: graph.graph[field] for field in _GRAPH_FIELDS}}
    return {"metadata": metadata, "nodes": nodes, "links": links}


def circuit_from_json(data: dict) -> nx.DiGraph:
    """Inverse of :func:`circuit_to_json`."""
    metadata = data.get("metadata", {})
    if metadata.get("schema") != SCHEMA:
        raise ValueError(f"not a {SCHEMA} graph (metadata.schema is {metadata.get('schema')!r})")
    graph = nx.DiGraph(**{field: metadata[field] for field in _GRAPH_FIELDS})
    for node in data["nodes"]:
        graph.add_node(node["node_id"], position=node["ctx_idx"], **{field: node[field] for field in _NODE_FIELDS})
    for link in data["links"]:
        graph.add_edge(link["source"], link["target"], weight=link["weight"])
    return graph


def save_circuit(graph: nx.DiGraph, path: str | os.PathLike) -> Path:
    """Write a circuit as JSON, atomically."""
    return write_json_atomic(path, circuit_to_json(graph))


def load_circuit(path: str | os.PathLike) -> nx.DiGraph:
    return circuit_from_json(json.loads(Path(path).read_text()))


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
    graph: nx.DiGraph,
    *,
    figsize: tuple[float, float] | None = None,
    label_features: bool = True,
    compress: bool = True,
    fontsize: float = 8.0,
) -> Figure:
    """Draw a circuit: layers up, positions across (only those it touches when ``compress``), gene
    tokens labelled in green, edge width by |attribution|. ``figsize`` None: 0.32 inch per column
    (at least 7 wide) by 0.55 inch per layer (at least 5 high)."""
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
        Line2D([], [], marker="o", linestyle="", color=c, label=FEATURE_TYPES[k])
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
