"""The transcoder: a wide, sparse ReLU layer that imitates one MLP.

Weight layout, used everywhere in c2srepro (SAELens convention):
    W_enc: [d_model, d_tc]   column i is the paper's encoder vector f_enc^(i)
    W_dec: [d_tc, d_model]   row i is the paper's decoder vector f_dec^(i)

    z     = ReLU(x @ W_enc + b_enc)        # paper eq. 1
    y_hat = z @ W_dec + b_dec              # paper eq. 2
    loss  = ||y_hat - MLP(x)||^2 + lambda * ||z||_1   # paper eq. 4

One transcoder per layer is saved as a directory (safetensors weights + json config);
``save_transcoders`` / ``load_transcoders`` keep a model's set as ``layer_XX`` subdirectories.
Trained transcoders (``c2srepro.transcoder.train``) take raw MLP inputs, return raw MLP outputs,
and have unit-norm decoder rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from c2srepro.transcoder.config import TranscoderConfig

WEIGHTS_FILENAME = "transcoder.safetensors"
CONFIG_FILENAME = "transcoder_config.json"


class Transcoder(nn.Module):
    def __init__(self, cfg: TranscoderConfig):
        super().__init__()
        self.cfg = cfg
        d_model, d_tc = cfg.d_model, cfg.d_tc
        generator = torch.Generator().manual_seed(cfg.seed)
        # Kaiming-uniform encoder; decoder rows start as the encoder's transpose, unit norm,
        # so every feature starts live and aligned (a common SAE initialisation).
        w_enc = (torch.rand(d_model, d_tc, generator=generator) * 2 - 1) / d_model**0.5
        w_dec = w_enc.T.clone()
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_enc = nn.Parameter(w_enc)  # [d_model, d_tc]
        self.b_enc = nn.Parameter(torch.zeros(d_tc))  # [d_tc]
        self.W_dec = nn.Parameter(w_dec)  # [d_tc, d_model]
        self.b_dec = nn.Parameter(torch.zeros(d_model))  # [d_model]

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_tc"]:
        return torch.relu(x @ self.W_enc + self.b_enc)  # eq. 1

    def decode(self, z: Float[Tensor, "... d_tc"]) -> Float[Tensor, "... d_model"]:
        return z @ self.W_dec + self.b_dec  # eq. 2

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.decode(self.encode(x))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write weights (safetensors) and config (json) atomically into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}
        tmp_weights = directory / (WEIGHTS_FILENAME + ".tmp")
        save_file(tensors, str(tmp_weights))
        tmp_config = directory / (CONFIG_FILENAME + ".tmp")
        tmp_config.write_text(json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True))
        os.replace(tmp_weights, directory / WEIGHTS_FILENAME)
        os.replace(tmp_config, directory / CONFIG_FILENAME)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> "Transcoder":
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILENAME, directory / WEIGHTS_FILENAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: is {directory} a transcoder saved with Transcoder.save()?"
                )
        cfg = TranscoderConfig.from_dict(json.loads(config_path.read_text()))
        transcoder = cls(cfg)
        state = load_file(str(weights_path), device=str(device))
        transcoder.load_state_dict(state)
        return transcoder.to(device)


LAYER_DIRECTORY = "layer_{layer:02d}"


def save_transcoders(transcoders: Mapping[int, Transcoder], directory: str | os.PathLike) -> Path:
    """Save each layer's transcoder in ``directory/layer_XX`` (the layout ``load_transcoders`` reads)."""
    directory = Path(directory)
    for layer, transcoder in sorted(transcoders.items()):
        if transcoder.cfg.layer != layer:
            raise ValueError(f"the transcoder stored under layer {layer} says it is for layer {transcoder.cfg.layer}")
        transcoder.save(directory / LAYER_DIRECTORY.format(layer=layer))
    return directory


def load_transcoders(
    directory: str | os.PathLike, *, layers: Sequence[int] | None = None, device: str | torch.device = "cpu"
) -> dict[int, Transcoder]:
    """{layer: Transcoder} from ``directory/layer_XX`` (all layers found there by default)."""
    directory = Path(directory)
    found = {int(p.name.split("_")[1]): p for p in directory.glob("layer_*") if (p / CONFIG_FILENAME).is_file()}
    if not found:
        raise FileNotFoundError(f"no transcoders in {directory}: expected layer_XX directories written by save_transcoders")
    wanted = sorted(found) if layers is None else sorted(set(layers))
    missing = [layer for layer in wanted if layer not in found]
    if missing:
        raise FileNotFoundError(f"no transcoders for layers {missing} in {directory} (it has {sorted(found)})")
    return {layer: Transcoder.load(found[layer], device=device) for layer in wanted}
