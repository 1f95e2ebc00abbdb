"""The paper's greedy computational-path search ("Finding Computational Subgraphs"), over a graph's rows.

A path v_d -> ... -> v_1 -> target carries the share of the target that flows along it. With
c(v -> u) the exact contribution of source v to u (an edge of the attribution graph,
:mod:`c2srepro.attribution.full_graph`) and z_u the activation of feature u (which, u firing,
equals its pre-activation = sum of its contributions):

    w(v_1 -> target)          = c(v_1 -> target)
    w(v_{i+1} -> v_i -> ...)  = w(v_i -> ...) * c(v_{i+1} -> v_i) / z_{v_i}

so the extensions of a path through all of v_i's sources (plus v_i's reading bias) add up to the
path's own weight: the path weights conserve the target's value.

1. Start from the target (step 1 of the paper: search for upstream nodes that strongly contribute).
2. Keep the ``k`` paths of largest |w| (step 2: retain only top contributors), dropping any with
   |w| < ``threshold`` * |target value|.
3. Extend every kept path whose first node is a transcoder feature with a computed row by that
   feature's own sources, and again keep the top ``k`` extended paths over the whole beam.
   Embeddings, error terms and features whose rows a cap left uncomputed are leaves.
4. Repeat step 3 until ``depth`` edges (step 3: iterate).
5. :func:`c2srepro.attribution.full_graph.greedy_paths` merges the kept paths into the subgraph of
   their nodes and edges, a :class:`~c2srepro.attribution.full_graph.Graph` like any other, and
   records each path head's summed path weight as its ``influence``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from c2srepro.attribution.full_graph import Graph

logger = logging.getLogger(__name__)

SearchPath = tuple[Hashable, ...]  # head (the most upstream node) first, the target last


def check_search(k: int, depth: int, threshold: float) -> None:
    """The search's sizes: a clear error before any work."""
    if k < 1 or depth < 1:
        raise ValueError(f"k and depth must be >= 1, got k={k}, depth={depth}")
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (a fraction of |target value|), got {threshold}")


def beam_search(
    target: Hashable,
    target_value: float,
    *,
    k: int,
    depth: int,
    threshold: float,
    expandable: Callable[[Hashable], bool],
    sources: Callable[[Hashable], Sequence[tuple[Hashable, float]]],
    value: Callable[[Hashable], float],
    prepare: Callable[[list[Hashable]], None] | None = None,
) -> list[tuple[SearchPath, float]]:
    """Steps 2-4 of the module docstring over any node type: every path kept at some step, with its weight.

    expandable(node): whether the node has sources to extend by (a feature or logit; a computed row);
    sources(node): its ``k`` largest (source, contribution) pairs; value(node): its value, which
    the contributions add up to; prepare(nodes): called with each step's new heads before their
    sources are asked for (one batched attribution pass instead of one per head).
    """
    cutoff = threshold * abs(target_value)
    beam: list[tuple[SearchPath, float]] = [((target,), target_value)]
    kept: list[tuple[SearchPath, float]] = []
    for step in range(depth):
        extend = [(path, w) for path, w in beam if expandable(path[0])]
        if prepare is not None:
            prepare(list(dict.fromkeys(path[0] for path, _ in extend)))
        candidates = []
        for path, w in extend:
            head = path[0]
            # Conservation: a feature head's share w is split in proportion to its sources.
            scale = 1.0 if head == target else w / value(head)
            candidates.extend(((source, *path), c * scale) for source, c in sources(head))
        candidates.sort(key=lambda item: -abs(item[1]))
        beam = [(path, w) for path, w in candidates[:k] if abs(w) >= cutoff and w != 0.0]
        logger.info("circuit search step %d: kept %d of %d candidate paths", step + 1, len(beam), len(candidates))
        kept.extend(beam)
        if not beam:
            break
    return kept


def circuit_genes(graph: "Graph") -> list[str]:
    """Distinct genes at the graph's nodes, in order of first position (the paper's circuit gene
    list: for a greedy circuit, the genes its paths touch)."""
    nodes = graph.nodes.dropna(subset=["gene"]).sort_values("position", kind="stable")
    return list(dict.fromkeys(nodes["gene"]))
