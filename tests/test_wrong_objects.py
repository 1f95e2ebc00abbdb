"""The wrong kind of object at a step of the flow is a TypeError naming the expected type and the
call that makes it (issue 11, item 3), raised before any model runs."""

import pytest
import torch

from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import EncodedPrompts
from tests._tc_models import random_prompts, small_model
from tests._tiny_neox import tiny_setup

SENTENCES = [CellSentence(0, "c0", ("CD14", "LYZ"), "monocyte"), CellSentence(1, "c1", ("CD3E",), "T cell")]


def test_cell_sentences_passed_to_harvest_activations():
    from c2srepro.transcoder.harvest import harvest_activations

    model = small_model()
    with pytest.raises(TypeError, match=r"prompts: expected EncodedPrompts .* got a list of 2 CellSentence: "
                       r"encode them first: encode_prompts\(cell_sentences\(adata\), tokenizer\)"):
        harvest_activations(model, SENTENCES)
    with pytest.raises(TypeError, match=r"for a single prompt pass a list of one, \[input_ids\]"):
        harvest_activations(model, random_prompts(1)[0])
    # what the message asks for works: token-id lists (EncodedPrompts.input_ids) harvest
    source = harvest_activations(model, random_prompts(3), progress=False)
    assert source.n_rows == sum(len(p) for p in random_prompts(3))


def test_encoded_prompts_passed_to_build_replacement():
    from c2srepro.attribution.linearised import build_replacement

    model, transcoders, input_ids = tiny_setup()
    prompts = EncodedPrompts(input_ids=[input_ids.tolist(), input_ids[:5].tolist()])
    with pytest.raises(TypeError, match=r"build_replacement: expected one prompt's input ids .* got EncodedPrompts "
                       r"of 2 prompts: pass prompts\.input_ids\[i\] for prompt i"):
        build_replacement(model, transcoders, prompts)
    with pytest.raises(TypeError, match=r"got a batch of 2 prompts: pass one row"):
        build_replacement(model, transcoders, torch.stack([input_ids, input_ids]))
    with pytest.raises(TypeError, match=r"got a CellSentence: encode_prompts\(\[sentence\], tokenizer\)\.input_ids\[0\]"):
        build_replacement(model, transcoders, SENTENCES[0])
    with pytest.raises(TypeError, match=r"got a float64 tensor of shape \(12,\): prompt i's are encode_prompts"):
        build_replacement(model, transcoders, input_ids.double())
    replacement = build_replacement(model, transcoders, prompts.input_ids[0])  # the fix the message names
    assert replacement.n_pos == len(input_ids)
