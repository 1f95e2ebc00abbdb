"""Load a C2S model (hub id or local directory) with its tokenizer, offline-capable.

1. A local directory must hold a ``config.json``; one that c2srepro wrote is checked against its
   recorded checksums.
2. The config is read first, and a model whose ``model_type`` has no adapter
   (``c2srepro.models.adapters.ADAPTERS``: GPT-NeoX, Gemma-2) is refused before its weights are read.
3. The weights are loaded with ``AutoModelForCausalLM`` (float32 unless ``dtype`` says otherwise),
   the tokenizer from the model's own files or the bundled Pythia BPE, and the two are checked to
   fit (the tokenizer's ids must be rows of the embedding).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from c2srepro._cache import verify_checksums
from c2srepro._device import resolve_device
from c2srepro.data.tokenizer import BUNDLED, VOCAB_MAP_FILENAME, CellTokenizer

log = logging.getLogger(__name__)

PAPER_MODEL = "vandijklab/C2S-Pythia-410m-cell-type-prediction"


def load_c2s_model(
    source: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
    local_files_only: bool | None = None,
):
    """The model in eval mode, a causal LM of a supported architecture (``GPTNeoXForCausalLM``:
    the C2S Pythia models; ``Gemma2ForCausalLM``: C2S-Scale-Gemma-2), and its ``CellTokenizer``.

    ``source`` is a local directory (``save_pretrained`` output, e.g. the embedded mini-C2S) or a
    Hugging Face id such as ``vandijklab/C2S-Pythia-410m-cell-type-prediction`` or
    ``vandijklab/C2S-Scale-Gemma-2-2B``. A model of another architecture raises ``ValueError``
    listing the supported ones. Offline, a hub id
    is read from the local Hugging Face cache only (``HF_HUB_OFFLINE=1`` also forces this).
    ``tokenizer`` defaults to the model's own tokenizer files, else the bundled Pythia BPE.
    ``dtype`` (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``) defaults to float32.
    ``device``: where the model runs; None is cuda when available, else cpu (``c2srepro._device``),
    and a device this machine lacks is refused before any weight is read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from c2srepro.models.adapters import ADAPTERS, supported_architectures

    dtype = model_dtype(dtype)
    device = resolve_device(device)
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
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
        if config.model_type not in ADAPTERS:
            architectures = ", ".join(config.architectures or []) or "model"
            raise ValueError(
                f"{source} holds a {architectures} (config.model_type {config.model_type!r}), not a supported "
                f"architecture; c2srepro supports transformers causal LMs with model_type {supported_architectures()}. "
                f"Give a C2S model of one of these (e.g. {PAPER_MODEL}), or add an adapter module to "
                "c2srepro/models/adapters/"
            )
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, local_files_only=local_files_only, dtype=dtype
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


FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def model_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``dtype`` as a floating ``torch.dtype``: None is float32, a name (``"bfloat16"``) torch's dtype of that name."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in FLOAT_DTYPES:
        return getattr(torch, dtype.removeprefix("torch."))
    raise ValueError(f"dtype={dtype!r} is not a floating-point dtype for model weights; give one of {list(FLOAT_DTYPES)} "
                     "or the torch.dtype")
