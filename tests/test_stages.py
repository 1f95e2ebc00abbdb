"""What chapters hand each other: chapter 2's transcoders must belong to chapter 1's model."""

import pytest
from _tc_models import small_model

from c2srepro.book.stages import transcoder_directory, transcoders
from c2srepro.transcoder.config import TranscoderConfig
from c2srepro.transcoder.harvest import model_fingerprint
from c2srepro.transcoder.model import Transcoder, save_transcoders


def _save(results, model, layers, *, fingerprint):
    cfg = [TranscoderConfig(d_model=64, d_transcoder=128, layer=layer, model_fingerprint=fingerprint) for layer in layers]
    save_transcoders({c.layer: Transcoder(c, seed=c.layer) for c in cfg}, transcoder_directory(results))


def test_the_transcoders_of_chapter_1s_model_are_loaded(tmp_path):
    model = small_model(n_layers=2)
    _save(tmp_path, model, [0, 1], fingerprint=model_fingerprint(model))
    assert sorted(transcoders(tmp_path, model=model)) == [0, 1]


def test_missing_stale_and_foreign_transcoders_name_the_chapter_to_rerun(tmp_path):
    model = small_model(n_layers=2)
    with pytest.raises(FileNotFoundError, match="run the 02-transcoders chapter"):
        transcoders(tmp_path, model=model)
    _save(tmp_path, model, [0], fingerprint=model_fingerprint(model))  # a layer deleted or never trained
    with pytest.raises(ValueError, match=r"do not fit chapter 1's model .*no transcoder for layers \[1\].*run the 02-transcoders"):
        transcoders(tmp_path, model=model)
    _save(tmp_path, model, [0, 1, 2], fingerprint=model_fingerprint(model))  # left by a 3-layer run
    with pytest.raises(ValueError, match=r"do not fit chapter 1's model .*layers \[2\] do not fit"):
        transcoders(tmp_path, model=model)
    other = small_model(n_layers=2, seed=1)  # chapter 1 retrained with other parameters
    _save(tmp_path, other, [0, 1], fingerprint=model_fingerprint(other))
    with pytest.raises(ValueError, match=r"layers \[0, 1\] .* trained on another model than chapter 1's"):
        transcoders(tmp_path, model=model)


# ---- chapter 1 -> later chapters: the model's weights and the split, by fingerprint

import json
import shutil

import pandas as pd
import torch

from c2srepro._cache import record_checksums
from c2srepro.book.provenance import write_result, write_table
from c2srepro.book.stages import (
    check_consumed, check_position, feature_stats, fingerprints, model_stage, stage_fingerprints,
    transcoder_set_fingerprint,
)
from c2srepro.data.datasets import labelled_split
from c2srepro.models.load import load_c2s_model
from c2srepro.models.mini_c2s import MiniC2SConfig, train_mini_c2s

SPLIT = dict(dataset="pbmc68k_reduced", label_column="bulk_labels", symbol_column=None, use_raw=True, top_k=16,
             heldout_fraction=0.2, seed=0)


@pytest.fixture(scope="module")
def tiny_c2s(tmp_path_factory):
    return train_mini_c2s(MiniC2SConfig(n_layers=1, d_model=32, n_heads=2, epochs=1, top_k=16, batch_size=32),
                          directory=tmp_path_factory.mktemp("m") / "tiny")


def _chapter_1(results, model_dir, **split):
    model, _ = load_c2s_model(model_dir)
    params = {**SPLIT, **split}
    write_result(results / "model.json", {"model_source": str(model_dir),
                                          "fingerprints": stage_fingerprints(model, labelled_split(**params))},
                 params=params)


def _chapter_2(results, stage):
    cfg = [TranscoderConfig(d_model=32, d_transcoder=64, layer=0, model_fingerprint=stage.fingerprints["model"])]
    save_transcoders({c.layer: Transcoder(c, seed=0) for c in cfg}, transcoder_directory(results))
    write_result(results / "transcoders.json", {"fingerprints": {
        **stage.fingerprints, "transcoders": transcoder_set_fingerprint(transcoder_directory(results))}}, params={})


def test_a_changed_model_or_split_is_refused_with_the_chapter_to_rerun(tmp_path, tiny_c2s):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_c2s, model_dir)
    _chapter_1(tmp_path, model_dir)
    stage = model_stage(tmp_path)
    assert stage.fingerprints == json.loads((tmp_path / "model.json").read_text())["fingerprints"]

    # The dataset parameters that made the split no longer give chapter 1's cells.
    summary = json.loads((tmp_path / "model.json").read_text())
    summary["provenance"]["params"]["top_k"] = 15
    (tmp_path / "model.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"the cell split \(its dataset\) changed since chapter 1 .*run the 01-model chapter"):
        model_stage(tmp_path)

    # Other weights at the same path (retrained elsewhere, same config): refused by weights, not by path.
    _chapter_1(tmp_path, model_dir)
    model, _ = load_c2s_model(model_dir)
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(1e-3)
    model.save_pretrained(model_dir)
    record_checksums(model_dir, sorted(p.name for p in model_dir.iterdir() if p.name != "sha256.json"))
    with pytest.raises(ValueError, match=r"the model's weights at .*model changed since chapter 1 .*run the 01-model chapter"):
        model_stage(tmp_path)

    # model.json of an older c2srepro, with no fingerprints.
    summary = json.loads((tmp_path / "model.json").read_text())
    del summary["fingerprints"]
    (tmp_path / "model.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"model.json records no fingerprints .*run the 01-model chapter"):
        model_stage(tmp_path)


def test_transcoders_and_later_results_must_record_the_current_inputs(tmp_path, tiny_c2s):
    _chapter_1(tmp_path, tiny_c2s)
    stage = model_stage(tmp_path)
    _chapter_2(tmp_path, stage)
    assert sorted(transcoders(tmp_path, stage=stage)) == [0]
    consumed = fingerprints(tmp_path)
    assert set(consumed) == {"model", "split", "transcoders"}

    # Chapter 4's record of what made its statistics, from the inputs as they are now, passes.
    write_table(tmp_path / "table3.csv", pd.DataFrame({"feature": [1]}), params={}, inputs=consumed)
    check_consumed(tmp_path, "table3.csv", made_by="04-features")

    # Chapter 1 rerun on another split: chapter 2's transcoders and chapter 4's statistics are stale.
    _chapter_1(tmp_path, tiny_c2s, seed=1)
    other = model_stage(tmp_path)
    with pytest.raises(ValueError, match=r"transcoders.json was made from another cell split than the current one .*"
                                         r"run the 02-transcoders chapter"):
        transcoders(tmp_path, stage=other)
    _chapter_2(tmp_path, other)  # the same transcoder bytes (same seed): only the split is stale
    with pytest.raises(ValueError, match=r"table3.csv.provenance.json was made from another cell split than the current "
                                         r"one .*run the 04-features chapter"):
        feature_stats(tmp_path)

    # A transcoder set replaced after transcoders.json was written (another run's folder).
    save_transcoders({0: Transcoder(TranscoderConfig(d_model=32, d_transcoder=64, layer=0,
                                                     model_fingerprint=other.fingerprints["model"]), seed=1)},
                     transcoder_directory(tmp_path))
    with pytest.raises(ValueError, match=r"made from another transcoder set .*run the 02-transcoders chapter"):
        transcoders(tmp_path, stage=other)


def test_positions_are_checked_with_the_parameter_named():
    assert check_position("04-features.layer", 3, count=4, of="layers in chapter 1's model") == 3
    with pytest.raises(ValueError, match=r"04-features.layer=9: there are 4 layers in chapter 1's model \(positions 0 to 3\)"):
        check_position("04-features.layer", 9, count=4, of="layers in chapter 1's model")
    with pytest.raises(ValueError, match=r"01-model.example_cell=9999: there are 140 held-out cells"):
        check_position("01-model.example_cell", 9999, count=140, of="held-out cells")


def test_later_chapters_load_the_model_in_chapter_1s_dtype(tmp_path, tiny_c2s):
    # chapter 1's dtype parameter (recorded in model.json's provenance) is the dtype of every stage
    model, _ = load_c2s_model(tiny_c2s, dtype="bfloat16")
    write_result(tmp_path / "model.json", {"model_source": str(tiny_c2s),
                                           "fingerprints": stage_fingerprints(model, labelled_split(**SPLIT))},
                 params={**SPLIT, "dtype": "bfloat16"})
    stage = model_stage(tmp_path)
    assert stage.model.dtype == torch.bfloat16 and stage.fingerprints["model"] == stage_fingerprints(model, stage.split)["model"]
    # a model.json without the parameter (an older chapter 1, or the default None): float32, as before
    _chapter_1(tmp_path, tiny_c2s)
    assert model_stage(tmp_path).model.dtype == torch.float32


def test_the_model_recipe_is_the_cache_folder_of_a_trained_model_or_the_id_of_a_downloaded_one():
    from c2srepro.book.stages import model_recipe

    assert model_recipe({"model_source": "/home/u/.cache/c2srepro/models/mini-c2s-324d7471e8ae1409"}) == \
        "mini-c2s-324d7471e8ae1409"
    assert model_recipe({"model_source": "vandijklab/C2S-Pythia-410m-cell-type-prediction"}) == \
        "vandijklab/C2S-Pythia-410m-cell-type-prediction"
