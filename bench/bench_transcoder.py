"""Transcoder harvesting and training throughput, beside this machine's dense matmul rate.

For each shape, every figure is measured in one run, side by side:
1. harvest: tokens/s of a streaming harvest of every layer (model forward + hooks + gathering the
   real rows) and of a cached harvest into shards on disk, on a randomly initialised
   ``GPTNeoXForCausalLM`` of that shape and random prompts of ~270 tokens (a C2S prompt's length).
2. train: seconds per training step of all layers at once (drawing the batch from the shuffle
   buffer, loss, gradients, Adam, decoder renormalisation, metrics), median of K steps after a
   warm-up step, and tokens/s.
3. matmul: the five dense products of one step (forward x@W_enc and z@W_dec; backward g@W_dec^T,
   z^T@g and x^T@g_pre), with the step's shapes batched over layers, into outputs allocated once
   (as the step's buffers are), timed alone, alternating with the training steps so that both
   see the same machine load (medians). Their FLOP count (10 * tokens * d_model * d_tc * layers)
   over their time is the attainable dense rate; ``fraction_of_matmul_rate`` = matmul time /
   step time (1 = the step costs only its matmuls).
4. peak memory: each phase runs in its own process; ``peak_rss_mb`` is its peak resident set.
5. projection: the hours the paper's run (60M tokens, every layer) would take at these rates.
6. variants (``--variants``): step 2 again for each transcoder variant (``relu``, ``topk``,
   ``batchtopk``, ``jumprelu``, each optionally ``+skip``), each against the same five dense
   products of step 3. ReLU and JumpReLU run them dense (JumpReLU adds its threshold gradient's
   passes, skip its two d_model x d_model products); the TopK variants run four of them on their
   kept entries only (``c2srepro.transcoder.sparse_codes``), so their ratio can exceed 1, and pay
   for the top-k selection instead. On random activations ReLU and JumpReLU keep about half the
   features active, as at the start of a real run.

Shapes: ``mini`` = the embedded mini-C2S (hidden 128, 4 layers, expansion 8, 2048 tokens per
batch) and ``410m`` = Pythia-410m / C2S-Pythia-410m (hidden 1024, 24 layers, 16 heads, MLP 4096,
rotary 25%, vocab 50304, expansion 8), trained here with 256 tokens per batch so that a CPU step
takes seconds and 12-13 GB (``bench/throughput/cpu-2core-410m.json``; the paper's 2048 adds about
1.6 GB per [layer, batch, d_tc] tensor).

    python bench/bench_transcoder.py [--shapes mini 410m] [--steps K] [--variants relu topk+skip ...]
        [--device cpu|cuda] [--out bench/throughput/<machine>.json]

``--out`` also writes the figures as JSON with their provenance (command, packages, platform).
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

PAPER_TRAINING_TOKENS = 60_000_000
SHAPES = {
    "mini": dict(layers=4, d_model=128, heads=4, vocab=1300, n_prompts=48, batch_prompts=8, tokens_per_batch=2048),
    "410m": dict(layers=24, d_model=1024, heads=16, vocab=50304, n_prompts=8, batch_prompts=4, tokens_per_batch=256),
}
PROMPT_TOKENS = 270
VARIANTS = [f"{a}{s}" for a in ("relu", "topk", "batchtopk", "jumprelu") for s in ("", "+skip")]
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


def phase_train(shape: dict, steps: int, variant: str = "relu", device: str = "cpu") -> dict:
    from c2srepro.transcoder import ShuffleBuffer, TensorActivations, TrainConfig
    from c2srepro.transcoder.train import _Trainer

    n_layers, d_model, batch = shape["layers"], shape["d_model"], shape["tokens_per_batch"]
    d_tc = d_model * EXPANSION
    rows = 4 * batch
    g = torch.Generator().manual_seed(0)
    source = TensorActivations(torch.randn(n_layers, rows, d_model, generator=g),
                               torch.randn(n_layers, rows, d_model, generator=g))
    activation, _, skip = variant.partition("+")
    tcfg = TrainConfig(expansion_factor=EXPANSION, tokens_per_batch=batch, training_tokens=batch * (steps + 1),
                       buffer_tokens=rows, resample_every_steps=0, device=device, activation=activation,
                       skip=skip == "skip")
    target = torch.device(device)
    trainer = _Trainer(tcfg, tuple(range(n_layers)), d_model=d_model, device=target)
    buffer = ShuffleBuffer(source, batch_tokens=batch, buffer_tokens=rows, device=target)
    trainer.initialise(*buffer.current_rows())
    trainer.train_step(*buffer.next_batch())  # warm-up
    operands = [t.to(target) for t in matmul_operands(n_layers, batch, d_model, d_tc)]
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    step_times, matmul_times = [], []
    for _ in range(steps):  # alternate, so that both see the same machine load
        x, y = buffer.next_batch()
        sync()
        started = time.perf_counter()
        trainer.train_step(x, y)
        sync()
        step_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        matmul_once(*operands)
        sync()
        matmul_times.append(time.perf_counter() - started)
    step_seconds, matmul_seconds = statistics.median(step_times), statistics.median(matmul_times)
    flops = 10 * batch * d_model * d_tc * n_layers
    return {
        "variant": variant,
        "tokens_per_batch": batch,
        "train_step_s": round(step_seconds, 4),
        "train_tokens_per_s": round(batch / step_seconds, 1),
        "matmul_only_step_s": round(matmul_seconds, 4),
        "matmul_gflops": round(flops / matmul_seconds / 1e9, 1),
        "train_gflops": round(flops / step_seconds / 1e9, 1),
        "fraction_of_matmul_rate": round(matmul_seconds / step_seconds, 3),
        "train_peak_rss_mb": round(peak_rss_mb()),
    }


def matmul_operands(n_layers: int, batch: int, d_model: int, d_tc: int) -> tuple[torch.Tensor, ...]:
    x, g = torch.randn(n_layers, batch, d_model), torch.randn(n_layers, batch, d_model)
    w_enc, w_dec = torch.randn(n_layers, d_model, d_tc), torch.randn(n_layers, d_tc, d_model)
    outputs = (torch.empty(n_layers, batch, d_tc), torch.empty(n_layers, batch, d_model),
               torch.empty(n_layers, batch, d_tc), torch.empty(n_layers, d_tc, d_model), torch.empty(n_layers, d_model, d_tc))
    return (x, g, w_enc, w_dec, torch.randn(n_layers, batch, d_tc)) + outputs


def matmul_once(x, g, w_enc, w_dec, z, *out) -> None:
    """The five products of one step, batched over layers (step 3), into outputs allocated once
    (as the training step's are): the rate of the products themselves."""
    torch.bmm(x, w_enc, out=out[0])  # forward: pre-activations
    torch.bmm(z, w_dec, out=out[1])  # forward: reconstruction
    torch.bmm(g, w_dec.transpose(1, 2), out=out[2])  # backward: gradient of z
    torch.bmm(z.transpose(1, 2), g, out=out[3])  # backward: gradient of W_dec
    torch.bmm(x.transpose(1, 2), z, out=out[4])  # backward: gradient of W_enc


def run_phase(name: str, shape: str, steps: int, variant: str = "relu", device: str = "cpu") -> dict:
    """Each phase in a fresh process, so that its peak memory is its own."""
    command = [sys.executable, __file__, "--phase", name, "--shapes", shape, "--steps", str(steps),
               "--variants", variant, "--device", device]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=6, help="training steps timed per shape (>= 2)")
    parser.add_argument("--variants", nargs="+", default=["relu"], choices=VARIANTS,
                        help="training variants to time (step 6); the first also gives the projection")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-harvest", action="store_true", help="time training only")
    parser.add_argument("--out", help="also write the figures here, as JSON with their provenance")
    parser.add_argument("--phase", choices=["harvest", "train"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if args.phase:
        shape = SHAPES[args.shapes[0]]
        result = (phase_harvest(shape) if args.phase == "harvest"
                  else phase_train(shape, args.steps, args.variants[0], args.device))
        print(json.dumps(result))
        return
    figures = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "expansion_factor": EXPANSION}
    for shape in args.shapes:
        spec = SHAPES[shape]
        figures[shape] = {"layers": spec["layers"], "d_model": spec["d_model"]}
        if not args.skip_harvest:
            figures[shape].update(run_phase("harvest", shape, args.steps))
        runs = [run_phase("train", shape, args.steps, variant, args.device) for variant in args.variants]
        figures[shape].update(runs[0])
        if len(runs) > 1:
            figures[shape]["variants"] = {run.pop("variant"): run for run in runs}
        if not args.skip_harvest:
            figures[shape].update(paper_projection(figures[shape]))
    print(json.dumps(figures, indent=2))
    if args.out:
        from c2srepro.book.provenance import write_result

        write_result(args.out, figures, params={"command": " ".join(sys.argv[1:]), "cpu_count": os.cpu_count()})


def paper_projection(measured: dict) -> dict:
    """Hours for the paper's run (60M tokens, every layer trained at once) at the measured rates:
    one streaming harvest of the tokens plus the training steps. The paper's 2048-token batches
    do the same FLOPs per token as the 256 timed here, so tokens/s carries over."""
    tokens = PAPER_TRAINING_TOKENS
    harvest_h = tokens / measured["harvest_streaming_tokens_per_s"] / 3600
    train_h = tokens / measured["train_tokens_per_s"] / 3600
    return {"paper_60M_harvest_hours": round(harvest_h, 1), "paper_60M_train_hours": round(train_h, 1),
            "paper_60M_total_hours": round(harvest_h + train_h, 1)}


if __name__ == "__main__":
    main()
