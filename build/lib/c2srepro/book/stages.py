"""What a chapter hands to the next: each chapter reloads its predecessors' results, not their
parameters, so a parameter changed in chapter 1 reaches every later chapter.

1. Chapter 1 writes ``results/<profile>/model.json``: the model it used (``model_source``) and,
   in its provenance, the dataset parameters that define the cell split.
2. ``model_stage`` rebuilds the same model, tokenizer and split from that file.
3. Chapter 2 saves transcoders in ``results/<profile>/transcoders/layer_XX``; ``transcoders``
   loads them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from c2srepro.book.sources import resolve_dataset
from c2srepro.data.datasets import CellSplit, labelled_split
from c2srepro.models.load import load_c2s_model
from c2srepro.data.prompts import EncodedPrompts, encode_prompts
from c2srepro.data.tokenizer import CellTokenizer

MODEL_RESULT = "model.json"
TRANSCODER_DIRECTORY = "transcoders"
SPLIT_PARAMETERS = ("dataset", "label_column", "symbol_column", "use_raw", "top_k", "heldout_fraction", "seed")


@dataclass
class ModelStage:
    model: Any  # GPTNeoXForCausalLM, eval mode
    tokenizer: CellTokenizer
    split: CellSplit
    summary: dict[str, Any]  # chapter 1's model.json

    def prompts(self, part: str, *, with_answer: bool = True) -> EncodedPrompts:
        """Prompts of the training or held-out cells (with their answers by default)."""
        return encode_prompts(self.split.cells(part), self.tokenizer, with_answer=with_answer)

    @property
    def split_parameters(self) -> dict[str, Any]:
        return {k: self.summary["provenance"]["params"][k] for k in SPLIT_PARAMETERS}


def read_result(results_dir: str | os.PathLike, name: str, *, made_by: str) -> dict[str, Any]:
    path = Path(results_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the {made_by} chapter of this profile first")
    return json.loads(path.read_text())


def model_stage(results_dir: str | os.PathLike, *, device: str = "cpu") -> ModelStage:
    summary = read_result(results_dir, MODEL_RESULT, made_by="01-model")
    model, tokenizer = load_c2s_model(summary["model_source"], device=device)
    split_params = {k: summary["provenance"]["params"][k] for k in SPLIT_PARAMETERS}
    split_params["dataset"] = resolve_dataset(split_params["dataset"])
    return ModelStage(model, tokenizer, labelled_split(**split_params), summary)


def transcoder_directory(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / TRANSCODER_DIRECTORY


def transcoders(results_dir: str | os.PathLike, *, device: str = "cpu"):
    from c2srepro.transcoder.model import load_transcoders

    directory = transcoder_directory(results_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing: run the 02-transcoders chapter of this profile first")
    return load_transcoders(directory, device=device)
