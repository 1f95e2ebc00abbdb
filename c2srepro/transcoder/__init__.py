"""Transcoders: config, model, training, harvesting of MLP activations."""

from c2srepro.transcoder.config import TranscoderConfig
from c2srepro.transcoder.model import Transcoder

__all__ = ["Transcoder", "TranscoderConfig"]
