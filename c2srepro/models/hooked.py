"""One way into a Hugging Face causal LM: named hook points, read and written through PyTorch hooks.

Hook points (TransformerLens names; ``{L}`` is the layer index; shapes for a batch of prompts):

    blocks.{L}.hook_resid_pre     Float[Tensor, "batch pos d_model"]  residual stream entering layer L
    blocks.{L}.attn.hook_pattern  Float[Tensor, "batch head q k"]     attention pattern (read-only)
    blocks.{L}.hook_mlp_in        Float[Tensor, "batch pos d_model"]  the MLP's input (its norm's output)
    blocks.{L}.hook_mlp_out       Float[Tensor, "batch pos d_model"]  what the MLP adds to the residual
    blocks.{L}.hook_resid_post    Float[Tensor, "batch pos d_model"]  residual stream leaving layer L

Which module each point is, and how the pattern is computed, is the architecture adapter's
business (:mod:`c2srepro.models.adapters`), chosen from ``model.config.model_type``.

1. ``hooks([(name, fn), ...])`` installs one PyTorch hook per pair for the duration of a ``with``
   block (removed on exit, even on error). ``fn(value, point)`` returns None to read, or a tensor
   that replaces ``value`` downstream (to write). ``attn.hook_pattern`` is derived from the
   attention's input with the model's own weights (fused attention kernels never materialise
   it), so it can be read, not written.
2. Reading: ``caching(names)`` fills a dict {name: value} on every forward pass inside the block
   (the last pass wins); ``run_with_cache`` runs one pass with it and returns the logits too;
   ``cache`` runs one pass that stops as soon as every requested point is recorded, so nothing
   later (further layers, the LM head) runs.
3. Writing: ``replace_mlps({L: fn})`` makes ``blocks.{L}.hook_mlp_out`` = ``fn(blocks.{L}.hook_mlp_in)``
   in the same pass: a read hook keeps the MLP input, a write hook on the output replaces it.
   The MLP itself still runs and its output is discarded: the model is never modified.
4. Every pass runs the Hugging Face model itself on right-padded batches (positions 0..pos-1 of
   each prompt, ``use_cache=False``), so values at real tokens are those of the prompt run alone;
   the adapter decides which attention mask the model is given (``model_attention_mask``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from c2srepro.models.adapters import Adapter, HookSite, adapter_for

SHAPES = {
    "hook_resid_pre": "batch pos d_model",
    "attn.hook_pattern": "batch head q k",
    "hook_mlp_in": "batch pos d_model",
    "hook_mlp_out": "batch pos d_model",
    "hook_resid_post": "batch pos d_model",
}
# The hook point a transcoder of layer L reads, and the one its output stands in for.
TRANSCODER_HOOK_POINT = "blocks.{layer}.hook_mlp_in"
TRANSCODER_OUTPUT_HOOK_POINT = "blocks.{layer}.hook_mlp_out"


def hook_name(layer: int, point: str) -> str:
    return f"blocks.{layer}.{point}"


@dataclass(frozen=True)
class HookPoint:
    """A named point of the model: ``blocks.{layer}.{point}``, at ``site``, of shape ``shape``."""

    name: str
    layer: int
    point: str
    site: HookSite

    @property
    def shape(self) -> str:
        return SHAPES[self.point]

    def install(self, fn: "HookFn") -> torch.utils.hooks.RemovableHandle:
        site = self.site

        def call(value: Tensor) -> Tensor | None:
            if site.derive is None:
                return fn(value, self)
            if fn(site.derive(value), self) is not None:
                raise ValueError(f"{self.name} is read-only: a hook on it must return None")
            return None

        if site.at == "input":

            def pre_hook(module, args, kwargs):
                new = call(args[0] if args else kwargs["hidden_states"])
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(module, args, output):
            new = call(output[0] if isinstance(output, tuple) else output)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return site.module.register_forward_hook(hook)


HookFn = Callable[[Tensor, HookPoint], Tensor | None]


class _CacheComplete(Exception):
    """Raised by the hook that records the last requested point, to end the pass early."""


class HookedModel:
    """A Hugging Face causal LM with named hook points (module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapter: Adapter = adapter_for(model)
        self._points: dict[str, HookPoint] | None = None

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers

    @property
    def d_model(self) -> int:
        return self.adapter.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by name."""
        if self._points is None:
            self._points = {
                hook_name(layer, point): HookPoint(hook_name(layer, point), layer, point, site)
                for layer in range(self.n_layers)
                for point, site in self.adapter.sites(layer).items()
            }
        return self._points

    def hook_point(self, name: str) -> HookPoint:
        if name not in self.hook_points:
            raise ValueError(
                f"no hook point {name!r}: the model has blocks.{{L}}.{{{', '.join(SHAPES)}}} for L in "
                f"0..{self.n_layers - 1}"
            )
        return self.hook_points[name]

    def check_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        """``layers`` validated against the model (all layers when None), sorted, without repeats."""
        if layers is None:
            return tuple(range(self.n_layers))
        chosen = tuple(sorted({int(layer) for layer in layers}))
        if not chosen:
            raise ValueError("layers is empty: give at least one layer index, or None for all layers")
        bad = [layer for layer in chosen if not 0 <= layer < self.n_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has layers 0..{self.n_layers - 1}")
        return chosen

    def check_prompt(self, input_ids: Tensor | Sequence[int]) -> Int[Tensor, "pos"]:
        """A 1-D LongTensor of one prompt on the model's device, checked against its vocabulary and context."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(
                f"input_ids must be one non-empty prompt (shape [pos] or [1, pos]), got shape {tuple(ids.shape)}"
            )
        if ids.numel() > self.adapter.max_positions:
            raise ValueError(
                f"prompt has {ids.numel()} tokens but the model's context (max_position_embeddings) is "
                f"{self.adapter.max_positions}; shorten the prompt (e.g. fewer genes)"
            )
        vocab = self.adapter.vocab_size
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(
                f"input_ids must lie in [0, {vocab}) (the model's vocabulary), got {int(ids.min())}..{int(ids.max())}"
            )
        return ids

    # ------------------------------------------------------------------ the mechanism (step 1)

    @contextmanager
    def hooks(self, hooks: Iterable[tuple[str, HookFn]] | Mapping[str, HookFn]) -> Iterator["HookedModel"]:
        """Install ``(name, fn)`` hooks for the ``with`` block (module docstring, step 1)."""
        pairs = list(hooks.items() if isinstance(hooks, Mapping) else hooks)
        handles = []
        try:
            for name, fn in pairs:
                handles.append(self.hook_point(name).install(fn))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    # ------------------------------------------------------------------ reading (step 2)

    @contextmanager
    def caching(self, names: Iterable[str]) -> Iterator[dict[str, Tensor]]:
        """{name: detached value} of every forward pass inside the block (the last pass wins)."""
        with self._recording(names, stop_when_complete=False) as cache:
            yield cache

    @contextmanager
    def _recording(self, names: Iterable[str], *, stop_when_complete: bool) -> Iterator[dict[str, Tensor]]:
        wanted = list(dict.fromkeys(names))
        cache: dict[str, Tensor] = {}

        def record(value: Tensor, point: HookPoint) -> None:
            cache[point.name] = value.detach()
            if stop_when_complete and len(cache) == len(wanted):
                raise _CacheComplete

        with self.hooks([(name, record) for name in wanted]):
            yield cache

    def forward(
        self, input_ids: Int[Tensor, "batch pos"], *, attention_mask: Int[Tensor, "batch pos"] | None = None
    ) -> Float[Tensor, "batch pos vocab"] | None:
        """Logits of one pass (None when ``cache`` ended it early)."""
        device = self.device
        mask = self.adapter.model_attention_mask(attention_mask)
        mask = None if mask is None else mask.to(device)
        try:
            return self.model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False).logits
        except _CacheComplete:
            return None

    def run_with_cache(
        self,
        input_ids: Int[Tensor, "batch pos"],
        names: Iterable[str],
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> tuple[Float[Tensor, "batch pos vocab"], dict[str, Tensor]]:
        """Logits and {name: value} of one full pass."""
        with torch.no_grad(), self.caching(names) as cache:
            logits = self.forward(input_ids, attention_mask=attention_mask)
        return logits, cache

    def cache(
        self,
        input_ids: Int[Tensor, "batch pos"],
        names: Iterable[str],
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
    ) -> dict[str, Tensor]:
        """{name: value} of one pass stopped as soon as every point in ``names`` is recorded."""
        with torch.no_grad(), self._recording(names, stop_when_complete=True) as cache:
            self.forward(input_ids, attention_mask=attention_mask)
        return cache

    # ------------------------------------------------------------------ writing (step 3)

    @contextmanager
    def replace_mlps(
        self, replacements: Mapping[int, Callable[[Float[Tensor, "batch pos d_model"]], Tensor]]
    ) -> Iterator["HookedModel"]:
        """Inside the block, ``blocks.{L}.hook_mlp_out`` = ``replacements[L](blocks.{L}.hook_mlp_in)``
        (cast to the output's dtype) for each layer L given."""
        inputs: dict[int, Tensor] = {}

        def keep_input(value: Tensor, point: HookPoint) -> None:
            inputs[point.layer] = value

        def replace_output(value: Tensor, point: HookPoint) -> Tensor:
            return replacements[point.layer](inputs.pop(point.layer)).to(value.dtype)

        hooks = []
        for layer in self.check_layers(list(replacements)):
            hooks += [(hook_name(layer, "hook_mlp_in"), keep_input), (hook_name(layer, "hook_mlp_out"), replace_output)]
        with self.hooks(hooks):
            yield self


def as_hooked(model: nn.Module | HookedModel) -> HookedModel:
    """``model`` wrapped (a HookedModel is returned as is)."""
    return model if isinstance(model, HookedModel) else HookedModel(model)
