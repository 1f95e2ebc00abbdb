"""Linearised replacement and exact attribution, checked against transformers' forward and torch autograd."""

from __future__ import annotations

import pytest
import torch
from _tiny_neox import VOCAB, tiny_model, tiny_setup, tiny_transcoders

from c2srepro.attribution import Node, build_replacement
from c2srepro.attribution.contributions import attribute, attribute_many, head_contributions
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.attribution.linearised import run_model
from c2srepro.models.adapters.neox import center, layer_norm


@pytest.fixture(scope="module")
def setup():
    model, transcoders, input_ids = tiny_setup()
    return model, transcoders, input_ids, build_replacement(model, transcoders, input_ids)


def last_active(rep, layer):
    """The active feature of ``layer`` at the latest position (largest activation there)."""
    act = rep.active[layer]
    position = int(act.position.max())
    feature, _ = rep.top_features(layer, position, 1)[0]
    return Node.feature(layer, position, feature)


def autograd_attribution(rep, target):
    """activation x gradient of the target w.r.t. every source, by torch autograd in the frozen model."""
    out = replacement_forward(rep)
    acts = [z.detach().clone().requires_grad_() for z in out.activations]
    emb = rep.weights.embed[rep.input_ids].clone().requires_grad_()
    err = rep.errors.clone().requires_grad_()
    value = replacement_forward(rep, feature_acts=acts, embeddings=emb, errors=err).value(target)
    value.backward()
    features = [(z * z.grad if z.grad is not None else torch.zeros_like(z)).detach() for z in acts]
    # d value / d e_l[s] is the gradient on r_{l+1}[s], which is what a bias written there meets.
    bias = torch.einsum("lsd,ld->ls", err.grad, rep.written_bias)
    return value.detach(), features, (emb * emb.grad).sum(-1), (err * err.grad).sum(-1), bias


def test_float32_model_matches_transformers_and_attributes_exactly():
    model = tiny_model(dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    run = run_model(model, ids)
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    torch.testing.assert_close(run.logits, reference, atol=2e-5, rtol=1e-5)
    rep = build_replacement(model, tiny_transcoders(model, ids), ids)
    for target in (last_active(rep, 2), rep.logit_node(19, 4)):
        result = attribute(rep, target)
        assert result.total() == pytest.approx(result.value, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("freeze", [True, False])
def test_replacement_reproduces_transformers_logits(setup, freeze):
    model, _, input_ids, rep = setup
    with torch.no_grad():
        reference = model(input_ids[None]).logits[0]
    out = replacement_forward(rep, freeze=freeze)
    torch.testing.assert_close(out.logits, reference, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(rep.run.logits, reference, atol=1e-10, rtol=1e-10)
    # The transcoders are poor random ones, so exactness really rests on the error terms.
    assert rep.errors.abs().max() > 0.1


def test_replacement_features_are_the_transcoder_encodings(setup):
    _, transcoders, _, rep = setup
    for layer, tc in enumerate(transcoders):
        with torch.no_grad():
            z = tc.encode(rep.run.mlp_in[layer])
        act = rep.active[layer]
        assert 0 < len(act) < z.numel() // 4  # a few features fire
        torch.testing.assert_close(act.activation, z[act.position, act.feature])
        assert int((z > 0).sum()) == len(act)


def test_contributions_sum_to_pre_activation_and_logit(setup):
    _, _, _, rep = setup
    targets = [last_active(rep, layer) for layer in range(rep.n_layers)] + [rep.logit_node(rep.n_pos - 1, 5)]
    for target in targets:
        result = attribute(rep, target)
        assert result.total() == pytest.approx(result.value, rel=1e-10, abs=1e-12)
    feature = targets[-2]
    assert attribute(rep, feature).value == pytest.approx(
        float(rep.active[feature.layer].activation[rep.active_index(feature)]), rel=1e-12
    )
    assert attribute(rep, targets[-1]).value == pytest.approx(float(rep.run.logits[-1, 5]), rel=1e-12)


@pytest.mark.parametrize("kind", ["feature", "logit"])
def test_every_edge_equals_activation_times_autograd_gradient(setup, kind):
    _, _, _, rep = setup
    target = last_active(rep, rep.n_layers - 1) if kind == "feature" else rep.logit_node(rep.n_pos - 2, 7)
    result = attribute(rep, target)
    value, features, embedding, error, bias = autograd_attribution(rep, target)
    assert float(value) == pytest.approx(result.value, rel=1e-10)
    for layer, act in enumerate(rep.active):
        reference = features[layer][act.position, act.feature]
        torch.testing.assert_close(result.features[layer], reference, atol=1e-12, rtol=1e-9)
        # Only active features carry activation: nothing else can contribute.
        assert float(features[layer].abs().sum()) == pytest.approx(float(reference.abs().sum()), rel=1e-12)
    torch.testing.assert_close(result.embedding, embedding, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(result.error, error, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(result.bias, bias, atol=1e-12, rtol=1e-9)
    # Earlier positions reach the target only through attention, and they do contribute.
    assert result.embedding[: target.position].abs().max() > 1e-6


def test_same_position_edge_is_paper_eq5_with_frozen_layer_norm(setup):
    _, _, _, rep = setup
    lw, tc_in, tc_out = rep.weights.layers[1], rep.transcoders[0], rep.transcoders[1]
    # A layer-1 feature reads r_1 directly: a layer-0 feature at its position reaches it through the
    # residual stream only (no attention in between), so the edge is exactly eq. 5 with LN2 frozen.
    target = last_active(rep, 1)
    result = attribute(rep, target)
    f_enc = tc_out.W_enc[:, target.index]
    sigma_inv = rep.run.ln_scale[1, target.position]
    act = rep.active[0]
    at_target = (act.position == target.position).nonzero().flatten().tolist()
    assert at_target
    for i in at_target:
        z, f_dec = act.activation[i], tc_in.W_dec[act.feature[i]]
        eq5 = z * (f_dec @ (sigma_inv * center(lw.ln2_weight * f_enc)))  # z (f_dec . f_enc), LN applied
        assert float(result.features[0][i]) == pytest.approx(float(eq5), rel=1e-10)
        paths = head_contributions(rep, Node.feature(0, target.position, act.feature[i]), target)
        assert paths.residual == pytest.approx(float(eq5), rel=1e-10)
        assert float(paths.heads.abs().sum()) == 0.0
    # Earlier-position layer-0 features do not reach a layer-1 feature at all.
    assert float(result.features[0][act.position < target.position].abs().sum()) == 0.0


def head_probe_value(rep, target, layer, head, position, u, eps):
    """Target value when eps * u is added to the input of one head (value path) at one position only.

    An independent frozen forward written out here, not using the package's attribution math.
    """
    w = rep.weights
    r = w.embed[rep.input_ids]
    delta = torch.zeros_like(r)
    delta[position] = u
    for j, (lw, tc) in enumerate(zip(w.layers, rep.transcoders)):
        if j == target.layer:
            break
        scale, pattern = rep.run.ln_scale[j], rep.run.pattern[j]
        x = layer_norm(r, scale, lw.ln1_weight, lw.ln1_bias)
        attn = lw.b_O.clone()
        for h in range(w.n_heads):
            x_h = layer_norm(r + eps * delta, scale, lw.ln1_weight, lw.ln1_bias) if (j, h) == (layer, head) else x
            attn = attn + (pattern[h] @ (x_h @ lw.W_V[h] + lw.b_V[h])) @ lw.W_O[h]
        act = rep.active[j]
        z = torch.zeros(rep.n_pos, tc.d_tc, dtype=r.dtype)
        z[act.position, act.feature] = act.activation
        r = r + attn + z @ tc.W_dec + tc.b_dec + rep.errors[j]
    lw, tc = w.layers[target.layer], rep.transcoders[target.layer]
    x = layer_norm(r, rep.run.ln_scale[target.layer], lw.ln2_weight, lw.ln2_bias)
    return x[target.position] @ tc.W_enc[:, target.index] + tc.b_enc[target.index]


def test_attention_path_split_matches_autograd_per_head(setup):
    _, _, _, rep = setup
    target = last_active(rep, rep.n_layers - 1)
    result = attribute(rep, target)
    # The strongest layer-0 feature at an earlier position: it reaches the target only via attention.
    act = rep.active[0]
    earlier = (act.position < target.position).nonzero().flatten()
    i = int(earlier[result.features[0][earlier].abs().argmax()])
    source = Node.feature(0, act.position[i], act.feature[i])
    paths = head_contributions(rep, source, target)
    assert paths.residual == 0.0
    assert paths.total() == pytest.approx(result.contribution(source), rel=1e-10)
    assert paths.heads[0].abs().sum() == 0  # a layer-0 feature is written after layer 0's attention
    u = act.activation[i] * rep.transcoders[0].W_dec[source.index]
    checked = 0
    for layer in range(1, target.layer):
        for head in range(rep.weights.n_heads):
            eps = torch.zeros((), dtype=u.dtype, requires_grad=True)
            (grad,) = torch.autograd.grad(head_probe_value(rep, target, layer, head, source.position, u, eps), eps)
            assert float(paths.heads[layer, head]) == pytest.approx(float(grad), rel=1e-9, abs=1e-13)
            checked += abs(float(grad)) > 1e-8
    assert checked > 0


def test_batched_attribution_equals_single(setup):
    _, _, _, rep = setup
    targets = [last_active(rep, 2), rep.logit_node(3, 1), last_active(rep, 1)]
    for target, batched in zip(targets, attribute_many(rep, targets)):
        single = attribute(rep, target)
        assert batched.target == target
        for a, b in zip(batched.features, single.features):
            torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-11)
        torch.testing.assert_close(batched.embedding, single.embedding, atol=1e-13, rtol=1e-11)


def test_top_contributions_are_sorted_and_consistent(setup):
    _, _, _, rep = setup
    result = attribute(rep, rep.logit_node(rep.n_pos - 1, 3))
    top = result.top(8, kinds=("feature", "error", "embedding", "bias"))
    assert len(top) == 8
    magnitudes = [abs(c) for _, c in top]
    assert magnitudes == sorted(magnitudes, reverse=True)
    for node, c in top:
        assert result.contribution(node) == c
    everything = torch.cat([result.embedding, result.error.flatten(), result.bias.flatten(), *result.features])
    assert magnitudes[0] == pytest.approx(float(everything.abs().max()))


def test_target_feature_that_does_not_fire(setup):
    _, _, _, rep = setup
    layer, position = 1, 4
    firing = set(rep.active[layer].feature[rep.active[layer].position == position].tolist())
    silent = next(f for f in range(rep.transcoders[layer].d_tc) if f not in firing)
    top_feature, _ = rep.top_features(layer, position, 1)[0]
    message = rf"feature {silent} at layer 1, position 4 does not fire.*top-firing.*{top_feature} "
    with pytest.raises(ValueError, match=message):
        attribute(rep, Node.feature(layer, position, silent))


def test_out_of_range_targets(setup):
    _, _, _, rep = setup
    with pytest.raises(ValueError, match="position 12 is out of range for a prompt of 12 tokens"):
        attribute(rep, rep.logit_node(12, 0))
    with pytest.raises(ValueError, match="layer 3 is out of range"):
        attribute(rep, Node.feature(3, 0, 0))
    with pytest.raises(ValueError, match="feature 9999 is out of range"):
        attribute(rep, Node.feature(0, 0, 9999))
    with pytest.raises(ValueError, match="token must be in"):
        attribute(rep, rep.logit_node(0, VOCAB))
    with pytest.raises(ValueError, match="answer_start 0 must be in"):
        rep.answer_node(0)


def test_bad_model_and_prompt_inputs():
    model, transcoders, _ = tiny_setup()
    too_long = torch.zeros(model.config.max_position_embeddings + 1, dtype=torch.long)
    message = r"prompt has 65 tokens but the model's context \(max_position_embeddings\) is 64"
    with pytest.raises(ValueError, match=message):
        build_replacement(model, transcoders, too_long)
    with pytest.raises(ValueError, match="got 2 transcoders for a model with 3 layers"):
        build_replacement(model, transcoders[:2], [1, 2, 3])
    with pytest.raises(ValueError, match=r"no transcoder for layers \[1\]"):
        build_replacement(model, {0: transcoders[0], 2: transcoders[2]}, [1, 2, 3])
    by_layer = build_replacement(model, dict(enumerate(transcoders)), [1, 2, 3])
    torch.testing.assert_close(by_layer.errors, build_replacement(model, transcoders, [1, 2, 3]).errors)
    with pytest.raises(ValueError, match=r"transcoders\[1\] was configured for layer 2"):
        build_replacement(model, [transcoders[0], transcoders[2], transcoders[1]], [1, 2, 3])
    with pytest.raises(ValueError, match="must lie in"):
        build_replacement(model, transcoders, [1, VOCAB])
    sequential = tiny_model(parallel=False)
    with pytest.raises(ValueError, match="use_parallel_residual=False"):
        build_replacement(sequential, transcoders, [1, 2])
