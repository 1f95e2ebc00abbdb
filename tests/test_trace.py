import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.attribution.circuit import circuit_genes
from c2srepro.attribution.trace import pick_cell, trace_cell
from c2srepro.data.cells import CellSentence
from c2srepro.models.mini_c2s import build_vocabulary
from c2srepro.data.prompts import answer_text, build_prompt
from c2srepro.data.tokenizer import CellTokenizer
from tests._tiny_neox import tiny_transcoders

CELLS = [
    CellSentence(0, "a", ("CD14", "LYZ", "S100A8"), "CD14+ Monocyte"),
    CellSentence(1, "b", ("NKG7", "GNLY", "CST7"), "CD56+ NK"),
    CellSentence(2, "c", ("CD14", "FCN1", "LYZ"), "CD14+ Monocyte"),
]


def test_pick_cell_by_label_takes_the_first_correct_one():
    cell, predicted = pick_cell(CELLS, ["CD56+ NK", "CD56+ NK", "CD14+ Monocyte"], "CD14+ Monocyte")
    assert cell.cell_id == "c" and predicted == "CD14+ Monocyte"
    assert pick_cell(CELLS, ["x", "y", "z"], 1) == (CELLS[1], "y")


def test_pick_cell_errors():
    predicted = ["CD56+ NK"] * 3
    with pytest.raises(ValueError, match="cell index 5 is out of range: there are 3 cells"):
        pick_cell(CELLS, predicted, 5)
    with pytest.raises(ValueError, match="no cell is labelled 'B cell'"):
        pick_cell(CELLS, predicted, "B cell")
    with pytest.raises(ValueError, match="classifies none of the 2 cells labelled 'CD14\\+ Monocyte'"):
        pick_cell(CELLS, predicted, "CD14+ Monocyte")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    texts = [build_prompt(c, with_answer=True).text for c in CELLS]
    cell_tokenizer = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=cell_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=128, rotary_pct=0.25,
                           use_parallel_residual=True, max_position_embeddings=128)
    model = GPTNeoXForCausalLM(config).eval()
    ids = torch.tensor(cell_tokenizer.encode(build_prompt(CELLS[0]).text)[0])
    return model, tiny_transcoders(model, ids, firing=0.2), cell_tokenizer


def test_trace_feature_target(tiny):
    model, transcoders, cell_tokenizer = tiny
    traced = trace_cell(model, transcoders, cell_tokenizer, CELLS[0], "CD14+ Monocyte", k=5, depth=2)
    assert traced.target.kind == "feature" and traced.target.layer == 1
    assert traced.target.position == len(traced.prompt.input_ids[0]) - 1
    top_feature = traced.replacement.top_features(1, traced.target.position, n=1)[0][0]
    assert traced.target.index == top_feature
    assert traced.target.id in traced.graph
    assert set(circuit_genes(traced.graph)) <= set(CELLS[0].genes)


def test_trace_logit_target_reads_the_answer_token(tiny):
    model, transcoders, cell_tokenizer = tiny
    traced = trace_cell(model, transcoders, cell_tokenizer, CELLS[0], "CD14+ Monocyte", target="logit", k=3, depth=2)
    first_answer_token = cell_tokenizer.encode(answer_text("CD14+ Monocyte"))[0][0]
    assert traced.target.kind == "logit" and traced.target.index == first_answer_token


def test_trace_rejects_bad_targets(tiny):
    model, transcoders, cell_tokenizer = tiny
    with pytest.raises(ValueError, match="target must be one of"):
        trace_cell(model, transcoders, cell_tokenizer, CELLS[0], "x", target="neuron")
    position = len(cell_tokenizer.encode(build_prompt(CELLS[0]).text)[0]) - 1
    traced = trace_cell(model, transcoders, cell_tokenizer, CELLS[0], "x", k=1, depth=1)
    firing = {f for f, _ in traced.replacement.top_features(1, position, n=transcoders[1].cfg.d_tc)}
    silent = next(f for f in range(transcoders[1].cfg.d_tc) if f not in firing)
    with pytest.raises(ValueError, match="does not fire|not active|inactive"):
        trace_cell(model, transcoders, cell_tokenizer, CELLS[0], "x", feature=silent)


@pytest.mark.parametrize("target", ["feature", "logit"])
def test_graph_cell_builds_the_full_graph_of_the_same_target(tiny, target):
    from c2srepro.attribution import gene_view, greedy_paths
    from c2srepro.attribution.trace import graph_cell

    model, transcoders, cell_tokenizer = tiny
    traced = trace_cell(model, transcoders, cell_tokenizer, CELLS[0], "CD14+ Monocyte", target=target, k=5, depth=2)
    cell_graph = graph_cell(model, transcoders, cell_tokenizer, CELLS[0], "CD14+ Monocyte", target=target)
    assert cell_graph.target == traced.target
    assert cell_graph.graph.node(cell_graph.graph.targets[0]) == traced.target
    # Uncapped, the paper's search read off the graph is the circuit trace_cell found by its own passes.
    greedy = greedy_paths(cell_graph.graph, k=5, depth=2).to_networkx()
    assert set(greedy.nodes) == set(traced.graph.nodes) and set(greedy.edges) == set(traced.graph.edges)
    assert set(gene_view(cell_graph.graph).genes["gene"]) == set(CELLS[0].genes)
    capped = graph_cell(model, transcoders, cell_tokenizer, CELLS[0], "CD14+ Monocyte", target=target, max_feature_nodes=3)
    assert (capped.graph.nodes["kind"] == "feature").sum() == max(3, int(target == "feature"))
    with pytest.raises(ValueError, match="target must be one of"):
        graph_cell(model, transcoders, cell_tokenizer, CELLS[0], "CD14+ Monocyte", target="gene")
