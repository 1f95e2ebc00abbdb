"""The replacement model, checked with transcoders that are exact copies of ReLU MLPs and against
transformers' own forward and loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _tc_models import encoded, random_prompts, small_model

from c2srepro.transcoder import Transcoder, TranscoderConfig, evaluate_replacement, remove_mlps, replace_mlps
from c2srepro.transcoder.harvest import harvest_activations


def exact_transcoder(model, layer: int) -> Transcoder:
    """A transcoder equal to a ReLU MLP: its hidden units are the features (eq. 1-2)."""
    mlp = model.gpt_neox.layers[layer].mlp
    d_model = model.config.hidden_size
    transcoder = Transcoder(TranscoderConfig(d_model=d_model, d_transcoder=model.config.intermediate_size, layer=layer))
    with torch.no_grad():
        transcoder.W_enc.copy_(mlp.dense_h_to_4h.weight.T)  # [d_model, d_tc]
        transcoder.b_enc.copy_(mlp.dense_h_to_4h.bias)
        transcoder.W_dec.copy_(mlp.dense_4h_to_h.weight.T)  # [d_tc, d_model]
        transcoder.b_dec.copy_(mlp.dense_4h_to_h.bias)
    return transcoder


@pytest.fixture(scope="module")
def relu_model():
    return small_model(n_layers=3, act="relu")


@pytest.fixture(scope="module")
def exact(relu_model):
    return {layer: exact_transcoder(relu_model, layer) for layer in range(3)}


@pytest.fixture(scope="module")
def prompts():
    return encoded(random_prompts(10, low=8, high=30, seed=4))


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_exact_transcoders_reproduce_the_logits(relu_model, exact, prompts):
    ids = prompts.input_ids[0]
    original = logits(relu_model, ids)
    with replace_mlps(relu_model, exact) as replaced:
        torch.testing.assert_close(logits(replaced, ids), original, atol=1e-5, rtol=1e-5)
    with replace_mlps(relu_model, exact, layers=[1]):
        torch.testing.assert_close(logits(relu_model, ids), original, atol=1e-5, rtol=1e-5)
    with remove_mlps(relu_model):
        assert (logits(relu_model, ids) - original).abs().max() > 0.1
    assert torch.equal(logits(relu_model, ids), original)  # the hooks are gone


def test_replacement_really_uses_the_transcoder(relu_model, exact, prompts):
    ids = prompts.input_ids[1]
    original = logits(relu_model, ids)
    broken = {1: exact_transcoder(relu_model, 1)}
    shift = torch.randn(64, generator=torch.Generator().manual_seed(0))  # not along (1, ..., 1): LN removes that
    with torch.no_grad():
        broken[1].b_dec.add_(shift)  # a known shift of layer 1's MLP output
    with replace_mlps(relu_model, broken):
        shifted = logits(relu_model, ids)
    assert (shifted - original).abs().max() > 0.01
    # The same shift added to the real MLP output gives the same logits.
    hook = relu_model.gpt_neox.layers[1].mlp.register_forward_hook(lambda m, a, out: out + shift)
    try:
        torch.testing.assert_close(logits(relu_model, ids), shifted, atol=1e-5, rtol=1e-5)
    finally:
        hook.remove()


def test_evaluation_with_exact_transcoders(relu_model, exact, prompts):
    report, per_layer = evaluate_replacement(relu_model, exact, prompts, batch_prompts=4, progress=False)
    assert report.loss_transcoder == pytest.approx(report.loss_original, abs=1e-5)
    assert report.kl_transcoder < 1e-6 and report.kl_no_mlp > 1e-3
    assert report.loss_no_mlp != pytest.approx(report.loss_original, abs=1e-3)
    assert report.fraction_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert report.n_tokens == sum(len(p) - 1 for p in prompts.input_ids)
    assert report.n_answer_tokens == sum(len(p) - s for p, s in zip(prompts.input_ids, prompts.answer_start))
    assert math.isfinite(report.answer_loss_transcoder)
    assert list(per_layer.columns[:6]) == ["layer", "l0", "fvu", "mse", "dead_fraction", "n_live_features"]
    assert (per_layer.fvu < 1e-8).all() and per_layer.layer.tolist() == [0, 1, 2]
    summary = json.loads(json.dumps(report.to_dict()))
    assert {"loss_original", "loss_transcoder", "loss_no_mlp", "kl_transcoder", "kl_no_mlp",
            "fraction_loss_recovered"} <= set(summary)


def test_losses_match_transformers_and_an_independent_count(relu_model, exact, prompts):
    report, per_layer = evaluate_replacement(relu_model, exact, prompts, batch_prompts=3, progress=False)
    total, count, answer_total, answer_count = 0.0, 0, 0.0, 0
    for ids, start in zip(prompts.input_ids, prompts.answer_start):
        with torch.no_grad():
            out = relu_model(torch.tensor([ids]), labels=torch.tensor([ids]))
            nll = torch.nn.functional.cross_entropy(out.logits[0, :-1], torch.tensor(ids[1:]), reduction="none")
        total += out.loss.item() * (len(ids) - 1)
        count += len(ids) - 1
        answer_total += nll[start - 1 :].sum().item()
        answer_count += len(ids) - start
    assert report.loss_original == pytest.approx(total / count, rel=1e-5)
    assert report.answer_loss_original == pytest.approx(answer_total / answer_count, rel=1e-5)
    # L0 and dead fraction from the harvested rows, computed directly
    rows = harvest_activations(relu_model, prompts, progress=False).read_all()
    for layer in range(3):
        with torch.no_grad():
            active = exact[layer].encode(rows.mlp_in[layer]) > 0
        assert per_layer.l0[layer] == pytest.approx(active.sum(-1).float().mean().item(), rel=1e-6)
        assert per_layer.dead_fraction[layer] == pytest.approx((~active.any(0)).float().mean().item())
        live = (active.float().mean(0) >= 0.05).sum().item()
        assert evaluate_replacement(relu_model, {layer: exact[layer]}, prompts, live_log10_threshold=math.log10(0.05),
                                    progress=False)[1].n_live_features[0] == live


def test_plain_token_lists_have_no_answer_metrics(relu_model, exact):
    report, _ = evaluate_replacement(relu_model, exact, random_prompts(3), progress=False)
    assert report.n_answer_tokens == 0 and report.to_dict()["answer_loss_original"] is None


def test_replacement_errors(relu_model, exact):
    with pytest.raises(ValueError, match=r"no transcoder for layers \[2\]"):
        with replace_mlps(relu_model, {0: exact[0]}, layers=[0, 2]):
            pass
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        with remove_mlps(relu_model, layers=[7]):
            pass
    wrong = Transcoder(TranscoderConfig(d_model=32, d_transcoder=256, layer=0))
    with pytest.raises(ValueError, match="d_model 64"):
        evaluate_replacement(relu_model, {0: wrong}, [[1, 2, 3]], progress=False)
