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
