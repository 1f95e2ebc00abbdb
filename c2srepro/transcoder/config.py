"""The two configurations of a transcoder, kept apart as SAELens keeps them.

1. ``TranscoderConfig``: what the transcoder IS, enough to rebuild and use it: its shape
   (``d_model``, ``d_transcoder``), where it reads and writes (``layer``, the two hook points),
   the normalisation scalars of training folded into its weights, its activation, dtype, and
   the model and library version it came from. ``train_transcoders`` builds it from the
   activations (``d_model`` among them); users build one by hand only for a random or
   hand-made transcoder. Saved as ``cfg.json``.
2. ``TrainConfig``: how it was TRAINED: width as an expansion factor, learning rate and its
   schedule, L1 coefficient and its ramp, batch and run length, resampling, checkpointing,
   seed. Saved as ``training.json`` beside the weights of a trained transcoder.

Both validate their fields (a ``ValueError`` naming the field) and round-trip through
``to_dict`` / ``from_dict`` exactly. ``TrainConfig`` defaults are the paper's (Hosokawa et al.,
"Training Hyperparameters"): max learning rate 1e-4, 2048 tokens per batch, L1 coefficient
1.4e-4, expansion factor 8, 60M training tokens; ``c2srepro.transcoder.train`` explains the rest.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from c2srepro._checkpoint import CheckpointClock
from c2srepro._config import config_from_dict
from c2srepro.models.hooked import TRANSCODER_HOOK_POINT, TRANSCODER_OUTPUT_HOOK_POINT

ACTIVATIONS = ("relu",)
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Where a GPT-NeoX layer's transcoder reads (the MLP's input, post_attention_layernorm of the
# residual) and writes (the MLP's output), as the harvest records them.
HOOK_POINT_IN = TRANSCODER_HOOK_POINT
HOOK_POINT_OUT = TRANSCODER_OUTPUT_HOOK_POINT


def _library_version() -> str:
    from c2srepro import __version__  # imported late: the package imports this module

    return __version__


@dataclass
class TranscoderConfig:
    """Architecture and provenance of one transcoder (``W_enc: [d_model, d_transcoder]``).

    ``hook_point_in`` / ``hook_point_out`` default to the MLP input and output of ``layer``.
    ``input_scale`` / ``output_scale`` are the scalars s_in, s_out training divided the MLP
    inputs and outputs by; they are already folded into the weights (which map raw MLP inputs
    to raw MLP outputs) and are kept so that the training-space weights can be recovered.
    ``dtype`` is that of the weights; ``model_name`` / ``model_fingerprint`` name the model the
    activations came from, where the activations knew it.
    """

    d_model: int
    d_transcoder: int
    layer: int
    hook_point_in: str | None = None
    hook_point_out: str | None = None
    input_scale: float = 1.0
    output_scale: float = 1.0
    activation: str = "relu"
    dtype: str = "float32"
    model_name: str | None = None
    model_fingerprint: str | None = None
    library_version: str = field(default_factory=_library_version)

    def __post_init__(self) -> None:
        for name in ("d_model", "d_transcoder"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be an integer >= 0, got {self.layer!r}")
        if self.hook_point_in is None:
            self.hook_point_in = HOOK_POINT_IN.format(layer=self.layer)
        if self.hook_point_out is None:
            self.hook_point_out = HOOK_POINT_OUT.format(layer=self.layer)
        for name in ("input_scale", "output_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @property
    def d_tc(self) -> int:
        """``d_transcoder`` under the name the tensor shapes use (``Float[Tensor, "... d_tc"]``)."""
        return self.d_transcoder

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TranscoderConfig":
        return config_from_dict(cls, data)


@dataclass
class TrainConfig:
    """How transcoders are trained (``c2srepro.transcoder.train`` gives the reasons).

    The run has ``total_steps = ceil(training_tokens / tokens_per_batch)`` steps, and the
    schedules span them; ``train_transcoders(..., steps=n)`` sets ``training_tokens`` to
    ``n * tokens_per_batch`` for a run of exactly ``n`` steps. ``seed`` seeds the encoder
    initialisation, the shuffle of the rows and the resampling draws. With a checkpoint
    directory, training checkpoints after every ``checkpoint_every_fraction`` of its steps, every
    ``checkpoint_every_seconds`` of wall time and every ``checkpoint_every_steps`` steps (None
    turns a rule off; ``c2srepro._checkpoint``). These and ``device`` do not change the weights,
    so a resumed run may change them.
    """

    expansion_factor: int = 8
    lr: float = 1e-4
    l1_coefficient: float = 1.4e-4
    tokens_per_batch: int = 2048
    training_tokens: int = 60_000_000
    seed: int = 0
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    l1_warmup_fraction: float = 0.05
    adam_betas: tuple[float, float] = (0.9, 0.999)
    resample_every_steps: int = 2500
    resample_until_fraction: float = 0.5
    dead_window_tokens: int = 10_000_000
    buffer_tokens: int = 32_768
    log_every_steps: int = 50
    checkpoint_every_fraction: float | None = 0.1
    checkpoint_every_seconds: float | None = 300.0
    checkpoint_every_steps: int | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        for name in ("expansion_factor", "tokens_per_batch", "training_tokens", "dead_window_tokens",
                     "buffer_tokens", "log_every_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        # the checkpoint rules check their own fields
        CheckpointClock(self.total_steps, every_fraction=self.checkpoint_every_fraction,
                        every_seconds=self.checkpoint_every_seconds, every_steps=self.checkpoint_every_steps)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.l1_coefficient >= 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {self.l1_coefficient}")
        for name in ("warmup_fraction", "l1_warmup_fraction", "resample_until_fraction", "min_lr_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not isinstance(self.resample_every_steps, int) or self.resample_every_steps < 0:
            raise ValueError(
                "resample_every_steps must be an integer >= 0 (0 turns resampling off), "
                f"got {self.resample_every_steps!r}"
            )

    @property
    def total_steps(self) -> int:
        return math.ceil(self.training_tokens / self.tokens_per_batch)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, data)
