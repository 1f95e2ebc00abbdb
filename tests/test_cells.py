import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

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


# --------------------------------------------------------------------------- expression sources


def test_scaled_pbmc_x_is_refused_and_raw_gives_the_expression_ranking():
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()  # .X z-scored (sc.pp.scale), .raw log-normalised
    with pytest.raises(ValueError, match=r"adata\.X holds \d+ negative values .* looks scaled .*use_raw=True"):
        cell_sentences(pbmc, top_k=5, cells=[0])
    (sentence,) = cell_sentences(pbmc, top_k=5, cells=[0], use_raw=True)
    # the three largest log-normalised values of the first cell, read independently of the encoder
    raw = pbmc.raw.X[0].toarray().ravel()
    assert sentence.genes[:2] == ("FTL", "CD74") == tuple(pbmc.raw.var_names[np.argsort(-raw)[:2]])
    assert set(sentence.genes[2:]) <= set(pbmc.raw.var_names[raw == np.sort(raw)[-3]])


def test_use_raw_without_raw_is_a_clear_error():
    adata = make_adata([[1, 2]], ["a", "b"])
    with pytest.raises(ValueError, match=r"use_raw=True, but this AnnData has no \.raw; other sources: use_raw=False"):
        cell_sentences(adata, use_raw=True)


def test_layer_is_read_instead_of_x():
    adata = make_adata([[1, 2, 3]], list("abc"))
    adata.layers["counts"] = sp.csr_matrix(np.array([[30, 20, 10]], dtype=np.float32))
    assert cell_sentences(adata, top_k=None)[0].genes == ("C", "B", "A")
    assert cell_sentences(adata, top_k=None, layer="counts")[0].genes == ("A", "B", "C")
    with pytest.raises(ValueError, match=r"layer 'spliced' is not in adata\.layers; other sources: .*layer='counts'"):
        cell_sentences(adata, layer="spliced")
    with pytest.raises(ValueError, match="use_raw=True and layer='counts' both choose the matrix"):
        cell_sentences(adata, use_raw=True, layer="counts")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dense", [False, True])
def test_non_finite_values_are_refused_naming_cell_gene_and_value(bad, dense):
    matrix = np.array([[1, 2, 3], [4, bad, 6]], dtype=np.float32)
    adata = make_adata(matrix, list("abc"))
    if dense:
        adata.X = matrix
    with pytest.raises(ValueError, match=rf"adata\.X holds {bad:g} at cell 'cell1' \(index 1\), gene 'b': .*finite"):
        cell_sentences(adata)


def test_a_negative_count_is_refused_naming_the_cell():
    rng = np.random.default_rng(0)
    matrix = rng.poisson(2.0, size=(30, 40)) + 1.0
    matrix[17, 3] = -1.0
    adata = make_adata(matrix, [f"g{i}" for i in range(40)])
    adata.layers["counts"] = sp.csr_matrix(np.abs(matrix))
    with pytest.raises(ValueError, match=r"1 negative values .* -1 at cell 'cell17' \(index 17\), gene 'g3': "
                       r"expression cannot be negative.*layer='counts'"):
        cell_sentences(adata, chunk_size=8)  # the bad cell lies in the third chunk
    assert len(cell_sentences(adata, layer="counts")) == 30


def test_cell_sentences_of_a_path_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"cell_sentences: expected an anndata\.AnnData .* got str: .*read_cells\("):
        cell_sentences(str(tmp_path / "cells.h5ad"))


def test_backed_raw_and_layer_match_in_memory(tmp_path):
    rng = np.random.default_rng(1)
    counts = rng.poisson(0.8, size=(30, 12)).astype(np.float32)
    counts[:, 0] += 1
    adata = make_adata(np.log1p(counts), [f"g{i}" for i in range(12)])
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.raw = adata
    adata.X = sp.csr_matrix(-np.log1p(counts))  # what a scaled .X looks like to the check
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = read_cells(path, backed=True)
    for kwargs in (dict(use_raw=True), dict(layer="counts")):
        assert cell_sentences(backed, chunk_size=7, **kwargs) == cell_sentences(adata, chunk_size=7, **kwargs)
    with pytest.raises(ValueError, match="negative values"):
        cell_sentences(backed, chunk_size=7)


def test_labelled_split_reads_the_chosen_source():
    from c2srepro.data.datasets import labelled_split

    rng = np.random.default_rng(2)
    adata = make_adata(rng.poisson(1.0, size=(20, 10)) + 1.0, [f"g{i}" for i in range(10)], labels=["T", "B"] * 10)
    adata.layers["counts"] = sp.csr_matrix(rng.poisson(3.0, size=(20, 10)) + 1.0)
    split = labelled_split(adata=adata, label_column="cell_type", layer="counts", top_k=5, heldout_fraction=0.5)
    assert split.sentences == cell_sentences(adata, label_column="cell_type", layer="counts", top_k=5)
    assert split.sentences != cell_sentences(adata, label_column="cell_type", top_k=5)
    with pytest.raises(ValueError, match=r"no \.raw; other sources: use_raw=False \(adata\.X\), layer='counts'"):
        labelled_split(adata=adata, label_column="cell_type", heldout_fraction=0.5)
