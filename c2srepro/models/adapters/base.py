"""The interface an architecture implements so that c2srepro can hook, replace and linearise its MLPs.

An adapter answers, for one family of Hugging Face causal LMs (selected by ``config.model_type``):

1. Structure: the decoder layers, and per layer the attention module, the MLP module and the norm
   whose output the MLP reads; the embedding, the final norm and the unembedding.
2. Hook sites: which module's input or output each named hook point of
   :class:`c2srepro.models.hooked.HookedModel` is (``sites``). The default places
   ``hook_resid_pre``/``hook_resid_post`` at a decoder layer's input/output and ``hook_mlp_in``/
   ``hook_mlp_out`` at the MLP module's input/output; an architecture whose block adds something
   else to the residual stream (Gemma-2's post-feed-forward norm) overrides ``sites``.
3. The attention pattern, computed from the attention module's input with the model's own weights
   (``attention_pattern``): fused kernels (sdpa, flash) never materialise it, and attribution
   needs the same function to recompute patterns of a modified residual stream.
4. Linearisation for attribution: the hook points a clean run must record (``frozen_hooks``), the
   frozen quantities assembled from them (``frozen_run``), and the weights (``linearised``), a
   :class:`LinearisedWeights`: the frozen forward of one layer and of the unembedding and its
   transpose, which :mod:`c2srepro.attribution` runs without knowing the architecture.

A new architecture is one module in this package implementing this class, registered in
``c2srepro.models.adapters.ADAPTERS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, Protocol

from jaxtyping import Float, Int
from torch import Tensor, nn


@dataclass(frozen=True)
class HookSite:
    """Where a hook point sits: the input (forward pre-hook) or the output (forward hook) of a
    module. With ``derive`` the point is read-only and its value is ``derive(tensor)``."""

    module: nn.Module
    at: Literal["input", "output"]
    derive: Callable[[Tensor], Tensor] | None = None


class LinearisedWeights(Protocol):
    """What ``Adapter.linearised()`` returns: the frozen forward and its transpose. ``run`` is the
    adapter's ``frozen_run``; a transcoder of layer l reads the MLP input, writes into r_{l+1}."""

    embed: Float[Tensor, "vocab d_model"]  # r_0 = embed[input_ids]
    W_U: Float[Tensor, "vocab d_model"]
    n_heads: int
    # Whether a transcoder of layer l reads r_l + Attn_l(r_l) (sequential) rather than r_l (parallel).
    mlp_reads_attention: ClassVar[bool]

    @property
    def n_layers(self) -> int: ...

    @property
    def d_model(self) -> int: ...

    @property
    def dtype(self) -> Any: ...

    def rotary(self, n_pos: int) -> Any:
        """What ``attention_and_mlp_input`` needs to recompute patterns at positions 0..n_pos-1."""

    def attention_and_mlp_input(
        self, run: Any, layer: int, r: Float[Tensor, "pos d_model"], *, freeze: bool, rotary: Any
    ) -> tuple[Float[Tensor, "pos d_model"], Float[Tensor, "pos d_model"]]:
        """(r + what the attention of ``layer`` adds, the MLP input) for the residual r entering
        ``layer``, with the clean run's norms and patterns (``freeze``) or recomputed from r."""

    def unembed(self, run: Any, r: Float[Tensor, "pos d_model"], *, freeze: bool) -> Float[Tensor, "pos vocab"]:
        """The logits of the last residual r_L, frozen at the clean run's or recomputed."""

    def attention_bias(self, layer: int) -> Float[Tensor, "d_model"]:
        """What the frozen attention of ``layer`` adds at every position whatever its input."""

    def feature_reading(
        self, run: Any, layer: int, position: int, w: Float[Tensor, "d_model"]
    ) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c): the MLP input of ``layer`` at ``position`` dotted with w is r . v + c, r the residual
        it reads (r_l, or r_l + Attn_l(r_l) with ``mlp_reads_attention``)."""

    def mlp_input_bias(self, layer: int) -> Float[Tensor, "d_model"]:
        """The MLP input of ``layer`` for a residual of zero under the frozen norm (its norm's bias)."""

    def mlp_input_transpose(
        self, run: Any, layer: int, grad: Float[Tensor, "target pos d_model"]
    ) -> Float[Tensor, "target pos d_model"]:
        """The transpose of the frozen map from the residual ``layer``'s MLP reads to its input,
        applied to a gradient at the MLP input (a skip transcoder's W_skip path goes through it)."""

    def final_reading(self, run: Any, position: int, w: Float[Tensor, "d_model"]) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c): the frozen final norm's output at ``position`` dotted with w is r_L . v + c."""

    def logit_reading(
        self, run: Any, position: int, direction: int | Float[Tensor, "vocab"]
    ) -> tuple[Float[Tensor, "d_model"], float]:
        """(v, c): the frozen logits at ``position`` dotted with a (a token's one-hot when
        ``direction`` is a token id, else the coefficient vector ``direction``) are r_L . v + c."""

    def attention_transpose(
        self, run: Any, layer: int, grad: Float[Tensor, "target pos d_model"]
    ) -> Float[Tensor, "target pos d_model"]:
        """The transpose of the frozen attention of ``layer`` (what it adds, as a map of r) applied to grad."""

    def head_transpose(
        self, run: Any, layer: int, grad: Float[Tensor, "pos d_model"], source: int
    ) -> Float[Tensor, "head d_model"]:
        """``attention_transpose`` split by head and read at one source position."""


class Adapter(ABC):
    """One architecture's specifics (module docstring); built around one model instance."""

    model_type: ClassVar[str]  # the transformers ``config.model_type`` it handles
    architecture: ClassVar[str]  # a name for messages, e.g. "GPT-NeoX (Pythia)"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # ------------------------------------------------------------------ 1. structure

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList: ...

    @abstractmethod
    def embed(self) -> nn.Embedding: ...

    @abstractmethod
    def attention(self, layer: int) -> nn.Module: ...

    @abstractmethod
    def mlp_input_norm(self, layer: int) -> nn.Module:
        """The norm whose output is the MLP's input."""

    @abstractmethod
    def mlp(self, layer: int) -> nn.Module: ...

    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @abstractmethod
    def unembed(self) -> nn.Linear: ...

    @property
    def n_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        return int(self.embed().num_embeddings)

    # ------------------------------------------------------------------ 2-3. hook sites, pattern

    @abstractmethod
    def attention_pattern(self, layer: int, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch head q k"]:
        """softmax of the attention scores of ``layer`` for the attention input ``x`` at
        positions 0..pos-1 (causal; rows of padded positions are meaningless)."""

    def sites(self, layer: int) -> dict[str, HookSite]:
        """{hook point name without ``blocks.{layer}.``: its site} (module docstring, step 2)."""
        block, mlp = self.decoder_layers()[layer], self.mlp(layer)
        return {
            "hook_resid_pre": HookSite(block, "input"),
            "attn.hook_pattern": HookSite(self.attention(layer), "input", partial(self.attention_pattern, layer)),
            "hook_mlp_in": HookSite(mlp, "input"),
            "hook_mlp_out": HookSite(mlp, "output"),
            "hook_resid_post": HookSite(block, "output"),
        }

    def model_attention_mask(
        self, attention_mask: Int[Tensor, "batch pos"] | None
    ) -> Int[Tensor, "batch pos"] | None:
        """The attention mask to give the model for a batch with this padding mask (the mask itself;
        an architecture whose masked forward misbehaves on padding may pass less)."""
        return attention_mask

    @abstractmethod
    def describe(self, point: str) -> str:
        """Where hook point ``point`` (a ``sites`` key) sits, in the model's own module names."""

    # ------------------------------------------------------------------ 4. linearisation

    @abstractmethod
    def linearised(self) -> LinearisedWeights:
        """The weights the frozen (linearised) forward uses; ValueError when this model cannot
        be linearised (the message names why)."""

    @abstractmethod
    def frozen_hooks(self) -> list[str]:
        """Full hook point names a clean run must record for ``frozen_run``."""

    @abstractmethod
    def frozen_run(self, cache: Mapping[str, Tensor], logits: Float[Tensor, "pos vocab"]) -> Any:
        """The frozen quantities of one prompt from its recorded hook points (batch of one)."""
