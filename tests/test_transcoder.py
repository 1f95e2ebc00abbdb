"""Transcoder training: learns a known MLP, saves exactly (weights and both configs), resumes bit
for bit, runs exactly ``steps=`` steps, warns when paused, stops on NaN."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from _tc_models import random_prompts, small_model

import c2srepro.transcoder.harvest as harvest_module
from c2srepro.transcoder import (
    ShuffleBuffer,
    TensorActivations,
    TrainConfig,
    Transcoder,
    TranscoderConfig,
    harvest_activations,
    load_transcoders,
    save_transcoders,
    train_transcoders,
)
from c2srepro._cache import CHECKSUMS_FILENAME, CorruptFileError, record_checksums
from c2srepro.transcoder.model import CONFIG_FILENAME, TRAINING_FILENAME, WEIGHTS_FILENAME
from c2srepro.transcoder.train import CHECKPOINT_FILENAME, l1_factor, lr_factor

QUICK = TrainConfig(buffer_tokens=1024, log_every_steps=10, resample_every_steps=0)


def quick(**fields) -> TrainConfig:
    return dataclasses.replace(QUICK, **fields)


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
    tcfg = quick(expansion_factor=4, lr=3e-3, l1_coefficient=3e-3, tokens_per_batch=256, training_tokens=256 * 300,
                 seed=1, resample_every_steps=100)
    result = train_transcoders(train, tcfg, progress=False)
    transcoder = result.transcoders[0]
    assert result.complete and result.step == 300 and result.train_config == tcfg
    assert fvu(transcoder, *held_out) < 0.03
    with torch.no_grad():
        l0 = (transcoder.encode(held_out[0]) > 0).sum(-1).float().mean()
    assert l0 < 20  # sparse: well under the 64 features (the true MLP has 6 hidden units)
    history = result.history
    assert set(history.columns) >= {"step", "layer", "loss", "mse", "fvu", "l0", "l1", "dead_fraction", "lr"}
    first, last = history.iloc[0], history.iloc[-1]
    assert last.fvu < 0.1 * first.fvu and last.step == 300
    torch.testing.assert_close(transcoder.W_dec.norm(dim=-1), torch.ones(64))  # unit decoder rows
    # The architecture config was built from the activations: d_model inferred, width from the
    # expansion factor, the normalisation scalars of choice 1 (x is scaled by 5, y by 0.02).
    cfg = transcoder.cfg
    assert (cfg.d_model, cfg.d_transcoder, cfg.d_tc, cfg.layer, cfg.activation) == (16, 64, 64, 0, "relu")
    assert (cfg.hook_point_in, cfg.hook_point_out) == ("blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out")
    first_in, first_out = ShuffleBuffer(train, batch_tokens=256, buffer_tokens=1024, seed=1).current_rows()
    assert cfg.input_scale == pytest.approx(float((first_in[0].square().sum(-1).mean() / 16).sqrt()), rel=1e-6)
    assert cfg.output_scale == pytest.approx(float(first_out[0].norm(dim=-1).mean()), rel=1e-6)
    assert cfg.model_name is None and cfg.model_fingerprint is None  # plain tensors: no model known
    assert transcoder.train_config == tcfg


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = TranscoderConfig(d_model=8, d_transcoder=24, layer=3, hook_point_in="in.3", hook_point_out="out.3",
                           input_scale=1.5, output_scale=0.25, model_name="my-model", model_fingerprint="abc")
    tcfg = TrainConfig(expansion_factor=3, lr=2e-3, adam_betas=(0.8, 0.99), device="cpu", seed=4)
    transcoder = Transcoder(cfg, seed=2, train_config=tcfg)
    with torch.no_grad():
        for param in transcoder.parameters():
            param.add_(torch.randn_like(param))
    directory = transcoder.save(tmp_path / "one")
    assert sorted(p.name for p in directory.iterdir()) == sorted([WEIGHTS_FILENAME, CONFIG_FILENAME, TRAINING_FILENAME, CHECKSUMS_FILENAME])
    assert json.loads((directory / CONFIG_FILENAME).read_text()) == cfg.to_dict()
    assert TrainConfig.from_dict(json.loads((directory / TRAINING_FILENAME).read_text())) == tcfg
    loaded = Transcoder.load(directory)
    for name, param in transcoder.named_parameters():
        assert torch.equal(param, getattr(loaded, name))
    assert loaded.cfg == cfg and loaded.train_config == tcfg
    assert TranscoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict(json.loads(json.dumps(tcfg.to_dict()))) == tcfg

    # float64 weights stay float64, and the saved config says so; a hand-made transcoder saved
    # over a trained one leaves no training.json behind.
    wide = Transcoder(TranscoderConfig(d_model=8, d_transcoder=16, layer=3), seed=1).double()
    with torch.no_grad():
        wide.W_enc.add_(1e-12)  # below float32 resolution
    again = Transcoder.load(wide.save(directory))
    assert again.cfg.dtype == "float64" and again.W_enc.dtype == torch.float64 and torch.equal(again.W_enc, wide.W_enc)
    assert again.train_config is None and not (directory / TRAINING_FILENAME).exists()
    assert Transcoder(dataclasses.replace(cfg, dtype="bfloat16")).W_dec.dtype == torch.bfloat16

    save_transcoders({3: transcoder}, tmp_path / "all")
    loaded_all = load_transcoders(tmp_path / "all")
    assert list(loaded_all) == [3] and torch.equal(loaded_all[3].W_dec, transcoder.W_dec)
    assert loaded_all[3].cfg == cfg and loaded_all[3].train_config == tcfg
    with pytest.raises(FileNotFoundError, match=r"no transcoders for layers \[0\]"):
        load_transcoders(tmp_path / "all", layers=[0, 3])
    with pytest.raises(ValueError, match="says it is for layer 3"):
        save_transcoders({0: transcoder}, tmp_path / "wrong")
    (tmp_path / "all" / "layer_03" / CONFIG_FILENAME).write_text(
        json.dumps(dataclasses.replace(cfg, d_transcoder=32).to_dict()))
    with pytest.raises(CorruptFileError, match=r"layer_03/cfg.json is damaged: its sha256 .* differs"):
        load_transcoders(tmp_path / "all")
    (tmp_path / "all" / "layer_03" / CHECKSUMS_FILENAME).unlink()  # as saved before checksums were recorded
    with pytest.raises(ValueError, match="holds weights of shapes"):
        load_transcoders(tmp_path / "all")
    with pytest.raises(FileNotFoundError, match="cfg.json not found.* must be trained again"):
        Transcoder.load(tmp_path / "wrong")


def test_configs_validate_their_fields():
    base = dict(d_model=8, d_transcoder=16, layer=0)
    for field, value, message in [
        ("d_model", 0, "d_model must be a positive integer"),
        ("d_transcoder", 2.5, "d_transcoder must be a positive integer"),
        ("layer", -1, "layer must be an integer >= 0"),
        ("input_scale", 0.0, "input_scale must be a finite number > 0"),
        ("output_scale", float("nan"), "output_scale must be a finite number > 0"),
        ("activation", "gelu", r"activation must be one of \('relu', 'topk', 'batchtopk', 'jumprelu'\)"),
        ("dtype", "float8", "dtype must be one of"),
    ]:
        with pytest.raises(ValueError, match=message):
            TranscoderConfig(**(base | {field: value}))
    with pytest.raises(ValueError, match=r"TranscoderConfig fields \['d_transcoder'\] are missing"):
        TranscoderConfig.from_dict({"d_model": 8, "layer": 0})
    with pytest.raises(ValueError, match="unknown TranscoderConfig fields \\['expansion_factor'\\]"):
        TranscoderConfig.from_dict(base | {"expansion_factor": 2})
    for field, value, message in [
        ("warmup_fraction", 1.5, "warmup_fraction must lie in"),
        ("resample_every_steps", -1, "resample_every_steps must be an integer >= 0"),
        ("adam_betas", (0.9, 1.0), "adam_betas"),
        ("lr", 0.0, "lr must be positive"),
        ("l1_coefficient", -1e-3, "l1_coefficient must be >= 0"),
        ("tokens_per_batch", 0, "tokens_per_batch must be an integer >= 1"),
        ("training_tokens", 6e7, "training_tokens must be an integer >= 1"),
        ("expansion_factor", 0, "expansion_factor must be an integer >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"lr_schedule": "linear"})
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()
    assert TrainConfig().total_steps == 29_297  # the paper's 60M tokens in batches of 2048


def test_layers_train_independently():
    # The stacked multi-layer loop equals one run per layer (choice 7): same rows, own Adam state.
    x0, y0 = relu_mlp_data(3000, seed=0)
    x1, y1 = relu_mlp_data(3000, seed=1)
    source = TensorActivations(torch.cat([x0, x1]), torch.cat([y0, y1]), layers=[0, 4])
    tcfg = quick(expansion_factor=2, lr=1e-3, tokens_per_batch=128, training_tokens=128 * 30)
    both = train_transcoders(source, tcfg, progress=False).transcoders
    alone = train_transcoders(source, tcfg, layers=[4], progress=False).transcoders
    assert list(both) == [0, 4] and list(alone) == [4] and both[4].cfg.layer == 4
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(both[4], name), getattr(alone[4], name), atol=1e-5, rtol=1e-4)


def test_a_layer_trained_alone_is_bit_identical_with_resampling(caplog):
    # Each layer resamples from its own generator, so neither the resampled tokens nor anything
    # else depends on the layers trained beside it (what c2srepro.transcoder.distributed needs).
    rows = harvest_activations(small_model(n_layers=3), random_prompts(30), progress=False).read_all()
    source = TensorActivations(rows.mlp_in, rows.mlp_out, block_rows=200)
    tcfg = quick(expansion_factor=2, lr=2e-3, tokens_per_batch=64, training_tokens=64 * 16, buffer_tokens=256,
                 resample_every_steps=4, resample_until_fraction=1.0)
    with caplog.at_level(logging.INFO, logger="c2srepro.transcoder.train"):
        together = train_transcoders(source, tcfg, progress=False).transcoders
    assert len({r.getMessage().split()[1] for r in caplog.records if "resampled" in r.getMessage()}) >= 2
    for layers in ([2], [0, 2], [1]):
        apart = train_transcoders(source, tcfg, layers=layers, progress=False).transcoders
        _assert_same_weights({layer: together[layer] for layer in layers}, apart)


def test_steps_sets_the_run_length_and_max_steps_pauses_with_a_warning(tmp_path):
    # Under the paper's defaults a run is 29,297 steps; steps= makes a whole short run (its
    # schedule spans it), max_steps= pauses a run: it needs a checkpoint and says so.
    x, y = relu_mlp_data(2000)
    source = TensorActivations(x, y)
    tcfg = TrainConfig(tokens_per_batch=100, log_every_steps=1)
    short = train_transcoders(source, tcfg, steps=6,
                              output_dir=tmp_path / "short", progress=False)
    assert short.complete and short.step == short.total_steps == 6 and short.train_config.training_tokens == 600
    assert short.history["lr"].tolist() == [1e-4 * lr_factor(step, short.train_config) for step in range(6)]
    assert short.history["lr"].iloc[-1] < 0.2 * 1e-4  # decayed: the schedule is the run's
    assert load_transcoders(tmp_path / "short")[0].train_config == short.train_config
    with pytest.raises(ValueError, match="max_steps pauses a run .* needs checkpoint_dir; .* pass steps="):
        train_transcoders(source, tcfg, max_steps=50, progress=False)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        train_transcoders(source, steps=0, progress=False)
    with pytest.warns(UserWarning, match=r"paused at step 2 of 6 .* was not written; call again with checkpoint_dir"):
        paused = train_transcoders(source, tcfg, steps=6, checkpoint_dir=tmp_path / "ckpt",
                                   output_dir=tmp_path / "out", max_steps=2, progress=False)
    assert not paused.complete and paused.step == 2 and not (tmp_path / "out").exists()
    finished = train_transcoders(source, tcfg, steps=6, checkpoint_dir=tmp_path / "ckpt",
                                 output_dir=tmp_path / "out", progress=False)
    assert finished.complete and (tmp_path / "out" / "layer_00" / CONFIG_FILENAME).is_file()
    _assert_same_weights(finished.transcoders, short.transcoders)


def test_wrong_arguments_name_what_is_expected():
    x, y = relu_mlp_data(500)
    source = TensorActivations(x, y)
    with pytest.raises(TypeError, match="takes a TrainConfig .* built from the activations"):
        train_transcoders(source, TranscoderConfig(d_model=16, d_transcoder=32, layer=0), progress=False)
    with pytest.raises(TypeError, match="takes an ActivationSource, got Tensor: harvest_activations"):
        train_transcoders(x, progress=False)
    with pytest.raises(ValueError, match="not among the harvested layers"):
        train_transcoders(source, TrainConfig(tokens_per_batch=100), layers=[2], progress=False)
    with pytest.raises(ValueError, match="all zero"):
        train_transcoders(TensorActivations(x, torch.zeros_like(y)), quick(tokens_per_batch=100), progress=False)


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    x, y = relu_mlp_data(2000)
    tcfg = quick(expansion_factor=2, tokens_per_batch=128, training_tokens=128 * 4)
    train_transcoders(TensorActivations(x, y), tcfg, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT_FILENAME
    state = torch.load(path, weights_only=True)
    state["format"] = "c2srepro-transcoder-training/2"
    torch.save(state, path)
    record_checksums(tmp_path, [CHECKPOINT_FILENAME])  # written whole, by another version
    with pytest.raises(ValueError, match="not a transcoder training checkpoint of this c2srepro .* fresh"):
        train_transcoders(TensorActivations(x, y), tcfg, checkpoint_dir=tmp_path, progress=False)


@pytest.mark.parametrize("checksums", [True, False], ids=["recorded", "saved-before-checksums"])
def test_a_damaged_checkpoint_is_named_and_training_starts_afresh(tmp_path, caplog, checksums):
    x, y = relu_mlp_data(2000)
    tcfg = quick(expansion_factor=2, tokens_per_batch=128, training_tokens=128 * 4)
    reference = train_transcoders(TensorActivations(x, y), tcfg, progress=False)
    with pytest.warns(UserWarning, match="paused"):
        train_transcoders(TensorActivations(x, y), tcfg, checkpoint_dir=tmp_path, max_steps=2, progress=False)
    path = tmp_path / CHECKPOINT_FILENAME
    path.write_bytes(path.read_bytes()[:2000])  # truncated, as by a full disk
    if not checksums:
        (tmp_path / CHECKSUMS_FILENAME).unlink()
    with caplog.at_level("WARNING"):
        again = train_transcoders(TensorActivations(x, y), tcfg, checkpoint_dir=tmp_path, progress=False)
    message = "is damaged: its sha256" if checksums else "cannot be read"
    assert f"{CHECKPOINT_FILENAME} {message}" in caplog.text and "training from step 0" in caplog.text
    _assert_same_weights(reference.transcoders, again.transcoders)


def _assert_same_weights(a: dict[int, Transcoder], b: dict[int, Transcoder]) -> None:
    assert list(a) == list(b)
    for layer in a:
        assert a[layer].cfg == b[layer].cfg and a[layer].train_config == b[layer].train_config
        for name, param in a[layer].named_parameters():
            assert torch.equal(param, getattr(b[layer], name)), (layer, name)


def test_resume_after_interruption_gives_the_same_weights(tmp_path, monkeypatch):
    """Streaming from a model (the buffer is rebuilt by re-running it) with resampling on."""
    model = small_model()
    source = harvest_activations(model, random_prompts(40), batch_prompts=4, progress=False)
    tcfg = TrainConfig(expansion_factor=2, lr=2e-3, tokens_per_batch=64, training_tokens=64 * 24, buffer_tokens=256,
                       log_every_steps=4, checkpoint_every_steps=5, resample_every_steps=6, resample_until_fraction=1.0)
    reference = train_transcoders(source, tcfg, progress=False)
    assert reference.transcoders[0].cfg.model_fingerprint == harvest_module.model_fingerprint(model)

    calls = []
    real_batch = harvest_module.harvest_batch

    def crashing_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # mid-run, after the step-5 checkpoint
            raise RuntimeError("simulated crash")
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "harvest_batch", crashing_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_transcoders(source, tcfg, checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_FILENAME).is_file()
    monkeypatch.setattr(harvest_module, "harvest_batch", real_batch)
    with pytest.warns(UserWarning, match="paused at step"):
        paused = train_transcoders(source, tcfg, checkpoint_dir=tmp_path, max_steps=7, progress=False)
    assert not paused.complete and 7 < paused.step < 24
    resumed = train_transcoders(source, tcfg, checkpoint_dir=tmp_path, output_dir=tmp_path / "out", progress=False)
    assert resumed.complete and resumed.step == 24
    _assert_same_weights(reference.transcoders, resumed.transcoders)
    assert reference.history.equals(resumed.history)
    _assert_same_weights(reference.transcoders, load_transcoders(tmp_path / "out"))


def test_resume_refuses_other_settings(tmp_path):
    x, y = relu_mlp_data(2000)
    source = TensorActivations(x, y)
    tcfg = quick(expansion_factor=2, tokens_per_batch=128, training_tokens=128 * 6)
    with pytest.warns(UserWarning, match="paused"):
        train_transcoders(source, tcfg, checkpoint_dir=tmp_path, max_steps=2, progress=False)
    for change, name in ((dict(lr=1.0), "lr"), (dict(warmup_fraction=0.5), "warmup_fraction"),
                         (dict(expansion_factor=4), "expansion_factor")):
        with pytest.raises(ValueError, match=rf"different \['train_config.{name}'\]"):
            train_transcoders(source, dataclasses.replace(tcfg, **change), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different \['train_config.training_tokens'\]"):
        train_transcoders(source, tcfg, steps=10, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"different \['d_model'\]"):
        train_transcoders(TensorActivations(x[:, :, :8], y[:, :, :8]), tcfg, checkpoint_dir=tmp_path, progress=False)
    # what does not change the weights may change
    done = train_transcoders(source, dataclasses.replace(tcfg, checkpoint_every_steps=3), checkpoint_dir=tmp_path,
                             progress=False)
    assert done.complete


def test_nan_in_activations_stops_training_with_a_clear_error(tmp_path):
    x, y = relu_mlp_data(4000)
    x = torch.cat([x, x]).clone()
    y = torch.cat([y, y]).clone()
    y[1, 3500] = float("nan")  # layer 1, a row past the first buffer
    tcfg = quick(expansion_factor=2, tokens_per_batch=100, training_tokens=100 * 200, buffer_tokens=500,
                 checkpoint_every_steps=1)
    source = TensorActivations(x, y, block_rows=500)
    with pytest.raises(FloatingPointError, match=r"in layer 1 at step \d+ .*non-finite MLP activations"):
        train_transcoders(source, tcfg, checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / CHECKPOINT_FILENAME, weights_only=True)
    assert all(torch.isfinite(p).all() for p in state["params"].values())  # no garbage saved
    y[1, 3500], y[1, 10] = 0.0, float("inf")  # now inside the first buffer
    with pytest.raises(FloatingPointError, match=r"layer 1 in the first buffer"):
        train_transcoders(TensorActivations(x, y), dataclasses.replace(tcfg, buffer_tokens=1024), progress=False)


def test_divergence_is_reported_as_such():
    x, y = relu_mlp_data(2000)
    tcfg = quick(expansion_factor=2, lr=1e30, tokens_per_batch=100, training_tokens=100 * 50, warmup_fraction=0)
    with pytest.raises(FloatingPointError, match=r"layer 0 .*diverged"):
        train_transcoders(TensorActivations(x, y), tcfg, progress=False)


def test_schedule_shapes():
    tcfg = TrainConfig(warmup_fraction=0.1, min_lr_fraction=0.2, l1_warmup_fraction=0.5, tokens_per_batch=10,
                       training_tokens=1000)
    factors = [lr_factor(step, tcfg) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert max(factors) == pytest.approx(1.0) and factors[-1] == pytest.approx(0.2, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert l1_factor(0, tcfg) == pytest.approx(0.02) and l1_factor(60, tcfg) == 1.0


def test_hand_written_gradients_match_autograd():
    from c2srepro.transcoder.train import StackedTranscoders

    torch.manual_seed(0)
    stack = StackedTranscoders(3, d_model=8, d_transcoder=32).double()
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
    tcfg = TrainConfig(expansion_factor=8, tokens_per_batch=64, buffer_tokens=192, log_every_steps=1)
    result = train_transcoders(source, tcfg, steps=3, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert result.complete and sorted(result.transcoders) == list(range(24))
    assert result.transcoders[23].W_enc.shape == (1024, 8192)
    assert len(result.history) == 3 * 24 and result.history[["loss", "fvu", "l0"]].notna().all().all()


@pytest.mark.parametrize("checksums", [True, False], ids=["recorded", "saved-before-checksums"])
def test_a_truncated_transcoder_is_named_with_its_layer(tmp_path, checksums):
    transcoder = Transcoder(TranscoderConfig(d_model=8, d_transcoder=24, layer=1), seed=0)
    save_transcoders({1: transcoder}, tmp_path)
    weights = tmp_path / "layer_01" / WEIGHTS_FILENAME
    weights.write_bytes(weights.read_bytes()[:40])
    if not checksums:
        (tmp_path / "layer_01" / CHECKSUMS_FILENAME).unlink()
    message = r"damaged: its sha256" if checksums else r"\(the layer-1 transcoder\) cannot be read"
    with pytest.raises(CorruptFileError, match=rf"layer_01/transcoder.safetensors.*{message}.*train the layer-1 transcoder again"):
        load_transcoders(tmp_path)
