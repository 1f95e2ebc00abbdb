"""Gemma-2 behind the adapter interface: the documented forward against transformers' logits, hook
points against transformers' own modules, attention patterns against its eager attention weights,
and harvesting, training, replacement and feature statistics running unchanged on it; the
linearised replacement against transformers' logits, its attributions and adjacency rows against
torch autograd; transcoders of one architecture refused by the other, and an unsupported
architecture refused."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from _tc_models import FakeEncodedPrompts, random_prompts, small_model
from _tiny_gemma2 import VOCAB, tiny_gemma2
from _tiny_neox import tiny_transcoders
from transformers import LlamaConfig, LlamaForCausalLM

from c2srepro.attribution import Node, build_replacement
from c2srepro.attribution.contributions import attribute, head_contributions
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.attribution.full_graph import build_graph
from c2srepro.data.prompts import pad_right
from c2srepro.features import collect_feature_stats
from c2srepro.models.adapters import Gemma2Adapter, adapter_for
from c2srepro.models.adapters.gemma2 import (
    attention_output,
    attention_pattern,
    rms_norm,
    rms_scale,
    rotary_cos_sin,
    softcap,
)
from c2srepro.models.hooked import HookedModel, hook_name
from c2srepro.transcoder import (
    TrainConfig,
    evaluate_replacement,
    harvest_activations,
    replace_mlps,
    train_transcoders,
)
from c2srepro.transcoder.fit import check_transcoders_fit

PROMPTS = [[5, 9, 11, 3, 40, 7, 2, 17, 60, 33, 8, 91], [8, 1, 60, 33, 4, 4, 70]]  # 12 and 7 tokens
WINDOWS = [pytest.param(5, id="window-inside-prompt"), pytest.param(None, id="window-wider-than-prompt")]


def documented_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """The forward of the adapter's docstring for one prompt, written out from its weights."""
    adapter = adapter_for(model)
    weights = adapter.weights
    cos, sin = rotary_cos_sin(weights, len(ids))
    r = weights.embed[ids]
    for layer, lw in enumerate(weights.layers):
        block = adapter.decoder_layers()[layer]
        x = rms_norm(r, rms_scale(r, weights.eps), lw.input_gain)
        a = attention_output(weights, lw, x, attention_pattern(weights, lw, x, cos, sin))
        r = r + rms_norm(a, rms_scale(a, weights.eps), lw.post_attention_gain)
        m_in = rms_norm(r, rms_scale(r, weights.eps), lw.pre_feedforward_gain)
        mlp = block.mlp
        m = mlp.down_proj(torch.nn.functional.gelu(mlp.gate_proj(m_in), approximate="tanh") * mlp.up_proj(m_in))
        r = r + rms_norm(m, rms_scale(m, weights.eps), 1.0 + block.post_feedforward_layernorm.weight)
    u = rms_norm(r, rms_scale(r, weights.eps), weights.final_gain) @ weights.W_U.T
    return softcap(u, weights.final_softcap)


@pytest.mark.parametrize("window", WINDOWS)
def test_the_documented_forward_equals_transformers_logits(window):
    model = tiny_gemma2(sliding_window=window)
    for prompt in PROMPTS:
        ids = torch.tensor(prompt)
        with torch.no_grad():
            reference = model(input_ids=ids[None]).logits[0]
            ours = documented_forward(model, ids)
        # transformers computes each RMS norm in float32, so a float64 model agrees to ~1e-7.
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
        assert float(reference.abs().max()) < model.config.final_logit_softcapping  # capped
        assert float((ours - reference).abs().max()) < 1e-3 * float(reference.std())


def module_io(model, ids):
    """Per layer, values read by plain PyTorch hooks on transformers' modules, and the logits
    (no attention mask: right padding needs none under causal attention, see
    ``Gemma2Adapter.model_attention_mask``)."""
    record, handles = {}, []

    def keep(key, value):
        record[key] = value

    for layer, block in enumerate(model.model.layers):
        handles += [
            block.register_forward_hook(lambda m, args, out, layer=layer: keep(("block", layer), (args[0], out))),
            block.mlp.register_forward_pre_hook(lambda m, args, layer=layer: keep(("mlp_in", layer), args[0])),
            block.pre_feedforward_layernorm.register_forward_pre_hook(
                lambda m, args, layer=layer: keep(("resid_mid", layer), args[0])),
            block.post_feedforward_layernorm.register_forward_hook(
                lambda m, args, out, layer=layer: keep(("mlp_out", layer), out)),
        ]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for handle in handles:
        handle.remove()
    return record, logits


@pytest.mark.parametrize("window", WINDOWS)
def test_hook_points_equal_the_modules_values_and_leave_the_logits_alone(window):
    model = tiny_gemma2(sliding_window=window)
    hooked = HookedModel(model)
    assert isinstance(hooked.adapter, Gemma2Adapter)
    ids, mask = pad_right(PROMPTS)
    names = list(hooked.hook_points)
    logits, cache = hooked.run_with_cache(ids, names, attention_mask=mask)
    record, reference = module_io(model, ids)
    assert torch.equal(logits, reference)  # reading every hook point changes nothing
    # Real tokens of the padded batch have the values of their prompt run alone (finite, although
    # the 5 padded positions of the short prompt fill a whole sliding window).
    alone_logits, alone = hooked.run_with_cache(torch.tensor([PROMPTS[1]]), names)
    n = len(PROMPTS[1])
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1, :n], alone_logits[0], atol=1e-12, rtol=0)
    for name in names:
        value = cache[name][1, :, :n, :n] if name.endswith("hook_pattern") else cache[name][1, :n]
        torch.testing.assert_close(value, alone[name][0], atol=1e-12, rtol=0)
    sizes = {"batch": 2, "pos": 12, "d_model": 64, "head": 4, "q": 12, "k": 12}
    for name in names:
        assert tuple(cache[name].shape) == tuple(sizes[axis] for axis in hooked.hook_point(name).shape.split()), name
    for layer in range(3):
        resid_pre, resid_post = record[("block", layer)]
        assert torch.equal(cache[hook_name(layer, "hook_resid_pre")], resid_pre)
        assert torch.equal(cache[hook_name(layer, "hook_resid_post")], resid_post)
        assert torch.equal(cache[hook_name(layer, "hook_mlp_in")], record[("mlp_in", layer)])
        # hook_mlp_out is what the feed-forward half adds: after the post-feed-forward norm.
        assert torch.equal(cache[hook_name(layer, "hook_mlp_out")], record[("mlp_out", layer)])
        torch.testing.assert_close(
            resid_post, record[("resid_mid", layer)] + cache[hook_name(layer, "hook_mlp_out")], atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("window", WINDOWS)
def test_attention_pattern_equals_transformers_eager_attention_weights(window):
    model = tiny_gemma2(sliding_window=window)
    hooked = HookedModel(model)
    ids, mask = pad_right(PROMPTS)
    with torch.no_grad():  # each prompt alone (a float64 Gemma-2 given padding makes NaNs: model_attention_mask)
        attentions = [model(input_ids=torch.tensor([p]), output_attentions=True).attentions for p in PROMPTS]
    names = [hook_name(layer, point) for layer in range(3) for point in ("attn.hook_pattern", "hook_resid_pre")]
    _, cache = hooked.run_with_cache(ids, names, attention_mask=mask)
    uncapped = dataclasses.replace(hooked.adapter.weights, attn_softcap=None)
    t, s = torch.arange(12)[:, None], torch.arange(12)[None]
    for layer in range(3):
        pattern = cache[hook_name(layer, "attn.hook_pattern")]
        for b, prompt in enumerate(PROMPTS):  # real tokens only: rows of padded positions are meaningless
            n = len(prompt)
            # transformers' eager softmax runs in float32 even for a float64 model; the adapter keeps float64.
            torch.testing.assert_close(pattern[b, :, :n, :n], attentions[b][layer][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
        assert float(pattern[..., s > t].abs().max()) == 0.0  # causal
        sliding = window is not None and layer != 1  # layers 0 and 2 slide, layer 1 is global
        far = pattern[0][..., s <= t - 5]
        assert float(far.abs().max()) == 0.0 if sliding else float(far.min()) > 0.0
        # The soft-cap bends these scores: the same pattern without it is visibly different.
        with torch.no_grad():
            x = model.model.layers[layer].input_layernorm(cache[hook_name(layer, "hook_resid_pre")])
        cos, sin = rotary_cos_sin(uncapped, 12)
        without_cap = attention_pattern(uncapped, uncapped.layers[layer], x, cos, sin)
        assert float((without_cap[0] - pattern[0]).abs().max()) > 1e-2


# --------------------------------------------------------------------------- the transcoder pipeline

QUICK = TrainConfig(expansion_factor=2, tokens_per_batch=64, buffer_tokens=256, lr=1e-3, log_every_steps=1,
                    resample_every_steps=0)


def gene_prompts(n: int) -> FakeEncodedPrompts:
    """Random prompts (5..39 tokens: many pad a batch by more than the sliding window) in which
    tokens below 20 stand for genes."""
    prompts = random_prompts(n)
    return FakeEncodedPrompts(
        input_ids=prompts,
        answer_start=[len(p) - 2 for p in prompts],
        cell_index=list(range(n)),
        gene_of_token=[[f"G{token}" if token < 20 else None for token in p] for p in prompts],
    )


def module_mlp_io(model, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (MLP input, post-feed-forward norm output)} of one prompt, by plain PyTorch hooks."""
    record, handles = {}, []
    for layer, block in enumerate(model.model.layers):
        handles += [
            block.mlp.register_forward_pre_hook(
                lambda m, args, layer=layer: record.__setitem__(("in", layer), args[0][0])),
            block.post_feedforward_layernorm.register_forward_hook(
                lambda m, args, out, layer=layer: record.__setitem__(("out", layer), out[0])),
        ]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return {layer: (record[("in", layer)], record[("out", layer)]) for layer in range(len(model.model.layers))}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A float64 Gemma-2 with a 5-token sliding window, its harvest (cached) and 3 steps of training."""
    model, prompts = tiny_gemma2(), gene_prompts(10)
    directory = tmp_path_factory.mktemp("gemma2") / "harvest"
    source = harvest_activations(
        model, prompts, batch_prompts=4, directory=directory, dtype=torch.float64, progress=False
    )
    result = train_transcoders(source, QUICK, steps=3, progress=False)
    return model, prompts, source, result


def test_harvest_reads_the_gemma2_mlp_hook_points(pipeline):
    model, prompts, source, _ = pipeline
    assert source.manifest["model_type"] == "gemma2"
    assert "post_feedforward_layernorm" in source.manifest["hook_points"]["mlp_out"]
    rows = source.read_all()
    assert len(rows) == sum(map(len, prompts.input_ids))
    for i, ids in enumerate(prompts.input_ids):
        mine = rows.prompt_index == i
        order = torch.argsort(rows.position[mine])
        # transformers' RMS norms run in float32: batched and single runs agree to ~1e-7.
        for layer, (x, y) in module_mlp_io(model, ids).items():
            torch.testing.assert_close(rows.mlp_in[layer][mine][order], x, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rows.mlp_out[layer][mine][order], y, atol=1e-5, rtol=1e-5)


def test_training_replacement_and_feature_statistics_run_on_gemma2(pipeline):
    model, prompts, _, result = pipeline
    assert result.complete and result.step == 3 and sorted(result.transcoders) == [0, 1, 2]
    assert np.isfinite(result.history["loss"]).all()
    for layer, tc in result.transcoders.items():
        assert (tc.cfg.model_type, tc.cfg.d_model, tc.cfg.d_transcoder, tc.cfg.layer) == ("gemma2", 64, 128, layer)
    report, per_layer = evaluate_replacement(model, result.transcoders, prompts, batch_prompts=4, progress=False)
    assert report.layers == [0, 1, 2] and report.n_tokens == sum(len(p) - 1 for p in prompts.input_ids)
    values = [report.loss_original, report.loss_transcoder, report.loss_no_mlp, report.kl_transcoder, report.kl_no_mlp]
    assert np.isfinite(values).all() and report.kl_no_mlp > 0 and report.loss_no_mlp != report.loss_original
    assert list(per_layer["layer"]) == [0, 1, 2] and np.isfinite(per_layer["fvu"]).all()
    # The replacement writes each transcoder's output where the post-feed-forward norm's went.
    ids, tc = torch.tensor([prompts.input_ids[0]]), result.transcoders[1]
    hooked = HookedModel(model)
    x = hooked.cache(ids, ["blocks.1.hook_mlp_in"])["blocks.1.hook_mlp_in"]  # layer 0 is not replaced
    with torch.no_grad(), hooked.hooks({"blocks.1.hook_mlp_out": lambda out, point: tc(x.float()).to(out.dtype)}):
        by_hand = hooked.forward(ids)
    with torch.no_grad(), replace_mlps(model, result.transcoders, layers=[1]):
        replaced = hooked.forward(ids)
    with torch.no_grad():
        original = hooked.forward(ids)
    assert torch.equal(replaced, by_hand)
    assert float((replaced - original).abs().max()) > 1e-4
    # Feature statistics: firing counts against the transcoders applied to the modules' MLP inputs.
    stats = collect_feature_stats(model, result.transcoders, prompts, batch_size=3, progress=False)
    for layer, tc in result.transcoders.items():
        with torch.no_grad():
            encoder = copy.deepcopy(tc).double()
            z = torch.cat([encoder.encode(module_mlp_io(model, ids)[layer][0]) for ids in prompts.input_ids])
        np.testing.assert_array_equal(stats[layer].features["n_fire"], (z > 0).sum(0).numpy())


# --------------------------------------------------------------------------- bad input


def test_transcoders_of_one_architecture_are_refused_by_the_other(pipeline):
    gemma, prompts, _, trained = pipeline
    neox = small_model(n_layers=3, d_model=64)  # same width and depth: only the architecture differs
    neox_trained = train_transcoders(harvest_activations(neox, prompts, progress=False), QUICK, steps=1, progress=False)
    assert neox_trained.transcoders[0].cfg.model_type == "gpt_neox"  # streamed harvest: from the model itself
    with pytest.raises(ValueError, match=(
        r"the transcoders of layers \[0, 1, 2\] were trained on a 'gpt_neox' \(GPT-NeoX \(Pythia\)\) model, but this "
        r"model is 'gemma2' \(Gemma-2 \(C2S-Scale-Gemma-2\)\): a transcoder reads and writes one architecture's MLP "
        r"activations; train transcoders on this model")):
        check_transcoders_fit(gemma, neox_trained.transcoders)
    with pytest.raises(ValueError, match=r"layers \[1\] were trained on a 'gemma2' .* but this model is 'gpt_neox'"):
        with replace_mlps(neox, trained.transcoders, layers=[1]):
            pass
    with pytest.raises(ValueError, match="trained on a 'gemma2'"):
        evaluate_replacement(neox, trained.transcoders, prompts, progress=False)
    assert list(check_transcoders_fit(neox, neox_trained.transcoders)) == [0, 1, 2]


def test_an_unsupported_architecture_gets_the_list_of_supported_ones():
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    ))
    with pytest.raises(ValueError, match=(
        r"LlamaForCausalLM \(config.model_type 'llama'\) is not a supported architecture; c2srepro supports "
        r"transformers causal LMs with model_type 'gemma2' \(Gemma-2 \(C2S-Scale-Gemma-2\)\), 'gpt_neox' "
        r"\(GPT-NeoX \(Pythia\)\)\. .*add an adapter module to c2srepro/models/adapters/")):
        HookedModel(llama)
    with pytest.raises(ValueError, match="'llama'.* is not a supported architecture"):
        harvest_activations(llama, [[1, 2, 3]], progress=False)


def test_a_bidirectional_gemma2_is_refused():
    model = tiny_gemma2(n_layers=1)
    model.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention=True; c2srepro reads causal language models"):
        HookedModel(model)


# --------------------------------------------------------------------------- the linearised replacement

N_POS = 14  # longer than the 5-token sliding window


@pytest.fixture(scope="module", params=WINDOWS)
def replacement(request):
    model = tiny_gemma2(sliding_window=request.param)
    ids = torch.randint(0, VOCAB, (N_POS,), generator=torch.Generator().manual_seed(1))
    return model, ids, build_replacement(model, tiny_transcoders(model, ids), ids)


def strongest_active(rep, layer):
    """The active feature of ``layer`` at the last position where one fires, largest there."""
    position = int(rep.active[layer].position.max())
    return Node.feature(layer, position, rep.top_features(layer, position, 1)[0][0])


def autograd_sources(rep, target):
    """activation x gradient of the target w.r.t. every source, by torch autograd in the frozen model
    whose inputs are the recorded sources (the active features of the real run, not re-encoded from
    the frozen residual, which differs from transformers' by its float32 norms)."""
    acts = []
    for act, tc in zip(rep.active, rep.transcoders):
        z = rep.errors.new_zeros(rep.n_pos, tc.d_tc)
        z[act.position, act.feature] = act.activation
        acts.append(z.requires_grad_())
    emb = rep.weights.embed[rep.input_ids].clone().requires_grad_()
    err = rep.errors.clone().requires_grad_()
    value = replacement_forward(rep, feature_acts=acts, embeddings=emb, errors=err).value(target)
    emb_grad, err_grad, *act_grads = torch.autograd.grad(value, [emb, err, *acts], materialize_grads=True)
    features = [(z * g).detach() for z, g in zip(acts, act_grads)]
    bias = torch.einsum("lsd,ld->ls", err_grad, rep.written_bias)  # a bias in r_{l+1} meets e_l's gradient
    return float(value.detach()), features, (emb * emb_grad).sum(-1).detach(), (err * err_grad).sum(-1).detach(), bias


@pytest.mark.parametrize("freeze", [True, False])
def test_the_replacement_with_error_nodes_reproduces_transformers_logits(replacement, freeze):
    model, ids, rep = replacement
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    out = replacement_forward(rep, freeze=freeze)
    # transformers' RMS norms run in float32: the float64 replacement agrees to ~1e-7.
    torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=1e-5)
    assert rep.errors.abs().max() > 0.1  # random transcoders: exactness rests on the error terms
    assert (rep.run.final_softcap_ratio - 1).abs().max() > 0.05  # the final soft-cap bends these logits


def test_contributions_are_complete_and_equal_autograd(replacement):
    _, _, rep = replacement
    targets = [strongest_active(rep, layer) for layer in range(rep.n_layers)] + [rep.logit_node(N_POS - 1, 5)]
    for target in targets:
        result = attribute(rep, target)
        value, features, embedding, error, bias = autograd_sources(rep, target)
        assert result.total() == pytest.approx(value, rel=1e-10, abs=1e-12)  # complete in the frozen model
        assert result.value == pytest.approx(value, rel=1e-5, abs=1e-6)  # ... which is the model's value
        for layer, act in enumerate(rep.active):
            torch.testing.assert_close(result.features[layer], features[layer][act.position, act.feature],
                                       atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(result.embedding, embedding, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(result.error, error, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(result.bias, bias, atol=1e-12, rtol=1e-9)
        if target.position > 0:  # earlier positions reach the target through attention
            assert result.embedding[: target.position].abs().max() > 1e-6
    # A layer-0 feature reads r_0 + Attn_0(r_0): the embeddings of earlier positions reach it.
    assert attribute(rep, targets[0]).embedding[: targets[0].position].abs().max() > 1e-6


def test_adjacency_rows_equal_autograd(replacement):
    _, _, rep = replacement
    targets = [rep.logit_node(N_POS - 1, 5), strongest_active(rep, rep.n_layers - 1)]
    graph = build_graph(rep, targets, batch_size=7)
    computed = graph.nodes.index[graph.nodes["computed"]].tolist()
    for index in [graph.index_of(t) for t in targets] + computed[:: max(1, len(computed) // 12)]:
        node = graph.node(index)
        value, features, embedding, error, _ = autograd_sources(rep, node)
        reference = torch.zeros(graph.n_nodes, dtype=torch.float64)
        for i, row in graph.nodes.iterrows():
            layer, position = int(row["layer"]), int(row["position"])
            if row["kind"] == "feature":
                reference[i] = features[layer][position, int(row["feature"])]
            elif row["kind"] == "error":
                reference[i] = error[layer, position]
            elif row["kind"] == "embedding":
                reference[i] = embedding[position]
        torch.testing.assert_close(graph.adjacency[index], reference, atol=1e-12, rtol=1e-9)


def test_head_paths_add_up_and_include_the_targets_own_attention(replacement):
    _, _, rep = replacement
    target = strongest_active(rep, 2)
    result = attribute(rep, target)
    act = rep.active[1]
    earlier = (act.position < target.position).nonzero().flatten()
    i = int(earlier[result.features[1][earlier].abs().argmax()])
    source = Node.feature(1, act.position[i], act.feature[i])
    paths = head_contributions(rep, source, target)
    assert paths.residual == 0.0
    assert paths.total() == pytest.approx(result.contribution(source), rel=1e-10)
    # The layer-1 feature reaches a layer-2 transcoder only through layer 2's own attention.
    assert paths.heads[:2].abs().sum() == 0 and paths.heads[2].abs().max() > 0
