"""In-silico perturbations of a cell sentence, and what the real model makes of them.

A cell sentence is the cell's genes in descending expression; C2S reads a gene's rank from its
place in that list. A perturbation edits the list as C2S would see an edited cell:

1. :func:`remove_gene`: the gene leaves the sentence and every gene below it moves up one rank.
   :func:`knock_out` removes several genes at once. :func:`move_gene` puts a gene at another rank
   (1 = first), shifting the genes between its old and new place by one. :func:`swap_genes`
   exchanges the ranks of two genes. Each returns a new :class:`~c2srepro.data.cells.CellSentence`
   (same cell id and label), so its prompt is built as any other: the template's gene count
   follows the new length.
2. The model scores every perturbed sentence's candidate labels
   (:func:`c2srepro.models.predict.score_labels`, batched by prompt length: a removal shortens a
   prompt by the gene's one to four tokens, so a cell's perturbations fall in a few lengths).
3. :func:`perturbation_effects`: the scores of the unperturbed cell and of each perturbed one; the
   change in the log-probability of the cell's label (by default the predicted one, the best
   score of the unperturbed cell), and the label distribution (softmax of the scores over the
   candidates) with its total-variation distance from the unperturbed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from jaxtyping import Float

from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import C2S_CELL_TYPE_TEMPLATE, require_cell_sentences
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.models.predict import label_probabilities, score_labels


def _require_gene(cell: CellSentence, gene: str) -> int:
    """The 0-based place of ``gene`` in the sentence; a clear error if it is not there."""
    try:
        return cell.genes.index(gene)
    except ValueError:
        shown = ", ".join(cell.genes[:8]) + (", ..." if len(cell.genes) > 8 else "")
        raise ValueError(
            f"gene {gene!r} is not in cell {cell.cell_id!r}'s sentence ({len(cell.genes)} genes: {shown}); "
            "genes are upper-case symbols as in cell.genes"
        ) from None


def knock_out(cell: CellSentence, genes: Sequence[str]) -> CellSentence:
    """The sentence without ``genes``; the genes below each removed one move up."""
    if isinstance(genes, str):
        raise TypeError(f"knock_out takes a list of genes, got the string {genes!r}: pass [{genes!r}]")
    if not genes:
        raise ValueError("give at least one gene to knock out")
    if len(set(genes)) != len(genes):
        repeated = sorted({g for g in genes if list(genes).count(g) > 1})
        raise ValueError(f"genes to knock out are repeated: {repeated}")
    for gene in genes:
        _require_gene(cell, gene)
    if len(genes) == len(cell.genes):
        raise ValueError(f"knocking out all {len(cell.genes)} genes of cell {cell.cell_id!r} leaves an empty sentence")
    removed = set(genes)
    return replace(cell, genes=tuple(g for g in cell.genes if g not in removed))


def remove_gene(cell: CellSentence, gene: str) -> CellSentence:
    """The sentence without ``gene``; the genes below it move up one rank."""
    return knock_out(cell, [gene])


def move_gene(cell: CellSentence, gene: str, rank: int) -> CellSentence:
    """The sentence with ``gene`` at ``rank`` (1 = most expressed); the genes in between shift by one."""
    place = _require_gene(cell, gene)
    if not 1 <= rank <= len(cell.genes):
        raise ValueError(f"rank must be in 1..{len(cell.genes)} (the sentence's length), got {rank}")
    others = [g for i, g in enumerate(cell.genes) if i != place]
    others.insert(rank - 1, gene)
    return replace(cell, genes=tuple(others))


def swap_genes(cell: CellSentence, first: str, second: str) -> CellSentence:
    """The sentence with the ranks of ``first`` and ``second`` exchanged."""
    if first == second:
        raise ValueError(f"swap needs two different genes, got {first!r} twice")
    i, j = _require_gene(cell, first), _require_gene(cell, second)
    genes = list(cell.genes)
    genes[i], genes[j] = genes[j], genes[i]
    return replace(cell, genes=tuple(genes))


@dataclass(frozen=True)
class PerturbationEffects:
    """Scores of one cell's candidate labels, unperturbed and under each perturbation."""

    cell: CellSentence
    perturbed: list[CellSentence]
    names: list[str]  # one per perturbation, e.g. "remove CD14"
    candidates: list[str]
    label: str  # whose log-probability change is reported
    base: Float[np.ndarray, "candidate"]
    scores: Float[np.ndarray, "perturbation candidate"]

    @property
    def label_index(self) -> int:
        return self.candidates.index(self.label)

    @property
    def delta(self) -> Float[np.ndarray, "perturbation"]:
        """Change in the label's log-probability: perturbed minus unperturbed."""
        return self.scores[:, self.label_index] - self.base[self.label_index]

    @property
    def base_distribution(self) -> Float[np.ndarray, "candidate"]:
        return label_probabilities(self.base)

    @property
    def distributions(self) -> Float[np.ndarray, "perturbation candidate"]:
        """The label distribution under each perturbation (softmax of the scores over the candidates)."""
        return label_probabilities(self.scores)

    @property
    def total_variation(self) -> Float[np.ndarray, "perturbation"]:
        return 0.5 * np.abs(self.distributions - self.base_distribution).sum(axis=1)

    @property
    def predicted(self) -> list[str]:
        """The best-scoring candidate under each perturbation."""
        return [self.candidates[i] for i in self.scores.argmax(axis=1)]

    def table(self) -> pd.DataFrame:
        """One row per perturbation: its name, the label's log-probability change, the distribution's
        total-variation distance, and the prediction after it."""
        return pd.DataFrame({
            "perturbation": self.names, "delta_logprob": self.delta, "total_variation": self.total_variation,
            "predicted": self.predicted,
        })


def perturbation_effects(
    model,
    tokenizer: CellTokenizer,
    cell: CellSentence,
    perturbed: Sequence[CellSentence],
    candidates: Sequence[str],
    *,
    names: Sequence[str] | None = None,
    label: str | None = None,
    batch_size: int = 64,
    keep_gene_count: bool = True,
    template: str = C2S_CELL_TYPE_TEMPLATE,
    **prompt_options,
) -> PerturbationEffects:
    """The real model's scores for ``cell`` and each perturbed sentence (module docstring, step 3).

    label: whose log-probability change :attr:`PerturbationEffects.delta` reports (default: the
    best-scoring candidate of the unperturbed cell, the model's prediction);
    keep_gene_count: every prompt states ``cell``'s gene count (False: each its own length).
    """
    if keep_gene_count:
        template = template.replace("{num_genes}", str(len(cell.genes)))
    require_cell_sentences(list(perturbed), where="perturbation_effects")
    candidates = list(candidates)
    if label is not None and label not in candidates:
        raise ValueError(f"label {label!r} is not among the candidates {candidates}")
    names = [f"perturbation {i}" for i in range(len(perturbed))] if names is None else list(names)
    if len(names) != len(perturbed):
        raise ValueError(f"{len(perturbed)} perturbed sentences but {len(names)} names")
    scores = score_labels(model, tokenizer, [cell, *perturbed], candidates, batch_size=batch_size, template=template,
                          **prompt_options)
    base = scores[0]
    label = candidates[int(base.argmax())] if label is None else label
    return PerturbationEffects(cell, list(perturbed), names, candidates, label, base, scores[1:])


def removal_effects(
    model,
    tokenizer: CellTokenizer,
    cell: CellSentence,
    candidates: Sequence[str],
    *,
    genes: Sequence[str] | None = None,
    label: str | None = None,
    batch_size: int = 64,
    **prompt_options,
) -> PerturbationEffects:
    """:func:`perturbation_effects` of removing each of ``genes`` (default: every gene) on its own."""
    genes = list(cell.genes) if genes is None else list(genes)
    perturbed = [remove_gene(cell, gene) for gene in genes]
    return perturbation_effects(model, tokenizer, cell, perturbed, candidates, names=[f"remove {g}" for g in genes],
                                label=label, batch_size=batch_size, **prompt_options)
