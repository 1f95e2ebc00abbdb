"""The full attribution graph of one prompt: every active feature, error and token node, exact edges.

Definitions follow circuit-tracer (decoderesearch/circuit-tracer, ``attribute`` and ``graph.py``;
Ameisen et al. 2025, "Circuit Tracing"), computed on c2srepro's linearised replacement
(:mod:`c2srepro.attribution.linearised`: attention patterns and layer-norm scales frozen, each MLP =
transcoder + error), so every edge is an exact direct effect (eq. 5 generalised, as in
:mod:`c2srepro.attribution.contributions`).

Nodes, in adjacency order: the selected active features (sorted by layer, position, feature), one
error node per (layer, position), one token (``embedding``) node per position, then the logit
targets. A target is the logit of a token read at a position, or any active feature (it then stays
in the feature block, flagged ``is_target``); a logit target is the logit itself (circuit-tracer
reads the logit minus the mean logit, a demeaned unembedding direction). Biases are not nodes (as in circuit-tracer); each
computed row keeps their sum and the reading bias as its ``constant``, and the summed contribution
of the active features a cap left out of the graph as ``dropped``, so for every computed row
``adjacency[row].sum() + constant + dropped == value`` (the node's pre-activation or logit) exactly.

1. Targets: validate them (an active feature or a logit at a position in the prompt) and compute
   their rows first, in one batched backward pass.
2. Rows are computed ``batch_size`` at a time: one shared backward pass through the frozen model
   (the vector-Jacobian product of :mod:`c2srepro.attribution.contributions`, step 1), seeding each
   target's reading vector when the pass reaches its layer. A source writing u into r_{l+1} at s
   gets u . G_{l+1}[s]; for features u = z f_dec, gathered per position for active features only.
   Rows of one pass are neighbours in (layer, position), since a pass runs from the batch's top
   layer down and over the positions up to the batch's last.
3. Feature cap (``max_feature_nodes``): with the rows computed so far, estimate every active
   feature's influence as circuit-tracer does (rows |A| normalised to sum 1, influence
   w A + w A^2 + ... started from the target weights w, propagated only through computed rows),
   compute the rows of the ``update_interval * batch_size`` most influential unvisited features,
   and repeat until the cap. Without a cap every active feature's row is computed.
4. Keep the selected features' columns: the adjacency A[target, source] is square over the nodes,
   with zero rows for error and token nodes (sources only) and for features never computed.

Pruning and scores (circuit-tracer's definitions) work on the stored graph, so a graph is
re-pruned without recomputing: node influence I = w (N + N^2 + ...) with N the row-normalised |A|;
:func:`prune_graph` keeps the nodes carrying ``node_threshold`` of the cumulative influence and
the edges carrying ``edge_threshold`` of the edge scores N[t, s] (I[t] + w[t]), then drops feature
and error nodes left without a kept outgoing edge and features without a kept incoming one,
until stable. Tokens and targets are always kept. Unlike circuit-tracer, edge scores are taken on
the whole graph rather than re-normalised over the kept nodes, which makes the pruned graph
monotone: a larger threshold never drops a node or an edge that a smaller one kept;
``edge_scores="renormalised"`` gives circuit-tracer's own edge scores instead.

Views of the same graph: :func:`greedy_paths` (the paper's beam search over the stored rows) and
:func:`gene_view` (each gene's sub-word token nodes merged, genes ranked by influence). Files:
:meth:`Graph.save` writes one safetensors file with the node table and a schema version
in its header; :meth:`Graph.load` refuses any other version.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from c2srepro._cache import atomic_path
from c2srepro.attribution.circuit import beam_search, check_search
from c2srepro.attribution.contributions import Reading, by_step, node_reading, residual_gradients
from c2srepro.attribution.linearised import LinearisedReplacement
from c2srepro.attribution.nodes import Node
from c2srepro.attribution.targets import Answers, Target, as_target, check_weights

logger = logging.getLogger(__name__)

SCHEMA = "c2srepro-full-attribution-graph"
SCHEMA_VERSION = 1
NODE_COLUMNS = (
    "node_id", "kind", "layer", "position", "feature", "logit_token", "token_id", "token", "gene",
    "activation", "value", "constant", "dropped", "is_target", "computed",
)
_INT_COLUMNS = ("layer", "position", "token_id")
_NULLABLE_INT_COLUMNS = ("feature", "logit_token")
_FLOAT_COLUMNS = ("activation", "value", "constant", "dropped")
_BOOL_COLUMNS = ("is_target", "computed")


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"{name} must be in (0, 1] (a fraction of the cumulative influence to keep), got {value}"
        )


@dataclass
class Graph:
    """Adjacency (rows: targets of an edge, columns: sources) plus a node table in the same order."""

    adjacency: Float[Tensor, "node node"]
    nodes: pd.DataFrame  # one row per node, columns NODE_COLUMNS, index 0..n-1 = adjacency index
    target_weights: Float[Tensor, "node"]  # w: nonzero on the target nodes, summing to 1
    input_ids: list[int]
    n_layers: int
    info: dict = field(default_factory=dict)  # how it was built: n_active, max_feature_nodes, ...

    @property
    def n_nodes(self) -> int:
        return self.adjacency.shape[0]

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    def indices(self, kind: str) -> Int[Tensor, "k"]:
        """Adjacency indices of the nodes of one kind (feature, error, embedding, logit)."""
        return torch.as_tensor(np.flatnonzero(self.nodes["kind"].to_numpy() == kind), dtype=torch.long)

    @property
    def targets(self) -> list[int]:
        """Adjacency indices of the target nodes."""
        return np.flatnonzero(self.nodes["is_target"].to_numpy()).tolist()

    def node(self, index: int) -> Node:
        """The :class:`Node` at one adjacency index."""
        row = self.nodes.iloc[index]
        kind = row["kind"]
        extra = row["feature"] if kind == "feature" else row["logit_token"] if kind == "logit" else None
        if kind == "logit" and pd.isna(extra):  # a target read along a direction: its id carries its name
            return Node(kind, int(row["layer"]), int(row["position"]), name=row["node_id"].rsplit("@", 1)[0])
        return Node(kind, int(row["layer"]), int(row["position"]), None if extra is None else int(extra))

    def index_of(self, node: Node) -> int:
        """The adjacency index of a node; a clear error if the graph does not hold it."""
        match = np.flatnonzero(self.nodes["node_id"].to_numpy() == node.id)
        if not len(match):
            raise ValueError(f"node {node.id} is not in this graph (pruned, capped out, or not active)")
        return int(match[0])

    def node_influence(self) -> Float[Tensor, "node"]:
        """I = |w| (N + N^2 + ...): each node's total influence on the weighted targets."""
        return _influence(_normalise(self.adjacency), self.target_weights.abs())

    def scores(self) -> dict[str, float]:
        """circuit-tracer's replacement and completeness scores (module docstring of ``graph.py`` there).

        replacement: the share of token -> target influence that reaches the targets through
        features rather than error nodes, token / (token + error) influence;
        completeness: the influence-weighted mean over nodes of the non-error share of each
        node's inputs, sum_t (1 - sum_{s error} N[t, s]) (I[t] + w[t]) / sum_t (I[t] + w[t]).
        """
        normalised = _normalise(self.adjacency)
        influence = _influence(normalised, self.target_weights.abs())
        errors, tokens = self.indices("error"), self.indices("embedding")
        token_influence, error_influence = influence[tokens].sum(), influence[errors].sum()
        replacement = token_influence / (token_influence + error_influence)
        non_error = 1.0 - normalised[:, errors].sum(dim=1)
        weight = influence + self.target_weights.abs()
        completeness = (non_error * weight).sum() / weight.sum()
        return {"replacement": float(replacement), "completeness": float(completeness)}

    def subgraph(self, keep: Bool[Tensor, "node"], edges: Bool[Tensor, "node node"] | None = None) -> "Graph":
        """The graph on the kept nodes (and kept edges): itself a Graph, prunable again.

        Its node table keeps each node's ``value`` and ``constant`` from the full graph; the rows of
        a pruned graph no longer add up to them (what pruning removed is not tracked)."""
        if not bool(keep[self.targets].all()):
            raise ValueError("a subgraph must keep every target node")
        adjacency = self.adjacency if edges is None else self.adjacency * edges
        index = keep.nonzero().flatten()
        return Graph(
            adjacency=adjacency[index][:, index].clone(),
            nodes=self.nodes.iloc[index.numpy()].reset_index(drop=True),
            target_weights=self.target_weights[index].clone(),
            input_ids=list(self.input_ids),
            n_layers=self.n_layers,
            info=dict(self.info),
        )

    def prune(
        self, *, node_threshold: float = 0.8, edge_threshold: float = 0.98, edge_scores: str = "monotone"
    ) -> "Graph":
        """The influence-pruned graph (:func:`prune_graph`) as a new graph; its ``info["pruning"]``
        records the thresholds."""
        pruning = prune_graph(self, node_threshold=node_threshold, edge_threshold=edge_threshold,
                              edge_scores=edge_scores)
        pruned = self.subgraph(pruning.node_mask, pruning.edge_mask)
        pruned.info["pruning"] = {"node_threshold": node_threshold, "edge_threshold": edge_threshold,
                                  "edge_scores": edge_scores}
        return pruned

    def genes(self) -> pd.DataFrame:
        """Genes ranked by influence on the targets (:func:`gene_view`)."""
        return gene_view(self).genes

    def top_features(self, n: int) -> list[Node]:
        """The ``n`` feature nodes of largest influence at prompt positions (those an intervention on
        the prompt can switch off; a label target's graph also holds the answer's positions)."""
        prompt_length = self.info.get("prompt_length", self.n_pos)
        features = self.indices("feature")
        features = features[torch.as_tensor(self.nodes["position"].to_numpy())[features] < prompt_length]
        features = features[~torch.as_tensor(self.nodes["is_target"].to_numpy())[features]]
        order = self.node_influence()[features].argsort(descending=True, stable=True)
        return [self.node(int(i)) for i in features[order[:n]]]

    def to_networkx(self) -> nx.DiGraph:
        """The graph as a networkx DiGraph: graph attributes target, target_value, n_layers, input_ids,
        prompt_tokens, genes, search; node attributes the node table's columns plus ``influence``;
        edges source -> target with their weight. A node's ``influence`` is its summed path weight
        for a greedy circuit (:func:`greedy_paths`), else its influence I on the targets; the
        (first) target's is its value."""
        search = self.info.get("search")
        ids = self.nodes["node_id"].tolist()
        target = search["target"] if search else ids[self.targets[0]]
        influence = search["influence"] if search else dict(zip(ids, self.node_influence().tolist()))
        values = dict(zip(ids, self.nodes["value"].tolist()))
        tokens, genes = self.info.get("tokens"), self.info.get("genes")
        out = nx.DiGraph(
            target=target, target_value=float(values[target]), n_layers=self.n_layers,
            input_ids=list(self.input_ids),
            prompt_tokens=list(tokens) if tokens is not None else [str(i) for i in self.input_ids],
            genes=list(genes) if genes is not None else None,
            search={key: search[key] for key in ("k", "depth", "threshold", "kinds")} if search else None,
        )
        for row in self.nodes.itertuples(index=False):
            out.add_node(
                row.node_id, kind=row.kind, layer=int(row.layer), position=int(row.position),
                feature=None if pd.isna(row.feature) else int(row.feature),
                logit_token=None if pd.isna(row.logit_token) else int(row.logit_token),
                token_id=int(row.token_id), token=row.token, gene=row.gene,
                activation=None if pd.isna(row.activation) else float(row.activation),
                influence=float(values[target]) if row.node_id == target else float(influence.get(row.node_id, 0.0)),
            )
        sinks, sources = self.adjacency.nonzero(as_tuple=True)
        for sink, source in zip(sinks.tolist(), sources.tolist()):
            out.add_edge(ids[source], ids[sink], weight=float(self.adjacency[sink, source]))
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file (tensors) whose header holds the node table and info as JSON, atomically."""
        records = self.nodes.astype(object).where(self.nodes.notna(), None).to_dict("records")
        metadata = {
            "schema": SCHEMA,
            "schema_version": str(SCHEMA_VERSION),
            "nodes": json.dumps(records, default=_plain),
            "graph": json.dumps({"input_ids": self.input_ids, "n_layers": self.n_layers, "info": self.info},
                                default=_plain),
        }
        tensors = {"adjacency": self.adjacency.contiguous().cpu(), "target_weights": self.target_weights.cpu()}
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Graph":
        """Read a graph written by :meth:`save`; a file of another schema version is an error."""
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("schema") != SCHEMA:
                raise ValueError(f"{path} is not a {SCHEMA} file (its schema is {metadata.get('schema')!r})")
            version = metadata.get("schema_version")
            if version != str(SCHEMA_VERSION):
                raise ValueError(
                    f"{path} has graph schema version {version}, but this c2srepro reads version "
                    f"{SCHEMA_VERSION}; rebuild the graph with build_graph (or read it with the c2srepro "
                    "version that wrote it)"
                )
            adjacency, weights = handle.get_tensor("adjacency"), handle.get_tensor("target_weights")
        graph = json.loads(metadata["graph"])
        return cls(
            adjacency=adjacency,
            nodes=_typed(pd.DataFrame(json.loads(metadata["nodes"]), columns=list(NODE_COLUMNS))),
            target_weights=weights,
            input_ids=graph["input_ids"],
            n_layers=graph["n_layers"],
            info=graph["info"],
        )


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _typed(nodes: pd.DataFrame) -> pd.DataFrame:
    """The node table with its fixed column types (what a save/load round trip must give back)."""
    nodes = nodes.copy()
    for column in _INT_COLUMNS:
        nodes[column] = nodes[column].astype("int64")
    for column in _NULLABLE_INT_COLUMNS:
        nodes[column] = nodes[column].astype("Int64")
    for column in _FLOAT_COLUMNS:
        nodes[column] = nodes[column].astype("float64")
    for column in _BOOL_COLUMNS:
        nodes[column] = nodes[column].astype(bool)
    for column in ("node_id", "kind", "token"):
        nodes[column] = nodes[column].astype(str)
    nodes["gene"] = nodes["gene"].astype(object).where(nodes["gene"].notna(), None)
    return nodes


def _normalise(matrix: Float[Tensor, "node node"]) -> Float[Tensor, "node node"]:
    """|A| with each row scaled to sum 1 (rows of zeros stay zero)."""
    magnitude = matrix.abs()
    return magnitude / magnitude.sum(dim=1, keepdim=True).clamp(min=1e-30)


def _influence(normalised: Float[Tensor, "node node"], weights: Float[Tensor, "node"]) -> Float[Tensor, "node"]:
    """w N + w N^2 + ... (the graph is a DAG over layers, so the series ends)."""
    current = weights
    influence = torch.zeros(normalised.shape[1], dtype=normalised.dtype, device=normalised.device)
    for _ in range(normalised.shape[0] + 1):
        current = current @ normalised
        if not bool(current.any()):
            return influence
        influence = influence + current
    raise RuntimeError("influence did not converge: the adjacency has a cycle, which an attribution graph cannot")


def _partial_influence(
    blocks: Sequence[Float[Tensor, "row col"]],
    weights: Float[Tensor, "col"],
    col_of_row: Int[Tensor, "row"],
    row_sums: Float[Tensor, "row"] | None = None,
) -> Float[Tensor, "col"]:
    """w N + w N^2 + ... over the columns of a partial graph, N its rows normalised as
    :func:`_normalise` does: ``blocks`` are its computed rows of A, ``col_of_row`` the column of
    each row's node, ``row_sums`` (optional) the rows' sums of |A| (kept from one update to the next).

    Influence reaching a column is carried on only through that node's row, if it has one, so the
    series runs on the [row, row] block N[:, col_of_row]: with c_0 = w[col_of_row] and
    c_{k+1} = c_k N[:, col_of_row], the influence is (sum_k c_k) N, a single product with the
    rows. Equal to the series over all columns up to float rounding, without its copies of the
    [row, col] matrix (several GiB at a cap of 1024 features on Pythia-410m shapes)."""
    if row_sums is None:
        row_sums = torch.cat([b.abs().sum(dim=1) for b in blocks])
    row_sums = row_sums.clamp(min=1e-30)
    within = torch.cat([b[:, col_of_row] for b in blocks]).abs() / row_sums[:, None]
    current = weights[col_of_row]
    carried = torch.zeros_like(current)  # sum_k c_k
    for _ in range(len(current) + 2):
        if not bool(current.any()):
            break
        carried += current
        current = current @ within
    else:
        raise RuntimeError("influence did not converge: the adjacency has a cycle, which an attribution graph cannot")
    scaled = carried / row_sums
    influence = torch.zeros(blocks[0].shape[1], dtype=blocks[0].dtype, device=blocks[0].device)
    start = 0
    for b in blocks:
        influence += scaled[start : start + len(b)] @ b.abs()
        start += len(b)
    return influence


@dataclass(frozen=True)
class Pruning:
    """Which nodes and edges influence pruning keeps, and each node's cumulative influence share."""

    node_mask: Bool[Tensor, "node"]
    edge_mask: Bool[Tensor, "node node"]
    cumulative: Float[Tensor, "node"]  # share of total influence of this node and every stronger one


def _threshold_value(scores: Float[Tensor, "n"], threshold: float) -> float:
    """The smallest score to keep so that the kept scores carry ``threshold`` of their total."""
    ordered = scores.sort(descending=True).values
    total = ordered.sum()
    if not ordered.numel() or total <= 0:
        return 0.0
    cumulative = ordered.cumsum(0) / total
    index = min(int(torch.searchsorted(cumulative, threshold)), len(ordered) - 1)
    return float(ordered[index])


EDGE_SCORES = ("monotone", "renormalised")


def prune_graph(
    graph: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98,
    edge_scores: str = "monotone",
) -> Pruning:
    """Influence pruning (module docstring); thresholds in (0, 1], circuit-tracer's defaults.

    edge_scores: ``"monotone"`` scores edges on the whole graph; ``"renormalised"`` as
    circuit-tracer's ``prune_graph``: on the graph restricted to the kept nodes, its rows
    normalised and its influence recomputed there, every score (zeros included) entering the
    threshold."""
    _check_threshold("node_threshold", node_threshold)
    _check_threshold("edge_threshold", edge_threshold)
    if edge_scores not in EDGE_SCORES:
        raise ValueError(f"edge_scores must be one of {EDGE_SCORES}, got {edge_scores!r}")
    weights = graph.target_weights.abs()
    normalised = _normalise(graph.adjacency)
    influence = _influence(normalised, weights)
    kinds = graph.nodes["kind"].to_numpy()
    always = torch.as_tensor((kinds == "embedding") | graph.nodes["is_target"].to_numpy())
    is_feature = torch.as_tensor(kinds == "feature") & ~always
    needs_out = torch.as_tensor((kinds == "feature") | (kinds == "error")) & ~always

    node_mask = (influence >= _threshold_value(influence, node_threshold)) | always
    if edge_scores == "monotone":
        scores = normalised * (influence + weights)[:, None]
        nonzero = graph.adjacency != 0
        edge_mask = nonzero & (scores >= _threshold_value(scores[nonzero], edge_threshold))
    else:
        kept = _normalise(graph.adjacency * node_mask[:, None] * node_mask[None, :])
        scores = kept * (_influence(kept, weights) + weights)[:, None]
        edge_mask = scores >= _threshold_value(scores.flatten(), edge_threshold)
    while True:  # at most n_layers + 2 rounds: each removes a layer of dangling nodes
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        keep = node_mask & ~(needs_out & ~edge_mask.any(dim=0)) & ~(is_feature & ~edge_mask.any(dim=1))
        if bool((keep == node_mask).all()):
            break
        node_mask = keep
    order = influence.argsort(descending=True)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = influence[order].cumsum(0) / influence.sum().clamp(min=1e-30)
    return Pruning(node_mask=node_mask, edge_mask=edge_mask, cumulative=cumulative)


@dataclass(frozen=True)
class _Columns:
    """Column layout during the computation: all active features, errors, tokens, logit targets."""

    feature_start: list[int]  # offset of each layer's active features (n_layers + 1 entries)
    error_start: int
    token_start: int
    logit_start: int
    n_cols: int
    slots: list[tuple[Tensor, Tensor]]  # per layer: (position-major padded feature ids [pos, M], slot of each active)
    # Decoders row-major or column-major, as the transcoder stores them (W_dec may be a transpose):
    # a gather of rows of the one or columns of the other's transpose reads memory in order, while
    # gathering rows strided is an order of magnitude slower than the whole backward pass's
    # matmuls, and a row-major copy of every decoder would hold 0.75 GiB at Pythia-410m shapes.
    decoders: list[Float[Tensor, "d_tc d_model"]]

    @classmethod
    def of(cls, rep: LinearisedReplacement, n_logits: int) -> "_Columns":
        starts = [0]
        slots = []
        for act in rep.active:
            starts.append(starts[-1] + len(act))
            counts = torch.bincount(act.position, minlength=rep.n_pos)
            first = counts.cumsum(0) - counts  # index of each position's first active feature
            slot = torch.arange(len(act), device=act.position.device) - first[act.position]
            padded = act.feature.new_zeros(rep.n_pos, int(counts.max()) if len(act) else 0)
            padded[act.position, slot] = act.feature
            slots.append((padded, slot))
        error_start = starts[-1]
        token_start = error_start + rep.n_layers * rep.n_pos
        logit_start = token_start + rep.n_pos
        decoders = [w if w.is_contiguous() or w.T.is_contiguous() else w.contiguous()
                    for w in (tc.W_dec for tc in rep.transcoders)]
        return cls(starts, error_start, token_start, logit_start, logit_start + n_logits, slots, decoders)


@torch.no_grad()
def _rows(rep: LinearisedReplacement, readings: Sequence[Reading], cols: _Columns) -> tuple[Tensor, Tensor]:
    """One shared backward pass (module docstring, step 2): rows over ``cols`` and each row's
    constant, in the order of ``readings``."""
    order = by_step(readings)
    readings = [readings[i] for i in order]
    rows = rep.weights.embed.new_zeros(len(readings), cols.n_cols)
    constant = torch.tensor([r.constant for r in readings], dtype=rows.dtype, device=rows.device)
    # One buffer for every layer's gathered decoders: a fresh [pos, M, d_model] tensor a layer
    # (~120 MiB at Pythia-410m shapes) is a fresh mmap, and its page faults cost more than the gather.
    gathered = rows.new_empty(0)
    for layer, grad in residual_gradients(rep, readings):
        n, n_pos = grad.shape[:2]  # the rows seeded so far and the positions they read up to
        if layer is None:
            rows[:n, cols.token_start : cols.token_start + n_pos] = torch.einsum(
                "ntd,td->nt", grad, rep.weights.embed[rep.input_ids[:n_pos]]
            )
            continue
        if not n:
            continue
        act = rep.active[layer]
        padded, slot = cols.slots[layer]
        visible = (act.position < n_pos).nonzero().flatten()
        if len(visible):
            # f_dec . G only for the features active at each position (a batched matmul over
            # positions): the dense [pos, d_tc] projection would cost d_tc / active-per-token more.
            ids = padded[:n_pos]
            w_dec = cols.decoders[layer]
            d_model = w_dec.shape[1]
            if gathered.numel() < ids.numel() * d_model:
                gathered = rows.new_empty(max(ids.numel() for ids, _ in cols.slots) * d_model)
            if w_dec.is_contiguous():
                decoders = gathered[: ids.numel() * d_model].view(ids.numel(), d_model)
                torch.index_select(w_dec, 0, ids.flatten(), out=decoders)
                projected = torch.einsum("npd,pmd->npm", grad, decoders.view(*ids.shape, d_model))
            else:  # column-major: gather columns of the [d_model, d_tc] transpose
                decoders = gathered[: ids.numel() * d_model].view(d_model, ids.numel())
                torch.index_select(w_dec.T, 1, ids.flatten(), out=decoders)
                projected = torch.einsum("npd,dpm->npm", grad, decoders.view(d_model, *ids.shape))
            start = cols.feature_start[layer]
            rows[:n, start + visible] = act.activation[visible] * projected[:, act.position[visible], slot[visible]]
        error_col = cols.error_start + layer * rep.n_pos
        rows[:n, error_col : error_col + n_pos] = torch.einsum("ntd,td->nt", grad, rep.errors[layer, :n_pos])
        constant[:n] += (grad @ rep.written_bias[layer]).sum(dim=1)
    if order != sorted(order):
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order)] = torch.arange(len(order))
        rows, constant = rows[back.to(rows.device)], constant[back.to(rows.device)]
    return rows, constant


def _feature_nodes(rep: LinearisedReplacement) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """layer, position, feature, activation of every active feature, in column order."""
    layers = torch.cat([torch.full((len(a),), layer, dtype=torch.long) for layer, a in enumerate(rep.active)])
    positions = torch.cat([a.position.cpu() for a in rep.active])
    features = torch.cat([a.feature.cpu() for a in rep.active])
    activations = torch.cat([a.activation.cpu() for a in rep.active])
    return layers, positions, features, activations


def build_graph(
    rep: LinearisedReplacement,
    targets: Target | Node | Sequence[Target | Node],
    *,
    target_weights: Sequence[float] | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    tokens: Sequence[str] | None = None,
    genes: Sequence[str | None] | None = None,
    prompt_length: int | None = None,
    answers: Answers | None = None,
) -> Graph:
    """The full attribution graph of ``rep``'s prompt for ``targets`` (module docstring, steps 1-4).

    targets: :mod:`c2srepro.attribution.targets` objects, or feature / logit nodes (a logit node
    is its raw logit); target_weights: their weights w in influence, of either sign (default
    equal; scaled to sum |w| = 1); max_feature_nodes: cap on feature nodes, chosen by influence
    (None: every active feature); batch_size: rows per backward pass; update_interval: batches
    between influence re-estimates; tokens / genes: per token its string and gene symbol (None for
    template text); prompt_length, answers: what label targets need
    (:meth:`c2srepro.attribution.targets.Target.resolve`).
    """
    targets = [targets] if isinstance(targets, (Target, Node)) else list(targets)
    if not targets:
        raise ValueError("give at least one target (a Target, or a logit or active feature node)")
    resolved = [as_target(t).resolve(rep, prompt_length=prompt_length, answers=answers) for t in targets]
    target_nodes = [r.node for r in resolved]
    if len({n.id for n in target_nodes}) != len(target_nodes):
        raise ValueError(f"the targets must be distinct, got {[n.id for n in target_nodes]}")
    if batch_size < 1 or update_interval < 1:
        raise ValueError(f"batch_size and update_interval must be >= 1, got {batch_size}, {update_interval}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError(f"max_feature_nodes must be >= 0 or None, got {max_feature_nodes}")
    for name, values in (("tokens", tokens), ("genes", genes)):
        if values is not None and len(values) != rep.n_pos:
            raise ValueError(f"{name} must have one entry per prompt token ({rep.n_pos}), got {len(values)}")
    w = check_weights(target_weights, len(targets))

    logit_targets = [r for r in resolved if r.node.kind == "logit"]
    logit_nodes = [r.node for r in logit_targets]
    cols = _Columns.of(rep, len(logit_targets))
    f_layer, f_pos, f_feat, f_act = _feature_nodes(rep)
    n_active = len(f_layer)
    cap = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)

    def column(node: Node) -> int:
        if node.kind == "logit":
            return cols.logit_start + logit_nodes.index(node)
        return cols.feature_start[node.layer] + rep.active_index(node)

    # Step 1: the targets' rows; row_col[r] is the column of row r's node.
    row_blocks, constants, row_sums = [], [], []
    for start in range(0, len(resolved), batch_size):
        rows, constant = _rows(rep, [r.reading for r in resolved[start : start + batch_size]], cols)
        row_blocks.append(rows)
        constants.append(constant)
    row_col = [column(n) for n in target_nodes]
    visited = torch.zeros(n_active, dtype=torch.bool)
    for node in target_nodes:
        if node.kind == "feature":
            visited[column(node)] = True
    col_weights = rep.weights.embed.new_zeros(cols.n_cols)
    col_weights[row_col] = w.abs().to(col_weights)
    n_features = int(visited.sum())
    cap = max(cap, n_features)  # feature targets always count as feature nodes

    # Steps 2-3: feature rows, most influential first under a cap.
    while n_features < cap:
        unvisited = (~visited).nonzero().flatten()
        if cap == n_active:
            pending = unvisited
        else:
            row_sums += [b.abs().sum(dim=1) for b in row_blocks[len(row_sums) :]]  # each block's once
            influence = _partial_influence(
                row_blocks, col_weights, torch.tensor(row_col, device=col_weights.device), torch.cat(row_sums)
            )
            influence = influence[:n_active].cpu()
            queue = min(update_interval * batch_size, cap - n_features)
            order = influence[unvisited].argsort(descending=True, stable=True)
            pending = unvisited[order[:queue]]
        # Batches of nearby (layer, position) rows: a pass starts at the batch's highest layer and
        # stops at its last position, so mixed batches would waste most of their work.
        pending = pending[torch.argsort(f_layer[pending] * rep.n_pos + f_pos[pending], stable=True)]
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            readings = [node_reading(rep, Node.feature(f_layer[i], f_pos[i], f_feat[i])) for i in batch.tolist()]
            rows, constant = _rows(rep, readings, cols)
            row_blocks.append(rows)
            constants.append(constant)
            row_col.extend(batch.tolist())
            visited[batch] = True
            n_features += len(batch)
        logger.info("attribution graph: %d of %d feature rows computed", n_features, cap)

    # Step 4: square adjacency over selected features, errors, tokens, logit targets.
    selected = visited.nonzero().flatten()
    kept_cols = torch.cat([selected, torch.arange(n_active, cols.n_cols)])
    new_index = torch.full((cols.n_cols,), -1, dtype=torch.long)
    new_index[kept_cols] = torch.arange(len(kept_cols))
    device = row_blocks[0].device
    dropped = torch.ones(cols.n_cols, dtype=torch.bool, device=device)
    dropped[kept_cols.to(device)] = False
    adjacency = torch.zeros(len(kept_cols), len(kept_cols), dtype=row_blocks[0].dtype)
    row_index = new_index[torch.tensor(row_col)]
    # Block by block, freeing each as it is read: concatenating the rows first would copy them whole.
    dropped_sums, start = [], 0
    while row_blocks:
        block = row_blocks.pop(0)
        dropped_sums.append(block[:, dropped].sum(dim=1).cpu().to(torch.float64))
        adjacency[row_index[start : start + len(block)]] = block[:, kept_cols.to(device)].cpu()
        start += len(block)
    dropped_sum = torch.cat(dropped_sums)
    constant_of = torch.full((len(kept_cols),), float("nan"), dtype=torch.float64)
    constant_of[row_index] = torch.cat(constants).cpu().to(torch.float64)
    weights = torch.zeros(len(kept_cols), dtype=adjacency.dtype)
    weights[new_index[torch.tensor([column(n) for n in target_nodes])]] = w.to(adjacency.dtype)

    nodes = _node_table(rep, selected, (f_layer, f_pos, f_feat, f_act), logit_targets, tokens, genes)
    nodes["constant"] = constant_of.numpy()
    dropped_of = torch.full((len(kept_cols),), float("nan"), dtype=torch.float64)
    dropped_of[row_index] = dropped_sum
    nodes["dropped"] = dropped_of.numpy()
    computed = ~torch.isnan(constant_of)
    nodes["computed"] = computed.numpy()
    values = adjacency.sum(dim=1).to(torch.float64) + constant_of + dropped_of
    nodes["value"] = values.numpy()  # = pre-activation or logit on the real prompt (exact decomposition)
    nodes.loc[nodes["node_id"].isin([n.id for n in target_nodes]), "is_target"] = True
    info = {
        "n_active": n_active,
        "max_feature_nodes": max_feature_nodes,
        "batch_size": batch_size,
        "update_interval": update_interval,
        "dtype": str(rep.weights.dtype).removeprefix("torch."),
        "tokens": list(tokens) if tokens is not None else None,
        "genes": list(genes) if genes is not None else None,
        "targets": [dict(r.target.to_dict(), node_id=r.node.id, value=r.value) for r in resolved],
    }
    return Graph(adjacency, _typed(nodes), weights, [int(i) for i in rep.input_ids], rep.n_layers, info)


def _node_table(rep, selected, features, logit_targets, tokens, genes) -> pd.DataFrame:
    f_layer, f_pos, f_feat, f_act = features
    ids = [int(i) for i in rep.input_ids]
    token_of = list(tokens) if tokens is not None else [str(i) for i in ids]
    gene_of = list(genes) if genes is not None else [None] * len(ids)
    records = []

    def add(node: Node, activation: float | None) -> None:
        records.append({
            "node_id": node.id, "kind": node.kind, "layer": node.layer, "position": node.position,
            "feature": node.index if node.kind == "feature" else None,
            "logit_token": node.index if node.kind == "logit" else None,
            "token_id": ids[node.position], "token": token_of[node.position], "gene": gene_of[node.position],
            "activation": activation, "value": None, "constant": None, "dropped": None, "is_target": False,
            "computed": False,
        })

    for i in selected.tolist():
        add(Node.feature(f_layer[i], f_pos[i], f_feat[i]), float(f_act[i]))
    for layer in range(rep.n_layers):
        for position in range(rep.n_pos):
            add(Node.error(layer, position), None)
    for position in range(rep.n_pos):
        add(Node.embedding(position), None)
    for target in logit_targets:
        add(target.node, target.value)
    return pd.DataFrame.from_records(records, columns=list(NODE_COLUMNS))


def greedy_paths(
    graph: Graph,
    *,
    target: Node | None = None,
    k: int = 10,
    depth: int = 3,
    threshold: float = 0.0,
    kinds: Sequence[str] = ("feature", "error", "embedding"),
) -> Graph:
    """The paper's greedy path search (:mod:`c2srepro.attribution.circuit`) read off the graph's rows.

    Returns the subgraph of the kept paths' nodes and edges (every target kept), with the search in
    ``info["search"]``: its sizes, its target and each path head's summed path weight
    (``influence``, what :meth:`Graph.to_networkx` puts on the nodes). A feature whose row the cap
    left uncomputed is a leaf. target: one of the graph's targets
    (default: the only one).
    """
    if target is None:
        if len(graph.targets) != 1:
            raise ValueError(f"the graph has {len(graph.targets)} targets; say which one with target=")
        target = graph.node(graph.targets[0])
    target_index = graph.index_of(target)
    if not graph.nodes["is_target"].iloc[target_index]:
        raise ValueError(f"{target.id} is not a target of this graph; its targets: "
                         f"{[graph.node(i).id for i in graph.targets]}")
    check_search(k, depth, threshold)
    allowed = {"feature", "error", "embedding"}
    if not kinds or set(kinds) - allowed:
        raise ValueError(f"kinds must be a non-empty subset of {sorted(allowed)} (biases are not graph nodes), "
                         f"got {list(kinds)}")
    kind_ok = torch.as_tensor(graph.nodes["kind"].isin(list(kinds)).to_numpy())
    computed = graph.nodes["computed"].to_numpy()
    values = graph.nodes["value"].to_numpy()
    target_value = float(values[target_index])

    def top(index: int) -> list[tuple[int, float]]:
        row = graph.adjacency[index] * kind_ok
        magnitudes, order = row.abs().topk(min(k, row.numel()))
        return [(int(i), float(row[i])) for m, i in zip(magnitudes, order) if m > 0]

    kept = beam_search(target_index, target_value, k=k, depth=depth, threshold=threshold,
                       expandable=lambda index: bool(computed[index]), sources=top, value=lambda index: values[index])

    keep = torch.as_tensor(graph.nodes["is_target"].to_numpy()).clone()
    edges = torch.zeros(graph.n_nodes, graph.n_nodes, dtype=torch.bool)
    ids = graph.nodes["node_id"].to_numpy()
    influence = {ids[target_index]: target_value}
    for path, w in kept:
        keep[list(path)] = True
        influence[ids[path[0]]] = influence.get(ids[path[0]], 0.0) + w
        for source, sink in zip(path[:-1], path[1:]):
            edges[sink, source] = True
    circuit = graph.subgraph(keep, edges)
    circuit.info["search"] = {"k": k, "depth": depth, "threshold": threshold, "kinds": list(kinds),
                              "target": ids[target_index], "influence": influence}
    return circuit


@dataclass(frozen=True)
class GeneGraph:
    """A gene-level view: each gene's token nodes merged into one ``gene`` node (edges summed)."""

    adjacency: Float[Tensor, "node node"]
    nodes: pd.DataFrame  # the graph's node table with gene nodes in place of their tokens, plus ``influence``
    genes: pd.DataFrame  # one row per gene, ranked by influence: gene, influence, sentence_rank, ...


def gene_view(graph: Graph, *, genes: Sequence[str | None] | None = None) -> GeneGraph:
    """Merge the sub-word token nodes of each gene (genes: per prompt token, None for template text).

    1. Each gene's token (``embedding``) nodes become one node ``gene:<symbol>``; template tokens,
       features, errors and targets stay as they are. With M the 0/1 merge matrix (old -> new
       node), the gene-level adjacency is M^T A M: edges into and out of a gene are summed.
    2. A node's influence I is computed on the token-level graph and summed over what was merged
       (I M), so the total influence is conserved. (Recomputing it on the merged signed edges would
       not be: |a + b| < |a| + |b| when tokens of one gene push in opposite directions.)
    3. The gene table ranks genes by influence on the targets, with each gene's rank in the cell
       sentence (order of first appearance, 1 = most expressed) and its token positions beside it.
    """
    genes = list(genes) if genes is not None else graph.info.get("genes")
    if genes is None:
        raise ValueError("the graph was built without genes; pass genes= (one gene symbol or None per prompt token)")
    if len(genes) != graph.n_pos:
        raise ValueError(f"genes must have one entry per prompt token ({graph.n_pos}), got {len(genes)}")
    order = list(dict.fromkeys(g for g in genes if g is not None))
    sentence_rank = {gene: rank for rank, gene in enumerate(order, start=1)}

    nodes = graph.nodes
    kinds, node_positions = nodes["kind"].to_numpy(), nodes["position"].to_numpy()
    keys = [("gene", genes[p]) if k == "embedding" and genes[p] is not None else ("node", i)
            for i, (k, p) in enumerate(zip(kinds, node_positions))]
    members: dict[tuple, list[int]] = {}  # new nodes in order of their first member
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    new_index = {key: i for i, key in enumerate(members)}
    new_of_old = torch.tensor([new_index[key] for key in keys])
    table = nodes.iloc[[group[0] for group in members.values()]].reset_index(drop=True)
    gene_row = {key[1]: new_index[key] for key in members if key[0] == "gene"}
    tokens = nodes["token"].to_numpy()
    for gene, row in gene_row.items():
        table.loc[row, ["node_id", "kind", "gene"]] = [f"gene:{gene}", "gene", gene]
        table.loc[row, "token"] = "|".join(tokens[members[("gene", gene)]])  # sub-words shown as V|WF
    n_new = len(new_index)
    # M^T A M as two index_adds (sum the columns, then the rows, of each merged group).
    columns_merged = graph.adjacency.new_zeros(graph.n_nodes, n_new).index_add_(1, new_of_old, graph.adjacency)
    adjacency = graph.adjacency.new_zeros(n_new, n_new).index_add_(0, new_of_old, columns_merged)
    influence = graph.node_influence()
    influence = influence.new_zeros(n_new).index_add_(0, new_of_old, influence)
    table["influence"] = influence.to(torch.float64).numpy()

    positions: dict[str, list[int]] = {gene: [] for gene in order}
    for position, gene in enumerate(genes):
        if gene is not None:
            positions[gene].append(position)
    gene_table = pd.DataFrame({
        "gene": order,
        "influence": [float(influence[gene_row[g]]) for g in order],
        "sentence_rank": [sentence_rank[g] for g in order],
        "positions": [positions[g] for g in order],
        "tokens": [table["token"].iloc[gene_row[g]] for g in order],
    })
    gene_table = gene_table.sort_values(["influence", "sentence_rank"], ascending=[False, True], kind="stable")
    gene_table.insert(0, "influence_rank", range(1, len(gene_table) + 1))
    return GeneGraph(adjacency=adjacency, nodes=table, genes=gene_table.reset_index(drop=True))
