"""load_c2s_model: the architectures it loads, and the one it refuses before reading weights."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from c2srepro.models.adapters import ADAPTERS
from c2srepro.models.load import load_c2s_model

from tests._tiny_gemma2 import tiny_gemma2

SUPPORTED = (r"c2srepro supports transformers causal LMs with model_type 'gemma2' \(Gemma-2 \(C2S-Scale-Gemma-2\)\), "
             r"'gpt_neox' \(GPT-NeoX \(Pythia\)\)\. ")


def tiny_llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=50_304, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    ))


def tiny_gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=50_304, n_embd=16, n_layer=1, n_head=2, n_positions=32))


@pytest.mark.parametrize("build, name, model_type", [
    (tiny_llama, "LlamaForCausalLM", "llama"), (tiny_gpt2, "GPT2LMHeadModel", "gpt2"),
])
def test_an_unsupported_architecture_is_refused_with_the_supported_ones(tmp_path, build, name, model_type):
    build().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=(
        rf"{re.escape(str(tmp_path))} holds a {name} \(config.model_type '{model_type}'\), not a supported "
        rf"architecture; {SUPPORTED}Give a C2S model of one of these \(e.g. vandijklab/C2S-Pythia-410m-cell-type-"
        r"prediction\), or add an adapter module to c2srepro/models/adapters/")):
        load_c2s_model(tmp_path)


def test_the_supported_list_is_the_adapter_registry(tmp_path, monkeypatch):
    # the message is built from ADAPTERS, not a second list: a registry without Gemma-2 names only GPT-NeoX
    monkeypatch.delitem(ADAPTERS, "gemma2")
    tiny_gemma2(n_layers=1, dtype=torch.float32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM \(config.model_type 'gemma2'\), not a supported "
                                         r"architecture; .* model_type 'gpt_neox' \(GPT-NeoX \(Pythia\)\)\. Give"):
        load_c2s_model(tmp_path)


def test_the_architecture_is_refused_before_the_weights_are_read(tmp_path):
    # a directory with a Llama config.json and no weights: the architecture, not the missing weights, is named
    tiny_llama().config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.model_type 'llama'\), not a supported architecture"):
        load_c2s_model(tmp_path)


def test_a_gemma2_directory_loads_with_the_bundled_tokenizer(tmp_path):
    model = tiny_gemma2(n_layers=2, dtype=torch.float32)
    model.config.vocab_size = 101  # the tiny model's vocabulary is smaller than any real tokenizer's
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"the tokenizer has 50277 tokens but the model only 101"):
        load_c2s_model(tmp_path)
    model = tiny_gemma2(n_layers=2, dtype=torch.float32)
    model.resize_token_embeddings(50_304)
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_c2s_model(tmp_path, dtype=torch.bfloat16)
    assert type(loaded).__name__ == "Gemma2ForCausalLM" and not loaded.training
    assert loaded.dtype == torch.bfloat16 and tokenizer.vocab_size == 50_277
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a.to(torch.bfloat16), b, msg=key)


def test_dtype_names_and_bad_dtypes():
    from c2srepro.models.load import model_dtype

    assert model_dtype(None) == torch.float32 and model_dtype("bfloat16") == torch.bfloat16
    assert model_dtype("torch.float16") == torch.float16 and model_dtype(torch.float64) == torch.float64
    for bad in ("bf16", torch.int8, 16):
        with pytest.raises(ValueError, match=r"is not a floating-point dtype for model weights; give one of "
                                             r"\['float32', 'bfloat16', 'float16', 'float64'\]"):
            model_dtype(bad)
