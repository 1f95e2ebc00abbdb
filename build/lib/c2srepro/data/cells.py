"""Cells to cell sentences: C2S gene-rank encoding of an AnnData.

1. Read an ``.h5ad`` (backed mode for large files, so the matrix is read a chunk of cells at a time).
2. Take gene symbols from ``var_names`` or a named ``var`` column (Heart Cell Atlas v2:
   ``gene_name-new``), upper-case them, and make them unique: ``duplicates="sum"`` adds the
   expression of var columns that share a symbol (one sparse product per chunk), ``"first"``
   keeps the first column of each symbol and drops the rest. Columns without a symbol are dropped.
3. For each cell: its nonzero genes in descending expression, ties broken by a shuffle seeded by
   ``(seed, cell index)`` (so a cell's sentence does not depend on which other cells are encoded),
   the top ``top_k`` kept, joined by single spaces.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

log = logging.getLogger(__name__)

BACKED_ABOVE_BYTES = 2 << 30


@dataclass(frozen=True)
class CellSentence:
    cell_index: int  # row of the cell in the AnnData
    cell_id: str  # obs_name
    genes: tuple[str, ...]  # upper-case symbols, descending expression
    label: str | None

    @property
    def text(self) -> str:
        return " ".join(self.genes)


def read_cells(
    path: str | os.PathLike, *, backed: bool | None = None, label_column: str | None = None
) -> ad.AnnData:
    """Read an ``.h5ad``; ``backed=None`` reads files over 2 GiB in backed (on-disk) mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no .h5ad file at {path}: check the path parameter")
    if backed is None:
        backed = path.stat().st_size > BACKED_ABOVE_BYTES
    try:
        adata = ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError) as error:
        raise ValueError(f"{path} is not a readable .h5ad file ({error})") from error
    if label_column is not None:
        require_obs_column(adata, label_column)
    return adata


def require_obs_column(adata: ad.AnnData, column: str) -> None:
    if column not in adata.obs.columns:
        raise ValueError(
            f"label column {column!r} is not in adata.obs; available: {list(adata.obs.columns)}"
        )


def gene_symbols(adata: ad.AnnData, *, symbol_column: str | None = None, use_raw: bool = False) -> pd.Index:
    """Upper-case gene symbols of the matrix columns (empty string where a symbol is missing)."""
    var = adata.raw.var if use_raw else adata.var
    if symbol_column is None:
        symbols = pd.Index(var.index.astype(str))
    else:
        if symbol_column not in var.columns:
            raise ValueError(
                f"symbol column {symbol_column!r} is not in adata.{'raw.' if use_raw else ''}var; "
                f"available: {list(var.columns)} (or pass symbol_column=None to use var_names)"
            )
        symbols = pd.Index(var[symbol_column].astype(object).fillna("").astype(str))
    return pd.Index(symbols.str.strip().str.upper())


def _symbol_aggregation(symbols: pd.Index, duplicates: str) -> tuple[sp.csr_matrix, np.ndarray]:
    """A 0/1 matrix [n_vars, n_unique] mapping matrix columns onto unique symbols."""
    if duplicates not in ("sum", "first"):
        raise ValueError(f"duplicates must be 'sum' or 'first', got {duplicates!r}")
    keep = np.asarray(symbols != "")
    unique, inverse = np.unique(np.asarray(symbols)[keep], return_inverse=True)
    rows = np.flatnonzero(keep)
    if duplicates == "first":
        _, first = np.unique(inverse, return_index=True)
        rows, inverse = rows[first], inverse[first]
    data = np.ones(len(rows), dtype=np.float32)
    matrix = sp.csr_matrix((data, (rows, inverse)), shape=(len(symbols), len(unique)))
    return matrix, unique


def cell_sentences(
    adata: ad.AnnData,
    *,
    top_k: int | None = 64,
    seed: int = 0,
    symbol_column: str | None = None,
    label_column: str | None = None,
    use_raw: bool = False,
    duplicates: Literal["sum", "first"] = "sum",
    cells: Sequence[int] | None = None,
    chunk_size: int = 2048,
) -> list[CellSentence]:
    """Encode cells as C2S cell sentences.

    ``cells`` selects rows (default: all). Reads ``adata.X`` (or ``adata.raw.X`` with
    ``use_raw``) a chunk at a time; writes nothing to ``adata``.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (all expressed genes), got {top_k}")
    if label_column is not None:
        require_obs_column(adata, label_column)
    symbols = gene_symbols(adata, symbol_column=symbol_column, use_raw=use_raw)
    aggregate, unique = _symbol_aggregation(symbols, duplicates)
    if len(unique) == 0:
        raise ValueError("no gene symbols: every symbol in the chosen column is empty")
    n_dup = len(symbols) - len(set(symbols))
    if n_dup:
        log.info("%d var columns share a symbol with another; duplicates=%r", n_dup, duplicates)
    matrix = adata.raw.X if use_raw else adata.X
    rows = np.arange(adata.n_obs) if cells is None else np.asarray(cells, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= adata.n_obs):
        raise ValueError(f"cell indices must lie in [0, {adata.n_obs}); got {rows.min()}..{rows.max()}")
    labels = adata.obs[label_column].astype(str).to_numpy() if label_column else None
    obs_names = adata.obs_names.to_numpy()

    sentences: list[CellSentence] = []
    for start in tqdm(range(0, len(rows), chunk_size), desc="cell sentences", disable=len(rows) <= chunk_size):
        chunk_rows = rows[start : start + chunk_size]
        # backed h5py datasets need increasing indices; sort, then restore the caller's order
        order = np.argsort(chunk_rows, kind="stable")
        block = matrix[np.sort(chunk_rows)]
        block = sp.csr_matrix(block) @ aggregate
        block = sp.csr_matrix(block)[np.argsort(order)]
        for offset, row in enumerate(chunk_rows):
            genes = _rank_genes(block, offset, unique, top_k=top_k, seed=seed, cell_index=int(row))
            if not genes:
                raise ValueError(
                    f"cell {obs_names[row]!r} (index {row}) has no expressed genes: filter such cells "
                    "first, e.g. scanpy.pp.filter_cells(adata, min_genes=1)"
                )
            label = None if labels is None else labels[row]
            sentences.append(CellSentence(int(row), str(obs_names[row]), genes, label))
    return sentences


def _rank_genes(
    block: sp.csr_matrix, offset: int, unique: np.ndarray, *, top_k: int | None, seed: int, cell_index: int
) -> tuple[str, ...]:
    lo, hi = block.indptr[offset], block.indptr[offset + 1]
    values, columns = block.data[lo:hi], block.indices[lo:hi]
    positive = values > 0
    values, columns = values[positive], columns[positive]
    tie_breaker = np.random.default_rng([seed, cell_index]).permutation(len(values))
    order = np.lexsort((tie_breaker, -values))  # last key is primary: descending expression
    if top_k is not None:
        order = order[:top_k]
    return tuple(unique[columns[order]].tolist())

