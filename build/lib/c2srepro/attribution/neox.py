"""A per-component forward of a Hugging Face ``GPTNeoXForCausalLM`` (Pythia) that keeps what attribution freezes.

It mirrors ``transformers.models.gpt_neox.modeling_gpt_neox`` (eval mode, parallel residual):

1. r_0 = embed_in(input_ids)                                      # one residual vector per position
2. for each layer l, both branches read the same residual r_l (``use_parallel_residual=True``):
   a. x = LN1_l(r_l) = (r_l - mean(r_l)) * sigma^-1 * g1 + b1, with sigma^-1 = 1/sqrt(var(r_l) + eps)
      the layer-norm scale of each position (the only non-linear part of a layer norm; LN2 of the
      same layer normalises the same r_l, so it has the same sigma^-1);
   b. per head h, q/k/v = x @ W_{Q,K,V}^h + b^h (``query_key_value`` rows are laid out
      [head, (q | k | v), d_head]); rotary rotates the first ``rotary_ndims`` dims of q and k;
      A^h = softmax(q k^T / sqrt(d_head) + causal mask)            # the attention pattern
      attn_out = sum_h (A^h v^h) @ W_O^h + b_O                     # ``dense`` split per head
   c. mlp_out = MLP_l(LN2_l(r_l))
   d. r_{l+1} = r_l + attn_out + mlp_out
3. logits = LNf(r_L) @ W_U^T                                        # ``lm_head`` has no bias

``run_model`` records r_l, both layer-norm scales, the patterns, the MLP inputs and outputs: the
quantities that :mod:`c2srepro.attribution.linearised` freezes. Dropout is ignored (eval semantics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerWeights:
    """Detached views of one GPT-NeoX layer's parameters, split per head."""

    ln1_weight: Float[Tensor, "d_model"]
    ln1_bias: Float[Tensor, "d_model"]
    ln2_weight: Float[Tensor, "d_model"]
    ln2_bias: Float[Tensor, "d_model"]
    W_Q: Float[Tensor, "head d_model d_head"]
    W_K: Float[Tensor, "head d_model d_head"]
    W_V: Float[Tensor, "head d_model d_head"]
    b_Q: Float[Tensor, "head d_head"]
    b_K: Float[Tensor, "head d_head"]
    b_V: Float[Tensor, "head d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_O: Float[Tensor, "d_model"]
    mlp: nn.Module  # the true MLP: the error term is its output minus the transcoder's


@dataclass(frozen=True)
class NeoXWeights:
    """Everything the per-component forward needs from a ``GPTNeoXForCausalLM``."""

    embed: Float[Tensor, "vocab d_model"]
    layers: list[LayerWeights]
    lnf_weight: Float[Tensor, "d_model"]
    lnf_bias: Float[Tensor, "d_model"]
    W_U: Float[Tensor, "vocab d_model"]
    eps: float
    n_heads: int
    d_head: int
    max_positions: int
    rotary_emb: nn.Module

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.embed.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @classmethod
    def from_model(cls, model: nn.Module) -> "NeoXWeights":
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "gpt_neox" or not hasattr(model, "gpt_neox"):
            raise ValueError(
                f"expected a transformers GPTNeoXForCausalLM, got {type(model).__name__}; "
                "attribution supports the Pythia/GPT-NeoX architecture only"
            )
        if not config.use_parallel_residual:
            raise ValueError(
                "the model has use_parallel_residual=False; attribution implements the parallel "
                "residual of Pythia (attention and MLP read the same residual stream) only"
            )
        n_heads = config.num_attention_heads
        d_model = config.hidden_size
        d_head = d_model // n_heads
        layers = []
        for layer in model.gpt_neox.layers:
            attention = layer.attention
            # query_key_value.weight is [3 * d_model, d_model] with output rows [head, q|k|v, d_head].
            qkv_w = attention.query_key_value.weight.detach().view(n_heads, 3, d_head, d_model)
            qkv_b = attention.query_key_value.bias
            qkv_b = (
                qkv_b.detach().view(n_heads, 3, d_head)
                if qkv_b is not None
                else qkv_w.new_zeros(n_heads, 3, d_head)
            )
            dense_b = attention.dense.bias
            layers.append(
                LayerWeights(
                    ln1_weight=layer.input_layernorm.weight.detach(),
                    ln1_bias=layer.input_layernorm.bias.detach(),
                    ln2_weight=layer.post_attention_layernorm.weight.detach(),
                    ln2_bias=layer.post_attention_layernorm.bias.detach(),
                    W_Q=qkv_w[:, 0].transpose(1, 2),
                    W_K=qkv_w[:, 1].transpose(1, 2),
                    W_V=qkv_w[:, 2].transpose(1, 2),
                    b_Q=qkv_b[:, 0],
                    b_K=qkv_b[:, 1],
                    b_V=qkv_b[:, 2],
                    # dense.weight is [d_model (out), d_model (in = head * d_head)].
                    W_O=attention.dense.weight.detach().T.reshape(n_heads, d_head, d_model),
                    b_O=dense_b.detach() if dense_b is not None else qkv_w.new_zeros(d_model),
                    mlp=layer.mlp,
                )
            )
        final_ln = model.gpt_neox.final_layer_norm
        return cls(
            embed=model.gpt_neox.embed_in.weight.detach(),
            layers=layers,
            lnf_weight=final_ln.weight.detach(),
            lnf_bias=final_ln.bias.detach(),
            W_U=model.lm_head.weight.detach(),
            eps=float(config.layer_norm_eps),
            n_heads=n_heads,
            d_head=d_head,
            max_positions=int(config.max_position_embeddings),
            rotary_emb=model.gpt_neox.rotary_emb,
        )


@dataclass(frozen=True)
class ModelRun:
    """The quantities of one real forward pass that the linearised replacement freezes."""

    resid: Float[Tensor, "layer_plus_1 pos d_model"]  # r_0 .. r_L (r_l is the input of layer l)
    ln_scale: Float[Tensor, "layer pos"]  # sigma^-1 of r_l, shared by LN1 and LN2 (parallel residual)
    lnf_scale: Float[Tensor, "pos"]  # sigma^-1 of the final layer norm
    pattern: Float[Tensor, "layer head pos pos"]  # A[l, h, destination, source]
    mlp_in: Float[Tensor, "layer pos d_model"]  # LN2_l(r_l)
    mlp_out: Float[Tensor, "layer pos d_model"]  # MLP_l(LN2_l(r_l))
    logits: Float[Tensor, "pos vocab"]


def center(x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """x - mean(x): the linear (mean-centering) part of a layer norm; symmetric, so its own transpose."""
    return x - x.mean(dim=-1, keepdim=True)


def ln_scale(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "..."]:
    """sigma^-1 = 1/sqrt(Var(x) + eps) (biased variance, as torch's LayerNorm)."""
    return torch.rsqrt(x.var(dim=-1, unbiased=False) + eps)


def layer_norm(
    x: Float[Tensor, "pos d_model"],
    scale: Float[Tensor, "pos"],
    weight: Float[Tensor, "d_model"],
    bias: Float[Tensor, "d_model"],
) -> Float[Tensor, "pos d_model"]:
    """LN(x) = (x - mean(x)) * sigma^-1 * g + b with a given (possibly frozen) scale sigma^-1."""
    return center(x) * scale[:, None] * weight + bias


def rotary_cos_sin(weights: NeoXWeights, n_pos: int) -> tuple[Tensor, Tensor]:
    """cos, sin [pos, rotary_ndims] from the model's own rotary module (positions 0..n_pos-1)."""
    positions = torch.arange(n_pos, device=weights.embed.device)[None]
    probe = weights.embed[:1][None]  # only its dtype and device matter
    cos, sin = weights.rotary_emb(probe, positions)
    return cos[0], sin[0]


def _rotate(x: Float[Tensor, "head pos d_head"], cos: Tensor, sin: Tensor) -> Float[Tensor, "head pos d_head"]:
    """Rotary embedding on the first cos.shape[-1] dims of each head; the rest pass through."""
    n_rot = cos.shape[-1]
    x_rot, x_pass = x[..., :n_rot], x[..., n_rot:]
    first, second = x_rot[..., : n_rot // 2], x_rot[..., n_rot // 2 :]
    rotated_half = torch.cat((-second, first), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


def attention_pattern(
    lw: LayerWeights, x: Float[Tensor, "pos d_model"], cos: Tensor, sin: Tensor
) -> Float[Tensor, "head pos pos"]:
    """A^h = softmax(q k^T / sqrt(d_head) + causal mask), softmax in at least float32 as transformers does."""
    q = torch.einsum("td,hde->hte", x, lw.W_Q) + lw.b_Q[:, None]
    k = torch.einsum("td,hde->hte", x, lw.W_K) + lw.b_K[:, None]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scores = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    n_pos = x.shape[0]
    future = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    softmax_dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(x.dtype)


def attention_output(
    lw: LayerWeights, x: Float[Tensor, "pos d_model"], pattern: Float[Tensor, "head pos pos"]
) -> Float[Tensor, "pos d_model"]:
    """sum_h (A^h (x W_V^h + b_V^h)) W_O^h + b_O: linear in x for a fixed pattern."""
    v = torch.einsum("td,hde->hte", x, lw.W_V) + lw.b_V[:, None]
    z = pattern @ v  # [head, pos, d_head]
    return torch.einsum("hte,hed->td", z, lw.W_O) + lw.b_O


def check_input_ids(weights: NeoXWeights, input_ids: Tensor | list[int]) -> Int[Tensor, "pos"]:
    """A 1-D LongTensor of a single prompt, validated against the model's vocabulary and context."""
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=weights.embed.device)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(
            f"input_ids must be one non-empty prompt (shape [pos] or [1, pos]), got shape {tuple(ids.shape)}"
        )
    if ids.numel() > weights.max_positions:
        raise ValueError(
            f"prompt has {ids.numel()} tokens but the model's context (max_position_embeddings) is "
            f"{weights.max_positions}; shorten the prompt (e.g. fewer genes)"
        )
    vocab = weights.embed.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(
            f"input_ids must lie in [0, {vocab}) (the model's vocabulary), got {int(ids.min())}..{int(ids.max())}"
        )
    return ids


@torch.no_grad()
def run_model(weights: NeoXWeights, input_ids: Int[Tensor, "pos"]) -> ModelRun:
    """The real forward pass (steps 1-3 of the module docstring), recording the frozen quantities."""
    n_pos = input_ids.shape[0]
    cos, sin = rotary_cos_sin(weights, n_pos)
    r = weights.embed[input_ids]
    resid, scales, patterns, mlp_in, mlp_out = [r], [], [], [], []
    for lw in weights.layers:
        # Parallel residual: LN1 and LN2 normalise the same r_l, so they share sigma^-1.
        scale = ln_scale(r, weights.eps)
        x_attn = layer_norm(r, scale, lw.ln1_weight, lw.ln1_bias)
        pattern = attention_pattern(lw, x_attn, cos, sin)
        attn_out = attention_output(lw, x_attn, pattern)
        x_mlp = layer_norm(r, scale, lw.ln2_weight, lw.ln2_bias)
        out = lw.mlp(x_mlp)
        r = r + attn_out + out
        resid.append(r)
        scales.append(scale)
        patterns.append(pattern)
        mlp_in.append(x_mlp)
        mlp_out.append(out)
    sf = ln_scale(r, weights.eps)
    logits = layer_norm(r, sf, weights.lnf_weight, weights.lnf_bias) @ weights.W_U.T
    return ModelRun(
        resid=torch.stack(resid),
        ln_scale=torch.stack(scales),
        lnf_scale=sf,
        pattern=torch.stack(patterns),
        mlp_in=torch.stack(mlp_in),
        mlp_out=torch.stack(mlp_out),
        logits=logits,
    )
