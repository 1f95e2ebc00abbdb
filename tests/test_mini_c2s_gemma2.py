"""The mini-C2S built as a Gemma-2 (``MiniC2SConfig(architecture="gemma2")``): same data, loop and cache."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import pytest
import torch
from transformers import Gemma2ForCausalLM

import c2srepro.models.mini_c2s as mini_c2s
from c2srepro.data.prompts import C2S_CELL_TYPE_TEMPLATE, answer_text, build_prompt, pad_right
from c2srepro.models.adapters import Gemma2Adapter
from c2srepro.models.hooked import HookedModel, hook_name
from c2srepro.models.load import load_c2s_model
from c2srepro.models.mini_c2s import (
    GEMMA2_SLIDING_WINDOW, MiniC2SConfig, _key_material, _LoopState, _save_checkpoint, cache_key, checkpoint_path,
    pbmc_split, train_mini_c2s, training_meta,
)
from c2srepro.models.predict import score_labels

TINY = dict(n_layers=2, d_model=32, n_heads=2, epochs=1, top_k=16, batch_size=32, architecture="gemma2")  # 18 steps
# Prompts of 64 genes (~270 tokens, past the sliding window) in the words of the top-16 prompts
# the tiny model's vocabulary was built from.
LONG_TEMPLATE = C2S_CELL_TYPE_TEMPLATE.replace("{num_genes}", "16")


def long_prompts(tokenizer, n: int):
    cells = pbmc_split(MiniC2SConfig(**{**TINY, "top_k": 64})).cells("heldout")[:n]
    prompts = [tokenizer.encode(build_prompt(cell, template=LONG_TEMPLATE).text)[0] for cell in cells]
    assert min(map(len, prompts)) > GEMMA2_SLIDING_WINDOW
    return cells, prompts


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return train_mini_c2s(MiniC2SConfig(**TINY), directory=tmp_path_factory.mktemp("gemma2") / "tiny")


def test_an_unknown_architecture_or_odd_gemma2_heads_are_refused_by_name():
    with pytest.raises(ValueError, match=r"architecture must be one of 'gpt_neox', 'gemma2', got 'llama'"):
        MiniC2SConfig(architecture="llama")
    with pytest.raises(ValueError, match=r"shares each key/value head between two query heads: n_heads must be even, got 3"):
        MiniC2SConfig(d_model=96, n_heads=3, architecture="gemma2")
    MiniC2SConfig(d_model=96, n_heads=3)  # GPT-NeoX has no key/value groups
    cfg = MiniC2SConfig(architecture="gemma2")
    assert MiniC2SConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_the_default_cache_key_is_the_one_of_models_trained_before_the_architecture_field():
    default = MiniC2SConfig()
    # What the key hashed before the field existed: every other field, under the same names.
    before = [field.name for field in dataclasses.fields(MiniC2SConfig) if field.name != "architecture"]
    material = _key_material(default)
    assert sorted(material["config"]) == sorted(before)
    old = {**material, "config": {name: getattr(default, name) for name in before}}
    assert cache_key(default) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cache_key(MiniC2SConfig(architecture="gpt_neox")) == cache_key(default)
    gemma2 = MiniC2SConfig(architecture="gemma2")
    assert cache_key(gemma2) != cache_key(default) and _key_material(gemma2)["config"]["architecture"] == "gemma2"


def test_a_gemma2_mini_has_gemma2s_choices(tiny_model):
    model, tokenizer = load_c2s_model(tiny_model)
    config = model.config
    assert isinstance(model, Gemma2ForCausalLM) and config.model_type == "gemma2"
    assert config.layer_types == ["sliding_attention", "full_attention"]
    assert config.sliding_window == GEMMA2_SLIDING_WINDOW
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.attn_logit_softcapping == 50.0 and config.final_logit_softcapping == 30.0
    assert config.intermediate_size == 4 * config.hidden_size and config.hidden_activation == "gelu_pytorch_tanh"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as Gemma
    assert config.vocab_size == tokenizer.vocab_size < 2000
    assert training_meta(tiny_model)["config"]["architecture"] == "gemma2"


def test_the_hooked_forward_of_a_gemma2_mini_is_its_forward(tiny_model):
    model, tokenizer = load_c2s_model(tiny_model)
    _, prompts = long_prompts(tokenizer, 2)
    prompts[1] = prompts[1][:-20]  # a padded batch
    ids, mask = pad_right(prompts, pad_id=tokenizer.pad_id)
    hooked = HookedModel(model)
    assert isinstance(hooked.adapter, Gemma2Adapter)
    logits, _ = hooked.run_with_cache(ids, [hook_name(1, "hook_mlp_out")], attention_mask=mask)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model(input_ids=torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(logits[row, : len(prompt)], alone, atol=1e-5, rtol=1e-5)
    # Replacing each MLP by itself through the hooks leaves the logits where they were.
    # Copies: the hooked modules themselves would call their hooks again.
    halves = {layer: copy.deepcopy(model.model.layers[layer]) for layer in range(2)}
    post = lambda half: lambda x: half.post_feedforward_layernorm(half.mlp(x))  # noqa: E731
    with torch.no_grad(), hooked.replace_mlps({layer: post(half) for layer, half in halves.items()}):
        replaced = hooked.forward(ids, attention_mask=mask)
    torch.testing.assert_close(replaced, logits, atol=1e-6, rtol=0)


def test_cached_label_scores_equal_a_full_forward_past_the_sliding_window(tiny_model):
    # The prompt's key/value cache of a sliding layer keeps only the window: scoring must not notice.
    model, tokenizer = load_c2s_model(tiny_model)
    (cell,), (prompt,) = long_prompts(tokenizer, 1)
    labels = pbmc_split(MiniC2SConfig(**TINY)).labels
    scores = score_labels(model, tokenizer, [cell], labels, template=LONG_TEMPLATE)[0]
    for label, score in zip(labels, scores):
        answer = tokenizer.encode(answer_text(label))[0]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
        expected = sum(log_probs[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))
        assert score == pytest.approx(expected, abs=1e-4), label


class _Interrupted(Exception):
    pass


def test_an_interrupted_gemma2_run_resumes_to_the_same_weights(tiny_model, tmp_path, monkeypatch):
    loss, calls = mini_c2s.weighted_lm_loss, [0]

    def interrupted_at_step_11(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 11:
            raise _Interrupted
        return loss(*args, **kwargs)

    monkeypatch.setattr(mini_c2s, "weighted_lm_loss", interrupted_at_step_11)
    with pytest.raises(_Interrupted):
        train_mini_c2s(MiniC2SConfig(**TINY), directory=tmp_path / "model")  # a checkpoint every 2 steps
    assert checkpoint_path(tmp_path / "model").is_file()
    monkeypatch.setattr(mini_c2s, "weighted_lm_loss", loss)
    resumed = train_mini_c2s(MiniC2SConfig(**TINY), directory=tmp_path / "model")
    assert training_meta(resumed)["resumed_at_steps"] == [10]
    for name in ("model.safetensors", "config.json", "vocab_map.json"):
        assert (resumed / name).read_bytes() == (tiny_model / name).read_bytes(), name


def test_a_gpt_neox_checkpoint_is_refused_by_a_gemma2_run(tmp_path):
    neox, gemma2 = MiniC2SConfig(**{**TINY, "architecture": "gpt_neox"}), MiniC2SConfig(**TINY)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for cfg, other in ((gemma2, neox), (neox, gemma2)):  # either way round: the default leaves the key
        _save_checkpoint(checkpoint_path(tmp_path / "model"), other, model, optimizer, scheduler,
                         _LoopState(history=[], losses=[], step=3))
        with pytest.raises(ValueError, match=r"written with different \['config.architecture'\]: train with the same"):
            train_mini_c2s(cfg, directory=tmp_path / "model")
