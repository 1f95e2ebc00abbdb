"""Resuming after kill -9: the wall time a resumed run takes beside a run from scratch.

For the mini-C2S training and the transcoder training, with their default checkpoint settings
(a checkpoint after every tenth of the steps, and every 5 minutes), side by side in one run:
1. scratch: the whole run in a fresh folder, in a child process.
2. killed: the same run in another fresh folder; this process sends it SIGKILL as soon as its
   checkpoint holds half the steps or more (it polls the checkpoint file, so the kill lands at
   an arbitrary moment after that checkpoint, as a user's kill -9 would).
3. resumed: the run again in the killed run's folder, to the end.
Each figure is a child's wall time seen from here, start-up (imports, data) included, which the
resumed run pays again, and its CPU time (user + system, which other load on the machine moves
less). Reported: the seconds of each, resumed / scratch, the seconds a resumed run saves, the
step it resumed from and whether its weights are byte-identical to scratch's.

The mini-C2S is the default configuration (``--epochs`` shortens it); the transcoders are
chapter 2's default settings (4 layers of hidden size 128, expansion 8, 512 tokens per batch,
300k tokens: 586 steps) on random activations of that shape (the step time does not depend on
the values).

    python bench/bench_resume.py [--runs mini transcoder] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TRANSCODER_SETTINGS = dict(expansion_factor=8, l1_coefficient=1.12e-3, lr=3e-3, tokens_per_batch=512,
                           training_tokens=300_000, resample_every_steps=100, seed=0)


def child(what: str, work: Path, epochs: int) -> None:
    """One run of ``what`` in ``work`` (resuming whatever checkpoint is there)."""
    if what == "mini":
        from c2srepro.models.mini_c2s import MiniC2SConfig, train_mini_c2s

        train_mini_c2s(MiniC2SConfig(epochs=epochs), directory=work / "model")
    else:
        from c2srepro.transcoder import TensorActivations, TrainConfig, train_transcoders

        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 40_000, 128, generator=g)
        y = torch.nn.functional.gelu(x @ torch.randn(128, 512, generator=g) / 11) @ torch.randn(512, 128, generator=g) / 22
        train_transcoders(TensorActivations(x, y), TrainConfig(**TRANSCODER_SETTINGS),
                          checkpoint_dir=work / "checkpoint", output_dir=work / "transcoders", progress=False)


def checkpoint_file(what: str, work: Path) -> Path:
    from c2srepro.models.mini_c2s import checkpoint_path
    from c2srepro.transcoder.train import CHECKPOINT_FILENAME

    return checkpoint_path(work / "model") if what == "mini" else work / "checkpoint" / CHECKPOINT_FILENAME


def checkpoint_step(what: str, path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["loop"]["step"] if what == "mini" else state["step"])


def total_steps(what: str, epochs: int) -> int:
    if what == "mini":
        import math

        from c2srepro.models.mini_c2s import MiniC2SConfig, pbmc_split

        cfg = MiniC2SConfig(epochs=epochs)
        return math.ceil(len(pbmc_split(cfg).train) / cfg.batch_size) * epochs
    from c2srepro.transcoder import TrainConfig

    return TrainConfig(**TRANSCODER_SETTINGS).total_steps


def start(what: str, work: Path, epochs: int) -> subprocess.Popen:
    command = [sys.executable, __file__, "--child", what, str(work), "--epochs", str(epochs)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of the children waited for so far
    return usage.ru_utime + usage.ru_stime


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{process.args} failed:\n{stderr[-3000:]}")


def kill_after_half(what: str, work: Path, epochs: int, total: int) -> float:
    """Start a run, SIGKILL it once its checkpoint holds >= half the steps; its seconds."""
    path, seen = checkpoint_file(what, work), None
    started = time.perf_counter()
    process = start(what, work, epochs)
    while process.poll() is None:
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        if stamp is not None and stamp != seen:
            seen = stamp
            if checkpoint_step(what, path) >= total / 2:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return time.perf_counter() - started
        time.sleep(0.05)
    raise RuntimeError(f"the {what} run ended (code {process.returncode}) before a checkpoint at half its steps")


def result_bytes(what: str, work: Path) -> dict[str, bytes]:
    folder = work / ("model" if what == "mini" else "transcoders")
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def measure(what: str, epochs: int) -> dict:
    total = total_steps(what, epochs)
    with tempfile.TemporaryDirectory() as scratch_dir, tempfile.TemporaryDirectory() as resumed_dir:
        scratch, resumed = Path(scratch_dir), Path(resumed_dir)
        started, cpu = time.perf_counter(), children_cpu()
        finish(start(what, scratch, epochs))
        scratch_seconds, scratch_cpu = time.perf_counter() - started, children_cpu() - cpu
        killed_seconds = kill_after_half(what, resumed, epochs, total)
        step = checkpoint_step(what, checkpoint_file(what, resumed))  # a later one may have landed before the kill
        started, cpu = time.perf_counter(), children_cpu()
        finish(start(what, resumed, epochs))
        resumed_seconds, resumed_cpu = time.perf_counter() - started, children_cpu() - cpu
        identical = result_bytes(what, scratch) == result_bytes(what, resumed)
    return {
        "total_steps": total,
        "killed_after_seconds": round(killed_seconds, 1),
        "resumed_from_step": step,
        "scratch_seconds": round(scratch_seconds, 1),
        "resumed_seconds": round(resumed_seconds, 1),
        "resumed_over_scratch": round(resumed_seconds / scratch_seconds, 3),
        "seconds_saved": round(scratch_seconds - resumed_seconds, 1),
        "scratch_cpu_seconds": round(scratch_cpu, 1),
        "resumed_cpu_seconds": round(resumed_cpu, 1),
        "resumed_over_scratch_cpu": round(resumed_cpu / scratch_cpu, 3),
        "byte_identical": identical,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", choices=["mini", "transcoder"], default=["mini", "transcoder"])
    parser.add_argument("--epochs", type=int, default=24, help="mini-C2S epochs (default: the default config's 24)")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.epochs)
        return
    figures = {what: measure(what, args.epochs) for what in args.runs}
    figures["torch_threads"] = torch.get_num_threads()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
