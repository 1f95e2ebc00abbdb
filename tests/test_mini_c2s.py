import json

import pytest
import torch

from c2srepro.data.datasets import labelled_split, split_cells
from c2srepro.models.mini_c2s import MiniC2SConfig, pbmc_split, train_mini_c2s, training_meta, weighted_lm_loss
from c2srepro.models.load import load_c2s_model
from c2srepro.models.predict import generate_labels, predict_labels, score_labels

TINY = dict(n_layers=1, d_model=32, n_heads=2, epochs=1, top_k=16, batch_size=32)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return train_mini_c2s(MiniC2SConfig(**TINY), directory=tmp_path_factory.mktemp("m") / "tiny")


def test_architecture_is_pythia_style(tiny_model):
    model, tokenizer = load_c2s_model(tiny_model)
    config = model.config
    assert config.model_type == "gpt_neox"
    assert config.use_parallel_residual and config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.intermediate_size == 4 * config.hidden_size and config.hidden_act == "gelu"
    assert config.vocab_size == tokenizer.vocab_size < 2000  # restricted to the corpus' BPE ids


def test_same_seed_same_weights(tiny_model, tmp_path):
    again = train_mini_c2s(MiniC2SConfig(**TINY), directory=tmp_path / "again")
    first, _ = load_c2s_model(tiny_model)
    second, _ = load_c2s_model(again)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    other = train_mini_c2s(MiniC2SConfig(**{**TINY, "seed": 1}), directory=tmp_path / "other")
    third, _ = load_c2s_model(other)
    assert not torch.equal(first.get_output_embeddings().weight, third.get_output_embeddings().weight)


def test_save_load_round_trip_keeps_logits(tiny_model, tmp_path):
    model, tokenizer = load_c2s_model(tiny_model)
    model.save_pretrained(tmp_path / "copy")
    tokenizer.save_vocab_map(tmp_path / "copy")
    copy, copy_tokenizer = load_c2s_model(tmp_path / "copy")
    ids = torch.tensor([tokenizer.encode(" CD74 FTL LYZ")[0]])
    assert torch.equal(model(ids).logits, copy(ids).logits)
    assert copy_tokenizer.vocab_map.tolist() == tokenizer.vocab_map.tolist()


def test_cached_model_is_reused(tiny_model):
    stamp = (tiny_model / "model.safetensors").stat().st_mtime_ns
    assert train_mini_c2s(MiniC2SConfig(**TINY), directory=tiny_model) == tiny_model
    assert (tiny_model / "model.safetensors").stat().st_mtime_ns == stamp
    meta = training_meta(tiny_model)
    assert meta["config"]["seed"] == 0 and len(meta["history"]) == 1
    assert set(meta["train_cells"]).isdisjoint(meta["heldout_cells"])


def test_a_damaged_cached_model_is_named_on_load_and_trained_again(tiny_model, tmp_path, caplog):
    import shutil

    from c2srepro._cache import CHECKSUMS_FILENAME, CorruptFileError

    copy = tmp_path / "damaged"
    shutil.copytree(tiny_model, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    with pytest.raises(CorruptFileError, match=r"damaged/model.safetensors is damaged: its sha256 .* \(1000 bytes now\): delete"):
        load_c2s_model(copy)
    with caplog.at_level("WARNING"):
        assert train_mini_c2s(MiniC2SConfig(**TINY), directory=copy) == copy
    assert "model.safetensors is damaged" in caplog.text
    assert (copy / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    (copy / CHECKSUMS_FILENAME).unlink()  # a cache written before checksums were recorded
    stamp = weights.stat().st_mtime_ns
    train_mini_c2s(MiniC2SConfig(**TINY), directory=copy)
    assert weights.stat().st_mtime_ns != stamp and (copy / CHECKSUMS_FILENAME).is_file()


def test_prediction_returns_candidates(tiny_model):
    model, tokenizer = load_c2s_model(tiny_model)
    split = pbmc_split(MiniC2SConfig(**TINY))
    cells = split.cells("heldout")[:3]
    scores = score_labels(model, tokenizer, cells, split.labels)
    assert scores.shape == (3, len(split.labels)) and (scores < 0).all()
    assert set(predict_labels(model, tokenizer, cells, split.labels)) <= set(split.labels)
    assert all(isinstance(a, str) for a in generate_labels(model, tokenizer, cells[:1], max_new_tokens=4))


def test_unknown_gene_tokens_are_a_clear_error(tiny_model):
    _, tokenizer = load_c2s_model(tiny_model)
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        tokenizer.encode(" Zyxwvut QQQQ")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model weights found"):
        load_c2s_model(tmp_path)


def test_split_is_by_cell_stratified_and_seeded():
    split = labelled_split(top_k=8, seed=0)
    assert set(split.train).isdisjoint(split.heldout)
    assert len(split.train) + len(split.heldout) == 700
    assert split.heldout == labelled_split(top_k=8, seed=0).heldout
    assert split.heldout != labelled_split(top_k=8, seed=1).heldout
    heldout_labels = {split.sentences[i].label for i in split.heldout}
    assert heldout_labels == set(split.labels)


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_cells([], heldout_fraction=1.5, seed=0)


def test_answer_tokens_are_weighted():
    logits = torch.zeros(1, 4, 5)
    logits[0, 2, 3] = 5.0  # confident and right about the last token
    ids = torch.tensor([[0, 1, 2, 3]])
    mask = torch.ones_like(ids)
    plain = weighted_lm_loss(logits, ids, mask, [4], 1.0)
    weighted = weighted_lm_loss(logits, ids, mask, [3], 8.0)
    assert weighted < plain  # the well-predicted answer token counts 8 times


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        MiniC2SConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        MiniC2SConfig(epochs=0)
    assert MiniC2SConfig.from_dict(json.loads(json.dumps(MiniC2SConfig().to_dict()))) == MiniC2SConfig()


def test_label_scores_equal_a_full_forward_per_candidate(tiny_model):
    model, tokenizer = load_c2s_model(tiny_model)
    split = pbmc_split(MiniC2SConfig(**TINY))
    cell = split.cells("heldout")[0]
    scores = score_labels(model, tokenizer, [cell], split.labels)[0]
    from c2srepro.data.prompts import answer_text, build_prompt

    prompt = tokenizer.encode(build_prompt(cell).text)[0]
    for label, score in zip(split.labels, scores):
        answer = tokenizer.encode(answer_text(label))[0]
        ids = torch.tensor([prompt + answer])
        log_probs = torch.log_softmax(model(ids).logits[0].double(), -1)
        expected = sum(log_probs[len(prompt) - 1 + j, token].item() for j, token in enumerate(answer))
        assert score == pytest.approx(expected, abs=1e-4), label


def test_the_cache_key_holds_the_thread_count():
    # Training on 1 and 2 threads gives weights that differ in the last bits: two cache entries.
    from c2srepro.models.mini_c2s import cache_key

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cache_key(MiniC2SConfig())
        torch.set_num_threads(2)
        two = cache_key(MiniC2SConfig())
    finally:
        torch.set_num_threads(threads)
    assert one != two and cache_key(MiniC2SConfig(seed=1)) != cache_key(MiniC2SConfig())
