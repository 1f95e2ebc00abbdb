"""What a chapter hands to the next: each chapter reloads its predecessors' results, not their
parameters, so a parameter changed in chapter 1 reaches every later chapter, and each checks that
what it reloads is what its predecessors made (fingerprints, not paths).

1. Chapter 1 writes ``results/<profile>/model.json``: the model it used (``model_source``), in its
   provenance the dataset parameters that define the cell split and the weights' ``dtype``, and
   the ``fingerprints`` of the model's weights and of the split (``stage_fingerprints``).
2. ``model_stage`` rebuilds the same model, tokenizer and split from that file and refuses them
   when their fingerprints differ from the recorded ones (the weights or the data changed).
3. Chapter 2 saves transcoders in ``results/<profile>/transcoders/layer_XX`` and writes
   ``transcoders.json`` with the fingerprints of the model and split it trained on and of the
   transcoder set; ``transcoders`` loads the set and refuses it unless it fits chapter 1's model
   layer for layer and carries those fingerprints.
4. Later chapters record ``fingerprints(results_dir)`` (what they consumed) in their results'
   provenance ``inputs``; ``check_consumed`` refuses a result made from other inputs than the
   current ones (``feature_stats`` does so for chapter 4's statistics).
Every refusal names the chapter to rerun.
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
TRANSCODER_RESULT = "transcoders.json"
TRANSCODER_DIRECTORY = "transcoders"
FEATURE_STATS_DIRECTORY = "feature_stats"
FEATURE_STATS_RESULT = "table3.csv"  # written with the statistics; its provenance records what made them
# Folders of results/<profile>/ that chapters resume from (harvested activations, training
# checkpoints, the appendix's work folder): named by what made them and checked by their own
# manifests, they are kept when a chapter fails so that its rerun resumes (the runner's journal).
RESUMABLE_DIRECTORIES = ("activations", "transcoders-checkpoint", "your-data")
SPLIT_PARAMETERS = ("dataset", "label_column", "symbol_column", "use_raw", "top_k", "heldout_fraction", "seed")


@dataclass
class ModelStage:
    model: Any  # a transformers causal LM of an architecture in c2srepro.models.adapters, eval mode
    tokenizer: CellTokenizer
    split: CellSplit
    summary: dict[str, Any]  # chapter 1's model.json
    fingerprints: dict[str, str]  # {"model": weights, "split": cells}, checked against model.json

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


def _rerun(chapter: str) -> str:
    return f"run the {chapter} chapter of this profile again"


def stage_fingerprints(model, split: CellSplit) -> dict[str, str]:
    """What chapter 1 hands on, as fingerprints: the model's weights and the cell split."""
    from c2srepro.transcoder.harvest import model_fingerprint

    return {"model": model_fingerprint(model), "split": split.fingerprint()}


def model_stage(results_dir: str | os.PathLike, *, device: str | None = None) -> ModelStage:
    """Chapter 1's model, tokenizer and split, refused when they are no longer what it evaluated;
    the model on ``device`` (a chapter's ``device`` parameter; None: cuda when available, else cpu)
    in chapter 1's ``dtype``."""
    from c2srepro._cache import CorruptFileError

    summary = read_result(results_dir, MODEL_RESULT, made_by="01-model")
    recorded = summary.get("fingerprints")
    if not recorded:
        raise ValueError(f"{Path(results_dir) / MODEL_RESULT} records no fingerprints (an older c2srepro wrote it): "
                         f"{_rerun('01-model')}")
    try:
        # dtype: chapter 1's parameter (None, float32, where an older model.json records none)
        dtype = summary["provenance"]["params"].get("dtype")
        model, tokenizer = load_c2s_model(summary["model_source"], device=device, dtype=dtype)
    except CorruptFileError as error:
        raise CorruptFileError(f"{error} (in the book: {_rerun('01-model')})") from error
    split_params = {k: summary["provenance"]["params"][k] for k in SPLIT_PARAMETERS}
    split_params["dataset"] = resolve_dataset(split_params["dataset"])
    split = labelled_split(**split_params)
    found = stage_fingerprints(model, split)
    changed = {"model": f"the model's weights at {summary['model_source']}", "split": "the cell split (its dataset)"}
    for key, what in changed.items():
        if found[key] != recorded[key]:
            raise ValueError(f"{what} changed since chapter 1 evaluated them (fingerprint {found[key]} here, "
                             f"{recorded[key]} in {MODEL_RESULT}): {_rerun('01-model')}")
    return ModelStage(model, tokenizer, split, summary, found)


def model_recipe(summary: dict[str, Any]) -> str:
    """What decides chapter 1's model's weights but the machine that trained it, from its model.json:
    a model trained here lives in a cache folder named by that recipe's hash (``mini-c2s-<hash>``:
    configuration, data, tokenizer, package versions, thread count); a downloaded one is its id."""
    source = str(summary["model_source"])
    return Path(source).name if Path(source).is_absolute() else source


def check_position(parameter: str, value: int, *, count: int, of: str) -> int:
    """``value`` as a position among ``count`` things (``of``: "layers in chapter 1's model"),
    refused with the parameter's name before a chapter's work when it is out of range."""
    if not 0 <= value < count:
        raise ValueError(f"{parameter}={value}: there are {count} {of} (positions 0 to {count - 1})")
    return value


def transcoder_directory(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / TRANSCODER_DIRECTORY


def transcoder_set_fingerprint(directory: str | os.PathLike) -> str:
    """A fingerprint of the transcoder set in ``directory``: the checksums recorded with each layer."""
    from c2srepro._cache import CHECKSUMS_FILENAME, short_hash

    # A layer saved before checksums were recorded has none: the set then matches no record.
    checksums = {p.name: p / CHECKSUMS_FILENAME for p in sorted(Path(directory).glob("layer_*"))}
    return short_hash({name: json.loads(path.read_text()) if path.is_file() else None for name, path in checksums.items()})


def transcoders(results_dir: str | os.PathLike, *, device: str | None = None, model=None,
                stage: ModelStage | None = None):
    """Chapter 2's transcoders, on ``device`` (None: cuda when available, else cpu). With ``model`` (or ``stage``, chapter 1's from ``model_stage``) they
    must fit it layer for layer and carry its fingerprint: transcoders left by an earlier run on
    another model, or with layers missing or to spare, are refused with the chapter to rerun. With
    ``stage``, ``transcoders.json`` must also record chapter 1's model and split and this set."""
    from c2srepro._cache import CorruptFileError
    from c2srepro.transcoder.fit import check_transcoders_fit
    from c2srepro.transcoder.harvest import model_fingerprint
    from c2srepro.transcoder.model import load_transcoders

    directory = transcoder_directory(results_dir)
    rerun = _rerun("02-transcoders")
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is missing: {rerun}")
    try:
        loaded = load_transcoders(directory, device=device)
    except CorruptFileError as error:
        raise CorruptFileError(f"{error} (in the book: {rerun})") from error
    model = stage.model if stage is not None else model
    if model is not None:
        try:
            check_transcoders_fit(model, loaded, every_layer=True)
        except ValueError as error:
            raise ValueError(f"the transcoders in {directory} do not fit chapter 1's model ({error}): {rerun}") from error
        fingerprint = stage.fingerprints["model"] if stage is not None else model_fingerprint(model)
        other = sorted(layer for layer, tc in loaded.items() if tc.cfg.model_fingerprint not in (None, fingerprint))
        if other:
            raise ValueError(f"the transcoders of layers {other} in {directory} were trained on another model than "
                             f"chapter 1's: {rerun}")
    if stage is not None:
        expected = {**stage.fingerprints, "transcoders": transcoder_set_fingerprint(directory)}
        record = read_result(results_dir, TRANSCODER_RESULT, made_by="02-transcoders").get("fingerprints", {})
        _check_fingerprints(record, expected, where=Path(results_dir) / TRANSCODER_RESULT, made_by="02-transcoders")
    return loaded


def fingerprints(results_dir: str | os.PathLike) -> dict[str, str]:
    """What a chapter after chapter 2 consumes, as chapters 1 and 2 recorded it: the model's
    weights, the split and the transcoder set (record them in a result's provenance ``inputs``)."""
    record = read_result(results_dir, TRANSCODER_RESULT, made_by="02-transcoders").get("fingerprints")
    if not record:
        raise ValueError(f"{Path(results_dir) / TRANSCODER_RESULT} records no fingerprints (an older c2srepro wrote "
                         f"it): {_rerun('02-transcoders')}")
    return dict(record)


def check_consumed(results_dir: str | os.PathLike, name: str, *, made_by: str) -> None:
    """Refuse ``name`` (a result of chapter ``made_by``) unless its provenance records the model,
    split and transcoders that chapters 1 and 2 hold now."""
    path = Path(results_dir) / name
    record = path.with_name(path.name + ".provenance.json") if path.suffix == ".csv" else path
    if not path.is_file() or not record.is_file():
        raise FileNotFoundError(f"{path} is missing: run the {made_by} chapter of this profile first")
    provenance = json.loads(record.read_text())
    _check_fingerprints(provenance.get("provenance", provenance).get("inputs", {}), fingerprints(results_dir),
                        where=record, made_by=made_by)


def _check_fingerprints(record: dict[str, Any], expected: dict[str, str], *, where: Path, made_by: str) -> None:
    stale = sorted(key for key, value in expected.items() if record.get(key) != value)
    if stale:
        names = {"model": "model weights", "split": "cell split", "transcoders": "transcoder set"}
        raise ValueError(f"{where} was made from another {' and '.join(names[k] for k in stale)} than the current "
                         f"one{'s' if len(stale) > 1 else ''} (chapter 1's model.json, chapter 2's transcoders): "
                         f"{_rerun(made_by)}")


def feature_stats(results_dir: str | os.PathLike):
    """Chapter 4's feature statistics, refused unless made from the current model, split and transcoders."""
    from c2srepro.features import load_feature_stats

    check_consumed(results_dir, FEATURE_STATS_RESULT, made_by="04-features")
    return load_feature_stats(Path(results_dir) / FEATURE_STATS_DIRECTORY)
