"""GPT-NeoX (Pythia, C2S-Pythia): ``transformers``' ``GPTNeoXForCausalLM`` behind the adapter interface.

The forward it mirrors (``transformers.models.gpt_neox.modeling_gpt_neox``, eval mode):

1. r_0 = embed_in(input_ids)                                      # one residual vector per position
2. for each layer l (``gpt_neox.layers[l]``):
   a. x = LN1_l(r_l) = (r_l - mean(r_l)) * sigma^-1 * g1 + b1, with sigma^-1 = 1/sqrt(var(r_l) + eps)
      the layer-norm scale of each position (the only non-linear part of a layer norm);
   b. per head h, q/k/v = x @ W_{Q,K,V}^h + b^h (``query_key_value`` rows are laid out
      [head, (q | k | v), d_head]); rotary rotates the first ``rotary_ndims`` dims of q and k
      (``rotary_pct`` of each head);
      A^h = softmax(q k^T / sqrt(d_head) + causal mask)            # the attention pattern
      attn_out = sum_h (A^h v^h) @ W_O^h + b_O                     # ``dense`` split per head
   c. parallel residual (``use_parallel_residual=True``, Pythia): mlp_out = MLP_l(LN2_l(r_l)) and
      r_{l+1} = r_l + attn_out + mlp_out; LN2 normalises the same r_l as LN1, so it has the same
      sigma^-1. Sequential: mlp_out = MLP_l(LN2_l(r_l + attn_out)), r_{l+1} = r_l + attn_out + mlp_out.
3. logits = LNf(r_L) @ W_U^T                                        # ``lm_head`` has no bias

Hook sites: ``hook_resid_pre``/``hook_resid_post`` are ``gpt_neox.layers[l]``'s input/output,
``hook_mlp_in``/``hook_mlp_out`` ``gpt_neox.layers[l].mlp``'s input (= ``post_attention_layernorm``
output, under either residual) and output, ``attn.hook_pattern`` A^h of step 2b from the attention
input x.

Attribution freezes, from a clean run: r_l, both layer-norm scales sigma^-1 (one per layer and
position, shared by LN1 and LN2: parallel residual only), the final one, the patterns A^(l,h) and
each MLP's input and output (``frozen_run``). With those fixed, layer norms are affine in r and
attention is linear in its input (``layer_norm``, ``attention_output``). Dropout is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from c2srepro.models.adapters.base import Adapter


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


@dataclass(frozen=True)
class NeoXWeights:
    """Everything the frozen forward needs from a ``GPTNeoXForCausalLM``."""

    embed: Float[Tensor, "vocab d_model"]
    layers: list[LayerWeights]
    lnf_weight: Float[Tensor, "d_model"]
    lnf_bias: Float[Tensor, "d_model"]
    W_U: Float[Tensor, "vocab d_model"]
    eps: float
    n_heads: int
    d_head: int
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
    def from_adapter(cls, adapter: "NeoXAdapter") -> "NeoXWeights":
        config = adapter.config
        n_heads = config.num_attention_heads
        d_model = adapter.d_model
        d_head = d_model // n_heads
        layers = []
        for layer in range(adapter.n_layers):
            attention, ln2 = adapter.attention(layer), adapter.mlp_input_norm(layer)
            ln1 = adapter.decoder_layers()[layer].input_layernorm
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
                    ln1_weight=ln1.weight.detach(),
                    ln1_bias=ln1.bias.detach(),
                    ln2_weight=ln2.weight.detach(),
                    ln2_bias=ln2.bias.detach(),
                    W_Q=qkv_w[:, 0].transpose(1, 2),
                    W_K=qkv_w[:, 1].transpose(1, 2),
                    W_V=qkv_w[:, 2].transpose(1, 2),
                    b_Q=qkv_b[:, 0],
                    b_K=qkv_b[:, 1],
                    b_V=qkv_b[:, 2],
                    # dense.weight is [d_model (out), d_model (in = head * d_head)].
                    W_O=attention.dense.weight.detach().T.reshape(n_heads, d_head, d_model),
                    b_O=dense_b.detach() if dense_b is not None else qkv_w.new_zeros(d_model),
                )
            )
        final_ln = adapter.final_norm()
        return cls(
            embed=adapter.embed().weight.detach(),
            layers=layers,
            lnf_weight=final_ln.weight.detach(),
            lnf_bias=final_ln.bias.detach(),
            W_U=adapter.unembed().weight.detach(),
            eps=float(config.layer_norm_eps),
            n_heads=n_heads,
            d_head=d_head,
            rotary_emb=adapter.model.gpt_neox.rotary_emb,
        )


    # ---------------------------------------------- the (frozen) forward, for c2srepro.attribution

    def rotary(self, n_pos: int) -> tuple[Tensor, Tensor]:
        """cos, sin of positions 0..n_pos-1 (what ``attention_and_mlp_input`` recomputes patterns with)."""
        return rotary_cos_sin(self, n_pos)

    def attention_and_mlp_input(
        self, run: "ModelRun", layer: int, r: Float[Tensor, "pos d_model"], *, freeze: bool,
        rotary: tuple[Tensor, Tensor] | None,
    ) -> tuple[Float[Tensor, "pos d_model"], Float[Tensor, "pos d_model"]]:
        """(r + Attn_l(r), LN2_l(r)): the residual after layer ``layer``'s attention and its MLP
        input, with the clean run's layer-norm scale and pattern (``freeze``) or recomputed from r
        (``rotary``: ``self.rotary(pos)``). Parallel residual: LN1 and LN2 read the same r_l."""
        lw = self.layers[layer]
        scale = run.ln_scale[layer] if freeze else ln_scale(r, self.eps)
        x_attn = layer_norm(r, scale, lw.ln1_weight, lw.ln1_bias)
        pattern = run.pattern[layer] if freeze else attention_pattern(lw, x_attn, *rotary)
        return r + attention_output(lw, x_attn, pattern), layer_norm(r, scale, lw.ln2_weight, lw.ln2_bias)

    def unembed(self, run: "ModelRun", r: Float[Tensor, "pos d_model"], *, freeze: bool) -> Float[Tensor, "pos vocab"]:
        """LNf(r_L) @ W_U^T, with the clean run's final scale (``freeze``) or r's own."""
        scale = run.lnf_scale if freeze else ln_scale(r, self.eps)
        return layer_norm(r, scale, self.lnf_weight, self.lnf_bias) @ self.W_U.T

    def attention_bias(self, layer: int) -> Float[Tensor, "d_model"]:
        """What layer ``layer``'s attention adds to the residual at every position whatever the
        input: sum_h (b1 W_V^h + b_V^h) W_O^h + b_O (each row of a causal pattern sums to 1)."""
        lw = self.layers[layer]
        value_bias = torch.einsum("d,hde->he", lw.ln1_bias, lw.W_V) + lw.b_V  # [head, d_head]
        return torch.einsum("he,hed->d", value_bias, lw.W_O) + lw.b_O

    # ---------------------------------------------- its transpose (c2srepro.attribution.contributions)

    # A transcoder of layer l reads r_l (parallel residual), not r_l + Attn_l(r_l).
    mlp_reads_attention: ClassVar[bool] = False

    def feature_reading(
        self, run: "ModelRun", layer: int, position: int, w: Float[Tensor, "d_model"]
    ) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c) with LN2_l(r_l)[t] . w = r_l[t] . v + c under the frozen scale."""
        lw = self.layers[layer]
        return run.ln_scale[layer, position] * center(lw.ln2_weight * w), float(lw.ln2_bias @ w)

    def mlp_input_bias(self, layer: int) -> Float[Tensor, "d_model"]:
        return self.layers[layer].ln2_bias

    def mlp_input_transpose(
        self, run: "ModelRun", layer: int, grad: Float[Tensor, "target pos d_model"]
    ) -> Float[Tensor, "target pos d_model"]:
        """LN2_l^T: g2 ⊙ sigma^-1[s], then the mean-centering C (symmetric)."""
        return center(grad * self.layers[layer].ln2_weight * run.ln_scale[layer, : grad.shape[1], None])

    def final_reading(self, run: "ModelRun", position: int, w: Float[Tensor, "d_model"]) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c) with LNf(r_L)[t] . w = r_L[t] . v + c under the frozen final scale."""
        return run.lnf_scale[position] * center(self.lnf_weight * w), float(self.lnf_bias @ w)

    def logit_reading(
        self, run: "ModelRun", position: int, direction: int | Float[Tensor, "vocab"]
    ) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c) with a . logit[t] = r_L[t] . v + c under the frozen final scale (a: a token's
        one-hot, or a coefficient vector over the vocabulary)."""
        w = self.W_U[direction] if isinstance(direction, int) else direction @ self.W_U
        return self.final_reading(run, position, w)

    def attention_transpose(
        self, run: "ModelRun", layer: int, grad: Float[Tensor, "target pos d_model"]
    ) -> Float[Tensor, "target pos d_model"]:
        """Attn_l^T(G): the gradient the frozen attention of ``layer`` carries back to its source positions."""
        lw = self.layers[layer]
        n, n_pos, d_model = grad.shape
        heads, d_head = lw.W_O.shape[:2]
        pattern = run.pattern[layer, :, :n_pos, :n_pos]  # A[h, destination t, source s]
        # Written as plain matrix products (the einsums would make the same copies, and more):
        # back through W_O^h, as one [n t, d_model] x [d_model, h e] product.
        u = grad.reshape(n * n_pos, d_model) @ lw.W_O.reshape(heads * d_head, d_model).T
        # back through the pattern, t -> s, one product per head
        u = u.view(n, n_pos, heads, d_head).permute(2, 1, 0, 3).reshape(heads, n_pos, n * d_head)
        u = pattern.transpose(1, 2) @ u  # [h, s, n e]
        u = u.view(heads, n_pos, n, d_head).permute(2, 1, 0, 3).reshape(n * n_pos, heads * d_head)
        # back through W_V^h, with the frozen LN1's gain g1 and mean-centering C folded into W_V
        # (C(g1 ⊙ sigma^-1[s] x) = sigma^-1[s] C(g1 ⊙ x), and C(g1 ⊙ .) is linear): two passes
        # over the [n, pos, d_model] gradient fewer, a [d_model, d_model] matrix's more.
        values = center(lw.W_V.permute(0, 2, 1).reshape(heads * d_head, d_model) * lw.ln1_weight)
        return (u @ values).view(n, n_pos, d_model) * run.ln_scale[layer, :n_pos, None]

    def head_transpose(
        self, run: "ModelRun", layer: int, grad: Float[Tensor, "pos d_model"], source: int
    ) -> Float[Tensor, "head d_model"]:
        """Attn_{l,h}^T(G)[source] per head h: ``attention_transpose`` split by head, at one position."""
        lw = self.layers[layer]
        carried = torch.einsum("ht,td->hd", run.pattern[layer, :, : grad.shape[0], source], grad)  # sum_t A[t,s] G[t]
        x = torch.einsum("hd,hed,hfe->hf", carried, lw.W_O, lw.W_V)
        return center(x * lw.ln1_weight * run.ln_scale[layer, source])


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


def _rotate(x: Float[Tensor, "... pos d_head"], cos: Tensor, sin: Tensor) -> Float[Tensor, "... pos d_head"]:
    """Rotary embedding on the first cos.shape[-1] dims of each head; the rest pass through."""
    n_rot = cos.shape[-1]
    x_rot, x_pass = x[..., :n_rot], x[..., n_rot:]
    first, second = x_rot[..., : n_rot // 2], x_rot[..., n_rot // 2 :]
    rotated_half = torch.cat((-second, first), dim=-1)
    return torch.cat((x_rot * cos + rotated_half * sin, x_pass), dim=-1)


def attention_pattern(
    lw: LayerWeights, x: Float[Tensor, "*batch pos d_model"], cos: Tensor, sin: Tensor
) -> Float[Tensor, "*batch head pos pos"]:
    """A^h = softmax(q k^T / sqrt(d_head) + causal mask), softmax in at least float32 as transformers does."""
    q = torch.einsum("...td,hde->...hte", x, lw.W_Q) + lw.b_Q[:, None]
    k = torch.einsum("...td,hde->...hte", x, lw.W_K) + lw.b_K[:, None]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n_pos = x.shape[-2]
    future = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    softmax_dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(x.dtype)


def attention_output(
    lw: LayerWeights, x: Float[Tensor, "pos d_model"], pattern: Float[Tensor, "head pos pos"]
) -> Float[Tensor, "pos d_model"]:
    """sum_h (A^h (x W_V^h + b_V^h)) W_O^h + b_O: the attention forward with a frozen pattern,
    linear in x."""
    v = torch.einsum("td,hde->hte", x, lw.W_V) + lw.b_V[:, None]
    z = pattern @ v  # [head, pos, d_head]
    return torch.einsum("hte,hed->td", z, lw.W_O) + lw.b_O


class NeoXAdapter(Adapter):
    """``GPTNeoXForCausalLM``: module paths, hook sites and linearisation (module docstring)."""

    model_type: ClassVar[str] = "gpt_neox"
    architecture: ClassVar[str] = "GPT-NeoX (Pythia)"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._weights: NeoXWeights | None = None

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers

    def embed(self) -> nn.Embedding:
        return self.model.gpt_neox.embed_in

    def attention(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].attention

    def mlp_input_norm(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].post_attention_layernorm

    def mlp(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].mlp

    def final_norm(self) -> nn.Module:
        return self.model.gpt_neox.final_layer_norm

    def unembed(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def weights(self) -> NeoXWeights:
        """The per-head weights (detached views, built once per adapter)."""
        if self._weights is None:
            self._weights = NeoXWeights.from_adapter(self)
        return self._weights

    def attention_pattern(self, layer: int, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch head q k"]:
        cos, sin = rotary_cos_sin(self.weights, x.shape[-2])
        return attention_pattern(self.weights.layers[layer], x, cos, sin)

    def describe(self, point: str) -> str:
        return {
            "hook_resid_pre": "gpt_neox.layers.{layer} input (the residual stream r_l)",
            "attn.hook_pattern": "softmax(q k^T / sqrt(d_head) + causal mask) of gpt_neox.layers.{layer}.attention",
            "hook_mlp_in": "gpt_neox.layers.{layer}.mlp input: post_attention_layernorm output",
            "hook_mlp_out": "gpt_neox.layers.{layer}.mlp output: MLP(x)",
            "hook_resid_post": "gpt_neox.layers.{layer} output (the residual stream r_(l+1))",
        }[point]

    def linearised(self) -> NeoXWeights:
        if not self.config.use_parallel_residual:
            raise ValueError(
                "the model has use_parallel_residual=False; attribution implements the parallel "
                "residual of Pythia (attention and MLP read the same residual stream) only"
            )
        return self.weights

    def frozen_hooks(self) -> list[str]:
        per_layer = ("hook_resid_pre", "attn.hook_pattern", "hook_mlp_in", "hook_mlp_out")
        names = [f"blocks.{layer}.{point}" for layer in range(self.n_layers) for point in per_layer]
        return names + [f"blocks.{self.n_layers - 1}.hook_resid_post"]

    def frozen_run(self, cache: Mapping[str, Tensor], logits: Float[Tensor, "pos vocab"]) -> ModelRun:
        eps, layers = self.weights.eps, range(self.n_layers)
        stack = lambda point: torch.stack([cache[f"blocks.{layer}.{point}"][0] for layer in layers])  # noqa: E731
        resid = torch.cat([stack("hook_resid_pre"), cache[f"blocks.{self.n_layers - 1}.hook_resid_post"]])
        return ModelRun(
            resid=resid,
            ln_scale=ln_scale(resid[:-1], eps),  # parallel residual: LN1 and LN2 read the same r_l
            lnf_scale=ln_scale(resid[-1], eps),
            pattern=stack("attn.hook_pattern"),
            mlp_in=stack("hook_mlp_in"),
            mlp_out=stack("hook_mlp_out"),
            logits=logits,
        )
