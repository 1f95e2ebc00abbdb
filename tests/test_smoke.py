"""The smoke profile's inputs: the synthetic Heart-Cell-Atlas-shaped h5ad and the random Pythia model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from c2srepro.book import smoke
from c2srepro.data.cells import cell_sentences, gene_symbols, read_cells
from c2srepro.models.load import load_c2s_model

ATLAS_LABELS = [
    "Adipocyte", "Atrial Cardiomyocyte", "Endothelial", "Fibroblast", "Lymphoid", "Mast", "Mesothelial",
    "Myeloid", "Neural", "Pericytes", "Smooth Muscle", "Ventricular Cardiomyocyte",
]


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory):
    # a private cache: the test builds the atlas itself rather than finding one built by other code
    return tmp_path_factory.mktemp("smoke-cache")


@pytest.fixture(scope="module")
def atlas_path(smoke_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("C2SREPRO_CACHE", str(smoke_cache))
        return smoke.smoke_atlas_path(n_cells_per_type=4, seed=0)


@pytest.fixture(scope="module")
def atlas(atlas_path):
    return read_cells(atlas_path, backed=True, label_column="cell_type")


@pytest.fixture(scope="module")
def markers():
    return smoke.type_markers()


def test_atlas_has_the_atlas_structure(atlas, atlas_path):
    assert atlas_path.suffix == ".h5ad" and atlas_path.parent.name == "smoke"
    assert atlas.isbacked and atlas.n_obs == 48 and atlas.n_vars == smoke.N_GENES
    assert sorted(atlas.obs["cell_type"].unique()) == ATLAS_LABELS
    assert (atlas.obs["cell_type"].value_counts() == 4).all()
    assert atlas.obs["cell_state"].nunique() == 24
    assert atlas.obs_names.is_unique and all(name.startswith("SmokeHeart") for name in atlas.obs_names)
    assert atlas.var_names.is_unique and all(v.startswith("ENSG") and len(v) == 15 for v in atlas.var_names)
    # cells of a type are interleaved, as in the atlas, not stored in blocks
    assert atlas.obs["cell_type"].iloc[:12].nunique() > 3
    matrix = atlas.X[:]
    assert matrix.format == "csr" and matrix.dtype == np.float32
    assert np.array_equal(matrix.data, np.round(matrix.data)) and (matrix.data > 0).all()
    symbols = atlas.var["gene_name-new"].astype(object)
    counts = symbols[symbols.notna() & (symbols != "")].value_counts()
    assert set(counts[counts > 1].index) == set(smoke.DUPLICATED_SYMBOLS)
    assert symbols.isna().sum() == smoke.N_MISSING_SYMBOLS
    assert (symbols == "").sum() == smoke.N_MISSING_SYMBOLS
    assert {"VWF", "PTPRB", "MT-ND4", "MALAT1"} <= set(symbols.dropna())
    assert set(smoke.PAPER_PROMPT_GENES) <= set(symbols.dropna())


def test_duplicated_symbols_are_summed_once(atlas):
    sentences = cell_sentences(atlas, top_k=None, symbol_column="gene_name-new", label_column="cell_type")
    # independent reference: total counts per symbol by a pandas group-by over the dense matrix
    symbols = gene_symbols(atlas, symbol_column="gene_name-new")
    dense = pd.DataFrame(atlas.X[:].toarray(), columns=symbols)
    totals = dense.loc[:, symbols != ""].T.groupby(level=0).sum().T  # [cells, unique symbols]
    assert len(totals.columns) == smoke.N_GENES - len(smoke.DUPLICATED_SYMBOLS) - 2 * smoke.N_MISSING_SYMBOLS
    gene = smoke.DUPLICATED_SYMBOLS[0]
    columns = np.flatnonzero(symbols == gene)
    assert len(columns) == 2
    both_expressed = 0
    for sentence in sentences:
        row = totals.iloc[sentence.cell_index]
        assert sentence.genes.count(gene) <= 1
        assert set(sentence.genes) == set(row.index[row > 0])
        # descending expression by the summed counts: the duplicated symbol sits where its sum ranks it
        values = row[list(sentence.genes)].to_numpy()
        assert (np.diff(values) <= 0).all()
        pair = dense.iloc[sentence.cell_index, columns].to_numpy()
        if (pair > 0).all():
            both_expressed += 1
            assert row[gene] == pair.sum()
            assert gene in sentence.genes
            # the summed count outranks every gene whose count lies between one copy and the sum
            position = sentence.genes.index(gene)
            assert (values[:position] >= pair.sum()).all() and (values[position + 1 :] <= pair.sum()).all()
    assert both_expressed >= 40


def test_type_markers_lead_each_sentence(atlas, markers):
    assert sorted(markers) == ATLAS_LABELS
    assert all(40 <= len(genes) <= 50 for genes in markers.values())
    assert {"VWF", "PTPRB"} <= set(markers["Endothelial"])
    assert {"NPPA", "MYL7", "MYL4"} <= set(markers["Atrial Cardiomyocyte"]) - set(markers["Ventricular Cardiomyocyte"])
    sentences = cell_sentences(atlas, top_k=200, symbol_column="gene_name-new", label_column="cell_type")
    assert all(len(s.genes) == 200 for s in sentences)  # every cell expresses more than 200 genes
    for sentence in sentences:
        own = set(markers[sentence.label])
        head = sentence.genes[:10]
        assert sum(g in own for g in head) >= 7, (sentence.label, head)
        assert np.mean([g in own for g in sentence.genes[: len(own)]]) >= 0.5


def test_type_markers_give_the_mapped_top_term(atlas, markers):
    # the book's enrichment check on a cell's top genes finds the label-map term of its own type
    from c2srepro.biology.casestudy import label_marker_terms
    from c2srepro.enrichment import enrich, load_library

    library = load_library("cellconsensus_L2")
    sentences = cell_sentences(atlas, top_k=64, symbol_column="gene_name-new", label_column="cell_type")
    table = enrich({s.cell_index: list(s.genes) for s in sentences}, library, with_genes=False)
    top = table.sort_values("Combined Score", ascending=False).groupby("query")["Term"].first()
    hits = [
        top[s.cell_index] in label_marker_terms("heart_cell_atlas_v2", s.label, "cellconsensus_L2", strict=True)
        for s in sentences
    ]
    assert np.mean(hits) >= 0.9


def test_atlas_is_deterministic_in_the_seed(atlas_path, smoke_cache, monkeypatch):
    monkeypatch.setenv("C2SREPRO_CACHE", str(smoke_cache))
    assert smoke.smoke_atlas_path(n_cells_per_type=4, seed=0) == atlas_path  # reused from the cache
    first = read_cells(atlas_path, backed=False)
    again = smoke.build_smoke_atlas(n_cells_per_type=4, seed=0)
    other = smoke.build_smoke_atlas(n_cells_per_type=4, seed=1)
    assert (first.X != again.X).nnz == 0
    pd.testing.assert_frame_equal(first.obs, again.obs)
    assert first.var_names.equals(again.var_names)
    assert first.var["gene_name-new"].astype(object).equals(again.var["gene_name-new"].astype(object))
    assert (first.X != other.X).nnz > 0 and list(first.obs_names) != list(other.obs_names)


def test_atlas_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_cells_per_type must be an integer >= 1"):
        smoke.smoke_atlas_path(n_cells_per_type=0)


def test_config_is_pythia_410m():
    config = smoke.pythia_410m_config()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (24, 1024, 16)
    assert config.intermediate_size == 4096 and config.hidden_act == "gelu"
    assert config.use_parallel_residual and not config.tie_word_embeddings
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.rope_parameters["rope_theta"] == 10_000
    assert config.vocab_size == 50_304 and config.max_position_embeddings == 2048
    with pytest.raises(ValueError, match="multiple of n_heads"):
        smoke.pythia_410m_config(hidden=100, n_heads=16)


def test_small_model_round_trip(tmp_path):
    directory = smoke.smoke_model_dir(n_layers=2, hidden=64, n_heads=4, directory=tmp_path / "model", seed=3)
    assert json.loads((directory / "smoke.json").read_text())["seed"] == 3
    model, tokenizer = load_c2s_model(directory)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 256)
    assert config.use_parallel_residual and config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.vocab_size == 50_304 and model.dtype == torch.float32
    # the tokenizer came from the directory's own files: the real Pythia BPE without the PII tokens
    assert tokenizer.vocab_map is None and tokenizer.vocab_size == 50_277
    ids, _ = tokenizer.encode("Cell sentence: VWF PTPRB MT-ND4.")
    assert tokenizer.tokens(ids)[3:8] == ["ĠV", "WF", "ĠPT", "PR", "B"]
    # same seed, same weights; and the saved weights are what the seed builds
    again = smoke.smoke_model_dir(n_layers=2, hidden=64, n_heads=4, directory=tmp_path / "again", seed=3)
    other, _ = load_c2s_model(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    # reuse: an existing smoke directory is returned as is
    mtime = (directory / "model.safetensors").stat().st_mtime_ns
    assert smoke.smoke_model_dir(n_layers=2, hidden=64, n_heads=4, directory=directory, seed=3) == directory
    assert (directory / "model.safetensors").stat().st_mtime_ns == mtime
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 50_304) and torch.isfinite(logits).all()


def test_model_dir_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a smoke model directory"):
        smoke.smoke_model_dir(n_layers=1, hidden=64, n_heads=4, directory=tmp_path)


@pytest.mark.slow
def test_pythia_410m_directory_runs_a_64_gene_prompt(atlas, tmp_path, monkeypatch):
    from c2srepro.data.prompts import encode_prompts

    monkeypatch.setenv("C2SREPRO_CACHE", str(tmp_path))
    directory = smoke.smoke_model_dir()
    assert directory.name == f"{smoke.SMOKE_MODEL}-seed0"
    model, tokenizer = load_c2s_model(directory)
    n_params = sum(p.numel() for p in model.parameters())
    assert 400e6 < n_params < 410e6  # Pythia-410m: 405,334,016 with untied embeddings
    cell = int((atlas.obs["cell_type"] == "Endothelial").to_numpy().argmax())
    sentence = cell_sentences(atlas, top_k=64, symbol_column="gene_name-new", label_column="cell_type", cells=[cell])
    prompt = encode_prompts(sentence, tokenizer)
    input_ids = torch.tensor(prompt.input_ids)
    assert 200 < input_ids.shape[1] < 400
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], 50_304) and torch.isfinite(logits).all()
