"""A training or harvest run that SIGKILLs itself at a known point (shared helper, not a test).

    python tests/_resume_child.py {mini,transcoder,harvest,all} WORK [--kill-after-step N]
        [--kill-in-save N]

``--kill-after-step N``: killed as the process's step N + 1 begins (N steps done here). ``--kill-in-save
N``: killed inside the process's N-th checkpoint or shard write, after its temporary file is
written and before it is moved into place. ``all`` runs the three, uninterrupted. Runs on one
thread with INFO logging on stderr; the checkpoint settings are the defaults, so what is tested
is what a user gets.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import torch

TINY_MINI = dict(n_layers=1, d_model=32, n_heads=2, epochs=2, top_k=16, batch_size=32)  # 18 steps an epoch


def dies_on_call(function, call: int):
    """``function``, except that its ``call``-th call kills the process first."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    return wrapper


def dies_after_call(function, call: int):
    """``function``, except that the process is killed as its ``call``-th call returns."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        out = function(*args, **kwargs)
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    return wrapper


def transcoder_source():
    from c2srepro.transcoder import TensorActivations

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3000, 16, generator=g)
    y = torch.relu(x @ torch.randn(16, 24, generator=g)) @ torch.randn(24, 16, generator=g)
    return TensorActivations(x, y)


TRANSCODER_CONFIG = dict(expansion_factor=2, lr=2e-3, tokens_per_batch=64, training_tokens=64 * 40, buffer_tokens=512,
                         log_every_steps=4, resample_every_steps=6)  # 40 steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["mini", "transcoder", "harvest", "all"])
    parser.add_argument("work", type=Path)
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-in-save", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")

    for what in ("mini", "transcoder", "harvest") if args.what == "all" else (args.what,):
        RUNS[what](args.work, kill_after_step=args.kill_after_step, kill_in_save=args.kill_in_save)


def mini(work: Path, *, kill_after_step: int | None, kill_in_save: int | None) -> None:
    import c2srepro.models.mini_c2s as mini_c2s

    if kill_after_step is not None:
        mini_c2s.weighted_lm_loss = dies_on_call(mini_c2s.weighted_lm_loss, kill_after_step + 1)
    if kill_in_save is not None:
        torch.save = dies_after_call(torch.save, kill_in_save)
    mini_c2s.train_mini_c2s(mini_c2s.MiniC2SConfig(**TINY_MINI), directory=work / "model")


def transcoder(work: Path, *, kill_after_step: int | None, kill_in_save: int | None) -> None:
    from c2srepro.transcoder import TrainConfig, train_transcoders
    from c2srepro.transcoder import train as train_module

    if kill_after_step is not None:
        trainer = train_module._Trainer
        trainer.train_step = dies_on_call(trainer.train_step, kill_after_step + 1)
    if kill_in_save is not None:
        torch.save = dies_after_call(torch.save, kill_in_save)
    train_transcoders(transcoder_source(), TrainConfig(**TRANSCODER_CONFIG), checkpoint_dir=work / "checkpoint",
                      output_dir=work / "transcoders", progress=False)


def harvest(work: Path, *, kill_after_step: int | None, kill_in_save: int | None) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _tc_models import random_prompts, small_model

    import c2srepro.transcoder.harvest as harvest_module

    if kill_in_save is not None:
        harvest_module.save_file = dies_after_call(harvest_module.save_file, kill_in_save)
    harvest_module.harvest_activations(small_model(), random_prompts(40), directory=work / "activations",
                                       batch_prompts=4, shard_mb=0.05, progress=False)


RUNS = {"mini": mini, "transcoder": transcoder, "harvest": harvest}

if __name__ == "__main__":
    main()
