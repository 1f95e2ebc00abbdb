"""Configuration of one transcoder: architecture and training hyperparameters.

Defaults are the paper's (Hosokawa et al., "Training Hyperparameters"): max learning rate 1e-4,
2048 tokens per batch, L1 coefficient 1.4e-4, expansion factor 8, 60M training tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from c2srepro._config import config_from_dict


@dataclass
class TranscoderConfig:
    """One transcoder per MLP layer; ``d_tc = expansion_factor * d_model``."""

    d_model: int
    expansion_factor: int = 8
    layer: int = 0
    l1_coefficient: float = 1.4e-4
    lr: float = 1e-4
    tokens_per_batch: int = 2048
    training_tokens: int = 60_000_000
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_model <= 0:
            raise ValueError(f"d_model must be positive, got {self.d_model}")
        if self.expansion_factor <= 0:
            raise ValueError(f"expansion_factor must be positive, got {self.expansion_factor}")
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        if self.l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.tokens_per_batch <= 0 or self.training_tokens <= 0:
            raise ValueError("tokens_per_batch and training_tokens must be positive")

    @property
    def d_tc(self) -> int:
        return self.d_model * self.expansion_factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TranscoderConfig":
        return config_from_dict(cls, data)
