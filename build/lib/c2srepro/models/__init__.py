"""The C2S models: loading (hub id or local directory), the embedded mini-C2S, label prediction
and held-out evaluation."""

from c2srepro.models.load import PAPER_MODEL, load_c2s_model

__all__ = ["PAPER_MODEL", "load_c2s_model"]
