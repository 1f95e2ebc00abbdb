"""The scorecard: every number the paper reports beside the one this run reproduced, with a verdict.

1. ``PAPER_VALUES`` (from :mod:`c2srepro.book.paper`, where the paper's numbers are typed once)
   holds what the paper states: its settings (hyperparameters, thresholds, sample sizes), its
   results (Tables 1-4, the case study) and its claims (orderings, "over 80% in most layers", "the
   top marker term is the cell's own type"). Figure 2's L0 values are shown only as a plot, so the
   paper states no number for them (``value=None``).
2. :func:`build_scorecard` reads a profile's results (``results/<profile>/``: model.json,
   transcoders.json, validation.json, layers.csv, table3.csv, table4.csv, circuit_summary.json and
   the ``*.provenance.json`` beside the tables) and gives one row per quantity, plus the controls
   this project adds (null fractions, the prompt-subset control, ablation, the own-type rate), which
   have no paper value.
3. Each row gets a verdict in ``VERDICTS`` by the first rule that applies:

   a. the result file or key is missing: "not comparable", note "result missing: run chapter X";
   b. the paper states no number (Figure 2, the controls beyond the paper): "not comparable";
   c. a quantity on a model-specific scale (losses and KL in nats, the transcoder width, the number of
      layers, the case study's combined score) measured on another model than the paper's:
      "not comparable", note "different model and data (<model> on <data>)". The model is the
      paper's when the profile is "paper" and model.json names the paper's model. The combined
      score is also not comparable when the marker library is not the paper's;
   d. a claim (an ordering such as original < transcoder < no MLP, a threshold such as FDR < 0.05,
      a yes/no statement): "reproduced" when it holds in this run, "differs" otherwise. For the
      case study FDR, the claim compared is significance (FDR < 0.05): the exact value depends on
      the gene list and the library;
   e. a proportion from a small sample (Table 3's 7 of 20): Fisher's exact test of the two 2x2
      counts, "reproduced" when p >= 0.05, i.e. the counts are compatible;
   f. a setting: "reproduced" when equal (relative 1e-9), "differs" otherwise;
   g. a number with a tolerance (``tolerance`` column): "reproduced" when
      |reproduced - paper| <= abs, or <= rel * |paper|; "differs" otherwise. Tolerances: losses and
      KL rel 10%; fraction of loss recovered abs 0.05; Table 4 fractions (per layer and mean) abs
      0.05; the case study's combined score rel 25%; the number of circuit genes rel 50%, for the
      circuit's genes (the pruned graph's genes by influence; the count follows the gene threshold)
      and for the greedy path search's (the count follows k and depth); at least half of the paper's
      9 circuit genes recovered.

``difference`` is reproduced - paper where both are numbers. Nothing is written here: the
scorecard chapter writes ``scorecard.csv``.

4. For the book, :func:`styled_scorecard` shows a group of rows (quantity with its place in the
   paper, both values, the verdict coloured, tolerance rule in the note), :func:`model_banner`
   says when the model is not the paper's, and :func:`plain_summary` states the counts and lists
   the findings that hold and differ in words.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from pandas.io.formats.style import Styler
from scipy.stats import fisher_exact

from c2srepro.biology.casestudy import CircuitSummary
from c2srepro.book.display import badge, format_number, table
from c2srepro.book.paper import CIRCUIT_GENES as PAPER_CIRCUIT_GENES
from c2srepro.book.paper import MARKER_LIBRARY as PAPER_MARKER_LIBRARY
from c2srepro.book.paper import PAPER_DATA, PAPER_MODEL, PAPER_VALUES
from c2srepro.book.paper import TABLE3_INTERPRETABLE as PAPER_TABLE3
from c2srepro.book.paper import TABLE4 as PAPER_TABLE4
from c2srepro.features.table4 import RANDOM_FRACTION

VERDICTS = ("reproduced", "differs", "not comparable")
COLUMNS = ["quantity", "source", "kind", "paper", "reproduced", "difference", "verdict", "tolerance", "note", "model"]

# Which chapter writes which file, for "result missing: run chapter X".
CHAPTER_OF = {
    "model.json": "01-model",
    "transcoders.json": "02-transcoders",
    "validation.json": "03-validation",
    "layers.csv": "03-validation",
    "table3.csv": "04-features",
    "table3.csv.provenance.json": "04-features",
    "table4.csv": "05-enrichment",
    "table4.csv.provenance.json": "05-enrichment",
    "circuit_summary.json": "06-circuit",
    "faithfulness.json": "08-faithfulness",
    "cohorts.csv": "08-faithfulness",
}



# Quantities whose scale is the model's own (nats, widths, layer counts).
_MODEL_SCALE = {"loss_original", "loss_transcoder", "loss_no_mlp", "kl_transcoder", "kl_no_mlp", "d_tc", "model_layers"}
_TOLERANCES = {
    "loss_original": ("rel", 0.10), "loss_transcoder": ("rel", 0.10), "loss_no_mlp": ("rel", 0.10),
    "kl_transcoder": ("rel", 0.10), "kl_no_mlp": ("rel", 0.10),
    "fraction_loss_recovered": ("abs", 0.05),
    "table4_mean_fraction": ("abs", 0.05),
    "top_marker_combined_score": ("rel", 0.25),
    "circuit_n_genes": ("rel", 0.50),
    "circuit_n_genes_greedy": ("rel", 0.50),
}
_LAYER_TOLERANCE = ("abs", 0.05)
_PER_LAYER = "table4_per_layer"
# (row key, function giving the row or rows; it raises _Missing when a result is absent)
_Builder = tuple[str, Callable[[], "dict[str, Any] | list[dict[str, Any]]"]]


class _Missing(Exception):
    """A result file or key this row needs is absent."""

    def __init__(self, file: str, key: str | None = None):
        self.file, self.key = file, key
        super().__init__(file)


class _Results:
    """Lazy, cached reads of ``results/<profile>/``; absent files and keys raise :class:`_Missing`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._cache: dict[str, Any] = {}

    def _read(self, name: str):
        if name not in self._cache:
            path = self.folder / name
            if not path.is_file():
                self._cache[name] = None
            elif name.endswith(".csv"):
                self._cache[name] = pd.read_csv(path)
            else:
                self._cache[name] = json.loads(path.read_text())
        if self._cache[name] is None:
            raise _Missing(name)
        return self._cache[name]

    def json(self, name: str, key: str):
        data = self._read(name)
        if data.get(key) is None:
            raise _Missing(name, key)
        return data[key]

    def param(self, name: str, key: str):
        """A parameter from a JSON result's ``provenance`` block or a table's ``.provenance.json``."""
        data = self._read(name)
        params = (data.get("provenance") or {}).get("params", {}) if "provenance" in data else data.get("params", {})
        if params.get(key) is None:
            raise _Missing(name, f"params.{key}")
        return params[key]

    def table(self, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
        table = self._read(name)
        for column in columns:
            if column not in table.columns:
                raise _Missing(name, column)
        if table.empty:
            raise _Missing(name, "rows")
        return table

    def circuit(self) -> CircuitSummary:
        """Chapter 6's summary; a field it lacks is an error here (a file of another version), not a
        missing row."""
        return CircuitSummary.from_dict(self._read("circuit_summary.json"))

    def optional(self, name: str, key: str):
        """A key that may be None by design (e.g. no marker term passed); the file must exist."""
        return self._read(name).get(key)

    def document(self, name: str) -> dict[str, Any]:
        return self._read(name)


@dataclass
class _Context:
    profile: str
    same_model: bool
    model_label: str  # "<model> on <data>"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _row(key: str, reproduced, verdict: str, note: str = "", tolerance: str = "") -> dict[str, Any]:
    paper = PAPER_VALUES[key]
    difference = float(reproduced) - float(paper.value) if _is_number(reproduced) and _is_number(paper.value) else None
    return {
        "key": key, "quantity": paper.quantity, "source": paper.source, "kind": paper.kind,
        "paper": paper.value, "reproduced": reproduced, "difference": difference,
        "verdict": verdict, "tolerance": tolerance, "note": note,
    }


def _tolerance_text(tol: tuple[str, float]) -> str:
    kind, amount = tol
    return f"±{amount:.0%} relative" if kind == "rel" else f"±{amount:g} absolute"


def _numeric(key: str, reproduced: float, ctx: _Context, tol: tuple[str, float], note: str = "") -> dict[str, Any]:
    """Rules c and g: model-scale quantities on another model are not comparable; else a tolerance."""
    if key in _MODEL_SCALE and not ctx.same_model:
        return _row(key, reproduced, "not comparable", _join(f"different model and data ({ctx.model_label})", note),
                    _tolerance_text(tol))
    paper = float(PAPER_VALUES[key].value)
    kind, amount = tol
    bound = amount * abs(paper) if kind == "rel" else amount
    within = abs(float(reproduced) - paper) <= bound + 1e-12
    if not within:
        note = _join("higher than the paper's" if reproduced > paper else "lower than the paper's", note)
    return _row(key, reproduced, "reproduced" if within else "differs", note, _tolerance_text(tol))


def _setting(key: str, reproduced, ctx: _Context, note: str = "") -> dict[str, Any]:
    """Rule f (and c for the model's own scale)."""
    if key in _MODEL_SCALE and not ctx.same_model:
        return _row(key, reproduced, "not comparable", _join(f"different model and data ({ctx.model_label})", note), "equal")
    paper = PAPER_VALUES[key].value
    if _is_number(paper) and _is_number(reproduced):
        same = math.isclose(float(reproduced), float(paper), rel_tol=1e-9)
    else:
        same = str(reproduced) == str(paper)
    return _row(key, reproduced, "reproduced" if same else "differs", note, "equal")


def _claim(key: str, reproduced, holds: bool, note: str = "") -> dict[str, Any]:
    """Rule d."""
    return _row(key, reproduced, "reproduced" if holds else "differs", note, "claim holds")


def _fmt(x) -> str:
    return f"{x:.3g}" if _is_number(x) else str(x)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Row builders, one per result file; each returns rows or raises _Missing for the whole group.


def _settings_rows(r: _Results, ctx: _Context) -> list[_Builder]:
    return [
        ("model_layers", lambda: _setting("model_layers", int(r.json("model.json", "n_layers")), ctx)),
        ("heldout_fraction", lambda: _setting(
            "heldout_fraction", float(r.param("model.json", "heldout_fraction")), ctx,
            "ours splits cells for the classifier; the paper's split is for transcoder training")),
        ("prompt_genes", lambda: _setting("prompt_genes", int(r.param("model.json", "top_k")), ctx)),
        ("lr", lambda: _setting("lr", float(r.param("transcoders.json", "lr")), ctx)),
        ("tokens_per_batch", lambda: _setting(
            "tokens_per_batch", int(r.param("transcoders.json", "tokens_per_batch")), ctx)),
        ("l1_coefficient", lambda: _setting("l1_coefficient", float(r.param("transcoders.json", "l1_coefficient")), ctx)),
        ("training_tokens", lambda: _setting(
            "training_tokens", int(r.param("transcoders.json", "training_tokens")), ctx)),
        ("d_tc", lambda: _setting("d_tc", int(r.json("transcoders.json", "d_tc")), ctx)),
        ("expansion_factor", lambda: _setting(
            "expansion_factor", int(r.json("transcoders.json", "d_tc")) / int(r.json("model.json", "d_model")),
            ctx, "width / d_model")),
    ]


def _validation_rows(r: _Results, ctx: _Context) -> list[_Builder]:
    def loss(key):
        return lambda: _numeric(key, float(r.json("validation.json", key)), ctx, _TOLERANCES[key],
                                "mean next-token cross-entropy over held-out prompts" if key.startswith("loss") else "")

    def loss_ordering():
        a, b, c = (float(r.json("validation.json", k)) for k in ("loss_original", "loss_transcoder", "loss_no_mlp"))
        return _claim("loss_ordering", f"{a:.3g} < {b:.3g} < {c:.3g}" if a < b < c else f"{a:.3g}, {b:.3g}, {c:.3g}",
                      a < b < c)

    def kl_ordering():
        a, b = (float(r.json("validation.json", k)) for k in ("kl_transcoder", "kl_no_mlp"))
        return _claim("kl_ordering", f"{a:.3g} < {b:.3g}" if a < b else f"{a:.3g}, {b:.3g}", a < b)

    def recovered():
        value = float(r.json("validation.json", "fraction_loss_recovered"))
        note = ""
        if not ctx.same_model:
            note = f"dimensionless, compared although the model differs ({ctx.model_label})"
        return _numeric("fraction_loss_recovered", value, ctx, _TOLERANCES["fraction_loss_recovered"], note)

    def l0():
        mean = float(r.json("validation.json", "mean_l0"))
        layers = r.table("layers.csv", ("layer", "l0"))
        d_tc = r.json("validation.json", "d_tc")
        return _row("mean_l0", mean, "not comparable",
                    f"the paper shows L0 only as a figure, no number; ours per layer {layers['l0'].min():.1f}"
                    f"-{layers['l0'].max():.1f} of {d_tc} features ({mean / float(d_tc):.1%} of the width on average)")

    return [("loss_original", loss("loss_original")), ("loss_transcoder", loss("loss_transcoder")),
            ("loss_no_mlp", loss("loss_no_mlp")), ("loss_ordering", loss_ordering),
            ("fraction_loss_recovered", recovered), ("kl_transcoder", loss("kl_transcoder")),
            ("kl_no_mlp", loss("kl_no_mlp")), ("kl_ordering", kl_ordering), ("mean_l0", l0)]


def _table3_rows(r: _Results, ctx: _Context) -> list[_Builder]:
    def layer():
        chosen = int(r.param("table3.csv.provenance.json", "layer"))
        n_layers = int(r.json("model.json", "n_layers"))
        value = f"{chosen} of {n_layers}"
        return _row("table3_layer", value, "reproduced" if chosen == n_layers // 2 else "differs",
                    "compared as the middle layer", "middle layer")

    def interpretable():
        table = r.table("table3.csv", ("gene_level_interpretable",))
        yes = int((table["gene_level_interpretable"].astype(str) == "Yes").sum())
        n = len(table)
        paper_yes, paper_n = PAPER_TABLE3["yes"], PAPER_TABLE3["n"]
        _, p = fisher_exact([[paper_yes, paper_n - paper_yes], [yes, n - yes]])
        sources = set(table["source"].astype(str)) if "source" in table else set()
        by = {frozenset({"rule"}): "an automatic rule", frozenset({"human"}): "human labels",
              frozenset({"rule", "human"}): "human labels and an automatic rule"}.get(frozenset(sources), "unrecorded labels")
        row = _row("table3_interpretable", yes / n, "reproduced" if p >= 0.05 else "differs",
                   f"{yes} of {n}, judged by {by} (the paper: human evaluation); Fisher's exact p = {p:.3g}",
                   "Fisher's exact p >= 0.05")
        return row

    return [
        ("table3_layer", layer),
        ("live_threshold_table3", lambda: _setting(
            "live_threshold_table3", float(r.param("table3.csv.provenance.json", "live_threshold_figure3")), ctx)),
        ("table3_n", lambda: _setting("table3_n", len(r.table("table3.csv", ("feature",))), ctx)),
        ("table3_interpretable", interpretable),
    ]


def _table4_rows(r: _Results, ctx: _Context) -> list[_Builder]:
    def summary() -> pd.DataFrame:
        return r.table("table4.csv", ("layer", "fraction"))

    def mean():
        t = summary()
        note = f"{len(t)} layers"
        if RANDOM_FRACTION in t:
            note += f"; random same-size gene lists reach {t[RANDOM_FRACTION].mean():.3f} (the paper reports no null)"
        return _numeric("table4_mean_fraction", float(t["fraction"].mean()), ctx, _TOLERANCES["table4_mean_fraction"], note)

    def most_over_80():
        t = summary()
        over = int((t["fraction"] > 0.8).sum())
        return _claim("table4_most_layers_over_80", f"{over} of {len(t)} layers", over > len(t) / 2)

    def layer0_dip():
        t = summary().sort_values("layer")
        lowest = int(t.loc[t["fraction"].idxmin(), "layer"])
        return _claim("table4_layer0_dip", f"layer {lowest}: {t['fraction'].min():.3f} is the lowest",
                      lowest == int(t["layer"].iloc[0]))

    def per_layer() -> list[dict]:
        t = summary().set_index("layer")
        if len(t) != len(PAPER_TABLE4):
            paper = PAPER_TABLE4["fraction"]
            return [{
                **_per_layer_row(None, "not comparable", f"{len(t)} layers against the paper's 24: layers do not correspond"),
                "paper": f"24 layers, {paper.min():.3f}-{paper.max():.3f}",
                "reproduced": f"{len(t)} layers, {t['fraction'].min():.3f}-{t['fraction'].max():.3f}",
            }]
        return [_numeric(f"table4_fraction_layer_{layer}", float(t.loc[layer, "fraction"]), ctx, _LAYER_TOLERANCE)
                if layer in t.index else _missing_row(f"table4_fraction_layer_{layer}", _Missing("table4.csv", f"layer {layer}"))
                for layer in PAPER_TABLE4["layer"]]

    return [
        ("live_threshold_table4", lambda: _setting(
            "live_threshold_table4", float(r.param("table4.csv.provenance.json", "live_threshold")), ctx)),
        ("table4_fdr", lambda: _setting("table4_fdr", float(r.param("table4.csv.provenance.json", "fdr")), ctx)),
        ("table4_mean_fraction", mean), ("table4_most_layers_over_80", most_over_80),
        ("table4_layer0_dip", layer0_dip), (_PER_LAYER, per_layer),
    ]


def _circuit_rows(r: _Results, ctx: _Context) -> list[_Builder]:
    def genes() -> list[str]:
        return list(r.circuit().genes)

    def n_genes():
        summary = r.circuit()
        how = (f"the top genes carrying {summary.gene_threshold:.0%} of the genes' influence in the attribution "
               f"graph of {summary.target['node_id']}")
        return _numeric("circuit_n_genes", len(genes()), ctx, _TOLERANCES["circuit_n_genes"],
                        f"{how}; the paper's 9 are its greedy circuit's")

    def n_genes_greedy():
        summary = r.circuit()
        return _numeric("circuit_n_genes_greedy", len(summary.greedy_genes), ctx, _TOLERANCES["circuit_n_genes_greedy"],
                        f"beam k = {summary.greedy_k}, depth {summary.greedy_depth} from "
                        f"{summary.greedy_target['node_id']}: the count follows k and depth")

    def paper_genes():
        shared = sorted(set(genes()) & set(PAPER_CIRCUIT_GENES))
        if not ctx.same_model:
            return _row("circuit_paper_genes", ", ".join(genes()) or "(none)", "not comparable",
                        f"different model, data and cell ({ctx.model_label}); {len(shared)} shared")
        half = len(PAPER_CIRCUIT_GENES) / 2
        return _row("circuit_paper_genes", ", ".join(genes()) or "(none)",
                    "reproduced" if len(shared) >= half else "differs",
                    f"{len(shared)} of {len(PAPER_CIRCUIT_GENES)} shared: {', '.join(shared) or 'none'}",
                    "at least half shared")

    def own_type():
        summary = r.circuit()
        shown = f"{summary.top_marker_term or 'no term at FDR < 0.05'} (cell: {summary.cell_label})"
        return _claim("top_marker_own_type", shown, bool(summary.top_marker_matches_cell_type),
                      f"library {summary.top_marker_library}")

    def fdr():
        summary = r.circuit()
        library = summary.top_marker_library
        if summary.top_marker_term is None:
            # No term passed FDR < 0.05: the claim of a significant marker term fails.
            return _claim("top_marker_fdr", "no term at FDR < 0.05", False, f"library {library}")
        value = float(summary.top_marker_fdr)
        return _claim("top_marker_fdr", value, value < 0.05,
                      f"library {library}; the exact FDR follows the gene list and the library")

    def score():
        summary = r.circuit()
        library, term = summary.top_marker_library, summary.top_marker_term
        value = None if term is None else float(summary.top_marker_combined_score)
        shown = "no term at FDR < 0.05" if term is None else ""
        if not ctx.same_model:
            return _row("top_marker_combined_score", value, "not comparable",
                        _join(f"different model and data ({ctx.model_label}); library {library}", shown))
        if library != PAPER_MARKER_LIBRARY:
            return _row("top_marker_combined_score", value, "not comparable",
                        _join(f"library {library} stands in for {PAPER_MARKER_LIBRARY}", shown))
        if term is None:
            return _row("top_marker_combined_score", None, "differs", shown)
        return _numeric("top_marker_combined_score", value, ctx, _TOLERANCES["top_marker_combined_score"])

    return [("circuit_n_genes", n_genes), ("circuit_n_genes_greedy", n_genes_greedy),
            ("circuit_paper_genes", paper_genes), ("top_marker_own_type", own_type),
            ("top_marker_fdr", fdr), ("top_marker_combined_score", score)]


def _missing_row(key: str, missing: _Missing) -> dict[str, Any]:
    """Rule a."""
    note = _missing_note(missing)
    if key == _PER_LAYER:
        return _per_layer_row(None, "not comparable", note)
    return _row(key, None, "not comparable", note)


def _missing_note(missing: _Missing) -> str:
    chapter = CHAPTER_OF[missing.file]
    if missing.key is None:
        return f"result missing: run chapter {chapter} ({missing.file})"
    # The file is there but this value is absent or empty (e.g. a circuit without genes has no control).
    return f"result missing: {missing.key} is absent or empty in {missing.file} (chapter {chapter})"


def _per_layer_row(reproduced, verdict: str, note: str) -> dict[str, Any]:
    """The one row standing for Table 4's 24 per-layer rows when they cannot be compared one by one."""
    return {"key": _PER_LAYER, "quantity": "Table 4 fractions per layer", "source": "Table 4", "kind": "result",
            "paper": "24 layers", "reproduced": reproduced, "difference": None, "verdict": verdict,
            "tolerance": _tolerance_text(_LAYER_TOLERANCE), "note": note}


def _controls(r: _Results) -> list[dict[str, Any]]:
    """Rows beyond the paper (rule b): shown with no paper value, for the reader's judgement."""
    specs = [
        ("accuracy_original", "held-out cell-type accuracy, original", "model.json", "heldout_accuracy",
         "the paper reports one prediction, no accuracy", lambda d: f"logistic-regression baseline on the same top-K genes {_fmt(d.get('baseline_accuracy'))}"),
        ("accuracy_transcoder", "held-out cell-type accuracy, transcoders in place", "validation.json",
         "accuracy_transcoder", "", lambda d: f"original {_fmt(d.get('accuracy_original'))}"),
    ]
    def base_of(key: str, quantity: str | None = None) -> dict[str, Any]:
        return {"key": key, "quantity": quantity or dict(_CIRCUIT_CONTROLS).get(key), "source": "beyond the paper",
                "kind": "control", "paper": None, "difference": None, "verdict": "not comparable", "tolerance": ""}

    rows = []
    for key, quantity, file, field, why, detail in specs:
        base = base_of(key, quantity)
        try:
            value = r.json(file, field)
        except _Missing as missing:
            rows.append({**base, "reproduced": None, "note": _missing_note(missing)})
            continue
        rows.append({**base, "reproduced": value, "note": _join(why or "the paper reports no such control",
                                                               detail(r.document(file)))})
    try:
        summary = r.circuit()
    except _Missing as missing:
        return rows + [{**base_of(key), "reproduced": None, "note": _missing_note(missing)} for key, _ in _CIRCUIT_CONTROLS]
    ablation = summary.ablation or {}
    values = {
        "prompt_subset_percentile": (summary.prompt_subset_percentile, f"p = {_fmt(summary.prompt_subset_p_value)}"),
        "ablation_drop": (ablation.get("drop"), f"random feature sets of the same size: {_fmt(ablation.get('random_drop_mean'))}"),
        "own_type_rate": (summary.own_type_rate, f"over {summary.own_type_rate_cells} correctly classified cells"),
    }
    for key, quantity in _CIRCUIT_CONTROLS:
        value, detail = values[key]
        rows.append({**base_of(key), "reproduced": value,
                     "note": _join("the paper reports no such control", detail) if value is not None
                     else _join(f"{key} is absent: the circuit has no genes or features", detail)})
    return rows


# chapter 8's orderings: the graph's, and the observed bounds that are neither graph nor baseline
GRAPH_ORDERINGS = ("influence", "linear")
BOUND_ORDERINGS = ("oracle", "anti-oracle")


def _holds(test: str, holds: bool) -> str:
    return f"{test}: {'holds' if holds else 'does not hold'}"


# Chapter 6's controls (rule b), in the scorecard's order: (key, quantity)
_CIRCUIT_CONTROLS = (
    ("prompt_subset_percentile", "circuit marker score, percentile among random prompt-gene subsets"),
    ("ablation_drop", "drop in p(label) when the pruned graph's features are switched off (frozen replacement)"),
    ("own_type_rate", "rate at which the top marker term is the cell's own type"),
)


def _beyond_rows(r: _Results) -> list[_Builder]:
    """The findings of the chapters beyond the paper (rule b): each states the test it answers."""
    def beyond(key: str, quantity: str, source: str, value, note: str) -> dict[str, Any]:
        return {"key": key, "quantity": quantity, "source": source, "kind": "beyond", "paper": None,
                "reproduced": value, "difference": None, "verdict": "not comparable", "tolerance": "", "note": note}

    def graph_score(name: str, what: str):
        def build():
            summary = r.circuit()
            score, size = getattr(summary, f"{name}_score"), summary.pruned_graph_size
            return beyond(f"graph_{name}_score", f"attribution graph {name} score", "ch. 6", score,
                          _join(what, f"pruned graph of {size['nodes']} nodes ({size['feature']} features, "
                                      f"{size['error']} error nodes)"))
        return build

    def intervention():
        run = r.circuit().intervention
        if run is None:
            raise _Missing("circuit_summary.json", "intervention")
        beats = run["drop"] > run["random_drop_mean"] + 2 * run["random_drop_std"]
        return beyond("intervention_top_drop", f"drop in p(label) with the graph's top {run['n_features']} features "
                      "switched off in the real model", "ch. 6", run["drop"],
                      _join(_holds("larger than random sets of as many active features", beats),
                            f"random {_fmt(run['random_drop_mean'])} ± {_fmt(run['random_drop_std'])} over "
                            f"{run['n_random']} sets, p = {_fmt(run['p_value'])}",
                            "the answer flips" if run["flipped"] else "the answer stays"))

    def rho(predictor: str, what: str):
        def build():
            medians = r.json("faithfulness.json", "median_rho")
            value, rank = medians.get(predictor), medians.get("rank")
            n = r.json("faithfulness.json", "n_cells")
            note = f"{what}; over {n} cells"
            if predictor != "rank" and _is_number(value) and _is_number(rank):
                note = _join(_holds("above the rank baseline", value > rank), note)
            return beyond(f"faithfulness_rho_{predictor}", f"median Spearman rho of |{predictor}| against the "
                          "size of the observed effect of removing each gene", "ch. 8", value, note)
        return build

    def _naopc(predictors: dict, name: str) -> tuple[float, float, float] | None:
        naopc = (predictors.get(name) or {}).get("naopc") or {}
        values = (naopc.get("mean"), naopc.get("low"), naopc.get("high"))
        return values if all(_is_number(v) for v in values) else None

    def _interval(values: tuple[float, float, float]) -> str:
        return f"{_fmt(values[0])} [{_fmt(values[1])}, {_fmt(values[2])}]"

    def naopc_graph():
        predictors = r.json("faithfulness.json", "predictors")
        target = r.json("faithfulness.json", "target")
        graph = {n: _naopc(predictors, n) for n in GRAPH_ORDERINGS if _naopc(predictors, n)}
        if not graph:
            raise _Missing("faithfulness.json", "predictors")
        best = max(graph, key=lambda n: graph[n][0])
        baselines = {n: _naopc(predictors, n) for n in predictors if n not in (*GRAPH_ORDERINGS, *BOUND_ORDERINGS)}
        baselines = {n: v for n, v in baselines.items() if v}

        def beats(names: tuple[str, ...]) -> str:
            # the graph beats a baseline when its interval lies wholly above the baseline's
            present = [n for n in names if n in baselines]
            if not present:
                return ""
            holds = all(graph[best][1] > baselines[n][2] for n in present)
            return _holds(f"the graph beats {' and '.join(present)} (95% intervals apart)", holds)

        best_baseline = max(baselines, key=lambda n: baselines[n][0]) if baselines else None
        return beyond("faithfulness_naopc_graph", "deletion NAOPC of the graph's best gene ordering (mean over cells, "
                      "95% bootstrap interval)", "ch. 8", graph[best][0],
                      _join(f"{best} {_interval(graph[best])}, target {target}",
                            f"best baseline {best_baseline} {_interval(baselines[best_baseline])}" if best_baseline else "",
                            beats(("gradient_x_input",)), beats(("rank", "expression"))))

    def rho_signed_graph():
        predictors = r.json("faithfulness.json", "predictors")
        signed = {n: (predictors.get(n) or {}).get("median_rho_signed") for n in predictors
                  if n not in BOUND_ORDERINGS}
        signed = {n: v for n, v in signed.items() if _is_number(v)}
        if "linear" not in signed:
            raise _Missing("faithfulness.json", "predictors")
        baselines = {n: v for n, v in signed.items() if n not in GRAPH_ORDERINGS}
        best = max(baselines, key=baselines.get) if baselines else None
        return beyond("faithfulness_rho_signed_linear", "median signed Spearman rho of the graph's removal estimate "
                      "against the observed effect of removing each gene", "ch. 8", signed["linear"],
                      _join(_holds("at least 0.5", signed["linear"] >= 0.5),
                            f"best baseline {best} {_fmt(baselines[best])}" if best else "",
                            _holds("above the best baseline", signed["linear"] > baselines[best]) if best else ""))

    def beats_rank():
        share = r.json("faithfulness.json", "graph_beats_rank")["influence"]
        by_type = r.json("faithfulness.json", "median_rho_by_type")
        losing = sorted(t for t, m in by_type.items()
                        if _is_number(m.get("influence")) and _is_number(m.get("rank")) and m["influence"] <= m["rank"])
        return beyond("faithfulness_beats_rank", "share of cells whose graph influence predicts removal better "
                      "than the gene's rank", "ch. 8", share,
                      _join(_holds("in most cells", share > 0.5),
                            f"types where it does not (median): {', '.join(losing)}" if losing
                            else "it does in every type (median)"))

    def cohort_pairs():
        summary = r.table("cohorts.csv", ("type", "gene", "fdr"))
        significant = summary[summary["fdr"] < 0.05]
        return beyond("cohort_significant_pairs", "(type, gene) pairs that drive a type's answer more than the "
                      "other types' (permutation FDR < 0.05)", "ch. 8", int(len(significant)),
                      f"{significant['type'].nunique()} of {summary['type'].nunique()} types hold at least one")

    def prerank_first():
        rows = [row for row in r.json("faithfulness.json", "prerank")]
        if not rows:
            raise _Missing("faithfulness.json", "prerank")
        first = [row["type"] for row in rows if row.get("own_place") == 1]
        shuffled = sum(row.get("shuffled_place") == 1 for row in rows)
        significant = sum(_is_number(row.get("own_fdr")) and row["own_fdr"] < 0.05 and row.get("own_place") == 1
                          for row in rows)
        return beyond("prerank_own_first", "types whose own marker term tops the prerank GSEA of their influence",
                      "ch. 8", f"{len(first)} of {len(rows)}",
                      _join(f"at FDR < 0.05: {significant}", f"label-shuffled control: {shuffled} of {len(rows)}",
                            f"first: {', '.join(first)}" if first else ""))

    return [
        ("graph_replacement_score", graph_score("replacement", "share of the answer's attribution that reaches "
                                                "it through features and tokens rather than error nodes")),
        ("graph_completeness_score", graph_score("completeness", "share of the nodes' inputs explained by "
                                                 "nodes rather than error terms")),
        ("intervention_top_drop", intervention),
        *[(f"faithfulness_rho_{name}", rho(name, what)) for name, what in (
            ("influence", "the graph's gene-node influence"), ("linear", "the graph's first-order estimate"),
            ("gradient_x_input", "gradient x input on the real model"),
            ("dla", "attention-free direct logit attribution"), ("circuit", "membership of the greedy circuit"),
            ("rank", "the gene's rank in the sentence"), ("expression", "the gene's expression"),
            ("random", "random numbers"))],
        ("faithfulness_beats_rank", beats_rank),
        ("faithfulness_rho_signed_linear", rho_signed_graph),
        ("faithfulness_naopc_graph", naopc_graph),
        ("cohort_significant_pairs", cohort_pairs),
        ("prerank_own_first", prerank_first),
    ]


def _context(r: _Results, profile: str) -> _Context:
    try:
        model = str(r.json("model.json", "model"))
    except _Missing:
        model = PAPER_MODEL if profile == "paper" else f"the {profile!r} profile's model"
    try:
        data = str(r.param("model.json", "dataset"))
    except _Missing:
        data = PAPER_DATA if profile == "paper" else "its data"
    same = profile == "paper" and model == PAPER_MODEL
    return _Context(profile=profile, same_model=same, model_label=f"{model} on {Path(data).name}")


def build_scorecard(results_dir: str | os.PathLike, *, profile: str) -> pd.DataFrame:
    """One row per paper quantity (and per control of ours) for ``results_dir`` of ``profile``.

    Columns: quantity, source (table/section of the paper), kind (setting/result/claim/control),
    paper, reproduced, difference (reproduced - paper, numbers only), verdict (one of
    ``VERDICTS``), tolerance (the rule applied), note, model ("same as the paper" or the model and
    data of this run), key (a stable identifier). Reads only; writes nothing.
    """
    folder = Path(results_dir)
    if not isinstance(profile, str) or not profile:
        raise ValueError(f"profile must be a profile name such as 'default' or 'paper', got {profile!r}")
    if not folder.is_dir():
        raise ValueError(f"no results folder {folder}: run the book for profile {profile!r} first (make book)")
    r = _Results(folder)
    ctx = _context(r, profile)
    rows: list[dict[str, Any]] = []
    builders = [b for group in (_settings_rows, _validation_rows, _table3_rows, _table4_rows, _circuit_rows)
                for b in group(r, ctx)]
    for key, builder in builders:
        try:
            out = builder()
        except _Missing as missing:
            out = _missing_row(key, missing)
        rows.extend(out if isinstance(out, list) else [out])
    rows.extend(_controls(r))
    for key, builder in _beyond_rows(r):
        try:
            rows.append(builder())
        except _Missing as missing:
            rows.append({"key": key, "quantity": key.replace("_", " "), "source": "beyond the paper", "kind": "beyond",
                         "paper": None, "reproduced": None, "difference": None, "verdict": "not comparable",
                         "tolerance": "", "note": _missing_note(missing)})
    table = pd.DataFrame(rows)
    table["model"] = "same as the paper" if ctx.same_model else f"differs: {ctx.model_label}"
    return table[COLUMNS + ["key"]]



# ---------------------------------------------------------------------------------------------
# Rendering for the book (step 4)

VERDICT_COLOURS = {"reproduced": "#d8f0d8", "differs": "#f8d8d0", "not comparable": "#e8e8e8"}
KINDS = ("setting", "result", "claim", "control", "beyond")
_DIGITS = 4  # the paper's numbers carry up to four significant digits (2.406, 315.17)


def _model_label(scorecard: pd.DataFrame) -> str | None:
    """"<model> on <data>" when the model is not the paper's, else None."""
    note = str(scorecard["model"].iloc[0]) if len(scorecard) else "same as the paper"
    return None if note == "same as the paper" else note.removeprefix("differs: ")


def model_banner(scorecard: pd.DataFrame, *, profile: str) -> str | None:
    """Markdown saying that this profile's model is not the paper's (None when it is)."""
    label = _model_label(scorecard)
    if label is None:
        return None
    return (f"**The model differs from the paper's.** This is the `{profile}` profile: {label}, not "
            f"`{PAPER_MODEL}` on the {PAPER_DATA}. Quantities on the model's own scale are therefore marked "
            "*not comparable*; orderings, fractions and claims are compared.")


def _select(scorecard: pd.DataFrame, kinds: str | tuple[str, ...]) -> pd.DataFrame:
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown scorecard kinds {unknown}; choose from {KINDS}")
    return scorecard[scorecard["kind"].isin(kinds)]


def styled_scorecard(scorecard: pd.DataFrame, *, kinds: str | tuple[str, ...] = KINDS) -> Styler:
    """The rows of ``kinds`` as the book shows them: the quantity with its place in the paper, the
    two values, the difference, the verdict coloured and the rule applied in the note."""
    rows = _select(scorecard, kinds)
    label = _model_label(scorecard)
    notes = [_join(n, f"rule: {t}" if t else "") for n, t in zip(rows["note"].fillna(""), rows["tolerance"].fillna(""))]
    if label is not None:  # the banner names the model once; the notes need not repeat it
        notes = [n.replace(f" ({label})", "") for n in notes]
    view = pd.DataFrame({
        "quantity": (rows["quantity"] + " (" + rows["source"] + ")").tolist(),
        "paper": rows["paper"].tolist(), "reproduced": rows["reproduced"].tolist(),
        "difference": rows["difference"].tolist(), "verdict": rows["verdict"].tolist(), "note": notes,
    })
    # Inline styles: Quarto drops a Styler's <style> block from the page.
    return (table(view, digits=_DIGITS)
            .format(lambda v: badge(v, background=VERDICT_COLOURS[v]), subset=["verdict"], escape="html")
            .format(lambda v: badge(v, font_size="85%"), subset=["note"], escape="html"))


def _listing(rows: pd.DataFrame) -> str:
    return "; ".join(
        f"{q} (paper {format_number(p, digits=_DIGITS)}, here {format_number(r, digits=_DIGITS)})"
        for q, p, r in rows[["quantity", "paper", "reproduced"]].itertuples(index=False)
    )


def plain_summary(scorecard: pd.DataFrame) -> str:
    """The scorecard in words (Markdown): how many of the paper's numbers and claims are
    reproduced, differ or cannot be compared, then which results, claims and settings."""
    compared = scorecard[~scorecard["kind"].isin(("control", "beyond"))]
    verdicts = compared["verdict"].value_counts()
    findings = compared[compared["kind"] != "setting"]
    settings = compared[compared["kind"] == "setting"]
    held = findings[findings["verdict"] == "reproduced"]
    differ = findings[findings["verdict"] == "differs"]
    settings_differ = settings[settings["verdict"] == "differs"]
    text = (
        f"Of the paper's {len(compared)} numbers and claims, **{verdicts.get('reproduced', 0)} are reproduced**, "
        f"**{verdicts.get('differs', 0)} differ** and {verdicts.get('not comparable', 0)} cannot be compared here; "
        f"{int((scorecard['kind'] == 'control').sum())} further rows are controls this book adds, and "
        f"{int((scorecard['kind'] == 'beyond').sum())} are findings beyond the paper.\n\n"
        + (f"**Results and claims that hold:** {_listing(held)}.\n\n" if len(held)
           else "No result or claim of the paper holds here.\n\n")
        + (f"**Results and claims that differ:** {_listing(differ)}.\n\n" if len(differ)
           else "No compared result or claim differs.\n\n")
        + (f"**Settings that differ from the paper's:** {_listing(settings_differ)}." if len(settings_differ)
           else "Every compared setting is the paper's.")
    )
    if _model_label(scorecard) is not None:
        text += (
            "\n\nUnder this profile the scorecard tests whether the paper's *method* behaves as the paper says on a "
            "small model that runs anywhere: the orderings of Tables 1-2, the share of interpretable features of "
            "Tables 3-4 (read beside the null fraction of random gene lists, which the paper does not report), and "
            "whether a traced circuit names its cell's own type. It cannot confirm the paper's absolute numbers: "
            "those need the paper profile, with the paper's model and data."
        )
    return text
