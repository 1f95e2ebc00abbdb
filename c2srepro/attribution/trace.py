"""One cell's circuit, end to end: pick the cell, build its prompt, choose the target, search.

1. The cell: an index among the given cells, or a label, meaning the first of those cells that
   carries the label and that the model classifies correctly (the paper traces a correct
   prediction).
2. Its prompt without the answer (the paper's Figure 4); the last position is the final prompt
   token, where the model is about to answer.
3. The target: ``"feature"``, a transcoder feature of the last layer at the final token (the given
   ``feature``, else the one firing most strongly, as the paper takes "features that strongly
   activated on the final token in the last layer"); or ``"logit"``, the logit of the first token
   of the predicted answer at the final token.
4. The greedy path search of ``c2srepro.attribution.circuit`` (:func:`trace_cell`), or the full
   attribution graph of ``c2srepro.attribution.full_graph`` (:func:`graph_cell`), with each token's
   string and gene.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import networkx as nx

from c2srepro.attribution.circuit import find_circuit
from c2srepro.attribution.full_graph import Graph, build_graph
from c2srepro.attribution.linearised import LinearisedReplacement, build_replacement
from c2srepro.attribution.nodes import Node
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import EncodedPrompts, answer_text, encode_prompts
from c2srepro.data.tokenizer import CellTokenizer
from c2srepro.transcoder.model import Transcoder

TARGETS = ("feature", "logit")


@dataclass
class CellCircuit:
    cell: CellSentence
    predicted_label: str
    prompt: EncodedPrompts  # the one prompt, without answer
    tokens: list[str]
    replacement: LinearisedReplacement
    target: Node
    graph: nx.DiGraph


@dataclass
class CellGraph:
    cell: CellSentence
    predicted_label: str
    prompt: EncodedPrompts  # the one prompt, without answer
    tokens: list[str]
    replacement: LinearisedReplacement
    target: Node
    graph: Graph


def pick_cell(
    cells: Sequence[CellSentence], predicted: Sequence[str], choice: int | str
) -> tuple[CellSentence, str]:
    """The chosen cell and the model's prediction for it (see the module docstring, step 1)."""
    if len(cells) != len(predicted):
        raise ValueError(f"{len(cells)} cells but {len(predicted)} predictions")
    if isinstance(choice, int):
        if not 0 <= choice < len(cells):
            raise ValueError(f"cell index {choice} is out of range: there are {len(cells)} cells (0..{len(cells) - 1})")
        return cells[choice], predicted[choice]
    labelled = [i for i, c in enumerate(cells) if c.label == choice]
    if not labelled:
        known = sorted({c.label for c in cells})
        raise ValueError(f"no cell is labelled {choice!r}; labels: {known}")
    correct = [i for i in labelled if predicted[i] == choice]
    if not correct:
        raise ValueError(
            f"the model classifies none of the {len(labelled)} cells labelled {choice!r} correctly; "
            "pick another label or a cell index"
        )
    return cells[correct[0]], predicted[correct[0]]


def _prepare(model, transcoders, tokenizer, cell, predicted_label, *, target, feature):
    """Steps 2-3: the prompt, its tokens, the replacement and the target node."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    prompt = encode_prompts([cell], tokenizer)
    ids = prompt.input_ids[0]
    tokens = tokenizer.tokens(ids)
    replacement = build_replacement(model, transcoders, ids)
    last_layer, final = replacement.n_layers - 1, replacement.n_pos - 1
    if target == "logit":
        answer_first_token = tokenizer.encode(answer_text(predicted_label))[0][0]
        return prompt, tokens, replacement, replacement.logit_node(final, answer_first_token)
    if feature is None:
        top = replacement.top_features(last_layer, final, n=1)
        if not top:
            raise ValueError(f"no transcoder feature of layer {last_layer} fires on the final token")
        feature = top[0][0]
    return prompt, tokens, replacement, Node.feature(last_layer, final, feature)


def trace_cell(
    model,
    transcoders: Mapping[int, Transcoder] | Sequence[Transcoder],
    tokenizer: CellTokenizer,
    cell: CellSentence,
    predicted_label: str,
    *,
    target: str = "feature",
    feature: int | None = None,
    k: int = 10,
    depth: int = 3,
    threshold: float = 0.0,
) -> CellCircuit:
    """Build the replacement for ``cell``'s prompt and trace the circuit behind ``target``."""
    prompt, tokens, replacement, node = _prepare(
        model, transcoders, tokenizer, cell, predicted_label, target=target, feature=feature
    )
    graph = find_circuit(
        replacement, node, k=k, depth=depth, threshold=threshold, genes=prompt.gene_of_token[0], tokens=tokens
    )
    return CellCircuit(cell, predicted_label, prompt, tokens, replacement, node, graph)


def graph_cell(
    model,
    transcoders: Mapping[int, Transcoder] | Sequence[Transcoder],
    tokenizer: CellTokenizer,
    cell: CellSentence,
    predicted_label: str,
    *,
    target: str = "feature",
    feature: int | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
) -> CellGraph:
    """Build the replacement for ``cell``'s prompt and the full attribution graph of ``target``
    (:func:`c2srepro.attribution.full_graph.build_graph`, at most ``max_feature_nodes`` features)."""
    prompt, tokens, replacement, node = _prepare(
        model, transcoders, tokenizer, cell, predicted_label, target=target, feature=feature
    )
    graph = build_graph(replacement, node, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                        tokens=tokens, genes=prompt.gene_of_token[0])
    return CellGraph(cell, predicted_label, prompt, tokens, replacement, node, graph)
