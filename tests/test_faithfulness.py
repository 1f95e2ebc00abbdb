import json

import numpy as np
import pandas as pd
import pytest
import torch
from _tiny_neox import GENES, TOKENS, sentence_replacement, tiny_transcoders
from scipy.stats import spearmanr

from c2srepro.attribution import build_graph, gene_view
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.biology.faithfulness import (
    PREDICTORS,
    agreement,
    cell_faithfulness,
    direct_logit_attribution,
    faithfulness_cells,
    faithfulness_numbers,
    faithfulness_table,
    graph_target,
    json_ready,
    median_by_type,
    predictor_summary,
    removal_estimate,
    target_correlations,
    target_table,
)
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
LABELS = ["CD14+ Monocyte", "CD16+ Monocyte", "CD56+ NK"]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    from _tiny_neox import tiny_model

    from c2srepro.attribution import ReplacementModel
    from c2srepro.attribution.targets import teacher_forced
    from c2srepro.data.prompts import answer_text

    texts = [build_prompt(c, with_answer=True).text for c in CELLS] + [answer_text(label) for label in LABELS]
    cell_tokenizer = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    model = tiny_model(vocab_size=cell_tokenizer.vocab_size, max_positions=128)
    prompt = encode_prompts([CELLS[0]], cell_tokenizer).input_ids[0]
    ids = teacher_forced(prompt, cell_tokenizer.encode(answer_text(LABELS[0]))[0])
    return ReplacementModel(model, tiny_transcoders(model, torch.tensor(ids), firing=0.2), cell_tokenizer)


def _stated(cell, num_genes):
    return build_prompt(cell).text.replace(" ".join(cell.genes), "{cell_sentence}").replace(
        f"list of {len(cell.genes)} gene", f"list of {num_genes} gene")


def _prefix_tree_log_p(replacement, sentences, label, num_genes):
    """log p(label among LABELS) through the candidates' prefix tree, from whole logits, one sentence at a time."""
    answers = {c: replacement.answer_ids(c) for c in LABELS}
    mine = answers[label]
    out = []
    for sentence in sentences:
        prompt = encode_prompts([sentence], replacement.tokenizer, template=_stated(CELLS[0], num_genes)).input_ids[0]
        with torch.no_grad():
            logits = replacement.model(input_ids=torch.tensor([[*prompt, *mine[:-1]]])).logits[0, len(prompt) - 1:]
        total = 0.0
        for j, token in enumerate(mine):
            pool = sorted({a[j] for a in answers.values() if len(a) > j and a[:j] == mine[:j]})
            if len(pool) > 1:
                total += float(torch.log_softmax(logits[j, pool].double(), -1)[pool.index(token)])
        out.append(total)
    return np.array(out)


def test_cell_faithfulness_observes_the_quantity_its_graph_explains(tiny):
    from c2srepro.biology.benchmark import ORACLE
    from c2srepro.biology.perturb import knock_out
    from c2srepro.models.predict import score_labels

    cell, label = CELLS[0], "CD14+ Monocyte"
    expression = {g: 5.0 - i for i, g in enumerate(cell.genes)}
    result = cell_faithfulness(tiny, cell, label, LABELS, expression=expression, max_feature_nodes=None, k_max=3,
                               k=5, depth=2, absent=["NKG7", "GNLY", "CST7"])
    genes = result.genes
    assert result.target == "label_vs_candidates"
    assert list(genes["gene"]) == list(cell.genes) and list(genes["sentence_rank"]) == [1, 2, 3, 4, 5]
    removed = [cell, *(knock_out(cell, [g]) for g in cell.genes)]
    # the label among the candidates, computed here from whole logits through the prefix tree
    tree = _prefix_tree_log_p(tiny, removed, label, 5)
    np.testing.assert_allclose(genes["observed_label_vs_candidates"], tree[0] - tree[1:], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(genes["observed"], genes["observed_label_vs_candidates"])
    # log p(answer): the model's own label scoring, every prompt stating the cell's 5 genes
    scored = score_labels(tiny.model, tiny.tokenizer, removed, LABELS, template=_stated(cell, 5))[:, 0]
    np.testing.assert_allclose(genes["observed_label"], scored[0] - scored[1:], rtol=1e-9, atol=1e-12)
    # the graph's target value is the unperturbed readout the benchmark measures
    assert float(result.graph.nodes["value"].iloc[result.graph.targets[0]]) == pytest.approx(tree[0], rel=1e-9)
    assert result.benchmark.value == pytest.approx(tree[0], rel=1e-12)
    np.testing.assert_allclose(result.benchmark.observed.to_numpy(), genes["observed"].to_numpy())
    influence = gene_view(result.graph).genes.set_index("gene")["influence"]
    np.testing.assert_allclose(genes["influence"], influence[list(cell.genes)])
    assert list(genes["expression"]) == [5.0, 4.0, 3.0, 2.0, 1.0]
    assert set(genes["circuit"]) <= {0.0, 1.0}

    summary = result.summary(top_n=3)
    for name in PREDICTORS:
        rho, overlap = agreement(genes[name], genes["observed"], top_n=3)
        assert summary[f"top3_{name}"] == overlap
        assert summary[f"rho_abs_{name}"] == pytest.approx(rho, nan_ok=True)
        signed = spearmanr(genes[name], genes["observed"]).statistic
        assert summary[f"rho_signed_{name}"] == pytest.approx(signed, nan_ok=True)
    assert summary["rho_abs_rank"] == pytest.approx(summary["rho_abs_expression"])  # expression falls with rank here
    again = cell_faithfulness(tiny, cell, label, LABELS, expression=expression, max_feature_nodes=None, k_max=3,
                              k=5, depth=2, absent=["NKG7", "GNLY", "CST7"])
    pd.testing.assert_frame_equal(again.genes, genes)  # seeded: the random predictor too

    table = faithfulness_table([result, again])
    assert table.loc[0, "type"] == "CD14+ Monocyte" and {"rho_signed_linear", "rho_abs_influence"} <= set(table)
    medians = median_by_type(table)
    assert list(medians["type"]) == ["CD14+ Monocyte", "all"]
    summary = predictor_summary([result, again], n_boot=200)
    assert ORACLE in summary.index and {"median_rho_signed", "naopc_deletion_low", "precision_at_k"} <= set(summary)
    assert summary.loc[ORACLE, "precision_at_k"] == 1.0
    assert summary.loc["linear", "median_rho_signed"] == pytest.approx(table["rho_signed_linear"].median())

    numbers = faithfulness_numbers([result, again], n_boot=200)
    json.dumps(numbers, allow_nan=False)  # strict JSON: a NaN is written as null
    assert numbers["target"] == "label_vs_candidates" and numbers["n_cells"] == 2 and numbers["n_removals"] == 10
    assert numbers["median_rho"]["influence"] == pytest.approx(table["rho_abs_influence"].median(), nan_ok=True)
    assert numbers["predictors"]["linear"]["naopc"]["mean"] == pytest.approx(summary.loc["linear", "naopc_deletion"])
    assert set(numbers["predictors"]["oracle"]["precision_at_10"]) == {"mean", "low", "high"}
    assert json_ready({"a": [np.float64("nan"), np.int64(3)], "b": float("inf")}) == {"a": [None, 3], "b": None}

    with pytest.raises(ValueError, match="max_genes must be >= 3"):
        cell_faithfulness(tiny, cell, label, LABELS, max_genes=2)
    with pytest.raises(ValueError, match="predicted_label 'B' is not among the candidates"):
        cell_faithfulness(tiny, cell, "B", LABELS)
    with pytest.raises(ValueError, match="target must be one of"):
        cell_faithfulness(tiny, cell, label, LABELS, target="logit")
    with pytest.raises(ValueError, match="no cells"):
        faithfulness_table([])


def test_first_token_target_observes_the_demeaned_logit_and_max_genes_limits_removals(tiny):
    cell, label = CELLS[0], "CD14+ Monocyte"
    result = cell_faithfulness(tiny, cell, label, LABELS, target="first_token", max_genes=3, k_max=2, k=5, depth=2)
    assert list(result.genes["gene"]) == list(cell.genes[:3])
    np.testing.assert_allclose(result.genes["observed"], result.genes["observed_first_token"])
    prompt = encode_prompts([cell], tiny.tokenizer).input_ids[0]
    with torch.no_grad():
        last = tiny.model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
    first = tiny.answer_ids(label)[0]
    assert result.benchmark.value == pytest.approx(float(last[first] - last.mean()), rel=1e-9)
    assert float(result.graph.nodes["value"].iloc[result.graph.targets[0]]) == pytest.approx(result.benchmark.value,
                                                                                          rel=1e-6)


def test_graph_target_names_each_target(tiny):
    from c2srepro.attribution import FeatureTarget, LabelTarget, LogitTarget

    cell, label = CELLS[0], "CD14+ Monocyte"
    assert graph_target("label", tiny, cell, label, LABELS) == LabelTarget(label)
    assert graph_target("label_vs_candidates", tiny, cell, label, LABELS) == LabelTarget(label, candidates=LABELS)
    assert graph_target("first_token", tiny, cell, label, LABELS) == LogitTarget(tiny.answer_ids(label)[0])
    feature = graph_target("feature", tiny, cell, label, LABELS)
    rep = tiny.linearise(cell)
    assert isinstance(feature, FeatureTarget) and feature.layer == rep.n_layers - 1
    assert feature.feature == rep.top_features(rep.n_layers - 1, rep.n_pos - 1, 1)[0][0]
    with pytest.raises(ValueError, match="target must be one of"):
        graph_target("token", tiny, cell, label, LABELS)


def test_target_correlations_and_the_per_target_table(tiny):
    cell, label = CELLS[0], "CD14+ Monocyte"
    result = cell_faithfulness(tiny, cell, label, LABELS, k_max=2, k=5, depth=2)
    rows = target_correlations(tiny, result, LABELS, ["first_token", "label"], max_feature_nodes=None)
    own = rows[(rows["target"] == "label_vs_candidates") & (rows["predictor"] == "linear")]
    assert list(own["observed"]) == ["label_vs_candidates"]
    assert own["rho_signed"].iloc[0] == pytest.approx(result.summary()["rho_signed_linear"])
    first = rows[(rows["target"] == "first_token") & (rows["predictor"] == "influence")]
    assert list(first["observed"]) == ["first_token", "label_vs_candidates"]

    fake = pd.DataFrame({
        "cell": ["a", "b", "c", "a", "b", "c"], "target": ["label"] * 3 + ["first_token"] * 3,
        "observed": ["label"] * 3 + ["first_token"] * 3, "predictor": ["linear"] * 6,
        "rho_signed": [0.1, 0.5, 0.9, -0.2, np.nan, 0.0], "rho_abs": [0.2, 0.4, 0.3, 0.1, np.nan, 0.3]})
    table = target_table(fake)
    assert list(table["target"]) == ["label", "first_token"]
    assert list(table["cells"]) == [3, 2]
    np.testing.assert_allclose(table["median_rho_signed"], [0.5, -0.1])
    np.testing.assert_allclose(table["median_rho_abs"], [0.3, 0.2])
    with pytest.raises(ValueError, match="target_correlations"):
        target_table(fake.drop(columns="rho_abs"))


def test_faithfulness_cells_round_robin_over_types():
    cells = [CellSentence(i, str(i), ("A", "B", "C"), label) for i, label in enumerate("xxxxyyz")]
    predicted = list("xxxxyyq")  # the z cell is misclassified
    assert faithfulness_cells(cells, predicted, n_cells=3) == [0, 1, 4]
    assert faithfulness_cells(cells, predicted, n_cells=10) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="classifies none of the cells correctly"):
        faithfulness_cells(cells, ["q"] * 7, n_cells=3)
