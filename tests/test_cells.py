import numpy as np
import pandas as pd
import pytest

from c2srepro.data.cells import cell_sentences, read_cells
from tests.conftest import make_adata


def test_descending_order_zeros_dropped_upper_case():
    adata = make_adata([[0, 5, 1, 3]], ["a", "b", "c", "d"])
    (sentence,) = cell_sentences(adata, top_k=None)
    assert sentence.genes == ("B", "D", "C")
    assert sentence.text == "B D C"


def test_top_k_keeps_the_highest():
    adata = make_adata([[1, 2, 3, 4, 5]], list("abcde"))
    assert cell_sentences(adata, top_k=2)[0].genes == ("E", "D")


def test_ties_are_shuffled_by_seed_and_reproducible():
    genes = [f"g{i}" for i in range(30)]
    adata = make_adata([np.ones(30)], genes)
    first = cell_sentences(adata, top_k=None, seed=0)[0].genes
    assert first == cell_sentences(adata, top_k=None, seed=0)[0].genes
    assert first != cell_sentences(adata, top_k=None, seed=1)[0].genes
    assert sorted(first) == sorted(g.upper() for g in genes)
    assert first != tuple(sorted(first)), "ties must not fall back to alphabetical order"


def test_ties_only_reorder_equal_values():
    adata = make_adata([[2, 1, 2, 1, 3]], list("abcde"))
    for seed in range(5):
        genes = cell_sentences(adata, top_k=None, seed=seed)[0].genes
        assert genes[0] == "E" and set(genes[1:3]) == {"A", "C"} and set(genes[3:]) == {"B", "D"}


def test_sentence_of_a_cell_does_not_depend_on_other_cells():
    adata = make_adata([[1, 1, 1, 0], [0, 2, 2, 2]], list("abcd"))
    both = cell_sentences(adata, top_k=None)
    alone = cell_sentences(adata, top_k=None, cells=[1])
    assert both[1].genes == alone[0].genes


def test_duplicate_symbols_sum_or_first():
    var = pd.DataFrame({"symbol": ["x", "y", "x"]}, index=["E1", "E2", "E3"])
    adata = make_adata([[1, 2, 3]], None, var=var)
    summed = cell_sentences(adata, top_k=None, symbol_column="symbol", duplicates="sum")[0]
    assert summed.genes == ("X", "Y")  # X = 1 + 3 = 4 > 2
    first = cell_sentences(adata, top_k=None, symbol_column="symbol", duplicates="first")[0]
    assert first.genes == ("Y", "X")  # X = 1 (the first column) < 2


def test_missing_symbols_are_dropped():
    var = pd.DataFrame({"symbol": ["x", None, "z"]}, index=["E1", "E2", "E3"])
    adata = make_adata([[1, 9, 3]], None, var=var)
    assert cell_sentences(adata, top_k=None, symbol_column="symbol")[0].genes == ("Z", "X")


def test_labels_are_carried():
    adata = make_adata([[1, 0], [0, 1]], ["a", "b"], labels=["T", "B"])
    assert [s.label for s in cell_sentences(adata, label_column="cell_type")] == ["T", "B"]


def test_cell_with_no_expressed_genes_is_an_error():
    adata = make_adata([[1, 0], [0, 0]], ["a", "b"])
    with pytest.raises(ValueError, match="cell1.*no expressed genes.*filter_cells"):
        cell_sentences(adata)


def test_empty_anndata_is_an_error():
    adata = make_adata(np.zeros((0, 3)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="AnnData is empty"):
        cell_sentences(adata)


def test_unknown_columns_are_errors():
    adata = make_adata([[1, 2]], ["a", "b"], labels=["T"])
    with pytest.raises(ValueError, match="label column 'nope' is not in adata.obs"):
        cell_sentences(adata, label_column="nope")
    with pytest.raises(ValueError, match="symbol column 'gene_name-new' is not in adata.var"):
        cell_sentences(adata, symbol_column="gene_name-new")


def test_read_cells_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .h5ad file at"):
        read_cells(tmp_path / "absent.h5ad")


def test_read_cells_not_an_h5ad(tmp_path):
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable .h5ad"):
        read_cells(bad)


def test_backed_mode_matches_in_memory(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.poisson(0.7, size=(40, 25))
    matrix[:, 0] += 1  # no empty cells
    var = pd.DataFrame({"gene_name-new": [f"g{i % 20}" for i in range(25)]}, index=[f"ENSG{i}" for i in range(25)])
    adata = make_adata(matrix, None, labels=["a"] * 40, var=var)
    path = tmp_path / "atlas.h5ad"
    adata.write_h5ad(path)
    backed = read_cells(path, backed=True, label_column="cell_type")
    assert backed.isbacked
    kwargs = dict(top_k=10, symbol_column="gene_name-new", label_column="cell_type", chunk_size=7)
    assert cell_sentences(backed, **kwargs) == cell_sentences(adata, **kwargs)
