"""Small random GPT-NeoX models and prompts for the transcoder tests (shared helper, not a test)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

VOCAB = 101


def small_model(*, n_layers: int = 2, d_model: int = 64, act: str = "gelu", seed: int = 0) -> GPTNeoXForCausalLM:
    """The brief's test model: hidden 64, 4 heads, MLP 256, parallel residual, rotary 25%."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=4,
        intermediate_size=4 * d_model, rotary_pct=0.25, use_parallel_residual=True,
        max_position_embeddings=256, hidden_act=act,
    )
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # make the MLPs matter: default init leaves tiny MLP outputs
        for block in model.gpt_neox.layers:
            block.mlp.dense_h_to_4h.weight.mul_(8.0)
            block.mlp.dense_4h_to_h.weight.mul_(8.0)
            block.mlp.dense_h_to_4h.bias.normal_(0, 0.5)
    return model


def random_prompts(n: int, *, low: int = 5, high: int = 40, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (length,), generator=g).tolist() for length in lengths]


@dataclass
class FakeEncodedPrompts:
    """The EncodedPrompts contract (input_ids, answer_start, cell_index, gene_of_token)."""

    input_ids: list[list[int]]
    answer_start: list[int]
    cell_index: list[int]
    gene_of_token: list[list[str | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def encoded(prompts: list[list[int]], answer_tokens: int = 3) -> FakeEncodedPrompts:
    return FakeEncodedPrompts(
        input_ids=prompts,
        answer_start=[max(1, len(p) - answer_tokens) for p in prompts],
        cell_index=[1000 + i for i in range(len(prompts))],
        gene_of_token=[[None] * len(p) for p in prompts],
    )
