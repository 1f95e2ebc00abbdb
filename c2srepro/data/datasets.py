"""Labelled cells as cell sentences, split by cell into training and held-out sets.

1. ``pbmc68k_reduced`` is scanpy's bundled PBMC set (700 cells, ``.raw`` log-normalised, labels
   ``bulk_labels``); any other string is a path to an ``.h5ad`` (large files read backed); an
   AnnData is used as it is.
2. Cells are encoded with the C2S gene-rank encoding (``c2srepro.data.cells``).
3. The split is stratified by label and seeded; labels with a single cell stay in training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from c2srepro.data.cells import CellSentence, cell_sentences, read_cells

PBMC = "pbmc68k_reduced"


@dataclass
class CellSplit:
    """Encoded cells of one labelled dataset and their training/held-out split."""

    sentences: list[CellSentence]
    train: list[int]  # positions in ``sentences``
    heldout: list[int]

    @property
    def labels(self) -> list[str]:
        return sorted({s.label for s in self.sentences})

    def cells(self, part: str) -> list[CellSentence]:
        if part not in ("train", "heldout"):
            raise ValueError(f"part must be 'train' or 'heldout', got {part!r}")
        return [self.sentences[i] for i in getattr(self, part)]

    def fingerprint(self) -> str:
        """A hash of each part's cells (id, label, genes in order): equal only for the same split of
        the same data, whatever file or parameters produced it."""
        digest = hashlib.sha256()
        for part in ("train", "heldout"):
            for cell in self.cells(part):
                digest.update(json.dumps([part, cell.cell_id, cell.label, list(cell.genes)]).encode())
        return digest.hexdigest()[:16]


def load_dataset(dataset):
    """The AnnData of ``dataset``: ``pbmc68k_reduced`` (scanpy's bundled cells), an ``.h5ad``
    path, or an AnnData (returned as it is)."""
    if not isinstance(dataset, (str, os.PathLike)):
        return dataset
    if str(dataset) == PBMC:
        import scanpy as sc

        return sc.datasets.pbmc68k_reduced()
    return read_cells(dataset)


def split_cells(sentences: list[CellSentence], *, heldout_fraction: float, seed: int) -> CellSplit:
    """Stratified, seeded split by cell."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    labels = np.array([s.label for s in sentences])
    values, counts = np.unique(labels, return_counts=True)
    singletons = np.isin(labels, values[counts < 2])
    positions = np.flatnonzero(~singletons)
    train, heldout = train_test_split(
        positions, test_size=heldout_fraction, random_state=seed, stratify=labels[positions]
    )
    train = np.concatenate([train, np.flatnonzero(singletons)])
    return CellSplit(sentences, sorted(train.tolist()), sorted(heldout.tolist()))


def labelled_split(
    dataset: str = PBMC,
    *,
    label_column: str = "bulk_labels",
    symbol_column: str | None = None,
    use_raw: bool = True,
    layer: str | None = None,
    top_k: int = 64,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    tie_seed: int | None = None,
    adata=None,
) -> CellSplit:
    """Encode a labelled dataset and split it. ``tie_seed`` (default ``seed``) seeds tie-breaking.

    ``use_raw=True`` (the default: ``pbmc68k_reduced`` keeps its log-normalised counts in ``.raw``,
    its ``.X`` is scaled) reads ``adata.raw.X``; ``layer`` reads ``adata.layers[layer]`` instead
    of either, as in ``cell_sentences``.
    """
    adata = load_dataset(dataset) if adata is None else adata
    sentences = cell_sentences(
        adata, top_k=top_k, seed=seed if tie_seed is None else tie_seed, use_raw=use_raw and layer is None,
        layer=layer, label_column=label_column, symbol_column=symbol_column,
    )
    return split_cells(sentences, heldout_fraction=heldout_fraction, seed=seed)
