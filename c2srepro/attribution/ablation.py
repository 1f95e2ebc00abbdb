"""Faithfulness of a graph's features: switch them off and compare the label's drop with random sets.

1. The features: any transcoder feature nodes at prompt positions, usually a graph's
   (:meth:`~c2srepro.attribution.full_graph.Graph.top_features`, or every feature of a pruned graph).
   The pool they are compared with: every feature active on the prompt (all of them lie upstream
   of the answer). Each feature must be in the pool.
2. Switch the features off (activations set to zero) with one intervention of
   :meth:`c2srepro.attribution.replacement.ReplacementModel.intervene`, on the real model with
   attention and layer norms recomputed (``freeze_attention=False``) or on the frozen replacement
   (``freeze_attention=True``), and score the candidate labels: the followed label's probability
   among them before and after, and whether the greedy answer flips.
3. Do the same for ``n_random`` random sets of as many features drawn uniformly from the pool
   (``seed`` fixes them), and report the drop beside the random drops with the empirical p-value
   (1 + #{random drop >= drop}) / (1 + n_random).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from c2srepro.attribution.intervene import InterventionResult, SplicedModel, zero_nodes
from c2srepro.attribution.linearised import LinearisedReplacement
from c2srepro.attribution.nodes import Node

if TYPE_CHECKING:
    from c2srepro.attribution.replacement import CellOrPrompt, ReplacementModel

logger = logging.getLogger(__name__)


def empirical_p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #{null >= observed}) / (1 + len(null)): how often a random draw does at least as well,
    counting the observed one (never 0)."""
    null = np.asarray(null)
    return (1 + int((null >= observed).sum())) / (1 + len(null))


def feature_pool(rep: LinearisedReplacement) -> list[Node]:
    """Every feature active on the replacement's prompt, by layer, then position."""
    pool = []
    for layer, act in enumerate(rep.active):
        pool.extend(Node("feature", layer, p, f) for p, f in zip(act.position.tolist(), act.feature.tolist()))
    return pool


@dataclass(frozen=True)
class AblationResult:
    """Features switched off, against random sets of as many active features (module docstring)."""

    label: str
    features: tuple[Node, ...]
    off: InterventionResult
    random: tuple[InterventionResult, ...]
    random_features: tuple[tuple[Node, ...], ...]
    pool_size: int
    seed: int

    @property
    def drop(self) -> float:
        """The label's probability, clean minus with the features off."""
        return -self.off.label_probability_change

    @property
    def random_drops(self) -> np.ndarray:
        return np.array([-r.label_probability_change for r in self.random])

    @property
    def p_value(self) -> float:
        return empirical_p_value(self.drop, self.random_drops)

    @property
    def random_flip_rate(self) -> float:
        return float(np.mean([r.flipped for r in self.random]))

    def table(self) -> pd.DataFrame:
        """One row per run: the clean prompt, the features off, each random set off."""
        rows = [("clean", 0, self.off.label_probability_clean, 0.0, self.off.clean_answer, False),
                (f"{len(self.features)} features off", len(self.features), self.off.label_probability, self.drop,
                 self.off.intervened_answer, self.off.flipped)]
        rows += [(f"random set {i + 1} off", len(f), r.label_probability, -r.label_probability_change,
                  r.intervened_answer, r.flipped) for i, (r, f) in enumerate(zip(self.random, self.random_features))]
        return pd.DataFrame(rows, columns=["run", "features_off", "label_probability", "drop", "answer", "flipped"])

    def summary(self) -> dict:
        """JSON-ready: label, mode, the features, the label's probability clean / off / random, p-value."""
        drops = self.random_drops
        return {
            "label": self.label,
            "mode": self.off.mode,
            "n_features": len(self.features),
            "features": [f.id for f in self.features],
            "pool_size": self.pool_size,
            "label_probability_clean": self.off.label_probability_clean,
            "label_probability_off": self.off.label_probability,
            "drop": self.drop,
            "answer_clean": self.off.clean_answer,
            "answer_off": self.off.intervened_answer,
            "flipped": self.off.flipped,
            "n_random": len(self.random),
            "random_drops": drops.tolist(),
            "random_drop_mean": float(drops.mean()),
            "random_drop_std": float(drops.std(ddof=1)) if len(drops) > 1 else 0.0,
            "random_flip_rate": self.random_flip_rate,
            "p_value": self.p_value,
            "seed": self.seed,
        }


def ablate(
    replacement: "ReplacementModel",
    cell_or_prompt: "CellOrPrompt",
    features: Sequence[Node],
    *,
    labels: Sequence[str],
    label: str | None = None,
    n_random: int = 20,
    seed: int = 0,
    freeze_attention: bool = False,
) -> AblationResult:
    """Switch ``features`` off on one cell or prompt and score ``labels``, against ``n_random``
    random sets of as many active features (module docstring). ``label``: the one to follow
    (default: the clean answer)."""
    features = tuple(dict.fromkeys(features))
    if not features:
        raise ValueError("no features to switch off: pass at least one feature node (e.g. graph.top_features(10))")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    prompt_ids = replacement.prompt(cell_or_prompt)[0]
    pool = feature_pool(replacement.linearise(prompt_ids))
    stray = [f.id for f in features if f not in set(pool)]
    if stray:
        raise ValueError(f"features {stray[:5]} are not active on this prompt (a graph built on another prompt, or "
                         "a position of the answer): switch off features of this prompt's graph")
    spliced = SplicedModel(replacement.hooked, replacement.transcoders, replacement.tokenizer, prompt_ids, labels)
    off = spliced.run(zero_nodes(features), freeze_attention=freeze_attention, label=label)
    generator = torch.Generator().manual_seed(seed)
    random_sets, random_runs = [], []
    for _ in tqdm(range(n_random), desc="random feature sets off", leave=False, disable=n_random < 5):
        chosen = tuple(pool[i] for i in torch.randperm(len(pool), generator=generator)[: len(features)].tolist())
        random_sets.append(chosen)
        random_runs.append(spliced.run(zero_nodes(chosen), freeze_attention=freeze_attention, label=off.label))
    result = AblationResult(label=off.label, features=features, off=off, random=tuple(random_runs),
                            random_features=tuple(random_sets), pool_size=len(pool), seed=seed)
    logger.info("%d features off (%s): drop %.4g vs random %.4g", len(features), off.mode, result.drop,
                float(result.random_drops.mean()))
    return result
