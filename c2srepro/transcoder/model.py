"""The transcoder: a wide, sparse layer that imitates one MLP.

Weight layout, used everywhere in c2srepro (SAELens convention; d_tc = ``cfg.d_transcoder``):
    W_enc:  [d_model, d_tc]    column i is the paper's encoder vector f_enc^(i)
    W_dec:  [d_tc, d_model]    row i is the paper's decoder vector f_dec^(i)
    W_skip: [d_model, d_model] only when ``cfg.skip``: a linear path, input -> output
    threshold: [d_tc]          only for the ``batchtopk`` and ``jumprelu`` activations

    pre   = x @ W_enc + b_enc
    z     = act(pre)                                # paper eq. 1, act = ReLU in the paper
    y_hat = z @ W_dec + b_dec (+ x @ W_skip)        # paper eq. 2 (+ the skip path)
    loss  = ||y_hat - MLP(x)||^2 + lambda * ||z||_1   # paper eq. 4 (the ReLU variant)

``activate`` is ``act`` for every variant (``cfg.activation``): ``relu``; ``topk``, the k
largest pre-activations of each token through a ReLU, the rest 0; ``jumprelu`` and
``batchtopk`` (at inference, as SAELens runs a trained BatchTopK), pre * [pre > threshold]
with a per-feature threshold >= 0. Every variant is piecewise linear: on a fixed set of active
features z equals pre there, which the attribution graphs rely on.

Saved files, one directory per transcoder (``Transcoder.save`` / ``Transcoder.load``):
    transcoder.safetensors   W_enc, b_enc, W_dec, b_dec (W_skip, threshold), in ``cfg.dtype``
    cfg.json                 ``TranscoderConfig`` (architecture, hook points, scales, provenance)
    training.json            ``TrainConfig`` of a trained transcoder (absent for a hand-made one)
    sha256.json              the sha256 of each file above, checked by ``Transcoder.load``
``save_transcoders`` / ``load_transcoders`` keep a model's set as ``layer_XX`` subdirectories.
Trained transcoders (``c2srepro.transcoder.train``) take raw MLP inputs, return raw MLP outputs,
and have unit-norm decoder rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from c2srepro._cache import CorruptFileError, atomic_directory, atomic_path, record_checksums, verify_checksums, write_json_atomic
from c2srepro._device import resolve_device
from c2srepro.transcoder.config import THRESHOLD_ACTIVATIONS, TrainConfig, TranscoderConfig

WEIGHTS_FILENAME = "transcoder.safetensors"
CONFIG_FILENAME = "cfg.json"
TRAINING_FILENAME = "training.json"
LAYER_DIRECTORY = "layer_{layer:02d}"


def activate(
    pre: Float[Tensor, "... d_tc"], *, activation: str, k: int | None = None, threshold: Tensor | None = None
) -> Float[Tensor, "... d_tc"]:
    """The activation of eq. 1 for each variant (module docstring)."""
    if activation == "relu":
        return torch.relu(pre)
    if activation == "topk":
        values, index = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, index, torch.relu(values))
    if activation in THRESHOLD_ACTIVATIONS:
        return pre * (pre > threshold)  # threshold >= 0, so this is also >= 0
    raise ValueError(f"unknown activation {activation!r}")


def check_threshold(threshold: Tensor, *, where: str) -> None:
    """A ``ValueError`` unless every threshold is finite and >= 0."""
    bad = ~torch.isfinite(threshold) | (threshold < 0)
    if bool(bad.any()):
        raise ValueError(
            f"{where}: {int(bad.sum())} threshold(s) are negative or not finite (e.g. feature "
            f"{int(bad.nonzero()[0])}: {float(threshold[bad][0])}); a JumpReLU threshold must be >= 0"
        )


class Transcoder(nn.Module):
    """``Transcoder(cfg, seed=...)``: a fresh transcoder, initialised from ``seed``.

    ``train_config`` is the ``TrainConfig`` that trained it (None for a fresh or hand-made one).
    """

    def __init__(self, cfg: TranscoderConfig, *, seed: int = 0, train_config: TrainConfig | None = None):
        super().__init__()
        if not isinstance(cfg, TranscoderConfig):
            raise TypeError(f"Transcoder takes a TranscoderConfig, got {type(cfg).__name__}")
        self.cfg, self.train_config = cfg, train_config
        d_model, d_tc = cfg.d_model, cfg.d_transcoder
        generator = torch.Generator().manual_seed(seed)
        # Kaiming-uniform encoder; decoder rows start as the encoder's transpose, unit norm,
        # so every feature starts live and aligned (a common SAE initialisation).
        w_enc = (torch.rand(d_model, d_tc, generator=generator) * 2 - 1) / d_model**0.5
        w_dec = w_enc.T.clone()
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        dtype = cfg.torch_dtype
        self.W_enc = nn.Parameter(w_enc.to(dtype))  # [d_model, d_tc]
        self.b_enc = nn.Parameter(torch.zeros(d_tc, dtype=dtype))  # [d_tc]
        self.W_dec = nn.Parameter(w_dec.to(dtype))  # [d_tc, d_model]
        self.b_dec = nn.Parameter(torch.zeros(d_model, dtype=dtype))  # [d_model]
        # The skip path starts at zero (as in SAELens and Paulo et al. 2025): training grows it.
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model, dtype=dtype)) if cfg.skip else None
        self.threshold = (
            nn.Parameter(torch.zeros(d_tc, dtype=dtype)) if cfg.activation in THRESHOLD_ACTIVATIONS else None
        )

    def pre_activation(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_tc"]:
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_tc"]:
        return activate(self.pre_activation(x), activation=self.cfg.activation, k=self.cfg.k, threshold=self.threshold)  # eq. 1

    def decode(self, z: Float[Tensor, "... d_tc"]) -> Float[Tensor, "... d_model"]:
        """The sparse path z @ W_dec + b_dec (eq. 2), without the skip path."""
        return z @ self.W_dec + self.b_dec

    def skip_output(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"] | None:
        """x @ W_skip, or None for a transcoder without a skip path."""
        return None if self.W_skip is None else x @ self.W_skip

    def forward_with_activations(
        self, x: Float[Tensor, "... d_model"]
    ) -> tuple[Float[Tensor, "... d_model"], Float[Tensor, "... d_tc"]]:
        """(y_hat, z): the full output (sparse path + skip path) and the feature activations."""
        z = self.encode(x)
        y_hat = self.decode(z)
        skip = self.skip_output(x)
        return (y_hat if skip is None else y_hat + skip), z

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.forward_with_activations(x)[0]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write weights, ``cfg.json`` and (when trained) ``training.json`` into ``directory``,
        each file atomically. ``cfg.dtype`` records the dtype the weights have now."""
        directory = Path(directory)
        tensors = {name: p.detach().cpu().contiguous() for name, p in self.named_parameters()}
        dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(f"the transcoder's parameters have several dtypes {sorted(dtypes)}: cast it to one first")
        cfg = dataclasses.replace(self.cfg, dtype=dtypes.pop())
        with atomic_path(directory / WEIGHTS_FILENAME) as tmp:
            save_file(tensors, str(tmp))
        write_json_atomic(directory / CONFIG_FILENAME, cfg.to_dict())
        training = directory / TRAINING_FILENAME
        if self.train_config is not None:
            write_json_atomic(training, self.train_config.to_dict())
        elif training.exists():  # left by an earlier transcoder saved here: not this one's
            training.unlink()
        record_checksums(directory, [WEIGHTS_FILENAME, CONFIG_FILENAME] + ([TRAINING_FILENAME] if self.train_config else []))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | torch.device | None = "cpu") -> "Transcoder":
        """The transcoder ``save`` wrote in ``directory``: same weights, configs and dtype, on
        ``device`` (None: cuda when available, else cpu)."""
        device = resolve_device(device)
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILENAME, directory / WEIGHTS_FILENAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: is {directory} a transcoder saved with Transcoder.save()? "
                    "(transcoders of c2srepro 0.1, saved with transcoder_config.json, must be trained again)"
                )
        try:
            cfg = TranscoderConfig.from_dict(json.loads(config_path.read_text()))
        except ValueError as error:
            raise CorruptFileError(f"{config_path} is damaged ({error}): delete {directory} and train its transcoder again") from error
        again = f"delete {directory} and train the layer-{cfg.layer} transcoder again"
        verify_checksums(directory, fix=again)
        training = directory / TRAINING_FILENAME
        train_config = TrainConfig.from_dict(json.loads(training.read_text())) if training.is_file() else None
        transcoder = cls(cfg, train_config=train_config)
        try:
            state = load_file(str(weights_path), device=str(device))
        except SafetensorError as error:  # saved before checksums were recorded, then truncated
            raise CorruptFileError(f"{weights_path} (the layer-{cfg.layer} transcoder) cannot be read ({error}): {again}") from error
        expected = {name: tuple(p.shape) for name, p in transcoder.named_parameters()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        if found != expected:
            raise ValueError(f"{weights_path} holds weights of shapes {found}, but {config_path} describes {expected}")
        transcoder.load_state_dict(state)
        if transcoder.threshold is not None:
            check_threshold(transcoder.threshold.detach(), where=str(weights_path))
        return transcoder.to(device)


def save_transcoders(
    transcoders: Mapping[int, Transcoder], directory: str | os.PathLike, *, replace: bool = True
) -> Path:
    """Save each layer's transcoder in ``directory/layer_XX`` (the layout ``load_transcoders`` reads).

    ``replace=True`` writes a new ``directory`` and swaps it in whole (nothing of an older set
    stays, and a reader never sees half of one); ``replace=False`` writes just these layers'
    folders into it, for writers that each own some layers (ranks of a distributed run)."""
    directory = Path(directory)
    for layer, transcoder in transcoders.items():
        if transcoder.cfg.layer != layer:
            raise ValueError(f"the transcoder stored under layer {layer} says it is for layer {transcoder.cfg.layer}")
    if not replace:
        for layer, transcoder in sorted(transcoders.items()):
            transcoder.save(directory / LAYER_DIRECTORY.format(layer=layer))
        return directory
    with atomic_directory(directory) as staging:
        for layer, transcoder in sorted(transcoders.items()):
            transcoder.save(staging / LAYER_DIRECTORY.format(layer=layer))
    return directory


def load_transcoders(
    directory: str | os.PathLike, *, layers: Sequence[int] | None = None, device: str | torch.device | None = "cpu"
) -> dict[int, Transcoder]:
    """{layer: Transcoder} from ``directory/layer_XX`` (all layers found there by default), on
    ``device`` (None: cuda when available, else cpu)."""
    directory = Path(directory)
    found = {int(p.name.split("_")[1]): p for p in directory.glob("layer_*") if (p / CONFIG_FILENAME).is_file()}
    if not found:
        raise FileNotFoundError(
            f"no transcoders in {directory}: expected layer_XX directories holding {CONFIG_FILENAME}, "
            "as save_transcoders writes them"
        )
    wanted = sorted(found) if layers is None else sorted(set(layers))
    missing = [layer for layer in wanted if layer not in found]
    if missing:
        raise FileNotFoundError(f"no transcoders for layers {missing} in {directory} (it has {sorted(found)})")
    return {layer: Transcoder.load(found[layer], device=device) for layer in wanted}
