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


def transcoders(results_dir: str | os.PathLike, *, device: str = "cpu", model=None):
    """Chapter 2's transcoders. With ``model`` (chapter 1's, from ``model_stage``) they must fit it
    layer for layer and carry its fingerprint: transcoders left by an earlier run on another model,
    or with layers missing or to spare, are refused with the chapter to rerun."""
    from c2srepro.transcoder.fit import check_transcoders_fit
    from c2srepro.transcoder.harvest import model_fingerprint
    from c2srepro.transcoder.model import load_transcoders

    directory = transcoder_directory(results_dir)
    rerun = "run the 02-transcoders chapter of this profile again"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing: {rerun}")
    loaded = load_transcoders(directory, device=device)
    if model is not None:
        try:
            check_transcoders_fit(model, loaded, every_layer=True)
        except ValueError as error:
            raise ValueError(f"the transcoders in {directory} do not fit chapter 1's model ({error}): {rerun}") from error
        fingerprint = model_fingerprint(model)
        other = sorted(layer for layer, tc in loaded.items() if tc.cfg.model_fingerprint not in (None, fingerprint))
        if other:
            raise ValueError(f"the transcoders of layers {other} in {directory} were trained on another model than "
                             f"chapter 1's: {rerun}")
    return loaded
