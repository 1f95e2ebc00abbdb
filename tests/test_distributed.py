"""Distributed harvest and training (2 gloo processes on CPU) against the single-process run."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _tc_models import encoded, random_prompts, small_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import c2srepro.transcoder.distributed as distributed
from c2srepro.transcoder import (
    CachedActivations,
    TrainConfig,
    harvest_activations,
    load_transcoders,
    train_transcoders,
)
from c2srepro.transcoder.harvest import DISTRIBUTED_PLAN_KEY, MANIFEST_FILENAME
from c2srepro.transcoder.train import CHECKPOINT_FILENAME

WORLD = 2
BATCH_PROMPTS = 4
SHARD_MB = 0.05  # a few hundred rows per shard: 6 shards for 24 prompts and 3 layers
# Resampling every 4 steps, so that the per-layer resampling generators matter; device given so
# that the saved training configs compare equal as well.
TRAINING = {"expansion_factor": 2, "lr": 2e-3, "tokens_per_batch": 64, "training_tokens": 64 * 16, "seed": 5,
            "buffer_tokens": 256, "log_every_steps": 4, "resample_every_steps": 4, "resample_until_fraction": 1.0,
            "checkpoint_every_steps": 5, "device": "cpu"}


def _worker(rank: int, store: str, runs: list[list[str]], failing: list[tuple[list[str], bool]],
            other_prompts: str, report_dir: str) -> None:
    """One rank: the process group on a file store (no network), then the command line's main."""
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    written: list[str] = []
    real_write = distributed.write_shard_file
    distributed.write_shard_file = lambda path, block: (written.append(path.name), real_write(path, block))
    errors = []
    try:
        for argv in runs:
            distributed.main(argv)
        for argv, rank1_other_prompts in failing:
            if rank == 1 and rank1_other_prompts:
                argv = [other_prompts if a.endswith("prompts.json") else a for a in argv]
            try:
                distributed.main(argv)
            except Exception as error:  # recorded for the test to check on both ranks
                errors.append(f"{type(error).__name__}: {error}")
    finally:
        Path(report_dir, f"rank{rank}.json").write_text(json.dumps({"written": written, "errors": errors}))
        dist.destroy_process_group()


def sorted_rows(block) -> dict[str, torch.Tensor]:
    order = torch.argsort(block.prompt_index * 10_000 + block.position)
    rows = {name: getattr(block, name)[order] for name in ("prompt_index", "position", "cell_index", "token_id")}
    rows.update({name: getattr(block, name)[:, order] for name in ("mlp_in", "mlp_out")})
    return rows


def assert_same_transcoders(a, b) -> None:
    assert sorted(a) == sorted(b)
    for layer in a:
        assert a[layer].cfg == b[layer].cfg and a[layer].train_config == b[layer].train_config
        for name, param in a[layer].named_parameters():
            assert torch.equal(param, getattr(b[layer], name)), (layer, name)


def test_two_gloo_processes_equal_the_single_process_run(tmp_path, caplog):
    model = small_model(n_layers=3)  # 3 layers on 2 ranks: rank 0 trains layers 0 and 2, rank 1 layer 1
    model.save_pretrained(tmp_path / "model")
    prompts = encoded(random_prompts(24))
    distributed.write_prompt_file(prompts, tmp_path / "prompts.json")
    distributed.write_prompt_file(random_prompts(24, seed=7), tmp_path / "other_prompts.json")
    (tmp_path / "train.json").write_text(json.dumps(TRAINING))
    common = ["--model", str(tmp_path / "model"), "--prompts", str(tmp_path / "prompts.json"),
              "--batch-prompts", str(BATCH_PROMPTS), "--shard-mb", str(SHARD_MB),
              "--train-config", str(tmp_path / "train.json"), "--no-progress"]
    runs = [
        common + ["--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "out"),
                  "--checkpoints", str(tmp_path / "ckpt")],
        common + ["--out", str(tmp_path / "out_streamed")],  # no harvest directory: every rank streams
    ]
    failing = [
        (common + ["--activations", str(tmp_path / "acts_mismatch"), "--out", str(tmp_path / "x")], True),
        (common + ["--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "x"), "--seed", "3"], False),
    ]
    mp.spawn(_worker, args=(str(tmp_path / "store"), runs, failing, str(tmp_path / "other_prompts.json"),
                            str(tmp_path)), nprocs=WORLD, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    # The real entry point: torchrun on loopback, reusing the finished harvest.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
                f"--master_port={port}", "-m", "c2srepro.transcoder.distributed"]
    argv = common + ["--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "out_torchrun")]
    launched = subprocess.run(torchrun + argv, env=env, capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).parent.parent)
    assert launched.returncode == 0, launched.stderr[-3000:]
    # The model as the workers loaded it (the harvest manifest fingerprints the saved config too).
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same matmul kernels, so equality can be exact
    try:
        reference_acts = harvest_activations(model, prompts, directory=tmp_path / "ref", batch_prompts=BATCH_PROMPTS,
                                             shard_mb=SHARD_MB, progress=False)
        with caplog.at_level(logging.INFO, logger="c2srepro.transcoder.train"):
            reference = train_transcoders(reference_acts, TrainConfig(**TRAINING), progress=False)
        streamed = train_transcoders(harvest_activations(model, prompts, batch_prompts=BATCH_PROMPTS),
                                     TrainConfig(**TRAINING), progress=False)
    finally:
        torch.set_num_threads(threads)
    resampled_layers = {r.getMessage().split()[1] for r in caplog.records if "resampled" in r.getMessage()}
    assert len(resampled_layers) >= 2  # the resampling generators were used in more than one layer

    # Harvest: rank r wrote shards r, r + 2, ...; together the directory a single process writes.
    manifest = json.loads((tmp_path / "acts" / MANIFEST_FILENAME).read_text())
    names = [shard["file"] for shard in manifest["shards"]]
    assert len(names) >= 4 and DISTRIBUTED_PLAN_KEY not in manifest
    assert [reports[r]["written"] for r in range(WORLD)] == [names[0::2], names[1::2]]
    assert manifest == reference_acts.manifest
    for name in names:
        mine, theirs = load_file(str(tmp_path / "acts" / name)), load_file(str(tmp_path / "ref" / name))
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs), name
    rows, reference_rows = sorted_rows(CachedActivations(tmp_path / "acts").read_all()), sorted_rows(reference_acts.read_all())
    assert len(rows["position"]) == sum(map(len, prompts.input_ids))
    pairs = set(zip(rows["prompt_index"].tolist(), rows["position"].tolist()))
    assert len(pairs) == len(rows["position"])  # every (prompt, position) once
    for name, values in reference_rows.items():
        assert torch.equal(rows[name], values), name

    # Training: every layer bit for bit, cached and streamed; each rank checkpointed its layers.
    assert_same_transcoders(load_transcoders(tmp_path / "out"), reference.transcoders)
    assert_same_transcoders(load_transcoders(tmp_path / "out_streamed"), streamed.transcoders)
    assert_same_transcoders(load_transcoders(tmp_path / "out_torchrun"), reference.transcoders)
    assert "reusing the finished harvest" in launched.stderr
    for rank, layers in ((0, [0, 2]), (1, [1])):
        state = torch.load(tmp_path / "ckpt" / f"rank{rank}-of-{WORLD}" / CHECKPOINT_FILENAME, weights_only=True)
        assert state["layers"] == layers and state["step"] == 16
    history = pd.read_csv(tmp_path / "out" / distributed.HISTORY_FILENAME)
    expected = reference.history.sort_values(["step", "layer"], kind="stable")
    assert history[["step", "layer"]].values.tolist() == expected[["step", "layer"]].values.tolist()
    np.testing.assert_allclose(history["fvu"], expected["fvu"], rtol=1e-12)

    # Metadata checks fail on both ranks at once, with the reason.
    errors0, errors1 = reports[0]["errors"], reports[1]["errors"]
    assert len(errors0) == len(errors1) == 2
    for errors in (errors0, errors1):
        assert errors[0].startswith("ValueError: rank 1 has different ['prompts_fingerprint']")
    assert errors0[1].startswith("ValueError: ") and "different ['seed']" in errors0[1]
    assert errors1[1].startswith("RuntimeError: rank 0 failed: ValueError") and "different ['seed']" in errors1[1]


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def prompts():
    return encoded(random_prompts(14))


def _shards(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(str(path)) for path in sorted(directory.glob("shard_*.safetensors"))}


def _assert_same_harvest(a: Path, b: Path) -> None:
    manifest_a, manifest_b = (json.loads((d / MANIFEST_FILENAME).read_text()) for d in (a, b))
    assert manifest_a == manifest_b
    shards_a, shards_b = _shards(a), _shards(b)
    assert sorted(shards_a) == sorted(shards_b)
    for name in shards_a:
        assert all(torch.equal(shards_a[name][key], shards_b[name][key]) for key in shards_b[name]), name


def test_interrupted_harvest_resumes_and_other_plans_start_afresh(model, prompts, tmp_path, monkeypatch):
    # In a world of one the distributed harvest is a plain cached harvest, resumable shard by shard.
    harvest_activations(model, prompts, directory=tmp_path / "ref", batch_prompts=2, shard_mb=0.03, progress=False)
    real_write = distributed.write_shard_file
    written = []

    def failing_write(path, block):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")
        written.append(path.name)
        real_write(path, block)

    monkeypatch.setattr(distributed, "write_shard_file", failing_write)
    options = dict(batch_prompts=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        distributed.harvest_distributed(model, prompts, directory=tmp_path / "acts", shard_mb=0.03, **options)
    manifest = json.loads((tmp_path / "acts" / MANIFEST_FILENAME).read_text())
    assert not manifest["complete"] and manifest[DISTRIBUTED_PLAN_KEY]["first_shard"] == 0
    monkeypatch.setattr(distributed, "write_shard_file", lambda path, block: written.append(path.name) or real_write(path, block))
    written.clear()
    distributed.harvest_distributed(model, prompts, directory=tmp_path / "acts", shard_mb=0.03, **options)
    n_shards = len(_shards(tmp_path / "ref"))
    assert n_shards > 3 and len(written) == n_shards - 2  # only the missing shards ran
    _assert_same_harvest(tmp_path / "acts", tmp_path / "ref")

    # Interrupted with one shard size, rerun with another: the old files are not reused.
    written.clear()
    monkeypatch.setattr(distributed, "write_shard_file", failing_write)
    with pytest.raises(KeyboardInterrupt):
        distributed.harvest_distributed(model, prompts, directory=tmp_path / "other", shard_mb=0.03, **options)
    monkeypatch.setattr(distributed, "write_shard_file", real_write)
    distributed.harvest_distributed(model, prompts, directory=tmp_path / "other", shard_mb=0.1, **options)
    harvest_activations(model, prompts, directory=tmp_path / "ref_big", batch_prompts=2, shard_mb=0.1, progress=False)
    _assert_same_harvest(tmp_path / "other", tmp_path / "ref_big")

    # A single-process harvest finishes an interrupted distributed one.
    written.clear()
    monkeypatch.setattr(distributed, "write_shard_file", failing_write)
    with pytest.raises(KeyboardInterrupt):
        distributed.harvest_distributed(model, prompts, directory=tmp_path / "mixed", shard_mb=0.03, **options)
    harvest_activations(model, prompts, directory=tmp_path / "mixed", batch_prompts=2, shard_mb=0.03, progress=False)
    _assert_same_harvest(tmp_path / "mixed", tmp_path / "ref")


def test_cached_activations_read_a_subset_of_layers(model, prompts, tmp_path):
    full = harvest_activations(model, prompts, directory=tmp_path, batch_prompts=4, shard_mb=0.05, progress=False)
    part = CachedActivations(tmp_path, layers=[1])
    assert part.layers == (1,) and part.n_rows == full.n_rows and part.n_blocks() == full.n_blocks() > 1
    a, b = part.read_all(), full.read_all()
    assert torch.equal(a.mlp_in[0], b.mlp_in[1]) and torch.equal(a.mlp_out[0], b.mlp_out[1])
    assert torch.equal(a.position, b.position) and torch.equal(a.token_id, b.token_id)
    with pytest.raises(ValueError, match=r"layers \[4\] are not in the harvest .* holds layers \[0, 1\]"):
        CachedActivations(tmp_path, layers=[1, 4])


def test_layers_for_rank_and_single_process_training(model, prompts, tmp_path):
    assert [distributed.layers_for_rank(range(5), r, 2) for r in range(2)] == [(0, 2, 4), (1, 3)]
    assert distributed.layers_for_rank([3, 1], 2, 3) == ()
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        distributed.layers_for_rank([0, 1], 2, 2)
    assert distributed.rank_and_world() == (0, 1)
    source = harvest_activations(model, prompts, directory=tmp_path / "acts", batch_prompts=4, progress=False)
    tcfg = TrainConfig(expansion_factor=2, tokens_per_batch=64, buffer_tokens=128, resample_every_steps=0)
    with pytest.raises(ValueError, match=r"layers \[7\] are not among the harvested layers"):
        distributed.train_distributed(tmp_path / "acts", tcfg, output_dir=tmp_path / "out", layers=[7])
    result = distributed.train_distributed(tmp_path / "acts", tcfg, steps=3, output_dir=tmp_path / "out", layers=[1],
                                           progress=False)
    assert result.step == 3 and result.transcoders[1].cfg.d_model == 64
    reference = train_transcoders(source, dataclasses.replace(tcfg, device="cpu"), steps=3, progress=False)
    assert list(result.transcoders) == [1]
    assert_same_transcoders(load_transcoders(tmp_path / "out"), {1: reference.transcoders[1]})


def test_prompt_files(tmp_path):
    prompts = encoded(random_prompts(3))
    distributed.write_prompt_file(prompts, tmp_path / "p.json")
    read = distributed.read_prompt_file(tmp_path / "p.json")
    assert read.input_ids == prompts.input_ids and read.cell_index == prompts.cell_index
    (tmp_path / "list.json").write_text(json.dumps([[1, 2], [3]]))
    assert distributed.read_prompt_file(tmp_path / "list.json").cell_index == [-1, -1]
    (tmp_path / "bad.json").write_text(json.dumps({"ids": [[1]]}))
    with pytest.raises(ValueError, match="holds no prompts: expected a list of token-id lists"):
        distributed.read_prompt_file(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps({"input_ids": [[1], []]}))
    with pytest.raises(ValueError, match="have no tokens"):
        distributed.read_prompt_file(tmp_path / "empty.json")
