"""SAELens and circuit-tracer transcoder formats: exact round trips, layouts, refusals, SAELens itself."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from c2srepro._cache import cache_dir
from c2srepro.transcoder import Transcoder, TranscoderConfig
from c2srepro.transcoder.formats import (
    export_circuit_tracer,
    export_saelens,
    import_circuit_tracer,
    import_saelens,
)

EXPORTABLE = [("relu", False), ("relu", True), ("jumprelu", False), ("jumprelu", True), ("batchtopk", True)]


def random_transcoder(activation, skip, *, layer=0, d_model=8, d_tc=24, seed=0):
    cfg = TranscoderConfig(d_model=d_model, d_transcoder=d_tc, layer=layer, activation=activation,
                           k=4 if activation in ("topk", "batchtopk") else None, skip=skip,
                           input_scale=1.5, output_scale=0.25, model_name="tiny")
    tc = Transcoder(cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
        if tc.threshold is not None:
            tc.threshold.copy_(torch.rand(d_tc, generator=generator))
    return tc


def assert_same(a: Transcoder, b: Transcoder, x: torch.Tensor) -> None:
    assert a.cfg == b.cfg
    assert dict(a.named_parameters()).keys() == dict(b.named_parameters()).keys()
    for name, p in a.named_parameters():
        assert torch.equal(p, getattr(b, name)), name
    assert torch.equal(a(x), b(x)) and torch.equal(a.encode(x), b.encode(x))


@pytest.mark.parametrize("activation,skip", EXPORTABLE)
def test_saelens_round_trip_is_exact(activation, skip, tmp_path):
    tc = random_transcoder(activation, skip)
    export_saelens(tc, tmp_path / "sae")
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    expected = {"relu": "transcoder", "jumprelu": "jumprelu_transcoder", "batchtopk": "jumprelu_transcoder"}[activation]
    assert config["architecture"] == (expected.replace("transcoder", "skip_transcoder") if skip else expected)
    assert (config["d_in"], config["d_sae"], config["d_out"]) == (8, 24, 8)
    assert config["metadata"]["hook_name"] == tc.cfg.hook_point_in
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert weights["W_enc"].shape == (8, 24) and weights["W_dec"].shape == (24, 8)
    if skip:  # SAELens' layout: x @ W_skip.T
        assert torch.equal(weights["W_skip"], tc.W_skip.detach().T)
    back = import_saelens(tmp_path / "sae")
    assert_same(tc, back, torch.randn(5, 8))


@pytest.mark.parametrize("activation,skip", EXPORTABLE)
def test_circuit_tracer_round_trip_is_exact(activation, skip, tmp_path):
    tcs = {layer: random_transcoder(activation, skip, layer=layer, seed=layer) for layer in range(3)}
    export_circuit_tracer(tcs, tmp_path / "ct")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["transcoders"] == ["layer_0.safetensors", "layer_1.safetensors", "layer_2.safetensors"]
    weights = load_file(str(tmp_path / "ct" / "layer_1.safetensors"))
    # circuit-tracer's layout: F.linear(x, W_enc) with W_enc [d_tc, d_model]
    assert torch.equal(weights["W_enc"], tcs[1].W_enc.detach().T)
    assert ("activation_function.threshold" in weights) == (activation != "relu")
    back = import_circuit_tracer(tmp_path / "ct")
    x = torch.randn(5, 8)
    for layer in range(3):
        assert_same(tcs[layer], back[layer], x)


def test_a_foreign_circuit_tracer_file_reads_as_relu_or_jumprelu(tmp_path):
    tc = random_transcoder("jumprelu", True, layer=0)
    export_circuit_tracer({0: tc}, tmp_path / "ct")
    path = tmp_path / "ct" / "layer_0.safetensors"
    save_file(load_file(str(path)), str(path))  # drop c2srepro's metadata: as circuit-tracer's own files
    back = import_circuit_tracer(tmp_path / "ct")[0]
    assert back.cfg.activation == "jumprelu" and back.cfg.skip and back.cfg.input_scale == 1.0
    x = torch.randn(5, 8)
    assert torch.equal(back(x), tc(x))


def test_a_foreign_saelens_file_takes_its_layer_from_the_hook_name(tmp_path):
    tc = random_transcoder("relu", True, layer=2)
    export_saelens(tc, tmp_path / "sae")
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del config["metadata"]["c2srepro"]
    config["metadata"]["hook_name"] = "blocks.2.ln2.hook_normalized"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config))
    back = import_saelens(tmp_path / "sae")
    assert back.cfg.layer == 2 and back.cfg.hook_point_in == "blocks.2.ln2.hook_normalized"
    x = torch.randn(5, 8)
    assert torch.equal(back(x), tc(x))


def test_formats_refuse_what_they_cannot_hold(tmp_path):
    topk = random_transcoder("topk", False)
    with pytest.raises(ValueError, match="SAELens has no TopK transcoder"):
        export_saelens(topk, tmp_path / "a")
    with pytest.raises(ValueError, match="circuit-tracer has no TopK transcoder"):
        export_circuit_tracer({0: topk}, tmp_path / "b")
    with pytest.raises(ValueError, match=r"every layer 0..2, got layers \[0, 2\]"):
        export_circuit_tracer({0: random_transcoder("relu", False), 2: random_transcoder("relu", False, layer=2)}, tmp_path / "c")
    export_saelens(random_transcoder("relu", False), tmp_path / "sae")
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config | {"architecture": "gated"}))
    with pytest.raises(ValueError, match="is a SAELens 'gated' model, not a transcoder c2srepro can load"):
        import_saelens(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config | {"architecture": "jumprelu_transcoder"}))
    with pytest.raises(ValueError, match="contradicts its c2srepro config"):
        import_saelens(tmp_path / "sae")
    with pytest.raises(FileNotFoundError, match="is .* a SAELens SAE folder"):
        import_saelens(tmp_path / "nothing")


# --- SAELens itself ---------------------------------------------------------------------------
# sae-lens's pins conflict with the project's (it needs transformer-lens, datasets, wandb, ...), so
# the test installs it once, without dependency resolution, into a scratch folder of the cache and
# appends that folder to sys.path (the project's own packages keep precedence). The versions are
# those the test was written against; pip's registry is reachable in CI and on developer machines.
SAELENS_PACKAGES = (
    "sae-lens==6.54.12", "transformer-lens==2.18.0", "accelerate==1.15.0", "babe==0.0.8", "beartype==0.23.1",
    "better-abc==0.0.3", "datasets==5.2.0", "dill==0.4.1", "docstring-parser==0.18.0", "einops==0.8.2",
    "fancy-einsum==0.0.3", "fsspec==2026.9.0", "multiprocess==0.70.19", "narwhals==2.29.0", "nltk==3.10.4",
    "protobuf==7.36.2", "pyarrow==26.0.1", "sentencepiece==0.2.3", "simple-parsing==0.1.9",
    "transformers-stream-generator==0.0.5", "typeguard==4.6.1", "wandb==0.31.0", "xxhash==4.1.0",
)


def _sae_lens():
    target = cache_dir("scratch") / "sae-lens-6.54.12"
    if not (target / "sae_lens").is_dir():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(partial),
                                 *SAELENS_PACKAGES], capture_output=True, text=True)
        assert result.returncode == 0, f"pip install of sae-lens into {partial} failed: {result.stderr[-800:]}"
        partial.rename(target)
    if str(target) not in sys.path:
        sys.path.append(str(target))
    import sae_lens

    return sae_lens


@pytest.mark.parametrize("activation,skip", EXPORTABLE)
def test_saelens_loads_an_export_and_computes_the_same(activation, skip, tmp_path):
    sae_lens = _sae_lens()
    tc = random_transcoder(activation, skip, d_model=16, d_tc=48)
    export_saelens(tc, tmp_path / "sae")
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
    # Both sides in float64: the two codes sum in different orders, and float32 rounding of that order
    # differs between CPUs (2e-6 on some), while float64 leaves only the order's ~1e-14.
    with torch.no_grad():
        sae64, tc64, x64 = sae.to(torch.float64), random_transcoder(activation, skip, d_model=16, d_tc=48).double(), x.double()
        torch.testing.assert_close(sae64.encode(x64), tc64.encode(x64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sae64(x64), tc64(x64), rtol=1e-12, atol=1e-12)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    # and back: SAELens' own save_model output imports to the same transcoder
    sae.save_model(str(tmp_path / "resaved"))
    back = import_saelens(tmp_path / "resaved", layer=0)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tc(x), rtol=0, atol=0)
