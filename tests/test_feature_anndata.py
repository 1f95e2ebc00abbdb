"""feature_activations: cells x transcoder features as an AnnData, checked against a direct
forward pass (Hugging Face hidden states, no hooks) and run through scanpy."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from c2srepro.data.cells import cell_sentences
from c2srepro.data.prompts import encode_prompts
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.features import feature_activations, feature_activations_by_layer
from c2srepro.transcoder import Transcoder, TranscoderConfig
from tests._tc_models import VOCAB, small_model

GENES = ["CD14", "LYZ", "CD3E", "MS4A1", "NKG7", "GNLY", "FTL", "CD74", "S100A8", "CD79A", "IL7R", "CCL5"]
TYPES = {"monocyte": [0, 1, 6, 8], "T cell": [2, 10, 11, 7], "B cell": [3, 9, 7, 6]}
LAYER = 1


@pytest.fixture(scope="module")
def setup(tokenizer):
    rng = np.random.default_rng(0)
    labels = np.repeat(list(TYPES), 8)
    counts = rng.poisson(0.5, size=(len(labels), len(GENES))).astype(np.float32)
    for row, label in enumerate(labels):
        counts[row, TYPES[label]] += rng.poisson(6.0, size=4) + 1
    obs = pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[f"cell{i}" for i in range(len(labels))])
    import anndata as ad

    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))
    adata.obsm["X_umap"] = rng.normal(size=(len(labels), 2))
    adata.uns["cell_type_colors"] = ["#1f77b4", "#ff7f0e", "#2ca02c"]
    # a model vocabulary holding just the corpus' BPE ids, as the embedded mini-C2S does
    prompts = encode_prompts(cell_sentences(adata, top_k=6), tokenizer)
    bpe_ids = sorted({i for ids in prompts.input_ids for i in ids})
    assert len(bpe_ids) <= VOCAB
    cell_tokenizer = CellTokenizer(tokenizer.bpe, bpe_ids)
    model = small_model(n_layers=2).double()
    transcoder = Transcoder(TranscoderConfig(d_model=64, d_transcoder=128, layer=LAYER), seed=3).double()
    with torch.no_grad():
        transcoder.b_enc.copy_(-0.3 + 0.2 * torch.randn(transcoder.cfg.d_tc, generator=torch.Generator().manual_seed(4)))
    return adata, model, cell_tokenizer, transcoder


def _direct(adata, model, tokenizer, transcoder, *, positions):
    """Per cell its [pos, d_tc] activations from hidden_states + LN2 (parallel residual) and the
    counted positions, one prompt at a time."""
    prompts = encode_prompts(cell_sentences(adata, top_k=6), tokenizer)
    block = model.gpt_neox.layers[LAYER]
    out = []
    with torch.no_grad():
        for ids, genes in zip(prompts.input_ids, prompts.gene_of_token):
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER]
            z = transcoder.encode(block.post_attention_layernorm(hidden)[0]).numpy()
            counted = np.array([g is not None for g in genes]) if positions == "genes" else np.ones(len(ids), bool)
            out.append((z, counted, genes))
    return out


REDUCE = {
    "max": lambda z: z.max(axis=0),
    "mean": lambda z: z.mean(axis=0),
    "sum": lambda z: z.sum(axis=0),
    "last": lambda z: z[-1],
}


@pytest.mark.parametrize("positions", ["genes", "all"])
@pytest.mark.parametrize("reduce", list(REDUCE))
def test_values_equal_a_direct_forward_pass(setup, reduce, positions):
    adata, model, tokenizer, transcoder = setup
    result = feature_activations(
        adata, model, tokenizer, [transcoder], layer=LAYER, reduce=reduce, positions=positions, top_k=6,
        batch_size=5, n_top_genes=0, progress=False,
    )
    direct = _direct(adata, model, tokenizer, transcoder, positions=positions)
    expected = np.stack([REDUCE[reduce](z[counted]) for z, counted, _ in direct])
    assert result.shape == (adata.n_obs, transcoder.cfg.d_tc)
    np.testing.assert_allclose(result.X, expected, rtol=1e-5, atol=1e-6)
    assert (expected > 0).any() and not (expected > 0).all(), "the check needs features that fire and ones that do not"
    tokens = np.concatenate([z[counted] for z, counted, _ in direct])
    np.testing.assert_allclose(result.var["token_frequency"], (tokens > 0).mean(axis=0))
    np.testing.assert_allclose(result.var["cell_frequency"], (expected > 0).mean(axis=0))


def test_var_obs_uns_and_the_top_genes(setup, tmp_path):
    adata, model, tokenizer, transcoder = setup
    result = feature_activations(
        adata, model, tokenizer, {LAYER: transcoder}, layer=LAYER, top_k=6, min_occurrences=1, progress=False,
    )
    assert list(result.var_names[:3]) == ["L1F0", "L1F1", "L1F2"]
    assert result.var.loc["L1F5", "key"] == "L1/F5"
    pd.testing.assert_frame_equal(result.obs, adata.obs)
    np.testing.assert_array_equal(result.obsm["X_umap"], adata.obsm["X_umap"])
    assert result.uns["feature_activations"]["reduce"] == "max"
    assert result.uns["feature_activations"]["positions"] == "genes"

    # top gene of each feature, independently: the gene whose occurrences it fires on most often
    fired, seen = {}, {}
    for z, _, genes in _direct(adata, model, tokenizer, transcoder, positions="genes"):
        for gene in {g for g in genes if g is not None}:
            rows = [t for t, g in enumerate(genes) if g == gene]
            seen[gene] = seen.get(gene, 0) + 1
            fired[gene] = fired.get(gene, 0) + (z[rows] > 0).any(axis=0)
    frequency = pd.DataFrame({g: fired[g] / seen[g] for g in seen})  # [feature, gene]
    checked = 0
    for f in range(transcoder.cfg.d_tc):
        top = result.var["top_genes"].iloc[f].split()
        if frequency.loc[f].max() == 0:
            assert top == []
            continue
        assert top[0] in set(frequency.columns[frequency.loc[f] == frequency.loc[f].max()])
        assert len(top) == min(10, int((frequency.loc[f] > 0).sum()))
        checked += 1
    assert checked > 10

    path = tmp_path / "features.h5ad"
    result.write_h5ad(path)  # every var/uns entry is h5ad-writable
    import anndata as ad

    back = ad.read_h5ad(path)
    assert back.var["top_genes"].tolist() == result.var["top_genes"].tolist()
    np.testing.assert_array_equal(back.X, result.X)


def test_rank_genes_groups_ranks_features(setup):
    import scanpy as sc

    adata, model, tokenizer, transcoder = setup
    result = feature_activations(adata, model, tokenizer, transcoder, layer=LAYER, top_k=6, n_top_genes=0, progress=False)
    sc.tl.rank_genes_groups(result, groupby="cell_type", method="wilcoxon")
    names = pd.DataFrame(result.uns["rank_genes_groups"]["names"])
    assert set(names.columns) == set(TYPES)
    assert set(names.iloc[0]) <= set(result.var_names)
    # the top feature of each type is higher in that type's cells than elsewhere
    for label in TYPES:
        inside = (result.obs["cell_type"] == label).to_numpy()
        column = result[:, names[label].iloc[0]].X.ravel()
        assert column[inside].mean() > column[~inside].mean()


@pytest.mark.slow  # numba compiles pynndescent and umap on first use: ~30 s
def test_neighbors_umap_and_a_feature_umap_plot_run(setup):
    import scanpy as sc

    adata, model, tokenizer, transcoder = setup
    result = feature_activations(adata, model, tokenizer, transcoder, layer=LAYER, top_k=6, n_top_genes=0, progress=False)
    sc.pp.neighbors(result, n_neighbors=5, use_rep="X")
    sc.tl.umap(result, random_state=0)
    assert result.obsm["X_umap"].shape == (adata.n_obs, 2) and np.isfinite(result.obsm["X_umap"]).all()
    first = result.var_names[result.var["cell_frequency"].to_numpy() > 0][0]
    sc.pl.umap(result, color=[first, "cell_type"], show=False)


def test_every_layer_from_one_pass_equals_each_layer_alone(setup):
    adata, model, tokenizer, transcoder = setup
    other = Transcoder(TranscoderConfig(d_model=64, d_transcoder=96, layer=0), seed=5).double()
    with torch.no_grad():
        other.b_enc.copy_(-0.2 + 0.2 * torch.randn(other.cfg.d_tc, generator=torch.Generator().manual_seed(6)))
    transcoders = {0: other, LAYER: transcoder}
    forwards = []
    hook = model.gpt_neox.layers[0].register_forward_hook(lambda *_: forwards.append(1))
    try:
        both = feature_activations_by_layer(adata, model, tokenizer, transcoders, top_k=6, batch_size=5,
                                            min_occurrences=1, progress=False)
    finally:
        hook.remove()
    batches = -(-adata.n_obs // 5)
    assert len(forwards) == 2 * batches, "one pass for the activations and one for the top genes, each layer at once"
    assert sorted(both) == [0, LAYER]
    for layer, alone in ((layer, feature_activations(adata, model, tokenizer, transcoders, layer=layer, top_k=6,
                                                     batch_size=5, min_occurrences=1, progress=False))
                         for layer in transcoders):
        assert both[layer].shape == (adata.n_obs, transcoders[layer].cfg.d_tc)
        np.testing.assert_array_equal(both[layer].X, alone.X)
        pd.testing.assert_frame_equal(both[layer].var, alone.var)
        assert both[layer].uns["feature_activations"] == alone.uns["feature_activations"]
    only = feature_activations_by_layer(adata, model, tokenizer, transcoders, layers=[0], top_k=6, n_top_genes=0,
                                        progress=False)
    assert list(only) == [0]


def test_bad_arguments_are_named(setup):
    adata, model, tokenizer, transcoder = setup
    with pytest.raises(ValueError, match=r"no transcoder for layers \[0\]: pass one for each of layers \[0\]"):
        feature_activations(adata, model, tokenizer, [transcoder], layer=0, progress=False)
    with pytest.raises(ValueError, match=r"reduce must be one of \('max', 'mean', 'sum', 'last'\)"):
        feature_activations(adata, model, tokenizer, transcoder, layer=LAYER, reduce="median", progress=False)
    with pytest.raises(TypeError, match=r"encode_prompts: expected a CellTokenizer"):
        feature_activations(adata, model, tokenizer.bpe, transcoder, layer=LAYER, progress=False)
    with pytest.raises(TypeError, match=r"transcoders must be a \{layer: Transcoder\} dict or a list of Transcoders, got str; load them with"):
        feature_activations(adata, model, tokenizer, "transcoders/", layer=LAYER, progress=False)
    with pytest.raises(TypeError, match=r"feature_activations: expected an anndata\.AnnData"):
        feature_activations("cells.h5ad", model, tokenizer, transcoder, layer=LAYER, progress=False)
