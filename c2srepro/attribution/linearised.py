"""The linearised replacement model of one prompt: the object every attribution is computed on.

1. Run the original model on the prompt through its hook points (:func:`run_model`,
   :class:`c2srepro.models.hooked.HookedModel`), recording each residual stream r_l, the attention
   patterns A^(l,h) and each MLP's input x_l = LN2_l(r_l) and output MLP_l(x_l); the layer-norm
   scales sigma^-1 (of r_l, shared by LN1 and LN2 under Pythia's parallel residual, and of the
   final residual) follow from the residuals. Where the hooks sit, what is frozen and the frozen
   norms and attention of steps 3-4 are the architecture adapter's (``adapter.linearised()``, its
   weights: ``attention_and_mlp_input``, ``unembed``, ``attention_bias``;
   :mod:`c2srepro.models.adapters.neox`, :mod:`c2srepro.models.adapters.gemma2`, whose docstrings
   state the forward and its frozen form). GPT-NeoX is written out here.
2. Replace each MLP by its transcoder plus an error term:
       z_l   = act(x_l @ W_enc + b_enc)                         # eq. 1 (ReLU, TopK, JumpReLU, ...)
       out_l = z_l @ W_dec + b_dec + x_l @ W_skip + e_l,  e_l = MLP_l(x_l) - transcoder_l(x_l)
   (eq. 2 + error; the skip term only for a skip transcoder), so the replacement reproduces the
   model's logits exactly on this prompt. The active features are those with z > 0; with them
   held fixed every variant is linear in its active features (z = pre there), as ReLU is.
3. Freeze A^(l,h) and every sigma^-1. With the feature activations z and the errors e treated as
   inputs, the model is then affine: r_{l+1} = r_l + Attn_l(r_l) + z_l W_dec + b_dec + e_l with
       Attn_l(r)[t] = sum_h sum_s A^(l,h)[t,s] (LN1(r)[s] W_V^h + b_V^h) W_O^h + b_O,
       LN(r)[s]     = (r[s] - mean r[s]) * sigma^-1[s] * g + b,
   and every residual stream, feature pre-activation and logit is a sum of contributions of the
   source nodes (:mod:`c2srepro.attribution.nodes`): embeddings, features, errors and biases.
   Because each row of a causal attention pattern sums to 1, the LN1 bias and value bias reach the
   residual stream as the per-layer constant sum_h (b1 W_V^h + b_V^h) W_O^h, folded into the layer's
   bias node together with b_O and b_dec (``written_bias``). Gemma-2 has the same form with RMS
   norms (no centering, no bias), the post-attention norm frozen on the attention's output, the MLP
   reading r_l + Attn_l(r_l), and the final soft-cap frozen as a per-logit ratio. A skip
   transcoder's path x_l W_skip (x_l the frozen norm of the residual the MLP reads) is, with the
   norm's scale frozen, a linear map of that residual (an edge set, like attention:
   :mod:`c2srepro.attribution.contributions` carries gradients back through it) plus the constant
   (norm bias) W_skip, also folded into ``written_bias``. This is how circuit-tracer treats skip
   transcoders: the decoded features are frozen, the skip path passes gradients.
4. :func:`replacement_forward` runs this model forward: frozen (linear in the sources) or with the
   patterns and layer-norm scales recomputed from the current residual (the replacement model proper,
   errors still fixed); with the features given as inputs (leaves for autograd) or recomputed by the
   transcoder encoders from the current residual, optionally with a set of features ablated (zeroed)
   or each layer's activations edited by a function (the interventions of
   :mod:`c2srepro.attribution.intervene`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from c2srepro.attribution.nodes import Node
from c2srepro.models.adapters.base import LinearisedWeights
from c2srepro.data.prompts import require_prompt_ids
from c2srepro.models.hooked import HookedModel, as_hooked
from c2srepro.transcoder.fit import check_transcoders_fit
from c2srepro.transcoder.model import Transcoder, activate


@dataclass(frozen=True)
class TranscoderWeights:
    """Detached transcoder parameters in the model's dtype (layout of :class:`Transcoder`)."""

    W_enc: Float[Tensor, "d_model d_tc"]  # column i is f_enc^(l,i)
    b_enc: Float[Tensor, "d_tc"]
    W_dec: Float[Tensor, "d_tc d_model"]  # row i is f_dec^(l,i)
    b_dec: Float[Tensor, "d_model"]
    W_skip: Float[Tensor, "d_model d_model"] | None = None  # a skip transcoder's linear path
    threshold: Float[Tensor, "d_tc"] | None = None  # batchtopk / jumprelu
    activation: str = "relu"
    k: int | None = None  # topk

    @property
    def d_tc(self) -> int:
        return self.W_enc.shape[1]

    def activate(self, pre: Float[Tensor, "... d_tc"]) -> Float[Tensor, "... d_tc"]:
        """z from the pre-activations, with this transcoder's activation (eq. 1)."""
        return activate(pre, activation=self.activation, k=self.k, threshold=self.threshold)


@dataclass(frozen=True)
class ActiveFeatures:
    """The features of one layer with z > 0 on this prompt, sorted by (position, feature)."""

    position: Int[Tensor, "active"]
    feature: Int[Tensor, "active"]
    activation: Float[Tensor, "active"]

    def __len__(self) -> int:
        return self.position.numel()


@dataclass(frozen=True)
class ReplacementOutput:
    """One forward pass of the replacement model."""

    resid: Float[Tensor, "layer_plus_1 pos d_model"]
    pre_activations: list[Float[Tensor, "pos d_tc"]]  # x_l @ W_enc + b_enc, per layer
    activations: list[Float[Tensor, "pos d_tc"]]  # the z_l actually used, per layer
    logits: Float[Tensor, "pos vocab"]

    def value(self, node: Node) -> Tensor:
        """A target's value: a feature's pre-activation, or a logit."""
        if node.kind == "feature":
            return self.pre_activations[node.layer][node.position, node.index]
        if node.kind == "logit":
            return self.logits[node.position, node.index]
        raise ValueError(f"only feature and logit nodes have a value, got a {node.kind} node")


@dataclass(frozen=True)
class LinearisedReplacement:
    """Model, transcoders and the frozen quantities of one prompt (steps 1-3 of the module docstring)."""

    weights: LinearisedWeights  # the adapter's ``linearised()``
    transcoders: list[TranscoderWeights]
    input_ids: Int[Tensor, "pos"]
    run: Any  # the adapter's ``frozen_run`` (``ModelRun`` of GPT-NeoX, ``Gemma2Run``)
    errors: Float[Tensor, "layer pos d_model"]  # e_l = MLP_l(x_l) - transcoder_l(x_l)
    active: list[ActiveFeatures]
    written_bias: Float[Tensor, "layer d_model"]  # constants layer l adds to r_{l+1} at every position

    @property
    def n_layers(self) -> int:
        return self.weights.n_layers

    @property
    def n_pos(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_active(self) -> int:
        return sum(len(a) for a in self.active)

    def check_position(self, position: int) -> None:
        if not 0 <= position < self.n_pos:
            raise ValueError(
                f"position {position} is out of range for a prompt of {self.n_pos} tokens "
                f"(valid positions 0..{self.n_pos - 1})"
            )

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{self.n_layers - 1}")

    def logit_node(self, position: int, token: int) -> Node:
        """The target 'logit of ``token`` read at ``position``' (layer = n_layers)."""
        return Node("logit", self.n_layers, int(position), int(token))

    def answer_node(self, answer_start: int) -> Node:
        """The logit of the answer's first token, read at the position before it."""
        if not 1 <= answer_start < self.n_pos:
            raise ValueError(
                f"answer_start {answer_start} must be in 1..{self.n_pos - 1}: the prompt must include "
                "at least the answer's first token, preceded by the question"
            )
        return self.logit_node(answer_start - 1, int(self.input_ids[answer_start]))

    def pre_activation(self, layer: int, position: int, feature: int) -> float:
        """x @ W_enc + b_enc of one feature on the real MLP input (eq. 1 before the ReLU)."""
        tc = self.transcoders[layer]
        return float(self.run.mlp_in[layer, position] @ tc.W_enc[:, feature] + tc.b_enc[feature])

    def top_features(self, layer: int, position: int, n: int = 5) -> list[tuple[int, float]]:
        """The ``n`` most active features at (layer, position) as (feature, activation)."""
        self.check_layer(layer)
        self.check_position(position)
        act = self.active[layer]
        here = act.position == position
        values, order = act.activation[here].sort(descending=True)
        return [(int(f), float(v)) for f, v in zip(act.feature[here][order[:n]], values[:n])]

    def active_index(self, node: Node) -> int | None:
        """Index of a feature node in ``active[node.layer]``, or None if it does not fire."""
        act = self.active[node.layer]
        key = act.position * self.transcoders[node.layer].d_tc + act.feature
        wanted = node.position * self.transcoders[node.layer].d_tc + node.index
        i = int(torch.searchsorted(key, torch.tensor(wanted, device=key.device)))
        return i if i < len(act) and int(key[i]) == wanted else None

    def value(self, node: Node) -> float:
        """A target's value on the real prompt: feature pre-activation, or logit."""
        if node.kind == "feature":
            return self.pre_activation(node.layer, node.position, node.index)
        if node.kind == "logit":
            return float(self.run.logits[node.position, node.index])
        raise ValueError(f"only feature and logit nodes can be targets, got a {node.kind} node")

    def check_target(self, node: Node) -> None:
        """Raise ValueError unless ``node`` is a valid target: an active feature or a logit in range."""
        if node.kind not in ("feature", "logit"):
            raise ValueError(f"a target must be a feature or logit node, got a {node.kind} node ({node.id})")
        self.check_position(node.position)
        if node.kind == "logit":
            vocab = self.weights.W_U.shape[0]
            if not 0 <= node.index < vocab or node.layer != self.n_layers:
                raise ValueError(
                    f"logit target {node.id}: token must be in [0, {vocab}) and layer {self.n_layers}; "
                    "build it with LinearisedReplacement.logit_node(position, token)"
                )
            return
        self.check_layer(node.layer)
        d_tc = self.transcoders[node.layer].d_tc
        if not 0 <= node.index < d_tc:
            raise ValueError(
                f"feature {node.index} is out of range: layer {node.layer}'s transcoder has {d_tc} features"
            )
        if self.active_index(node) is None:
            top = ", ".join(f"{f} ({v:.3g})" for f, v in self.top_features(node.layer, node.position))
            pre = self.pre_activation(node.layer, node.position, node.index)
            raise ValueError(
                f"feature {node.index} at layer {node.layer}, position {node.position} does not fire on this "
                f"prompt (activation 0, pre-activation {pre:.4g}); "
                f"attribute an active feature instead, e.g. the top-firing ones there: {top or 'none fire'}"
            )


def transcoder_weights(tc: Transcoder, *, device: torch.device, dtype: torch.dtype | None = None) -> TranscoderWeights:
    """Detached copies of a transcoder's weights on ``device`` (in ``dtype``, default its own)."""
    cast = lambda p: None if p is None else p.detach().to(device=device, dtype=dtype or p.dtype)  # noqa: E731
    return TranscoderWeights(
        *(cast(p) for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec, tc.W_skip, tc.threshold)),
        activation=tc.cfg.activation, k=tc.cfg.k,
    )


@torch.no_grad()
def run_model(model: nn.Module | HookedModel, input_ids: Tensor | list[int]) -> Any:
    """Step 1 of the module docstring: one clean pass of the real model over one prompt
    (``input_ids``: [pos] or [1, pos]), recording what the replacement freezes."""
    hooked = as_hooked(model)
    ids = hooked.check_prompt(input_ids)
    logits, cache = hooked.run_with_cache(ids[None], hooked.adapter.frozen_hooks())
    return hooked.adapter.frozen_run(cache, logits[0])


@torch.no_grad()
def build_replacement(
    model: nn.Module | HookedModel,
    transcoders: Sequence[Transcoder] | Mapping[int, Transcoder],
    input_ids: Tensor | list[int],
) -> LinearisedReplacement:
    """Steps 1-3 of the module docstring for one prompt (``input_ids``: [pos] or [1, pos]).

    transcoders: one per MLP layer, as a list in layer order or a {layer: Transcoder} mapping
    (what ``c2srepro.transcoder.load_transcoders`` returns).
    """
    require_prompt_ids(input_ids, where="build_replacement")
    hooked = as_hooked(model)
    weights = hooked.adapter.linearised()
    fitting = check_transcoders_fit(hooked, transcoders, every_layer=True)
    tcs = [transcoder_weights(tc, device=weights.embed.device, dtype=weights.dtype) for tc in fitting.values()]
    ids = hooked.check_prompt(input_ids)
    run = run_model(hooked, ids)
    errors, active, written = [], [], []
    for layer, tc in enumerate(tcs):
        x = run.mlp_in[layer]
        z = tc.activate(x @ tc.W_enc + tc.b_enc)  # eq. 1
        out = z @ tc.W_dec + tc.b_dec  # eq. 2
        bias = weights.attention_bias(layer) + tc.b_dec
        if tc.W_skip is not None:
            out = out + x @ tc.W_skip
            bias = bias + weights.mlp_input_bias(layer) @ tc.W_skip  # the skip path's constant (step 3)
        errors.append(run.mlp_out[layer] - out)  # MLP(x) - transcoder(x)
        position, feature = z.nonzero(as_tuple=True)  # row-major: sorted by (position, feature)
        active.append(ActiveFeatures(position, feature, z[position, feature]))
        written.append(bias)
    return LinearisedReplacement(
        weights=weights,
        transcoders=tcs,
        input_ids=ids,
        run=run,
        errors=torch.stack(errors),
        active=active,
        written_bias=torch.stack(written),
    )


def ablation_masks(rep: LinearisedReplacement, features: Iterable[Node]) -> list[Tensor | None]:
    """Per layer, a [pos, d_tc] 0/1 keep-mask zeroing the given feature nodes (None: keep all)."""
    masks: list[Tensor | None] = [None] * rep.n_layers
    for node in features:
        if node.kind != "feature":
            raise ValueError(f"only feature nodes can be ablated, got a {node.kind} node ({node.id})")
        rep.check_layer(node.layer)
        rep.check_position(node.position)
        if masks[node.layer] is None:
            masks[node.layer] = torch.ones(
                rep.n_pos, rep.transcoders[node.layer].d_tc, dtype=rep.weights.dtype, device=rep.input_ids.device
            )
        masks[node.layer][node.position, node.index] = 0.0
    return masks


def replacement_forward(
    rep: LinearisedReplacement,
    *,
    freeze: bool = True,
    feature_acts: list[Float[Tensor, "pos d_tc"]] | None = None,
    ablate: Iterable[Node] = (),
    embeddings: Float[Tensor, "pos d_model"] | None = None,
    errors: Float[Tensor, "layer pos d_model"] | None = None,
    edit: Callable[[int, Float[Tensor, "pos d_tc"]], Float[Tensor, "pos d_tc"]] | None = None,
) -> ReplacementOutput:
    """Run the replacement model (step 4 of the module docstring).

    freeze: keep the clean run's attention patterns and layer-norm scales (the linear model);
        False recomputes both from the current residual stream (errors stay fixed either way).
    feature_acts: per-layer activations used as given (inputs, e.g. leaves for autograd);
        None recomputes z_l = act(x_l W_enc + b_enc) from the current residual.
    ablate: feature nodes whose activation is set to zero (after recomputation, if any).
    edit: ``edit(layer, z)`` returns the activations layer ``layer`` writes instead of z (after
        ablation); downstream layers see its effect.
    embeddings, errors: the r_0 and e_l inputs (default: the prompt's).
    """
    weights, run = rep.weights, rep.run
    if feature_acts is not None and len(feature_acts) != rep.n_layers:
        raise ValueError(
            f"feature_acts needs one [pos, d_tc] tensor per layer ({rep.n_layers}), got {len(feature_acts)}"
        )
    keep = ablation_masks(rep, ablate)
    errors = rep.errors if errors is None else errors
    r = weights.embed[rep.input_ids] if embeddings is None else embeddings
    rotary = None if freeze else weights.rotary(rep.n_pos)
    resid, pre_acts, acts = [r], [], []
    for layer, tc in enumerate(rep.transcoders):
        r_attn, x_mlp = weights.attention_and_mlp_input(run, layer, r, freeze=freeze, rotary=rotary)
        pre = x_mlp @ tc.W_enc + tc.b_enc  # eq. 1 before the ReLU
        z = tc.activate(pre) if feature_acts is None else feature_acts[layer]
        if keep[layer] is not None:
            z = z * keep[layer]
        if edit is not None:
            z = edit(layer, z)
        out = z @ tc.W_dec + tc.b_dec  # eq. 2
        if tc.W_skip is not None:
            out = out + x_mlp @ tc.W_skip
        r = r_attn + out + errors[layer]  # + e_l
        resid.append(r)
        pre_acts.append(pre)
        acts.append(z)
    logits = weights.unembed(run, r, freeze=freeze)
    return ReplacementOutput(resid=torch.stack(resid), pre_activations=pre_acts, activations=acts, logits=logits)
