"""Unit costs for ``python -m c2srepro.book plan``: one prompt's forward pass, its replacement
(forward + every layer's transcoder encoding) and attribution-graph rows, at a real model shape.

1. The random model and transcoders of ``bench_circuit.random_setup`` (``--preset 410m``: the
   Pythia-410m shape of C2S-Pythia-410m, 8 x hidden transcoders with about ``--firing`` of the
   features active per token), a prompt of ``--n-pos`` tokens (~300: a 64-gene cell sentence and
   the question), float32, ``--threads`` torch threads.
2. ``forward``: the model on the prompt under ``torch.no_grad``, median of ``--repeats``.
   ``replacement``: ``build_replacement`` (the forward pass, every layer's transcoder encoding
   and error terms), median of ``--repeats``. ``graph``: ``build_graph`` of the top logit with
   ``--rows`` feature rows each (two or more caps, rows computed ``--batch-size`` at a time); the
   least-squares line through (batches, seconds) gives the cost of one row batch and the fixed
   cost of a graph.
3. ``tokens``: the prompt length of ``--cells`` cells of the smoke atlas (Heart-Cell-Atlas shaped)
   with the bundled Pythia tokenizer at top_k 16 and 64 genes; the line through the two medians
   gives the tokens per gene and the template's tokens, from which ``plan`` sizes a prompt.
4. Peak RSS (``ru_maxrss``) after each phase: the process's peak so far, the model and
   transcoders included, so each figure bounds the phase's own need.
5. ``--out`` writes the figures as JSON with their provenance; ``plan`` reads them from there and
   never measures. The load average before and after is recorded: a shared machine slows the
   figures, and the plan says they are this machine's.

Usage: python bench/bench_plan_units.py [--preset 410m] [--rows 64 192] [--out bench/throughput/cpu-2core-units-410m.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
from bench_circuit import PRESETS, random_setup

from c2srepro.attribution import build_graph, build_replacement


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 3)


def prompt_tokens(n_cells: int) -> dict:
    """Median prompt length at top_k 16 and 64 (smoke atlas, Pythia BPE), and the line through them."""
    from c2srepro.book.smoke import LABEL_COLUMN, SYMBOL_COLUMN, smoke_atlas_path
    from c2srepro.data.cells import cell_sentences, read_cells
    from c2srepro.data.prompts import encode_prompts
    from c2srepro.data.tokenizer import CellTokenizer

    adata = read_cells(smoke_atlas_path(), backed=False, label_column=LABEL_COLUMN)
    tokenizer = CellTokenizer.load()
    cells = list(range(min(n_cells, adata.n_obs)))
    lengths = {}
    for top_k in (16, 64):
        sentences = cell_sentences(adata, top_k=top_k, symbol_column=SYMBOL_COLUMN, label_column=LABEL_COLUMN,
                                   cells=cells)
        lengths[top_k] = statistics.median(len(ids) for ids in encode_prompts(sentences, tokenizer).input_ids)
    per_gene = (lengths[64] - lengths[16]) / 48
    return {"prompt_tokens_top16": lengths[16], "prompt_tokens_top64": lengths[64],
            "tokens_per_gene": round(per_gene, 3), "template_tokens": round(lengths[64] - 64 * per_gene, 1),
            "tokens_cells": len(cells)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="410m")
    parser.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)  # random_setup reads it
    parser.add_argument("--n-pos", type=int, default=300)
    parser.add_argument("--firing", type=float, default=0.008)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 192], help="feature-row caps of the graphs")
    parser.add_argument("--batch-size", type=int, default=64)  # build_graph's default
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", type=int, default=40, help="smoke-atlas cells whose prompt lengths are measured")
    parser.add_argument("--out", help="also write the figures here, as JSON with their provenance")
    args = parser.parse_args(argv)
    if len(set(args.rows)) < 2:
        parser.error("--rows needs at least two different caps (the line through them gives the row cost)")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    layers, input_ids, model, transcoders = random_setup(args, "plan units")
    figures: dict = {
        "preset": args.preset, "layers": layers, "d_model": PRESETS[args.preset].hidden, "n_pos": args.n_pos,
        "d_tc": 8 * PRESETS[args.preset].hidden, "dtype": "float32", "torch_threads": torch.get_num_threads(),
    }
    with torch.no_grad():
        figures["forward_s"] = median_seconds(lambda: model(input_ids[None]), args.repeats)
    figures["forward_peak_rss_mb"] = peak_rss_mb()
    figures["replacement_s"] = median_seconds(lambda: build_replacement(model, transcoders, input_ids), args.repeats)
    figures["replacement_peak_rss_mb"] = peak_rss_mb()

    rep = build_replacement(model, transcoders, input_ids)
    last = rep.n_pos - 1
    target = rep.logit_node(last, int(rep.run.logits[last].argmax()))
    graphs = []
    for rows in sorted(set(args.rows)):
        start = time.perf_counter()
        build_graph(rep, target, max_feature_nodes=rows, batch_size=args.batch_size)
        graphs.append({"rows": rows, "batches": math.ceil(rows / args.batch_size),
                       "seconds": round(time.perf_counter() - start, 2)})
    batches = np.array([g["batches"] for g in graphs], dtype=float)
    seconds = np.array([g["seconds"] for g in graphs])
    slope, intercept = np.polyfit(batches, seconds, 1)
    figures["graphs"] = graphs
    figures["graph_batch_size"] = args.batch_size
    figures["graph_row_batch_s"] = round(float(slope), 3)
    figures["graph_fixed_s"] = round(float(max(intercept, 0.0)), 3)
    figures["graph_peak_rss_mb"] = peak_rss_mb()
    figures.update(prompt_tokens(args.cells))
    figures["load_average_before"] = round(load_before, 2)
    figures["load_average_after"] = round(os.getloadavg()[0], 2)
    figures["cpu_count"] = os.cpu_count()
    print(json.dumps(figures, indent=2))
    if args.out:
        from c2srepro.book.provenance import write_result

        write_result(args.out, figures, params={"command": " ".join(sys.argv[1:])})
    return 0


if __name__ == "__main__":
    sys.exit(main())
