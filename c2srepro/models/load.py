"""Load a C2S model (hub id or local directory) with its tokenizer, offline-capable."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from c2srepro._cache import verify_checksums
from c2srepro.data.tokenizer import BUNDLED, VOCAB_MAP_FILENAME, CellTokenizer

log = logging.getLogger(__name__)

PAPER_MODEL = "vandijklab/C2S-Pythia-410m-cell-type-prediction"
def load_c2s_model(
    source: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
):
    """A ``GPTNeoXForCausalLM`` in eval mode and its ``CellTokenizer``.

    ``source`` is a local directory (``save_pretrained`` output, e.g. the embedded mini-C2S) or a
    Hugging Face id such as ``vandijklab/C2S-Pythia-410m-cell-type-prediction``. Offline, a hub id
    is read from the local Hugging Face cache only (``HF_HUB_OFFLINE=1`` also forces this).
    ``tokenizer`` defaults to the model's own tokenizer files, else the bundled Pythia BPE.
    """
    from transformers import AutoModelForCausalLM

    source = str(source)
    is_dir = Path(source).is_dir()
    if local_files_only is None:
        local_files_only = is_dir or os.environ.get("HF_HUB_OFFLINE") == "1"
    if is_dir and not (Path(source) / "config.json").is_file():
        raise FileNotFoundError(
            f"no model weights found in {source}: it has no config.json; give a directory written "
            f"by save_pretrained or a Hugging Face id such as {PAPER_MODEL}"
        )
    if is_dir:  # a directory c2srepro wrote (the mini-C2S) carries checksums; another has none to check
        verify_checksums(source, fix=f"delete {source} and write the model again (the mini-C2S is retrained)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=local_files_only, dtype=dtype or torch.float32
        )
    except OSError as error:
        raise FileNotFoundError(
            f"no model weights found for {source!r}: give a local directory written by "
            "save_pretrained, or a Hugging Face id on a machine that can reach the hub (first "
            f"download it there, e.g. `huggingface-cli download {PAPER_MODEL}`); underlying error: "
            f"{str(error).splitlines()[0]}"
        ) from error
    if tokenizer is None:
        has_own = is_dir and any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = source if (has_own or not is_dir) else BUNDLED
    cell_tokenizer = CellTokenizer.load(tokenizer, model_dir=source if is_dir else None)
    if cell_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {cell_tokenizer.vocab_size} tokens but the model only "
            f"{model.config.vocab_size}: {source} and its {VOCAB_MAP_FILENAME} do not belong together"
        )
    return model.to(device).eval(), cell_tokenizer
