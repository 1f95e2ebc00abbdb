"""Interventions on transcoder features: edit features on the prompt, rerun the model, read the answer.

1. Describe. An :class:`Intervention` names one layer, a set of transcoder features, the prompt
   positions it acts on (a list, or every position) and what it does to each activation z:
   ``set`` z := v, ``scale`` z := s z, ``zero`` z := 0, ``clamp`` z := min(max(z, low), high) (a bound
   on either side or both; to hold a feature at a fixed value, circuit-tracer's "clamping", use
   ``set``). Each (layer, position, feature) entry becomes z -> clamp(a z + b, low, high): set
   (a, b) = (0, v), scale (s, 0), zero (0, 0), clamp (1, 0). Against the model, the layer must
   exist, each position lie in the prompt (the answer's tokens are scored, not edited), each
   feature below the transcoder's width, and each entry be named by one intervention only.
2. Score. The scored sequences are the prompt followed by each candidate's answer `` {label}.``;
   an answer's log-likelihood is that of :func:`c2srepro.models.predict.score_labels` (one pass
   over the prompt, one over every answer from its key/value cache). Probabilities are the
   softmax of the log-likelihoods over the candidates: the model's probability of each answer,
   given that it answers with one of them. The greedy answer is the most likely candidate (what
   :func:`c2srepro.models.predict.predict_labels` predicts).
3. Clean run. Both passes of step 2 run once as they are, recording every layer's MLP input
   x_clean and output y_clean.
4. Recomputed (``freeze_attention=False``): both passes run again on the real Hugging Face model
   with every MLP output replaced by y_clean + (z' - z_clean) W_dec, where
   z_clean = ReLU(x_clean W_enc + b_enc) and z' = edit(ReLU(x W_enc + b_enc)) on the MLP's
   current input x (edits act in the prompt pass, where their positions are). That is the
   transcoder's output z' W_dec + b_dec plus the clean run's error term
   e = y_clean - (z_clean W_dec + b_dec), written so that unchanged features give y_clean bit
   for bit: with nothing edited the model's own output comes back exactly. Attention and layer
   norms are the model's, recomputed from the changed residual stream, and every downstream
   transcoder recomputes its features from it. A layer with no edit whose input is bit for bit
   the clean one writes y_clean without running its transcoder.
5. Frozen (``freeze_attention=True``): per candidate, the linearised replacement of prompt +
   answer (:func:`c2srepro.attribution.linearised.build_replacement`: that sequence's clean
   attention patterns and layer-norm scales frozen, errors fixed) runs with the edits
   (:func:`~c2srepro.attribution.linearised.replacement_forward`, features recomputed from the
   changed residual). Its logits are reported as the model's clean logits plus the change the
   edits make, logits_clean + (F(edits) - F(none)), so that the two implementations' rounding
   cancels and nothing edited again gives the model's output exactly.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from c2srepro.attribution.linearised import build_replacement, replacement_forward, transcoder_weights
from c2srepro.attribution.nodes import Node
from c2srepro.data.prompts import require_prompt_ids
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.models.hooked import HookedModel, HookPoint, as_hooked, hook_name
from c2srepro.models.predict import answer_log_likelihoods, answer_tokens, label_log_likelihoods, label_probabilities
from c2srepro.transcoder.fit import check_transcoders_fit
from c2srepro.transcoder.model import Transcoder

OPS = ("set", "scale", "zero", "clamp")
ALL_POSITIONS = "all"
Positions = int | Sequence[int] | Literal["all"]


def _indices(values: int | Sequence[int], what: str) -> tuple[int, ...]:
    """``values`` as a tuple of ints without repeats (order kept); a clear error for non-integers."""
    items = [values] if isinstance(values, (int, np.integer)) or (
        isinstance(values, Tensor) and values.dim() == 0) else list(values)
    try:
        if any(isinstance(v, bool) for v in items):
            raise TypeError
        indices = tuple(dict.fromkeys(operator.index(v) for v in items))
    except TypeError:
        raise TypeError(f"{what} must be integer indices, got {items!r}") from None
    if not indices:
        raise ValueError(f"{what} is empty: name at least one index")
    return indices


def _shown(indices: tuple[int, ...], most: int = 8) -> str:
    """A list of indices for a message, cut after ``most``."""
    if len(indices) <= most:
        return str(list(indices))
    return f"[{', '.join(map(str, indices[:most]))}, ... ({len(indices)} in all)]"


def _finite(value: float, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {number}")
    return number


@dataclass(frozen=True)
class Intervention:
    """One edit of transcoder features (module docstring, step 1); make it with :func:`set_features`,
    :func:`scale_features`, :func:`zero_features` or :func:`clamp_features`."""

    op: str
    layer: int
    features: tuple[int, ...]
    positions: tuple[int, ...] | None  # None: every prompt position
    value: float = 0.0  # set
    factor: float = 1.0  # scale
    low: float | None = None  # clamp
    high: float | None = None  # clamp

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"intervention op must be one of {OPS}, got {self.op!r}")
        object.__setattr__(self, "layer", operator.index(self.layer))
        object.__setattr__(self, "features", _indices(self.features, "features"))
        if self.positions is not None:
            object.__setattr__(self, "positions", _indices(self.positions, "positions"))
        object.__setattr__(self, "value", _finite(self.value, "the value to set"))
        object.__setattr__(self, "factor", _finite(self.factor, "the scale factor"))
        for name in ("low", "high"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _finite(getattr(self, name), f"clamp's {name} bound"))
        if self.op == "clamp":
            if self.low is None and self.high is None:
                raise ValueError(
                    "clamp_features needs low=, high= or both (to hold a feature at a value, use set_features)"
                )
            if self.low is not None and self.high is not None and self.low > self.high:
                raise ValueError(f"clamp's low bound {self.low} is above its high bound {self.high}: swap them")

    def __str__(self) -> str:
        what = {"set": f"set to {self.value:g}", "scale": f"scaled by {self.factor:g}", "zero": "zeroed",
                "clamp": f"clamped to [{'-inf' if self.low is None else f'{self.low:g}'}, "
                         f"{'inf' if self.high is None else f'{self.high:g}'}]"}[self.op]
        where = "every position" if self.positions is None else f"positions {_shown(self.positions)}"
        return f"layer {self.layer} features {_shown(self.features)} at {where} {what}"

    def coefficients(self) -> tuple[float, float, float, float]:
        """(a, b, low, high) of the map z -> clamp(a z + b, low, high) (module docstring, step 1)."""
        a, b = {"set": (0.0, self.value), "scale": (self.factor, 0.0), "zero": (0.0, 0.0), "clamp": (1.0, 0.0)}[self.op]
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        return a, b, low, high


def _positions(positions: Positions) -> tuple[int, ...] | None:
    if isinstance(positions, str):
        if positions != ALL_POSITIONS:
            raise ValueError(
                f"positions must be a position, a list of positions or {ALL_POSITIONS!r}, got {positions!r}"
            )
        return None
    return positions  # checked by Intervention


def set_features(layer: int, features: int | Sequence[int], *, value: float, positions: Positions = ALL_POSITIONS
                 ) -> Intervention:
    """Set the features' activations to ``value`` at ``positions`` (default: every prompt position)."""
    return Intervention("set", layer, features, _positions(positions), value=value)


def scale_features(layer: int, features: int | Sequence[int], *, factor: float, positions: Positions = ALL_POSITIONS
                   ) -> Intervention:
    """Multiply the features' activations by ``factor`` at ``positions``."""
    return Intervention("scale", layer, features, _positions(positions), factor=factor)


def zero_features(layer: int, features: int | Sequence[int], *, positions: Positions = ALL_POSITIONS) -> Intervention:
    """Switch the features off (activation 0) at ``positions``."""
    return Intervention("zero", layer, features, _positions(positions))


def clamp_features(layer: int, features: int | Sequence[int], *, low: float | None = None, high: float | None = None,
                   positions: Positions = ALL_POSITIONS) -> Intervention:
    """Bound the features' activations to [low, high] at ``positions`` (either bound may be left open)."""
    return Intervention("clamp", layer, features, _positions(positions), low=low, high=high)


def zero_nodes(nodes: Iterable[Node]) -> list[Intervention]:
    """Switch off the given feature nodes: one :func:`zero_features` per (layer, position)."""
    grouped: dict[tuple[int, int], list[int]] = {}
    for node in nodes:
        if node.kind != "feature":
            raise ValueError(f"only feature nodes can be switched off, got a {node.kind} node ({node.id})")
        grouped.setdefault((node.layer, node.position), []).append(node.index)
    return [zero_features(layer, features, positions=[position]) for (layer, position), features in grouped.items()]


@dataclass(frozen=True)
class _LayerEdit:
    """The entries one layer edits and the coefficients of each (module docstring, step 1)."""

    position: Int[Tensor, "entry"]
    feature: Int[Tensor, "entry"]
    coefficients: Float[Tensor, "4 entry"]  # a, b, low, high

    def apply(self, z: Float[Tensor, "*batch pos d_tc"]) -> Float[Tensor, "*batch pos d_tc"]:
        a, b, low, high = self.coefficients.to(z)
        position, feature = self.position.to(z.device), self.feature.to(z.device)
        edited = z.clone()
        edited[..., position, feature] = torch.clamp(z[..., position, feature] * a + b, min=low, max=high)
        return edited


@dataclass(frozen=True)
class FeatureEdits:
    """Interventions checked against a model and prompt, per layer (module docstring, step 1)."""

    layers: dict[int, _LayerEdit]

    @property
    def n_entries(self) -> int:
        return sum(len(edit.position) for edit in self.layers.values())

    def __call__(self, layer: int, z: Float[Tensor, "*batch pos d_tc"]) -> Float[Tensor, "*batch pos d_tc"]:
        edit = self.layers.get(layer)
        return z if edit is None else edit.apply(z)


def check_interventions(
    interventions: Intervention | Iterable[Intervention], *, n_layers: int, n_pos: int, d_tc: Sequence[int]
) -> FeatureEdits:
    """Interventions checked against a model of ``n_layers`` layers with transcoders of widths ``d_tc``
    and a prompt of ``n_pos`` tokens; ValueError naming the problem and the fix."""
    items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    by_layer: dict[int, list[Intervention]] = {}
    for item in items:
        if not isinstance(item, Intervention):
            raise TypeError(
                f"expected Intervention objects (from set_features, scale_features, zero_features or "
                f"clamp_features), got {type(item).__name__}"
            )
        if not 0 <= item.layer < n_layers:
            raise ValueError(f"{item}: layer {item.layer} does not exist: the model has layers 0..{n_layers - 1}")
        width = d_tc[item.layer]
        bad_features = [f for f in item.features if not 0 <= f < width]
        if bad_features:
            raise ValueError(
                f"{item}: feature {bad_features[0]} is out of range: layer {item.layer}'s transcoder has "
                f"{width} features (0..{width - 1})"
            )
        bad_positions = [p for p in item.positions or () if not 0 <= p < n_pos]
        if bad_positions:
            p = bad_positions[0]
            where = "is past the prompt" if p >= n_pos else "is not a position"
            raise ValueError(
                f"{item}: position {p} {where} ({n_pos} tokens, positions 0..{n_pos - 1}): interventions act "
                "on the prompt's tokens; the answer's tokens are scored, not edited"
            )
        by_layer.setdefault(item.layer, []).append(item)
    layers = {}
    for layer, named in sorted(by_layer.items()):
        positions, features, coefficients, owner = [], [], [], []
        for k, item in enumerate(named):
            grid_pos, grid_feat = torch.meshgrid(
                torch.arange(n_pos) if item.positions is None else torch.tensor(item.positions),
                torch.tensor(item.features), indexing="ij",
            )
            positions.append(grid_pos.flatten())
            features.append(grid_feat.flatten())
            coefficient = torch.tensor(item.coefficients(), dtype=torch.float64)
            coefficients.append(coefficient[:, None].expand(4, grid_pos.numel()))
            owner.append(torch.full((grid_pos.numel(),), k))
        position, feature, owner_of = torch.cat(positions), torch.cat(features), torch.cat(owner)
        keys = position * d_tc[layer] + feature
        order = keys.argsort(stable=True)
        repeated = (keys[order][1:] == keys[order][:-1]).nonzero().flatten()
        if len(repeated):
            first, second = order[repeated[0]], order[repeated[0] + 1]
            raise ValueError(
                f"feature {int(feature[first])} at layer {layer}, position {int(position[first])} is named by two "
                f"interventions ({named[int(owner_of[first])]}; {named[int(owner_of[second])]}): give each "
                "(layer, position, feature) one intervention"
            )
        layers[layer] = _LayerEdit(position, feature, torch.cat(coefficients, dim=1).contiguous())
    return FeatureEdits(layers)


@dataclass(frozen=True)
class InterventionResult:
    """The answer before and after an intervention (module docstring, step 2).

    Log-likelihoods are summed over each candidate's answer tokens; probabilities are their
    softmax over the candidates. ``label`` is the label whose probability is followed (default:
    the clean answer)."""

    candidates: tuple[str, ...]
    label: str
    mode: str  # "recomputed" or "frozen"
    n_edited: int  # (layer, position, feature) entries edited
    clean_log_likelihood: np.ndarray  # [candidate]
    intervened_log_likelihood: np.ndarray  # [candidate]

    @property
    def clean_probabilities(self) -> np.ndarray:
        return label_probabilities(self.clean_log_likelihood)

    @property
    def intervened_probabilities(self) -> np.ndarray:
        return label_probabilities(self.intervened_log_likelihood)

    @property
    def clean_answer(self) -> str:
        return self.candidates[int(np.argmax(self.clean_log_likelihood))]

    @property
    def intervened_answer(self) -> str:
        return self.candidates[int(np.argmax(self.intervened_log_likelihood))]

    @property
    def flipped(self) -> bool:
        """Whether the greedy answer changed."""
        return self.intervened_answer != self.clean_answer

    @property
    def label_probability_clean(self) -> float:
        return float(self.clean_probabilities[self.candidates.index(self.label)])

    @property
    def label_probability(self) -> float:
        """The label's probability after the intervention."""
        return float(self.intervened_probabilities[self.candidates.index(self.label)])

    @property
    def label_probability_change(self) -> float:
        return self.label_probability - self.label_probability_clean

    def table(self) -> pd.DataFrame:
        """One row per candidate: log-likelihood and probability, clean and intervened, most likely first."""
        frame = pd.DataFrame({
            "candidate": list(self.candidates),
            "clean_log_likelihood": self.clean_log_likelihood,
            "intervened_log_likelihood": self.intervened_log_likelihood,
            "clean_probability": self.clean_probabilities,
            "intervened_probability": self.intervened_probabilities,
        })
        frame["change"] = frame["intervened_probability"] - frame["clean_probability"]
        return frame.sort_values("clean_probability", ascending=False, kind="stable").reset_index(drop=True)

    def summary(self) -> dict:
        """JSON-ready: label, mode, n_edited, both answers, flipped, the label's probabilities."""
        return {
            "label": self.label, "mode": self.mode, "n_edited": self.n_edited,
            "clean_answer": self.clean_answer, "intervened_answer": self.intervened_answer, "flipped": self.flipped,
            "label_probability_clean": self.label_probability_clean, "label_probability": self.label_probability,
            "label_probability_change": self.label_probability_change,
        }


@dataclass(frozen=True)
class _Pass:
    """One layer's MLP input and output in one forward pass of the clean run."""

    mlp_in: Tensor
    mlp_out: Tensor


class SplicedModel:
    """The model with its transcoders spliced in, on one prompt and its candidate answers.

    Built once per prompt (the clean run, step 3 of the module docstring), then :meth:`run` any
    number of interventions. ``prompt_ids``: the prompt without its answer ([pos] or [1, pos]), as
    ``encode_prompts([cell], tokenizer).input_ids[0]`` gives it. Frozen runs keep one linearised
    replacement per candidate (each holds its attention patterns, layers x heads x pos^2).
    """

    def __init__(
        self,
        model: nn.Module | HookedModel,
        transcoders: Mapping[int, Transcoder] | Sequence[Transcoder],
        tokenizer: CellTokenizer,
        prompt_ids: Int[Tensor, "pos"] | Sequence[int],
        candidates: Sequence[str],
    ):
        require_prompt_ids(prompt_ids, where="SplicedModel")
        self.hooked = as_hooked(model)
        self._transcoders = check_transcoders_fit(self.hooked, transcoders, every_layer=True)
        self.prompt = self.hooked.check_prompt(prompt_ids)
        self.candidates = tuple(candidates)
        repeated = sorted({c for c in self.candidates if self.candidates.count(c) > 1})
        if repeated:
            raise ValueError(f"candidates {repeated} are given more than once: give each label once")
        self.answer_ids, self.answer_mask = answer_tokens(tokenizer, self.candidates, device=self.hooked.device)
        longest = self.n_pos + self.answer_ids.shape[1]
        if longest > self.hooked.adapter.max_positions:
            raise ValueError(
                f"the prompt ({self.n_pos} tokens) with its longest answer has {longest} tokens but the model's "
                f"context is {self.hooked.adapter.max_positions}; shorten the prompt (e.g. fewer genes)"
            )
        self._weights = {layer: transcoder_weights(tc, device=self.hooked.device) for layer, tc in self._transcoders.items()}
        self._clean_passes: list[list[_Pass]] | None = None  # [layer][pass]
        self._clean_recomputed: np.ndarray | None = None
        self._frozen: list[tuple] | None = None  # per candidate: replacement, clean rows, replacement rows

    @property
    def n_layers(self) -> int:
        return self.hooked.n_layers

    @property
    def n_pos(self) -> int:
        return self.prompt.shape[0]

    @property
    def d_tc(self) -> list[int]:
        return [self._weights[layer].d_tc for layer in range(self.n_layers)]

    def check(self, interventions: Intervention | Iterable[Intervention]) -> FeatureEdits:
        """The interventions checked against this model and prompt (module docstring, step 1)."""
        return check_interventions(interventions, n_layers=self.n_layers, n_pos=self.n_pos, d_tc=self.d_tc)

    def run(
        self,
        interventions: Intervention | Iterable[Intervention] = (),
        *,
        freeze_attention: bool = False,
        label: str | None = None,
    ) -> InterventionResult:
        """Score the candidates with the interventions applied (steps 4-5 of the module docstring).

        freeze_attention: keep the clean run's attention patterns and layer-norm scales (the linearised
            replacement); False reruns the real model, recomputing both.
        label: the candidate whose probability the result follows (default: the clean answer).
        """
        edits = self.check(interventions)
        if label is not None and label not in self.candidates:
            raise ValueError(f"label {label!r} is not among the candidates {list(self.candidates)}: add it to them")
        clean, intervened = self._frozen_scores(edits) if freeze_attention else self._recomputed_scores(edits)
        clean, intervened = (t.detach().cpu().to(torch.float64).numpy() for t in (clean, intervened))
        return InterventionResult(
            candidates=self.candidates,
            label=label if label is not None else self.candidates[int(np.argmax(clean))],
            mode="frozen" if freeze_attention else "recomputed",
            n_edited=edits.n_entries,
            clean_log_likelihood=clean,
            intervened_log_likelihood=intervened,
        )

    # ------------------------------------------------------------------ recomputed (steps 3-4)

    def _score(self) -> Float[Tensor, "candidate"]:
        return label_log_likelihoods(self.hooked.model, self.prompt, self.answer_ids, self.answer_mask)

    def _recomputed_scores(self, edits: FeatureEdits) -> tuple[Tensor, Tensor]:
        if self._clean_passes is None:
            passes: list[list[_Pass]] = [[] for _ in range(self.n_layers)]
            inputs: dict[int, Tensor] = {}

            def keep_input(value: Tensor, point: HookPoint) -> None:
                inputs[point.layer] = value.detach()

            def keep_pass(value: Tensor, point: HookPoint) -> None:
                passes[point.layer].append(_Pass(inputs.pop(point.layer), value.detach()))

            hooks = []
            for layer in range(self.n_layers):
                hooks += [(hook_name(layer, "hook_mlp_in"), keep_input), (hook_name(layer, "hook_mlp_out"), keep_pass)]
            with self.hooked.hooks(hooks):
                self._clean_recomputed = self._score()
            self._clean_passes = passes
        calls = [0] * self.n_layers

        def spliced(layer: int):
            tc = self._weights[layer]

            def mlp_out(x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
                index = calls[layer]
                calls[layer] += 1
                clean = self._clean_passes[layer][index]
                edited = index == 0 and layer in edits.layers  # edits name prompt positions: the first pass
                if not edited and torch.equal(x, clean.mlp_in):
                    return clean.mlp_out
                x_clean, x_now = clean.mlp_in.to(tc.W_enc.dtype), x.to(tc.W_enc.dtype)
                z_clean = tc.activate(x_clean @ tc.W_enc + tc.b_enc)
                z = tc.activate(x_now @ tc.W_enc + tc.b_enc)
                if edited:
                    z = edits(layer, z)
                change = (z - z_clean) @ tc.W_dec
                if tc.W_skip is not None:  # the skip path reads the changed input too
                    change = change + (x_now - x_clean) @ tc.W_skip
                return clean.mlp_out + change.to(clean.mlp_out.dtype)

            return mlp_out

        with self.hooked.replace_mlps({layer: spliced(layer) for layer in range(self.n_layers)}):
            intervened = self._score()
        return self._clean_recomputed, intervened

    # ------------------------------------------------------------------ frozen (step 5)

    def _answer_rows(self, logits: Float[Tensor, "pos vocab"], candidate: int) -> Float[Tensor, "answer vocab"]:
        """The rows of a prompt + answer sequence's logits that predict the answer's tokens, padded."""
        rows = logits.new_zeros(self.answer_ids.shape[1], logits.shape[-1])
        n_answer = int(self.answer_mask[candidate].sum())
        rows[:n_answer] = logits[self.n_pos - 1 : self.n_pos - 1 + n_answer]
        return rows

    def _frozen_scores(self, edits: FeatureEdits) -> tuple[Tensor, Tensor]:
        if self._frozen is None:
            self._frozen = []
            for candidate in range(len(self.candidates)):
                answer = self.answer_ids[candidate, : int(self.answer_mask[candidate].sum())]
                rep = build_replacement(self.hooked, self._transcoders, torch.cat([self.prompt, answer]))
                self._frozen.append((
                    rep,
                    self._answer_rows(rep.run.logits, candidate),
                    self._answer_rows(replacement_forward(rep, freeze=True).logits, candidate),
                ))
        clean_rows, intervened_rows = [], []
        for candidate, (rep, clean, unedited) in enumerate(self._frozen):
            edited = self._answer_rows(replacement_forward(rep, freeze=True, edit=edits).logits, candidate)
            clean_rows.append(clean)
            intervened_rows.append(clean + (edited - unedited))
        score = lambda rows: answer_log_likelihoods(torch.stack(rows), self.answer_ids, self.answer_mask)  # noqa: E731
        return score(clean_rows), score(intervened_rows)

