"""Transcoder training: learns a known MLP, saves exactly, resumes bit for bit, stops on NaN."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from _tc_models import random_prompts, small_model

import c2srepro.transcoder.harvest as harvest_module
from c2srepro.transcoder import (
    TensorActivations,
    TrainConfig,
    Transcoder,
    TranscoderConfig,
    harvest_activations,
    load_transcoders,
    save_transcoders,
    train_transcoders,
)
from c2srepro.transcoder.train import CHECKPOINT_FILENAME, l1_factor, lr_factor

QUICK = TrainConfig(buffer_tokens=1024, log_every_steps=10, resample_every_steps=0)


def relu_mlp_data(n: int, *, d: int = 16, hidden: int = 6, seed: int = 0):
    """x -> W2 relu(W1 x + b1) + b2 with inputs scaled by 5 and outputs by 0.02 (so that the
    normalisation has to be folded back correctly). Returns ([1, n, d], [1, n, d])."""
    g = torch.Generator().manual_seed(seed)
    w1, b1 = torch.randn(d, hidden, generator=g), 0.3 * torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(hidden, d, generator=g), torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g)
    y = torch.relu(x @ w1 + b1) @ w2 + b2
    return 5.0 * x.unsqueeze(0), 0.02 * y.unsqueeze(0)


def fvu(transcoder: Transcoder, x, y) -> float:
    with torch.no_grad():
        return float((transcoder(x) - y).square().sum() / (y - y.mean(0)).square().sum())


def test_transcoder_learns_a_known_relu_mlp():
    x, y = relu_mlp_data(12_000)
    train, held_out = TensorActivations(x[:, :10_000], y[:, :10_000]), (x[0, 10_000:], y[0, 10_000:])
    cfg = TranscoderConfig(d_model=16, expansion_factor=4, lr=3e-3, l1_coefficient=3e-3, tokens_per_batch=256,
                           training_tokens=256 * 300, seed=1)
    result = train_transcoders(train, cfg, train_config=dataclasses.replace(QUICK, resample_every_steps=100),
                               progress=False)
    transcoder = result.transcoders[0]
    assert result.complete and result.step == 300
    assert fvu(transcoder, *held_out) < 0.03
    with torch.no_grad():
        l0 = (transcoder.encode(held_out[0]) > 0).sum(-1).float().mean()
    assert l0 < 20  # sparse: well under the 64 features (the true MLP has 6 hidden units)
    history = result.history
    assert set(history.columns) >= {"step", "layer", "loss", "mse", "fvu", "l0", "l1", "dead_fraction", "lr"}
    first, last = history.iloc[0], history.iloc[-1]
    assert last.fvu < 0.1 * first.fvu and last.step == 300
    # decoder rows stay unit norm; the saved config records the scales and the recipe
    torch.testing.assert_close(transcoder.W_dec.norm(dim=-1), torch.ones(64))
    assert transcoder.cfg.extra["training"]["resample_every_steps"] == 100
    assert transcoder.cfg.extra["trained_tokens"] == 256 * 300


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = TranscoderConfig(d_model=8, expansion_factor=2, layer=3, extra={"input_scale": 1.5})
    transcoder = Transcoder(cfg)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.add_(torch.randn_like(param))
    loaded = Transcoder.load(transcoder.save(tmp_path / "one"))
    for name, param in transcoder.named_parameters():
        assert torch.equal(param, getattr(loaded, name))
    assert loaded.cfg == cfg
    save_transcoders({3: transcoder}, tmp_path / "all")
    again = load_transcoders(tmp_path / "all")
    assert list(again) == [3] and torch.equal(again[3].W_dec, transcoder.W_dec)
    with pytest.raises(FileNotFoundError, match=r"no transcoders for layers \[0\]"):
        load_transcoders(tmp_path / "all", layers=[0, 3])
    with pytest.raises(ValueError, match="says it is for layer 3"):
        save_transcoders({0: transcoder}, tmp_path / "wrong")


def test_layers_train_independently():
    # The stacked multi-layer loop equals one run per layer (choice 7): same rows, own Adam state.
    x0, y0 = relu_mlp_data(3000, seed=0)
    x1, y1 = relu_mlp_data(3000, seed=1)
    source = TensorActivations(torch.cat([x0, x1]), torch.cat([y0, y1]), layers=[0, 4])
    cfg = TranscoderConfig(d_model=16, expansion_factor=2, lr=1e-3, tokens_per_batch=128, training_tokens=128 * 30)
    both = train_transcoders(source, cfg, train_config=QUICK, progress=False).transcoders
    alone = train_transcoders(source, cfg, train_config=QUICK, layers=[4], progress=False).transcoders
    assert list(both) == [0, 4] and list(alone) == [4] and both[4].cfg.layer == 4
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(both[4], name), getattr(alone[4], name), atol=1e-5, rtol=1e-4)


def test_a_layer_trained_alone_is_bit_identical_with_resampling(caplog):
    # Each layer resamples from its own generator, so neither the resampled tokens nor anything
    # else depends on the layers trained beside it (what c2srepro.transcoder.distributed needs).
    rows = harvest_activations(small_model(n_layers=3), random_prompts(30), progress=False).read_all()
    source = TensorActivations(rows.mlp_in, rows.mlp_out, block_rows=200)
    cfg = TranscoderConfig(d_model=64, expansion_factor=2, lr=2e-3, tokens_per_batch=64, training_tokens=64 * 16)
    tcfg = dataclasses.replace(QUICK, buffer_tokens=256, resample_every_steps=4, resample_until_fraction=1.0)
    with caplog.at_level(logging.INFO, logger="c2srepro.transcoder.train"):
        together = train_transcoders(source, cfg, train_config=tcfg, progress=False).transcoders
    assert len({r.getMessage().split()[1] for r in caplog.records if "resampled" in r.getMessage()}) >= 2
    for layers in ([2], [0, 2], [1]):
        apart = train_transcoders(source, cfg, train_config=tcfg, layers=layers, progress=False).transcoders
        _assert_same_weights({layer: together[layer] for layer in layers}, apart)


def test_checkpoints_of_the_first_format_load_only_when_finished(tmp_path):
    # Format 1 had one resampling generator for all layers: a finished run still loads, an
    # unfinished one cannot be continued exactly and is refused.
    x, y = relu_mlp_data(2000)
    cfg = TranscoderConfig(d_model=16, expansion_factor=2, tokens_per_batch=128, training_tokens=128 * 4)
    done = train_transcoders(TensorActivations(x, y), cfg, train_config=QUICK, checkpoint_dir=tmp_path / "done",
                             progress=False)
    train_transcoders(TensorActivations(x, y), cfg, train_config=QUICK, checkpoint_dir=tmp_path / "half",
                      max_steps=2, progress=False)
    for name in ("done", "half"):
        path = tmp_path / name / CHECKPOINT_FILENAME
        state = torch.load(path, weights_only=True)
        state["format"] = "c2srepro-transcoder-training/1"
        state["generator"] = state.pop("generators")[0]
        torch.save(state, path)
    again = train_transcoders(TensorActivations(x, y), cfg, train_config=QUICK, checkpoint_dir=tmp_path / "done",
                              progress=False)
    _assert_same_weights(done.transcoders, again.transcoders)
    with pytest.raises(ValueError, match="unfinished checkpoint of an older c2srepro"):
        train_transcoders(TensorActivations(x, y), cfg, train_config=QUICK, checkpoint_dir=tmp_path / "half",
                          progress=False)


def _assert_same_weights(a: dict[int, Transcoder], b: dict[int, Transcoder]) -> None:
    assert list(a) == list(b)
    for layer in a:
        for name, param in a[layer].named_parameters():
            assert torch.equal(param, getattr(b[layer], name)), (layer, name)


def test_resume_after_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    """Streaming from a model (the buffer is rebuilt by re-running it) with resampling on."""
    model = small_model()
    source = harvest_activations(model, random_prompts(40), batch_prompts=4, progress=False)
    cfg = TranscoderConfig(d_model=64, expansion_factor=2, lr=2e-3, tokens_per_batch=64, training_tokens=64 * 24)
    tcfg = TrainConfig(buffer_tokens=256, log_every_steps=4, checkpoint_every_steps=5, resample_every_steps=6,
                       resample_until_fraction=1.0)
    reference = train_transcoders(source, cfg, train_config=tcfg, progress=False)

    calls = []
    real_batch = harvest_module.harvest_batch

    def crashing_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # mid-run, after the step-5 checkpoint
            raise RuntimeError("simulated crash")
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "harvest_batch", crashing_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_transcoders(source, cfg, train_config=tcfg, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_FILENAME).is_file()
    monkeypatch.setattr(harvest_module, "harvest_batch", real_batch)
    paused = train_transcoders(source, cfg, train_config=tcfg, checkpoint_dir=tmp_path, max_steps=7, progress=False)
    assert not paused.complete and 7 < paused.step < 24
    resumed = train_transcoders(source, cfg, train_config=tcfg, checkpoint_dir=tmp_path, output_dir=tmp_path / "out",
                                progress=False)
    assert resumed.complete and resumed.step == 24
    _assert_same_weights(reference.transcoders, resumed.transcoders)
    assert reference.history.equals(resumed.history)
    _assert_same_weights(reference.transcoders, load_transcoders(tmp_path / "out"))


def test_resume_refuses_other_settings(tmp_path):
    x, y = relu_mlp_data(2000)
    source = TensorActivations(x, y)
    cfg = TranscoderConfig(d_model=16, expansion_factor=2, tokens_per_batch=128, training_tokens=128 * 6)
    train_transcoders(source, cfg, train_config=QUICK, checkpoint_dir=tmp_path, max_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"different \['transcoder_config'\]"):
        train_transcoders(source, dataclasses.replace(cfg, lr=1.0), train_config=QUICK, checkpoint_dir=tmp_path,
                          progress=False)
    with pytest.raises(ValueError, match=r"train_config.warmup_fraction"):
        train_transcoders(source, cfg, train_config=dataclasses.replace(QUICK, warmup_fraction=0.5),
                          checkpoint_dir=tmp_path, progress=False)


def test_nan_in_activations_stops_training_with_a_clear_error(tmp_path):
    x, y = relu_mlp_data(4000)
    x = torch.cat([x, x]).clone()
    y = torch.cat([y, y]).clone()
    y[1, 3500] = float("nan")  # layer 1, a row past the first buffer
    cfg = TranscoderConfig(d_model=16, expansion_factor=2, tokens_per_batch=100, training_tokens=100 * 200)
    tcfg = dataclasses.replace(QUICK, buffer_tokens=500, checkpoint_every_steps=1)
    source = TensorActivations(x, y, block_rows=500)
    with pytest.raises(FloatingPointError, match=r"in layer 1 at step \d+ .*non-finite MLP activations"):
        train_transcoders(source, cfg, train_config=tcfg, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT_FILENAME, weights_only=True)
    assert all(torch.isfinite(p).all() for p in state["params"].values())  # no garbage saved
    y[1, 3500], y[1, 10] = 0.0, float("inf")  # now inside the first buffer
    with pytest.raises(FloatingPointError, match=r"layer 1 in the first buffer"):
        train_transcoders(TensorActivations(x, y), cfg, train_config=QUICK, progress=False)


def test_divergence_is_reported_as_such():
    x, y = relu_mlp_data(2000)
    cfg = TranscoderConfig(d_model=16, expansion_factor=2, lr=1e30, tokens_per_batch=100, training_tokens=100 * 50)
    with pytest.raises(FloatingPointError, match=r"layer 0 .*diverged"):
        train_transcoders(TensorActivations(x, y), cfg, train_config=dataclasses.replace(QUICK, warmup_fraction=0),
                          progress=False)


def test_schedule_shapes():
    tcfg = TrainConfig(warmup_fraction=0.1, min_lr_fraction=0.2, l1_warmup_fraction=0.5)
    factors = [lr_factor(step, 100, tcfg) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0) and factors[-1] == pytest.approx(0.2, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert l1_factor(0, 100, tcfg) == pytest.approx(0.02) and l1_factor(60, 100, tcfg) == 1.0


def test_config_validation_messages():
    with pytest.raises(ValueError, match="warmup_fraction must lie in"):
        TrainConfig(warmup_fraction=1.5)
    with pytest.raises(ValueError, match="resample_every_steps must be >= 0"):
        TrainConfig(resample_every_steps=-1)
    with pytest.raises(ValueError, match="adam_betas"):
        TrainConfig(adam_betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"lr_schedule": "linear"})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    x, y = relu_mlp_data(500)
    source = TensorActivations(x, y)
    with pytest.raises(ValueError, match="config.d_model is 32 but the activations have d_model 16"):
        train_transcoders(source, TranscoderConfig(d_model=32), progress=False)
    with pytest.raises(ValueError, match="not among the harvested layers"):
        train_transcoders(source, TranscoderConfig(d_model=16, tokens_per_batch=100), layers=[2], progress=False)
    with pytest.raises(ValueError, match="all zero"):
        train_transcoders(TensorActivations(x, torch.zeros_like(y)), TranscoderConfig(d_model=16, tokens_per_batch=100),
                          train_config=QUICK, progress=False)


def test_hand_written_gradients_match_autograd():
    from c2srepro.transcoder.train import StackedTranscoders

    torch.manual_seed(0)
    stack = StackedTranscoders([TranscoderConfig(d_model=8, expansion_factor=4, layer=i) for i in range(3)]).double()
    with torch.no_grad():
        stack.b_enc.normal_(0, 0.3)  # some features off, some on
        stack.b_dec.normal_()
    x, y = torch.randn(3, 50, 8, dtype=torch.float64), torch.randn(3, 50, 8, dtype=torch.float64)
    terms = stack.loss_and_grads(x, y, 0.05)
    mine = {name: p.grad.clone() for name, p in stack.named_parameters()}
    for p in stack.parameters():
        p.grad = None
    z, y_hat = stack(x)
    loss = (y_hat - y).square().sum(-1).mean(-1) / 8 + 0.05 * z.abs().sum(-1).mean(-1)  # eq. 4, rescaled
    loss.sum().backward()
    torch.testing.assert_close(terms["loss"], loss.detach())
    for name, p in stack.named_parameters():
        torch.testing.assert_close(mine[name], p.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(terms["counts"], (z > 0).sum(1).to(terms["counts"].dtype))


@pytest.mark.slow
def test_pythia_410m_shape_harvest_and_train(tmp_path):
    """A few harvest + training steps at the paper's shape: a random GPT-NeoX with Pythia-410m's
    config (24 layers, hidden 1024, 16 heads, MLP 4096, rotary 25%, vocab 50304), expansion 8."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096, rotary_pct=0.25, use_parallel_residual=True,
                           max_position_embeddings=2048)
    model = GPTNeoXForCausalLM(config).eval()
    prompts = [torch.randint(0, 50304, (96,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    source = harvest_activations(model, prompts, directory=tmp_path / "acts", batch_prompts=2, progress=False)
    assert source.n_rows == 192 and source.layers == tuple(range(24))
    cfg = TranscoderConfig(d_model=1024, expansion_factor=8, tokens_per_batch=64, training_tokens=64 * 3)
    result = train_transcoders(source, cfg, train_config=TrainConfig(buffer_tokens=192, log_every_steps=1),
                               checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.complete and sorted(result.transcoders) == list(range(24))
    assert result.transcoders[23].W_enc.shape == (1024, 8192)
    assert len(result.history) == 3 * 24 and result.history[["loss", "fvu", "l0"]].notna().all().all()
