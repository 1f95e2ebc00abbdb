"""Harvest the input and output of every MLP of a causal LM, cached on disk or streamed.

Hook points (of :class:`c2srepro.models.hooked.HookedModel`; ``{l}`` is the layer index; where
they sit in the architecture is written into the manifest):

    blocks.{l}.hook_mlp_in   [batch, pos, d_model]  x, the MLP input (GPT-NeoX: post_attention_layernorm
                                                     output; Gemma-2: pre_feedforward_layernorm output)
    blocks.{l}.hook_mlp_out  [batch, pos, d_model]  what the MLP adds to the residual stream (GPT-NeoX:
                                                     MLP(x); Gemma-2: post_feedforward_layernorm(MLP(x)))

1. Prompts are put in a seeded random order, so that any contiguous stretch of them (a shard, a
   buffer) mixes cells of all kinds, and cut into batches of ``batch_prompts`` prompts.
2. Each batch is right-padded with an attention mask. Right padding keeps every real token at
   the position ids it has when run alone, and causal attention never lets a real token see
   the padding after it.
3. One forward pass per batch records both points of every chosen layer and stops after the
   deepest one (nothing later is needed); the padded positions are dropped, leaving rows in
   prompt-major order. Each row keeps the prompt it came from, its position, the source cell
   and the token id.
4. Cached mode (``harvest_activations(..., directory=...)``): rows gather into shards of about ``shard_mb``
   megabytes, each a run of consecutive batches. Which batches go into which shard follows
   from the prompt lengths alone (``shard_plan``), so it is known before the model runs and
   several processes can write different shards of one harvest
   (``c2srepro.transcoder.distributed``). Each shard is written atomically (safetensors),
   then the json manifest is rewritten atomically, so an interrupted harvest resumes after its
   last complete shard and a finished one is reused by any later call with the same model,
   prompts and settings. The manifest records each shard's size and sha256; a reader checks the
   size on every read and the sha256 on a process's first read of the shard. On a later call what
   an interrupted one left half-written (its temporary files, shard files the manifest does not
   list) is deleted first.
5. Streaming mode (``harvest_activations(...)`` without a directory): nothing is stored; the model runs on
   a batch of prompts when a consumer asks for that block of rows.
6. Both modes are an ``ActivationSource``: per epoch, a deterministic sequence of blocks with
   random access. ``ShuffleBuffer`` turns it into shuffled training batches: it fills itself
   with consecutive blocks up to ``buffer_tokens`` rows, permutes them with a generator seeded
   by (seed, epoch, first block), hands out whole batches, and refills when drained (the
   remainder smaller than a batch is dropped). Its position is three integers, so a resumed
   run rebuilds the same buffer from the source, bit for bit, without storing the buffer.
   Memory is one buffer (``buffer_tokens * n_layers * 2 * d_model`` values) whatever the token
   count. The two modes hold the same rows per epoch, but in blocks of different sizes (shards
   vs prompt batches), so their buffers, and hence the trained weights, differ slightly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from c2srepro._cache import CorruptFileError, atomic_path, remove_temporaries, sha256_file, write_json_atomic
from c2srepro.data.prompts import pad_right, require_encoded_prompts
from c2srepro.models.hooked import TRANSCODER_HOOK_POINT, HookedModel, as_hooked, hook_name

log = logging.getLogger(__name__)

MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT = "c2srepro-mlp-activations/1"
HOOK_POINT = TRANSCODER_HOOK_POINT  # where a transcoder trained on these rows reads (blocks.{layer}.hook_mlp_in)
_ROW_FIELDS = ("prompt_index", "position", "cell_index", "token_id")


# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptSet:
    """Token ids of the prompts with, per prompt, its source cell (-1 when unknown)."""

    input_ids: list[list[int]]
    cell_index: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def fingerprint(self) -> str:
        material = json.dumps([self.input_ids, self.cell_index], separators=(",", ":"))
        return hashlib.sha256(material.encode()).hexdigest()


def as_prompt_set(prompts) -> PromptSet:
    """``EncodedPrompts`` (any object with ``input_ids`` and ``cell_index``) or lists of token ids."""
    require_encoded_prompts(prompts, where="prompts")
    if isinstance(prompts, PromptSet):
        return prompts
    if hasattr(prompts, "input_ids"):
        input_ids = [list(map(int, ids)) for ids in prompts.input_ids]
        cells = [int(c) for c in getattr(prompts, "cell_index", None) or [-1] * len(input_ids)]
    else:
        input_ids = [list(map(int, ids)) for ids in prompts]
        cells = [-1] * len(input_ids)
    if not input_ids:
        raise ValueError("no prompts given: pass EncodedPrompts or a non-empty list of token-id lists")
    if len(cells) != len(input_ids):
        raise ValueError(f"{len(input_ids)} prompts but {len(cells)} cell indices")
    empty = [i for i, ids in enumerate(input_ids) if not ids]
    if empty:
        raise ValueError(f"prompts {empty[:5]} have no tokens: drop them before harvesting")
    return PromptSet(input_ids, cells)


def derived_seed(*keys: int) -> int:
    """A 63-bit generator seed determined by the integer ``keys`` alone."""
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def seeded_permutation(n: int, *keys: int) -> Tensor:
    """A permutation of range(n) determined by the integer ``keys`` alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(*keys)))


# --------------------------------------------------------------------------- blocks of rows


@dataclass
class ActivationBlock:
    """Rows of MLP activations for all harvested layers, with where each row came from."""

    mlp_in: Float[Tensor, "layer row d_model"]
    mlp_out: Float[Tensor, "layer row d_model"]
    prompt_index: Int[Tensor, " row"]
    position: Int[Tensor, " row"]
    cell_index: Int[Tensor, " row"]
    token_id: Int[Tensor, " row"]

    def __len__(self) -> int:
        return self.mlp_in.shape[1]

    @classmethod
    def concat(cls, blocks: Sequence["ActivationBlock"]) -> "ActivationBlock":
        return cls(
            torch.cat([b.mlp_in for b in blocks], dim=1),
            torch.cat([b.mlp_out for b in blocks], dim=1),
            *(torch.cat([getattr(b, name) for b in blocks]) for name in _ROW_FIELDS),
        )

    def tensors(self) -> dict[str, Tensor]:
        out = {"mlp_in": self.mlp_in, "mlp_out": self.mlp_out}
        out.update({name: getattr(self, name) for name in _ROW_FIELDS})
        return {name: t.contiguous() for name, t in out.items()}


def harvest_batch(
    model: nn.Module | HookedModel,
    prompts: PromptSet,
    indices: Sequence[int],
    layers: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ActivationBlock:
    """Run the prompts ``indices`` as one padded batch; their MLP rows (steps 2-3), in ``dtype`` on
    ``device``: the host for a harvest (its shards and shuffle buffer live there), the device of
    the transcoders that read them at once (``c2srepro.features.anndata``). The row indices
    (prompt, position, cell, token) stay on the host."""
    hooked = as_hooked(model)
    ids, mask = pad_right([prompts.input_ids[i] for i in indices])
    names = {layer: (hook_name(layer, "hook_mlp_in"), hook_name(layer, "hook_mlp_out")) for layer in layers}
    cache = hooked.cache(ids, [name for pair in names.values() for name in pair], attention_mask=mask)
    keep = mask.bool()  # [batch, pos]; boolean indexing keeps prompt-major order
    on_model = keep.to(hooked.device)
    mlp_in = torch.stack([cache[names[layer][0]][on_model] for layer in layers]).to(device, dtype)  # [L, row, d]
    mlp_out = torch.stack([cache[names[layer][1]][on_model] for layer in layers]).to(device, dtype)  # [L, row, d]
    index = torch.as_tensor(list(indices), dtype=torch.long)
    cells = torch.as_tensor([prompts.cell_index[i] for i in indices], dtype=torch.long)
    position = torch.arange(ids.shape[1]).expand_as(ids)
    return ActivationBlock(
        mlp_in,
        mlp_out,
        index.unsqueeze(1).expand_as(ids)[keep],
        position[keep],
        cells.unsqueeze(1).expand_as(ids)[keep],
        ids[keep],
    )


class ActivationSource(ABC):
    """Per epoch, a deterministic sequence of ``ActivationBlock``s with random access."""

    layers: tuple[int, ...]
    d_model: int

    @property
    @abstractmethod
    def n_rows(self) -> int:
        """Rows (tokens) in one epoch."""

    @abstractmethod
    def n_blocks(self) -> int: ...

    @abstractmethod
    def block(self, epoch: int, index: int) -> ActivationBlock:
        """Block ``index`` of epoch ``epoch``; the same call always gives the same rows."""

    def blocks(self, epoch: int = 0, start: int = 0) -> Iterator[ActivationBlock]:
        for index in range(start, self.n_blocks()):
            yield self.block(epoch, index)

    def read_all(self, *, progress: bool = False) -> ActivationBlock:
        """Every row of epoch 0 in one block (meant for small data: it all sits in memory)."""
        blocks = self.blocks(0)
        if progress:
            blocks = tqdm(blocks, total=self.n_blocks(), desc="reading activations")
        return ActivationBlock.concat(list(blocks))


class TensorActivations(ActivationSource):
    """Rows already in memory, [layer, row, d_model], served in blocks of ``block_rows``."""

    def __init__(
        self,
        mlp_in: Float[Tensor, "layer row d_model"],
        mlp_out: Float[Tensor, "layer row d_model"],
        *,
        layers: Sequence[int] | None = None,
        block_rows: int = 4096,
    ):
        if mlp_in.ndim != 3 or mlp_in.shape != mlp_out.shape:
            raise ValueError(
                f"mlp_in {tuple(mlp_in.shape)} and mlp_out {tuple(mlp_out.shape)} must both be "
                "[layer, row, d_model]; add a leading layer axis for a single layer"
            )
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.layers = tuple(layers) if layers is not None else tuple(range(mlp_in.shape[0]))
        if len(self.layers) != mlp_in.shape[0]:
            raise ValueError(f"{len(self.layers)} layer indices for {mlp_in.shape[0]} layers of rows")
        self.mlp_in, self.mlp_out = mlp_in, mlp_out
        self.d_model = mlp_in.shape[2]
        self.block_rows = block_rows

    @property
    def n_rows(self) -> int:
        return self.mlp_in.shape[1]

    def n_blocks(self) -> int:
        return math.ceil(self.n_rows / self.block_rows)

    def block(self, epoch: int, index: int) -> ActivationBlock:
        rows = torch.arange(index * self.block_rows, min(self.n_rows, (index + 1) * self.block_rows))
        unknown = torch.full_like(rows, -1)
        return ActivationBlock(self.mlp_in[:, rows], self.mlp_out[:, rows], unknown, rows, unknown, unknown)


class StreamingActivations(ActivationSource):
    """Block i of epoch e = the model run on batch i of that epoch's seeded prompt order."""

    def __init__(
        self,
        model: nn.Module | HookedModel,
        prompts,
        *,
        layers: Sequence[int] | None = None,
        batch_prompts: int = 8,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        if batch_prompts < 1:
            raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
        self.hooked = as_hooked(model)
        self.model = self.hooked.model
        self.prompts = as_prompt_set(prompts)
        self.layers = self.hooked.check_layers(layers)
        self.d_model = self.hooked.d_model
        lengths = [len(ids) for ids in self.prompts.input_ids]
        context = self.hooked.adapter.max_positions
        if lengths and max(lengths) > context:
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            raise ValueError(
                f"prompt {longest} has {lengths[longest]} tokens but the model's context (max_position_embeddings) "
                f"is {context}; shorten the prompts (e.g. fewer genes: a smaller top_k)"
            )
        self.batch_prompts, self.dtype, self.seed = batch_prompts, dtype, seed

    @property
    def n_rows(self) -> int:
        return self.prompts.n_tokens

    def n_blocks(self) -> int:
        return math.ceil(len(self.prompts) / self.batch_prompts)

    def prompt_order(self, epoch: int) -> list[int]:
        return seeded_permutation(len(self.prompts), self.seed, epoch).tolist()

    def chunks(self, epoch: int) -> list[list[int]]:
        """The prompt indices of each block of ``epoch``."""
        order = self.prompt_order(epoch)
        return [order[start : start + self.batch_prompts] for start in range(0, len(order), self.batch_prompts)]

    def block_rows(self, epoch: int) -> list[int]:
        """Rows (tokens) of each block of ``epoch``, known without running the model."""
        return [sum(len(self.prompts.input_ids[i]) for i in chunk) for chunk in self.chunks(epoch)]

    def run_chunk(self, chunk: Sequence[int]) -> ActivationBlock:
        return harvest_batch(self.hooked, self.prompts, chunk, self.layers, dtype=self.dtype)

    def block(self, epoch: int, index: int) -> ActivationBlock:
        return self.run_chunk(self.chunks(epoch)[index])

    def blocks(self, epoch: int = 0, start: int = 0) -> Iterator[ActivationBlock]:
        chunks = self.chunks(epoch)  # computed once per pass, not once per block
        for index in range(start, self.n_blocks()):
            yield self.run_chunk(chunks[index])


class CachedActivations(ActivationSource):
    """A finished harvest directory: shards of rows plus ``manifest.json``.

    ``layers`` (default: all harvested) reads only those layers' rows from each shard, so a
    process that trains some layers reads and holds only their share of the data.
    """

    def __init__(self, directory: str | Path, *, layers: Sequence[int] | None = None):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILENAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: harvest into {self.directory} first")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{manifest_path} is not a {MANIFEST_FORMAT} manifest")
        if not self.manifest["complete"]:
            raise ValueError(
                f"the harvest in {self.directory} is incomplete: call harvest_activations() with this "
                "directory again to finish it"
            )
        harvested = tuple(self.manifest["layers"])
        self.layers = harvested if layers is None else tuple(sorted({int(layer) for layer in layers}))
        missing = sorted(set(self.layers) - set(harvested))
        if missing or not self.layers:
            raise ValueError(
                f"layers {missing or '[]'} are not in the harvest in {self.directory}, which holds "
                f"layers {list(harvested)}"
            )
        # Rows of the stored [layer, row, d_model] tensors to read; None reads them whole.
        self._stored = None if self.layers == harvested else [harvested.index(layer) for layer in self.layers]
        self.d_model = int(self.manifest["d_model"])
        self.seed = int(self.manifest["seed"])
        self._verified: set[str] = set()

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def n_blocks(self) -> int:
        return len(self.manifest["shards"])

    def shard_order(self, epoch: int) -> list[int]:
        # Epoch 0 reads shards in harvest order (already a seeded prompt order); later epochs
        # re-order the shards so that buffers pair different shards.
        if epoch == 0:
            return list(range(self.n_blocks()))
        return seeded_permutation(self.n_blocks(), self.seed, epoch).tolist()

    def block(self, epoch: int, index: int) -> ActivationBlock:
        shard = self.manifest["shards"][self.shard_order(epoch)[index]]
        self._check_shard(shard)
        path = str(self.directory / shard["file"])
        if self._stored is None:
            return ActivationBlock(**load_file(path))
        with safe_open(path, framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in _ROW_FIELDS}
            for name in ("mlp_in", "mlp_out"):
                stored = f.get_slice(name)  # reads only the requested layers from the file
                tensors[name] = torch.stack([stored[i] for i in self._stored])
        return ActivationBlock(**tensors)

    def _check_shard(self, shard: dict) -> None:
        if "sha256" not in shard:  # a harvest written before checksums were recorded
            return
        path = self.directory / shard["file"]
        size = path.stat().st_size if path.is_file() else None
        damaged = size != shard["bytes"] or (shard["file"] not in self._verified and sha256_file(path) != shard["sha256"])
        if damaged:
            raise CorruptFileError(
                f"{path} is damaged ({size} bytes, the manifest records {shard['bytes']} and its sha256): delete "
                f"{self.directory} and harvest again"
            )
        self._verified.add(shard["file"])


# --------------------------------------------------------------------------- harvesting


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the config and of every parameter's sum and sum of squares (cheap, and
    different for any retrained or re-initialised model). The sums are taken on the CPU, so a model
    fingerprints alike on any device."""
    # Where the weights were loaded from (``_name_or_path``) does not change what they compute.
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            p = param.detach().cpu().double()
            digest.update(f"{name}{tuple(p.shape)}{p.sum().item():.12e}{p.square().sum().item():.12e}".encode())
    return digest.hexdigest()


def harvest_activations(
    model: nn.Module | HookedModel,
    prompts,
    *,
    layers: Sequence[int] | None = None,
    directory: str | Path | None = None,
    batch_prompts: int = 8,
    dtype: torch.dtype = torch.float32,
    shard_mb: float = 256.0,
    seed: int = 0,
    progress: bool = True,
) -> ActivationSource:
    """MLP inputs and outputs of ``layers`` (default all) on ``prompts``.

    ``prompts``: ``EncodedPrompts`` or a list of token-id lists (cells then unknown, -1).
    With ``directory``: harvest now into shards there (resuming an interrupted harvest, reusing a
    finished one) and return ``CachedActivations``. Without: return ``StreamingActivations``,
    which runs the model only when its blocks are read. ``dtype`` is the stored precision.
    """
    stream = StreamingActivations(model, prompts, layers=layers, batch_prompts=batch_prompts, dtype=dtype, seed=seed)
    stream.model.eval()
    if directory is None:
        return stream
    directory = Path(directory)
    rows_per_shard = shard_rows(stream, shard_mb)
    manifest = start_manifest(directory, harvest_identity(stream), stream)
    if manifest["complete"]:
        log.info("reusing the finished harvest in %s", directory)
        return CachedActivations(directory)
    if manifest.pop(DISTRIBUTED_PLAN_KEY, None) is not None:
        # Files an interrupted distributed harvest left past the listed shards are rewritten
        # here, perhaps with other boundaries: a later distributed run must not trust them.
        write_json_atomic(directory / MANIFEST_FILENAME, manifest)
    remove_unlisted_shards(directory, manifest)
    if manifest["shards"]:
        log.info(
            "resuming the harvest in %s after %d of %d prompt batches (%d complete shards)",
            directory, manifest["blocks_done"], stream.n_blocks(), len(manifest["shards"]),
        )

    chunks = stream.chunks(0)
    plan = shard_plan(stream.block_rows(0), rows_per_shard, start=manifest["blocks_done"])
    bar = tqdm(
        total=stream.n_rows, initial=manifest["n_rows"], unit="tok", desc="harvesting MLP activations",
        disable=not progress,
    )
    with bar:
        for blocks in plan:
            pending = []
            for index in blocks:
                pending.append(stream.run_chunk(chunks[index]))
                bar.update(len(pending[-1]))
            _write_shard(directory, manifest, ActivationBlock.concat(pending), blocks_done=blocks.stop)
    manifest["complete"] = True
    write_json_atomic(directory / MANIFEST_FILENAME, manifest)
    return CachedActivations(directory)


DISTRIBUTED_PLAN_KEY = "distributed_plan"


def harvest_identity(stream: StreamingActivations) -> dict:
    """What a harvest directory must agree on to be resumed or reused."""
    return {
        "format": MANIFEST_FORMAT,
        "model_fingerprint": model_fingerprint(stream.model),
        "prompts_fingerprint": stream.prompts.fingerprint(),
        "layers": list(stream.layers),
        "d_model": stream.d_model,
        "dtype": str(stream.dtype).removeprefix("torch."),
        "batch_prompts": stream.batch_prompts,
        "seed": stream.seed,
    }


def shard_rows(stream: StreamingActivations, shard_mb: float) -> int:
    """Rows in a shard of about ``shard_mb`` megabytes."""
    if shard_mb <= 0:
        raise ValueError(f"shard_mb must be positive, got {shard_mb}")
    bytes_per_row = len(stream.layers) * 2 * stream.d_model * torch.empty((), dtype=stream.dtype).element_size()
    return max(1, int(shard_mb * 2**20 / bytes_per_row))


def shard_plan(block_rows: Sequence[int], rows_per_shard: int, *, start: int = 0) -> list[range]:
    """Blocks ``start``.. grouped into shards of consecutive blocks: a shard closes as soon as it
    holds ``rows_per_shard`` rows or more, the last one takes what is left (step 4)."""
    plan, first, rows = [], start, 0
    for index in range(start, len(block_rows)):
        rows += block_rows[index]
        if rows >= rows_per_shard or index == len(block_rows) - 1:
            plan.append(range(first, index + 1))
            first, rows = index + 1, 0
    return plan


def start_manifest(directory: Path, identity: dict, stream: StreamingActivations) -> dict:
    """The manifest in ``directory``, created (incomplete, no shards) when there is none;
    ``ValueError`` when it belongs to a harvest with another identity. What a killed harvest
    left half-written (temporary shard and manifest files) is removed first."""
    path = directory / MANIFEST_FILENAME
    for name in ("shard_*.safetensors", MANIFEST_FILENAME):
        for leftover in remove_temporaries(directory, name):
            log.info("removed %s, left by an interrupted harvest", leftover)
    if path.is_file():
        manifest = json.loads(path.read_text())
        differs = sorted(key for key, value in identity.items() if manifest.get(key) != value)
        if differs:
            raise ValueError(
                f"{directory} holds a harvest with different {differs}: use another directory, or "
                "delete this one to harvest afresh"
            )
        return manifest
    manifest = dict(identity)
    manifest.update(
        {
            "model_type": stream.hooked.adapter.model_type,
            "hook_points": {
                name: f"{hook_name('{layer}', point)}: {stream.hooked.adapter.describe(point)} [batch, pos, d_model]"
                for name, point in (("mlp_in", "hook_mlp_in"), ("mlp_out", "hook_mlp_out"))
            },
            "shard_layout": {
                "mlp_in": "[layer, row, d_model]",
                "mlp_out": "[layer, row, d_model]",
                **{name: "[row] int64" for name in _ROW_FIELDS},
            },
            "n_prompts": len(stream.prompts),
            "prompt_order": stream.prompt_order(0),
            "shards": [],
            "n_rows": 0,
            "blocks_done": 0,
            "complete": False,
        }
    )
    write_json_atomic(path, manifest)
    return manifest


def shard_filename(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def remove_unlisted_shards(directory: Path, manifest: dict) -> None:
    """Delete the shard files in ``directory`` that the manifest does not list: a harvest
    stopped before listing them (a single-process harvest writes them again)."""
    listed = {shard["file"] for shard in manifest["shards"]}
    for path in sorted(directory.glob("shard_*.safetensors")):
        if path.name not in listed:
            path.unlink()


def is_complete_shard(path: Path, n_rows: int) -> bool:
    """Whether ``path`` is a readable shard of ``n_rows`` rows."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_slice("token_id").get_shape() == [n_rows]
    except Exception:  # missing, empty or truncated: any of them means "write it again"
        return False


def write_shard_file(path: Path, block: ActivationBlock) -> None:
    with atomic_path(path) as tmp:
        save_file(block.tensors(), str(tmp))


def shard_record(path: Path) -> dict[str, int | str]:
    """What the manifest records of a written shard to check it by: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_shard(directory: Path, manifest: dict, block: ActivationBlock, *, blocks_done: int) -> None:
    name = shard_filename(len(manifest["shards"]))
    write_shard_file(directory / name, block)
    manifest["shards"].append({"file": name, "n_rows": len(block), **shard_record(directory / name)})
    manifest["n_rows"] += len(block)
    manifest["blocks_done"] = blocks_done
    write_json_atomic(directory / MANIFEST_FILENAME, manifest)


# --------------------------------------------------------------------------- shuffling


@dataclass(frozen=True)
class BufferPosition:
    """Where the next batch comes from: the buffer filled from ``block`` of ``epoch`` on, after
    ``batch`` of its batches were handed out."""

    epoch: int = 0
    block: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "block": self.block, "batch": self.batch}


class ShuffleBuffer:
    """Shuffled batches of rows [layer, batch_tokens, d_model] from a source (step 6)."""

    def __init__(
        self,
        source: ActivationSource,
        *,
        batch_tokens: int,
        buffer_tokens: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        position: BufferPosition = BufferPosition(),
    ):
        if batch_tokens < 1 or buffer_tokens < batch_tokens:
            raise ValueError(
                f"need 1 <= batch_tokens ({batch_tokens}) <= buffer_tokens ({buffer_tokens})"
            )
        if source.n_rows < batch_tokens:
            raise ValueError(
                f"the activations hold {source.n_rows} rows, fewer than one batch of {batch_tokens}: "
                "harvest more prompts or lower tokens_per_batch"
            )
        self.source, self.batch_tokens, self.buffer_tokens = source, batch_tokens, buffer_tokens
        self.seed, self.device = seed, torch.device(device)
        self._next = position
        self._filled: BufferPosition | None = None  # (epoch, block) the buffer holds now
        self._end_block = 0
        self._in = self._out = self._order = None

    @property
    def position(self) -> BufferPosition:
        return self._next

    def _fill(self) -> None:
        epoch, start = self._next.epoch, self._next.block
        blocks, rows, index = [], 0, start
        for block in self.source.blocks(epoch, start):
            blocks.append(block)
            rows += len(block)
            index += 1
            if rows >= self.buffer_tokens:
                break
        self._end_block = index
        chunk = ActivationBlock.concat(blocks)
        self._in = chunk.mlp_in.to(self.device, torch.float32)  # [L, rows, d]
        self._out = chunk.mlp_out.to(self.device, torch.float32)  # [L, rows, d]
        self._order = seeded_permutation(rows, self.seed, epoch, start).to(self.device)
        self._filled = BufferPosition(epoch, start)

    def current_rows(self) -> tuple[Float[Tensor, "layer rows d_model"], Float[Tensor, "layer rows d_model"]]:
        """All rows of the buffer the next batch comes from (unshuffled), filling it if needed."""
        if self._filled != BufferPosition(self._next.epoch, self._next.block):
            self._fill()
        return self._in, self._out

    def next_batch(self) -> tuple[Float[Tensor, "layer batch d_model"], Float[Tensor, "layer batch d_model"]]:
        while True:
            here = BufferPosition(self._next.epoch, self._next.block)
            if self._filled != here:
                self._fill()
            n_batches = len(self._order) // self.batch_tokens
            if self._next.batch < n_batches:
                break
            # Drained: the next buffer starts after the blocks this one used (or a new epoch).
            if self._end_block >= self.source.n_blocks():
                self._next = BufferPosition(self._next.epoch + 1, 0, 0)
            else:
                self._next = BufferPosition(self._next.epoch, self._end_block, 0)
        b = self._next.batch
        rows = self._order[b * self.batch_tokens : (b + 1) * self.batch_tokens]
        self._next = BufferPosition(self._next.epoch, self._next.block, b + 1)
        return self._in[:, rows], self._out[:, rows]
