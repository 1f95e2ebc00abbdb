"""Attribution targets: every target's graph row equals autograd of its scalar through the frozen
replacement (float64; GPT-NeoX parallel and sequential, Gemma-2), rows add up to the value, a label
target's value is the model's own answer log-probability, and bad targets get clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_gemma2 import tiny_gemma2
from _tiny_neox import tiny_model, tiny_transcoders

from c2srepro.attribution import build_replacement, replacement_forward
from c2srepro.attribution.full_graph import build_graph
from c2srepro.attribution.replacement import ReplacementModel
from c2srepro.attribution.targets import (
    ContrastTarget,
    DirectionTarget,
    FeatureTarget,
    LabelTarget,
    LogitTarget,
    teacher_forced,
)
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import answer_text, build_prompt
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.models.mini_c2s import build_vocabulary
from c2srepro.models.predict import score_labels

CELL = CellSentence(0, "a", ("CD14", "LYZ", "S100A8"), "CD14+ Monocyte")
LABELS = ["CD14+ Monocyte", "CD56+ NK", "CD19+ B", "Dendritic"]
LAYOUTS = ["neox", "gemma2"]  # parallel and sequential residual


@pytest.fixture(scope="module", params=LAYOUTS)
def setup(request, tokenizer):
    texts = [build_prompt(CELL, with_answer=True).text] + [answer_text(label) for label in LABELS]
    cells = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    if request.param == "gemma2":
        # The tiny Gemma-2's vocabulary is its own; the cell tokenizer's ids must fit inside it.
        model = tiny_gemma2()
        model.resize_token_embeddings(cells.vocab_size)
    else:
        model = tiny_model(vocab_size=cells.vocab_size, max_positions=128)
    model = model.to(torch.float64)
    prompt = cells.encode(build_prompt(CELL).text)[0]
    answers = {label: cells.encode(answer_text(label))[0] for label in LABELS}
    ids = teacher_forced(prompt, answers[LABELS[0]])
    transcoders = tiny_transcoders(model, torch.tensor(ids), firing=0.1)
    rep = build_replacement(model, transcoders, ids)
    return model, cells, prompt, answers, rep


def frozen_scalar(rep, target, prompt_length, answers):
    """Each target's scalar from its definition, as a function of the frozen replacement's output."""
    last = prompt_length - 1

    def final_norm(out):
        r = out.resid[-1]
        w = rep.weights
        if hasattr(w, "lnf_weight"):
            return (r - r.mean(-1, keepdim=True)) * rep.run.lnf_scale[:, None] * w.lnf_weight + w.lnf_bias
        return r * rep.run.final_scale[:, None] * w.final_gain

    def scalar(out):
        logits = out.logits
        if isinstance(target, FeatureTarget):
            return out.pre_activations[target.layer][target.position, target.feature]
        if isinstance(target, LogitTarget):
            row = logits[last if target.position is None else target.position]
            return row[target.token] - (row.mean() if target.demeaned else 0.0)
        if isinstance(target, DirectionTarget):
            return final_norm(out)[last] @ target.vector
        if isinstance(target, ContrastTarget):
            a, b = answers[target.label_a], answers[target.label_b]
            j = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
            return logits[last + j, a[j]] - logits[last + j, b[j]]
        answer = answers[target.label]
        total = logits.new_zeros(())
        for j, token in enumerate(answer):
            if target.candidates is None:
                total = total + torch.log_softmax(logits[last + j], -1)[token]
                continue
            # The prefix tree, written out: the candidates that agree with the label up to j.
            rivals = sorted({answers[c][j] for c in target.candidates
                             if len(answers[c]) > j and answers[c][:j] == answer[:j]} - {token})
            if rivals:
                total = total + torch.log_softmax(logits[last + j, [token, *rivals]], -1)[0]
        return total

    return scalar


def recorded_activations(rep):
    """The real run's feature activations as dense [pos, d_tc] tensors (re-encoding them from the
    frozen residual would differ by transformers' float32 norms on Gemma-2)."""
    acts = []
    for act, tc in zip(rep.active, rep.transcoders):
        z = rep.errors.new_zeros(rep.n_pos, tc.d_tc)
        z[act.position, act.feature] = act.activation
        acts.append(z)
    return acts


def autograd_row(rep, graph, scalar):
    """activation x d scalar / d source for every graph node, by autograd through the frozen replacement."""
    acts = [z.requires_grad_() for z in recorded_activations(rep)]
    emb = rep.weights.embed[rep.input_ids].clone().requires_grad_()
    err = rep.errors.clone().requires_grad_()
    value = scalar(replacement_forward(rep, feature_acts=acts, embeddings=emb, errors=err))
    emb_grad, err_grad, *act_grads = torch.autograd.grad(value, [emb, err, *acts], materialize_grads=True)
    row = torch.zeros(graph.n_nodes, dtype=torch.float64)
    for i, data in graph.nodes.iterrows():
        layer, position = int(data["layer"]), int(data["position"])
        if data["kind"] == "feature":
            row[i] = acts[layer][position, int(data["feature"])] * act_grads[layer][position, int(data["feature"])]
        elif data["kind"] == "error":
            row[i] = err[layer, position] @ err_grad[layer, position]
        elif data["kind"] == "embedding":
            row[i] = emb[position] @ emb_grad[position]
    return row, float(value.detach())


def all_targets(rep, prompt_length):
    last = prompt_length - 1
    layer = rep.n_layers - 1
    top = rep.top_features(layer, last, 1)[0][0]
    vector = torch.randn(rep.weights.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return [
        FeatureTarget(layer, last, top),
        LogitTarget(5, last),
        LogitTarget(5, last, demeaned=False),
        DirectionTarget(vector),
        LabelTarget(LABELS[0]),
        LabelTarget(LABELS[0], candidates=LABELS),
        ContrastTarget(LABELS[0], LABELS[1]),
    ]


def test_every_targets_row_is_autograd_of_its_scalar_and_adds_up(setup):
    _, _, prompt, answers, rep = setup
    n = len(prompt)
    for target in all_targets(rep, n):
        graph = build_graph(rep, target, prompt_length=n, answers=answers, max_feature_nodes=24)
        index = graph.targets[0]
        reference, value = autograd_row(rep, graph, frozen_scalar(rep, target, n, answers))
        # A label target is linearised at the real run's probabilities; transformers runs Gemma-2's
        # RMS norms in float32, so the float64 frozen replacement's own probabilities differ by ~1e-7.
        loose = isinstance(target, LabelTarget) and not hasattr(rep.weights, "lnf_weight")
        tolerance = dict(atol=1e-6, rtol=1e-5) if loose else dict(atol=1e-11, rtol=1e-9)
        torch.testing.assert_close(graph.adjacency[index], reference, **tolerance, msg=str(target))
        row = graph.nodes.iloc[index]
        assert graph.adjacency[index].sum().item() + row["constant"] + row["dropped"] == pytest.approx(
            row["value"], rel=1e-12, abs=1e-12)
        # The frozen replacement's scalar is the real run's value (error nodes make it exact).
        assert row["value"] == pytest.approx(value, rel=1e-6 if loose else 1e-9, abs=1e-10), str(target)
        assert graph.info["targets"][0]["kind"] == type(target).__name__
        assert graph.adjacency[index].abs().max() > 1e-6


def test_label_value_is_the_models_answer_log_probability(setup, tokenizer):
    model, cells, prompt, answers, rep = setup
    graph = build_graph(rep, LabelTarget(LABELS[0]), prompt_length=len(prompt), answers=answers, max_feature_nodes=0)
    own = score_labels(model, cells, [CELL], LABELS)[0]
    # score_labels continues from a key/value cache; Gemma-2's float32 norms then round differently.
    rel = 1e-9 if hasattr(rep.weights, "lnf_weight") else 1e-7
    assert graph.nodes["value"].iloc[graph.targets[0]] == pytest.approx(own[0], rel=rel)
    # Among the candidates: the label's log-probability through the prefix tree, which the full
    # log-probability bounds from below (each choice is among fewer tokens).
    among = build_graph(rep, LabelTarget(LABELS[0], candidates=LABELS), prompt_length=len(prompt), answers=answers,
                        max_feature_nodes=0)
    assert own[0] < among.nodes["value"].iloc[among.targets[0]] < 0.0


def test_prefix_tree_competition():
    answers = {"a": [5, 7, 9, 1], "b": [5, 8, 2], "c": [6, 4], "d": [5, 7, 3, 1]}
    tree = LabelTarget("a", candidates=["a", "b", "c", "d"]).competitors(answers)
    assert tree == [[5, 6], [7, 8], [9, 3], [1]]  # the last position has no competitor left
    assert LabelTarget("a").competitors(answers) == [[], [], [], []]


def test_signed_weights_use_their_magnitude_for_influence(setup):
    _, _, prompt, answers, rep = setup
    targets = [LabelTarget(LABELS[0]), ContrastTarget(LABELS[0], LABELS[1])]
    options = dict(prompt_length=len(prompt), answers=answers, max_feature_nodes=16)
    signed = build_graph(rep, targets, target_weights=[3.0, -1.0], **options)
    positive = build_graph(rep, targets, target_weights=[3.0, 1.0], **options)
    assert sorted(signed.target_weights[signed.targets].tolist()) == [-0.25, 0.75]
    torch.testing.assert_close(signed.node_influence(), positive.node_influence())


def test_frozen_intervention_on_a_source_moves_the_target_by_its_edge(setup):
    """circuit-tracer's verify_feature_edges: zero one source feature, others held, in the frozen model."""
    _, _, prompt, answers, rep = setup
    n = len(prompt)
    for target in all_targets(rep, n)[:2]:
        graph = build_graph(rep, target, prompt_length=n, answers=answers, max_feature_nodes=16)
        index = graph.targets[0]
        features = graph.indices("feature")
        strongest = features[graph.adjacency[index, features].abs().topk(3).indices]
        scalar = frozen_scalar(rep, target, n, answers)
        acts = recorded_activations(rep)
        for source in strongest.tolist():
            node = graph.node(source)
            edited = [z.clone() for z in acts]
            edited[node.layer][node.position, node.index] = 0.0
            change = float(scalar(replacement_forward(rep, feature_acts=acts))
                           - scalar(replacement_forward(rep, feature_acts=edited)))
            assert change == pytest.approx(float(graph.adjacency[index, source]), rel=1e-9, abs=1e-12)


def test_bad_targets_get_clear_errors(setup):
    _, _, prompt, answers, rep = setup
    n = len(prompt)
    layer = rep.n_layers - 1
    firing = set(rep.active[layer].feature[rep.active[layer].position == n - 1].tolist())
    silent = next(f for f in range(rep.transcoders[layer].d_tc) if f not in firing)
    with pytest.raises(ValueError, match=f"feature {silent} at layer {layer}, position {n - 1} does not fire"):
        build_graph(rep, FeatureTarget(layer, n - 1, silent), prompt_length=n)
    with pytest.raises(ValueError, match="is not among the candidates"):
        LabelTarget("Erythrocyte", candidates=LABELS)
    with pytest.raises(ValueError, match=f"position {rep.n_pos} is past the prompt"):
        build_graph(rep, LogitTarget(5, rep.n_pos))
    with pytest.raises(ValueError, match=rf"has shape \(7,\), but the model's residual stream has width"):
        build_graph(rep, DirectionTarget(torch.ones(7)))
    with pytest.raises(ValueError, match="target_weights must be finite numbers"):
        build_graph(rep, [LogitTarget(5, n - 1), LogitTarget(6, n - 1)], target_weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="no answer tokens for the label"):
        build_graph(rep, LabelTarget(LABELS[0]), prompt_length=n)
    with pytest.raises(ValueError, match="does not carry the answer of 'CD56\\+ NK' after the prompt"):
        build_graph(rep, LabelTarget(LABELS[1]), prompt_length=n, answers=answers)
    with pytest.raises(ValueError, match="has no competitor at any answer position"):
        build_graph(rep, LabelTarget(LABELS[0], candidates=[LABELS[0]]), prompt_length=n, answers=answers)


def test_replacement_model_reads_a_label_on_the_teacher_forced_answer(setup):
    model, cells, prompt, answers, rep = setup
    transcoders = [tc for tc in tiny_transcoders(model, rep.input_ids, firing=0.1)]
    replacement = ReplacementModel(model, transcoders, cells)
    graph = replacement.attribute(CELL, LabelTarget(LABELS[0], candidates=LABELS), max_feature_nodes=8)
    assert graph.info["prompt_length"] == len(prompt)
    assert graph.input_ids == teacher_forced(prompt, answers[LABELS[0]])
    assert graph.nodes["gene"].iloc[graph.indices("embedding")].tolist()[-len(answers[LABELS[0]]) + 1:] == (
        [None] * (len(answers[LABELS[0]]) - 1))  # answer tokens carry no gene
    reference = build_graph(build_replacement(model, transcoders, graph.input_ids),
                            LabelTarget(LABELS[0], candidates=LABELS), prompt_length=len(prompt), answers=answers,
                            max_feature_nodes=8)
    torch.testing.assert_close(graph.adjacency, reference.adjacency)
    scores = replacement.score_labels([CELL], LABELS)[0]
    label_graph = replacement.attribute(CELL, LabelTarget(LABELS[1]), max_feature_nodes=0)
    rel = 1e-9 if hasattr(rep.weights, "lnf_weight") else 1e-7
    assert label_graph.nodes["value"].iloc[label_graph.targets[0]] == pytest.approx(scores[1], rel=rel)
    with pytest.raises(ValueError, match="follow different answers"):
        replacement.attribute(CELL, [LabelTarget(LABELS[0]), LabelTarget(LABELS[1])])
    nothing = replacement.intervene(CELL, [], labels=LABELS)
    assert np.allclose(nothing.clean_log_likelihood, scores, rtol=1e-6)
