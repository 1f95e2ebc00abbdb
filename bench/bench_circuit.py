"""Circuit extraction time (linearised replacement + attribution + graph + greedy path search) on CPU.

1. Build a randomly initialised model of a given shape (``--preset``; default 410m: Pythia-410m,
   i.e. C2S-Pythia-410m, GPT-NeoX with 24 layers, hidden 1024, 16 heads, intermediate 4096,
   rotary_pct 0.25, vocab 50304; gemma2-2b: Gemma-2-2B, i.e. C2S-Scale-Gemma-2-2B, 26 layers,
   hidden 2304, GeGLU 9216, 8 query heads on 4 key/value heads of 256 dims, soft-capping and a
   4096-token sliding window, from ``c2srepro.book.smoke.gemma2_2b_config`` with the Pythia
   vocabulary) and a random prompt of ``--n-pos`` tokens (~300 = a 64-gene cell sentence + query).
2. Random transcoders (d_tc = 8 x hidden) whose encoder bias is calibrated on that prompt so that
   about ``--firing`` of the features fire per token (real transcoders are sparse; random ones with
   zero bias would fire half their features), with decoders fitted to the prompt's MLP outputs by
   ridge least squares (a random decoder leaves error terms that dominate every circuit, so the
   search would stop at depth 1).
3. Time, side by side in one run: ``build_replacement`` (the real forward pass, transcoder
   encodings, error terms); one ``attribute`` of a last-layer feature at the last position (one
   backward pass); the attribution graph of that feature and of the last position's top logit
   (``build_graph``, ``--max-feature-nodes`` feature rows) and the paper's greedy search read off
   each (``greedy_paths``, k, depth). The ``attribute`` result is checked for exactness
   (contributions + reading bias = value).
4. ``--layers`` runs a truncated model (fewer layers, same width) when the full depth is too slow
   for the machine; the per-layer costs are then extrapolated to the preset's depth, labelled as such.

Usage: python bench/bench_circuit.py [--preset 410m|gemma2-2b|small] [--layers N] [--n-pos 300] [--k 10] [--depth 3]
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
import resource
import time
from typing import NamedTuple

import torch
from torch import nn
from transformers import Gemma2ForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.attribution import Node, build_graph, build_replacement, greedy_paths
from c2srepro.attribution.contributions import attribute
from c2srepro.attribution.linearised import run_model
from c2srepro.book.smoke import GEMMA2_2B, gemma2_2b_config
from c2srepro.transcoder import Transcoder, TranscoderConfig


class Preset(NamedTuple):
    layers: int
    hidden: int
    heads: int
    intermediate: int
    arch: str = "gpt_neox"  # transformers' model_type
    kv_heads: int | None = None  # Gemma-2: key/value heads shared by the query heads
    head_dim: int | None = None


PRESETS = {
    "410m": Preset(24, 1024, 16, 4096),
    "small": Preset(6, 128, 4, 512),  # Pythia-14m-shaped
    "gemma2-2b": Preset(GEMMA2_2B["n_layers"], GEMMA2_2B["hidden"], GEMMA2_2B["n_heads"], GEMMA2_2B["intermediate"],
                        "gemma2", GEMMA2_2B["n_kv_heads"], GEMMA2_2B["head_dim"]),
}


def random_model(preset: Preset, layers: int, n_pos: int) -> nn.Module:
    """A random model of ``preset``'s architecture and width with ``layers`` layers, its norms and
    biases perturbed as in a trained model."""
    if preset.arch == "gemma2":
        config = gemma2_2b_config(n_layers=layers, hidden=preset.hidden, intermediate=preset.intermediate,
                                  n_heads=preset.heads, n_kv_heads=preset.kv_heads, head_dim=preset.head_dim,
                                  max_positions=max(GEMMA2_2B["max_positions"], n_pos))
        model = Gemma2ForCausalLM(config).eval()
    else:
        config = GPTNeoXConfig(
            vocab_size=50304, hidden_size=preset.hidden, num_hidden_layers=layers, num_attention_heads=preset.heads,
            intermediate_size=preset.intermediate, rotary_pct=0.25, use_parallel_residual=True,
            max_position_embeddings=max(2048, n_pos),
        )
        model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # nonzero biases and norm gains away from 1, as in a trained model
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # GPT-NeoX's LayerNorm multiplies by its weight, Gemma-2's RMSNorm by (1 + weight)
                param.copy_((0.0 if preset.arch == "gemma2" else 1.0) + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0.0, 0.02)
    return model


def random_transcoders(model: nn.Module, input_ids: torch.Tensor, firing: float) -> list[Transcoder]:
    run = run_model(model, input_ids)
    transcoders = []
    for layer in range(model.config.num_hidden_layers):
        d_model = model.config.hidden_size
        cfg = TranscoderConfig(d_model=d_model, d_transcoder=8 * d_model, layer=layer, model_type=model.config.model_type)
        tc = Transcoder(cfg, seed=layer)
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
    preset = PRESETS[args.preset]
    layers = args.layers or preset.layers
    torch.manual_seed(0)
    heads = f"{preset.heads} heads" + (f" on {preset.kv_heads} kv heads of {preset.head_dim}" if preset.kv_heads else "")
    print(f"preset {args.preset} ({preset.arch}): {layers} of {preset.layers} layers, hidden {preset.hidden}, {heads}, "
          f"intermediate {preset.intermediate}, d_tc {8 * preset.hidden}, {args.n_pos} tokens, {settings}, "
          f"torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    input_ids = torch.randint(2, 50000, (args.n_pos,))
    model = random_model(preset, layers, args.n_pos)
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
    parser.add_argument("--preset", choices=sorted(PRESETS), default="410m", help="410m: Pythia-410m; gemma2-2b: Gemma-2-2B")
    parser.add_argument("--layers", type=int, default=None, help="truncate the model to this many layers")
    parser.add_argument("--n-pos", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--firing", type=float, default=0.008, help="fraction of features firing per token")
    parser.add_argument("--max-feature-nodes", type=int, default=64, help="feature rows of each attribution graph")
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
    search = f"graph ({args.max_feature_nodes} features) + greedy_paths (k={args.k}, depth={args.depth})"

    def circuit_of(node: Node):
        graph = build_graph(rep, node, max_feature_nodes=args.max_feature_nodes)
        return greedy_paths(graph, k=args.k, depth=args.depth).to_networkx()

    graph = timed(f"{search}, feature", lambda: circuit_of(target), results)
    print(f"  circuit: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges, {describe(graph)}")
    logit = rep.logit_node(last, int(rep.run.logits[last].argmax()))
    logit_graph = timed(f"{search}, logit", lambda: circuit_of(logit), results)
    print(f"  circuit: {logit_graph.number_of_nodes()} nodes, {logit_graph.number_of_edges()} edges, "
          f"{describe(logit_graph)}")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  peak resident memory {peak_gib:.2f} GiB")
    extraction = results["build_replacement"] + results[f"{search}, feature"]
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
