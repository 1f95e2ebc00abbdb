"""Transcoders: config, model, harvesting of MLP activations, training, the replacement model."""

from c2srepro.transcoder.config import TranscoderConfig
from c2srepro.transcoder.harvest import (
    ActivationBlock,
    ActivationSource,
    CachedActivations,
    ShuffleBuffer,
    StreamingActivations,
    TensorActivations,
    harvest_activations,
)
from c2srepro.transcoder.model import Transcoder, load_transcoders, save_transcoders
from c2srepro.transcoder.replace import ReplacementReport, evaluate_replacement, remove_mlps, replace_mlps
from c2srepro.transcoder.train import TrainConfig, TrainingResult, train_transcoders

__all__ = [
    "ActivationBlock",
    "ActivationSource",
    "CachedActivations",
    "ReplacementReport",
    "ShuffleBuffer",
    "StreamingActivations",
    "TensorActivations",
    "TrainConfig",
    "Transcoder",
    "TranscoderConfig",
    "TrainingResult",
    "evaluate_replacement",
    "harvest_activations",
    "load_transcoders",
    "remove_mlps",
    "replace_mlps",
    "save_transcoders",
    "train_transcoders",
]
