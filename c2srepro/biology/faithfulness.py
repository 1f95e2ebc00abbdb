"""Does the graph tell the truth about genes? Predicted gene effects against in-silico removal.

For one correctly classified cell:

1. The prompt's linearised replacement and its attribution graph
   (:func:`c2srepro.attribution.build_graph`) for the logit of the predicted answer's first token
   at the final prompt position, with a cap on feature nodes.
2. Predictors, one score per gene of the sentence:
   - ``influence``: the gene's node influence in the graph (its token nodes merged,
     :func:`c2srepro.attribution.gene_view`), unsigned;
   - ``linear``: the first-order estimate of removing the gene, -sum over its tokens of the
     total effect of the token's embedding on the target in the linear model (attention, layer
     norms and errors frozen, each active feature's activation moving with its pre-activation):
     with M[t, s] = A[t, s] / a_s for a feature source s of activation a_s and M[t, s] = A[t, s]
     for a token source, the total effect is w (M + M^2 + ...) (paths through uncomputed feature
     rows are cut). Exact to first order when the gene's embeddings are scaled towards zero; the
     shift of the genes below it in a real removal is outside the estimate;
   - ``rank``: 1 / the gene's rank in the sentence (top genes matter more);
   - ``expression``: the gene's expression in the cell (given by the caller);
   - ``random``: uniform noise, seeded by (seed, cell index);
   - ``circuit``: 1 if the paper's greedy path search (:func:`c2srepro.attribution.greedy_paths`)
     touches the gene, else 0;
   - ``dla``: attention-free direct logit attribution, the target's reading vector (final
     layer-norm scale at the final position, centred unembedding of the answer token) applied to
     the gene's token embeddings as if they sat at the final position, summed over its tokens.
3. Observed: the real model's change in the predicted label's log-probability when the gene is
   removed from the sentence (:func:`c2srepro.biology.perturb.removal_effects`), ``observed`` =
   unperturbed minus perturbed (positive: the gene supported the answer).
4. Per predictor: Spearman rho between |predictor| and |observed| (how much a gene matters, either
   way), and the overlap of the ten genes largest in each (ties broken by sentence rank); for the
   signed predictors (``linear``, ``dla``) also rho against the signed ``observed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import spearmanr
from torch import Tensor
from tqdm import tqdm

from c2srepro.attribution.circuit import circuit_genes
from c2srepro.attribution.contributions import node_reading
from c2srepro.attribution.full_graph import AttributionGraph, gene_view, greedy_paths
from c2srepro.attribution.linearised import LinearisedReplacement
from c2srepro.attribution.trace import graph_cell
from c2srepro.biology.cohort import CellInfluence, cell_influence
from c2srepro.biology.perturb import PerturbationEffects, removal_effects
from c2srepro.data.cells import CellSentence

PREDICTORS = ("influence", "linear", "rank", "expression", "random", "circuit", "dla")
SIGNED_PREDICTORS = ("linear", "dla")
TOP_N = 10


def total_effects(graph: AttributionGraph) -> Float[Tensor, "node"]:
    """Each node's signed total effect on the weighted targets in the linear model (module docstring, step 2)."""
    activation = torch.as_tensor(graph.nodes["activation"].to_numpy(dtype=float), dtype=graph.adjacency.dtype)
    is_feature = torch.as_tensor(graph.nodes["kind"].to_numpy() == "feature")
    per_unit = torch.where(is_feature, activation, torch.ones_like(activation))
    if bool((per_unit[is_feature] == 0).any()):
        raise ValueError("a feature node has activation 0: the graph holds only active features")
    M = graph.adjacency / per_unit[None, :]
    current, total = graph.target_weights.to(M.dtype), torch.zeros(graph.n_nodes, dtype=M.dtype)
    for _ in range(graph.n_nodes + 1):
        current = current @ M
        if not bool(current.any()):
            return total
        total = total + current
    raise RuntimeError("total effects did not converge: the adjacency has a cycle")


def removal_estimate(graph: AttributionGraph, genes: Sequence[str | None] | None = None) -> pd.Series:
    """The first-order change of the target when each gene's token embeddings are removed, per gene."""
    genes = list(genes) if genes is not None else graph.info.get("genes")
    if genes is None or len(genes) != graph.n_pos:
        raise ValueError(f"genes must give one gene symbol or None per prompt token ({graph.n_pos})")
    total = total_effects(graph).numpy()
    nodes = graph.nodes
    tokens = nodes.index[nodes["kind"] == "embedding"]
    by_gene = pd.Series(total[tokens], index=[genes[p] for p in nodes.loc[tokens, "position"]])
    by_gene = by_gene[by_gene.index.notna()]
    order = list(dict.fromkeys(g for g in genes if g is not None))
    return -by_gene.groupby(level=0).sum().reindex(order)


def direct_logit_attribution(rep: LinearisedReplacement, target, genes: Sequence[str | None]) -> pd.Series:
    """Attention-free direct logit attribution of each gene's token embeddings (module docstring, step 2)."""
    if target.kind != "logit":
        raise ValueError(f"direct logit attribution needs a logit target, got {target.id}")
    reading = node_reading(rep, target).vectors[0]
    values = (rep.weights.embed[rep.input_ids] @ reading).to(torch.float64).numpy()
    frame = pd.DataFrame({"gene": list(genes), "value": values}).dropna(subset=["gene"])
    order = list(dict.fromkeys(g for g in genes if g is not None))
    return frame.groupby("gene")["value"].sum().reindex(order)


def _top(values: np.ndarray, n: int) -> set[int]:
    # np.argsort is stable: equal values keep sentence order, so ties go to the higher-ranked gene.
    return set(np.argsort(-values, kind="stable")[:n].tolist())


def agreement(predicted: Sequence[float], observed: Sequence[float], *, top_n: int = TOP_N) -> tuple[float, float]:
    """Spearman rho of |predicted| against |observed|, and the share of the ``top_n`` genes both put first."""
    predicted, observed = np.abs(np.asarray(predicted, float)), np.abs(np.asarray(observed, float))
    if predicted.shape != observed.shape or predicted.ndim != 1:
        raise ValueError(f"predicted and observed must be two 1-d arrays of one length, got {predicted.shape}, {observed.shape}")
    if len(predicted) < 3:
        raise ValueError(f"need at least 3 genes to correlate, got {len(predicted)}")
    constant = np.ptp(predicted) == 0 or np.ptp(observed) == 0
    rho = float("nan") if constant else float(spearmanr(predicted, observed).statistic)
    n = min(top_n, len(predicted))
    return rho, len(_top(predicted, n) & _top(observed, n)) / n


@dataclass
class CellFaithfulness:
    """One cell's predictors, observed removal effects and graph (module docstring)."""

    cell: CellSentence
    predicted_label: str
    genes: pd.DataFrame  # one row per removed gene: sentence_rank, every predictor, observed
    effects: PerturbationEffects
    graph: AttributionGraph
    influence: CellInfluence  # gene and feature influence, for the cohort

    def summary(self, *, top_n: int = TOP_N) -> dict:
        """rho_<predictor> and top<n>_<predictor> for every predictor, rho_signed_<p> for the signed ones."""
        row = {"cell": self.cell.cell_id, "type": self.cell.label, "predicted": self.predicted_label,
               "n_genes": len(self.genes)}
        observed = self.genes["observed"].to_numpy()
        for name in PREDICTORS:
            rho, overlap = agreement(self.genes[name].to_numpy(), observed, top_n=top_n)
            row[f"rho_{name}"], row[f"top{top_n}_{name}"] = rho, overlap
        for name in SIGNED_PREDICTORS:
            values = self.genes[name].to_numpy()
            signed = np.ptp(values) == 0 or np.ptp(observed) == 0
            row[f"rho_signed_{name}"] = float("nan") if signed else float(spearmanr(values, observed).statistic)
        return row


def cell_faithfulness(
    model,
    transcoders,
    tokenizer,
    cell: CellSentence,
    predicted_label: str,
    candidates: Sequence[str],
    *,
    expression: Mapping[str, float] | None = None,
    max_genes: int | None = None,
    max_feature_nodes: int | None = 300,
    k: int = 60,
    depth: int = 3,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 64,
    seed: int = 0,
) -> CellFaithfulness:
    """Predictors and observed removal effects of one cell's genes (module docstring, steps 1-3).

    expression: the cell's expression per gene (default: none, the ``expression`` column is NaN);
    max_genes: remove only the sentence's first ``max_genes`` genes (default: all);
    max_feature_nodes: the graph's feature cap; k, depth: the greedy path search;
    node_threshold, edge_threshold: the pruning behind the cohort's "in pruned graph".
    """
    if predicted_label not in candidates:
        raise ValueError(f"predicted_label {predicted_label!r} is not among the candidates {list(candidates)}")
    if max_genes is not None and max_genes < 3:
        raise ValueError(f"max_genes must be >= 3 (a rank correlation needs 3 genes) or None, got {max_genes}")
    traced = graph_cell(model, transcoders, tokenizer, cell, predicted_label, target="logit",
                        max_feature_nodes=max_feature_nodes)
    rep, target, graph = traced.replacement, traced.target, traced.graph
    token_genes = traced.prompt.gene_of_token[0]

    genes = list(cell.genes if max_genes is None else cell.genes[:max_genes])
    table = pd.DataFrame({"gene": genes, "sentence_rank": [cell.genes.index(g) + 1 for g in genes]})
    influence = gene_view(graph).genes.set_index("gene")["influence"]
    table["influence"] = influence.reindex(genes).to_numpy()
    table["linear"] = removal_estimate(graph).reindex(genes).to_numpy()
    table["rank"] = 1.0 / table["sentence_rank"]
    table["expression"] = [np.nan if expression is None else float(expression[g]) for g in genes]
    table["random"] = np.random.default_rng([seed, cell.cell_index]).random(len(genes))
    in_circuit = set(circuit_genes(greedy_paths(graph, k=k, depth=depth)))
    table["circuit"] = [float(g in in_circuit) for g in genes]
    table["dla"] = direct_logit_attribution(rep, target, token_genes).reindex(genes).to_numpy()
    effects = removal_effects(model, tokenizer, cell, candidates, genes=genes, label=predicted_label,
                              batch_size=batch_size)
    table["observed"] = -effects.delta
    table["total_variation"] = effects.total_variation
    table["flips"] = [p != predicted_label for p in effects.predicted]
    return CellFaithfulness(
        cell, predicted_label, table, effects, graph,
        cell_influence(graph, cell_id=cell.cell_id, label=cell.label,
                       node_threshold=node_threshold, edge_threshold=edge_threshold),
    )


def faithfulness_cells(
    cells: Sequence[CellSentence], predicted: Sequence[str], *, n_cells: int, correct_only: bool = True
) -> list[int]:
    """Indices of up to ``n_cells`` correctly classified cells (any cells with ``correct_only=False``,
    for a model that classifies none, such as an untrained one), drawn round-robin over the cell
    types (in order of appearance within a type), so that every such type is represented."""
    if len(cells) != len(predicted):
        raise ValueError(f"{len(cells)} cells but {len(predicted)} predictions")
    if n_cells < 1:
        raise ValueError(f"n_cells must be >= 1, got {n_cells}")
    by_type: dict[str, list[int]] = {}
    for i, (cell, label) in enumerate(zip(cells, predicted)):
        if cell.label == label or not correct_only:
            by_type.setdefault(cell.label, []).append(i)
    if not by_type:
        raise ValueError("the model classifies none of the cells correctly: no cell to test "
                         "(correct_only=False takes cells whatever their prediction)")
    chosen: list[int] = []
    queues = [list(v) for _, v in sorted(by_type.items())]
    while len(chosen) < n_cells and any(queues):
        for queue in queues:
            if queue and len(chosen) < n_cells:
                chosen.append(queue.pop(0))
    return sorted(chosen)


def cohort_faithfulness(
    model,
    transcoders,
    tokenizer,
    cells: Sequence[CellSentence],
    predicted: Sequence[str],
    candidates: Sequence[str],
    *,
    expression: Sequence[Mapping[str, float]] | None = None,
    progress: bool = True,
    **options,
) -> list[CellFaithfulness]:
    """:func:`cell_faithfulness` for each cell (``options`` as there), with a progress bar."""
    if len(cells) != len(predicted):
        raise ValueError(f"{len(cells)} cells but {len(predicted)} predictions")
    if expression is not None and len(expression) != len(cells):
        raise ValueError(f"{len(cells)} cells but {len(expression)} expression maps")
    return [
        cell_faithfulness(model, transcoders, tokenizer, cell, label, candidates,
                          expression=None if expression is None else expression[i], **options)
        for i, (cell, label) in enumerate(tqdm(list(zip(cells, predicted)), desc="faithfulness", disable=not progress))
    ]


def faithfulness_table(results: Sequence[CellFaithfulness], *, top_n: int = TOP_N) -> pd.DataFrame:
    """One row per cell: cell, type, and rho and top-n overlap per predictor."""
    if not results:
        raise ValueError("no cells: run cell_faithfulness on at least one cell")
    return pd.DataFrame([r.summary(top_n=top_n) for r in results])


def median_by_type(table: pd.DataFrame, *, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Median of each rho column per cell type, with the cell count and an ``all`` row."""
    columns = [f"rho_{p}" for p in PREDICTORS] if columns is None else list(columns)
    missing = sorted(set(columns) - set(table.columns))
    if missing:
        raise ValueError(f"columns {missing} are not in the faithfulness table; it has {list(table.columns)}")
    grouped = table.groupby("type")[columns].median()
    grouped.insert(0, "cells", table.groupby("type").size())
    overall = table[columns].median().to_frame("all").T
    overall.insert(0, "cells", len(table))
    return pd.concat([grouped, overall]).rename_axis("type").reset_index()


def cell_expression(adata, cells: Sequence[CellSentence], *, use_raw: bool = False, layer: str | None = None,
                    symbol_column: str | None = None) -> list[dict[str, float]]:
    """Per cell, the expression of each of its sentence's genes (symbols as cell sentences make them,
    duplicates summed), read from the AnnData the sentences were made from."""
    import scipy.sparse as sp

    from c2srepro.data.cells import expression_source, gene_symbols

    source = expression_source(adata, use_raw=use_raw, layer=layer)
    symbols = np.asarray(gene_symbols(adata, symbol_column=symbol_column, use_raw=use_raw, layer=layer))
    rows = sorted({c.cell_index for c in cells})
    block = sp.csr_matrix(source.matrix[rows])
    values = {}
    for row, index in enumerate(rows):
        dense = np.asarray(block[row].todense()).ravel()
        values[index] = pd.Series(dense).groupby(symbols).sum()
    out = []
    for cell in cells:
        series = values[cell.cell_index]
        missing = [g for g in cell.genes if g not in series.index]
        if missing:
            raise ValueError(f"genes {missing[:5]} of cell {cell.cell_id!r} are not in the AnnData's symbols: "
                             "pass the use_raw/layer/symbol_column the sentences were made with")
        out.append({g: float(series[g]) for g in cell.genes})
    return out
