"""kill -9 and rerun: training and harvest resume with their default settings, end byte-identical
to an uninterrupted run (same thread count), and leave no temporary files behind.

Each run is a child process (``_resume_child.py``) that SIGKILLs itself at a known step, or
inside a checkpoint write; the rerun must say where it resumed, and what it writes must equal,
byte for byte, what a run never interrupted writes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from c2srepro._checkpoint import CheckpointClock
from c2srepro.models.mini_c2s import (
    TRAINING_META_FILENAME,
    MiniC2SConfig,
    _key_material,
    _LoopState,
    _save_checkpoint,
    checkpoint_path,
    train_mini_c2s,
)
from c2srepro.transcoder import TensorActivations, TrainConfig, train_transcoders
from c2srepro.transcoder.harvest import MANIFEST_FILENAME
from c2srepro.transcoder.train import CHECKPOINT_FILENAME

CHILD = Path(__file__).with_name("_resume_child.py")


def run_child(what: str, work: Path, *flags: str, killed: bool = False) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(CHILD), what, str(work), *flags], env=env, capture_output=True,
                          text=True, timeout=600)
    expected = -signal.SIGKILL if killed else 0
    assert done.returncode == expected, done.stderr[-3000:]
    return done.stderr


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path (hidden ones too: none may be left)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """What each child writes when nothing stops it."""
    work = tmp_path_factory.mktemp("uninterrupted")
    run_child("all", work)
    return work


def test_mini_c2s_resumes_after_kills_and_trains_the_same_weights(uninterrupted, tmp_path):
    # 36 steps; by default a checkpoint after every tenth of the run: steps 4, 8, 12, ...
    model, checkpoint = tmp_path / "model", checkpoint_path(tmp_path / "model")
    run_child("mini", tmp_path, "--kill-in-save", "2", killed=True)  # writing the step-8 checkpoint
    assert checkpoint.is_file() and not model.exists()
    assert hidden(tmp_path), "the killed checkpoint write leaves its temporary file"
    log = run_child("mini", tmp_path, "--kill-after-step", "6", killed=True)  # at step 10
    assert "resuming mini-C2S training at step 4 of 36" in log and hidden(tmp_path) == []
    log = run_child("mini", tmp_path)
    assert "resuming mini-C2S training at step 8 of 36" in log
    assert json.loads((model / TRAINING_META_FILENAME).read_text())["resumed_at_steps"] == [4, 8]
    assert not checkpoint.exists() and hidden(tmp_path) == []
    reference = uninterrupted / "model"
    for name in ("model.safetensors", "vocab_map.json", "config.json"):
        assert (model / name).read_bytes() == (reference / name).read_bytes(), name
    history = lambda folder: json.loads((folder / TRAINING_META_FILENAME).read_text())["history"]  # noqa: E731
    assert history(model) == history(reference)


def test_transcoder_training_resumes_after_kills_with_default_settings(uninterrupted, tmp_path):
    # 40 steps; by default a checkpoint after every tenth of the run: steps 4, 8, 12, ...
    checkpoint = tmp_path / "checkpoint" / CHECKPOINT_FILENAME
    run_child("transcoder", tmp_path, "--kill-in-save", "3", killed=True)  # writing the step-12 checkpoint
    assert checkpoint.is_file() and hidden(tmp_path) and not (tmp_path / "transcoders").exists()
    log = run_child("transcoder", tmp_path, "--kill-after-step", "10", killed=True)  # at step 18
    assert "resuming transcoder training at step 8 of 40" in log and hidden(tmp_path) == []
    log = run_child("transcoder", tmp_path)
    assert "resuming transcoder training at step 16 of 40" in log
    assert hidden(tmp_path) == []
    assert files(tmp_path / "transcoders") == files(uninterrupted / "transcoders")
    assert torch.load(checkpoint, weights_only=True)["step"] == 40


def test_harvest_removes_what_a_killed_run_left_and_resumes(uninterrupted, tmp_path):
    run_child("harvest", tmp_path, "--kill-in-save", "4", killed=True)
    activations = tmp_path / "activations"
    leftovers = hidden(activations)
    assert len(leftovers) == 1 and re.fullmatch(r"\.shard_00003\.safetensors\..+\.tmp", leftovers[0])
    (activations / "shard_00005.safetensors").touch()  # an empty shard no manifest lists
    log = run_child("harvest", tmp_path)
    assert "removed" in log and "resuming the harvest" in log and "(3 complete shards)" in log
    assert hidden(activations) == []
    assert json.loads((activations / MANIFEST_FILENAME).read_text())["complete"]
    assert files(activations) == files(uninterrupted / "activations")


def test_checkpoint_rules():
    fraction = CheckpointClock(40, every_fraction=0.1, every_seconds=None)
    assert [step for step in range(1, 41) if fraction.due(step)] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    both = CheckpointClock(40, every_fraction=0.5, every_seconds=None, every_steps=15, stop=33)
    assert [step for step in range(1, 34) if both.due(step)] == [15, 20, 30, 33]
    timed = CheckpointClock(40, every_fraction=None, every_seconds=1e-9)
    assert timed.due(1) and timed.due(2)
    assert not CheckpointClock(1000, every_fraction=0.1, every_seconds=3600).due(1)
    short = CheckpointClock(3, every_fraction=0.1, every_seconds=3600)  # a tenth of 3 steps rounds to none
    assert [step for step in range(1, 4) if short.due(step)] == [3]
    every = CheckpointClock(6, every_fraction=0.1, every_seconds=None)  # 0.6 of a step rounds to every step
    assert [step for step in range(1, 7) if every.due(step)] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match=r"checkpoint_every_fraction must lie in \(0, 1\] or be None, got 0"):
        TrainConfig(checkpoint_every_fraction=0)
    with pytest.raises(ValueError, match="checkpoint_every_seconds must be > 0 or None"):
        TrainConfig(checkpoint_every_seconds=-1.0)
    with pytest.raises(ValueError, match="checkpoint_every_steps must be an integer >= 1 or None"):
        TrainConfig(checkpoint_every_steps=0)


def test_checkpoint_settings_do_not_change_the_transcoders(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2000, 8, generator=g)
    source = TensorActivations(x, torch.relu(x) * 0.5)
    tcfg = TrainConfig(expansion_factor=2, tokens_per_batch=64, training_tokens=64 * 12, buffer_tokens=256,
                       resample_every_steps=5)
    plain = train_transcoders(source, tcfg, progress=False).transcoders[0]
    often = TrainConfig(**{**tcfg.to_dict(), "checkpoint_every_steps": 1, "checkpoint_every_seconds": 1e-9})
    checkpointed = train_transcoders(source, often, checkpoint_dir=tmp_path, progress=False).transcoders[0]
    for name, param in plain.named_parameters():
        assert torch.equal(param, getattr(checkpointed, name)), name


def test_a_mini_c2s_checkpoint_of_other_settings_or_unreadable_is_refused(tmp_path):
    cfg = MiniC2SConfig(n_layers=1, d_model=32, n_heads=2, epochs=1, top_k=16, batch_size=32)
    checkpoint = checkpoint_path(tmp_path / "model")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    _save_checkpoint(checkpoint, cfg, model, optimizer, scheduler, _LoopState(history=[], losses=[], step=3))
    state = torch.load(checkpoint, weights_only=True)
    assert state["key_material"] == _key_material(cfg)
    state["key_material"]["torch_threads"] += 1
    state["key_material"]["config"]["lr"] = 1.0
    torch.save(state, checkpoint)
    with pytest.raises(ValueError, match=r"written with different \['torch_threads', 'config.lr'\]: train with the "
                                         r"same settings \(and thread count\) to resume, or delete it"):
        train_mini_c2s(cfg, directory=tmp_path / "model")
    checkpoint.write_bytes(b"not a checkpoint")
    unreadable = r"model.checkpoint.pt cannot be read \(UnpicklingError; damaged or not a checkpoint\): delete it"
    with pytest.raises(ValueError, match=unreadable):
        train_mini_c2s(cfg, directory=tmp_path / "model")
