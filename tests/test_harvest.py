"""Harvesting MLP activations: checked against a direct forward pass through transformers' modules."""

from __future__ import annotations

import json

import pytest
import torch
from _tc_models import encoded, random_prompts, small_model

import c2srepro.transcoder.harvest as harvest_module
from c2srepro.transcoder.harvest import (
    MANIFEST_FILENAME,
    BufferPosition,
    CachedActivations,
    ShuffleBuffer,
    TensorActivations,
    harvest_activations,
)


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def prompts():
    return encoded(random_prompts(14))


def sort_rows(block):
    key = block.prompt_index * 10_000 + block.position
    order = torch.argsort(key)
    return {name: getattr(block, name)[..., order] if name in ("prompt_index", "position", "cell_index", "token_id")
            else getattr(block, name)[:, order] for name in ("mlp_in", "mlp_out", "prompt_index", "position", "cell_index", "token_id")}


def test_harvest_matches_a_direct_forward_pass(model, prompts):
    rows = harvest_activations(model, prompts, batch_prompts=4, progress=False).read_all()
    assert len(rows) == sum(len(p) for p in prompts.input_ids)
    blocks = model.gpt_neox.layers
    for i, ids in enumerate(prompts.input_ids):
        mine = rows.prompt_index == i
        order = torch.argsort(rows.position[mine])
        assert rows.position[mine][order].tolist() == list(range(len(ids)))
        assert rows.token_id[mine][order].tolist() == ids
        assert set(rows.cell_index[mine].tolist()) == {prompts.cell_index[i]}
        with torch.no_grad():  # reference: the prompt alone, layer input from output_hidden_states
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
            for layer in range(len(blocks)):
                x = blocks[layer].post_attention_layernorm(hidden[layer][0])
                y = blocks[layer].mlp(x)
                torch.testing.assert_close(rows.mlp_in[layer][mine][order], x, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(rows.mlp_out[layer][mine][order], y, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_rows(model, prompts):
    one = sort_rows(harvest_activations(model, prompts, batch_prompts=1, progress=False).read_all())
    many = sort_rows(harvest_activations(model, prompts, batch_prompts=7, progress=False).read_all())
    assert torch.equal(one["position"], many["position"]) and torch.equal(one["prompt_index"], many["prompt_index"])
    torch.testing.assert_close(one["mlp_in"], many["mlp_in"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one["mlp_out"], many["mlp_out"], atol=1e-5, rtol=1e-5)


def test_streaming_and_cached_give_the_same_rows(model, prompts, tmp_path):
    streamed = harvest_activations(model, prompts, batch_prompts=3, progress=False)
    cached = harvest_activations(model, prompts, batch_prompts=3, directory=tmp_path, shard_mb=0.05, progress=False)
    assert isinstance(cached, CachedActivations) and cached.n_blocks() > 2
    a, b = sort_rows(streamed.read_all()), sort_rows(cached.read_all())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    manifest = json.loads((tmp_path / MANIFEST_FILENAME).read_text())
    assert manifest["complete"] and manifest["n_rows"] == streamed.n_rows == sum(map(len, prompts.input_ids))
    assert manifest["layers"] == [0, 1] and "post_attention_layernorm" in manifest["hook_points"]["mlp_in"]


def test_cached_harvest_resumes_after_interruption(model, prompts, tmp_path, monkeypatch):
    written = []
    real_write = harvest_module._write_shard

    def failing_write(directory, manifest, block, *, blocks_done):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated interruption")
        written.append(blocks_done)
        real_write(directory, manifest, block, blocks_done=blocks_done)

    monkeypatch.setattr(harvest_module, "_write_shard", failing_write)
    with pytest.raises(KeyboardInterrupt):
        harvest_activations(model, prompts, batch_prompts=2, directory=tmp_path, shard_mb=0.03, progress=False)
    manifest = json.loads((tmp_path / MANIFEST_FILENAME).read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 2
    with pytest.raises(ValueError, match="incomplete"):
        CachedActivations(tmp_path)

    monkeypatch.setattr(harvest_module, "_write_shard", real_write)
    batches = []
    real_batch = harvest_module.harvest_batch
    monkeypatch.setattr(harvest_module, "harvest_batch", lambda *a, **k: batches.append(1) or real_batch(*a, **k))
    resumed = harvest_activations(model, prompts, batch_prompts=2, directory=tmp_path, shard_mb=0.03, progress=False)
    assert len(batches) == 7 - written[-1]  # only the batches after the last complete shard ran
    fresh = harvest_activations(model, prompts, batch_prompts=2, progress=False)
    a, b = sort_rows(resumed.read_all()), sort_rows(fresh.read_all())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    batches.clear()
    harvest_activations(model, prompts, batch_prompts=2, directory=tmp_path, shard_mb=0.03, progress=False)
    assert batches == []  # a finished harvest is reused


def test_a_damaged_shard_is_named_when_read(model, prompts, tmp_path):
    from c2srepro._cache import CorruptFileError

    harvest_activations(model, prompts, batch_prompts=3, directory=tmp_path, shard_mb=0.05, progress=False)
    shard = json.loads((tmp_path / MANIFEST_FILENAME).read_text())["shards"][1]
    path = tmp_path / shard["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte: same size, other content
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=rf"{shard['file']} is damaged .*delete .* and harvest again"):
        CachedActivations(tmp_path).read_all()
    path.write_bytes(bytes(data[:100]))  # truncated
    cached = CachedActivations(tmp_path)
    cached.block(0, 0)
    with pytest.raises(CorruptFileError, match=rf"{shard['file']} is damaged \(100 bytes, the manifest records {shard['bytes']}"):
        cached.block(0, 1)


def test_cached_harvest_refuses_other_prompts(model, prompts, tmp_path):
    harvest_activations(model, prompts, batch_prompts=4, directory=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different .*prompts_fingerprint"):
        harvest_activations(model, random_prompts(5, seed=9), batch_prompts=4, directory=tmp_path, progress=False)


def test_shuffle_buffer_covers_rows_once_and_resumes_exactly():
    n, d = 1000, 3
    ids = torch.arange(n, dtype=torch.float32)
    mlp_in = ids.view(1, n, 1).expand(2, n, d).clone()  # row identity in every coordinate
    source = TensorActivations(mlp_in, -mlp_in, block_rows=64)
    buffer = ShuffleBuffer(source, batch_tokens=50, buffer_tokens=300, seed=3)
    seen, positions, batches = [], [], []
    while True:
        positions.append(buffer.position)
        x, y = buffer.next_batch()
        assert x.shape == (2, 50, d) and torch.equal(y, -x)
        batches.append(x)
        if buffer.position.epoch > 0:
            break
        seen += x[0, :, 0].long().tolist()
    # no row twice; only each buffer's remainder smaller than a batch is dropped (3 x 20 + 40 rows)
    assert len(seen) == len(set(seen)) == 900
    assert seen != sorted(seen)
    for k in (0, 5, len(batches) - 2):
        again = ShuffleBuffer(source, batch_tokens=50, buffer_tokens=300, seed=3, position=positions[k])
        assert torch.equal(again.next_batch()[0], batches[k])


def test_harvest_input_errors(model, prompts):
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        harvest_activations(model, prompts, layers=[0, 5], progress=False)
    with pytest.raises(ValueError, match="no prompts given"):
        harvest_activations(model, [], progress=False)
    with pytest.raises(ValueError, match="have no tokens"):
        harvest_activations(model, [[1, 2], []], progress=False)
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=rf"prompt 1 has {context + 1} tokens but the model's context .* is {context}"):
        harvest_activations(model, [[1, 2], [1] * (context + 1)], progress=False)
    with pytest.raises(ValueError, match=r"Linear \(config.model_type None\) is not a supported architecture.*'gpt_neox' \(GPT-NeoX"):
        harvest_activations(torch.nn.Linear(2, 2), [[1]], progress=False)
    source = TensorActivations(torch.zeros(1, 10, 4), torch.zeros(1, 10, 4))
    with pytest.raises(ValueError, match="fewer than one batch"):
        ShuffleBuffer(source, batch_tokens=20, buffer_tokens=40)
    with pytest.raises(ValueError, match="buffer_tokens"):
        ShuffleBuffer(source, batch_tokens=5, buffer_tokens=2)
    with pytest.raises(ValueError, match=r"\[layer, row, d_model\]"):
        TensorActivations(torch.zeros(10, 4), torch.zeros(10, 4))


def test_only_chosen_layers_are_harvested(model, prompts):
    rows = harvest_activations(model, prompts, layers=[1], progress=False).read_all()
    full = harvest_activations(model, prompts, progress=False).read_all()
    assert rows.mlp_in.shape[0] == 1
    torch.testing.assert_close(rows.mlp_out[0], full.mlp_out[1])
    assert BufferPosition().to_dict() == {"epoch": 0, "block": 0, "batch": 0}


def test_the_model_fingerprint_names_the_weights_not_their_path(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name) for name in ("a", "b"))
    assert a.config._name_or_path != b.config._name_or_path
    assert harvest_module.model_fingerprint(a) == harvest_module.model_fingerprint(b)
    with torch.no_grad():
        b.gpt_neox.layers[0].mlp.dense_h_to_4h.weight[0, 0] += 1e-3
    assert harvest_module.model_fingerprint(a) != harvest_module.model_fingerprint(b)
