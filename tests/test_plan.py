"""The time and memory plan: FLOP and parameter counts against torch's own counter and the
published model sizes; the per-chapter units at the paper's sizes; the scaling of measured units."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Gemma2ForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.book import plan as planmod
from c2srepro.book.plan import (
    GEMMA2_2B,
    GRAPH_BATCH,
    PYTHIA_410M,
    Measurements,
    ModelShape,
    Unit,
    Work,
    chapter_work,
    plan,
    plan_table,
    shape_of,
    unit_flops,
)
from c2srepro.book.smoke import gemma2_2b_config

ROOT = Path(__file__).resolve().parents[1]


def _counted_flops(model, tokens: int) -> int:
    torch.manual_seed(0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, tokens)))
    return counter.get_total_flops()


@pytest.mark.parametrize("tokens", [7, 12])
def test_forward_flops_equal_torchs_count(tokens):
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        rotary_pct=0.25, attn_implementation="eager")).eval()
    shape = ModelShape("neox", 2, 64, 256, 4, 16, 4, 100, gated_mlp=False, tied_embeddings=False)
    assert shape.forward_flops(tokens) == _counted_flops(neox, tokens)
    # Gemma-2: GeGLU, grouped key/value heads, tied embeddings.
    gemma = Gemma2ForCausalLM(gemma2_2b_config(n_layers=3, hidden=64, intermediate=192, n_heads=4, n_kv_heads=2,
                                               head_dim=16, vocab_size=100)).eval()
    shape = ModelShape("gemma", 3, 64, 192, 4, 16, 2, 100, gated_mlp=True, tied_embeddings=True)
    assert shape.forward_flops(tokens) == _counted_flops(gemma, tokens)
    # Weights only: the model's parameters less its norm scales (and, for GPT-NeoX, biases).
    norms = sum(p.numel() for n, p in gemma.named_parameters() if "norm" in n)
    assert shape.params == sum(p.numel() for p in gemma.parameters()) - norms


def test_shapes_match_the_published_parameter_counts():
    # Pythia-410m: 405,334,016 with biases and norms; Gemma-2-2B: 2,614,341,888 with its norms.
    assert PYTHIA_410M.params == 405_012_480
    assert abs(PYTHIA_410M.params / 405_334_016 - 1) < 1e-3
    norms = 26 * 4 * 2304 + 2304
    assert GEMMA2_2B.params + norms == 2_614_341_888
    assert PYTHIA_410M.transcoder_params(8) == 24 * 2 * 1024 * 8192


def test_shape_of_the_profiles_models():
    assert shape_of({"model": "vandijklab/C2S-Pythia-410m-cell-type-prediction"}) is PYTHIA_410M
    assert shape_of({"model": "smoke-pythia-410m"}) is PYTHIA_410M
    assert shape_of({"model": "vandijklab/C2S-Scale-Gemma-2-2B"}) is GEMMA2_2B
    smoke = shape_of({"model": "smoke-gemma2-2b"})
    assert (smoke.n_layers, smoke.d_model, smoke.vocab) == (2, 2304, 50_304)
    mini = shape_of({"model": "mini", "mini_layers": 4, "mini_d_model": 128})
    assert (mini.n_layers, mini.d_model, mini.d_mlp) == (4, 128, 512)
    with pytest.raises(ValueError, match="no shape for model 'org/other-7b'.*add the model's ModelShape"):
        shape_of({"model": "org/other-7b"})


def _paper_params(**changes) -> dict:
    params = {
        "01-model": {"heldout_fraction": 0.1, "max_eval_cells": 2000, "top_k": 64},
        "02-transcoders": {"expansion_factor": 8, "training_tokens": 60_000_000},
        "03-validation": {"max_accuracy_cells": None},
        "04-features": {"max_atlas_cells": 2000},
        "06-circuit": {"n_rate_cells": 20, "n_random_ablations": 20, "max_feature_nodes": 512},
        "08-faithfulness": {"max_genes": None, "n_cells": 50, "max_umap_cells": None, "max_feature_nodes": 200,
                            "target": "label_vs_candidates", "compare_targets": ["first_token", "label", "feature"],
                            "k_max": 10},
    }
    for key, value in changes.items():
        chapter, name = key.split("__")
        params[chapter.replace("_", "-")][name] = value
    return params


def test_chapter_work_at_the_papers_sizes():
    work = {w.chapter: w.counts for w in chapter_work(_paper_params(), PYTHIA_410M, cells=704_296)}
    heldout = 70_430  # 10% of the Heart Cell Atlas v2
    assert work["01-model"] == {"forward": 2000}
    assert work["02-transcoders"] == {"harvest_token": 60_000_000, "train_token": 60_000_000}
    assert work["03-validation"] == {"replacement": heldout, "forward": 4 * heldout}
    assert work["04-features"] == {"replacement": 704_296 - heldout + 2000}  # training prompts, max_atlas_cells
    assert work["05-enrichment"] == {"enrich_list": 2 * 3 * 24 * 8192}
    # four questions of the traced cell (TARGET_KINDS), then one graph per rate cell
    assert work["06-circuit"] == {"forward": heldout + 40, "replacement": 24, "graph": 24, "graph_batch": 24 * 8}
    # per cell: 4 targets' graphs; the sentence, 64 removals, 10 orderings' deletion and insertion
    # curves to k = 10, two rank-shift controls; and a gradient x input (3 forwards) per graph
    per_cell = 1 + 64 + 10 * 2 * 10 + 2 * 10 + 3 * 4
    assert work["08-faithfulness"] == {"forward": 2 * heldout + 50 * per_cell, "replacement": 50 * 4, "graph": 50 * 4,
                                       "graph_batch": 50 * 4 * math.ceil(200 / GRAPH_BATCH)}
    capped = {w.chapter: w.counts for w in chapter_work(
        _paper_params(**{"03_validation__max_accuracy_cells": 100, "08_faithfulness__max_genes": 10}),
        PYTHIA_410M, cells=704_296)}
    assert capped["03-validation"]["forward"] == 2 * heldout + 200
    assert capped["08-faithfulness"]["forward"] == 2 * heldout + 50 * (1 + 10 + 10 * 2 * 10 + 2 * 10 + 3 * 4)
    one_target = {w.chapter: w.counts for w in chapter_work(
        _paper_params(**{"08_faithfulness__compare_targets": ["label_vs_candidates"], "08_faithfulness__k_max": 3}),
        PYTHIA_410M, cells=704_296)}
    assert one_target["08-faithfulness"]["graph"] == 50
    assert one_target["08-faithfulness"]["forward"] == 2 * heldout + 50 * (1 + 64 + 10 * 2 * 3 + 2 * 3 + 3)


def _measurements(**seconds) -> Measurements:
    def unit(name: str) -> Unit:
        return Unit(seconds.get(name, 1.0), 1024.0, "test")

    return Measurements(
        forward=unit("forward"), replacement=unit("replacement"), graph_batch=unit("graph_batch"),
        graph_fixed=unit("graph_fixed"), train_token=unit("train_token"), harvest_token=unit("harvest_token"),
        enrich_list=unit("enrich_list"), tokens=300, tokens_per_gene=3.0, template_tokens=60.0, expansion=8,
    )


def test_plan_scales_measured_units_by_count_and_flops():
    m = _measurements(forward=2.0, replacement=3.0, enrich_list=0.001)
    work = [Work("a", {"forward": 10, "replacement": 4}, ""), Work("e", {"enrich_list": 1000}, "")]
    table = plan_table(work, PYTHIA_410M, m, tokens=300, expansion=8, gpu_tflops=100.0, utilisation=0.5).set_index(
        "chapter")
    # At the measured shape and prompt length: count x measured seconds, exactly.
    assert table.loc["a", "cpu_hours"] * 3600 == pytest.approx(10 * 2.0 + 4 * 3.0, rel=1e-12)
    assert table.loc["a", "cpu_figures"] == "measured"
    flops = 10 * PYTHIA_410M.forward_flops(300) + 4 * unit_flops("replacement", PYTHIA_410M, 300, 8)
    assert table.loc["a", "tflop"] == pytest.approx(flops / 1e12, rel=1e-12)
    assert table.loc["a", "gpu_hours"] * 3600 == pytest.approx(flops / (100e12 * 0.5), rel=1e-12)
    # The enrichment runs on the CPU: the same time on either side, no FLOPs, measured.
    assert table.loc["e", "cpu_hours"] == table.loc["e", "gpu_hours"] == pytest.approx(1.0 / 3600)
    assert table.loc["e", "tflop"] == 0 and table.loc["e", "cpu_figures"] == "measured"
    # Another shape: each unit's time scales with its FLOPs, and the figure is marked estimated.
    gemma = plan_table(work, GEMMA2_2B, m, tokens=300, expansion=8).set_index("chapter")
    expected = (10 * 2.0 * GEMMA2_2B.forward_flops(300) / PYTHIA_410M.forward_flops(300)
                + 4 * 3.0 * unit_flops("replacement", GEMMA2_2B, 300, 8) / unit_flops("replacement", PYTHIA_410M, 300, 8))
    assert gemma.loc["a", "cpu_hours"] * 3600 == pytest.approx(expected, rel=1e-12)
    assert gemma.loc["a", "cpu_figures"].startswith("estimated")
    assert gemma.loc["a", "cpu_peak_gb"] > table.loc["a", "cpu_peak_gb"]
    # A longer prompt costs more than linearly (attention is quadratic in it).
    longer = plan_table(work[:1], PYTHIA_410M, m, tokens=600, expansion=8).iloc[0]
    assert 2 * table.loc["a", "cpu_hours"] < longer["cpu_hours"]
    with pytest.raises(ValueError, match=r"utilisation must be in \(0, 1\]"):
        plan_table(work, PYTHIA_410M, m, tokens=300, expansion=8, utilisation=0)


def test_training_flops_per_token_match_the_bench_count():
    # bench_transcoder counts 10 * tokens * d_model * d_tc * layers for the five dense products.
    assert unit_flops("train_token", PYTHIA_410M, 300, 8) == 10 * 1024 * 8192 * 24
    assert unit_flops("graph_batch", PYTHIA_410M, 300, 8) == GRAPH_BATCH * 300 * 24 * (
        2 * PYTHIA_410M.layer_params + 2 * 1024 * 8192)


def _write_measurements(folder: Path) -> None:
    folder.mkdir()
    (folder / planmod.UNITS_FILE).write_text(json.dumps({
        "forward_s": 1.0, "forward_peak_rss_mb": 3000, "replacement_s": 2.0, "replacement_peak_rss_mb": 4000,
        "graph_row_batch_s": 10.0, "graph_fixed_s": 5.0, "graph_peak_rss_mb": 8000, "graph_batch_size": GRAPH_BATCH,
        "n_pos": 300, "tokens_per_gene": 3.0, "template_tokens": 60.0}))
    (folder / planmod.TRAINING_FILE).write_text(json.dumps({"expansion_factor": 8, "410m": {
        "train_tokens_per_s": 50.0, "train_peak_rss_mb": 12000, "harvest_streaming_tokens_per_s": 250.0,
        "harvest_peak_rss_mb": 3000}}))
    (folder / planmod.TABLE4_FILE).write_text(json.dumps({"lists": 1000, "ways": {
        "streamed": {"wall_s": 0.5, "peak_rss_mb": 500}}}))


def test_plan_of_the_paper_profile_reads_the_profile_and_the_measurements(tmp_path):
    _write_measurements(tmp_path / "units")
    table, sizes = plan("paper", root=ROOT, measurements=tmp_path / "units")
    assert sizes["cells"] == 704_296 and sizes["prompt_tokens"] == 60 + 3 * 64  # top_k 64 in paper.yml
    assert sizes["params"] == PYTHIA_410M.params
    rows = table.set_index("chapter")
    assert list(rows.index) == list(planmod.CHAPTERS)
    # 60M tokens at the measured 50 and 250 tokens/s (harvest FLOP-scaled from bench_transcoder's
    # 270-token prompts to 252 tokens).
    harvest = 60e6 / 250 * PYTHIA_410M.forward_flops(252) / 252 / (PYTHIA_410M.forward_flops(270) / 270)
    assert rows.loc["02-transcoders", "cpu_hours"] * 3600 == pytest.approx(60e6 / 50 + harvest, rel=1e-9)
    assert rows.loc["05-enrichment", "cpu_hours"] * 3600 == pytest.approx(2 * 3 * 24 * 8192 * 0.5 / 1000)
    assert rows.loc["02-transcoders", "cpu_peak_gb"] == pytest.approx(12000 / 1024)
    gemma, sizes = plan("c2s-scale-2b", root=ROOT, measurements=tmp_path / "units", cells=1000)
    assert sizes["cells"] == 1000 and sizes["shape"]["name"] == "Gemma-2-2B"
    assert (gemma["cpu_hours"] > 0).all() and (gemma["gpu_hours"] > 0).all()
    missing = tmp_path / "empty"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="measure it with `python bench/bench_plan_units.py"):
        plan("paper", root=ROOT, measurements=missing)
