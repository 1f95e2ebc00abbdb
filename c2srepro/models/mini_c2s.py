"""The embedded mini-C2S: a small Pythia-style GPT-NeoX trained here on real PBMC cell sentences.

1. Cell sentences of scanpy's bundled ``pbmc68k_reduced`` (top-K genes of ``.raw``, labels
   ``bulk_labels``), split by cell into training and held-out sets (stratified, seeded).
2. Vocabulary: the real Pythia BPE segmentation, with the embedding table restricted to the BPE
   ids that occur in the prompts, the dataset's gene symbols and the answers (``vocab_map``).
3. Model: ``GPTNeoXForCausalLM`` with Pythia's choices: parallel residual, rotary on 25% of each
   head, GELU MLP of 4x width, untied embeddings.
4. Training as C2S is trained: next-token loss over the whole prompt (the cell sentence is
   language to model) plus the answer, whose tokens are weighted ``answer_weight`` times so the
   few answer tokens are not drowned by ~270 sentence tokens. Augmentation: each epoch re-draws
   the shuffle that breaks expression ties, so the model sees each cell in several valid orders.
   AdamW, linear warm-up then cosine decay to 0 (``c2srepro._schedule``).
5. The trained model is cached under a hash of its parameters and inputs, with each file's sha256;
   it is reused while every file matches its checksum, and trained again when one does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from c2srepro._cache import CorruptFileError, atomic_directory, cache_dir, record_checksums, verify_checksums, write_json_atomic
from c2srepro._config import config_from_dict
from c2srepro._schedule import warmup_cosine
from c2srepro.data.datasets import PBMC, CellSplit, labelled_split, load_dataset
from c2srepro.data.prompts import EncodedPrompts, answer_text, encode_prompts, pad_right
from c2srepro.data.tokenizer import PYTHIA_SHA256, CellTokenizer, load_bpe_tokenizer

log = logging.getLogger(__name__)

TRAINING_META_FILENAME = "training.json"


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

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "max_positions", "top_k", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
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


def cache_key(cfg: MiniC2SConfig) -> str:
    from importlib.metadata import version

    material = {
        "config": cfg.to_dict(),
        "tokenizer_sha256": PYTHIA_SHA256,
        "dataset": f"scanpy {version('scanpy')} pbmc68k_reduced",
        "torch": torch.__version__,
        "transformers": version("transformers"),
        # CPU float reductions are split by the intra-op thread count, so it decides the last bits
        # of every weight (1 and 2 threads train to models that differ by ~1e-8).
        "torch_threads": torch.get_num_threads(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


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
    cfg: MiniC2SConfig | None = None, *, directory: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Train (or reuse) the mini-C2S; return its directory (``save_pretrained`` + vocab map).

    The directory defaults to ``cache_dir("models", "mini-c2s-<hash of cfg and inputs>")``; an
    existing complete model there is reused unless ``force`` or a file differs from the sha256
    recorded with it (then it is trained again). Writes ``training.json`` with the config, the
    split, per-epoch losses and wall time, and ``sha256.json``.
    """
    from transformers import GPTNeoXForCausalLM

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

    torch.manual_seed(cfg.seed)
    adata = load_dataset(PBMC)
    split = pbmc_split(cfg, adata=adata)
    bpe = load_bpe_tokenizer()
    genes = sorted({g.upper() for g in adata.raw.var_names})
    tokenizer = CellTokenizer(bpe, build_vocabulary(_vocabulary_texts(genes, split), bpe))
    model = GPTNeoXForCausalLM(gpt_neox_config(cfg, tokenizer.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(split.train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps=total, warmup_steps=warmup)
    )
    order_rng = torch.Generator().manual_seed(cfg.seed)
    history, started = [], time.perf_counter()
    model.train()
    with tqdm(total=total, desc="training mini-C2S") as bar:
        for epoch in range(cfg.epochs):
            epoch_split = pbmc_split(cfg, seed_offset=epoch, adata=adata) if cfg.augment_ties and epoch else split
            prompts = encode_prompts([epoch_split.sentences[i] for i in split.train], tokenizer, with_answer=True)
            _check_length(prompts, cfg.max_positions)
            order = torch.randperm(len(prompts), generator=order_rng).tolist()
            losses = []
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                ids, mask = pad_right([prompts.input_ids[i] for i in batch], pad_id=tokenizer.pad_id)
                logits = model(input_ids=ids, attention_mask=mask).logits
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
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
            history.append({"epoch": epoch, "loss": float(np.mean(losses))})
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
                "history": history,
                "train_seconds": wall,
                "torch_threads": torch.get_num_threads(),
            },
        )
        record_checksums(staging, sorted(p.name for p in staging.iterdir()))
    return directory


def _check_length(prompts: EncodedPrompts, max_positions: int) -> None:
    longest = max(len(ids) for ids in prompts.input_ids)
    if longest > max_positions:
        raise ValueError(
            f"a prompt has {longest} tokens but the model holds {max_positions} positions: "
            "lower top_k or raise max_positions"
        )


def training_meta(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / TRAINING_META_FILENAME).read_text())
