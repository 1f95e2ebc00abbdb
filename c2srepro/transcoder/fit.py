"""Do these transcoders fit this model? One check, used wherever transcoders meet a model.

1. ``transcoders`` is a {layer: Transcoder} mapping or a sequence in increasing layer order (each
   one's layer is its ``cfg.layer``); a single Transcoder, another type or a repeated layer is refused.
2. Layers: every transcoder's layer exists in the model and agrees with the key it is given under;
   ``layers`` (the ones to use) each have a transcoder; ``every_layer`` requires one per layer.
3. Architecture: a transcoder that records the architecture it was trained on (``cfg.model_type``)
   must have been trained on this one: the same hook point names read other activations in
   another architecture (GPT-NeoX's MLP output vs Gemma-2's post-feed-forward norm output), even
   where the widths agree.
4. Shapes: ``cfg.d_model`` is the model's hidden size, and the weights are those of a transcoder of
   width ``cfg.d_tc`` on it (W_enc [d_model, d_tc], b_enc [d_tc], W_dec [d_tc, d_model], b_dec [d_model]).
5. Hook point: a transcoder that records where it was trained must have been trained at
   ``blocks.{layer}.hook_mlp_in`` (reading the MLP input, standing in for ``hook_mlp_out``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from c2srepro.models.adapters import ADAPTERS
from c2srepro.models.hooked import TRANSCODER_HOOK_POINT, HookedModel, as_hooked
from c2srepro.transcoder.model import Transcoder


def _by_layer(transcoders) -> dict[int, Transcoder]:
    if isinstance(transcoders, Transcoder):
        raise ValueError("pass a list or dict of transcoders (one per layer), not a single Transcoder")
    if isinstance(transcoders, Mapping):
        items = [(f"transcoders[{layer!r}]", int(layer), tc) for layer, tc in transcoders.items()]
    elif isinstance(transcoders, Sequence) and not isinstance(transcoders, (str, bytes)):
        items = [(f"transcoders[{i}]", None, tc) for i, tc in enumerate(transcoders)]
    else:
        raise TypeError(
            f"transcoders must be a {{layer: Transcoder}} dict or a list of Transcoders, got "
            f"{type(transcoders).__name__}; load them with c2srepro.transcoder.load_transcoders(directory)"
        )
    by_layer: dict[int, Transcoder] = {}
    for where, key, tc in items:
        if not isinstance(tc, Transcoder):
            raise TypeError(
                f"{where} must be a c2srepro Transcoder, got {type(tc).__name__}; "
                "load them with c2srepro.transcoder.load_transcoders(directory)"
            )
        layer = tc.cfg.layer
        if key is not None and key != layer:
            raise ValueError(f"{where} was configured for layer {layer}; give each transcoder under its own layer")
        if layer in by_layer:
            raise ValueError(f"two transcoders say they are for layer {layer}; pass one per layer")
        by_layer[layer] = tc
    if not by_layer:
        raise ValueError("no transcoders given: pass one Transcoder per layer to use")
    given = [tc.cfg.layer for _, key, tc in items if key is None]  # a sequence's layers, as listed
    for i, (layer, in_order) in enumerate(zip(given, sorted(given))):
        if layer != in_order:
            raise ValueError(
                f"transcoders[{i}] was configured for layer {layer}; pass one transcoder per layer, in layer order"
            )
    return dict(sorted(by_layer.items()))


def check_transcoders_fit(
    model: nn.Module | HookedModel,
    transcoders: Mapping[int, Transcoder] | Sequence[Transcoder],
    *,
    layers: Sequence[int] | None = None,
    every_layer: bool = False,
) -> dict[int, Transcoder]:
    """{layer: Transcoder} for ``layers`` (default: every layer given), after the checks of the
    module docstring; ValueError (TypeError for wrong types) naming what does not fit and how to fix it."""
    hooked = as_hooked(model)
    by_layer = _by_layer(transcoders)
    n_layers, d_model = hooked.n_layers, hooked.d_model
    outside = [layer for layer in by_layer if layer >= n_layers]
    if outside:
        raise ValueError(
            f"transcoders for layers {outside} do not fit: the model has layers 0..{n_layers - 1}"
        )
    if every_layer and not isinstance(transcoders, Mapping) and len(by_layer) != n_layers:
        raise ValueError(
            f"got {len(by_layer)} transcoders for a model with {n_layers} layers; pass one per MLP layer"
        )
    if every_layer:
        wanted = tuple(range(n_layers))
    else:
        wanted = hooked.check_layers(sorted(by_layer) if layers is None else layers)
    missing = [layer for layer in wanted if layer not in by_layer]
    if missing:
        raise ValueError(
            f"no transcoder for layers {missing}: pass one for each of layers {list(wanted)}"
            + (" (attribution replaces every MLP)" if every_layer else ", or choose layers")
        )
    chosen = {layer: by_layer[layer] for layer in wanted}
    _check_architecture(hooked, chosen)
    wrong = {layer: tc.cfg.d_model for layer, tc in chosen.items() if tc.cfg.d_model != d_model}
    if wrong:
        raise ValueError(
            f"the transcoders of layers {sorted(wrong)} do not have the model's d_model {d_model} "
            f"(they have {sorted(set(wrong.values()))}): they were trained on another model"
        )
    for layer, tc in chosen.items():
        d_tc = tc.cfg.d_tc
        expected = {"W_enc": (d_model, d_tc), "b_enc": (d_tc,), "W_dec": (d_tc, d_model), "b_dec": (d_model,)}
        for name, shape in expected.items():
            actual = tuple(getattr(tc, name).shape)
            if actual != shape:
                raise ValueError(
                    f"the layer-{layer} transcoder's {name} is {list(actual)} but its config (width d_tc "
                    f"{d_tc}, d_model {d_model}) needs {list(shape)}: its weights and config do not belong together"
                )
        recorded, expected_point = tc.cfg.hook_point_in, TRANSCODER_HOOK_POINT.format(layer=layer)
        if recorded is not None and recorded != expected_point:
            raise ValueError(
                f"the layer-{layer} transcoder was trained at hook point {recorded!r}, but c2srepro applies "
                f"it at {expected_point!r} (the MLP's input; its output replaces the MLP's): "
                "retrain it on activations harvested by this version"
            )
    return chosen


def _architecture(model_type: str) -> str:
    adapter = ADAPTERS.get(model_type)
    return f"{model_type!r} ({adapter.architecture})" if adapter is not None else repr(model_type)


def _check_architecture(hooked: HookedModel, chosen: Mapping[int, Transcoder]) -> None:
    """Step 3 of the module docstring."""
    model_type = hooked.adapter.model_type
    other = {layer: tc.cfg.model_type for layer, tc in chosen.items() if tc.cfg.model_type not in (None, model_type)}
    if other:
        trained_on = ", ".join(_architecture(name) for name in sorted(set(other.values())))
        raise ValueError(
            f"the transcoders of layers {sorted(other)} were trained on a {trained_on} model, but this model is "
            f"{_architecture(model_type)}: a transcoder reads and writes one architecture's MLP activations; "
            "train transcoders on this model (harvest_activations, then train_transcoders)"
        )
