"""Gemma-2 (C2S-Scale-Gemma-2): ``transformers``' ``Gemma2ForCausalLM`` behind the adapter interface.

The forward it mirrors (``transformers.models.gemma2.modeling_gemma2``, eval mode, causal):

1. r_0 = embed_tokens(input_ids) * sqrt(d_model)                 # the embedding normaliser, cast to
                                                                  # the weights' dtype first
2. for each layer l (``model.layers[l]``), with RMS(x; g) = x * rho(x) * (1 + g) and
   rho(x) = 1/sqrt(mean(x^2) + eps) the norm's scale at each position (its only non-linear part;
   transformers computes it in float32):
   a. x = RMS(r_l; g_in)                                          # ``input_layernorm``
   b. per query head h, q^h = x W_Q^h, and per key/value head k = h // (n_heads / n_kv_heads)
      (grouped-query attention), k^k = x W_K^k, v^k = x W_V^k (plus biases when
      ``attention_bias``); rotary rotates all ``head_dim`` dims of q and k (rotate-half layout);
          s^h = q^h k^T * query_pre_attn_scalar^-1/2                # not head_dim^-1/2
          s^h = c_attn * tanh(s^h / c_attn)                         # attention logit soft-capping
          A^h = softmax(s^h + mask)                                 # the attention pattern
      with the causal mask, and on ``sliding_attention`` layers (``config.layer_types``, by
      default every other one from layer 0) also key positions s <= t - sliding_window masked;
          a = sum_h (A^h v^k) W_O^h                                 # ``o_proj`` split per head
   c. r_mid = r_l + RMS(a; g_post_attn)                           # ``post_attention_layernorm``
   d. m_in = RMS(r_mid; g_pre_ff)                                 # ``pre_feedforward_layernorm``
   e. m = W_down (gelu_tanh(W_gate m_in) * (W_up m_in))           # GeGLU ``mlp``
   f. r_{l+1} = r_mid + RMS(m; g_post_ff)                         # ``post_feedforward_layernorm``
3. logits = c_final * tanh(RMS(r_L; g_f) W_U^T / c_final)         # final-logit soft-capping;
                                                                  # ``lm_head`` (tied), no bias

Hook sites: ``hook_resid_pre``/``hook_resid_post`` are ``model.layers[l]``'s input/output (r_l and
r_{l+1}), ``attn.hook_pattern`` A^h of step 2b from the attention input x. The MLP hook points are
chosen so that a transcoder stands in for everything the feed-forward half adds to the residual:
``hook_mlp_in`` is m_in (the MLP module's input = ``pre_feedforward_layernorm``'s output) and
``hook_mlp_out`` is ``post_feedforward_layernorm``'s output, RMS(m; g_post_ff), so
r_{l+1} = r_mid + hook_mlp_out exactly, as for GPT-NeoX. The post-feed-forward norm is thus part
of what the transcoder imitates (its non-linear scale included), and the residual written by a
replacement is its output unchanged. A right-padded batch runs without an attention mask
(``model_attention_mask``: causal attention makes it redundant, and transformers' masked float64
forward turns an all-padding sliding window into NaNs).

What attribution freezes (``frozen_run``, from a clean run): the patterns A^(l,h) (soft-capping,
sliding window and softmax all inside them), the RMS scales rho of r_l (input norm), of a
(post-attention norm), of r_mid (pre-feed-forward norm) and of r_L (final norm), and the final
soft-cap as its ratio c_final * tanh(u / c_final) / u at the operating point u (per position and
token: a frozen multiplier, as rho is, so the frozen model is exact on the prompt and linear).
With those fixed, every norm is a per-position diagonal map, attention is linear in r_l, and the
post-feed-forward norm needs no freezing: the transcoder and its error term replace it with the
MLP. Dropout is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from c2srepro.models.adapters.base import Adapter, HookSite


@dataclass(frozen=True)
class Gemma2LayerWeights:
    """Detached views of one Gemma-2 layer's attention parameters, split per head; norm gains as
    the (1 + weight) each RMS norm multiplies by."""

    input_gain: Float[Tensor, "d_model"]
    post_attention_gain: Float[Tensor, "d_model"]
    pre_feedforward_gain: Float[Tensor, "d_model"]
    W_Q: Float[Tensor, "head d_model d_head"]
    W_K: Float[Tensor, "kv_head d_model d_head"]
    W_V: Float[Tensor, "kv_head d_model d_head"]
    b_Q: Float[Tensor, "head d_head"]
    b_K: Float[Tensor, "kv_head d_head"]
    b_V: Float[Tensor, "kv_head d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_O: Float[Tensor, "d_model"]
    sliding_window: int | None  # None on full-attention layers


@dataclass(frozen=True)
class Gemma2Weights:
    """Everything the frozen forward needs from a ``Gemma2ForCausalLM``."""

    embed: Float[Tensor, "vocab d_model"]  # embed_tokens.weight times the normaliser (r_0 rows)
    layers: list[Gemma2LayerWeights]
    final_gain: Float[Tensor, "d_model"]
    W_U: Float[Tensor, "vocab d_model"]
    eps: float
    n_heads: int
    n_kv_heads: int
    d_head: int
    attention_scale: float  # query_pre_attn_scalar^-1/2
    attn_softcap: float | None
    final_softcap: float | None
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
    def from_adapter(cls, adapter: "Gemma2Adapter") -> "Gemma2Weights":
        config = adapter.config
        n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
        d_head, d_model = adapter.d_head, adapter.d_model
        def per_head(linear: nn.Linear, n: int) -> Tensor:  # [n * d_head, d_model] -> [n, d_model, d_head]
            return linear.weight.detach().view(n, d_head, d_model).transpose(1, 2)

        def bias(linear: nn.Linear, n: int) -> Tensor:
            return linear.weight.new_zeros(n, d_head) if linear.bias is None else linear.bias.detach().view(n, d_head)

        layers = []
        for layer in range(adapter.n_layers):
            block, attention = adapter.decoder_layers()[layer], adapter.attention(layer)
            o_proj = attention.o_proj
            layers.append(
                Gemma2LayerWeights(
                    input_gain=gain(block.input_layernorm),
                    post_attention_gain=gain(block.post_attention_layernorm),
                    pre_feedforward_gain=gain(block.pre_feedforward_layernorm),
                    W_Q=per_head(attention.q_proj, n_heads),
                    W_K=per_head(attention.k_proj, n_kv),
                    W_V=per_head(attention.v_proj, n_kv),
                    b_Q=bias(attention.q_proj, n_heads),
                    b_K=bias(attention.k_proj, n_kv),
                    b_V=bias(attention.v_proj, n_kv),
                    # o_proj.weight is [d_model (out), head * d_head (in)].
                    W_O=o_proj.weight.detach().T.reshape(n_heads, d_head, d_model),
                    b_O=o_proj.weight.new_zeros(d_model) if o_proj.bias is None else o_proj.bias.detach(),
                    sliding_window=attention.sliding_window,
                )
            )
        embed = adapter.embed()
        return cls(
            embed=embed.weight.detach() * embed.embed_scale.to(embed.weight.dtype),
            layers=layers,
            final_gain=gain(adapter.final_norm()),
            W_U=adapter.unembed().weight.detach(),
            eps=float(config.rms_norm_eps),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_head=d_head,
            attention_scale=float(config.query_pre_attn_scalar) ** -0.5,
            attn_softcap=config.attn_logit_softcapping,
            final_softcap=config.final_logit_softcapping,
            rotary_emb=adapter.model.model.rotary_emb,
        )


    # ---------------------------------------------- the (frozen) forward, for c2srepro.attribution

    def rotary(self, n_pos: int) -> tuple[Tensor, Tensor]:
        """cos, sin of positions 0..n_pos-1 (what ``attention_and_mlp_input`` recomputes patterns with)."""
        return rotary_cos_sin(self, n_pos)

    def attention_and_mlp_input(
        self, run: "Gemma2Run", layer: int, r: Float[Tensor, "pos d_model"], *, freeze: bool,
        rotary: tuple[Tensor, Tensor] | None,
    ) -> tuple[Float[Tensor, "pos d_model"], Float[Tensor, "pos d_model"]]:
        """(r_mid, m_in) of steps 2a-2d of the module docstring: the residual after layer
        ``layer``'s attention and its MLP input, with the clean run's RMS scales and pattern
        (``freeze``) or all recomputed from r (``rotary``: ``self.rotary(pos)``)."""
        lw, eps = self.layers[layer], self.eps
        x = rms_norm(r, run.input_scale[layer] if freeze else rms_scale(r, eps), lw.input_gain)
        pattern = run.pattern[layer] if freeze else attention_pattern(self, lw, x, *rotary)
        a = attention_output(self, lw, x, pattern)
        post_attention = run.post_attention_scale[layer] if freeze else rms_scale(a, eps)
        r_mid = r + rms_norm(a, post_attention, lw.post_attention_gain)
        pre_feedforward = run.pre_feedforward_scale[layer] if freeze else rms_scale(r_mid, eps)
        return r_mid, rms_norm(r_mid, pre_feedforward, lw.pre_feedforward_gain)

    def unembed(self, run: "Gemma2Run", r: Float[Tensor, "pos d_model"], *, freeze: bool) -> Float[Tensor, "pos vocab"]:
        """Step 3: the final norm and soft-cap frozen at the clean run's (``freeze``) or applied."""
        scale = run.final_scale if freeze else rms_scale(r, self.eps)
        uncapped = rms_norm(r, scale, self.final_gain) @ self.W_U.T
        return uncapped * run.final_softcap_ratio if freeze else softcap(uncapped, self.final_softcap)

    def attention_bias(self, layer: int) -> Float[Tensor, "d_model"]:
        """What the attention adds at every position whatever the input: nothing (``linearised``
        refuses attention biases, which the post-attention norm would make input-dependent)."""
        return self.embed.new_zeros(self.d_model)

    # ---------------------------------------------- its transpose (c2srepro.attribution.contributions)

    # A transcoder of layer l reads r_mid = r_l + Attn_l(r_l) (step 2d), after its layer's attention.
    mlp_reads_attention: ClassVar[bool] = True

    def feature_reading(
        self, run: "Gemma2Run", layer: int, position: int, w: Float[Tensor, "d_model"]
    ) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c) with m_in[t] . w = r_mid[t] . v + c under the frozen pre-feed-forward scale."""
        return run.pre_feedforward_scale[layer, position] * self.layers[layer].pre_feedforward_gain * w, 0.0

    def mlp_input_bias(self, layer: int) -> Float[Tensor, "d_model"]:
        return torch.zeros_like(self.layers[layer].pre_feedforward_gain)  # RMS norms have no bias

    def mlp_input_transpose(
        self, run: "Gemma2Run", layer: int, grad: Float[Tensor, "target pos d_model"]
    ) -> Float[Tensor, "target pos d_model"]:
        """The frozen pre-feed-forward RMS norm is diagonal: (1 + w) ⊙ rho^-1[s]."""
        return grad * self.layers[layer].pre_feedforward_gain * run.pre_feedforward_scale[layer, : grad.shape[1], None]

    def final_reading(self, run: "Gemma2Run", position: int, w: Float[Tensor, "d_model"]) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c) with RMS(r_L; g_f)[t] . w = r_L[t] . v + c under the frozen final scale."""
        return run.final_scale[position] * self.final_gain * w, 0.0

    def logit_reading(
        self, run: "Gemma2Run", position: int, direction: int | Float[Tensor, "vocab"]
    ) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c) with a . logit[t] = r_L[t] . v + c under the frozen final scale and soft-cap ratio
        (a: a token's one-hot, or a coefficient vector over the vocabulary)."""
        ratio = run.final_softcap_ratio[position]
        if isinstance(direction, int):
            return self.final_reading(run, position, ratio[direction] * self.W_U[direction])
        return self.final_reading(run, position, (direction * ratio) @ self.W_U)

    def _values_out(self, layer: int) -> Float[Tensor, "head d_model d_head"]:
        """W_V of the key/value head each query head reads (grouped-query attention)."""
        return self.layers[layer].W_V.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)

    def attention_transpose(
        self, run: "Gemma2Run", layer: int, grad: Float[Tensor, "target pos d_model"]
    ) -> Float[Tensor, "target pos d_model"]:
        """Attn_l^T(G) for Attn_l(r) = RMS(a(RMS(r; g_in)); g_post_attn) with every scale and pattern
        frozen: the gradient the attention of ``layer`` carries back to its source positions."""
        lw, n_pos = self.layers[layer], grad.shape[1]
        grad = grad * lw.post_attention_gain * run.post_attention_scale[layer, :n_pos, None]  # frozen norm at t
        pattern = run.pattern[layer, :, :n_pos, :n_pos]  # A[h, destination t, source s]
        u = torch.einsum("ntd,hed->nhte", grad, lw.W_O)  # back through W_O^h
        u = torch.einsum("hts,nhte->nhse", pattern, u)  # back through the pattern, t -> s
        x = torch.einsum("nhse,hde->nsd", u, self._values_out(layer))  # back through W_V^(h's kv head)
        return x * lw.input_gain * run.input_scale[layer, :n_pos, None]  # frozen input norm at s

    def head_transpose(
        self, run: "Gemma2Run", layer: int, grad: Float[Tensor, "pos d_model"], source: int
    ) -> Float[Tensor, "head d_model"]:
        """Attn_{l,h}^T(G)[source] per head h: ``attention_transpose`` split by head, at one position."""
        lw, n_pos = self.layers[layer], grad.shape[0]
        grad = grad * lw.post_attention_gain * run.post_attention_scale[layer, :n_pos, None]
        carried = torch.einsum("ht,td->hd", run.pattern[layer, :, :n_pos, source], grad)  # sum_t A[t,s] G[t]
        x = torch.einsum("hd,hed,hfe->hf", carried, lw.W_O, self._values_out(layer))
        return x * lw.input_gain * run.input_scale[layer, source]


@dataclass(frozen=True)
class Gemma2Run:
    """The quantities of one real forward pass that the linearised replacement freezes."""

    resid: Float[Tensor, "layer_plus_1 pos d_model"]  # r_0 .. r_L (r_l is the input of layer l)
    resid_mid: Float[Tensor, "layer pos d_model"]  # r_mid of each layer (what the MLP half reads)
    input_scale: Float[Tensor, "layer pos"]  # rho(r_l), input_layernorm
    post_attention_scale: Float[Tensor, "layer pos"]  # rho(a_l), post_attention_layernorm
    pre_feedforward_scale: Float[Tensor, "layer pos"]  # rho(r_mid), pre_feedforward_layernorm
    final_scale: Float[Tensor, "pos"]  # rho(r_L), the final norm
    final_softcap_ratio: Float[Tensor, "pos vocab"]  # logits / pre-cap logits (1 without soft-capping)
    pattern: Float[Tensor, "layer head pos pos"]  # A[l, h, destination, source]
    mlp_in: Float[Tensor, "layer pos d_model"]  # RMS(r_mid; g_pre_ff)
    mlp_out: Float[Tensor, "layer pos d_model"]  # RMS(MLP(mlp_in); g_post_ff)
    logits: Float[Tensor, "pos vocab"]


def gain(norm: nn.Module) -> Float[Tensor, "d_model"]:
    """The (1 + weight) a Gemma RMS norm multiplies by."""
    return 1.0 + norm.weight.detach()


def rms_scale(x: Float[Tensor, "... d_model"], eps: float) -> Float[Tensor, "..."]:
    """rho(x) = 1/sqrt(mean(x^2) + eps), in at least float32 as transformers computes it."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(wide.pow(2).mean(dim=-1) + eps).to(x.dtype)


def rms_norm(
    x: Float[Tensor, "*batch pos d_model"], scale: Float[Tensor, "*batch pos"], norm_gain: Float[Tensor, "d_model"]
) -> Float[Tensor, "*batch pos d_model"]:
    """RMS(x) = x * rho * (1 + g) with a given (possibly frozen) scale rho."""
    return x * scale[..., None] * norm_gain


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap), or x when soft-capping is off (cap None)."""
    return x if cap is None else cap * torch.tanh(x / cap)


def softcap_ratio(capped: Tensor, uncapped: Tensor) -> Tensor:
    """capped / uncapped, the soft-cap's secant at the operating point (1 where uncapped is 0,
    the limit of tanh(u / c) * c / u)."""
    safe = torch.where(uncapped == 0, torch.ones_like(uncapped), uncapped)
    return torch.where(uncapped == 0, torch.ones_like(uncapped), capped / safe)


def rotary_cos_sin(weights: Gemma2Weights, n_pos: int) -> tuple[Tensor, Tensor]:
    """cos, sin [pos, d_head] from the model's own rotary module (positions 0..n_pos-1)."""
    positions = torch.arange(n_pos, device=weights.embed.device)[None]
    cos, sin = weights.rotary_emb(weights.embed[:1][None], positions)  # the probe gives dtype and device
    return cos[0], sin[0]


def _rotate(x: Float[Tensor, "... pos d_head"], cos: Tensor, sin: Tensor) -> Float[Tensor, "... pos d_head"]:
    """Rotary embedding on every dim of each head (rotate-half layout)."""
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def attention_mask(n_pos: int, sliding_window: int | None, device: torch.device) -> Tensor:
    """True where destination t may not attend to source s: s > t, and s <= t - sliding_window."""
    t = torch.arange(n_pos, device=device)[:, None]
    s = torch.arange(n_pos, device=device)[None]
    masked = s > t
    if sliding_window is not None:
        masked |= s <= t - sliding_window
    return masked


def attention_pattern(
    weights: Gemma2Weights, lw: Gemma2LayerWeights, x: Float[Tensor, "*batch pos d_model"], cos: Tensor, sin: Tensor
) -> Float[Tensor, "*batch head pos pos"]:
    """A^h = softmax(softcap(q^h k^T * scale) + mask) (module docstring, step 2b), softmax in at
    least float32 as transformers does; key/value heads are shared by n_heads / n_kv_heads queries."""
    group = weights.n_heads // weights.n_kv_heads
    q = torch.einsum("...td,hde->...hte", x, lw.W_Q) + lw.b_Q[:, None]
    k = torch.einsum("...td,hde->...hte", x, lw.W_K) + lw.b_K[:, None]
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k = k.repeat_interleave(group, dim=-3)  # query head h reads key head h // group
    scores = softcap(q @ k.transpose(-1, -2) * weights.attention_scale, weights.attn_softcap)
    scores = scores.masked_fill(attention_mask(x.shape[-2], lw.sliding_window, x.device), float("-inf"))
    softmax_dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(x.dtype)


def attention_output(
    weights: Gemma2Weights,
    lw: Gemma2LayerWeights,
    x: Float[Tensor, "pos d_model"],
    pattern: Float[Tensor, "head pos pos"],
) -> Float[Tensor, "pos d_model"]:
    """a = sum_h (A^h (x W_V^k + b_V^k)) W_O^h + b_O with a frozen pattern: linear in x (before
    the post-attention norm)."""
    v = torch.einsum("td,hde->hte", x, lw.W_V) + lw.b_V[:, None]
    v = v.repeat_interleave(weights.n_heads // weights.n_kv_heads, dim=0)
    z = pattern @ v  # [head, pos, d_head]
    return torch.einsum("hte,hed->td", z, lw.W_O) + lw.b_O


class Gemma2Adapter(Adapter):
    """``Gemma2ForCausalLM``: module paths, hook sites and linearisation (module docstring)."""

    model_type: ClassVar[str] = "gemma2"
    architecture: ClassVar[str] = "Gemma-2 (C2S-Scale-Gemma-2)"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(self.config, "use_bidirectional_attention", None):
            raise ValueError(
                "the Gemma-2 model has use_bidirectional_attention=True; c2srepro reads causal language "
                "models only (set it to False, as C2S-Scale models have it)"
            )
        self._weights: Gemma2Weights | None = None

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def embed(self) -> nn.Embedding:
        return self.model.model.embed_tokens

    def attention(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].self_attn

    def mlp_input_norm(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].pre_feedforward_layernorm

    def mlp(self, layer: int) -> nn.Module:
        return self.decoder_layers()[layer].mlp

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def unembed(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def d_head(self) -> int:
        head_dim = getattr(self.config, "head_dim", None)
        return int(head_dim or self.d_model // self.config.num_attention_heads)

    @property
    def weights(self) -> Gemma2Weights:
        """The per-head weights (detached views, built once per adapter)."""
        if self._weights is None:
            self._weights = Gemma2Weights.from_adapter(self)
        return self._weights

    def sites(self, layer: int) -> dict[str, HookSite]:
        # What the feed-forward half adds to the residual is the post-feed-forward norm's output.
        post_ff = self.decoder_layers()[layer].post_feedforward_layernorm
        return {**super().sites(layer), "hook_mlp_out": HookSite(post_ff, "output")}

    def attention_pattern(self, layer: int, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch head q k"]:
        cos, sin = rotary_cos_sin(self.weights, x.shape[-2])
        return attention_pattern(self.weights, self.weights.layers[layer], x, cos, sin)

    def model_attention_mask(
        self, attention_mask: Int[Tensor, "batch pos"] | None
    ) -> Int[Tensor, "batch pos"] | None:
        """None for a right-padded batch (ones, then zeros, in every row), else the mask itself.

        transformers' eager Gemma-2 attention turns a row with every key masked (a padded position
        whose sliding window holds only padding) into NaN in float64 (the mask's float64 minimum
        becomes -inf in the float32 softmax), and the next layer spreads it to every position
        through 0 * NaN. Under causal attention a right-padded batch needs no mask: a real token
        sees only the real tokens before it, with or without one."""
        if attention_mask is None:
            return None
        right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
        return None if right_padded else attention_mask

    def describe(self, point: str) -> str:
        return {
            "hook_resid_pre": "model.layers.{layer} input (the residual stream r_l)",
            "attn.hook_pattern": (
                "softmax(softcap(q k^T / sqrt(query_pre_attn_scalar)) + causal/sliding-window mask) of "
                "model.layers.{layer}.self_attn"
            ),
            "hook_mlp_in": "model.layers.{layer}.mlp input: pre_feedforward_layernorm output",
            "hook_mlp_out": (
                "model.layers.{layer}.post_feedforward_layernorm output: post_feedforward_layernorm(MLP(x)), "
                "what the feed-forward half adds to the residual"
            ),
            "hook_resid_post": "model.layers.{layer} output (the residual stream r_(l+1))",
        }[point]

    def linearised(self) -> Gemma2Weights:
        if self.config.attention_bias:
            raise ValueError(
                "the Gemma-2 model has attention_bias=True; attribution linearises Gemma-2 without attention "
                "biases (as every Gemma-2 checkpoint is): a bias passed through the post-attention norm would "
                "be a source that depends on the input"
            )
        return self.weights

    def frozen_hooks(self) -> list[str]:
        per_layer = ("hook_resid_pre", "attn.hook_pattern", "hook_mlp_in", "hook_mlp_out")
        names = [f"blocks.{layer}.{point}" for layer in range(self.n_layers) for point in per_layer]
        return names + [f"blocks.{self.n_layers - 1}.hook_resid_post"]

    def frozen_run(self, cache: Mapping[str, Tensor], logits: Float[Tensor, "pos vocab"]) -> Gemma2Run:
        weights, layers = self.weights, range(self.n_layers)
        stack = lambda point: torch.stack([cache[f"blocks.{layer}.{point}"][0] for layer in layers])  # noqa: E731
        resid = torch.cat([stack("hook_resid_pre"), cache[f"blocks.{self.n_layers - 1}.hook_resid_post"]])
        mlp_out = stack("hook_mlp_out")
        resid_mid = resid[1:] - mlp_out  # r_{l+1} = r_mid + hook_mlp_out (module docstring, step 2f)
        patterns, input_scale, post_attention_scale = stack("attn.hook_pattern"), [], []
        for layer, lw in enumerate(weights.layers):
            scale = rms_scale(resid[layer], weights.eps)
            attn = attention_output(weights, lw, rms_norm(resid[layer], scale, lw.input_gain), patterns[layer])
            input_scale.append(scale)
            post_attention_scale.append(rms_scale(attn, weights.eps))
        final_scale = rms_scale(resid[-1], weights.eps)
        uncapped = rms_norm(resid[-1], final_scale, weights.final_gain) @ weights.W_U.T
        return Gemma2Run(
            resid=resid,
            resid_mid=resid_mid,
            input_scale=torch.stack(input_scale),
            post_attention_scale=torch.stack(post_attention_scale),
            pre_feedforward_scale=rms_scale(resid_mid, weights.eps),
            final_scale=final_scale,
            final_softcap_ratio=softcap_ratio(logits, uncapped),
            pattern=patterns,
            mlp_in=stack("hook_mlp_in"),
            mlp_out=mlp_out,
            logits=logits,
        )
