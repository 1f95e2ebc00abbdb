"""Does the graph tell the truth about genes? Predicted gene effects against in-silico removal, and
the faithfulness benchmark (:mod:`c2srepro.biology.benchmark`) per cell.

For one correctly classified cell:

1. The target (:meth:`~c2srepro.attribution.ReplacementModel.answer_target`), one of :data:`TARGETS`: ``label`` (the predicted label's
   log-probability, :class:`~c2srepro.attribution.LabelTarget` without candidates),
   ``label_vs_candidates`` (its log-probability among the candidate labels, read through their
   prefix tree: which type, not which first token), ``first_token`` (the demeaned logit of the
   answer's first token at the last prompt position, a ``LogitTarget``) or ``feature`` (the
   paper's target: the most active last-layer transcoder feature on the final prompt token).
2. The graph of that target, ``ReplacementModel.attribute(cell, target, max_feature_nodes=...)``,
   and the predictors of :func:`c2srepro.biology.benchmark.target_predictors` (graph influence,
   the graph's signed removal estimate, gradient x input, DLA, greedy-circuit membership, rank,
   expression, random), positive where the gene supports the target.
3. Observed: every gene removed in turn (the genes below it move up one rank; the prompt keeps
   the cell's gene count), and the real model's :data:`READOUTS` recomputed from one forward pass:
   ``label`` (log p(answer)), ``label_vs_candidates`` (log p(label among candidates)) and
   ``first_token`` (the demeaned first-token logit). ``observed_<readout>`` is unperturbed minus
   perturbed (positive: the gene supported it); ``observed`` is the readout the target's graph
   explains (:data:`TARGET_READOUT`; the feature target has no real-model value without the
   transcoders, so its genes are judged by the label among the candidates, the question it is
   asked to answer in the paper).
4. Per predictor, Spearman rho against ``observed``, signed (``rho_signed_<p>``: does the predictor
   tell support from opposition) and unsigned (``rho_abs_<p>``: |predictor| against |observed|,
   how much a gene matters either way), and the overlap of the ten genes largest in each (ties
   broken by sentence rank).
5. The benchmark of :func:`c2srepro.biology.benchmark.benchmark_cell` on the same readout:
   deletion and insertion curves, NAOPC, precision@k, sign agreement and the rank-shift controls;
   the single removals of step 3 are its first model call, so they are computed once.
6. :func:`target_correlations` builds the graph of other targets on the same cell and correlates their
   predictors with their own readout and with the label among the candidates, so the chapter shows
   the targets side by side (:func:`target_table`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from c2srepro.attribution.contributions import node_reading
from c2srepro.attribution.full_graph import Graph
from c2srepro.attribution.linearised import LinearisedReplacement
from c2srepro.attribution.replacement import TARGET_KINDS, NoFeatureFires, ReplacementModel
from c2srepro.attribution.targets import FeatureTarget, LabelTarget, LogitTarget, Target
from c2srepro.biology.benchmark import (
    CellBenchmark,
    Readout,
    benchmark_cell,
    pooled_scores,
    readout_scores,
    removal_estimate,
    target_predictors,
    total_effects,
)
from c2srepro.biology.cohort import CellInfluence, cell_influence
from c2srepro.data.cells import CellSentence

__all__ = [
    "PREDICTORS", "READOUTS", "SIGNED_PREDICTORS", "TARGETS", "TARGET_READOUT", "CellFaithfulness", "NoFeatureFires",
    "agreement", "cell_expression", "cell_faithfulness", "cohort_faithfulness", "target_correlations",
    "direct_logit_attribution", "faithfulness_cells", "faithfulness_numbers", "faithfulness_table", "graph_target",
    "json_ready", "median_by_type",
    "predictor_summary", "readouts", "removal_estimate", "target_table", "total_effects",
]

TARGETS = TARGET_KINDS
READOUTS = ("label_vs_candidates", "label", "first_token")
TARGET_READOUT = {"label": "label", "label_vs_candidates": "label_vs_candidates", "first_token": "first_token",
                  "feature": "label_vs_candidates"}
PREDICTORS = ("influence", "linear", "gradient_x_input", "dla", "circuit", "rank", "expression", "random")
SIGNED_PREDICTORS = ("linear", "gradient_x_input", "dla")
GRAPH_PREDICTORS = ("influence", "linear")
COMPARED_PREDICTORS = ("influence", "linear", "gradient_x_input", "dla")  # those every target has (step 6)
TOP_N = 10


def _check_target(name: str) -> None:
    if name not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {name!r}")


def graph_target(name: str, replacement: ReplacementModel, cell: CellSentence, label: str,
                 candidates: Sequence[str]) -> Target:
    """The target object of ``name`` for ``cell`` whose answer is ``label`` (module docstring, step 1)."""
    _check_target(name)
    if label not in candidates:
        raise ValueError(f"predicted_label {label!r} is not among the candidates {list(candidates)}")
    return replacement.answer_target(name, cell, label, candidates=candidates)


def readouts(replacement: ReplacementModel, label: str, candidates: Sequence[str]) -> dict[str, Readout]:
    """The real model's :data:`READOUTS` of ``label``'s answer (module docstring, step 3)."""
    answers = {c: replacement.answer_ids(c) for c in candidates}
    answer = tuple(answers[label])
    tree = LabelTarget(label, candidates=tuple(candidates)).competitors(answers)
    return {
        "label_vs_candidates": Readout(answer, tuple(tuple(t) for t in tree)),
        "label": Readout(answer),
        "first_token": Readout(answer, kind="first_logit"),
    }


def direct_logit_attribution(rep: LinearisedReplacement, target, genes: Sequence[str | None]) -> pd.Series:
    """Attention-free direct logit attribution of a logit node: its reading vector applied to each
    gene's token embeddings as if they sat at the final position, summed over the gene's tokens."""
    if target.kind != "logit":
        raise ValueError(f"direct logit attribution needs a logit target, got {target.id}")
    reading = node_reading(rep, target).vectors[0]
    values = (rep.weights.embed[rep.input_ids] @ reading).to(torch.float64).cpu().numpy()  # the result, on the host
    frame = pd.DataFrame({"gene": list(genes), "value": values}).dropna(subset=["gene"])
    order = list(dict.fromkeys(g for g in genes if g is not None))
    return frame.groupby("gene")["value"].sum().reindex(order)


def _top(values: np.ndarray, n: int) -> set[int]:
    # np.argsort is stable: equal values keep sentence order, so ties go to the higher-ranked gene.
    return set(np.argsort(-values, kind="stable")[:n].tolist())


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    # a constant predictor (a greedy circuit holding no gene, say) ranks nothing: no rho
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def agreement(predicted: Sequence[float], observed: Sequence[float], *, top_n: int = TOP_N) -> tuple[float, float]:
    """Spearman rho of |predicted| against |observed|, and the share of the ``top_n`` genes both put first."""
    predicted, observed = np.abs(np.asarray(predicted, float)), np.abs(np.asarray(observed, float))
    if predicted.shape != observed.shape or predicted.ndim != 1:
        raise ValueError(f"predicted and observed must be two 1-d arrays of one length, got {predicted.shape}, {observed.shape}")
    if len(predicted) < 3:
        raise ValueError(f"need at least 3 genes to correlate, got {len(predicted)}")
    n = min(top_n, len(predicted))
    return _spearman(predicted, observed), len(_top(predicted, n) & _top(observed, n)) / n


def _correlations(genes: pd.DataFrame, predictors: Sequence[str], observed: str, *, top_n: int) -> dict:
    row = {}
    values = genes[observed].to_numpy(dtype=float)
    for name in predictors:
        predicted = genes[name].to_numpy(dtype=float)
        row[f"rho_abs_{name}"], row[f"top{top_n}_{name}"] = agreement(predicted, values, top_n=top_n)
        row[f"rho_signed_{name}"] = _spearman(predicted, values)
    return row


@dataclass
class CellFaithfulness:
    """One cell's predictors, observed removal effects, benchmark and graph (module docstring)."""

    cell: CellSentence
    predicted_label: str
    target: str
    genes: pd.DataFrame  # one row per removed gene: gene, sentence_rank, every predictor, observed, observed_<readout>
    benchmark: CellBenchmark
    graph: Graph
    influence: CellInfluence  # gene and feature influence, for the cohort

    @property
    def predictors(self) -> list[str]:
        return [p for p in PREDICTORS if p in self.genes.columns]

    def summary(self, *, top_n: int = TOP_N) -> dict:
        """rho_signed_<p>, rho_abs_<p> and top<n>_<p> for every predictor, against ``observed`` (step 4)."""
        row = {"cell": self.cell.cell_id, "type": self.cell.label, "predicted": self.predicted_label,
               "target": self.target, "n_genes": len(self.genes)}
        return row | _correlations(self.genes, self.predictors, "observed", top_n=top_n)


def cell_faithfulness(
    replacement: ReplacementModel,
    cell: CellSentence,
    predicted_label: str,
    candidates: Sequence[str],
    *,
    target: str = "label_vs_candidates",
    expression: Mapping[str, float] | None = None,
    absent: Sequence[str] = (),
    max_genes: int | None = None,
    max_feature_nodes: int | None = 200,
    k_max: int = 10,
    precision_k: int = 10,
    k: int = 60,
    depth: int = 3,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    batch_size: int = 64,
    seed: int = 0,
) -> CellFaithfulness:
    """Predictors, observed removal effects and the benchmark of one cell's genes (module docstring, steps 1-5).

    target: one of :data:`TARGETS`; expression: the cell's expression per gene (default: no
    ``expression`` predictor); absent: genes to draw the replacement control from (none: skipped);
    max_genes: remove only the sentence's first ``max_genes`` genes (default: all);
    max_feature_nodes: the graph's feature cap; k_max: the curves' largest k; precision_k: the k of
    precision@k; k, depth: the greedy path search of the ``circuit`` predictor; node_threshold,
    edge_threshold: the pruning behind the cohort's "in pruned graph"."""
    _check_target(target)
    if predicted_label not in candidates:
        raise ValueError(f"predicted_label {predicted_label!r} is not among the candidates {list(candidates)}")
    if max_genes is not None and max_genes < 3:
        raise ValueError(f"max_genes must be >= 3 (a rank correlation needs 3 genes) or None, got {max_genes}")
    reads = readouts(replacement, predicted_label, candidates)
    explained = TARGET_READOUT[target]
    graph_of = graph_target(target, replacement, cell, predicted_label, candidates)
    predictors, graph = target_predictors(replacement, cell, graph_of, reads[explained], expression=expression,
                                          max_feature_nodes=max_feature_nodes, circuit=(k, depth), seed=seed)
    genes = list(cell.genes if max_genes is None else cell.genes[:max_genes])

    calls: list[pd.DataFrame] = []

    def measure(sentences: Sequence[CellSentence]) -> np.ndarray:
        # one forward pass reads every readout; the benchmark gets the target's, the rest is kept
        frame = readout_scores(replacement.model, replacement.tokenizer, sentences, reads, num_genes=len(cell.genes),
                               batch_size=batch_size)
        calls.append(frame)
        return frame[explained].to_numpy()

    result = benchmark_cell(cell, predictors.loc[genes], measure, k_max=k_max, precision_k=precision_k,
                            signed=[p for p in SIGNED_PREDICTORS if p in predictors.columns], absent=absent,
                            removable=None if max_genes is None else genes, seed=seed)
    singles = calls[0]  # benchmark_cell's first call: the cell, then each gene removed in its order
    table = predictors.loc[genes].reset_index()
    table.insert(1, "sentence_rank", [cell.genes.index(g) + 1 for g in genes])
    for name in READOUTS:
        table[f"observed_{name}"] = singles[name].iloc[0] - singles[name].iloc[1:].to_numpy()
    table["observed"] = table[f"observed_{explained}"]
    return CellFaithfulness(
        cell, predicted_label, target, table, result, graph,
        cell_influence(graph, cell_id=cell.cell_id, label=cell.label,
                       node_threshold=node_threshold, edge_threshold=edge_threshold),
    )


def target_correlations(
    replacement: ReplacementModel,
    result: CellFaithfulness,
    candidates: Sequence[str],
    targets: Sequence[str],
    *,
    max_feature_nodes: int | None = 200,
    top_n: int = TOP_N,
    seed: int = 0,
) -> pd.DataFrame:
    """Rank correlations of each target's graph predictors on ``result``'s cell (module docstring, step 6).

    One row per (target, predictor, observed) with ``observed`` the target's own readout (``own``)
    or the label among the candidates; ``result``'s own target is read from ``result``. Rows of a
    feature target on a cell where no last-layer feature fires hold NaN (``skipped`` True)."""
    cell, label = result.cell, result.predicted_label
    reads = readouts(replacement, label, candidates)
    rows = []
    for name in dict.fromkeys([result.target, *targets]):
        _check_target(name)
        genes, skipped = result.genes, False
        if name != result.target:
            try:
                graph_of = graph_target(name, replacement, cell, label, candidates)
            except NoFeatureFires:
                skipped = True
            else:
                predictors, _ = target_predictors(replacement, cell, graph_of, reads[TARGET_READOUT[name]],
                                                  max_feature_nodes=max_feature_nodes, seed=seed)
                genes = predictors[list(COMPARED_PREDICTORS)].join(
                    result.genes.set_index("gene")[[f"observed_{r}" for r in READOUTS]], how="inner")
        for observed in dict.fromkeys([TARGET_READOUT[name], "label_vs_candidates"]):
            for predictor in COMPARED_PREDICTORS:
                row = {"cell": cell.cell_id, "type": cell.label, "target": name, "predictor": predictor,
                       "observed": observed, "skipped": skipped}
                if skipped:
                    row |= {"rho_signed": np.nan, "rho_abs": np.nan}
                else:
                    found = _correlations(genes, [predictor], f"observed_{observed}", top_n=top_n)
                    row |= {"rho_signed": found[f"rho_signed_{predictor}"], "rho_abs": found[f"rho_abs_{predictor}"]}
                rows.append(row)
    return pd.DataFrame(rows)


def target_table(comparison: pd.DataFrame) -> pd.DataFrame:
    """Median signed and unsigned rho per (target, observed readout, predictor), with the cells counted
    (``target_correlations``' rows of every cell, concatenated)."""
    missing = {"target", "observed", "predictor", "rho_signed", "rho_abs", "cell"} - set(comparison.columns)
    if missing:
        raise ValueError(f"the comparison lacks columns {sorted(missing)}: pass target_correlations(...)'s rows")
    grouped = comparison.groupby(["target", "observed", "predictor"], sort=False)
    table = grouped[["rho_signed", "rho_abs"]].median()
    table.insert(0, "cells", grouped["rho_abs"].count())
    table = table.rename(columns={"rho_signed": "median_rho_signed", "rho_abs": "median_rho_abs"})
    return table.reset_index()


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
    replacement: ReplacementModel,
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
        cell_faithfulness(replacement, cell, label, candidates,
                          expression=None if expression is None else expression[i], **options)
        for i, (cell, label) in enumerate(tqdm(list(zip(cells, predicted)), desc="faithfulness", disable=not progress))
    ]


def faithfulness_table(results: Sequence[CellFaithfulness], *, top_n: int = TOP_N) -> pd.DataFrame:
    """One row per cell: cell, type, target, and signed and unsigned rho and top-n overlap per predictor."""
    if not results:
        raise ValueError("no cells: run cell_faithfulness on at least one cell")
    return pd.DataFrame([r.summary(top_n=top_n) for r in results])


def median_by_type(table: pd.DataFrame, *, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Median of each rho column (default: every ``rho_*`` column) per cell type, with the cell count and an ``all`` row."""
    columns = [c for c in table.columns if c.startswith("rho_")] if columns is None else list(columns)
    missing = sorted(set(columns) - set(table.columns))
    if missing:
        raise ValueError(f"columns {missing} are not in the faithfulness table; it has {list(table.columns)}")
    grouped = table.groupby("type")[columns].median()
    grouped.insert(0, "cells", table.groupby("type").size())
    overall = table[columns].median().to_frame("all").T
    overall.insert(0, "cells", len(table))
    return pd.concat([grouped, overall]).rename_axis("type").reset_index()


def predictor_summary(results: Sequence[CellFaithfulness], *, top_n: int = TOP_N, n_boot: int = 2000,
                      seed: int = 0) -> pd.DataFrame:
    """Per ordering (every predictor, the oracle, the anti-oracle): median signed and unsigned rho over
    cells, and the mean with its 95% bootstrap interval over cells of deletion and insertion NAOPC,
    precision@k and sign agreement (``<score>``, ``<score>_low``, ``<score>_high``)."""
    if not results:
        raise ValueError("no cells: run cell_faithfulness on at least one cell")
    pooled = pooled_scores([r.benchmark for r in results], n_boot=n_boot, seed=seed)
    out = pd.DataFrame(index=pooled.index)
    table = faithfulness_table(results, top_n=top_n)
    for kind in ("signed", "abs"):
        out[f"median_rho_{kind}"] = [table[f"rho_{kind}_{n}"].median() if f"rho_{kind}_{n}" in table else np.nan
                                     for n in out.index]
    for score in ("naopc_deletion", "naopc_insertion", "precision_at_k", "sign_agreement"):
        for statistic, suffix in (("mean", ""), ("low", "_low"), ("high", "_high")):
            out[f"{score}{suffix}"] = pooled[(score, statistic)]
    return out


def json_ready(value):
    """``value`` with NaN and infinite floats as None and numpy scalars as Python ones, for strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def faithfulness_numbers(results: Sequence[CellFaithfulness], comparison: pd.DataFrame | None = None, *,
                         precision_k: int = 10, top_n: int = TOP_N, n_boot: int = 2000, seed: int = 0) -> dict:
    """The chapter's numbers for ``faithfulness.json`` (NaN written as None): the target and its readout,
    median rho (``median_rho``: unsigned, ``median_rho_signed``) per predictor and per type, the share
    of cells where the graph's rho beats the rank's, and per ordering its rho, NAOPC (deletion and
    insertion), precision@k and sign agreement as ``{mean, low, high}`` over cells; ``targets``: the
    per-target table of ``comparison`` (:func:`target_table`)."""
    table = faithfulness_table(results, top_n=top_n)
    summary = predictor_summary(results, top_n=top_n, n_boot=n_boot, seed=seed)
    predictors = results[0].predictors
    by_type = median_by_type(table, columns=[f"rho_abs_{p}" for p in predictors])

    def interval(name: str, score: str) -> dict:
        return {"mean": summary.loc[name, score], "low": summary.loc[name, f"{score}_low"],
                "high": summary.loc[name, f"{score}_high"]}

    numbers = {
        "target": results[0].target,
        "observed": TARGET_READOUT[results[0].target],
        "n_cells": len(results),
        "n_removals": int(table["n_genes"].sum()),
        "precision_k": precision_k,
        "median_rho": {p: table[f"rho_abs_{p}"].median() for p in predictors},
        "median_rho_signed": {p: table[f"rho_signed_{p}"].median() for p in predictors},
        "median_rho_by_type": {row["type"]: {p: row[f"rho_abs_{p}"] for p in predictors}
                               for _, row in by_type.iterrows()},
        "graph_beats_rank": {p: float((table[f"rho_abs_{p}"] > table["rho_abs_rank"]).mean()) for p in GRAPH_PREDICTORS},
        "graph_beats_rank_signed": {p: float((table[f"rho_signed_{p}"] > table["rho_signed_rank"]).mean())
                                    for p in GRAPH_PREDICTORS},
        "predictors": {
            name: {"median_rho_signed": summary.loc[name, "median_rho_signed"],
                   "median_rho_abs": summary.loc[name, "median_rho_abs"],
                   "naopc": interval(name, "naopc_deletion"),
                   "naopc_insertion": interval(name, "naopc_insertion"),
                   f"precision_at_{precision_k}": interval(name, "precision_at_k"),
                   "sign_agreement": interval(name, "sign_agreement")}
            for name in summary.index},
        "targets": [] if comparison is None else target_table(comparison).to_dict("records"),
    }
    return json_ready(numbers)


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
