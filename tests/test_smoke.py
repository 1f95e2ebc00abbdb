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


# --------------------------------------------------------------------------- the random Gemma-2

GEMMA2_2B_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "rms_norm_eps",
    "hidden_activation", "rope_parameters", "tie_word_embeddings", "max_position_embeddings", "attention_bias",
)
SMALL_GEMMA2 = {"n_layers": 2, "hidden": 64, "intermediate": 128, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}


def test_gemma2_config_is_gemma2_2b_but_for_depth_and_vocabulary():
    from transformers import Gemma2Config

    reference = Gemma2Config()  # transformers' defaults are the Gemma-2-2B config
    assert reference.num_hidden_layers == 26 and reference.hidden_size == 2304  # (that they still are)
    full = smoke.gemma2_2b_config()
    for name in GEMMA2_2B_FIELDS + ("num_hidden_layers", "layer_types"):
        assert getattr(full, name) == getattr(reference, name), name
    assert (full.vocab_size, reference.vocab_size) == (50_304, 256_000)
    assert (full.bos_token_id, full.eos_token_id, full.pad_token_id) == (0, 0, 1)  # the Pythia BPE's ids
    architecture = smoke.SMOKE_ARCHITECTURES[smoke.SMOKE_GEMMA2_MODEL]
    shallow = architecture.config(**architecture.shape)
    for name in GEMMA2_2B_FIELDS:
        assert getattr(shallow, name) == getattr(reference, name), name
    assert shallow.num_hidden_layers == 2 and shallow.layer_types == ["sliding_attention", "full_attention"]
    assert architecture.stands_in_for == "vandijklab/C2S-Scale-Gemma-2-2B"


def test_gemma2_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        smoke.gemma2_2b_config(n_heads=6)
    with pytest.raises(ValueError, match=r"head_dim \(15\) must be even"):
        smoke.gemma2_2b_config(head_dim=15)
    with pytest.raises(ValueError, match="n_layers must be a positive integer, got 0"):
        smoke.gemma2_2b_config(n_layers=0)


def test_small_gemma2_round_trip(tmp_path):
    from c2srepro.models.hooked import HookedModel

    directory = smoke.smoke_model_dir(smoke.SMOKE_GEMMA2_MODEL, directory=tmp_path / "model", seed=3, **SMALL_GEMMA2)
    meta = json.loads((directory / "smoke.json").read_text())
    assert meta["seed"] == 3 and "C2S-Scale-Gemma-2-2B" in meta["description"] and "Pythia BPE" in meta["description"]
    model, tokenizer = load_c2s_model(directory)
    config = model.config
    assert type(model).__name__ == "Gemma2ForCausalLM" and config.model_type == "gemma2"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (2, 64, 128)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.final_logit_softcapping == 30.0 and config.attn_logit_softcapping == 50.0
    assert config.vocab_size == 50_304 and tokenizer.vocab_size == 50_277 and tokenizer.vocab_map is None
    ids, _ = tokenizer.encode("Cell sentence: VWF PTPRB MT-ND4.")
    assert tokenizer.tokens(ids)[3:8] == ["ĠV", "WF", "ĠPT", "PR", "B"]
    again = smoke.smoke_model_dir(smoke.SMOKE_GEMMA2_MODEL, directory=tmp_path / "again", seed=3, **SMALL_GEMMA2)
    other, _ = load_c2s_model(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    # the library's hooked forward (the Gemma-2 adapter) reproduces transformers' logits, soft-capped at 30
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
        hooked = HookedModel(model).forward(torch.tensor([ids]))
    assert logits.shape == (1, len(ids), 50_304) and float(logits.abs().max()) < 30
    torch.testing.assert_close(hooked, logits)


def test_smoke_model_dir_refuses_unknown_names_and_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"no smoke model named 'smoke-llama'; the smoke models are "
                                         r"\['smoke-gemma2-2b', 'smoke-pythia-410m'\]"):
        smoke.smoke_model_dir("smoke-llama", directory=tmp_path)
    with pytest.raises(ValueError, match=r"smoke-pythia-410m has no shape keyword \['n_kv_heads'\]; its shape "
                                         r"keywords are \['hidden', 'n_heads', 'n_layers'\]"):
        smoke.smoke_model_dir(n_kv_heads=2, directory=tmp_path)


def test_the_book_resolves_both_smoke_models(monkeypatch, tmp_path):
    from c2srepro.book import sources

    calls = []
    monkeypatch.setattr(sources, "smoke_model_dir", lambda name: calls.append(name) or tmp_path / name)
    assert sources.resolve_model_source("smoke-gemma2-2b") == tmp_path / "smoke-gemma2-2b"
    assert sources.resolve_model_source("smoke-pythia-410m") == tmp_path / "smoke-pythia-410m"
    assert sources.resolve_model_source("vandijklab/C2S-Scale-Gemma-2-2B") == "vandijklab/C2S-Scale-Gemma-2-2B"
    assert calls == ["smoke-gemma2-2b", "smoke-pythia-410m"]


@pytest.mark.slow
def test_gemma2_smoke_directory_has_the_2b_layer_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("C2SREPRO_CACHE", str(tmp_path))
    directory = smoke.smoke_model_dir(smoke.SMOKE_GEMMA2_MODEL)
    assert directory.name == f"{smoke.SMOKE_GEMMA2_MODEL}-seed0"
    model, _ = load_c2s_model(directory)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.q_proj.weight.shape == (8 * 256, 2304) and attention.k_proj.weight.shape == (4 * 256, 2304)
    assert attention.o_proj.weight.shape == (2304, 8 * 256) and mlp.gate_proj.weight.shape == (9216, 2304)
    per_layer = 2304 * 256 * (8 + 4 + 4 + 8) + 3 * 2304 * 9216 + 4 * 2304  # attention, GeGLU, four RMS gains
    n_params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert n_params == 50_304 * 2304 + 2 * per_layer + 2304
