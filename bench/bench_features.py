"""Throughput of the feature-statistics pass, dense vs sparse (feature, gene) sums, beside the
bare forward pass it rides on.

1. A random Pythia-shaped model (``--d-model``, ``--layers``), random transcoders with
   ``--expansion`` x d_model features whose encoder bias makes about ``--firing`` of them fire
   per token (a trained transcoder is sparse), and ``--prompts`` synthetic cell sentences of
   ``--genes-per-prompt`` genes (1-3 tokens each) drawn from ``--n-genes`` symbols.
2. Timed side by side in one run: the forward pass alone (same batches), the statistics with
   dense (feature, gene) sums, and with the sparse COO path (``dense_pairs_limit=0``).
3. The two statistics must agree exactly on counts; the script exits 1 otherwise.

Usage: python bench/bench_features.py [--prompts 200] [--d-model 128] [--layers 4]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.features import collect_feature_stats
from c2srepro.data.prompts import EncodedPrompts
from c2srepro.transcoder import Transcoder, TranscoderConfig


def synthetic_prompts(n: int, genes_per_prompt: int, n_genes: int, vocab: int, seed: int) -> EncodedPrompts:
    rng = np.random.default_rng(seed)
    pieces = [rng.integers(20, vocab, size=rng.integers(1, 4)).tolist() for _ in range(n_genes)]
    head = rng.integers(0, 20, size=30).tolist()
    encoded = EncodedPrompts()
    for cell in range(n):
        ids, genes = list(head), [None] * len(head)
        for g in rng.choice(n_genes, size=genes_per_prompt, replace=False).tolist():
            ids += pieces[g]
            genes += [f"GENE{g}"] * len(pieces[g])
        answer_start = len(ids) + 8
        ids += rng.integers(0, 20, size=11).tolist()
        genes += [None] * 11
        encoded.input_ids.append(ids)
        encoded.answer_start.append(answer_start)
        encoded.cell_index.append(cell)
        encoded.gene_of_token.append(genes)
        encoded.labels.append(None)
        encoded.texts.append("")
    return encoded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--genes-per-prompt", type=int, default=64)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--firing", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(args.seed)

    vocab = 1000
    config = GPTNeoXConfig(
        vocab_size=vocab, hidden_size=args.d_model, num_hidden_layers=args.layers, num_attention_heads=4,
        intermediate_size=4 * args.d_model, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=512,
    )
    model = GPTNeoXForCausalLM(config).eval()
    prompts = synthetic_prompts(args.prompts, args.genes_per_prompt, args.n_genes, vocab, args.seed)
    probe = torch.tensor([prompts.input_ids[0]])
    record = {}
    hooks = [
        block.post_attention_layernorm.register_forward_hook(lambda m, a, out, layer=layer: record.__setitem__(layer, out[0]))
        for layer, block in enumerate(model.gpt_neox.layers)
    ]
    with torch.no_grad():
        model(input_ids=probe)
    for hook in hooks:
        hook.remove()
    transcoders = []
    for layer in range(args.layers):
        tc = Transcoder(TranscoderConfig(d_model=args.d_model, d_transcoder=args.expansion * args.d_model, layer=layer),
                        seed=layer)
        with torch.no_grad():
            pre = record[layer] @ tc.W_enc
            tc.b_enc.copy_(-torch.quantile(pre, 1.0 - args.firing, dim=0))
        transcoders.append(tc)
    n_genes_seen = len({g for genes in prompts.gene_of_token for g in genes if g})
    print(
        f"{args.prompts} prompts, {prompts.n_tokens:,} tokens, {args.layers} layers, d_tc "
        f"{transcoders[0].cfg.d_tc}, {n_genes_seen} genes, target firing {args.firing:.1%}"
    )

    order = sorted(range(len(prompts)), key=lambda i: len(prompts.input_ids[i]))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(order), args.batch_size):
            batch = [prompts.input_ids[j] for j in order[i : i + args.batch_size]]
            width = max(map(len, batch))
            ids = torch.tensor([b + [0] * (width - len(b)) for b in batch])
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    forward = time.perf_counter() - start

    timings, results = {}, {}
    for name, limit in (("dense", 1 << 30), ("sparse", 0)):
        start = time.perf_counter()
        results[name] = collect_feature_stats(
            model, transcoders, prompts, batch_size=args.batch_size, dense_pairs_limit=limit, progress=False
        )
        timings[name] = time.perf_counter() - start
    freq = np.mean([s.features["freq"].mean() for s in results["dense"].values()])
    print(f"measured firing frequency {freq:.2%}")
    print(f"forward pass only : {forward:7.2f} s  {prompts.n_tokens / forward:10,.0f} tokens/s")
    for name, seconds in timings.items():
        print(
            f"statistics, {name:6s}: {seconds:7.2f} s  {prompts.n_tokens / seconds:10,.0f} tokens/s  "
            f"({seconds / forward:.1f}x the forward pass)"
        )
    print(f"sparse / dense time: {timings['sparse'] / timings['dense']:.2f}")
    for layer in results["dense"]:
        a, b = results["dense"][layer], results["sparse"][layer]
        same = (a.features["n_fire"] == b.features["n_fire"]).all() and (
            a.gene_fire_tokens != b.gene_fire_tokens
        ).nnz == 0 and (a.gene_fire_occurrences != b.gene_fire_occurrences).nnz == 0
        if not same:
            print(f"layer {layer}: dense and sparse statistics differ")
            return 1
    print("dense and sparse statistics agree on every count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
