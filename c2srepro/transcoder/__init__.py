"""Transcoders: config, model, harvesting of MLP activations, training, the replacement model,
and the SAELens / circuit-tracer file formats."""

from c2srepro.transcoder.config import TranscoderConfig
from c2srepro.transcoder.formats import export_circuit_tracer, export_saelens, import_circuit_tracer, import_saelens
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
    "export_circuit_tracer",
    "export_saelens",
    "harvest_activations",
    "import_circuit_tracer",
    "import_saelens",
    "load_transcoders",
    "remove_mlps",
    "replace_mlps",
    "save_transcoders",
    "train_transcoders",
]
