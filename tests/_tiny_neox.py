"""Small random GPT-NeoX models and transcoders for the attribution tests (shared helper, not a test)."""

from __future__ import annotations

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.attribution.linearised import run_model
from c2srepro.transcoder import Transcoder, TranscoderConfig

VOCAB = 97


def tiny_model(
    *, n_layers: int = 3, d_model: int = 64, n_heads: int = 4, max_positions: int = 64,
    parallel: bool = True, dtype: torch.dtype = torch.float64, seed: int = 0, vocab_size: int = VOCAB,
) -> GPTNeoXForCausalLM:
    """A random Pythia-shaped model with every weight, bias and layer-norm parameter perturbed (nonzero)."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        intermediate_size=4 * d_model, rotary_pct=0.25, use_parallel_residual=parallel,
        max_position_embeddings=max_positions,
    )
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.add_(0.1 * torch.randn_like(param))
    return model.to(dtype)


def tiny_transcoders(model: GPTNeoXForCausalLM, input_ids: torch.Tensor, *, expansion: int = 4,
                     firing: float = 0.05) -> list[Transcoder]:
    """Random transcoders whose encoder bias lets about ``firing`` of the features fire on ``input_ids``."""
    d_model = model.config.hidden_size
    run = run_model(model, input_ids)
    transcoders = []
    for layer in range(model.config.num_hidden_layers):
        tc = Transcoder(TranscoderConfig(d_model=d_model, d_transcoder=expansion * d_model, layer=layer), seed=100 + layer)
        tc = tc.to(model.dtype)
        with torch.no_grad():
            pre = run.mlp_in[layer] @ tc.W_enc
            tc.b_enc.copy_(-torch.quantile(pre.flatten(), 1.0 - firing) + 0.05 * torch.randn_like(tc.b_enc))
            tc.b_dec.copy_(0.1 * torch.randn_like(tc.b_dec))
        transcoders.append(tc)
    return transcoders


def tiny_setup(n_pos: int = 12, **model_kwargs):
    """(model, transcoders, input_ids) with a fixed random prompt."""
    model = tiny_model(**model_kwargs)
    input_ids = torch.randint(0, VOCAB, (n_pos,), generator=torch.Generator().manual_seed(1))
    return model, tiny_transcoders(model, input_ids), input_ids


# A cell-sentence-like prompt: template tokens (gene None) and genes split into BPE pieces.
GENES = [None, None, "VWF", "VWF", "PTPRB", "PTPRB", "PTPRB", None, "KHDRBS1", "KHDRBS1", None, None]
TOKENS = ["cell", " type", "V", "WF", " PT", "PR", "B", ",", " KHD", "RBS1", ":", "."]


def sentence_replacement():
    """The linearised replacement of the tiny model on a prompt as long as ``TOKENS``."""
    from c2srepro.attribution import build_replacement

    model, transcoders, input_ids = tiny_setup(n_pos=len(TOKENS))
    return build_replacement(model, transcoders, input_ids)
