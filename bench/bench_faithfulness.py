"""Gene-influence faithfulness of one cell after another (chapter 08's loop): cells per minute, on CPU.

1. The model, transcoders and cells:
   - ``--results-dir results/default``: chapter 1's model and held-out cells and chapter 2's
     transcoders of that profile (run the book first); the cells are the ones chapter 08 tests
     (correctly classified, round-robin over the types);
   - ``--preset 410m``: the smoke model (a randomly initialised Pythia-410m-shaped GPT-NeoX with the
     real Pythia tokenizer; ``--layers`` truncates it), random 8 x hidden transcoders with about
     ``--firing`` of the features active per token, fitted to the first cell's prompt
     (``bench_circuit.random_transcoders``), and cells of the synthetic Heart-Cell-Atlas-shaped atlas
     (64-gene sentences, ~300 tokens).
2. For each of ``--cells`` cells, :func:`c2srepro.biology.faithfulness.cell_faithfulness`: the
   attribution graph of the predicted answer (``--max-feature-nodes`` features), the greedy circuit,
   direct logit attribution, and every gene of the sentence removed in turn and scored by the real
   model over all candidate labels.
3. Reports seconds per cell, cells per minute, removals per second and peak resident memory, and the
   projected time of chapter 08's default 50 cells.

Usage: python bench/bench_faithfulness.py --results-dir results/default [--cells 5]
       python bench/bench_faithfulness.py --preset 410m [--layers 4] [--cells 2]
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import torch
from bench_circuit import random_transcoders

from c2srepro.biology.faithfulness import cell_faithfulness, faithfulness_cells
from c2srepro.data.cells import cell_sentences
from c2srepro.data.datasets import load_dataset
from c2srepro.data.prompts import encode_prompts
from c2srepro.models.predict import predict_labels

CHAPTER_CELLS = 50  # chapter 08's default n_cells


def profile_setup(results_dir: str, n_cells: int):
    from c2srepro.book.stages import model_stage, transcoders

    stage = model_stage(results_dir)
    layer_transcoders = transcoders(results_dir, stage=stage)
    heldout = stage.split.cells("heldout")
    predicted = predict_labels(stage.model, stage.tokenizer, heldout, stage.split.labels)
    chosen = faithfulness_cells(heldout, predicted, n_cells=n_cells)
    return (stage.model, layer_transcoders, stage.tokenizer, [heldout[i] for i in chosen],
            [predicted[i] for i in chosen], stage.split.labels)


def preset_setup(layers: int | None, n_cells: int, firing: float):
    from c2srepro.book.smoke import PYTHIA_410M, smoke_atlas_path, smoke_model_dir
    from c2srepro.models.load import load_c2s_model

    model, tokenizer = load_c2s_model(smoke_model_dir(n_layers=layers or PYTHIA_410M["n_layers"]))
    adata = load_dataset(smoke_atlas_path())
    cells = cell_sentences(adata, top_k=64, symbol_column="gene_name-new", label_column="cell_type")[:n_cells]
    labels = sorted({cell.label for cell in cell_sentences(adata, top_k=8, symbol_column="gene_name-new",
                                                          label_column="cell_type")})
    prompt = encode_prompts(cells[:1], tokenizer).input_ids[0]
    layer_transcoders = random_transcoders(model, torch.as_tensor(prompt), firing)
    # an untrained model classifies nothing: each cell is traced from the label it gives most weight
    predicted = predict_labels(model, tokenizer, cells, labels)
    return model, layer_transcoders, tokenizer, cells, predicted, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--results-dir", help="a profile's results (chapters 1-2 run), e.g. results/default")
    source.add_argument("--preset", choices=["410m"], help="the smoke model at Pythia-410m shapes")
    parser.add_argument("--layers", type=int, default=None, help="truncate the 410m preset to this many layers")
    parser.add_argument("--cells", type=int, default=5)
    parser.add_argument("--max-feature-nodes", type=int, default=200, help="chapter 08's default cap")
    parser.add_argument("--firing", type=float, default=0.008, help="preset: fraction of features firing per token")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.results_dir:
        setup = profile_setup(args.results_dir, args.cells)
    else:
        setup = preset_setup(args.layers, args.cells, args.firing)
    model, layer_transcoders, tokenizer, cells, predicted, labels = setup
    config = model.config
    print(f"{args.results_dir or 'preset ' + args.preset}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{len(labels)} candidate labels, {len(cells)} cells, feature cap {args.max_feature_nodes}, "
          f"torch threads {torch.get_num_threads()} (set up in {time.perf_counter() - start:.1f} s)")

    seconds, removals = [], 0
    for cell, label in zip(cells, predicted):
        started = time.perf_counter()
        result = cell_faithfulness(model, layer_transcoders, tokenizer, cell, label, labels,
                                   max_feature_nodes=args.max_feature_nodes)
        seconds.append(time.perf_counter() - started)
        removals += len(result.genes)
        print(f"  {cell.cell_id} ({cell.label}): {len(result.genes)} removals, graph {result.graph.n_nodes} nodes, "
              f"{seconds[-1]:.1f} s")
    per_cell = sum(seconds) / len(seconds)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"per cell {per_cell:.1f} s = {60 / per_cell:.2f} cells per minute; {removals / sum(seconds):.1f} removals/s; "
          f"peak resident memory {peak_gib:.2f} GiB")
    print(f"chapter 08's {CHAPTER_CELLS} cells at this rate: {CHAPTER_CELLS * per_cell / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
