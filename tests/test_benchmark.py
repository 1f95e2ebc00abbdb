"""The faithfulness benchmark's curves, NAOPC, precision@k, intervals and controls, on toy targets with known effects."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_c2s
from scipy.stats import bootstrap

from c2srepro.biology.benchmark import (
    ANTI_ORACLE,
    ORACLE,
    answer_scores,
    aopc,
    benchmark_cell,
    bootstrap_interval,
    gradient_x_input,
    keep_only,
    normalised,
    ordering,
    pooled_curves,
    pooled_scores,
    precision_at_k,
    replace_with_absent,
    scores_table,
    shift_to_end,
    sign_agreement,
)
from c2srepro.biology.perturb import knock_out
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import answer_text, build_prompt, encode_prompts
from c2srepro.models.predict import score_labels

GENES = ("CD14", "LYZ", "FCN1", "S100A8", "NKG7", "GNLY")


def toy_cell(genes=GENES, index=0, label="CD14+ Monocyte"):
    return CellSentence(cell_index=index, cell_id=f"cell{index}", genes=tuple(genes), label=label)


def additive(weights, *, rank_decay=0.0, calls=None):
    """Target = sum of weight(gene) * (1 - rank_decay * place): identity effects, plus a rank effect when rank_decay > 0."""
    def measure(sentences):
        if calls is not None:
            calls.append(len(sentences))
        return [sum(weights.get(g, 0.0) * (1 - rank_decay * i) for i, g in enumerate(s.genes)) for s in sentences]

    return measure


def random_weights(seed, genes=GENES):
    rng = np.random.default_rng(seed)
    return dict(zip(genes, rng.normal(size=len(genes))))


def brute_force_deletion(weights, genes, order, k_max):
    full = sum(weights[g] for g in genes)
    return [full - sum(weights[g] for g in genes if g not in order[:k]) for k in range(1, k_max + 1)]


def test_ordering_is_descending_and_ties_keep_sentence_order():
    scores = pd.Series({"A": 1.0, "B": 3.0, "C": 1.0, "D": 3.0, "E": -2.0})
    assert ordering(scores, ["A", "B", "C", "D", "E"]) == ["B", "D", "A", "C", "E"]
    assert ordering(scores, ["C", "A", "E", "D", "B"]) == ["D", "B", "C", "A", "E"]


def test_ordering_refuses_missing_and_nan_scores():
    with pytest.raises(ValueError, match="no value for \\['B'\\]"):
        ordering(pd.Series({"A": 1.0}), ["A", "B"])
    with pytest.raises(ValueError, match="NaN for \\['A'\\]"):
        ordering(pd.Series({"A": np.nan, "B": 1.0}), ["A", "B"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deletion_and_insertion_curves_match_brute_force_on_an_additive_target(seed):
    weights = random_weights(seed)
    cell = toy_cell()
    rng = np.random.default_rng(100 + seed)
    predictors = pd.DataFrame({"noisy": [weights[g] + rng.normal(scale=0.5) for g in GENES],
                               "rank": [1 / (i + 1) for i in range(len(GENES))]}, index=list(GENES))
    result = benchmark_cell(cell, predictors, additive(weights), k_max=4, signed=["noisy"])
    # an additive target's single-gene effects are the weights themselves
    np.testing.assert_allclose(result.observed.to_numpy(), [weights[g] for g in GENES], rtol=0, atol=1e-12)
    for name in ("noisy", "rank", ORACLE):
        order = ordering(predictors[name] if name != ORACLE else result.observed, list(GENES))
        np.testing.assert_allclose(result.deletion.loc[name].to_numpy(), brute_force_deletion(weights, GENES, order, 4),
                                   rtol=0, atol=1e-12)
        inserted = [sum(weights[g] for g in order[:k]) for k in range(1, 5)]
        np.testing.assert_allclose(result.insertion.loc[name].to_numpy(), inserted, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [3, 4])
def test_oracle_bounds_every_ordering_on_an_additive_target(seed):
    """The oracle's deletion AOPC is the largest of all 720 orderings, the anti-oracle's the smallest."""
    weights = random_weights(seed)
    cell = toy_cell()
    all_aopcs = [aopc(brute_force_deletion(weights, GENES, list(p), 5)) for p in itertools.permutations(GENES)]
    result = benchmark_cell(cell, pd.DataFrame({"rank": np.arange(6.0)[::-1]}, index=list(GENES)), additive(weights),
                            k_max=5)
    assert result.scores.loc[ORACLE, "aopc_deletion"] == pytest.approx(max(all_aopcs), abs=1e-12)
    assert result.scores.loc[ANTI_ORACLE, "aopc_deletion"] == pytest.approx(min(all_aopcs), abs=1e-12)
    assert result.scores.loc[ORACLE, "naopc_deletion"] == 1.0 and result.scores.loc[ANTI_ORACLE, "naopc_deletion"] == 0.0
    expected = (result.scores.loc["rank", "aopc_deletion"] - min(all_aopcs)) / (max(all_aopcs) - min(all_aopcs))
    assert result.scores.loc["rank", "naopc_deletion"] == pytest.approx(expected, abs=1e-12)


def test_measure_is_called_twice_per_cell():
    calls = []
    benchmark_cell(toy_cell(), pd.DataFrame({"rank": np.arange(6.0)}, index=list(GENES)), additive(random_weights(0), calls=calls),
                   k_max=3)
    assert len(calls) == 2 and calls[0] == 1 + len(GENES)


def test_normalised_is_nan_when_every_ordering_ties():
    assert normalised(pd.Series({"a": 2.0, "b": 2.0})).isna().all()
    np.testing.assert_allclose(normalised(pd.Series({"a": 1.0, "b": 3.0, "c": 2.0})).to_numpy(), [0.0, 1.0, 0.5])


def test_precision_at_k_and_sign_agreement():
    observed = pd.Series({"A": 3.0, "B": -5.0, "C": 1.0, "D": 0.0})
    predicted = pd.Series({"A": 2.0, "B": 1.0, "C": -1.0, "D": 0.5})
    # signed: the two genes that lower the target most are A and C; the predictor's top two are A and B
    assert precision_at_k(predicted, observed, 2, signed=True) == 0.5
    # unsigned: the two largest effects either way are B and A
    assert precision_at_k(predicted, observed, 2, signed=False) == 1.0
    assert precision_at_k(predicted, observed, 10, signed=True) == 1.0  # k is capped at the gene count
    # D's effect is zero and does not count; A agrees, B and C do not
    assert sign_agreement(predicted, observed) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        precision_at_k(predicted, observed, 0, signed=True)


def test_bootstrap_interval_is_seeded_and_agrees_with_scipy():
    values = np.random.default_rng(7).normal(loc=0.3, scale=1.0, size=200)
    mean, low, high = bootstrap_interval(values, n_boot=4000, seed=1)
    assert (mean, low, high) == bootstrap_interval(values, n_boot=4000, seed=1)
    assert (low, high) != bootstrap_interval(values, n_boot=4000, seed=2)[1:]
    reference = bootstrap((values,), np.mean, n_resamples=4000, method="percentile",
                          rng=np.random.default_rng(0)).confidence_interval
    # two Monte Carlo estimates of the same interval: they agree to a few hundredths of the sd of the mean (0.07)
    assert low == pytest.approx(reference.low, abs=0.015) and high == pytest.approx(reference.high, abs=0.015)
    assert bootstrap_interval([2.0, 2.0, np.nan]) == (2.0, 2.0, 2.0)
    assert np.isnan(bootstrap_interval([np.nan])[0])


def test_rank_shift_sentences():
    cell = toy_cell()
    assert shift_to_end(cell, ["LYZ", "CD14"]).genes == ("FCN1", "S100A8", "NKG7", "GNLY", "CD14", "LYZ")
    assert keep_only(cell, ["GNLY", "LYZ"]).genes == ("LYZ", "GNLY")
    pool = ["CD3E", "MS4A1", "CD14", "PPBP", "CD79A"]
    replaced = replace_with_absent(cell, ["LYZ", "NKG7"], pool, seed=0)
    assert replaced.genes[0] == "CD14" and replaced.genes[2:4] == ("FCN1", "S100A8") and replaced.genes[5] == "GNLY"
    new = {replaced.genes[1], replaced.genes[4]}
    assert len(new) == 2 and new <= {"CD3E", "MS4A1", "PPBP", "CD79A"}  # absent from the cell, distinct
    assert replace_with_absent(cell, ["LYZ", "NKG7"], pool, seed=0) == replaced
    with pytest.raises(ValueError, match="2 replacements needed but only 1"):
        replace_with_absent(cell, ["LYZ", "NKG7"], ["CD14", "CD3E"])
    with pytest.raises(ValueError, match="not in cell 'cell0'"):
        shift_to_end(cell, ["CD3E"])


def test_controls_tell_identity_from_rank_shift():
    cell = toy_cell()
    pool = ["CD3E", "MS4A1", "PPBP", "CD79A"]
    predictors = pd.DataFrame({"rank": np.arange(6.0)[::-1]}, index=list(GENES))
    # identity only: moving genes to the end costs nothing, replacing them by a weightless gene costs the removal
    identity = benchmark_cell(cell, predictors, additive(random_weights(5)), k_max=3, absent=pool).controls
    np.testing.assert_allclose(identity.loc["shift to end"].to_numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(identity.loc["replace with absent gene"].to_numpy(), identity.loc["remove"].to_numpy(),
                               atol=1e-12)
    # rank only (every gene, present or not, weighs the same): a replacement keeps every rank and costs nothing
    rank_only = additive({g: 1.0 for g in [*GENES, *pool]}, rank_decay=0.1)
    shifted = benchmark_cell(cell, predictors, rank_only, k_max=3, absent=pool).controls
    np.testing.assert_allclose(shifted.loc["replace with absent gene"].to_numpy(), 0.0, atol=1e-12)
    assert (shifted.loc["remove"] > 0).all()


def test_benchmark_cell_refuses_bad_input():
    predictors = pd.DataFrame({"rank": np.arange(6.0)}, index=list(GENES))
    measure = additive(random_weights(0))
    with pytest.raises(ValueError, match="at least 2"):
        benchmark_cell(toy_cell(["CD14"]), predictors.iloc[:1], measure)
    with pytest.raises(ValueError, match="'oracle' is computed here"):
        benchmark_cell(toy_cell(), predictors.rename(columns={"rank": "oracle"}), measure)
    with pytest.raises(ValueError, match="signed names \\['dla'\\]"):
        benchmark_cell(toy_cell(), predictors, measure, signed=["dla"])
    with pytest.raises(ValueError, match="k_max must be >= 1"):
        benchmark_cell(toy_cell(), predictors, measure, k_max=0)


def test_pooling_over_cells():
    cells = [toy_cell(index=i) for i in range(6)]
    results = [benchmark_cell(c, pd.DataFrame({"rank": np.arange(6.0)[::-1]}, index=list(GENES)),
                              additive(random_weights(10 + i)), k_max=3) for i, c in enumerate(cells)]
    pooled = pooled_scores(results, n_boot=500, seed=0)
    assert pooled.loc[ORACLE, ("naopc_deletion", "mean")] == 1.0
    assert pooled.loc[ORACLE, ("naopc_deletion", "low")] == 1.0
    ranks = [r.scores.loc["rank", "naopc_deletion"] for r in results]
    assert pooled.loc["rank", ("naopc_deletion", "mean")] == pytest.approx(np.mean(ranks))
    assert pooled.loc["rank", ("naopc_deletion", "low")] <= np.mean(ranks) <= pooled.loc["rank", ("naopc_deletion", "high")]
    curves = pooled_curves(results, curve="deletion", n_boot=500)
    assert set(curves["k"]) == {1, 2, 3} and len(curves) == 3 * 3
    table = scores_table(results)
    assert len(table) == 6 * 3 and set(table["cell_id"]) == {f"cell{i}" for i in range(6)}
    with pytest.raises(ValueError, match="curve must be"):
        pooled_curves(results, curve="area")


CELL = CellSentence(7, "c7", ("CD14", "LYZ", "S100A8", "VWF", "PTPRB"), "CD14+ Monocyte")
LABELS = ["CD14+ Monocyte", "CD16+ Monocyte", "CD56+ NK", "Dendritic"]


@pytest.fixture(scope="module")
def tiny64(tokenizer):
    return tiny_c2s(tokenizer, [CELL], LABELS, dtype=torch.float64)


def answer_of(cell_tokenizer, label):
    return cell_tokenizer.encode(answer_text(label))[0]


def prefix_competitors(answers, label):
    """The prefix tree's competitors, written out for the test: per position, the label's token and the other
    candidates' tokens after the same prefix."""
    mine = answers[label]
    return [[mine[j], *sorted({a[j] for name, a in answers.items() if name != label and len(a) > j
                                and a[:j] == mine[:j]} - {mine[j]})] for j in range(len(mine))]


def reference_target(model, cell_tokenizer, cell, answer, competitors, num_genes):
    """One sentence, whole logits, probabilities by exp and sum (not log_softmax)."""
    template = build_prompt(cell).text.replace(" ".join(cell.genes), "{cell_sentence}")
    template = template.replace(f"list of {len(cell.genes)} gene", f"list of {num_genes} gene")
    prompt = encode_prompts([cell], cell_tokenizer, template=template).input_ids[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[*prompt, *answer[:-1]]])).logits[0, len(prompt) - 1:].double()
    total = 0.0
    for j, (token, tokens) in enumerate(zip(answer, competitors)):
        pool = list(range(logits.shape[-1])) if not tokens else list(tokens)
        if len(pool) > 1:
            weights = torch.exp(logits[j, pool] - logits[j, pool].max())
            total += float(torch.log(weights[pool.index(token)] / weights.sum()))
    return total


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_answer_scores_equal_a_direct_computation(tiny64, batch_size):
    model, cell_tokenizer = tiny64
    answers = {label: answer_of(cell_tokenizer, label) for label in LABELS}
    sentences = [CELL, knock_out(CELL, ["LYZ"]), knock_out(CELL, ["VWF", "CD14"]), shift_to_end(CELL, ["CD14"])]
    for label in ("CD14+ Monocyte", "Dendritic"):
        tree = prefix_competitors(answers, label)
        for competitors in (tree, [[] for _ in tree]):
            ours = answer_scores(model, cell_tokenizer, sentences, answers[label], competitors, num_genes=5,
                                 batch_size=batch_size)
            expected = [reference_target(model, cell_tokenizer, s, answers[label], competitors, 5) for s in sentences]
            np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)


def test_answer_scores_of_the_whole_vocabulary_are_the_label_scores(tiny64):
    model, cell_tokenizer = tiny64
    answer = answer_of(cell_tokenizer, "CD56+ NK")
    sentences = [CELL, knock_out(CELL, ["LYZ"])]
    ours = answer_scores(model, cell_tokenizer, sentences, answer, [[] for _ in answer], num_genes=5)
    template = build_prompt(CELL).text.replace(" ".join(CELL.genes), "{cell_sentence}")  # states 5 genes
    reference = score_labels(model, cell_tokenizer, sentences, LABELS, template=template)[:, LABELS.index("CD56+ NK")]
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10)


def test_gradient_x_input_is_the_directional_derivative_of_each_genes_embeddings(tiny64):
    model, cell_tokenizer = tiny64
    answers = {label: answer_of(cell_tokenizer, label) for label in LABELS}
    answer, competitors = answers["CD14+ Monocyte"], prefix_competitors(answers, "CD14+ Monocyte")
    scores = gradient_x_input(model, cell_tokenizer, CELL, answer, competitors)
    assert list(scores.index) == list(CELL.genes)
    prompt = encode_prompts([CELL], cell_tokenizer)
    ids = torch.tensor([[*prompt.input_ids[0], *answer[:-1]]])
    embeddings = model.get_input_embeddings()(ids).detach()
    eps = 1e-5
    for gene in CELL.genes:
        mask = torch.zeros(ids.shape[1], 1, dtype=torch.float64)
        mask[[i for i, g in enumerate(prompt.gene_of_token[0]) if g == gene]] = 1.0

        def value(scale):
            with torch.no_grad():
                logits = model(inputs_embeds=embeddings * (1 + scale * mask), logits_to_keep=len(answer)).logits
            total = 0.0
            for j, tokens in enumerate(competitors):
                if len(tokens) > 1:
                    total += float(torch.log_softmax(logits[0, j, tokens], -1)[0])
            return total

        # d/ds f(E + s * E on the gene's tokens) at s = 0 is the gene's gradient x input
        derivative = (value(eps) - value(-eps)) / (2 * eps)
        assert scores[gene] == pytest.approx(derivative, rel=1e-6, abs=1e-8)


def test_answer_checks():
    with pytest.raises(ValueError, match="2 answer tokens but competitors for 1"):
        answer_scores(None, None, [CELL], [1, 2], [[]])
    with pytest.raises(ValueError, match="answer token 2 at position 1 is not among its competitors"):
        answer_scores(None, None, [CELL], [1, 2], [[], [3, 4]])


def test_benchmark_figures_draw_every_ordering():
    import matplotlib

    matplotlib.use("Agg")
    from c2srepro.biology.plots import plot_curves, plot_naopc_by_type, plot_predicted_vs_observed

    cells = [toy_cell(index=i, label=["a", "b"][i % 2]) for i in range(4)]
    predictors = pd.DataFrame({"rank": np.arange(6.0)[::-1], "noise": np.random.default_rng(0).normal(size=6)},
                              index=list(GENES))
    results = [benchmark_cell(c, predictors, additive(random_weights(20 + i)), k_max=3, signed=["noise"])
               for i, c in enumerate(cells)]
    ax = plot_curves(pooled_curves(results, n_boot=200), target="log p(label)")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rank", "noise", ORACLE, ANTI_ORACLE]
    assert all(len(line.get_xdata()) == 3 for line in ax.get_lines())
    ax = plot_naopc_by_type(scores_table(results))
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    genes = results[0].observed.rename("observed").rename_axis("gene").reset_index().assign(rank=predictors["rank"].to_numpy())
    ax = plot_predicted_vs_observed(genes, "rank", label="CD14+ Monocyte")
    assert "CD14+ Monocyte" in ax.get_xlabel() and len(ax.texts) == 5
    with pytest.raises(ValueError, match="pooled_curves"):
        plot_curves(pd.DataFrame({"k": [1]}))


@pytest.fixture(scope="module")
def tiny_replacement(tokenizer):
    from _tiny_neox import tiny_model, tiny_transcoders

    from c2srepro.attribution.replacement import ReplacementModel
    from c2srepro.attribution.targets import teacher_forced
    from c2srepro.data.tokenizer import CellTokenizer
    from c2srepro.models.mini_c2s import build_vocabulary

    texts = [build_prompt(CELL).text, "NKG7 GNLY CD3E", *(answer_text(label) for label in LABELS)]
    cell_tokenizer = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    model = tiny_model(vocab_size=cell_tokenizer.vocab_size, max_positions=128)
    prompt = cell_tokenizer.encode(build_prompt(CELL).text)[0]
    ids = teacher_forced(prompt, cell_tokenizer.encode(answer_text(LABELS[0]))[0])
    return ReplacementModel(model, tiny_transcoders(model, torch.tensor(ids), firing=0.1), cell_tokenizer)


def test_label_benchmark_reads_the_graphs_own_target(tiny_replacement):
    from c2srepro.attribution.targets import LabelTarget
    from c2srepro.biology.benchmark import label_benchmark

    target = LabelTarget(LABELS[0], candidates=LABELS)
    expression = {g: float(len(CELL.genes) - i) for i, g in enumerate(CELL.genes)}
    result, predictors, graph = label_benchmark(tiny_replacement, CELL, target, expression=expression,
                                                max_feature_nodes=16, k_max=3, absent=["NKG7", "GNLY", "CD3E"])
    assert list(predictors.index) == list(CELL.genes)
    assert set(predictors.columns) == {"influence", "linear", "gradient_x_input", "dla", "rank", "expression", "random"}
    assert (predictors["influence"] >= 0).all() and predictors["rank"].is_monotonic_decreasing
    # the graph explains the same number the benchmark measures on the real model
    assert float(graph.nodes["value"].iloc[graph.targets[0]]) == pytest.approx(result.value, rel=1e-9)
    answers = {label: tiny_replacement.answer_ids(label) for label in LABELS}
    direct = answer_scores(tiny_replacement.model, tiny_replacement.tokenizer,
                           [CELL, knock_out(CELL, ["LYZ"])], answers[LABELS[0]], target.competitors(answers), num_genes=5)
    assert result.observed["LYZ"] == pytest.approx(direct[0] - direct[1], rel=1e-9, abs=1e-12)
    assert set(result.scores.index) == {*predictors.columns, ORACLE, ANTI_ORACLE}
    assert list(result.controls.index) == ["remove", "shift to end", "replace with absent gene"]


def test_removable_subset_orders_and_removes_only_those_genes():
    weights = random_weights(5)
    cell = toy_cell()
    subset = ["LYZ", "S100A8", "GNLY"]
    calls = []
    predictors = pd.DataFrame({"noisy": [weights[g] + 0.1 for g in subset]}, index=subset)
    result = benchmark_cell(cell, predictors, additive(weights, calls=calls), k_max=5, removable=subset)
    assert calls[0] == 1 + len(subset) and list(result.observed.index) == subset
    # every removable gene may go at once: the rest of the sentence is still there
    assert list(result.deletion.columns) == [1, 2, 3]
    order = ordering(predictors["noisy"], subset)
    expected = [sum(weights[g] for g in order[:k]) for k in range(1, 4)]
    np.testing.assert_allclose(result.deletion.loc["noisy"].to_numpy(), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="removable genes \\['XIST'\\] are not in"):
        benchmark_cell(cell, predictors, additive(weights), removable=["LYZ", "XIST"])


def test_readouts_come_from_one_forward_pass_and_the_first_logit_is_demeaned(tiny64):
    from c2srepro.biology.benchmark import Readout, readout_gradient_x_input, readout_scores

    model, cell_tokenizer = tiny64
    answers = {label: answer_of(cell_tokenizer, label) for label in LABELS}
    answer = answers["CD56+ NK"]
    sentences = [CELL, knock_out(CELL, ["LYZ"]), shift_to_end(CELL, ["CD14"])]
    reads = {"tree": Readout(answer, prefix_competitors(answers, "CD56+ NK")), "vocab": Readout(answer),
             "first": Readout(answer, kind="first_logit")}
    frame = readout_scores(model, cell_tokenizer, sentences, reads, num_genes=5, batch_size=2)
    assert list(frame.columns) == ["tree", "vocab", "first"]
    np.testing.assert_allclose(frame["vocab"], answer_scores(model, cell_tokenizer, sentences, answer,
                                                             [[] for _ in answer], num_genes=5), rtol=1e-12)
    template = build_prompt(CELL).text.replace(" ".join(CELL.genes), "{cell_sentence}")
    for row, sentence in enumerate(sentences):
        prompt = encode_prompts([sentence], cell_tokenizer, template=template).input_ids[0]
        with torch.no_grad():
            last = model(input_ids=torch.tensor([prompt])).logits[0, -1].double()
        assert frame.loc[row, "first"] == pytest.approx(float(last[answer[0]] - last.mean()), rel=1e-9)
    # gradient x input of the first logit: the directional derivative along each gene's embeddings
    scores = readout_gradient_x_input(model, cell_tokenizer, CELL, reads["first"])
    prompt = encode_prompts([CELL], cell_tokenizer)
    ids = torch.tensor([[*prompt.input_ids[0], *answer[:-1]]])
    embeddings = model.get_input_embeddings()(ids).detach()
    mask = torch.zeros(ids.shape[1], 1, dtype=torch.float64)
    mask[[i for i, g in enumerate(prompt.gene_of_token[0]) if g == "LYZ"]] = 1.0
    with torch.no_grad():
        plus, minus = (reads["first"](model(inputs_embeds=embeddings * (1 + s * mask), logits_to_keep=len(answer)).logits)
                       for s in (1e-5, -1e-5))
    assert scores["LYZ"] == pytest.approx(float(plus - minus) / 2e-5, rel=1e-6)
    with pytest.raises(ValueError, match="different answers"):
        readout_scores(model, cell_tokenizer, sentences, {"a": Readout(answer), "b": Readout(answers["Dendritic"])})
    with pytest.raises(ValueError, match="kind must be one of"):
        Readout(answer, kind="logit")
