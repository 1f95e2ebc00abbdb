import numpy as np
import pandas as pd
import pytest
import torch
from _tiny_neox import GENES, TOKENS, sentence_replacement, tiny_transcoders
from scipy.stats import spearmanr
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.attribution import build_graph, gene_view
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.biology.faithfulness import (
    PREDICTORS,
    agreement,
    cell_faithfulness,
    direct_logit_attribution,
    faithfulness_cells,
    faithfulness_table,
    median_by_type,
    removal_estimate,
)
from c2srepro.biology.perturb import removal_effects
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import build_prompt, encode_prompts
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.models.mini_c2s import build_vocabulary


@pytest.fixture(scope="module")
def rep():
    return sentence_replacement()


@pytest.fixture(scope="module")
def target(rep):
    return rep.logit_node(rep.n_pos - 1, 5)


def _scaled_value(rep, target, gene, scale):
    embeddings = rep.weights.embed[rep.input_ids].clone()
    positions = [p for p, g in enumerate(GENES) if g == gene]
    embeddings[positions] *= scale
    return float(replacement_forward(rep, freeze=True, embeddings=embeddings).value(target))


def test_first_order_estimate_is_the_linear_models_derivative(rep, target):
    graph = build_graph(rep, target, genes=GENES, tokens=TOKENS)
    estimate = removal_estimate(graph)
    assert list(estimate.index) == ["VWF", "PTPRB", "KHDRBS1"]
    eps = 1e-6
    clean = _scaled_value(rep, target, "VWF", 1.0)
    for gene in estimate.index:
        # scaling a gene's embeddings by 1 - eps moves the target by eps times its removal estimate
        observed = (_scaled_value(rep, target, gene, 1.0 - eps) - clean) / eps
        assert observed == pytest.approx(estimate[gene], rel=1e-4, abs=1e-8)
    assert estimate.abs().max() > 1e-3  # the check above compares numbers that are not all zero


def test_capped_estimate_cuts_paths_through_uncomputed_features(rep, target):
    full = removal_estimate(build_graph(rep, target, genes=GENES))
    none = removal_estimate(build_graph(rep, target, genes=GENES, max_feature_nodes=0))
    direct = build_graph(rep, target, genes=GENES, max_feature_nodes=0)
    rows = direct.adjacency[direct.targets[0]]
    tokens = direct.indices("embedding")
    by_gene = pd.Series(rows[tokens].numpy(), index=[GENES[p] for p in direct.nodes.loc[tokens.numpy(), "position"]])
    np.testing.assert_allclose(none.to_numpy(), -by_gene.dropna().groupby(level=0).sum()[none.index].to_numpy())
    assert not np.allclose(full.to_numpy(), none.to_numpy())


def test_direct_logit_attribution_reads_embeddings_at_the_final_position(rep, target):
    dla = direct_logit_attribution(rep, target, GENES)
    w = rep.weights
    final = rep.run.lnf_scale[rep.n_pos - 1]
    reading = w.W_U[target.index] * w.lnf_weight
    reading = final * (reading - reading.mean())
    expected = {g: float(sum(w.embed[rep.input_ids[p]] @ reading for p, x in enumerate(GENES) if x == g))
                for g in dla.index}
    assert dla.to_dict() == pytest.approx(expected, rel=1e-9)


def test_agreement_is_scipys_spearman_and_top_overlap():
    rng = np.random.default_rng(0)
    predicted, observed = rng.normal(size=30), rng.normal(size=30)
    rho, overlap = agreement(predicted, observed, top_n=10)
    assert rho == pytest.approx(spearmanr(np.abs(predicted), np.abs(observed)).statistic)
    top_p = set(np.argsort(-np.abs(predicted))[:10])
    top_o = set(np.argsort(-np.abs(observed))[:10])
    assert overlap == len(top_p & top_o) / 10
    assert agreement(observed, observed)[0] == pytest.approx(1.0)
    assert np.isnan(agreement(np.ones(5), observed[:5])[0])
    with pytest.raises(ValueError, match="need at least 3 genes"):
        agreement([1, 2], [1, 2])
    with pytest.raises(ValueError, match="two 1-d arrays of one length"):
        agreement([1, 2, 3], [1, 2])


CELLS = [
    CellSentence(0, "a", ("CD14", "LYZ", "S100A8", "FCN1", "VWF"), "CD14+ Monocyte"),
    CellSentence(1, "b", ("NKG7", "GNLY", "CST7", "CD14", "LYZ"), "CD56+ NK"),
]
LABELS = ["CD14+ Monocyte", "CD56+ NK"]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    texts = [build_prompt(c, with_answer=True).text for c in CELLS]
    cell_tokenizer = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=cell_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128, rotary_pct=0.25,
                           use_parallel_residual=True, max_position_embeddings=128)
    model = GPTNeoXForCausalLM(config).eval()
    ids = torch.tensor(encode_prompts([CELLS[0]], cell_tokenizer).input_ids[0])
    return model, tiny_transcoders(model, ids, firing=0.2), cell_tokenizer


def test_cell_faithfulness_joins_graph_and_removal(tiny):
    model, transcoders, cell_tokenizer = tiny
    cell = CELLS[0]
    expression = {g: 5.0 - i for i, g in enumerate(cell.genes)}
    result = cell_faithfulness(model, transcoders, cell_tokenizer, cell, "CD14+ Monocyte", LABELS,
                               expression=expression, max_feature_nodes=None, k=5, depth=2)
    genes = result.genes
    assert list(genes["gene"]) == list(cell.genes) and list(genes["sentence_rank"]) == [1, 2, 3, 4, 5]
    effects = removal_effects(model, cell_tokenizer, cell, LABELS, label="CD14+ Monocyte")
    np.testing.assert_allclose(genes["observed"], -effects.delta, atol=1e-6)
    influence = gene_view(result.graph).genes.set_index("gene")["influence"]
    np.testing.assert_allclose(genes["influence"], influence[list(cell.genes)])
    assert list(genes["expression"]) == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert set(genes["circuit"]) <= {0.0, 1.0}
    summary = result.summary(top_n=3)
    for name in PREDICTORS:
        rho, overlap = agreement(genes[name], genes["observed"], top_n=3)
        assert summary[f"top3_{name}"] == overlap
        assert summary[f"rho_{name}"] == pytest.approx(rho, nan_ok=True)
    assert summary["rho_rank"] == pytest.approx(summary["rho_expression"])  # expression falls with rank here
    again = cell_faithfulness(model, transcoders, cell_tokenizer, cell, "CD14+ Monocyte", LABELS,
                              expression=expression, max_feature_nodes=None, k=5, depth=2)
    pd.testing.assert_frame_equal(again.genes, genes)  # seeded: the random predictor too

    table = faithfulness_table([result])
    assert table.loc[0, "type"] == "CD14+ Monocyte" and "rho_signed_linear" in table
    medians = median_by_type(table)
    assert list(medians["type"]) == ["CD14+ Monocyte", "all"]
    with pytest.raises(ValueError, match="max_genes must be >= 3"):
        cell_faithfulness(model, transcoders, cell_tokenizer, cell, "CD14+ Monocyte", LABELS, max_genes=2)
    with pytest.raises(ValueError, match="predicted_label 'B' is not among the candidates"):
        cell_faithfulness(model, transcoders, cell_tokenizer, cell, "B", LABELS)
    with pytest.raises(ValueError, match="no cells"):
        faithfulness_table([])


def test_faithfulness_cells_round_robin_over_types():
    cells = [CellSentence(i, str(i), ("A", "B", "C"), label) for i, label in enumerate("xxxxyyz")]
    predicted = list("xxxxyyq")  # the z cell is misclassified
    assert faithfulness_cells(cells, predicted, n_cells=3) == [0, 1, 4]
    assert faithfulness_cells(cells, predicted, n_cells=10) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="classifies none of the cells correctly"):
        faithfulness_cells(cells, ["q"] * 7, n_cells=3)
