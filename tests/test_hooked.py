"""The hooked-model layer: hook points against transformers' own modules and outputs, writing
through hooks, the architecture adapter's error, and the transcoder fit check's messages."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny_neox import VOCAB, tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from c2srepro.data.prompts import pad_right
from c2srepro.models.hooked import SHAPES, HookedModel, hook_name
from c2srepro.transcoder import Transcoder, TranscoderConfig
from c2srepro.transcoder.fit import check_transcoders_fit
from c2srepro.transcoder.harvest import HOOK_POINT

PROMPTS = [[5, 9, 11, 3, 40, 7, 2], [8, 1, 60, 33]]


def module_io(model, ids, mask):
    """{layer: (mlp input, mlp output, layer input, layer output)} read by plain PyTorch hooks on transformers' modules."""
    record, handles = {}, []
    for layer, block in enumerate(model.gpt_neox.layers):
        handles.append(block.mlp.register_forward_hook(
            lambda m, args, out, layer=layer: record.__setitem__(("mlp", layer), (args[0], out))))
        handles.append(block.register_forward_hook(
            lambda m, args, out, layer=layer: record.__setitem__(("block", layer), (args[0], out))))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for handle in handles:
        handle.remove()
    return record, logits


@pytest.mark.parametrize("parallel", [True, False])
def test_hook_points_have_their_shapes_and_equal_the_modules_values(parallel):
    model = tiny_model(parallel=parallel)
    hooked = HookedModel(model)
    ids, mask = pad_right(PROMPTS)
    names = list(hooked.hook_points)
    assert len(names) == 3 * len(SHAPES)
    logits, cache = hooked.run_with_cache(ids, names, attention_mask=mask)
    record, reference_logits = module_io(model, ids, mask)
    assert torch.equal(logits, reference_logits)
    sizes = {"batch": 2, "pos": 7, "d_model": 64, "head": 4, "q": 7, "k": 7}
    for name in names:
        point = hooked.hook_point(name)
        assert tuple(cache[name].shape) == tuple(sizes[axis] for axis in point.shape.split()), name
    for layer in range(3):
        mlp_in, mlp_out = record[("mlp", layer)]
        resid_pre, resid_post = record[("block", layer)]
        assert torch.equal(cache[hook_name(layer, "hook_mlp_in")], mlp_in)
        assert torch.equal(cache[hook_name(layer, "hook_mlp_out")], mlp_out)
        assert torch.equal(cache[hook_name(layer, "hook_resid_pre")], resid_pre)
        assert torch.equal(cache[hook_name(layer, "hook_resid_post")], resid_post)
    # The MLP input is its layer norm's output: of r_l (parallel) or of r_l + attention (sequential).
    block = model.gpt_neox.layers[1]
    with torch.no_grad():
        ln_of_resid = block.post_attention_layernorm(cache["blocks.1.hook_resid_pre"])
    assert torch.allclose(cache["blocks.1.hook_mlp_in"], ln_of_resid, atol=1e-12) == parallel


def test_attention_pattern_equals_transformers_eager_attentions():
    model = tiny_model()
    model.set_attn_implementation("eager")
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        attentions = model(input_ids=ids, output_attentions=True).attentions
    _, cache = HookedModel(model).run_with_cache(ids, [hook_name(layer, "attn.hook_pattern") for layer in range(3)])
    for layer in range(3):
        pattern = cache[hook_name(layer, "attn.hook_pattern")]
        # transformers' eager softmax runs in float32 even for a float64 model; the adapter keeps float64.
        torch.testing.assert_close(pattern, attentions[layer], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
        assert float(pattern.triu(1).abs().max()) == 0.0  # causal


def test_writing_mlp_outputs_changes_the_logits_as_expected():
    model = tiny_model()
    hooked = HookedModel(model)
    ids, mask = pad_right(PROMPTS)
    original = hooked.forward(ids, attention_mask=mask)
    mlp = model.gpt_neox.layers[1].mlp
    twin = copy.deepcopy(mlp)  # calling the hooked module itself inside its hook would recurse
    with hooked.replace_mlps({1: twin}):  # the MLP as its own replacement: nothing changes
        assert torch.equal(hooked.forward(ids, attention_mask=mask), original)
    shift = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with hooked.replace_mlps({1: lambda x: twin(x) + shift}):
        shifted = hooked.forward(ids, attention_mask=mask)
    handle = mlp.register_forward_hook(lambda m, args, out: out + shift)  # the same shift, by hand
    try:
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, shifted)
    finally:
        handle.remove()
    assert (shifted - original).abs().max() > 1e-3
    # Writing hook_mlp_out directly; an MLP output of zeros is the residual without that MLP.
    with hooked.hooks({"blocks.2.hook_mlp_out": lambda out, point: torch.zeros_like(out)}):
        removed = hooked.forward(ids, attention_mask=mask)
    _, cache = hooked.run_with_cache(ids, ["blocks.2.hook_resid_pre", "blocks.2.hook_mlp_out"], attention_mask=mask)
    with hooked.hooks({"blocks.2.hook_resid_post": lambda r, point: r - cache["blocks.2.hook_mlp_out"]}):
        torch.testing.assert_close(hooked.forward(ids, attention_mask=mask), removed, atol=1e-12, rtol=1e-12)
    assert torch.equal(hooked.forward(ids, attention_mask=mask), original)  # every hook is gone


def test_cache_stops_once_complete_and_hooks_go_away_on_error():
    model = tiny_model()
    hooked = HookedModel(model)
    ids, mask = pad_right(PROMPTS)
    calls = []
    handle = model.gpt_neox.layers[2].register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        early = hooked.cache(ids, ["blocks.1.hook_mlp_in", "blocks.0.hook_mlp_out"], attention_mask=mask)
    finally:
        handle.remove()
    assert calls == []  # layer 2 never ran
    _, full = hooked.run_with_cache(ids, ["blocks.1.hook_mlp_in"], attention_mask=mask)
    assert torch.equal(early["blocks.1.hook_mlp_in"], full["blocks.1.hook_mlp_in"])
    with torch.no_grad(), hooked.caching(["blocks.1.hook_mlp_in"]) as cache:  # every pass runs to the end
        assert hooked.forward(ids[:1], attention_mask=mask[:1]) is not None
        assert hooked.forward(ids, attention_mask=mask) is not None
    assert torch.equal(cache["blocks.1.hook_mlp_in"], full["blocks.1.hook_mlp_in"])  # the last pass wins
    with pytest.raises(RuntimeError, match="boom"):
        with hooked.hooks({"blocks.0.hook_mlp_out": lambda out, point: out * 0}):
            raise RuntimeError("boom")
    assert all(not block.mlp._forward_hooks and not block.mlp._forward_pre_hooks for block in model.gpt_neox.layers)


def test_hook_point_errors():
    hooked = HookedModel(tiny_model())
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match=r"no hook point 'blocks.3.hook_mlp_in': the model has .* for L in 0..2"):
        hooked.run_with_cache(ids, ["blocks.3.hook_mlp_in"])
    with pytest.raises(ValueError, match="blocks.0.attn.hook_pattern is read-only"):
        with hooked.hooks({"blocks.0.attn.hook_pattern": lambda pattern, point: pattern * 2}):
            hooked.forward(ids)


def test_an_unsupported_architecture_is_refused_with_the_supported_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=16))
    message = (r"GPT2LMHeadModel \(config.model_type 'gpt2'\) is not a supported architecture; c2srepro supports "
               r"transformers causal LMs with model_type 'gemma2' \(Gemma-2 \(C2S-Scale-Gemma-2\)\), 'gpt_neox' "
               r"\(GPT-NeoX \(Pythia\)\)")
    with pytest.raises(ValueError, match=message):
        HookedModel(gpt2)
    with pytest.raises(ValueError, match=r"Linear \(config.model_type None\) is not a supported architecture"):
        check_transcoders_fit(torch.nn.Linear(2, 2), [])


def transcoder(layer: int, *, d_model: int = 64, hook_point: str | None = None) -> Transcoder:
    return Transcoder(TranscoderConfig(d_model=d_model, d_transcoder=2 * d_model, layer=layer, hook_point_in=hook_point))


def test_the_fit_check_accepts_fitting_transcoders():
    model = tiny_model()
    tcs = [transcoder(layer, hook_point=HOOK_POINT.format(layer=layer)) for layer in range(3)]
    assert HOOK_POINT.format(layer=1) == "blocks.1.hook_mlp_in"
    assert list(check_transcoders_fit(model, tcs, every_layer=True)) == [0, 1, 2]
    assert check_transcoders_fit(model, {2: tcs[2], 0: tcs[0]}) == {0: tcs[0], 2: tcs[2]}
    assert check_transcoders_fit(model, tcs, layers=[1]) == {1: tcs[1]}
    assert check_transcoders_fit(HookedModel(model), [tcs[1]]) == {1: tcs[1]}  # a HookedModel fits as well


@pytest.mark.parametrize(
    ("transcoders", "options", "error", "message"),
    [
        (lambda: transcoder(0), {}, ValueError, "not a single Transcoder"),
        (lambda: "layer_00", {}, TypeError, r"dict or a list of Transcoders, got str; load them with"),
        (lambda: [transcoder(0), {"W_enc": 1}], {}, TypeError, r"transcoders\[1\] must be a c2srepro Transcoder, got dict"),
        (lambda: [transcoder(1), transcoder(1)], {}, ValueError, "two transcoders say they are for layer 1"),
        (lambda: [transcoder(0), transcoder(2), transcoder(1)], {}, ValueError,
         r"transcoders\[1\] was configured for layer 2; pass one transcoder per layer, in layer order"),
        (lambda: {0: transcoder(2)}, {}, ValueError, r"transcoders\[0\] was configured for layer 2"),
        (lambda: [transcoder(5)], {}, ValueError, r"transcoders for layers \[5\] do not fit: the model has layers 0..2"),
        (lambda: [transcoder(0), transcoder(1)], {"every_layer": True}, ValueError,
         "got 2 transcoders for a model with 3 layers; pass one per MLP layer"),
        (lambda: {0: transcoder(0), 2: transcoder(2)}, {"every_layer": True}, ValueError,
         r"no transcoder for layers \[1\]: pass one for each of layers \[0, 1, 2\] \(attribution replaces every MLP\)"),
        (lambda: {0: transcoder(0)}, {"layers": [0, 2]}, ValueError, r"no transcoder for layers \[2\]: .*or choose layers"),
        (lambda: {0: transcoder(0)}, {"layers": [9]}, ValueError, r"layers \[9\] do not exist"),
        (lambda: [transcoder(0, d_model=32)], {}, ValueError,
         r"transcoders of layers \[0\] do not have the model's d_model 64 \(they have \[32\]\)"),
        (lambda: [transcoder(0, hook_point="gpt_neox.layers.0.mlp")], {}, ValueError,
         r"layer-0 transcoder was trained at hook point 'gpt_neox.layers.0.mlp', but c2srepro applies it at "
         r"'blocks.0.hook_mlp_in'"),
    ],
)
def test_the_fit_check_names_what_does_not_fit(transcoders, options, error, message):
    with pytest.raises(error, match=message):
        check_transcoders_fit(tiny_model(), transcoders(), **options)


def test_the_fit_check_refuses_weights_of_another_width():
    tc = transcoder(0)
    tc.W_enc = torch.nn.Parameter(torch.zeros(64, 100))
    with pytest.raises(ValueError, match=r"layer-0 transcoder's W_enc is \[64, 100\] but its config \(width d_tc 128"):
        check_transcoders_fit(tiny_model(), [tc])
