"""Architecture adapters: one module per family of Hugging Face causal LMs (see ``base.Adapter``)."""

from __future__ import annotations

from torch import nn

from c2srepro.models.adapters.base import Adapter, HookSite
from c2srepro.models.adapters.gemma2 import Gemma2Adapter
from c2srepro.models.adapters.neox import NeoXAdapter

ADAPTERS: dict[str, type[Adapter]] = {adapter.model_type: adapter for adapter in (NeoXAdapter, Gemma2Adapter)}


def supported_architectures() -> str:
    """The registry as error messages name it: ``'gemma2' (Gemma-2 ...), 'gpt_neox' (GPT-NeoX ...)``."""
    return ", ".join(f"{name!r} ({adapter.architecture})" for name, adapter in sorted(ADAPTERS.items()))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s architecture, chosen by ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{type(model).__name__} (config.model_type {model_type!r}) is not a supported architecture; "
            f"c2srepro supports transformers causal LMs with model_type {supported_architectures()}. "
            "Pass such a model (e.g. from c2srepro.models.load_c2s_model), or add an adapter module "
            "to c2srepro/models/adapters/"
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "Adapter", "Gemma2Adapter", "HookSite", "NeoXAdapter", "adapter_for", "supported_architectures"]
