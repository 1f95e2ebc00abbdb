"""Circuit extraction time (linearised replacement + attribution + greedy path search) on CPU.

1. Build a randomly initialised GPT-NeoX model of a given shape (default: Pythia-410m, i.e.
   C2S-Pythia-410m: 24 layers, hidden 1024, 16 heads, intermediate 4096, rotary_pct 0.25,
   vocab 50304) and a random prompt of ``--n-pos`` tokens (~300 = a 64-gene cell sentence + query).
2. Random transcoders (d_tc = 8 x hidden) whose encoder bias is calibrated on that prompt so that
   about ``--firing`` of the features fire per token (real transcoders are sparse; random ones with
   zero bias would fire half their features), with decoders fitted to the prompt's MLP outputs by
   ridge least squares (a random decoder leaves error terms that dominate every circuit, so the
   search would stop at depth 1).
3. Time, side by side in one run: ``build_replacement`` (the real forward pass, transcoder
   encodings, error terms); one ``attribute`` of a last-layer feature at the last position (one
   backward pass); ``find_circuit`` (k, depth) from that feature and from the last position's top
   logit; the ``direct`` ablation; and optionally (``--ablate-runs``) frozen re-run ablations.
   Each ``attribute`` result is checked for exactness (contributions + reading bias = value).
4. ``--layers`` runs a truncated model (fewer layers, same width) when the full depth is too slow
   for the machine; the per-layer costs are then extrapolated to 24 layers, labelled as such.

Usage: python bench/bench_circuit.py [--preset 410m|small] [--layers N] [--n-pos 300] [--k 10] [--depth 3]
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
import resource
import time

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.attribution import Node, ablate, attribute, build_replacement, find_circuit
from c2srepro.attribution.linearised import run_model
from c2srepro.transcoder import Transcoder, TranscoderConfig

PRESETS = {
    # name: (layers, hidden, heads, intermediate)
    "410m": (24, 1024, 16, 4096),
    "small": (6, 128, 4, 512),  # Pythia-14m-shaped
}


def random_model(layers: int, hidden: int, heads: int, intermediate: int, n_pos: int) -> GPTNeoXForCausalLM:
    config = GPTNeoXConfig(
        vocab_size=50304, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, rotary_pct=0.25, use_parallel_residual=True,
        max_position_embeddings=max(2048, n_pos),
    )
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # nonzero biases and layer-norm parameters, as in a trained model
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return model


def random_transcoders(model: GPTNeoXForCausalLM, input_ids: torch.Tensor, firing: float) -> list[Transcoder]:
    run = run_model(model, input_ids)
    transcoders = []
    for layer in range(model.config.num_hidden_layers):
        d_model = model.config.hidden_size
        tc = Transcoder(TranscoderConfig(d_model=d_model, d_transcoder=8 * d_model, layer=layer), seed=layer)
        with torch.no_grad():
            pre = run.mlp_in[layer] @ tc.W_enc
            tc.b_enc.copy_(-torch.quantile(pre.flatten()[:: max(1, pre.numel() // 4_000_000)], 1.0 - firing))
            tc.b_dec.normal_(0.0, 0.02)
            # Fit the decoder to this prompt's MLP outputs (ridge least squares) so that, as with a
            # trained transcoder, features rather than error terms carry the MLP's output.
            z = torch.relu(pre + tc.b_enc)
            gram = z @ z.T
            ridge = 0.1 * gram.diagonal().mean() * torch.eye(gram.shape[0])
            tc.W_dec.copy_(z.T @ torch.linalg.solve(gram + ridge, run.mlp_out[layer] - tc.b_dec))
        transcoders.append(tc)
    return transcoders


def random_setup(args, settings: str):
    """(layers, prompt, model, transcoders) of the preset's shape for ``args`` (preset, layers,
    n_pos, firing), seeded; prints the shape with the bench's own ``settings``."""
    full_layers, hidden, heads, intermediate = PRESETS[args.preset]
    layers = args.layers or full_layers
    torch.manual_seed(0)
    print(f"preset {args.preset}: {layers} of {full_layers} layers, hidden {hidden}, {heads} heads, "
          f"intermediate {intermediate}, d_tc {8 * hidden}, {args.n_pos} tokens, {settings}, "
          f"torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    input_ids = torch.randint(2, 50000, (args.n_pos,))
    model = random_model(layers, hidden, heads, intermediate, args.n_pos)
    transcoders = random_transcoders(model, input_ids, args.firing)
    print(f"  (random model + transcoders set up in {time.perf_counter() - start:.1f} s)")
    return layers, input_ids, model, transcoders


def describe(graph) -> str:
    kinds = Counter(d["kind"] for _, d in graph.nodes(data=True))
    expanded = sum(1 for n in graph if graph.in_degree(n) > 0)
    return f"{dict(kinds)}, {expanded} with upstream edges"


def timed(label: str, fn, results: dict):
    start = time.perf_counter()
    out = fn()
    results[label] = time.perf_counter() - start
    print(f"  {label:<38s} {results[label]:8.2f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="410m")
    parser.add_argument("--layers", type=int, default=None, help="truncate the model to this many layers")
    parser.add_argument("--n-pos", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--firing", type=float, default=0.008, help="fraction of features firing per token")
    parser.add_argument("--ablate-runs", type=int, default=0, help="random sets for a frozen re-run ablation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 avoids spin-wait stalls on a contended machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    layers, input_ids, model, transcoders = random_setup(args, f"k={args.k}, depth={args.depth}")

    results: dict[str, float] = {}
    rep = timed("build_replacement", lambda: build_replacement(model, transcoders, input_ids), results)
    print(f"  active features: {rep.n_active} ({rep.n_active / (layers * args.n_pos):.1f} per token per layer)")
    last = rep.n_pos - 1
    feature, _ = rep.top_features(layers - 1, last, 1)[0]
    target = Node.feature(layers - 1, last, feature)
    result = timed("attribute (1 feature target)", lambda: attribute(rep, target), results)
    print(f"  exactness: value {result.value:.6g}, sum of contributions {result.total():.6g}")
    graph = timed(f"find_circuit feature (k={args.k}, depth={args.depth})",
                  lambda: find_circuit(rep, target, k=args.k, depth=args.depth), results)
    print(f"  circuit: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges, {describe(graph)}")
    logit = rep.logit_node(last, int(rep.run.logits[last].argmax()))
    logit_graph = timed(f"find_circuit logit (k={args.k}, depth={args.depth})",
                        lambda: find_circuit(rep, logit, k=args.k, depth=args.depth), results)
    print(f"  circuit: {logit_graph.number_of_nodes()} nodes, {logit_graph.number_of_edges()} edges, "
          f"{describe(logit_graph)}")
    timed("ablate direct (20 random sets)", lambda: ablate(rep, graph, n_random=20, propagate=False), results)
    if args.ablate_runs:
        timed(f"ablate frozen re-run ({args.ablate_runs} random sets)",
              lambda: ablate(rep, graph, n_random=args.ablate_runs, propagate=True, freeze=True), results)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  peak resident memory {peak_gib:.2f} GiB")
    extraction = results["build_replacement"] + results[f"find_circuit feature (k={args.k}, depth={args.depth})"]
    print(f"circuit extraction (build + search, feature target): {extraction:.1f} s")
    full_layers = PRESETS[args.preset][0]
    if layers != full_layers:
        # Every phase is a loop over layers with the same per-layer work, so time scales ~linearly.
        factor = full_layers / layers
        print(f"EXTRAPOLATED to {full_layers} layers (x{factor:.1f}, linear in depth): "
              f"build {results['build_replacement'] * factor:.0f} s, "
              f"attribute {results['attribute (1 feature target)'] * factor:.1f} s, "
              f"extraction {extraction * factor:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
