"""The embedded mini-C2S: a small Pythia-style GPT-NeoX (or Gemma-2) trained here on real PBMC cell sentences.

1. Cell sentences of scanpy's bundled ``pbmc68k_reduced`` (top-K genes of ``.raw``, labels
   ``bulk_labels``), split by cell into training and held-out sets (stratified, seeded).
2. Vocabulary: the real Pythia BPE segmentation, with the embedding table restricted to the BPE
   ids that occur in the prompts, the dataset's gene symbols and the answers (``vocab_map``).
3. Model (``architecture``), at the same width, depth and query heads either way:
   ``"gpt_neox"`` (the default): ``GPTNeoXForCausalLM`` with Pythia's choices: parallel residual,
   rotary on 25% of each head, GELU MLP of 4x width, untied embeddings.
   ``"gemma2"``: ``Gemma2ForCausalLM`` with Gemma-2's choices: RMS norms before and after
   attention and MLP, GeGLU MLP of 4x width (as Gemma-2-2B), rotary on every head dim, half as
   many key/value heads as query heads (grouped-query), attention and final-logit soft-capping
   (50, 30), embeddings scaled by sqrt(d_model) and tied to the unembedding, and layers
   alternating a sliding window of ``GEMMA2_SLIDING_WINDOW`` = 128 tokens (layers 0, 2, ...) with
   full attention. Gemma-2's window (4096) is half its context; 128 is about half of a ~270-token
   prompt, so at the answer position the local layers see the question and the last ~30 genes,
   not the whole sentence: they really are local, as the adapter and attribution must handle.
   Both train through the same loop (step 4); only the builder (``build_model``) differs.
4. Training as C2S is trained: next-token loss over the whole prompt (the cell sentence is
   language to model) plus the answer, whose tokens are weighted ``answer_weight`` times so the
   few answer tokens are not drowned by ~270 sentence tokens. Augmentation: each epoch re-draws
   the shuffle that breaks expression ties, so the model sees each cell in several valid orders.
   AdamW, linear warm-up then cosine decay to 0 (``c2srepro._schedule``).
5. The trained model is cached under a hash of its parameters and inputs, with each file's sha256;
   it is reused while every file matches its checksum, and trained again when one does not.
   ``architecture`` enters the hash only when it is not the default, so GPT-NeoX models trained
   before the field existed keep their cache key.
6. Training checkpoints its whole state (weights, AdamW, schedule, random generators, position
   in the epoch's order) by fraction of the run and by wall time (``c2srepro._checkpoint``);
   a rerun after an interruption resumes there and trains to the same weights, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from c2srepro._cache import (
    CorruptFileError, atomic_directory, atomic_path, cache_dir, record_checksums, remove_temporaries, verify_checksums,
    write_json_atomic,
)
from c2srepro._checkpoint import CheckpointClock
from c2srepro._config import config_from_dict
from c2srepro._schedule import warmup_cosine
from c2srepro.data.datasets import PBMC, CellSplit, labelled_split, load_dataset
from c2srepro.data.prompts import EncodedPrompts, answer_text, encode_prompts, pad_right
from c2srepro.data.tokenizer import PYTHIA_SHA256, CellTokenizer, load_bpe_tokenizer
from c2srepro.models.adapters import adapter_for

log = logging.getLogger(__name__)

ARCHITECTURES = ("gpt_neox", "gemma2")  # transformers' config.model_type of each
GEMMA2_SLIDING_WINDOW = 128  # module docstring, step 3

TRAINING_META_FILENAME = "training.json"
CHECKPOINT_FORMAT = "c2srepro-mini-c2s-training/1"


@dataclass
class MiniC2SConfig:
    """Architecture and training of the mini-C2S (defaults: about 3.5 minutes on 2 idle CPU cores)."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    max_positions: int = 512
    top_k: int = 64
    heldout_fraction: float = 0.2
    epochs: int = 24
    batch_size: int = 16
    lr: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    answer_weight: float = 8.0
    augment_ties: bool = True
    seed: int = 0
    architecture: str = "gpt_neox"  # in ARCHITECTURES (module docstring, step 3)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {', '.join(map(repr, ARCHITECTURES))}, got {self.architecture!r}"
            )
        for name in ("n_layers", "d_model", "n_heads", "max_positions", "top_k", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.architecture == "gemma2" and self.n_heads % 2:
            raise ValueError(
                f"a gemma2 mini-C2S shares each key/value head between two query heads: n_heads must be "
                f"even, got {self.n_heads}"
            )
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must lie in (0, 1), got {self.heldout_fraction}")
        if self.lr <= 0 or self.answer_weight <= 0:
            raise ValueError("lr and answer_weight must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MiniC2SConfig":
        return config_from_dict(cls, data)


def pbmc_split(cfg: MiniC2SConfig, *, seed_offset: int = 0, adata=None) -> CellSplit:
    """PBMC cell sentences (tie shuffle seeded by ``cfg.seed + seed_offset``) and the split."""
    return labelled_split(
        PBMC, top_k=cfg.top_k, heldout_fraction=cfg.heldout_fraction, seed=cfg.seed,
        tie_seed=cfg.seed + seed_offset, adata=adata,
    )


def build_vocabulary(texts: list[str], bpe) -> list[int]:
    """Sorted BPE ids occurring in ``texts``, with end-of-text and padding first."""
    ids = {bpe.eos_token_id, bpe.pad_token_id}
    for encoded in bpe(texts, add_special_tokens=False)["input_ids"]:
        ids.update(encoded)
    special = [bpe.eos_token_id, bpe.pad_token_id]
    return special + sorted(ids - set(special))


def _vocabulary_texts(adata_genes: list[str], split: CellSplit) -> list[str]:
    from c2srepro.data.prompts import build_prompt

    texts = [build_prompt(s, with_answer=True).text for s in split.sentences]
    texts += [" " + gene for gene in adata_genes]
    texts += [answer_text(label) for label in split.labels]
    return texts


def gpt_neox_config(cfg: MiniC2SConfig, vocab_size: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=4 * cfg.d_model,
        hidden_act="gelu",
        rotary_pct=0.25,
        use_parallel_residual=True,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def gemma2_config(cfg: MiniC2SConfig, vocab_size: int):
    from transformers import Gemma2Config

    head_dim = cfg.d_model // cfg.n_heads
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads // 2,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,  # as Gemma-2-2B: scores scaled by head_dim^-1/2
        intermediate_size=4 * cfg.d_model,
        hidden_activation="gelu_pytorch_tanh",
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=GEMMA2_SLIDING_WINDOW,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        # transformers' sdpa kernel has no soft-capping; eager is the exact Gemma-2 forward.
        attn_implementation="eager",
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def build_model(cfg: MiniC2SConfig, vocab_size: int):
    """The untrained mini-C2S of ``cfg.architecture`` (module docstring, step 3), from the torch
    random state as it stands."""
    from transformers import Gemma2ForCausalLM, GPTNeoXForCausalLM

    if cfg.architecture == "gemma2":
        return Gemma2ForCausalLM(gemma2_config(cfg, vocab_size))
    return GPTNeoXForCausalLM(gpt_neox_config(cfg, vocab_size))


def cache_key(cfg: MiniC2SConfig) -> str:
    """16 hex digits naming what decides the trained weights (not how often training checkpoints)."""
    return hashlib.sha256(json.dumps(_key_material(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _key_material(cfg: MiniC2SConfig) -> dict[str, Any]:
    from importlib.metadata import version

    config = cfg.to_dict()
    # Left out at its default: GPT-NeoX models trained before the field existed keep their key.
    if config["architecture"] == MiniC2SConfig.architecture:
        del config["architecture"]
    return {
        "config": config,
        "tokenizer_sha256": PYTHIA_SHA256,
        "dataset": f"scanpy {version('scanpy')} pbmc68k_reduced",
        "torch": str(torch.__version__),
        "transformers": version("transformers"),
        # CPU float reductions are split by the intra-op thread count, so it decides the last bits
        # of every weight (1 and 2 threads train to models that differ by ~1e-8).
        "torch_threads": torch.get_num_threads(),
    }


def weighted_lm_loss(
    logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, answer_start: list[int], answer_weight: float
) -> torch.Tensor:
    """Next-token loss over every real token, answer tokens weighted ``answer_weight``."""
    # logits [batch, pos, vocab]; position t predicts token t+1
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:]
    nll = -log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [batch, pos-1]
    weight = mask[:, 1:].float()
    positions = torch.arange(1, ids.shape[1]).unsqueeze(0)
    is_answer = positions >= torch.tensor(answer_start).unsqueeze(1)
    weight = weight * torch.where(is_answer, answer_weight, 1.0)
    return (nll * weight).sum() / weight.sum()


def train_mini_c2s(
    cfg: MiniC2SConfig | None = None,
    *,
    directory: str | os.PathLike | None = None,
    force: bool = False,
    checkpoint_every_fraction: float | None = 0.1,
    checkpoint_every_seconds: float | None = 300.0,
) -> Path:
    """Train (or reuse) the mini-C2S; return its directory (``save_pretrained`` + vocab map).

    The directory defaults to ``cache_dir("models", "mini-c2s-<hash of cfg and inputs>")``; an
    existing complete model there is reused unless ``force`` or a file differs from the sha256
    recorded with it (then it is trained again). Writes ``training.json`` with the config, the
    split, per-epoch losses and wall time, and ``sha256.json``.

    Training checkpoints into ``<directory>.checkpoint.pt`` (beside the directory) after every
    ``checkpoint_every_fraction`` of its steps and every ``checkpoint_every_seconds`` of wall time
    (``c2srepro._checkpoint``; None turns either off): model, AdamW and schedule state, random
    generators and the position in the data order. A later call resumes from it and gives the
    same weights, bit for bit, as an uninterrupted run; ``force`` starts afresh. The checkpoint
    settings do not change the weights, so they are not part of the cache key. The checkpoint
    is deleted once the model is saved.
    """
    cfg = cfg or MiniC2SConfig()
    directory = Path(directory) if directory else cache_dir("models") / f"mini-c2s-{cache_key(cfg)}"
    if (directory / TRAINING_META_FILENAME).is_file() and not force:
        try:
            if verify_checksums(directory, fix="training it again"):
                log.info("reusing the mini-C2S in %s", directory)
                return directory
            log.warning("the mini-C2S in %s has no recorded checksums (an older cache): training it again", directory)
        except CorruptFileError as error:
            log.warning("%s", error)
    checkpoint = checkpoint_path(directory)
    # A killed run leaves its staging folder and half-written checkpoint behind.
    remove_temporaries(directory.parent, directory.name)
    if force:
        checkpoint.unlink(missing_ok=True)

    torch.manual_seed(cfg.seed)
    adata = load_dataset(PBMC)
    split = pbmc_split(cfg, adata=adata)
    bpe = load_bpe_tokenizer()
    genes = sorted({g.upper() for g in adata.raw.var_names})
    tokenizer = CellTokenizer(bpe, build_vocabulary(_vocabulary_texts(genes, split), bpe))
    model = build_model(cfg, tokenizer.vocab_size)
    adapter = adapter_for(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(split.train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps=total, warmup_steps=warmup)
    )
    order_rng = torch.Generator().manual_seed(cfg.seed)
    loop = _LoopState(history=[], losses=[])
    if checkpoint.is_file():
        loop = _load_checkpoint(checkpoint, cfg, model, optimizer, scheduler, order_rng)
        log.info("resuming mini-C2S training at step %d of %d from %s", loop.step, total, checkpoint)
    clock = CheckpointClock(total, every_fraction=checkpoint_every_fraction, every_seconds=checkpoint_every_seconds)
    started = time.perf_counter() - loop.seconds
    model.train()
    with tqdm(total=total, initial=loop.step, desc="training mini-C2S") as bar:
        for epoch in range(loop.epoch, cfg.epochs):
            epoch_split = pbmc_split(cfg, seed_offset=epoch, adata=adata) if cfg.augment_ties and epoch else split
            prompts = encode_prompts([epoch_split.sentences[i] for i in split.train], tokenizer, with_answer=True)
            _check_length(prompts, cfg.max_positions)
            # The order generator as this epoch starts: a checkpoint keeps it to redraw the order.
            loop.order_state = order_rng.get_state()
            order = torch.randperm(len(prompts), generator=order_rng).tolist()
            for start in range(loop.batch * cfg.batch_size, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                ids, mask = pad_right([prompts.input_ids[i] for i in batch], pad_id=tokenizer.pad_id)
                # The mask the architecture's forward takes for a right-padded batch (Gemma-2: none, as
                # padding-only sliding windows break its masked forward; the loss masks padding anyway).
                logits = model(input_ids=ids, attention_mask=adapter.model_attention_mask(mask)).logits
                loss = weighted_lm_loss(logits, ids, mask, [prompts.answer_start[i] for i in batch], cfg.answer_weight)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"mini-C2S training loss became {loss.item()} at epoch {epoch}: lower lr "
                        f"(now {cfg.lr}); nothing was saved"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                loop.losses.append(loss.item())
                loop.epoch, loop.batch, loop.step = epoch, loop.batch + 1, loop.step + 1
                if clock.due(loop.step):
                    loop.seconds = time.perf_counter() - started
                    _save_checkpoint(checkpoint, cfg, model, optimizer, scheduler, loop)
                    clock.saved()
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            loop.history.append({"epoch": epoch, "loss": float(np.mean(loop.losses))})
            loop.batch, loop.losses = 0, []
    wall = time.perf_counter() - started

    # a private staging folder: two processes training the same configuration must not collide
    with atomic_directory(directory) as staging:
        model.eval()
        model.save_pretrained(staging)
        tokenizer.save_vocab_map(staging)
        write_json_atomic(
            staging / TRAINING_META_FILENAME,
            {
                "config": cfg.to_dict(),
                "train_cells": [split.sentences[i].cell_id for i in split.train],
                "heldout_cells": [split.sentences[i].cell_id for i in split.heldout],
                "history": loop.history,
                "train_seconds": wall,
                "resumed_at_steps": loop.resumed_at,
                "torch_threads": torch.get_num_threads(),
            },
        )
        record_checksums(staging, sorted(p.name for p in staging.iterdir()))
    checkpoint.unlink(missing_ok=True)
    return directory


def checkpoint_path(directory: str | os.PathLike) -> Path:
    """Where ``train_mini_c2s`` checkpoints a run that will write ``directory``."""
    directory = Path(directory)
    return directory.with_name(f"{directory.name}.checkpoint.pt")


@dataclass
class _LoopState:
    """Where the training loop stands: the next batch is ``batch`` of ``epoch`` (whose order
    the generator state ``order_state`` draws); ``losses`` are that epoch's so far."""

    history: list[dict[str, Any]]
    losses: list[float]
    epoch: int = 0
    batch: int = 0
    step: int = 0
    seconds: float = 0.0
    order_state: torch.Tensor | None = None
    resumed_at: list[int] = field(default_factory=list)


def _save_checkpoint(path: Path, cfg: MiniC2SConfig, model, optimizer, scheduler, loop: _LoopState) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "key_material": _key_material(cfg),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "loop": asdict(loop),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, cfg: MiniC2SConfig, model, optimizer, scheduler, order_rng) -> _LoopState:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: name it and the way out (torch's text is chained)
        raise ValueError(
            f"the mini-C2S checkpoint {path} cannot be read ({type(error).__name__}; damaged or not a "
            "checkpoint): delete it to train afresh"
        ) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a mini-C2S checkpoint of this c2srepro ({CHECKPOINT_FORMAT}): delete it to train afresh"
        )
    mine, saved = _key_material(cfg), state["key_material"]
    differs = [key for key in sorted(mine) if key != "config" and saved.get(key) != mine[key]]
    differs += [
        f"config.{key}" for key in sorted(set(mine["config"]) | set(saved["config"]))
        if saved["config"].get(key) != mine["config"].get(key)
    ]
    if differs:
        raise ValueError(
            f"the mini-C2S checkpoint {path} was written with different {differs}: train with the same "
            "settings (and thread count) to resume, or delete it to train afresh"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    loop = _LoopState(**state["loop"])
    order_rng.set_state(loop.order_state)
    loop.resumed_at.append(loop.step)
    return loop


def _check_length(prompts: EncodedPrompts, max_positions: int) -> None:
    longest = max(len(ids) for ids in prompts.input_ids)
    if longest > max_positions:
        raise ValueError(
            f"a prompt has {longest} tokens but the model holds {max_positions} positions: "
            "lower top_k or raise max_positions"
        )


def training_meta(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / TRAINING_META_FILENAME).read_text())
