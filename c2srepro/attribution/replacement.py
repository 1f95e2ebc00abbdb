"""The replacement model: a C2S model, one transcoder per MLP layer and the tokenizer, with the
verbs of attribution as its methods (circuit-tracer's ``ReplacementModel``, for cell sentences).

1. Construction checks once that the transcoders fit the model (one per layer, its width and
   hook point) and keeps the hooked model.
2. :meth:`ReplacementModel.linearise` builds the linearised replacement of one prompt
   (:func:`c2srepro.attribution.linearised.build_replacement`).
3. :meth:`ReplacementModel.attribute` takes a cell (its prompt is built without the answer) or
   token ids and one or more targets (:mod:`c2srepro.attribution.targets`). A label target reads
   the answer teacher-forced, so the prompt is extended by that answer less its last token (all
   label targets of one graph must follow the same answer); positions of the graph then include
   the answer prefix. It returns the attribution graph
   (:func:`c2srepro.attribution.full_graph.build_graph`) with each token's string and gene.
4. :meth:`ReplacementModel.answer_target` names the targets a question about the model's answer
   asks, by kind (:data:`TARGET_KINDS`): the label among the candidates (the default question:
   which cell type), the label's whole answer, the answer's first token (demeaned logit), or the
   paper's target, the last layer's most active feature on the final prompt token.
5. :meth:`ReplacementModel.score_labels` is the model's own label scoring
   (:func:`c2srepro.models.predict.score_labels`); :meth:`ReplacementModel.intervene` runs feature
   and node interventions on the real model or the frozen replacement
   (:class:`c2srepro.attribution.intervene.SplicedModel`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from c2srepro.attribution.full_graph import Graph, build_graph
from c2srepro.attribution.intervene import Intervention, InterventionResult, SplicedModel
from c2srepro.attribution.linearised import LinearisedReplacement, build_replacement
from c2srepro.attribution.nodes import Node
from c2srepro.attribution.targets import (
    ContrastTarget, FeatureTarget, LabelTarget, LogitTarget, Target, teacher_forced,
)
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import answer_text, encode_prompts
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.models.hooked import as_hooked
from c2srepro.models.load import load_c2s_model
from c2srepro.models.predict import score_labels
from c2srepro.transcoder.fit import check_transcoders_fit
from c2srepro.transcoder.model import Transcoder, load_transcoders

CellOrPrompt = CellSentence | Sequence[int] | torch.Tensor
# The questions about an answer that :meth:`ReplacementModel.answer_target` names, the default first.
TARGET_KINDS = ("label_vs_candidates", "label", "first_token", "feature")


class NoFeatureFires(ValueError):
    """The feature target needs a last-layer feature firing on the final prompt token, and none does."""


class ReplacementModel:
    """A C2S model with its transcoders and tokenizer (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        transcoders: Mapping[int, Transcoder] | Sequence[Transcoder],
        tokenizer: CellTokenizer,
    ):
        self.model = model
        self.hooked = as_hooked(model)
        self.transcoders = check_transcoders_fit(self.hooked, transcoders, every_layer=True)
        self.tokenizer = tokenizer

    @classmethod
    def load(
        cls, model: str | os.PathLike, transcoders: str | os.PathLike, *, device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
    ) -> "ReplacementModel":
        """From a model directory or hub id and a directory of saved transcoders (``layer_XX``)."""
        loaded, tokenizer = load_c2s_model(model, device=device, dtype=dtype)
        return cls(loaded, load_transcoders(transcoders, device=device), tokenizer)

    def prompt(self, cell_or_prompt: CellOrPrompt) -> tuple[list[int], list[str | None]]:
        """A cell's prompt without its answer, or the given token ids; and each token's gene."""
        if isinstance(cell_or_prompt, CellSentence):
            encoded = encode_prompts([cell_or_prompt], self.tokenizer)
            return list(encoded.input_ids[0]), list(encoded.gene_of_token[0])
        ids = [int(i) for i in torch.as_tensor(cell_or_prompt).reshape(-1)]
        return ids, [None] * len(ids)

    def answer_ids(self, label: str) -> list[int]:
        """The tokens of a label's answer `` {label}.``, as label scoring reads them."""
        return list(self.tokenizer.encode(answer_text(label))[0])

    def linearise(self, cell_or_prompt: CellOrPrompt) -> LinearisedReplacement:
        """The linearised replacement of one prompt (module docstring, step 2)."""
        return build_replacement(self.hooked, self.transcoders, self.prompt(cell_or_prompt)[0])

    def answer_target(
        self,
        kind: str,
        cell_or_prompt: CellOrPrompt,
        label: str,
        *,
        candidates: Sequence[str] | None = None,
        feature: int | None = None,
    ) -> Target:
        """The target of kind ``kind`` (:data:`TARGET_KINDS`) for the answer ``label`` on one cell or prompt.

        ``label_vs_candidates``: ``LabelTarget(label, candidates=candidates)``; ``label``:
        ``LabelTarget(label)``; ``first_token``: the demeaned logit of the answer's first token at the
        final prompt token; ``feature``: the last layer's feature ``feature`` at the final prompt
        token, by default the most active one there (the paper's target)."""
        if kind not in TARGET_KINDS:
            raise ValueError(f"target kind must be one of {TARGET_KINDS}, got {kind!r}")
        if kind == "label_vs_candidates":
            if candidates is None:
                raise ValueError("the label_vs_candidates target needs candidates= (the labels the answer is among)")
            return LabelTarget(label, candidates=tuple(candidates))
        if kind == "label":
            return LabelTarget(label)
        if kind == "first_token":
            return LogitTarget(self.answer_ids(label)[0])
        last_layer = self.hooked.n_layers - 1
        if feature is None:
            rep = self.linearise(cell_or_prompt)
            top = rep.top_features(last_layer, rep.n_pos - 1, n=1)
            if not top:
                raise NoFeatureFires(
                    f"no transcoder feature of layer {last_layer} fires on the final prompt token, so there is no "
                    "feature target: ask about the label instead (kind='label_vs_candidates')"
                )
            feature = top[0][0]
        return FeatureTarget(last_layer, None, int(feature))

    def attribute(
        self,
        cell_or_prompt: CellOrPrompt,
        target: Target | Node | Sequence[Target | Node],
        **graph_options,
    ) -> Graph:
        """The attribution graph of ``target`` on one cell or prompt (module docstring, step 3).

        graph_options: ``target_weights``, ``max_feature_nodes``, ``batch_size``, ``update_interval``,
        as :func:`c2srepro.attribution.full_graph.build_graph` takes them (the prompt's tokens, genes and
        answers come from here).
        """
        given_here = sorted({"tokens", "genes", "prompt_length", "answers"} & set(graph_options))
        if given_here:
            raise TypeError(f"attribute() reads {given_here} from the cell or prompt; leave them out")
        targets = [target] if isinstance(target, (Target, Node)) else list(target)
        prompt, genes = self.prompt(cell_or_prompt)
        labels = list(dict.fromkeys(label for t in targets if isinstance(t, Target) for label in t.labels))
        answers = {label: self.answer_ids(label) for label in labels}
        forced = {t.label if isinstance(t, LabelTarget) else t.label_a
                  for t in targets if isinstance(t, (LabelTarget, ContrastTarget))}
        if len(forced) > 1:
            raise ValueError(
                f"the label targets follow different answers {sorted(forced)}, and one graph reads one "
                "teacher-forced answer: build one graph per answer, or compare them with ContrastTarget"
            )
        ids = teacher_forced(prompt, answers[forced.pop()]) if forced else prompt
        genes = genes + [None] * (len(ids) - len(prompt))
        rep = build_replacement(self.hooked, self.transcoders, ids)
        graph = build_graph(
            rep, targets, tokens=self.tokenizer.tokens(ids), genes=genes, prompt_length=len(prompt), answers=answers,
            **graph_options,
        )
        graph.info["prompt_length"] = len(prompt)
        return graph

    def score_labels(self, cells: Sequence[CellSentence], labels: Sequence[str]) -> np.ndarray:
        """Each cell's log-likelihood of each label's answer, [cell, label] (the model's own scoring)."""
        return score_labels(self.model, self.tokenizer, cells, labels)

    def intervene(
        self,
        cell_or_prompt: CellOrPrompt,
        interventions: Intervention | Iterable[Intervention],
        *,
        labels: Sequence[str],
        freeze_attention: bool = False,
        label: str | None = None,
    ) -> InterventionResult:
        """Score ``labels`` on one cell or prompt with the interventions applied, on the real model
        (``freeze_attention=False``) or the frozen replacement; ``label``: the one to follow."""
        spliced = SplicedModel(self.hooked, self.transcoders, self.tokenizer, self.prompt(cell_or_prompt)[0], labels)
        return spliced.run(interventions, freeze_attention=freeze_attention, label=label)
