"""``python -m c2srepro.book plan --profile P``: per chapter, the work a profile asks for, its time and
memory on this machine's CPU and its time on a GPU, before anything runs.

1. Sizes. A chapter's parameters are its notebook's defaults under the profile's values, merged as
   the runner merges them. The model's shape follows chapter 1's ``model`` (``shape_of``); the
   number of cells the dataset's (the file's own count when it exists here, else
   ``DATASET_CELLS``), split by ``heldout_fraction``; a prompt's tokens
   ``template_tokens + tokens_per_gene * top_k`` (measured on the smoke atlas with the Pythia BPE).
2. Work, in units (``UNITS``): prompt forward passes (prediction, validation, UMAP, gene
   removals), replacements (a forward pass with every layer's transcoder encoding: validation,
   feature statistics), training tokens (harvest and transcoder steps), attribution graphs and
   their row batches, enrichment gene lists. Table 4 counts every feature of every layer as live
   (an upper bound), three lists each (features and two nulls) for each of two backgrounds.
3. CPU time = units x the unit's time measured on this machine at the Pythia-410m shape
   (``bench/throughput``: ``bench_plan_units.py``, ``bench_transcoder.py``, ``bench_table4.py``,
   each file with its provenance; ``plan`` only reads them). For another shape or prompt length
   the unit time is scaled by the ratio of FLOPs and the peak memory by the ratio of the bytes of
   weights and transcoders: those figures are estimates, and the table says so.
4. GPU time = FLOPs / (peak rate x utilisation): by default an H100 SXM's dense bf16 tensor rate
   (989 TFLOP/s) at 35%, an estimate for large batches (small ones are bound by latency, so it is
   a floor). Enrichment runs on the CPU in any case: its GPU column repeats its CPU time. GPU
   memory: weights in bf16, transcoders in float32 (with gradients and Adam's two moments while
   training), and the largest activation buffer of the chapter, estimated.

FLOPs (per prompt of T tokens, L layers, width d, transcoder width d_tc; biases and norms left out):
   forward = 2 T (L P_layer + d V) + 4 L T^2 d_attn   (P_layer: attention and MLP weights, V vocabulary)
   replacement = forward + 4 T L d d_tc               (encoder and decoder of every layer)
   training token = 10 L d d_tc                       (five dense products, as bench_transcoder counts)
   graph row = 2 T L P_layer + 2 T L d d_tc          (a backward pass to the inputs, encoder reads)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from c2srepro.attribution.replacement import TARGET_KINDS
from c2srepro.biology.faithfulness import PREDICTORS
from c2srepro.book.runner import declared_parameters, load_profile, project_root, resolve_parameters

MEASUREMENTS = Path("bench/throughput")
TRAINING_FILE = "cpu-2core-410m.json"  # bench_transcoder.py --shapes 410m
UNITS_FILE = "cpu-2core-units-410m.json"  # bench_plan_units.py --preset 410m
TABLE4_FILE = "cpu-2core-table4.json"  # bench_table4.py
H100_BF16_TFLOPS = 989.0  # H100 SXM, dense bf16 tensor cores
DEFAULT_UTILISATION = 0.35
GRAPH_BATCH = 64  # build_graph's rows per backward pass
HARVEST_PROMPT_TOKENS = 270  # bench_transcoder.py's prompt length for its harvest rate
# Cells per dataset when the file is not on this machine: data/manifest.yml (Heart Cell Atlas v2),
# scanpy's pbmc68k_reduced, the smoke atlas (12 types x 4 cells, c2srepro.book.smoke).
DATASET_CELLS = {"Global_raw.h5ad": 704_296, "pbmc68k_reduced": 700, "smoke-atlas": 48}
CHAPTERS = ("01-model", "02-transcoders", "03-validation", "04-features", "05-enrichment", "06-circuit",
            "08-faithfulness")
NULLS_PER_FEATURE = 2  # chapter 05's nulls: random and permutation
BACKGROUNDS = 2  # chapter 05: library and corpus


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape, enough to count parameters and FLOPs."""

    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    head_dim: int
    n_kv_heads: int
    vocab: int
    gated_mlp: bool  # GeGLU (three MLP matrices) rather than two
    tied_embeddings: bool

    @property
    def layer_params(self) -> int:
        d, attn = self.d_model, self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        return d * attn + 2 * d * kv + attn * d + (3 if self.gated_mlp else 2) * d * self.d_mlp

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + self.vocab * self.d_model * (1 if self.tied_embeddings else 2)

    def forward_flops(self, tokens: float) -> float:
        attn = self.n_heads * self.head_dim
        return (2 * tokens * (self.n_layers * self.layer_params + self.d_model * self.vocab)
                + 4 * self.n_layers * tokens**2 * attn)

    def transcoder_params(self, expansion: int) -> int:
        return self.n_layers * 2 * self.d_model * expansion * self.d_model


PYTHIA_410M = ModelShape("Pythia-410m", 24, 1024, 4096, 16, 64, 16, 50_304, False, False)
GEMMA2_2B = ModelShape("Gemma-2-2B", 26, 2304, 9216, 8, 256, 4, 256_000, True, True)
MINI_VOCAB = 1300  # the mini-C2S's vocabulary on pbmc68k_reduced (bench_transcoder's mini shape)


def shape_of(model_params: Mapping[str, Any]) -> ModelShape:
    """The shape of chapter 1's ``model`` (its parameters ``model_params``)."""
    model = str(model_params["model"])
    lowered = model.lower()
    if model == "mini":
        d, layers = int(model_params["mini_d_model"]), int(model_params["mini_layers"])
        return ModelShape(f"mini-C2S ({layers} x {d})", layers, d, 4 * d, 4, d // 4, 4, MINI_VOCAB, False, False)
    if lowered == "smoke-gemma2-2b":
        from c2srepro.book.smoke import PYTHIA_VOCAB_SIZE, SMOKE_GEMMA2_LAYERS

        return ModelShape("smoke Gemma-2-2B", SMOKE_GEMMA2_LAYERS, GEMMA2_2B.d_model, GEMMA2_2B.d_mlp,
                          GEMMA2_2B.n_heads, GEMMA2_2B.head_dim, GEMMA2_2B.n_kv_heads, PYTHIA_VOCAB_SIZE, True, True)
    if "pythia-410m" in lowered:
        return PYTHIA_410M
    if "gemma-2-2b" in lowered:
        return GEMMA2_2B
    raise ValueError(
        f"plan knows no shape for model {model!r}: it knows the Pythia-410m and Gemma-2-2B models (C2S-Pythia-410m, "
        "C2S-Scale-Gemma-2-2B, their smoke stand-ins) and the mini-C2S; add the model's ModelShape to "
        "c2srepro/book/plan.py"
    )


def dataset_cells(dataset: str, root: Path) -> int:
    """The dataset's cell count: the file's own when it is here, else ``DATASET_CELLS``."""
    path = Path(dataset) if Path(dataset).is_absolute() else root / dataset
    if path.is_file():
        import h5py

        with h5py.File(path, "r") as f:
            obs = f["obs"]
            index = obs.attrs.get("_index", "_index")
            return len(obs[index])
    name = Path(dataset).name
    if name in DATASET_CELLS:
        return DATASET_CELLS[name]
    raise ValueError(f"plan cannot count the cells of {dataset!r}: it is not on this machine and not one of "
                     f"{sorted(DATASET_CELLS)}; pass --cells N")


@dataclass(frozen=True)
class Unit:
    """One measured unit of work: its CPU seconds and peak RSS at ``shape`` and ``tokens``."""

    seconds: float
    peak_rss_mb: float
    source: str


@dataclass(frozen=True)
class Measurements:
    """The unit costs read from ``bench/throughput`` (all at the Pythia-410m shape)."""

    forward: Unit  # one prompt of ``tokens`` tokens
    replacement: Unit  # forward + every layer's encoding, one prompt
    graph_batch: Unit  # one row batch of GRAPH_BATCH rows
    graph_fixed: Unit  # a graph's cost beyond its row batches
    train_token: Unit  # transcoder training, every layer, per token
    harvest_token: Unit  # streaming harvest, per token
    enrich_list: Unit  # Table 4, per gene list (streamed)
    tokens: float  # the prompt length the per-prompt units were measured at
    tokens_per_gene: float
    template_tokens: float
    expansion: int

    @classmethod
    def read(cls, folder: Path) -> "Measurements":
        def load(name: str, command: str) -> dict:
            path = folder / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: measure it with `{command}`")
            return json.loads(path.read_text())

        units = load(UNITS_FILE, f"python bench/bench_plan_units.py --out {folder / UNITS_FILE}")
        training = load(TRAINING_FILE, f"python bench/bench_transcoder.py --shapes 410m --out {folder / TRAINING_FILE}")
        table4 = load(TABLE4_FILE, f"python bench/bench_table4.py --out {folder / TABLE4_FILE}")
        t410 = training["410m"]
        streamed = table4["ways"]["streamed"]
        if units["graph_batch_size"] != GRAPH_BATCH:
            raise ValueError(f"{folder / UNITS_FILE} timed graph batches of {units['graph_batch_size']} rows; the "
                             f"chapters use {GRAPH_BATCH}: rerun bench_plan_units.py with --batch-size {GRAPH_BATCH}")
        return cls(
            forward=Unit(units["forward_s"], units["forward_peak_rss_mb"], UNITS_FILE),
            replacement=Unit(units["replacement_s"], units["replacement_peak_rss_mb"], UNITS_FILE),
            graph_batch=Unit(units["graph_row_batch_s"], units["graph_peak_rss_mb"], UNITS_FILE),
            graph_fixed=Unit(units["graph_fixed_s"], units["graph_peak_rss_mb"], UNITS_FILE),
            train_token=Unit(1 / t410["train_tokens_per_s"], t410["train_peak_rss_mb"], TRAINING_FILE),
            harvest_token=Unit(1 / t410["harvest_streaming_tokens_per_s"], t410["harvest_peak_rss_mb"], TRAINING_FILE),
            enrich_list=Unit(streamed["wall_s"] / table4["lists"], streamed["peak_rss_mb"], TABLE4_FILE),
            tokens=units["n_pos"],
            tokens_per_gene=units["tokens_per_gene"],
            template_tokens=units["template_tokens"],
            expansion=int(training["expansion_factor"]),
        )


@dataclass(frozen=True)
class Work:
    """One chapter's units of work (``counts`` by unit name) and what they are, in words."""

    chapter: str
    counts: dict[str, float]
    description: str


def prompt_tokens(top_k: int, m: Measurements) -> float:
    return m.template_tokens + m.tokens_per_gene * top_k


def chapter_work(params: Mapping[str, Mapping[str, Any]], shape: ModelShape, cells: int) -> list[Work]:
    """The units each chapter does at these parameters ({chapter: params}), model shape and cell count."""
    p01 = params["01-model"]
    heldout = round(cells * float(p01["heldout_fraction"]))
    train = cells - heldout

    def capped(value) -> int:
        return heldout if value is None else min(int(value), heldout)

    p02, p03, p04 = params["02-transcoders"], params["03-validation"], params["04-features"]
    p06, p08 = params["06-circuit"], params["08-faithfulness"]
    d_tc = int(p02["expansion_factor"]) * shape.d_model
    tokens = int(p02["training_tokens"])
    accuracy_cells = capped(p03["max_accuracy_cells"])
    atlas_cells = capped(p04["max_atlas_cells"])
    graphs06 = len(TARGET_KINDS) + int(p06["n_rate_cells"])  # the traced cell asked each question, then the rate cells
    removals = int(p08["max_genes"] or p01["top_k"])
    n08 = int(p08["n_cells"])
    graphs08 = len(dict.fromkeys([p08["target"], *p08["compare_targets"]]))
    k_max = min(int(p08["k_max"]), removals)
    # per cell: the sentence, its single removals, each ordering's deletion and insertion curves (the
    # predictors, the oracle and the anti-oracle), the two rank-shift controls; and per graph one
    # gradient x input (a forward and a backward pass, about 3 forwards)
    sentences08 = 1 + removals + (len(PREDICTORS) + 2) * 2 * k_max + 2 * k_max
    umap = capped(p08["max_umap_cells"])
    lists = BACKGROUNDS * (1 + NULLS_PER_FEATURE) * shape.n_layers * d_tc
    return [
        Work("01-model", {"forward": capped(p01["max_eval_cells"])},
             f"predict {capped(p01['max_eval_cells']):,} held-out cells"),
        Work("02-transcoders", {"harvest_token": tokens, "train_token": tokens},
             f"harvest and train on {tokens:,} tokens, {shape.n_layers} layers, d_tc {d_tc:,}"),
        Work("03-validation", {"replacement": heldout, "forward": 2 * heldout + 2 * accuracy_cells},
             f"replacement on {heldout:,} held-out prompts (3 passes), accuracy on {accuracy_cells:,} cells x 2"),
        Work("04-features", {"replacement": train + atlas_cells},
             f"feature statistics on {train:,} training prompts, atlas activations of {atlas_cells:,} held-out cells"),
        Work("05-enrichment", {"enrich_list": lists},
             f"{lists:,} gene lists ({shape.n_layers} x {d_tc:,} features, with 2 nulls, 2 backgrounds)"),
        Work("06-circuit", {"forward": heldout + 2 * int(p06["n_random_ablations"]), "replacement": graphs06,
                            "graph": graphs06,
                            "graph_batch": graphs06 * math.ceil(int(p06["max_feature_nodes"] or d_tc) / GRAPH_BATCH)},
             f"predict {heldout:,} cells; {graphs06} graphs of {p06['max_feature_nodes']} feature rows"),
        Work("08-faithfulness", {"forward": heldout + umap + n08 * (sentences08 + 3 * graphs08),
                                 "replacement": n08 * graphs08, "graph": n08 * graphs08,
                                 "graph_batch": n08 * graphs08 * math.ceil(int(p08["max_feature_nodes"]) / GRAPH_BATCH)},
             f"predict {heldout:,} cells; {n08} cells x ({graphs08} graphs of {p08['max_feature_nodes']} rows + "
             f"{sentences08} sentences); UMAP of {umap:,} cells"),
    ]


def unit_flops(unit: str, shape: ModelShape, tokens: float, expansion: int) -> float:
    """FLOPs of one unit (module docstring); 0 for the enrichment, which runs on the CPU."""
    d_tc = expansion * shape.d_model
    encode = 4 * tokens * shape.n_layers * shape.d_model * d_tc
    if unit == "forward":
        return shape.forward_flops(tokens)
    if unit == "replacement":
        return shape.forward_flops(tokens) + encode
    if unit == "harvest_token":
        return shape.forward_flops(tokens) / tokens
    if unit == "train_token":
        return 10 * shape.n_layers * shape.d_model * d_tc
    if unit == "graph_batch":
        return GRAPH_BATCH * (2 * tokens * shape.n_layers * shape.layer_params + encode / 2)
    if unit == "graph":  # a graph's fixed part (influence estimates, bookkeeping) grows like a forward pass
        return shape.forward_flops(tokens)
    if unit == "enrich_list":
        return 0.0
    raise ValueError(f"unknown unit {unit!r}")


MEASURED_UNIT = {"forward": "forward", "replacement": "replacement", "graph_batch": "graph_batch",
                 "graph": "graph_fixed", "train_token": "train_token", "harvest_token": "harvest_token",
                 "enrich_list": "enrich_list"}


def plan_table(
    work: list[Work], shape: ModelShape, m: Measurements, *, tokens: float, expansion: int,
    gpu_tflops: float = H100_BF16_TFLOPS, utilisation: float = DEFAULT_UTILISATION,
    tokens_per_batch: int = 512,
) -> pd.DataFrame:
    """One row per chapter: work, CPU hours and peak GB (measured units, scaled), GPU hours and GB (estimated)."""
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    measured_shape = shape == PYTHIA_410M and expansion == m.expansion
    weight_ratio = ((shape.params + shape.transcoder_params(expansion))
                    / (PYTHIA_410M.params + PYTHIA_410M.transcoder_params(m.expansion)))
    rows = []
    for w in work:
        cpu_s = flops = 0.0
        peak_mb = 0.0
        for unit, count in w.counts.items():
            measured = getattr(m, MEASURED_UNIT[unit])
            flop_here = unit_flops(unit, shape, tokens, expansion)
            there = HARVEST_PROMPT_TOKENS if unit == "harvest_token" else m.tokens
            flop_there = unit_flops(unit, PYTHIA_410M, there, m.expansion)
            scale = flop_here / flop_there if flop_there else 1.0
            cpu_s += count * measured.seconds * scale
            flops += count * flop_here
            peak_mb = max(peak_mb, measured.peak_rss_mb * (1.0 if unit == "enrich_list" else weight_ratio))
        enrichment = set(w.counts) == {"enrich_list"}
        gpu_s = cpu_s if enrichment else flops / (gpu_tflops * 1e12 * utilisation)
        rows.append({
            "chapter": w.chapter,
            "work": w.description,
            "cpu_hours": cpu_s / 3600,
            "cpu_peak_gb": peak_mb / 1024,
            "cpu_figures": "measured" if measured_shape or enrichment else "estimated (FLOP-scaled from 410m)",
            "tflop": flops / 1e12,
            "gpu_hours": gpu_s / 3600,
            "gpu_memory_gb": 0.0 if enrichment else gpu_memory_gb(w, shape, expansion, tokens, tokens_per_batch),
        })
    return pd.DataFrame(rows)


def gpu_memory_gb(work: Work, shape: ModelShape, expansion: int, tokens: float, tokens_per_batch: int) -> float:
    """Weights in bf16, transcoders in float32 (x4 while training: gradients, two Adam moments) and
    the largest float32 activation buffer (training: a batch's [layer, token, d_tc] pre-activations,
    activations and gradients; a graph: a row batch's [row, token, layer, d_model] gradients)."""
    weights = 2 * shape.params
    transcoders = 4 * shape.transcoder_params(expansion)
    d_tc = expansion * shape.d_model
    if "train_token" in work.counts:
        return (weights + 4 * transcoders + 3 * 4 * tokens_per_batch * shape.n_layers * d_tc) / 2**30
    graph = 4 * GRAPH_BATCH * tokens * shape.n_layers * shape.d_model if "graph_batch" in work.counts else 0
    logits = 4 * tokens * shape.vocab
    return (weights + transcoders + max(graph, logits)) / 2**30


def plan(profile: str, *, root: Path | None = None, cells: int | None = None, measurements: Path | None = None,
         gpu_tflops: float = H100_BF16_TFLOPS, utilisation: float = DEFAULT_UTILISATION) -> tuple[pd.DataFrame, dict]:
    """The plan of ``profile`` (table and the sizes it used)."""
    root = project_root() if root is None else root
    m = Measurements.read(root / (measurements or MEASUREMENTS))
    layers = [load_profile(root, profile)]
    declared = declared_parameters(root, [f"chapters/{c}.ipynb" for c in CHAPTERS])
    params = {c: {**{k: v.default for k, v in declared[c].items()}, **resolve_parameters(declared[c], c, layers)}
              for c in CHAPTERS}
    shape = shape_of(params["01-model"])
    n_cells = cells if cells is not None else dataset_cells(str(params["01-model"]["dataset"]), root)
    tokens = prompt_tokens(int(params["01-model"]["top_k"]), m)
    expansion = int(params["02-transcoders"]["expansion_factor"])
    table = plan_table(chapter_work(params, shape, n_cells), shape, m, tokens=tokens, expansion=expansion,
                       gpu_tflops=gpu_tflops, utilisation=utilisation,
                       tokens_per_batch=int(params["02-transcoders"]["tokens_per_batch"]))
    sizes = {"profile": profile, "model": params["01-model"]["model"], "shape": asdict(shape),
             "params": shape.params, "cells": n_cells, "prompt_tokens": round(tokens),
             "gpu": f"{gpu_tflops:g} TFLOP/s x {utilisation:g}"}
    return table, sizes


def format_plan(table: pd.DataFrame, sizes: Mapping[str, Any]) -> str:
    """The plan as Markdown: the sizes, the table, and which figures are measured or estimated."""
    shown = table.assign(
        cpu_hours=table["cpu_hours"].map(_hours), gpu_hours=table["gpu_hours"].map(_hours),
        cpu_peak_gb=table["cpu_peak_gb"].map("{:.1f}".format), gpu_memory_gb=table["gpu_memory_gb"].map("{:.1f}".format),
        tflop=table["tflop"].map("{:,.0f}".format),
    ).rename(columns={"cpu_hours": "CPU time", "cpu_peak_gb": "CPU peak GB", "cpu_figures": "CPU figures",
                      "tflop": "TFLOP", "gpu_hours": "GPU time (est.)", "gpu_memory_gb": "GPU GB (est.)"})
    total = _hours(table["cpu_hours"].sum()), _hours(table["gpu_hours"].sum())
    return "\n".join([
        f"Profile `{sizes['profile']}`: model {sizes['model']} ({sizes['shape']['name']}, {sizes['params'] / 1e6:,.0f}M "
        f"parameters), {sizes['cells']:,} cells, ~{sizes['prompt_tokens']} tokens per prompt.",
        "",
        shown.to_markdown(index=False),
        "",
        f"Total: {total[0]} on this machine's CPU, {total[1]} on the GPU ({sizes['gpu']}).",
        "CPU time and peak: units measured on this machine at the Pythia-410m shape (bench/throughput), times the "
        "units; another shape is FLOP-scaled (estimated). GPU time and memory: estimated from FLOPs and bytes; "
        "chapter 05 (enrichment) runs on the CPU either way. 09-scorecard reads results only; A1 trains its own "
        "mini-C2S whatever the profile.",
    ])


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    if h < 1:
        return f"{h * 60:.0f} min"
    if h < 48:
        return f"{h:.1f} h"
    return f"{h / 24:.1f} days"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m c2srepro.book plan", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--cells", type=int, default=None, help="the dataset's cell count, when it is not here")
    parser.add_argument("--gpu-tflops", type=float, default=H100_BF16_TFLOPS)
    parser.add_argument("--utilisation", type=float, default=DEFAULT_UTILISATION)
    parser.add_argument("--json", action="store_true", help="print the table as JSON records instead")
    args = parser.parse_args(argv)
    try:
        table, sizes = plan(args.profile, cells=args.cells, gpu_tflops=args.gpu_tflops, utilisation=args.utilisation)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(1, f"plan: {error}\n")
    # The command's output is the plan itself: stdout, not the log.
    if args.json:
        sys.stdout.write(json.dumps({"sizes": sizes, "chapters": table.to_dict("records")}, indent=2) + "\n")
    else:
        sys.stdout.write(format_plan(table, sizes) + "\n")
    return 0
