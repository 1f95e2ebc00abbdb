"""The paper's greedy path search written out plainly, one attribution pass per node: the independent
reference that the search over a graph's stored rows (``greedy_paths``) is tested against."""

from __future__ import annotations

from c2srepro.attribution.contributions import attribute


def reference_circuit(rep, target, *, k, depth, threshold=0.0, kinds=("feature", "error", "embedding")):
    """{node id: summed weight of the kept paths starting there} and {(source id, sink id): contribution}."""
    attributions = {}

    def sources_of(node):
        if node not in attributions:
            attributions[node] = attribute(rep, node)
        return attributions[node]

    value = rep.value(target)
    beam, kept = [((target,), value)], []
    for _ in range(depth):
        candidates = []
        for path, weight in beam:
            head = path[0]
            if head.kind not in ("feature", "logit"):
                continue
            result = sources_of(head)
            share = 1.0 if head == target else weight / result.value
            candidates += [((source, *path), c * share) for source, c in result.top(k, kinds=kinds)]
        candidates.sort(key=lambda item: -abs(item[1]))
        beam = [(path, w) for path, w in candidates[:k] if abs(w) >= threshold * abs(value) and w != 0.0]
        kept += beam
        if not beam:
            break
    influence, edges = {target.id: value}, {}
    for path, weight in kept:
        influence[path[0].id] = influence.get(path[0].id, 0.0) + weight
        for source, sink in zip(path[:-1], path[1:]):
            edges[(source.id, sink.id)] = sources_of(sink).contribution(source)
    return influence, edges
