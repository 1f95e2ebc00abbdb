"""The two configurations of a transcoder, kept apart as SAELens keeps them.

1. ``TranscoderConfig``: what the transcoder IS, enough to rebuild and use it: its shape
   (``d_model``, ``d_transcoder``), where it reads and writes (``layer``, the two hook points),
   the normalisation scalars of training folded into its weights, its activation (``relu``,
   ``topk`` with its ``k``, ``batchtopk`` and ``jumprelu`` with a per-feature threshold, the
   transcoder's ``threshold`` weights) and whether it has a linear ``skip`` path, its dtype, and
   the model (architecture, name, fingerprint) and library version it came from. ``train_transcoders`` builds it from the
   activations (``d_model`` among them); users build one by hand only for a random or
   hand-made transcoder. Saved as ``cfg.json``.
2. ``TrainConfig``: how it was TRAINED: width as an expansion factor, learning rate and its
   schedule, the activation to train (``activation``: the variant; ``skip``) and its sparsity
   knobs (L1 coefficient, ``k``, L0 coefficient, their ramp, the AuxK loss), batch and run
   length, resampling, checkpointing, seed. Saved as ``training.json`` beside the weights of a trained transcoder.

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

ACTIVATIONS = ("relu", "topk", "batchtopk", "jumprelu")
# Activations whose transcoder holds a per-feature ``threshold`` (BatchTopK infers with one).
THRESHOLD_ACTIVATIONS = ("batchtopk", "jumprelu")
# Activations that keep the k largest pre-activations while training.
TOPK_ACTIVATIONS = ("topk", "batchtopk")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# Where a layer's transcoder reads (the MLP's input) and writes (what the MLP adds to the residual),
# as the harvest records them; which module outputs these are is the architecture adapter's business.
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
    ``activation`` is the nonlinearity of eq. 1 (``ACTIVATIONS``); ``k`` the number of features
    a ``topk`` transcoder keeps per token (for ``batchtopk``, the mean per token it was trained
    with; it infers with its threshold); ``skip`` adds ``W_skip: [d_model, d_model]``, a linear
    path from MLP input to output. ``dtype`` is that of the weights; ``model_type`` (the
    architecture, transformers' ``config.model_type``: "gpt_neox", "gemma2"), ``model_name`` and
    ``model_fingerprint`` name the model the activations came from, where the activations knew it.
    """

    d_model: int
    d_transcoder: int
    layer: int
    hook_point_in: str | None = None
    hook_point_out: str | None = None
    input_scale: float = 1.0
    output_scale: float = 1.0
    activation: str = "relu"
    k: int | None = None
    skip: bool = False
    dtype: str = "float32"
    model_type: str | None = None
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
        if self.activation in TOPK_ACTIVATIONS:
            check_k(self.k, self.d_transcoder, activation=self.activation)
        elif self.k is not None:
            raise ValueError(f"k is for the activations {TOPK_ACTIVATIONS}; a {self.activation} transcoder takes k=None")
        if not isinstance(self.skip, bool):
            raise ValueError(f"skip must be True or False, got {self.skip!r}")
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


def check_k(k: object, d_transcoder: int, *, activation: str) -> None:
    """A ``ValueError`` unless ``k`` is a whole number of features in [1, d_transcoder]."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"a {activation} transcoder needs k, an integer >= 1 (features kept per token), got {k!r}")
    if k > d_transcoder:
        raise ValueError(
            f"k={k} is larger than the transcoder's width d_transcoder={d_transcoder}: choose k <= "
            f"{d_transcoder} (or a larger expansion_factor)"
        )


@dataclass
class TrainConfig:
    """How transcoders are trained (``c2srepro.transcoder.train`` gives the reasons).

    The run has ``total_steps = ceil(training_tokens / tokens_per_batch)`` steps, and the
    schedules span them; ``train_transcoders(..., steps=n)`` sets ``training_tokens`` to
    ``n * tokens_per_batch`` for a run of exactly ``n`` steps. ``seed`` seeds the encoder
    initialisation, the shuffle of the rows and the resampling draws. ``activation`` selects
    the variant (``c2srepro.transcoder.train`` describes each): ``relu`` uses
    ``l1_coefficient``, ``topk`` / ``batchtopk`` keep ``k`` features per token and add the AuxK
    loss (weight ``aux_k_coefficient``, ``aux_k`` dead features, default d_model // 2),
    ``jumprelu`` uses ``l0_coefficient``, ``jumprelu_bandwidth`` and
    ``jumprelu_init_threshold``; ``skip`` trains a ``W_skip`` path beside any of them. With a
    checkpoint directory, training checkpoints after every ``checkpoint_every_fraction`` of its
    steps, every ``checkpoint_every_seconds`` of wall time and every ``checkpoint_every_steps``
    steps (None turns a rule off; ``c2srepro._checkpoint``). These and ``device`` do not change
    the weights, so a resumed run may change them.
    """

    expansion_factor: int = 8
    lr: float = 1e-4
    l1_coefficient: float = 1.4e-4
    activation: str = "relu"
    skip: bool = False
    k: int = 32
    aux_k_coefficient: float = 1 / 32
    aux_k: int | None = None
    batchtopk_threshold_lr: float = 0.01
    l0_coefficient: float = 1e-3
    jumprelu_bandwidth: float = 1e-3
    jumprelu_init_threshold: float = 1e-3
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
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.skip, bool):
            raise ValueError(f"skip must be True or False, got {self.skip!r}")
        for name in ("k",) + (("aux_k",) if self.aux_k is not None else ()):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("l1_coefficient", "l0_coefficient", "aux_k_coefficient"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 (a JumpReLU threshold is positive), got {getattr(self, name)}")
        if not 0 < self.batchtopk_threshold_lr <= 1:
            raise ValueError(f"batchtopk_threshold_lr must lie in (0, 1], got {self.batchtopk_threshold_lr}")
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
