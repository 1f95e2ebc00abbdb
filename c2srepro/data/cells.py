"""Cells to cell sentences: C2S gene-rank encoding of an AnnData.

1. Read an ``.h5ad`` (backed mode for large files, so the matrix is read a chunk of cells at a time).
2. Choose the expression values, as scanpy does: ``adata.X`` (default), ``adata.raw.X``
   (``use_raw=True``) or ``adata.layers[layer]``.
3. Take gene symbols from the var names or a named var column of that source (Heart Cell Atlas
   v2: ``gene_name-new``), upper-case them, and make them unique: ``duplicates="sum"`` adds the
   expression of var columns that share a symbol (one sparse product per chunk), ``"first"``
   keeps the first column of each symbol and drops the rest. Columns without a symbol are dropped.
4. Check every chunk before ranking it: a NaN or infinite value, or a negative one (a scaled,
   centred matrix such as scanpy's ``pbmc68k_reduced.X`` holds z-scores), is not expression and
   would silently reorder the genes, so it is refused, naming the cell, the gene, the value and
   the sources the AnnData offers instead.
5. For each cell: its nonzero genes in descending expression, ties broken by a shuffle seeded by
   ``(seed, cell index)`` (so a cell's sentence does not depend on which other cells are encoded),
   the top ``top_k`` kept, joined by single spaces. The shuffle permutes the cell's entries in
   the order the sparse matrix stores them, so re-sorting a matrix stored with unsorted column
   indices (scipy's ``sort_indices``, which e.g. ``.min()`` calls) changes how ties fall.
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
# Share of negative entries from which a matrix is called scaled in the error message.
SCALED_NEGATIVE_SHARE = 0.05


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


def require_anndata(adata, *, where: str) -> None:
    """``TypeError`` unless ``adata`` is an AnnData, saying how to get one."""
    if not isinstance(adata, ad.AnnData):
        hint = (
            f"read the file first: {where}(read_cells({str(adata)!r}), ...)"
            if isinstance(adata, (str, os.PathLike))
            else "build one with anndata.AnnData(X=counts, obs=..., var=...) or read_cells(path)"
        )
        raise TypeError(f"{where}: expected an anndata.AnnData of cells x genes, got {type(adata).__name__}: {hint}")


def require_obs_column(adata: ad.AnnData, column: str) -> None:
    if column not in adata.obs.columns:
        raise ValueError(
            f"label column {column!r} is not in adata.obs; available: {list(adata.obs.columns)}"
        )


@dataclass(frozen=True)
class ExpressionSource:
    """The matrix cell sentences are read from, its var table and how to name it in messages."""

    matrix: object  # [n_obs, n_vars]: dense, sparse or a backed h5py dataset
    var: pd.DataFrame
    name: str  # "adata.X", "adata.raw.X" or "adata.layers['counts']"


def _alternatives(adata: ad.AnnData, current: str) -> str:
    """The other sources the AnnData offers, as the keywords that select them."""
    options = [] if current == "adata.X" else ["use_raw=False (adata.X)"]
    if adata.raw is not None and current != "adata.raw.X":
        options.append("use_raw=True (adata.raw.X)")
    options += [f"layer={key!r}" for key in adata.layers.keys() if current != f"adata.layers[{key!r}]"]
    return ", ".join(options) if options else "none: this AnnData has no .raw and no layers"


def expression_source(adata: ad.AnnData, *, use_raw: bool = False, layer: str | None = None) -> ExpressionSource:
    """``adata.X``, ``adata.raw.X`` (``use_raw``) or ``adata.layers[layer]``, with its var table."""
    if use_raw and layer is not None:
        raise ValueError(f"use_raw=True and layer={layer!r} both choose the matrix: pass one of them")
    if use_raw:
        if adata.raw is None:
            raise ValueError(
                f"use_raw=True, but this AnnData has no .raw; other sources: {_alternatives(adata, 'adata.raw.X')}"
            )
        return ExpressionSource(adata.raw.X, adata.raw.var, "adata.raw.X")
    if layer is not None:
        if layer not in adata.layers:
            raise ValueError(
                f"layer {layer!r} is not in adata.layers; other sources: {_alternatives(adata, f'adata.layers[{layer!r}]')}"
            )
        return ExpressionSource(adata.layers[layer], adata.var, f"adata.layers[{layer!r}]")
    return ExpressionSource(adata.X, adata.var, "adata.X")


def gene_symbols(
    adata: ad.AnnData, *, symbol_column: str | None = None, use_raw: bool = False, layer: str | None = None
) -> pd.Index:
    """Upper-case gene symbols of the matrix columns (empty string where a symbol is missing)."""
    source = expression_source(adata, use_raw=use_raw, layer=layer)
    return _symbols(source, symbol_column)


def _symbols(source: ExpressionSource, symbol_column: str | None) -> pd.Index:
    var = source.var
    if symbol_column is None:
        symbols = pd.Index(var.index.astype(str))
    else:
        if symbol_column not in var.columns:
            table = "adata.raw.var" if source.name == "adata.raw.X" else "adata.var"
            raise ValueError(
                f"symbol column {symbol_column!r} is not in {table}; "
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
    layer: str | None = None,
    duplicates: Literal["sum", "first"] = "sum",
    cells: Sequence[int] | None = None,
    chunk_size: int = 2048,
) -> list[CellSentence]:
    """Encode cells as C2S cell sentences.

    Expression is read from ``adata.X``, ``adata.raw.X`` (``use_raw=True``) or
    ``adata.layers[layer]``, a chunk of cells at a time (backed AnnData included); values must be
    finite and non-negative (counts or log-normalised counts, not scaled data). ``cells`` selects
    rows (default: all). Writes nothing to ``adata``.
    """
    require_anndata(adata, where="cell_sentences")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"the AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None (all expressed genes), got {top_k}")
    if label_column is not None:
        require_obs_column(adata, label_column)
    source = expression_source(adata, use_raw=use_raw, layer=layer)
    symbols = _symbols(source, symbol_column)
    aggregate, unique = _symbol_aggregation(symbols, duplicates)
    if len(unique) == 0:
        raise ValueError("no gene symbols: every symbol in the chosen column is empty")
    n_dup = len(symbols) - len(set(symbols))
    if n_dup:
        log.info("%d var columns share a symbol with another; duplicates=%r", n_dup, duplicates)
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
        sorted_rows = chunk_rows[order]
        block = sp.csr_matrix(source.matrix[sorted_rows])
        _check_expression(block, sorted_rows, adata, source)
        block = sp.csr_matrix(block @ aggregate)[np.argsort(order)]
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


def _check_expression(block: sp.csr_matrix, rows: np.ndarray, adata: ad.AnnData, source: ExpressionSource) -> None:
    """``ValueError`` at the first NaN, infinite or negative value of ``block`` (rows ``rows``)."""
    values = block.data
    not_finite = ~np.isfinite(values)
    negative = values < 0
    if not (not_finite.any() or negative.any()):
        return
    entry = int(np.argmax(not_finite)) if not_finite.any() else int(np.argmax(negative))
    row = int(rows[np.searchsorted(block.indptr, entry, side="right") - 1])
    value = f"{float(values[entry]):g}"
    where = f"cell {adata.obs_names[row]!r} (index {row}), gene {str(source.var.index[block.indices[entry]])!r}"
    options = _alternatives(adata, source.name)
    if not_finite.any():
        raise ValueError(
            f"{source.name} holds {value} at {where}: expression values must be finite; fix or drop that "
            f"cell, or read another source: {options}"
        )
    share = negative.sum() / (block.shape[0] * block.shape[1])
    # A scaled matrix is negative almost everywhere (a z-scored zero is negative); a few negative
    # entries in counts are a defect of their own.
    reason = (
        "it looks scaled or centred (z-scores, as after scanpy.pp.scale), not expression"
        if share >= SCALED_NEGATIVE_SHARE
        else "expression cannot be negative"
    )
    raise ValueError(
        f"{source.name} holds {negative.sum()} negative values ({share:.0%} of the {block.shape[0]} cells x "
        f"{block.shape[1]} genes read), e.g. {value} at {where}: {reason}. Cell sentences rank expression: "
        f"read counts or log-normalised counts instead: {options}"
    )


def _rank_genes(
    block: sp.csr_matrix, offset: int, unique: np.ndarray, *, top_k: int | None, seed: int, cell_index: int
) -> tuple[str, ...]:
    lo, hi = block.indptr[offset], block.indptr[offset + 1]
    values, columns = block.data[lo:hi], block.indices[lo:hi]
    positive = values > 0  # explicitly stored zeros are not expressed genes
    values, columns = values[positive], columns[positive]
    tie_breaker = np.random.default_rng([seed, cell_index]).permutation(len(values))
    order = np.lexsort((tie_breaker, -values))  # last key is primary: descending expression
    if top_k is not None:
        order = order[:top_k]
    return tuple(unique[columns[order]].tolist())
