"""A faithfulness benchmark for gene attributions: deletion and insertion curves, NAOPC, precision@k,
sign agreement, intervals over cells, and a control for the rank shift a removal causes.

For one cell, a *target* is a number the real model computes from the cell's sentence (for example
the log-probability of the predicted label among the candidates), ``measure`` returns it for a
batch of sentences, and each *predictor* gives every gene of the sentence a score (larger: the gene
matters more; for a signed predictor, positive: the gene supports the target).

1. Orderings. A predictor orders the genes by score, descending; equal scores keep sentence order
   (the more expressed gene first), so an ordering never depends on a sort's tie rule. The
   *oracle* orders them by their observed single-gene removal effects f(x) - f(x without g), and
   the *anti-oracle* by the same effects ascending.
2. Deletion curve (Edin et al. 2024, "Normalized AOPC"): for k = 1..K the sentence without the
   ordering's first k genes, all removed at once; the curve is the drop f(x) - f(x without top-k).
   AOPC is the curve's mean over k. A faithful ordering removes what the target rests on first.
3. Insertion curve: for k = 1..K the sentence made of the ordering's first k genes alone, in their
   sentence order; the curve is f(top-k). AOPC is its mean over k (f of an empty sentence would
   shift every ordering alike, and NAOPC does not see a common shift).
4. NAOPC = (AOPC - lower) / (upper - lower), with lower and upper the smallest and largest AOPC of
   any ordering evaluated on that cell: every predictor's, the oracle's and the anti-oracle's.
   Edin et al. search for the bounds (beam search); here they are the bounds among the orderings
   found, so NAOPC is in [0, 1] by construction and 1 means "the best ordering we know of". A cell
   where every ordering gives the same AOPC has no NAOPC (NaN).
5. precision@k: the share of a predictor's top k genes that are among the k genes whose removal
   lowers the target most (signed predictors), or changes it most either way (unsigned ones).
   Sign agreement (signed predictors): the share of genes with a nonzero observed effect whose
   predicted score has the same sign.
6. Pooling: per predictor, the mean over cells and a 95% percentile bootstrap interval over cells
   (seeded, cells resampled with replacement).
7. Rank-shift control. Removing a gene also moves every gene below it up one rank. For the
   oracle's first k genes, two more sentences tell identity from shift: the genes moved to the end
   of the sentence (the others shift as in a removal, the genes stay), and each gene replaced by a
   gene absent from the cell at the same rank (no one shifts, the identity goes). If the drop of a
   removal is mostly the shift's, the shift sentence loses as much as the removal.
8. The real model's target (:class:`Readout`, :func:`readout_scores`): teacher-forced on prompt +
   answer, either the sum over answer positions j of log q_j(y_j), q_j the softmax of the logits at
   j over the tokens the answer's token competes with there (the candidates' prefix tree,
   :meth:`c2srepro.attribution.targets.LabelTarget.competitors`; all of the vocabulary for the
   answer's plain log-probability; a position where the token has no competitor adds nothing), or
   the demeaned logit of the answer's first token at the last prompt position (what a
   ``LogitTarget`` of that token explains). Several readouts come from one forward pass.
   :func:`readout_gradient_x_input` is the baseline predictor of the same scalar: the gradient of
   it with respect to the input embeddings, dotted with them, summed over each gene's tokens.
9. :func:`target_predictors`: one cell's predictors of its genes' support for any target, all
   positive where the gene supports it: ``influence`` (the graph's gene-node influence,
   unsigned), ``linear`` (the graph's signed first-order removal estimate, step 10, negated),
   ``gradient_x_input`` (the real model, of the readout the benchmark measures), ``dla``
   (attention-free: the target's reading vectors applied to the gene's token embeddings as if they
   sat at the reading positions), optionally ``circuit`` (1 if the paper's greedy path search
   reaches the gene), ``rank`` (1 / sentence rank), ``expression`` and ``random``.
   :func:`label_benchmark` runs :func:`benchmark_cell` on a label target's predictors with the real
   model's target of step 8.
10. :func:`removal_estimate`: the graph's first-order estimate of removing a gene, -sum over its
    tokens of the total effect of the token's embedding on the target in the linear model
    (attention, layer norms and errors frozen, each active feature's activation moving with its
    pre-activation): with M[t, s] = A[t, s] / a_s for a feature source s of activation a_s and
    M[t, s] = A[t, s] for a token source, the total effect is w (M + M^2 + ...) (paths through
    uncomputed feature rows are cut). Exact to first order when the gene's embeddings are scaled
    towards zero; the shift of the genes below it in a real removal is outside the estimate.
"""


from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from c2srepro.attribution.full_graph import Graph, gene_view, greedy_paths
from c2srepro.attribution.replacement import ReplacementModel
from c2srepro.attribution.targets import LabelTarget, Target, teacher_forced
from c2srepro.biology.perturb import knock_out
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import C2S_CELL_TYPE_TEMPLATE, encode_prompts
from c2srepro.data.tokenizer import CellTokenizer

ORACLE = "oracle"
ANTI_ORACLE = "anti-oracle"
CONTROLS = ("remove", "shift to end", "replace with absent gene")

# The target's value for each of a batch of sentences, one model call per batch.
Measure = Callable[[Sequence[CellSentence]], Sequence[float]]


def total_effects(graph: Graph) -> Float[Tensor, "node"]:
    """Each node's signed total effect on the weighted targets in the linear model (step 10)."""
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


def removal_estimate(graph: Graph, genes: Sequence[str | None] | None = None) -> pd.Series:
    """The first-order change of the target when each gene's token embeddings are removed, per gene (step 10)."""
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


def ordering(scores: pd.Series, genes: Sequence[str]) -> list[str]:
    """``genes`` by descending score; equal scores keep sentence order (module docstring, step 1)."""
    missing = [g for g in genes if g not in scores.index]
    if missing:
        raise ValueError(f"the scores name no value for {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                         "give a score for every gene of the sentence")
    values = scores.reindex(list(genes)).to_numpy(dtype=float)
    if np.isnan(values).any():
        raise ValueError(f"a score is NaN for {[g for g, v in zip(genes, values) if np.isnan(v)][:5]}: "
                         "score every gene with a number")
    order = np.lexsort((np.arange(len(genes)), -values))  # last key first: score, then sentence place
    return [genes[i] for i in order]


def keep_only(cell: CellSentence, genes: Sequence[str]) -> CellSentence:
    """The sentence of ``genes`` alone, in the cell's sentence order (the insertion step)."""
    wanted = set(genes)
    unknown = wanted - set(cell.genes)
    if unknown:
        raise ValueError(f"{sorted(unknown)[:5]} are not in cell {cell.cell_id!r}'s sentence")
    if not wanted:
        raise ValueError("an insertion sentence needs at least one gene")
    return replace(cell, genes=tuple(g for g in cell.genes if g in wanted))


def shift_to_end(cell: CellSentence, genes: Sequence[str]) -> CellSentence:
    """The sentence with ``genes`` moved, in their order, behind every other gene (step 7)."""
    moved = set(genes)
    unknown = moved - set(cell.genes)
    if unknown:
        raise ValueError(f"{sorted(unknown)[:5]} are not in cell {cell.cell_id!r}'s sentence")
    return replace(cell, genes=tuple(g for g in cell.genes if g not in moved) + tuple(g for g in cell.genes if g in moved))


def replace_with_absent(cell: CellSentence, genes: Sequence[str], absent: Sequence[str], *, seed: int = 0) -> CellSentence:
    """The sentence with each of ``genes`` replaced, at its rank, by a gene of ``absent`` not in the cell (step 7).

    The replacements are drawn without replacement from ``absent`` less the cell's genes, seeded by
    (``seed``, the cell's index), so the same cell gets the same sentence."""
    unknown = set(genes) - set(cell.genes)
    if unknown:
        raise ValueError(f"{sorted(unknown)[:5]} are not in cell {cell.cell_id!r}'s sentence")
    present = set(cell.genes)
    pool = sorted(set(absent) - present)
    if len(pool) < len(genes):
        raise ValueError(f"{len(genes)} replacements needed but only {len(pool)} genes of `absent` are missing from "
                         f"cell {cell.cell_id!r}: pass a larger pool (e.g. every gene of the data set)")
    drawn = np.random.default_rng([seed, cell.cell_index]).choice(len(pool), size=len(genes), replace=False)
    substitute = dict(zip(genes, (pool[i] for i in drawn)))
    return replace(cell, genes=tuple(substitute.get(g, g) for g in cell.genes))


def aopc(curve: Sequence[float]) -> float:
    """The area over the perturbation curve: its mean over k = 1..K (steps 2-3)."""
    curve = np.asarray(curve, dtype=float)
    if curve.size == 0:
        raise ValueError("a curve needs at least one point (K >= 1)")
    return float(curve.mean())


def normalised(aopcs: pd.Series) -> pd.Series:
    """NAOPC of every ordering, between the smallest and largest AOPC among them (step 4)."""
    low, high = float(aopcs.min()), float(aopcs.max())
    if not high > low:
        return pd.Series(np.nan, index=aopcs.index)
    return (aopcs - low) / (high - low)


def precision_at_k(predicted: pd.Series, observed: pd.Series, k: int, *, signed: bool) -> float:
    """Share of the predictor's top ``k`` genes among the ``k`` largest observed effects (step 5)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    genes = list(observed.index)
    k = min(k, len(genes))
    effect = observed if signed else observed.abs()
    top_predicted = set(ordering(predicted, genes)[:k])
    top_observed = set(ordering(effect, genes)[:k])
    return len(top_predicted & top_observed) / k


def sign_agreement(predicted: pd.Series, observed: pd.Series) -> float:
    """Share of genes with a nonzero observed effect whose predicted sign is the same (step 5)."""
    effect = observed.to_numpy(dtype=float)
    guess = predicted.reindex(observed.index).to_numpy(dtype=float)
    moved = effect != 0
    if not moved.any():
        return float("nan")
    return float((np.sign(guess[moved]) == np.sign(effect[moved])).mean())


def bootstrap_interval(values: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over cells and its percentile bootstrap interval (step 6); NaNs are skipped."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"),) * 3
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


@dataclass(frozen=True)
class CellBenchmark:
    """One cell's curves and scores (module docstring, steps 1-5 and 7).

    ``deletion`` and ``insertion``: orderings x k (the drop, and the target with the top k alone);
    ``scores``: per ordering ``aopc_deletion``, ``naopc_deletion``, ``aopc_insertion``,
    ``naopc_insertion``, ``precision_at_k``, ``sign_agreement``; ``controls``: removal, shift to the
    end and replacement by an absent gene of the oracle's top k, as drops, controls x k."""

    cell_id: str
    cell_type: str | None
    value: float
    observed: pd.Series
    deletion: pd.DataFrame
    insertion: pd.DataFrame
    scores: pd.DataFrame
    controls: pd.DataFrame


def benchmark_cell(
    cell: CellSentence,
    predictors: pd.DataFrame,
    measure: Measure,
    *,
    k_max: int = 10,
    precision_k: int = 10,
    signed: Sequence[str] = (),
    absent: Sequence[str] = (),
    removable: Sequence[str] | None = None,
    seed: int = 0,
) -> CellBenchmark:
    """Every curve and score of one cell, from one call of ``measure`` on all its sentences.

    predictors: genes (index, every removable gene) x predictors, larger = matters more;
    signed: the predictors whose sign says "supports (+) or opposes (-) the target"; the oracle
    (observed single-gene removal effects, computed here) is signed; absent: genes to draw the
    replacement control from (none: the control is skipped); removable: the genes that are
    ordered, removed and inserted (default: every gene of the sentence; a subset, such as the
    first genes, keeps the number of model calls down on a large model)."""
    if removable is None:
        genes = list(cell.genes)
    else:
        unknown = sorted(set(removable) - set(cell.genes))
        if unknown:
            raise ValueError(f"removable genes {unknown[:5]} are not in cell {cell.cell_id!r}'s sentence")
        wanted = set(removable)
        genes = [g for g in cell.genes if g in wanted]
    if len(genes) < 2:
        raise ValueError(f"cell {cell.cell_id!r} has {len(genes)} removable gene(s): a deletion curve needs at least 2")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    for name in (ORACLE, ANTI_ORACLE):
        if name in predictors.columns:
            raise ValueError(f"{name!r} is computed here from the observed effects: rename that predictor column")
    unknown = sorted(set(signed) - set(predictors.columns))
    if unknown:
        raise ValueError(f"signed names {unknown}, which are not predictor columns {list(predictors.columns)}")
    # removing every gene of the sentence leaves no prompt to score; removing a subset's all is fine
    k_del = min(k_max, len(genes) - 1 if len(genes) == len(cell.genes) else len(genes))
    k_ins = min(k_max, len(genes))

    # One batch: the cell, its single removals, then each predictor's curves (the oracle's once known).
    singles = [knock_out(cell, [g]) for g in genes]
    first = np.asarray(measure([cell, *singles]), dtype=float)
    value, observed = float(first[0]), pd.Series(first[0] - first[1:], index=genes, name="observed")
    orderings = {name: ordering(predictors[name], genes) for name in predictors.columns}
    orderings[ORACLE] = ordering(observed, genes)
    orderings[ANTI_ORACLE] = ordering(-observed, genes)

    sentences: list[CellSentence] = []
    for order in orderings.values():
        sentences += [knock_out(cell, order[:k]) for k in range(1, k_del + 1)]
        sentences += [keep_only(cell, order[:k]) for k in range(1, k_ins + 1)]
    oracle_top = orderings[ORACLE]
    sentences += [shift_to_end(cell, oracle_top[:k]) for k in range(1, k_del + 1)]
    if absent:
        sentences += [replace_with_absent(cell, oracle_top[:k], absent, seed=seed) for k in range(1, k_del + 1)]
    values = iter(np.asarray(measure(sentences), dtype=float))

    deletion, insertion = {}, {}
    for name in orderings:
        deletion[name] = [value - next(values) for _ in range(k_del)]
        insertion[name] = [next(values) for _ in range(k_ins)]
    controls = {"remove": deletion[ORACLE], "shift to end": [value - next(values) for _ in range(k_del)]}
    if absent:
        controls["replace with absent gene"] = [value - next(values) for _ in range(k_del)]
    deletion = pd.DataFrame(deletion, index=pd.RangeIndex(1, k_del + 1, name="k")).T
    insertion = pd.DataFrame(insertion, index=pd.RangeIndex(1, k_ins + 1, name="k")).T

    scores = pd.DataFrame(index=list(orderings))
    scores["aopc_deletion"] = deletion.mean(axis=1)
    scores["naopc_deletion"] = normalised(scores["aopc_deletion"])
    scores["aopc_insertion"] = insertion.mean(axis=1)
    scores["naopc_insertion"] = normalised(scores["aopc_insertion"])
    columns = {**{name: predictors[name] for name in predictors.columns}, ORACLE: observed, ANTI_ORACLE: -observed}
    is_signed = set(signed) | {ORACLE, ANTI_ORACLE}
    scores["precision_at_k"] = [precision_at_k(columns[n], observed, precision_k, signed=n in is_signed)
                                for n in scores.index]
    scores["sign_agreement"] = [sign_agreement(columns[n], observed) if n in is_signed else np.nan
                                for n in scores.index]
    return CellBenchmark(cell.cell_id, cell.label, value, observed, deletion, insertion, scores,
                         pd.DataFrame(controls, index=deletion.columns).T)


def pooled_scores(results: Sequence[CellBenchmark], *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per ordering and score: the mean over cells with its 95% bootstrap interval (step 6).

    Columns are ``(score, statistic)`` pairs, statistic one of ``mean``, ``low``, ``high``."""
    if not results:
        raise ValueError("no cells to pool")
    names = list(results[0].scores.index)
    out = {}
    for score in results[0].scores.columns:
        table = pd.DataFrame({r.cell_id: r.scores[score].reindex(names) for r in results})
        stats = [bootstrap_interval(table.loc[name], n_boot=n_boot, seed=seed) for name in names]
        for i, statistic in enumerate(("mean", "low", "high")):
            out[(score, statistic)] = [s[i] for s in stats]
    return pd.DataFrame(out, index=pd.Index(names, name="ordering"))


def pooled_curves(results: Sequence[CellBenchmark], *, curve: str = "deletion", n_boot: int = 2000,
                  seed: int = 0) -> pd.DataFrame:
    """Long table (ordering, k, mean, low, high) of a curve over cells, for drawing with bands (step 6)."""
    if curve not in ("deletion", "insertion", "controls"):
        raise ValueError(f"curve must be 'deletion', 'insertion' or 'controls', got {curve!r}")
    rows = []
    tables = [getattr(r, curve) for r in results]
    for name in tables[0].index:
        for k in tables[0].columns:
            values = [t.loc[name, k] if (name in t.index and k in t.columns) else np.nan for t in tables]
            mean, low, high = bootstrap_interval(values, n_boot=n_boot, seed=seed)
            rows.append({"ordering": name, "k": int(k), "mean": mean, "low": low, "high": high})
    return pd.DataFrame(rows)


def scores_table(results: Sequence[CellBenchmark]) -> pd.DataFrame:
    """Every cell's scores in one long table (cell_id, cell_type, ordering, score columns)."""
    frames = [r.scores.rename_axis("ordering").reset_index().assign(cell_id=r.cell_id, cell_type=r.cell_type)
              for r in results]
    table = pd.concat(frames, ignore_index=True)
    return table[["cell_id", "cell_type", "ordering", *results[0].scores.columns]]



def _check_answer(answer: Sequence[int], competitors: Sequence[Sequence[int]]) -> None:
    if len(answer) == 0:
        raise ValueError("the answer has no token")
    if len(competitors) != len(answer):
        raise ValueError(f"{len(answer)} answer tokens but competitors for {len(competitors)} positions: give one "
                         "list per answer position (LabelTarget.competitors)")
    for j, (token, tokens) in enumerate(zip(answer, competitors)):
        if tokens and token not in tokens:
            raise ValueError(f"answer token {token} at position {j} is not among its competitors {list(tokens)}")


READOUT_KINDS = ("log_prob", "first_logit")


@dataclass(frozen=True)
class Readout:
    """A number the real model computes from the logits at the answer positions (module docstring, step 8).

    ``log_prob``: the sum over answer positions of log q_j(y_j) among ``competitors`` (per position;
    empty: the whole vocabulary); ``first_logit``: the logit of the answer's first token at the last
    prompt position minus the mean logit there (the demeaned logit a ``LogitTarget`` explains)."""

    answer: tuple[int, ...]
    competitors: tuple[tuple[int, ...], ...] | None = None
    kind: str = "log_prob"

    def __post_init__(self) -> None:
        object.__setattr__(self, "answer", tuple(int(t) for t in self.answer))
        if self.kind not in READOUT_KINDS:
            raise ValueError(f"kind must be one of {READOUT_KINDS}, got {self.kind!r}")
        if not self.answer:
            raise ValueError("the answer has no token")
        if self.kind == "log_prob":
            competitors = self.competitors if self.competitors is not None else [() for _ in self.answer]
            _check_answer(self.answer, competitors)
            object.__setattr__(self, "competitors", tuple(tuple(int(t) for t in c) for c in competitors))

    def __call__(self, logits: Float[Tensor, "batch answer vocab"]) -> Float[Tensor, "batch"]:
        """The readout of each row, for logits[:, j] predicting answer token j."""
        if self.kind == "first_logit":
            first = logits[:, 0].to(torch.promote_types(logits.dtype, torch.float32))
            return first[:, self.answer[0]] - first.mean(-1)
        return _answer_terms(logits, self.answer, self.competitors)


def _answer_terms(logits: Float[Tensor, "batch answer vocab"], answer: Sequence[int],
                  competitors: Sequence[Sequence[int]]) -> Float[Tensor, "batch"]:
    """Step 8's sum over answer positions, for logits[:, j] predicting answer token j."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    total = torch.zeros(logits.shape[0], dtype=logits.dtype, device=logits.device)
    for j, (token, tokens) in enumerate(zip(answer, competitors)):
        if not tokens:
            total = total + torch.log_softmax(logits[:, j], dim=-1)[:, token]
        elif len(tokens) > 1:
            chosen = torch.as_tensor(list(tokens), device=logits.device)
            total = total + torch.log_softmax(logits[:, j, chosen], dim=-1)[:, list(tokens).index(token)]
    return total


def _stated_count(template: str, num_genes: int | None) -> str:
    return template if num_genes is None else template.replace("{num_genes}", str(num_genes))


def _shared_answer(readouts: Mapping[str, Readout]) -> tuple[int, ...]:
    if not readouts:
        raise ValueError("give at least one readout")
    answers = {r.answer for r in readouts.values()}
    if len(answers) > 1:
        raise ValueError(f"the readouts follow different answers {sorted(answers)}; one forward pass reads one "
                         "teacher-forced answer: score each answer separately")
    return answers.pop()


@torch.no_grad()
def readout_scores(
    model,
    tokenizer: CellTokenizer,
    sentences: Sequence[CellSentence],
    readouts: Mapping[str, Readout],
    *,
    num_genes: int | None = None,
    batch_size: int = 64,
    template: str = C2S_CELL_TYPE_TEMPLATE,
) -> pd.DataFrame:
    """Every readout of every sentence (sentence x readout), from one forward pass per batch (step 8).

    num_genes: the gene count every prompt states (a perturbed cell keeps its original count, so
    only the sentence changes; None: each its own). Prompts of one token length run together,
    unpadded; all readouts must follow the same answer."""
    answer = _shared_answer(readouts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = encode_prompts(sentences, tokenizer, template=_stated_count(template, num_genes))
    device = next(model.parameters()).device
    tail = torch.as_tensor(list(answer[:-1]), dtype=torch.long, device=device)
    by_length: dict[int, list[int]] = {}
    for row, ids in enumerate(prompts.input_ids):
        by_length.setdefault(len(ids), []).append(row)
    scores = torch.zeros(len(prompts), len(readouts), dtype=torch.float64, device=device)  # moved once, at the end
    for rows in by_length.values():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids = torch.tensor([prompts.input_ids[r] for r in chunk], device=device)
            ids = torch.cat([ids, tail.expand(len(chunk), -1)], dim=1)
            logits = model(input_ids=ids, logits_to_keep=len(answer)).logits
            scores[chunk] = torch.stack([r(logits).double() for r in readouts.values()], dim=1)
    return pd.DataFrame(scores.cpu().numpy(), columns=list(readouts))


def answer_scores(
    model,
    tokenizer: CellTokenizer,
    sentences: Sequence[CellSentence],
    answer: Sequence[int],
    competitors: Sequence[Sequence[int]],
    *,
    num_genes: int | None = None,
    batch_size: int = 64,
    template: str = C2S_CELL_TYPE_TEMPLATE,
) -> Float[np.ndarray, "sentence"]:
    """The real model's target for each sentence (module docstring, step 8).

    answer: the answer's token ids (`` {label}.``); competitors: per answer position, the tokens it
    competes with (itself included; empty: the whole vocabulary); num_genes as in :func:`readout_scores`."""
    readout = Readout(tuple(answer), tuple(tuple(c) for c in competitors))
    return readout_scores(model, tokenizer, sentences, {"score": readout}, num_genes=num_genes,
                          batch_size=batch_size, template=template)["score"].to_numpy()


def readout_gradient_x_input(
    model,
    tokenizer: CellTokenizer,
    cell: CellSentence,
    readout: Readout,
    *,
    num_genes: int | None = None,
    template: str = C2S_CELL_TYPE_TEMPLATE,
) -> pd.Series:
    """Gradient x input of a readout on ``cell``, summed over each gene's tokens (step 8)."""
    answer = readout.answer
    prompts = encode_prompts([cell], tokenizer, template=_stated_count(template, num_genes))
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompts.input_ids[0], *answer[:-1]]], device=device)
    embeddings = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeddings, logits_to_keep=len(answer)).logits
    (gradient,) = torch.autograd.grad(readout(logits).sum(), embeddings)
    per_token = (gradient * embeddings.detach()).sum(-1)[0, : len(prompts.input_ids[0])].double().cpu().numpy()
    genes = prompts.gene_of_token[0]
    frame = pd.DataFrame({"gene": genes, "score": per_token}).dropna(subset=["gene"])
    return frame.groupby("gene", sort=False)["score"].sum().reindex(list(cell.genes)).rename("gradient_x_input")


def gradient_x_input(
    model,
    tokenizer: CellTokenizer,
    cell: CellSentence,
    answer: Sequence[int],
    competitors: Sequence[Sequence[int]],
    *,
    num_genes: int | None = None,
    template: str = C2S_CELL_TYPE_TEMPLATE,
) -> pd.Series:
    """Gradient x input of :func:`answer_scores`' target on ``cell``, summed over each gene's tokens (step 8)."""
    readout = Readout(tuple(answer), tuple(tuple(c) for c in competitors))
    return readout_gradient_x_input(model, tokenizer, cell, readout, num_genes=num_genes, template=template)


SIGNED_PREDICTORS = ("linear", "gradient_x_input", "dla")


def target_dla(replacement: ReplacementModel, cell: CellSentence, target: Target) -> pd.Series:
    """Attention-free DLA of ``target`` (step 9): its reading vectors, summed, applied to each gene's
    token embeddings as if they sat at the reading positions, summed over the gene's tokens."""
    prompt, token_genes = replacement.prompt(cell)
    answers = {label: replacement.answer_ids(label) for label in target.labels}
    # a label target reads its answer teacher-forced; other targets read the prompt alone
    forced = target.label if isinstance(target, LabelTarget) else None
    rep = replacement.linearise(teacher_forced(prompt, answers[forced]) if forced else prompt)
    reading = target.resolve(rep, prompt_length=len(prompt), answers=answers).reading
    vectors = reading.vectors.sum(0).to(rep.weights.dtype)
    per_token = (rep.weights.embed[rep.input_ids[: len(prompt)]] @ vectors).double().cpu().numpy()
    dla = pd.Series(per_token, index=token_genes)
    return dla[dla.index.notna()].groupby(level=0).sum().reindex(list(cell.genes)).fillna(0.0)


def circuit_genes(graph: Graph, *, k: int = 60, depth: int = 3) -> set[str]:
    """The genes whose token nodes the paper's greedy path search (:func:`greedy_paths`) reaches."""
    circuit = greedy_paths(graph, k=k, depth=depth)
    nodes = circuit.nodes
    return set(nodes.loc[nodes["kind"] == "embedding", "gene"].dropna())


def target_predictors(
    replacement: ReplacementModel,
    cell: CellSentence,
    target: Target,
    readout: Readout,
    *,
    expression: Mapping[str, float] | None = None,
    max_feature_nodes: int | None = 200,
    circuit: tuple[int, int] | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, Graph]:
    """Step 9's predictors of ``cell``'s genes (index: the sentence's genes) for any target, and its graph.

    readout: the real-model number gradient x input differentiates (the one the benchmark measures);
    circuit: (k, depth) of the greedy path search whose genes get 1 in a ``circuit`` column (None: no column)."""
    genes = list(cell.genes)
    graph = replacement.attribute(cell, target, max_feature_nodes=max_feature_nodes)
    table = pd.DataFrame(index=pd.Index(genes, name="gene"))
    table["influence"] = gene_view(graph).genes.set_index("gene")["influence"].reindex(genes).fillna(0.0)
    table["linear"] = -removal_estimate(graph).reindex(genes).fillna(0.0)
    table["gradient_x_input"] = readout_gradient_x_input(replacement.model, replacement.tokenizer, cell, readout)
    table["dla"] = target_dla(replacement, cell, target)
    if circuit is not None:
        members = circuit_genes(graph, k=circuit[0], depth=circuit[1])
        table["circuit"] = [float(g in members) for g in genes]
    table["rank"] = 1.0 / np.arange(1, len(genes) + 1)
    if expression is not None:
        table["expression"] = [float(expression[g]) for g in genes]
    table["random"] = np.random.default_rng([seed, cell.cell_index]).random(len(genes))
    return table, graph


def label_readout(replacement: ReplacementModel, target: LabelTarget) -> Readout:
    """The real-model number a label target's graph explains (step 8)."""
    answers = {label: replacement.answer_ids(label) for label in target.labels}
    return Readout(tuple(answers[target.label]), tuple(tuple(c) for c in target.competitors(answers)))


def label_predictors(
    replacement: ReplacementModel,
    cell: CellSentence,
    target: LabelTarget,
    *,
    expression: Mapping[str, float] | None = None,
    max_feature_nodes: int | None = 200,
    seed: int = 0,
) -> tuple[pd.DataFrame, Graph]:
    """Every predictor of step 9 for ``cell``'s genes (index: the sentence's genes), and the graph."""
    if not isinstance(target, LabelTarget):
        raise TypeError(f"label_predictors takes a LabelTarget, got {type(target).__name__}")
    return target_predictors(replacement, cell, target, label_readout(replacement, target), expression=expression,
                             max_feature_nodes=max_feature_nodes, seed=seed)


def label_benchmark(
    replacement: ReplacementModel,
    cell: CellSentence,
    target: LabelTarget,
    *,
    expression: Mapping[str, float] | None = None,
    max_feature_nodes: int | None = 200,
    k_max: int = 10,
    precision_k: int = 10,
    absent: Sequence[str] = (),
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[CellBenchmark, pd.DataFrame, Graph]:
    """One cell's benchmark on a label target (step 9): the result, the predictors and the graph."""
    predictors, graph = label_predictors(replacement, cell, target, expression=expression,
                                         max_feature_nodes=max_feature_nodes, seed=seed)
    readout = label_readout(replacement, target)

    def measure(sentences: Sequence[CellSentence]) -> np.ndarray:
        return readout_scores(replacement.model, replacement.tokenizer, sentences, {"target": readout},
                              num_genes=len(cell.genes), batch_size=batch_size)["target"].to_numpy()

    result = benchmark_cell(cell, predictors, measure, k_max=k_max, precision_k=precision_k,
                            signed=[p for p in SIGNED_PREDICTORS if p in predictors.columns], absent=absent, seed=seed)
    return result, predictors, graph
