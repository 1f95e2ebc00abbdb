"""Small random Gemma-2 models for the Gemma-2 tests (shared helper, not a test)."""

from __future__ import annotations

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

VOCAB = 101


def tiny_gemma2(
    *, n_layers: int = 3, d_model: int = 64, sliding_window: int | None = 5, attn_softcap: float | None = 1.5,
    final_softcap: float | None = 4.0, dtype: torch.dtype = torch.float64, seed: int = 0,
) -> Gemma2ForCausalLM:
    """A random Gemma-2 with every weight and norm gain perturbed: 4 query heads sharing 2
    key/value heads (grouped-query) of head_dim 12 (so heads * head_dim != d_model, as in
    Gemma-2-2B), query_pre_attn_scalar 24 (not head_dim), soft-capping tight enough to bend the
    scores and logits, and layers alternating sliding-window (0, 2) and global (1) attention.
    ``sliding_window=None`` makes the window wider than any test prompt."""
    torch.manual_seed(seed)
    config = Gemma2Config(
        vocab_size=VOCAB, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
        query_pre_attn_scalar=24, sliding_window=sliding_window or 4096, attn_logit_softcapping=attn_softcap,
        final_logit_softcapping=final_softcap, attn_implementation="eager",
    )
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(0.3 * torch.randn_like(param))  # gains 1 + weight around 1
            else:
                param.add_(0.2 * torch.randn_like(param))
    return model.to(dtype)
