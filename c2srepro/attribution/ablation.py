"""Faithfulness of a circuit: ablate its features and compare the target's drop with random feature sets.

1. Collect the circuit's transcoder features (target excluded) and the pool of features that could
   affect the target: active on this prompt, at a layer below the target's, at a position not after it.
2. Measure the target -- a feature's activation ReLU(pre) or a logit -- with a feature set ablated
   (activations set to zero), in one of three modes:
   - ``propagate=False`` ("direct"): only the ablated features' direct contributions are removed,
     pre' = pre - sum_f c(f -> target); exact and cheap (one attribution pass);
   - ``propagate=True, freeze=True`` ("frozen"): a real re-run of the replacement model with the
     features zeroed; downstream features are recomputed by their encoders from the changed residual,
     error terms stay at their clean values, attention patterns and layer-norm scales stay frozen;
   - ``propagate=True, freeze=False`` ("recomputed"): as "frozen" but attention patterns and
     layer-norm scales are recomputed from the changed residual.
3. Do the same for ``n_random`` random sets of the same size drawn uniformly from the pool
   (``seed`` fixes them) and report the circuit's drop beside the random drops, with the empirical
   p-value (1 + #{random drop >= circuit drop}) / (1 + n_random).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import networkx as nx
import numpy as np
import torch
from tqdm import tqdm

from c2srepro.attribution.contributions import attribute
from c2srepro.attribution.circuit import circuit_features, graph_node
from c2srepro.attribution.linearised import LinearisedReplacement, replacement_forward
from c2srepro.attribution.nodes import Node

logger = logging.getLogger(__name__)


def empirical_p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #{null >= observed}) / (1 + len(null)): how often a random draw does at least as well,
    counting the observed one (never 0)."""
    null = np.asarray(null)
    return (1 + int((null >= observed).sum())) / (1 + len(null))


def candidate_pool(rep: LinearisedReplacement, target: Node) -> list[Node]:
    """Active features that can reach ``target``: lower layer, position not after it."""
    read_layer = rep.n_layers if target.kind == "logit" else target.layer
    pool = []
    for layer in range(read_layer):
        act = rep.active[layer]
        upstream = act.position <= target.position
        positions, features = act.position[upstream].tolist(), act.feature[upstream].tolist()
        pool.extend(Node("feature", layer, p, f) for p, f in zip(positions, features))
    return pool


def ablate(
    rep: LinearisedReplacement,
    circuit: nx.DiGraph | Sequence[Node],
    target: Node | None = None,
    *,
    n_random: int = 20,
    seed: int = 0,
    propagate: bool = True,
    freeze: bool = True,
) -> dict:
    """Drop of the target when the circuit's features are ablated, against same-size random sets.

    circuit: a graph from :func:`find_circuit` (its target is used unless ``target`` is given) or a
        list of feature nodes (then ``target`` is required).
    Returns a dict: target, mode, n_features, pool_size, clean, circuit_value, circuit_drop,
    random_drops (list), random_mean, random_std, p_value. Values are the target's activation
    (feature) or logit; a drop is clean minus ablated.
    """
    if isinstance(circuit, nx.DiGraph):
        target = target if target is not None else graph_node(circuit, circuit.graph["target"])
        features = circuit_features(circuit)
    else:
        if target is None:
            raise ValueError("pass target= when ablating a list of features (a circuit graph carries its own)")
        features = list(dict.fromkeys(circuit))
    rep.check_target(target)
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    pool = candidate_pool(rep, target)
    reachable = set(pool)
    stray = [f.id for f in features if f not in reachable]
    if stray:
        raise ValueError(
            f"features {stray[:5]} are not active features upstream of {target.id}; they cannot be ablated"
        )
    if not features:
        raise ValueError(f"no feature nodes to ablate for {target.id} (the circuit has none besides the target)")
    if len(pool) < len(features):
        raise ValueError(
            f"only {len(pool)} active features upstream of {target.id}, fewer than the {len(features)} to ablate"
        )

    def measure(value: float) -> float:
        return max(value, 0.0) if target.kind == "feature" else value  # a feature is measured by z = ReLU(pre)

    if propagate:
        def run(ablated: Sequence[Node]) -> float:
            return measure(float(replacement_forward(rep, freeze=freeze, ablate=ablated).value(target)))
    else:
        direct = attribute(rep, target)

        def run(ablated: Sequence[Node]) -> float:
            return measure(direct.value - sum(direct.contribution(f) for f in ablated))

    generator = torch.Generator().manual_seed(seed)
    clean = run([])
    circuit_value = run(features)
    random_drops = []
    for _ in tqdm(range(n_random), desc="random ablations", disable=not propagate, leave=False):
        chosen = torch.randperm(len(pool), generator=generator)[: len(features)].tolist()
        random_drops.append(clean - run([pool[i] for i in chosen]))
    circuit_drop = clean - circuit_value
    drops = torch.tensor(random_drops, dtype=torch.float64)
    result = {
        "target": target.id,
        "mode": "direct" if not propagate else ("frozen" if freeze else "recomputed"),
        "n_features": len(features),
        "pool_size": len(pool),
        "clean": clean,
        "circuit_value": circuit_value,
        "circuit_drop": circuit_drop,
        "random_drops": random_drops,
        "random_mean": float(drops.mean()),
        "random_std": float(drops.std()) if n_random > 1 else 0.0,
        "p_value": empirical_p_value(circuit_drop, drops.numpy()),
    }
    logger.info("ablation of %d features: drop %.4g vs random %.4g +- %.4g", len(features), circuit_drop,
                result["random_mean"], result["random_std"])
    return result
