"""Full attribution graph + influence pruning + scores + gene view at Pythia-410m shapes, on CPU.

1. A random model of the given shape (default Pythia-410m = C2S-Pythia-410m: 24 layers, hidden
   1024, 16 heads; ``--preset gemma2-2b``: Gemma-2-2B = C2S-Scale-Gemma-2-2B, 26 layers, hidden 2304;
   see ``bench_circuit.py``, whose builders this reuses), a random prompt of
   ``--n-pos`` tokens (~300 = a 64-gene cell sentence + query) and random 8 x hidden transcoders with
   about ``--firing`` of the features active per token and decoders fitted to the prompt's MLPs.
2. Per-token genes: ``--genes`` genes of ``--tokens-per-gene`` sub-word tokens each, after a
   template prefix, the rest template text (as in a C2S cell sentence).
3. Time, side by side: ``build_replacement``; ``build_graph`` for the target (``--target logit``:
   the raw logit of the top token at the last position; ``--target label``: a ``LabelTarget``, the
   log-probability of an answer of ``--answer-tokens`` tokens teacher-forced at the prompt's end,
   each answer position read along e_y - p) with ``--max-feature-nodes`` feature rows chosen by influence; ``prune`` at
   circuit-tracer's defaults (0.8 / 0.98); ``scores``; ``gene_view``. Reports wall times, peak
   resident memory, the number of feature nodes before and after pruning, both scores, and checks
   the target row's exactness (edges + constant + capped-out features = the target's value).

Rows per backward pass (``--batch-size``) and passes between influence updates (``--update-interval``)
default to 128 and 1: the cap picks the same 128 features between updates as 32 x 4 did (the same
graph), and a pass of 128 rows gathers each layer's decoders a quarter as often. ``--out`` also writes
the figures as JSON with their provenance (command, packages, platform, load average);
``--save-graph`` writes the graph (``Graph.save``) to compare two builds node for node.

Usage: python bench/bench_graph.py [--preset 410m|gemma2-2b|small] [--layers N] [--n-pos 300] [--max-feature-nodes 128]
       [--target logit|label] [--answer-tokens 6] [--batch-size 128] [--update-interval 1]
       [--out bench/graph/<machine>.json] [--save-graph graph.safetensors]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys

import torch
from bench_circuit import PRESETS, random_setup, timed

from c2srepro.attribution import LabelTarget, LogitTarget, build_graph, build_replacement, gene_view


def prompt_genes(n_pos: int, n_genes: int, tokens_per_gene: int, prefix: int = 20) -> list[str | None]:
    genes: list[str | None] = [None] * n_pos
    for g in range(n_genes):
        for t in range(tokens_per_gene):
            position = prefix + g * (tokens_per_gene + 1) + t  # +1: the ", " between genes
            if position < n_pos:
                genes[position] = f"GENE{g}"
    return genes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="410m")
    parser.add_argument("--layers", type=int, default=None, help="truncate the model to this many layers")
    parser.add_argument("--n-pos", type=int, default=300)
    parser.add_argument("--max-feature-nodes", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128, help="rows per backward pass")
    parser.add_argument("--update-interval", type=int, default=1, help="backward passes between influence updates")
    parser.add_argument("--genes", type=int, default=64)
    parser.add_argument("--tokens-per-gene", type=int, default=3)
    parser.add_argument("--firing", type=float, default=0.008, help="fraction of features firing per token")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--target", choices=("logit", "label"), default="label")
    parser.add_argument("--answer-tokens", type=int, default=6, help="answer length of the label target")
    parser.add_argument("--out", help="also write the figures here, as JSON with their provenance")
    parser.add_argument("--save-graph", help="also write the graph here (Graph.save)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    layers, input_ids, model, transcoders = random_setup(
        args, f"{args.genes} genes, feature cap {args.max_feature_nodes}, batch {args.batch_size} x {args.update_interval}")
    genes = prompt_genes(args.n_pos, args.genes, args.tokens_per_gene)

    load_before = os.getloadavg()
    results: dict[str, float] = {}
    rep = timed("build_replacement", lambda: build_replacement(model, transcoders, input_ids), results)
    print(f"  active features: {rep.n_active} ({rep.n_active / (layers * args.n_pos):.1f} per token per layer)")
    last = rep.n_pos - 1
    top_token = int(rep.run.logits[last].argmax())
    if args.target == "logit":
        target, prompt_length, answers = LogitTarget(top_token, last, demeaned=False), None, None
    else:  # the prompt's last answer_tokens - 1 tokens are the answer's forced prefix
        prompt_length = rep.n_pos - args.answer_tokens + 1
        answers = {"answer": [int(i) for i in rep.input_ids[prompt_length:]] + [top_token]}
        target = LabelTarget("answer")
    graph = timed(f"build_graph ({args.target}, cap {args.max_feature_nodes})",
                  lambda: build_graph(rep, target, max_feature_nodes=args.max_feature_nodes,
                                      batch_size=args.batch_size, update_interval=args.update_interval,
                                      genes=genes, prompt_length=prompt_length, answers=answers), results)
    index = graph.targets[0]
    row = graph.nodes.iloc[index]
    total = float(graph.adjacency[index].sum()) + row["constant"] + row["dropped"]
    print(f"  exactness: {args.target} target {graph.info['targets'][0]['value']:.6g}, edges + constant + capped-out "
          f"features {total:.6g} (capped-out features carry {row['dropped']:.4g})")
    pruned = timed("prune (0.8 / 0.98)", lambda: graph.prune(), results)
    scores = timed("scores", lambda: graph.scores(), results)
    view = timed("gene_view", lambda: gene_view(graph), results)
    n_features = len(graph.indices("feature"))
    print(f"  graph: {graph.n_nodes} nodes ({n_features} feature nodes of {rep.n_active} active), "
          f"pruned: {pruned.n_nodes} nodes ({len(pruned.indices('feature'))} feature nodes), "
          f"edges {int((graph.adjacency != 0).sum())} -> {int((pruned.adjacency != 0).sum())}")
    print(f"  scores: replacement {scores['replacement']:.4f}, completeness {scores['completeness']:.4f}; "
          f"top genes {view.genes['gene'].head(5).tolist()}")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  peak resident memory {peak_gib:.2f} GiB (model + transcoders included)")
    work = sum(results.values())
    print(f"full graph + pruning + scores + gene view: {work - results['build_replacement']:.1f} s "
          f"({work:.1f} s with build_replacement)")
    full_layers = PRESETS[args.preset][0]
    if layers != full_layers:
        factor = full_layers / layers
        print(f"EXTRAPOLATED to {full_layers} layers (x{factor:.1f}, linear in depth): {work * factor:.0f} s")
    if args.save_graph:
        graph.save(args.save_graph)
    if args.out:
        from c2srepro.book.provenance import write_result

        figures = {
            "seconds": {k: round(v, 2) for k, v in results.items()},
            "peak_rss_gib": round(peak_gib, 2),
            "load_average_1_5_15_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
            "layers": layers, "n_pos": args.n_pos, "target": args.target, "batch_size": args.batch_size,
            "update_interval": args.update_interval, "max_feature_nodes": args.max_feature_nodes,
            "n_active": rep.n_active, "n_nodes": graph.n_nodes, "feature_nodes": n_features,
            "pruned_nodes": pruned.n_nodes, "target_value": graph.info["targets"][0]["value"],
            "capped_out": float(row["dropped"]), "replacement": scores["replacement"],
            "completeness": scores["completeness"], "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        write_result(args.out, figures, params={"command": " ".join(sys.argv[1:]), "cpu_count": os.cpu_count()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
