"""Interventions on transcoder features: exactness, hand computations, the frozen replacement, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny_neox import tiny_model, tiny_transcoders

from c2srepro.attribution import (
    LabelTarget,
    Node,
    ReplacementModel,
    ablate,
    build_replacement,
    scale_features,
    set_features,
    zero_features,
    zero_nodes,
)
from c2srepro.attribution.ablation import feature_pool
from c2srepro.attribution.intervene import SplicedModel, clamp_features
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import answer_text, build_prompt
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.models.hooked import HookedModel, hook_name
from c2srepro.models.mini_c2s import build_vocabulary
from c2srepro.models.predict import score_labels

CELL = CellSentence(0, "a", ("CD14", "LYZ", "S100A8"), "CD14+ Monocyte")
LABELS = ["CD14+ Monocyte", "CD56+ NK", "CD19+ B", "Dendritic"]
MODES = [pytest.param(False, id="recomputed"), pytest.param(True, id="frozen")]


def make_setup(tokenizer, *, parallel: bool = True, dtype: torch.dtype = torch.float64):
    texts = [build_prompt(CELL, with_answer=True).text] + [answer_text(label) for label in LABELS]
    cell_tokenizer = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    model = tiny_model(vocab_size=cell_tokenizer.vocab_size, max_positions=128, parallel=parallel, dtype=dtype)
    prompt = cell_tokenizer.encode(build_prompt(CELL).text)[0]
    transcoders = tiny_transcoders(model, torch.tensor(prompt), firing=0.1)
    return model, transcoders, cell_tokenizer, prompt


@pytest.fixture(scope="module")
def setup(tokenizer):
    return make_setup(tokenizer)


@pytest.fixture(scope="module")
def spliced(setup):
    model, transcoders, cell_tokenizer, prompt = setup
    return SplicedModel(model, transcoders, cell_tokenizer, prompt, LABELS)


@pytest.fixture(scope="module")
def prompt_rep(setup):
    model, transcoders, _, prompt = setup
    return build_replacement(model, transcoders, prompt)


def active_nodes(rep, layer):
    act = rep.active[layer]
    return [Node.feature(layer, p, f) for p, f in zip(act.position.tolist(), act.feature.tolist())]


def every_feature(spliced, layer):
    return list(range(spliced.d_tc[layer]))


def answers(cell_tokenizer):
    return [cell_tokenizer.encode(answer_text(label))[0] for label in LABELS]


def log_likelihoods(logits, prompt, answer_ids):
    """Summed log-probabilities of each answer from the logits of prompt + answer (one tensor per answer)."""
    scores = []
    for row_logits, answer in zip(logits, answer_ids):
        log_probs = torch.log_softmax(row_logits, dim=-1)
        scores.append(sum(float(log_probs[len(prompt) - 1 + j, token]) for j, token in enumerate(answer)))
    return np.array(scores)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("freeze", MODES)
def test_nothing_edited_reproduces_the_model_exactly(setup, spliced, freeze):
    model, _, cell_tokenizer, prompt = setup
    result = spliced.run([], freeze_attention=freeze)
    assert np.array_equal(result.intervened_log_likelihood, result.clean_log_likelihood)
    assert result.label_probability_change == 0.0 and not result.flipped and result.n_edited == 0
    reference = score_labels(model, cell_tokenizer, [CELL], LABELS)[0]  # the unmodified model, float64
    if freeze:  # the model's own full pass over each prompt + answer (summed in another order here)
        with torch.no_grad():
            full = [model(torch.tensor([prompt + answer])).logits[0] for answer in answers(cell_tokenizer)]
        np.testing.assert_allclose(result.clean_log_likelihood, log_likelihoods(full, prompt, answers(cell_tokenizer)),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(result.clean_log_likelihood, reference, rtol=0, atol=1e-10)
    else:  # the very scores of predict.score_labels, bit for bit
        assert np.array_equal(result.clean_log_likelihood, reference)
    assert result.clean_answer == LABELS[int(np.argmax(reference))]
    probabilities = np.exp(reference - reference.max())
    np.testing.assert_allclose(result.clean_probabilities, probabilities / probabilities.sum(), rtol=1e-12)


@pytest.mark.parametrize("freeze", MODES)
def test_identity_edits_at_every_layer_are_exact(spliced, freeze):
    clean = spliced.run([], freeze_attention=freeze)
    for edit in (lambda layer, features: scale_features(layer, features, factor=1.0),
                 lambda layer, features: clamp_features(layer, features, low=0.0)):  # activations are >= 0
        edits = [edit(layer, every_feature(spliced, layer)) for layer in range(spliced.n_layers)]
        result = spliced.run(edits, freeze_attention=freeze)
        assert result.n_edited == sum(spliced.d_tc) * spliced.n_pos
        assert np.array_equal(result.intervened_log_likelihood, clean.clean_log_likelihood)


@pytest.mark.parametrize("freeze", MODES)
def test_float32_model_is_exact_too(tokenizer, freeze):
    model, transcoders, cell_tokenizer, prompt = make_setup(tokenizer, dtype=torch.float32)
    spliced = SplicedModel(model, transcoders, cell_tokenizer, prompt, LABELS)
    edits = [scale_features(layer, every_feature(spliced, layer), factor=1.0) for layer in range(spliced.n_layers)]
    result = spliced.run(edits, freeze_attention=freeze)
    assert np.array_equal(result.intervened_log_likelihood, result.clean_log_likelihood)
    if not freeze:
        assert np.array_equal(result.clean_log_likelihood, score_labels(model, cell_tokenizer, [CELL], LABELS)[0])


def test_sequential_residual_is_exact_recomputed_and_refused_frozen(tokenizer):
    model, transcoders, cell_tokenizer, prompt = make_setup(tokenizer, parallel=False)
    spliced = SplicedModel(model, transcoders, cell_tokenizer, prompt, LABELS)
    edits = [scale_features(layer, every_feature(spliced, layer), factor=1.0) for layer in range(spliced.n_layers)]
    result = spliced.run(edits)
    assert np.array_equal(result.intervened_log_likelihood, score_labels(model, cell_tokenizer, [CELL], LABELS)[0])
    assert spliced.run(zero_features(0, every_feature(spliced, 0))).label_probability_change != 0.0
    with pytest.raises(ValueError, match="use_parallel_residual=False"):
        spliced.run([], freeze_attention=True)


# ---------------------------------------------------------------- against independent computations


@pytest.mark.parametrize("freeze", MODES)
def test_zeroing_features_equals_the_replacement_with_them_ablated(setup, spliced, prompt_rep, freeze):
    """Recomputed: the re-implemented forward with patterns and layer norms recomputed and errors
    fixed (replacement_forward(freeze=False)); frozen: the linearised replacement."""
    model, transcoders, cell_tokenizer, prompt = setup
    nodes = active_nodes(prompt_rep, 0)[::2] + active_nodes(prompt_rep, 1)[:5]
    result = spliced.run(zero_nodes(nodes), freeze_attention=freeze)
    logits = []
    for answer in answers(cell_tokenizer):
        rep = build_replacement(model, transcoders, prompt + answer)
        logits.append(replacement_forward(rep, freeze=freeze, ablate=nodes).logits)
    expected = log_likelihoods(logits, prompt, answers(cell_tokenizer))
    np.testing.assert_allclose(result.intervened_log_likelihood, expected, rtol=0, atol=1e-9)
    assert np.abs(result.intervened_log_likelihood - result.clean_log_likelihood).max() > 1e-3


@pytest.mark.parametrize("freeze", MODES)
def test_setting_a_last_layer_feature_is_a_hand_computation(setup, spliced, prompt_rep, freeze):
    """The last layer's feature f at the final prompt token writes (v - a) f_dec into r_L there only,
    so only the logits predicting each answer's first token move: through the final layer norm with
    its clean scale (frozen) or recomputed (the real layer norm)."""
    model, transcoders, cell_tokenizer, prompt = setup
    last, final = spliced.n_layers - 1, spliced.n_pos - 1
    feature, activation = prompt_rep.top_features(last, final, n=1)[0]
    value = activation + 3.0
    result = spliced.run(set_features(last, feature, value=value, positions=final), freeze_attention=freeze)

    hooked = HookedModel(model)
    logits, cache = hooked.run_with_cache(torch.tensor([prompt]), [hook_name(last, "hook_resid_post")])
    r = cache[hook_name(last, "hook_resid_post")][0, final]
    norm = model.gpt_neox.final_layer_norm
    with torch.no_grad():
        shift = (value - activation) * transcoders[last].W_dec[feature]
        if freeze:
            sigma_inv = torch.rsqrt(r.var(unbiased=False) + norm.eps)
            moved = (shift - shift.mean()) * sigma_inv * norm.weight
        else:
            moved = norm(r + shift) - norm(r)
        new_logits = logits[0, final] + hooked.adapter.unembed().weight @ moved
    old_lp, new_lp = torch.log_softmax(logits[0, final], -1), torch.log_softmax(new_logits, -1)
    firsts = [answer[0] for answer in answers(cell_tokenizer)]
    expected = result.clean_log_likelihood + np.array([float(new_lp[t] - old_lp[t]) for t in firsts])
    np.testing.assert_allclose(result.intervened_log_likelihood, expected, rtol=0, atol=1e-10)
    assert np.abs(result.intervened_log_likelihood - result.clean_log_likelihood).max() > 1e-3


@pytest.mark.parametrize("freeze", MODES)
def test_set_scale_and_clamp_agree_where_they_must(spliced, prompt_rep, freeze):
    layer = 1
    node = active_nodes(prompt_rep, layer)[0]
    activation = float(prompt_rep.active[layer].activation[0])
    run = lambda edit: spliced.run(edit, freeze_attention=freeze).intervened_log_likelihood  # noqa: E731
    at = dict(positions=[node.position])
    doubled = run(set_features(layer, node.index, value=2 * activation, **at))
    # Frozen, the activation is recomputed by the re-implemented forward: equal to the model's to rounding.
    np.testing.assert_allclose(run(scale_features(layer, node.index, factor=2.0, **at)), doubled,
                               rtol=0, atol=1e-12 if freeze else 0)
    assert np.array_equal(run(clamp_features(layer, node.index, low=2 * activation, **at)), doubled)
    halved = run(set_features(layer, node.index, value=activation / 2, **at))
    assert np.array_equal(run(clamp_features(layer, node.index, high=activation / 2, **at)), halved)
    zeroed = run(set_features(layer, node.index, value=0.0, **at))
    assert np.array_equal(run(zero_features(layer, node.index, **at)), zeroed)
    inside = run(clamp_features(layer, node.index, low=activation / 2, high=2 * activation, **at))
    assert np.array_equal(inside, spliced.run([], freeze_attention=freeze).clean_log_likelihood)
    assert not np.array_equal(doubled, halved)


def test_intervene_is_one_run_of_a_spliced_model(setup, spliced):
    model, transcoders, cell_tokenizer, prompt = setup
    edit = zero_features(0, every_feature(spliced, 0), positions=[3, 4, 5])
    once = ReplacementModel(model, transcoders, cell_tokenizer).intervene(prompt, edit, labels=LABELS, label="CD56+ NK")
    again = spliced.run(edit, label="CD56+ NK")
    assert np.array_equal(once.intervened_log_likelihood, again.intervened_log_likelihood)
    assert once.label == "CD56+ NK" and once.mode == "recomputed"
    table = once.table()
    assert list(table["candidate"]) == [LABELS[i] for i in np.argsort(-once.clean_log_likelihood, kind="stable")]
    np.testing.assert_allclose(table["intervened_probability"].sum(), 1.0)
    json.dumps(once.summary())


# ---------------------------------------------------------------- bad input


def test_interventions_out_of_range_are_clear_errors(spliced):
    n_pos, width, n_layers = spliced.n_pos, spliced.d_tc[1], spliced.n_layers
    with pytest.raises(ValueError, match=f"feature {width} is out of range: layer 1's transcoder has {width} features"):
        spliced.run(zero_features(1, [0, width]))
    past = f"position {n_pos} is past the prompt \\({n_pos} tokens, positions 0..{n_pos - 1}\\)"
    with pytest.raises(ValueError, match=past):
        spliced.run(zero_features(1, 0, positions=[0, n_pos]))
    with pytest.raises(ValueError, match=f"layer {n_layers} does not exist: the model has layers 0..{n_layers - 1}"):
        spliced.run(zero_features(n_layers, 0))
    with pytest.raises(ValueError, match="position -1 is not a position"):
        spliced.run(zero_features(0, 0, positions=-1))
    with pytest.raises(ValueError, match="feature 3 at layer 0, position 2 is named by two interventions"):
        spliced.run([zero_features(0, [3, 4]), scale_features(0, 3, factor=2.0, positions=[2])])
    with pytest.raises(ValueError, match="label 'T cell' is not among the candidates"):
        spliced.run([], label="T cell")
    with pytest.raises(TypeError, match="expected Intervention objects"):
        spliced.run([Node.feature(0, 0, 0)])


def test_bad_intervention_values_are_clear_errors(setup):
    with pytest.raises(ValueError, match="the value to set must be a finite number, got nan"):
        set_features(0, 1, value=float("nan"))
    with pytest.raises(ValueError, match="the scale factor must be a finite number, got inf"):
        scale_features(0, 1, factor=float("inf"))
    with pytest.raises(ValueError, match="clamp_features needs low=, high= or both"):
        clamp_features(0, 1)
    with pytest.raises(ValueError, match="low bound 2.0 is above its high bound 1.0"):
        clamp_features(0, 1, low=2.0, high=1.0)
    with pytest.raises(ValueError, match="features is empty"):
        zero_features(0, [])
    with pytest.raises(TypeError, match="features must be integer indices"):
        zero_features(0, [1.5])
    with pytest.raises(ValueError, match="positions must be a position, a list of positions or 'all'"):
        zero_features(0, 1, positions="last")
    with pytest.raises(ValueError, match="only feature nodes can be switched off"):
        zero_nodes([Node.error(0, 1)])
    model, transcoders, cell_tokenizer, prompt = setup
    with pytest.raises(ValueError, match="given more than once"):
        SplicedModel(model, transcoders, cell_tokenizer, prompt, [*LABELS, LABELS[0]])
    with pytest.raises(ValueError, match="give at least one candidate label"):
        SplicedModel(model, transcoders, cell_tokenizer, prompt, [])


# ---------------------------------------------------------------- ablation against random sets


@pytest.fixture(scope="module")
def replacement(setup):
    model, transcoders, cell_tokenizer, _ = setup
    return ReplacementModel(model, transcoders, cell_tokenizer)


@pytest.fixture(scope="module")
def graph(replacement, spliced):
    label = spliced.run([]).clean_answer
    return replacement.attribute(CELL, LabelTarget(label, candidates=LABELS), max_feature_nodes=60)


@pytest.mark.parametrize("freeze", MODES)
def test_switching_off_the_graphs_top_features(replacement, spliced, prompt_rep, graph, freeze):
    label = spliced.run([]).clean_answer
    top = graph.top_features(4)
    assert all(f.position < len(replacement.prompt(CELL)[0]) for f in top)  # never an answer position
    study = ablate(replacement, CELL, top, labels=LABELS, label=label, n_random=6, seed=3, freeze_attention=freeze)
    # The one intervention path: the same edit on the spliced model gives the same scores bit for bit.
    by_hand = spliced.run(zero_nodes(top), freeze_attention=freeze, label=label)
    assert np.array_equal(study.off.intervened_log_likelihood, by_hand.intervened_log_likelihood)
    assert study.drop == pytest.approx(by_hand.label_probability_clean - by_hand.label_probability)
    pool = set(feature_pool(prompt_rep))
    assert study.pool_size == len(pool) == prompt_rep.n_active
    assert all(len(set(f)) == 4 and set(f) <= pool for f in study.random_features)
    assert study.p_value == (1 + sum(d >= study.drop for d in study.random_drops)) / 7
    summary = study.summary()
    json.dumps(summary)
    assert summary["flipped"] == (study.off.intervened_answer != study.off.clean_answer)
    assert len(study.table()) == 8 and study.table()["features_off"].tolist() == [0] + [4] * 7

    again = ablate(replacement, CELL, top, labels=LABELS, label=label, n_random=6, seed=3, freeze_attention=freeze)
    assert again.random_features == study.random_features
    assert np.array_equal(again.random_drops, study.random_drops)
    other = ablate(replacement, CELL, top, labels=LABELS, label=label, n_random=6, seed=4, freeze_attention=freeze)
    assert other.random_features != study.random_features


def test_frozen_ablation_is_the_replacement_with_the_features_ablated(replacement, setup, prompt_rep):
    """The frozen path against replacement_forward on prompt + answer, computed here by hand."""
    model, transcoders, cell_tokenizer, prompt = setup
    features = active_nodes(prompt_rep, 0)[:3]
    study = ablate(replacement, CELL, features, labels=LABELS, n_random=1, freeze_attention=True)
    for j, label in enumerate(LABELS):
        answer = cell_tokenizer.encode(answer_text(label))[0]
        rep = build_replacement(model, transcoders, list(prompt) + list(answer))
        rows = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))
        clean = replacement_forward(rep, freeze=True).logits[rows]
        off = replacement_forward(rep, freeze=True, ablate=features).logits[rows]
        change = torch.log_softmax(rep.run.logits[rows] + off - clean, -1) - torch.log_softmax(rep.run.logits[rows], -1)
        expected = float(change.gather(-1, torch.tensor(answer)[:, None]).sum())
        got = study.off.intervened_log_likelihood[j] - study.off.clean_log_likelihood[j]
        assert got == pytest.approx(expected, abs=1e-9)


def test_ablation_bad_input(replacement, graph, prompt_rep):
    with pytest.raises(ValueError, match="no features to switch off"):
        ablate(replacement, CELL, [], labels=LABELS)
    with pytest.raises(ValueError, match="label 'other' is not among the candidates"):
        ablate(replacement, CELL, graph.top_features(2), labels=LABELS, label="other")
    silent = next(Node.feature(0, 0, f) for f in range(10_000) if Node.feature(0, 0, f) not in set(feature_pool(prompt_rep)))
    with pytest.raises(ValueError, match="are not active on this prompt"):
        ablate(replacement, CELL, [silent], labels=LABELS)
    with pytest.raises(ValueError, match="n_random must be >= 1"):
        ablate(replacement, CELL, graph.top_features(2), labels=LABELS, n_random=0)
