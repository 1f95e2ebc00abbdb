"""Held-out cell-type accuracy of a C2S model, beside a logistic-regression baseline.

1. Predictions: each held-out cell's candidate-label scoring (``c2srepro.models.predict``); the
   accuracy is the fraction of cells whose prediction is their label. :func:`heldout_accuracy`
   predicts with the model as it runs at the call, so inside a hook context (the transcoders in
   place of the MLPs: ``with replace_mlps(model, transcoders): heldout_accuracy(...)``) it is the
   accuracy of the replacement model.
2. The baseline sees what the model sees: a 0/1 bag of each cell's top-K genes (the genes of its
   cell sentence, order dropped), fit on the same training cells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix

from c2srepro.data.datasets import CellSplit
from c2srepro.models.predict import predict_labels


def bag_of_genes(split: CellSplit) -> np.ndarray:
    """[n_cells, n_genes] 0/1 matrix: gene in the cell's sentence."""
    genes = sorted({g for s in split.sentences for g in s.genes})
    column = {g: i for i, g in enumerate(genes)}
    bag = np.zeros((len(split.sentences), len(genes)), dtype=np.float32)
    for row, sentence in enumerate(split.sentences):
        bag[row, [column[g] for g in sentence.genes]] = 1
    return bag


def baseline_accuracy(split: CellSplit, *, seed: int = 0) -> float:
    bag = bag_of_genes(split)
    labels = np.array([s.label for s in split.sentences])
    classifier = LogisticRegression(max_iter=5000, random_state=seed)
    classifier.fit(bag[split.train], labels[split.train])
    return float(classifier.score(bag[split.heldout], labels[split.heldout]))


def heldout_predictions(model, tokenizer, split: CellSplit, *, max_cells: int | None = None) -> pd.DataFrame:
    """One row per held-out cell: ``cell_id, label, predicted`` (candidate-label scoring)."""
    cells = split.cells("heldout")[:max_cells]
    predicted = predict_labels(model, tokenizer, cells, split.labels)
    return pd.DataFrame(
        {"cell_id": [c.cell_id for c in cells], "label": [c.label for c in cells], "predicted": predicted}
    )


def accuracy(predictions: pd.DataFrame) -> float:
    """The fraction of rows of :func:`heldout_predictions` whose ``predicted`` is their ``label``."""
    missing = [c for c in ("label", "predicted") if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack columns {missing}: pass heldout_predictions()'s table")
    if predictions.empty:
        raise ValueError("no predictions: the accuracy of zero cells is undefined")
    return float((predictions["label"] == predictions["predicted"]).mean())


def heldout_accuracy(model, tokenizer, split: CellSplit, *, max_cells: int | None = None) -> float:
    """Accuracy over the first ``max_cells`` held-out cells (None: all) of the model as it runs now
    (module docstring, step 1)."""
    return accuracy(heldout_predictions(model, tokenizer, split, max_cells=max_cells))


def confusion_table(predictions: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Counts [true label, predicted label]."""
    counts = confusion_matrix(predictions["label"], predictions["predicted"], labels=labels)
    return pd.DataFrame(counts, index=pd.Index(labels, name="label"), columns=pd.Index(labels, name="predicted"))
