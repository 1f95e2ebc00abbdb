"""Transcoder harvesting and training throughput, beside this machine's dense matmul rate.

For each shape, every figure is measured in one run, side by side:
1. harvest: tokens/s of a streaming harvest of every layer (model forward + hooks + gathering the
   real rows) and of a cached harvest into shards on disk, on a randomly initialised
   ``GPTNeoXForCausalLM`` of that shape and random prompts of ~270 tokens (a C2S prompt's length).
2. train: seconds per training step of all layers at once (time in the step loop of a run of K
   steps minus that of a run of 1 step, so set-up and the first step are excluded), tokens/s.
3. matmul: the five dense products of one step (forward x@W_enc and z@W_dec; backward g@W_dec^T,
   z^T@g and x^T@g_pre), with the step's shapes batched over layers, timed alone. Their FLOP
   count (10 * tokens * d_model * d_tc * layers) over their time is the attainable dense rate;
   ``fraction_of_matmul_rate`` = matmul time / step time (1 = the step costs only its matmuls).
4. peak memory: each phase runs in its own process; ``peak_rss_mb`` is its peak resident set.

Shapes: ``mini`` = the embedded mini-C2S (hidden 128, 4 layers, expansion 8, 2048 tokens per
batch) and ``410m`` = Pythia-410m / C2S-Pythia-410m (hidden 1024, 24 layers, 16 heads, MLP 4096,
rotary 25%, vocab 50304, expansion 8; on CPU with 256 tokens per batch so a step fits in memory
and minutes, GPUs take the paper's 2048).

    python bench/bench_transcoder.py [--shapes mini 410m] [--steps K]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SHAPES = {
    "mini": dict(layers=4, d_model=128, heads=4, vocab=1300, n_prompts=48, batch_prompts=8, tokens_per_batch=2048),
    "410m": dict(layers=24, d_model=1024, heads=16, vocab=50304, n_prompts=8, batch_prompts=4, tokens_per_batch=256),
}
PROMPT_TOKENS = 270
EXPANSION = 8


def build_model(shape: dict):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=shape["vocab"], hidden_size=shape["d_model"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], intermediate_size=4 * shape["d_model"], rotary_pct=0.25,
        use_parallel_residual=True, max_position_embeddings=2048,
    )
    return GPTNeoXForCausalLM(config).eval()


def prompts(shape: dict) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, shape["vocab"], (PROMPT_TOKENS,), generator=g).tolist() for _ in range(shape["n_prompts"])]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def phase_harvest(shape: dict) -> dict:
    from c2srepro.transcoder import harvest_activations

    model = build_model(shape)
    data = prompts(shape)
    n_tokens = sum(map(len, data))
    started = time.perf_counter()
    rows = harvest_activations(model, data, batch_prompts=shape["batch_prompts"], progress=False).read_all()
    streaming = time.perf_counter() - started
    assert len(rows) == n_tokens
    del rows
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        harvest_activations(model, data, batch_prompts=shape["batch_prompts"], directory=folder, progress=False)
        cached = time.perf_counter() - started
    return {
        "harvest_tokens": n_tokens,
        "harvest_streaming_tokens_per_s": round(n_tokens / streaming, 1),
        "harvest_cached_tokens_per_s": round(n_tokens / cached, 1),
        "harvest_peak_rss_mb": round(peak_rss_mb()),
    }


def phase_train(shape: dict, steps: int) -> dict:
    from c2srepro.transcoder import TensorActivations, TrainConfig, TranscoderConfig, train_transcoders

    n_layers, d_model, batch = shape["layers"], shape["d_model"], shape["tokens_per_batch"]
    rows = 4 * batch
    g = torch.Generator().manual_seed(0)
    source = TensorActivations(torch.randn(n_layers, rows, d_model, generator=g),
                               torch.randn(n_layers, rows, d_model, generator=g))
    cfg = TranscoderConfig(d_model=d_model, expansion_factor=EXPANSION, tokens_per_batch=batch,
                           training_tokens=batch * steps)
    tcfg = TrainConfig(buffer_tokens=rows, log_every_steps=steps, resample_every_steps=0, device="cpu")
    # Matmuls timed before and after the training runs, so that both see the same machine load.
    matmul = [matmul_step_seconds(n_layers, batch, d_model, d_model * EXPANSION)]
    timings = {}
    for k in (1, steps):
        timings[k] = train_transcoders(source, cfg, train_config=tcfg, max_steps=k, progress=False).loop_seconds
    matmul.append(matmul_step_seconds(n_layers, batch, d_model, d_model * EXPANSION))
    step_seconds = (timings[steps] - timings[1]) / (steps - 1)
    matmul_seconds = statistics.mean(matmul)
    flops = 10 * batch * d_model * d_model * EXPANSION * n_layers
    return {
        "tokens_per_batch": batch,
        "train_step_s": round(step_seconds, 4),
        "train_tokens_per_s": round(batch / step_seconds, 1),
        "matmul_only_step_s": round(matmul_seconds, 4),
        "matmul_gflops": round(flops / matmul_seconds / 1e9, 1),
        "train_gflops": round(flops / step_seconds / 1e9, 1),
        "fraction_of_matmul_rate": round(matmul_seconds / step_seconds, 3),
        "train_peak_rss_mb": round(peak_rss_mb()),
    }


def matmul_step_seconds(n_layers: int, batch: int, d_model: int, d_tc: int, repeats: int = 3) -> float:
    """Median time of the five products of one step, batched over layers (step 3)."""
    x = torch.randn(n_layers, batch, d_model)
    w_enc, w_dec = torch.randn(n_layers, d_model, d_tc), torch.randn(n_layers, d_tc, d_model)
    z, g = torch.randn(n_layers, batch, d_tc), torch.randn(n_layers, batch, d_model)

    def once() -> None:
        torch.bmm(x, w_enc)  # forward: pre-activations
        torch.bmm(z, w_dec)  # forward: reconstruction
        torch.bmm(g, w_dec.transpose(1, 2))  # backward: gradient of z
        torch.bmm(z.transpose(1, 2), g)  # backward: gradient of W_dec
        torch.bmm(x.transpose(1, 2), z)  # backward: gradient of W_enc

    once()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_phase(name: str, shape: str, steps: int) -> dict:
    """Each phase in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--phase", name, "--shapes", shape, "--steps", str(steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=6, help="training steps timed per shape (>= 2)")
    parser.add_argument("--phase", choices=["harvest", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if args.phase:
        shape = SHAPES[args.shapes[0]]
        result = phase_harvest(shape) if args.phase == "harvest" else phase_train(shape, args.steps)
        print(json.dumps(result))
        return
    figures = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "expansion_factor": EXPANSION}
    for shape in args.shapes:
        spec = SHAPES[shape]
        figures[shape] = {"layers": spec["layers"], "d_model": spec["d_model"]}
        figures[shape].update(run_phase("harvest", shape, args.steps))
        figures[shape].update(run_phase("train", shape, args.steps))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
