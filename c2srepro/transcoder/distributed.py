"""Harvest MLP activations and train transcoders on several processes (GPUs or machines).

1. Processes. ``torchrun`` starts one process (rank) per GPU or CPU worker and describes the
   group in the environment; ``init_distributed`` joins it with the "nccl" backend, one GPU
   per local rank, when CUDA is available, and "gloo" otherwise. torch.distributed carries only
   metadata and barriers; activations travel through the harvest directory, which every rank
   must see (one machine, or a filesystem shared by all machines).
2. Harvest (``harvest_distributed``). Every rank derives what a single-process harvest
   (``harvest_activations(..., directory=...)``) would do: the seeded prompt order, its batches,
   and which batches form which shard (``shard_plan``, from the prompt lengths alone). Rank 0
   creates or checks the manifest (same identity rules) and shares it; each rank checks that it
   holds the same model and prompts as rank 0. Rank r then runs the batches of shards
   r, r + world, r + 2 world, ... and writes those shards atomically. After a barrier rank 0
   lists every shard in the manifest and marks it complete. The directory is the one a
   single-process harvest writes: same shard files, same rows, same order, bit for bit when the
   ranks run the model on the same kind of device as the single process, since every batch is
   padded and run exactly as it is there. Interrupted, it resumes: rank 0 records the plan in
   the manifest and a rerun with that plan skips the shard files that are complete (readable,
   with the planned rows; an atomic write leaves no other kind) and deletes the temporary files
   a killed rank left; a rerun with another plan (another ``shard_mb``) deletes them first.
3. Training (``train_distributed``). Layers are dealt round-robin: rank r trains layers
   r, r + world, ... of the chosen ones (``layers_for_rank``). Each rank reads every row, but
   only of its layers (``CachedActivations(directory, layers=...)``), and runs
   ``train_transcoders`` on them. Everything that shapes a layer's transcoder is independent
   of the other layers: the shuffle order (seeded by the seed and block positions), the
   initialisation (seeded by the seed), the normalisation scalars, Adam, and the per-layer
   resampling generator. So each transcoder equals the one a single-process run on all layers
   gives: bit for bit on CPU (tested: gloo, 2 processes, one thread each). On GPUs (not tested
   here) expect equality up to float rounding only: cuBLAS may choose another batched-matmul
   kernel, with another summation order, for another number of stacked layers, and over a long
   run such rounding differences grow and can change which features get resampled, so the
   transcoders then agree in quality rather than digit by digit. Each rank saves its layers into
   ``output_dir/layer_XX`` (no two ranks write the same folder) and checkpoints into
   ``checkpoint_dir/rank<r>-of-<world>``; a barrier ends the step. Without a harvest directory,
   a streaming source is rebuilt per rank with only its layers: every rank runs the model over
   all prompts (no disk, but each rank pays for the whole forward passes) and gets the rows, in
   the order, of single-process streaming.
4. Command line: ``python -m c2srepro.transcoder.distributed`` under ``torchrun`` runs steps 2
   and 3 (step 2 only with ``--activations``) and writes the gathered training history to
   ``<out>/training_history.csv``. Run again, it resumes both steps.

Running it on GPUs
------------------
Save the prompts once (``write_prompt_file(encoded_prompts, "prompts.json")``), put the
``TrainConfig`` fields in a json file if wanted (``seed`` defaults to ``--seed``; ``d_model``
comes from the model), then on one machine with 8 GPUs::

    torchrun --nproc_per_node=8 -m c2srepro.transcoder.distributed \\
        --model vandijklab/C2S-Pythia-410m-cell-type-prediction --prompts prompts.json \\
        --activations /data/acts --out /data/transcoders --checkpoints /data/checkpoints \\
        --train-config train.json

On several machines, run the same command on each with ``--nnodes=N --node_rank=i
--rdzv-backend=c10d --rdzv-endpoint=HOST:29500`` and every directory on a shared filesystem.
The 24 layers of Pythia-410m on 8 GPUs: each GPU trains 3 layers on the rows of all prompts
(reading only those 3 layers from the shards), an eighth of the training arithmetic each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from c2srepro._cache import atomic_path, write_json_atomic
from c2srepro.transcoder.config import TrainConfig
from c2srepro.transcoder.harvest import (
    DISTRIBUTED_PLAN_KEY,
    MANIFEST_FILENAME,
    ActivationBlock,
    ActivationSource,
    CachedActivations,
    PromptSet,
    StreamingActivations,
    as_prompt_set,
    harvest_identity,
    is_complete_shard,
    shard_filename,
    shard_plan,
    shard_record,
    shard_rows,
    start_manifest,
    write_shard_file,
)
from c2srepro.transcoder.train import TrainingResult, train_transcoders

log = logging.getLogger(__name__)

HISTORY_FILENAME = "training_history.csv"


# --------------------------------------------------------------------------- process group


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the process group ``torchrun`` describes in the environment (step 1) and return this
    process's device. Without torchrun (no WORLD_SIZE), or when a group is already set up,
    nothing is joined."""
    gpu = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if gpu:
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def _from_rank0(compute: Callable[[], Any]) -> Any:
    """``compute()`` on rank 0, its value on every rank; its error, if any, raised on every rank
    (the others would otherwise wait for rank 0 forever)."""
    rank, world = rank_and_world()
    if world == 1:
        return compute()
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            outcome[0] = ("ok", compute())
        except Exception as error:
            dist.broadcast_object_list([("error", f"{type(error).__name__}: {error}")], src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def _check_same_everywhere(value: dict[str, Any], what: str) -> None:
    rank, world = rank_and_world()
    if world == 1:
        return
    values: list[Any] = [None] * world
    dist.all_gather_object(values, value)
    for other, theirs in enumerate(values):
        differs = sorted(key for key in value if theirs.get(key) != values[0].get(key))
        if differs:
            raise ValueError(
                f"rank {other} has different {differs} than rank 0: every rank must load the same {what}"
            )


def layers_for_rank(layers: Sequence[int], rank: int, world: int) -> tuple[int, ...]:
    """Layers ``rank`` trains: every ``world``-th of the sorted ``layers``, from the ``rank``-th."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    return tuple(sorted(set(layers)))[rank::world]


# --------------------------------------------------------------------------- step 2: harvest


def harvest_distributed(
    model: nn.Module,
    prompts,
    *,
    directory: str | Path,
    layers: Sequence[int] | None = None,
    batch_prompts: int = 8,
    dtype: torch.dtype = torch.float32,
    shard_mb: float = 256.0,
    seed: int = 0,
    progress: bool = True,
) -> CachedActivations:
    """The cached harvest ``harvest_activations(model, prompts, directory=directory, ...)``
    writes, with each rank of the process group running the batches of some of its shards
    (step 2). Call it on every rank with the same arguments; in a world of one it is a plain
    cached harvest. Returns the finished harvest on every rank."""
    rank, world = rank_and_world()
    model.eval()
    stream = StreamingActivations(model, prompts, layers=layers, batch_prompts=batch_prompts, dtype=dtype, seed=seed)
    directory = Path(directory)
    rows_per_shard = shard_rows(stream, shard_mb)
    identity = harvest_identity(stream)
    _check_same_everywhere(identity, "model, prompts and harvest settings")
    block_rows = stream.block_rows(0)

    def prepare() -> dict:
        manifest = start_manifest(directory, identity, stream)
        if manifest["complete"]:
            return manifest
        tail = shard_plan(block_rows, rows_per_shard, start=manifest["blocks_done"])
        plan = {"first_shard": len(manifest["shards"]), "blocks": [[r.start, r.stop] for r in tail]}
        if manifest.get(DISTRIBUTED_PLAN_KEY) != plan:
            # Shard files past the listed ones belong to another plan, or to a run that stopped
            # between writing a shard and listing it: none of them may be reused.
            for path in directory.glob("shard_*.safetensors"):
                if int(path.stem.split("_")[1]) >= plan["first_shard"]:
                    path.unlink()
            manifest[DISTRIBUTED_PLAN_KEY] = plan
            write_json_atomic(directory / MANIFEST_FILENAME, manifest)
        return manifest

    manifest = _from_rank0(prepare)
    if not (directory / MANIFEST_FILENAME).is_file():
        raise FileNotFoundError(
            f"rank {rank} does not see the manifest rank 0 wrote in {directory}: put the harvest "
            "directory on a filesystem every rank shares"
        )
    if manifest["complete"]:
        if rank == 0:
            log.info("reusing the finished harvest in %s", directory)
        return CachedActivations(directory)

    plan = manifest[DISTRIBUTED_PLAN_KEY]
    shards = [range(start, stop) for start, stop in plan["blocks"]]
    shard_sizes = [sum(block_rows[i] for i in blocks) for blocks in shards]
    mine = range(rank, len(shards), world)
    chunks = stream.chunks(0)
    bar = tqdm(
        total=sum(shard_sizes[j] for j in mine), unit="tok", desc=f"harvesting MLP activations (rank {rank})",
        disable=not progress or rank != 0,
    )
    with bar:
        for j in mine:
            path = directory / shard_filename(plan["first_shard"] + j)
            if not is_complete_shard(path, shard_sizes[j]):  # a complete file was written by this plan
                write_shard_file(path, ActivationBlock.concat([stream.run_chunk(chunks[i]) for i in shards[j]]))
            bar.update(shard_sizes[j])
    _barrier()

    def finish() -> None:
        names = [shard_filename(plan["first_shard"] + j) for j in range(len(shards))]
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"rank 0 does not see shards {missing[:3]} the other ranks wrote in {directory}: put "
                "the harvest directory on a filesystem every rank shares"
            )
        manifest["shards"] += [{"file": name, "n_rows": rows, **shard_record(directory / name)}
                               for name, rows in zip(names, shard_sizes)]
        manifest["n_rows"] += sum(shard_sizes)
        manifest["blocks_done"] = len(block_rows)
        manifest["complete"] = True
        del manifest[DISTRIBUTED_PLAN_KEY]
        write_json_atomic(directory / MANIFEST_FILENAME, manifest)

    _from_rank0(finish)
    return CachedActivations(directory)


# --------------------------------------------------------------------------- step 3: training


def train_distributed(
    activations: str | Path | ActivationSource,
    train_config: TrainConfig | None = None,
    *,
    output_dir: str | Path,
    steps: int | None = None,
    layers: Sequence[int] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainingResult | None:
    """Train this rank's share of ``layers`` (default: all harvested) on ``activations`` (step 3).

    ``activations``: a harvest directory (each rank reads only its layers from it), a
    ``StreamingActivations`` (rebuilt per rank with only its layers) or any other source.
    ``train_config`` and ``steps`` as in ``train_transcoders``. Call it on every rank with the
    same arguments. Every rank saves its transcoders into
    ``output_dir/layer_XX`` and returns its ``TrainingResult`` (None when there are more
    ranks than layers and this one has none); all ranks return after the last one finished.
    """
    rank, world = rank_and_world()
    if isinstance(activations, (str, Path)):
        activations = CachedActivations(activations)
    chosen = tuple(activations.layers) if layers is None else tuple(sorted(set(layers)))
    missing = sorted(set(chosen) - set(activations.layers))
    if missing or not chosen:
        raise ValueError(f"layers {missing or '[]'} are not among the harvested layers {list(activations.layers)}")
    mine = layers_for_rank(chosen, rank, world)
    result = None
    if mine:
        source, train_layers = _source_of_layers(activations, mine)
        tcfg = train_config or TrainConfig()
        if tcfg.device is None:  # this rank's GPU (init_distributed set it), not every rank on cuda:0
            device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
            tcfg = dataclasses.replace(tcfg, device=device)
        log.info("rank %d of %d trains layers %s", rank, world, list(mine))
        result = train_transcoders(
            source, tcfg, steps=steps, layers=train_layers,
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / f"rank{rank}-of-{world}",
            output_dir=output_dir, replace_output=False, progress=progress and rank == 0,
        )
    _barrier()
    return result


def _source_of_layers(
    source: ActivationSource, layers: tuple[int, ...]
) -> tuple[ActivationSource, tuple[int, ...] | None]:
    """A source holding only ``layers`` where one can be built (same rows and order), else the
    source itself with the layers to pick from it."""
    if isinstance(source, CachedActivations):
        return CachedActivations(source.directory, layers=layers), None
    if isinstance(source, StreamingActivations):
        return StreamingActivations(
            source.model, source.prompts, layers=layers, batch_prompts=source.batch_prompts, dtype=source.dtype,
            seed=source.seed,
        ), None
    return source, layers


# --------------------------------------------------------------------------- step 4: command line


def write_prompt_file(prompts, path: str | Path) -> Path:
    """Save the token ids and source cells of ``prompts`` (``EncodedPrompts`` or token-id lists)
    as the json file ``--prompts`` reads."""
    prompt_set = as_prompt_set(prompts)
    return write_json_atomic(path, {"input_ids": prompt_set.input_ids, "cell_index": prompt_set.cell_index})


def read_prompt_file(path: str | Path) -> PromptSet:
    data = json.loads(Path(path).read_text())
    if isinstance(data, list):
        return as_prompt_set(data)
    if not isinstance(data, dict) or "input_ids" not in data:
        raise ValueError(
            f"{path} holds no prompts: expected a list of token-id lists or an object with "
            "'input_ids' (and optionally 'cell_index'), as write_prompt_file writes"
        )
    return as_prompt_set(SimpleNamespace(input_ids=data["input_ids"], cell_index=data.get("cell_index")))


def _read_json_object(path: str | None, what: str) -> dict[str, Any]:
    if path is None:
        return {}
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a json object of {what} fields")
    return data


def _load_model(source: str, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    local = Path(source).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=local or os.environ.get("HF_HUB_OFFLINE") == "1", dtype=torch.float32
        )
    except OSError as error:
        raise FileNotFoundError(
            f"no model found for {source!r}: give a directory written by save_pretrained or a Hugging "
            f"Face id that is in the local cache; underlying error: {str(error).splitlines()[0]}"
        ) from error
    return model.to(device).eval()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N -m c2srepro.transcoder.distributed",
        description="Harvest MLP activations and train one transcoder per layer on several processes.",
    )
    parser.add_argument("--model", required=True, help="model directory (save_pretrained) or Hugging Face id")
    parser.add_argument("--prompts", required=True, help="json file written by write_prompt_file")
    parser.add_argument("--out", required=True, help="directory for the transcoders (layer_XX)")
    parser.add_argument("--activations", help="harvest directory (shared by all ranks); without it each rank streams")
    parser.add_argument("--checkpoints", help="checkpoint directory: a rerun resumes from it")
    parser.add_argument("--layers", type=int, nargs="+", help="layers to harvest and train (default: all)")
    parser.add_argument("--batch-prompts", type=int, default=8)
    parser.add_argument("--shard-mb", type=float, default=256.0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="precision of the stored activations")
    parser.add_argument("--seed", type=int, default=0,
                        help="harvest seed; the transcoders' too unless the train config sets one")
    parser.add_argument("--train-config", help="json file of TrainConfig fields (d_model comes from the model)")
    parser.add_argument("--steps", type=int, help="training steps (default: the train config's training_tokens)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Steps 2 and 3 for the command line; run under ``torchrun`` (or alone, as one process)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    joins = not (dist.is_available() and dist.is_initialized())
    device = init_distributed()
    try:
        _run(args, device)
    finally:
        if joins and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, device: torch.device) -> None:
    rank, world = rank_and_world()
    train_config = TrainConfig.from_dict({"seed": args.seed} | _read_json_object(args.train_config, "TrainConfig"))
    progress = not args.no_progress
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    prompts = read_prompt_file(args.prompts)
    model = _load_model(args.model, device)
    options = dict(
        layers=args.layers, batch_prompts=args.batch_prompts, dtype=getattr(torch, args.dtype), seed=args.seed
    )
    if args.activations is not None:
        source = harvest_distributed(model, prompts, directory=args.activations, shard_mb=args.shard_mb,
                                     progress=progress, **options)
    else:
        source = StreamingActivations(model, prompts, **options)
    result = train_distributed(source, train_config, output_dir=args.out, steps=args.steps,
                               checkpoint_dir=args.checkpoints, progress=progress)
    history = result.history if result is not None else None
    histories = [history]
    if world > 1:
        histories = [None] * world
        dist.all_gather_object(histories, history)
    if rank == 0:
        frames = [frame for frame in histories if frame is not None and len(frame)]
        if frames:
            table = pd.concat(frames).sort_values(["step", "layer"], kind="stable")
            with atomic_path(Path(args.out) / HISTORY_FILENAME) as tmp:
                table.to_csv(tmp, index=False)
        log.info("transcoders saved in %s, training history in %s", args.out, HISTORY_FILENAME)


if __name__ == "__main__":
    main()
