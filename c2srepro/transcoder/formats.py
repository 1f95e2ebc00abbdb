"""Transcoders in the file formats of SAELens and circuit-tracer: export and import.

Both formats hold the same function as :class:`c2srepro.transcoder.Transcoder`; they differ in
names, layouts and what they record.

1. SAELens (``sae_lens`` 6, its ``Transcoder`` classes): a folder with ``cfg.json`` and
   ``sae_weights.safetensors``, read by ``sae_lens.SAE.load_from_disk``.
   - ``architecture``: ReLU -> ``transcoder``, ReLU + skip -> ``skip_transcoder``, JumpReLU ->
     ``jumprelu_transcoder`` (+ skip: ``jumprelu_skip_transcoder``). BatchTopK is written as
     JumpReLU with its inference threshold, as SAELens itself saves a trained BatchTopK SAE;
     TopK has no SAELens transcoder class and is refused.
   - ``cfg.json``: ``d_in`` = ``d_out`` = d_model, ``d_sae`` = d_tc, ``dtype``, ``device``
     ``"cpu"``, ``apply_b_dec_to_input`` false (SAELens refuses it for transcoders),
     ``normalize_activations`` ``"none"`` (the scales are folded into the weights), and
     ``metadata`` with ``hook_name`` / ``hook_name_out`` (c2srepro's hook points), ``model_name``
     and, under ``c2srepro``, this transcoder's ``TranscoderConfig`` (so an import gets back the
     scales and provenance; a file from elsewhere gets them from ``cfg.json`` alone).
   - weights: ``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_out], ``b_dec``, as
     c2srepro's; ``W_skip`` [d_out, d_in] (SAELens computes x @ W_skip^T: c2srepro's transposed);
     ``threshold`` [d_sae]. SAELens' JumpReLU is ReLU(pre) [pre > threshold], equal to
     c2srepro's pre [pre > threshold] because thresholds are >= 0.
2. circuit-tracer (``SingleLayerTranscoder``, the per-layer ``transcoder_set`` layout): one file
   ``layer_{l}.safetensors`` per layer with ``W_enc`` [d_tc, d_model] (circuit-tracer computes
   F.linear(x, W_enc): c2srepro's transposed), ``W_dec`` [d_tc, d_model], ``b_enc``, ``b_dec``,
   ``W_skip`` [d_model, d_model] (x @ W_skip^T, transposed) and, for JumpReLU (and BatchTopK's
   threshold), ``activation_function.threshold``; the file's metadata holds the
   ``TranscoderConfig``. ``config.yaml`` beside them lists the files with ``model_kind:
   transcoder_set`` and the hooks (``ln2.hook_normalized`` -> ``hook_mlp_out``: the MLP's
   input and output, where c2srepro's transcoders read and write). TopK is refused.

Exports are written atomically (a whole folder at a time); imports check the architecture and
every shape, and an architecture c2srepro does not have is a ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from c2srepro._cache import atomic_directory, write_json_atomic
from c2srepro.transcoder.config import TranscoderConfig
from c2srepro.transcoder.model import Transcoder, check_threshold

SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# (activation, skip) -> SAELens architecture; BatchTopK infers as JumpReLU.
_SAELENS_ARCHITECTURE = {
    ("relu", False): "transcoder", ("relu", True): "skip_transcoder",
    ("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder",
    ("batchtopk", False): "jumprelu_transcoder", ("batchtopk", True): "jumprelu_skip_transcoder",
}
_FROM_SAELENS = {
    "transcoder": ("relu", False), "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True),
}
CIRCUIT_TRACER_CONFIG = "config.yaml"
CIRCUIT_TRACER_LAYER = "layer_{layer}.safetensors"
CIRCUIT_TRACER_THRESHOLD = "activation_function.threshold"
CIRCUIT_TRACER_HOOKS = {"feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out"}


def _refuse_topk(transcoder: Transcoder, where: str) -> None:
    if transcoder.cfg.activation == "topk":
        raise ValueError(
            f"{where} has no TopK transcoder: a topk transcoder cannot be written in its format "
            "(train a batchtopk transcoder, which infers with a threshold, to move it there)"
        )


def _tensors(transcoder: Transcoder) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in transcoder.named_parameters()}


def _build(cfg: TranscoderConfig, state: dict[str, torch.Tensor], where: str) -> Transcoder:
    """A transcoder of ``cfg`` holding ``state`` (c2srepro names and layout), shapes checked."""
    transcoder = Transcoder(cfg)
    expected = {name: tuple(p.shape) for name, p in transcoder.named_parameters()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        raise ValueError(f"{where} holds weights {found}, but its configuration describes {expected}")
    if transcoder.threshold is not None:
        check_threshold(state["threshold"], where=where)
    transcoder.load_state_dict(state)
    return transcoder


def export_saelens(transcoder: Transcoder, directory: str | os.PathLike) -> Path:
    """Write ``transcoder`` as a SAELens transcoder folder (module docstring, part 1)."""
    _refuse_topk(transcoder, "SAELens")
    cfg = transcoder.cfg
    tensors = _tensors(transcoder)
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T.contiguous()  # SAELens: [d_out, d_in]
    dtype = str(tensors["W_enc"].dtype).removeprefix("torch.")
    config = {
        "architecture": _SAELENS_ARCHITECTURE[(cfg.activation, cfg.skip)],
        "d_in": cfg.d_model, "d_sae": cfg.d_transcoder, "d_out": cfg.d_model, "dtype": dtype, "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "hook_name": cfg.hook_point_in, "hook_name_out": cfg.hook_point_out, "model_name": cfg.model_name,
            "c2srepro": dataclasses.replace(cfg, dtype=dtype).to_dict(),
        },
    }
    with atomic_directory(directory) as staging:
        save_file(tensors, str(staging / SAELENS_WEIGHTS))
        write_json_atomic(staging / SAELENS_CONFIG, config)
    return Path(directory)


def import_saelens(directory: str | os.PathLike, *, layer: int | None = None) -> Transcoder:
    """The transcoder in a SAELens transcoder folder (c2srepro's own export or another's).

    A folder c2srepro wrote gets back its ``TranscoderConfig``; for another, ``layer`` (default:
    read from a ``blocks.{layer}.`` hook name) and the hook names come from ``cfg.json``."""
    directory = Path(directory)
    config_path, weights_path = directory / SAELENS_CONFIG, directory / SAELENS_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {directory} a SAELens SAE folder (cfg.json + {SAELENS_WEIGHTS})?")
    config = json.loads(config_path.read_text())
    architecture = config.get("architecture")
    if architecture not in _FROM_SAELENS:
        raise ValueError(
            f"{config_path} is a SAELens {architecture!r} model, not a transcoder c2srepro can load: "
            f"the supported architectures are {sorted(_FROM_SAELENS)}"
        )
    if config.get("d_in") != config.get("d_out"):
        raise ValueError(f"{config_path}: d_in={config.get('d_in')} != d_out={config.get('d_out')}; a c2srepro "
                         "transcoder maps an MLP's input to its output, both d_model wide")
    if config.get("normalize_activations", "none") != "none":
        raise ValueError(f"{config_path}: normalize_activations={config['normalize_activations']!r}; only 'none' "
                         "(normalisation folded into the weights) maps onto a c2srepro transcoder")
    with safe_open(str(weights_path), framework="pt") as handle:
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    if "W_skip" in state:
        state["W_skip"] = state["W_skip"].T.contiguous()
    metadata = config.get("metadata") or {}
    activation, skip = _FROM_SAELENS[architecture]
    if isinstance(metadata.get("c2srepro"), dict):
        cfg = TranscoderConfig.from_dict(metadata["c2srepro"])
        if (_SAELENS_ARCHITECTURE.get((cfg.activation, cfg.skip))) != architecture:
            raise ValueError(f"{config_path}: architecture {architecture!r} contradicts its c2srepro config "
                             f"(activation {cfg.activation!r}, skip {cfg.skip})")
    else:
        cfg = TranscoderConfig(
            d_model=int(config["d_in"]), d_transcoder=int(config["d_sae"]),
            layer=_layer_of(metadata.get("hook_name"), layer, config_path), activation=activation, skip=skip,
            hook_point_in=metadata.get("hook_name"), hook_point_out=metadata.get("hook_name_out"),
            dtype=str(state["W_enc"].dtype).removeprefix("torch."), model_name=metadata.get("model_name"),
        )
    return _build(cfg, state, str(weights_path))


def _layer_of(hook_name: str | None, layer: int | None, where: Path) -> int:
    if layer is not None:
        return layer
    parts = (hook_name or "").split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    raise ValueError(f"{where}: cannot tell the layer from hook_name {hook_name!r}; pass layer=")


def export_circuit_tracer(transcoders: Mapping[int, Transcoder], directory: str | os.PathLike) -> Path:
    """Write a model's transcoders (every layer from 0) in circuit-tracer's per-layer layout (part 2)."""
    layers = sorted(transcoders)
    if layers != list(range(len(layers))):
        raise ValueError(f"circuit-tracer needs a transcoder for every layer 0..{max(layers)}, got layers {layers}")
    with atomic_directory(directory) as staging:
        files = []
        for layer in layers:
            transcoder = transcoders[layer]
            _refuse_topk(transcoder, "circuit-tracer")
            tensors = _tensors(transcoder)
            tensors["W_enc"] = tensors["W_enc"].T.contiguous()  # circuit-tracer: [d_tc, d_model]
            if "W_skip" in tensors:
                tensors["W_skip"] = tensors["W_skip"].T.contiguous()
            if "threshold" in tensors:
                tensors[CIRCUIT_TRACER_THRESHOLD] = tensors.pop("threshold")
            dtype = str(tensors["W_dec"].dtype).removeprefix("torch.")
            name = CIRCUIT_TRACER_LAYER.format(layer=layer)
            metadata = {"c2srepro": json.dumps(dataclasses.replace(transcoder.cfg, dtype=dtype).to_dict())}
            save_file(tensors, str(staging / name), metadata=metadata)
            files.append(name)
        first = transcoders[layers[0]].cfg
        config: dict[str, Any] = {"model_kind": "transcoder_set", "model_name": first.model_name,
                                  **CIRCUIT_TRACER_HOOKS, "transcoders": files}
        (staging / CIRCUIT_TRACER_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(directory)


def import_circuit_tracer(directory: str | os.PathLike) -> dict[int, Transcoder]:
    """{layer: Transcoder} from a circuit-tracer per-layer transcoder folder (part 2)."""
    directory = Path(directory)
    config_path = directory / CIRCUIT_TRACER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: is {directory} a circuit-tracer transcoder set?")
    config = yaml.safe_load(config_path.read_text()) or {}
    if config.get("model_kind") != "transcoder_set":
        raise ValueError(f"{config_path}: model_kind {config.get('model_kind')!r} is not 'transcoder_set' "
                         "(per-layer transcoders); cross-layer transcoders have no c2srepro counterpart")
    out = {}
    for layer, name in enumerate(config.get("transcoders") or []):
        path = directory / name
        with safe_open(str(path), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata() or {}
        state["W_enc"] = state["W_enc"].T.contiguous()
        if "W_skip" in state:
            state["W_skip"] = state["W_skip"].T.contiguous()
        if CIRCUIT_TRACER_THRESHOLD in state:
            state["threshold"] = state.pop(CIRCUIT_TRACER_THRESHOLD)
        if "c2srepro" in metadata:
            cfg = TranscoderConfig.from_dict(json.loads(metadata["c2srepro"]))
        else:
            cfg = TranscoderConfig(
                d_model=state["b_dec"].shape[0], d_transcoder=state["b_enc"].shape[0], layer=layer,
                activation="jumprelu" if "threshold" in state else "relu", skip="W_skip" in state,
                dtype=str(state["W_dec"].dtype).removeprefix("torch."), model_name=config.get("model_name"),
            )
        if cfg.layer != layer:
            raise ValueError(f"{path} is listed as layer {layer} in {config_path} but holds layer {cfg.layer}'s transcoder")
        out[layer] = _build(cfg, state, str(path))
    if not out:
        raise ValueError(f"{config_path} lists no transcoders")
    return out
