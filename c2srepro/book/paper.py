"""The paper's published numbers, typed once: Hosokawa et al., *Transcoder-based Circuit Analysis
for Interpretable Single-Cell Foundation Models* (text in ``shared/paper/``).

1. The plain constants (``TABLE1``, ``TABLE2``, ``TABLE3_INTERPRETABLE``, ``TABLE4``,
   ``HYPERPARAMETERS``, the case study's ``CIRCUIT_GENES`` and marker term) are what the chapters
   print beside their own numbers.
2. ``PAPER_VALUES`` restates them as one :class:`PaperValue` per quantity (with where in the paper
   it stands and whether it is a setting, a result or a claim), the rows the scorecard compares.
   Figure 2's L0 values are shown only as a plot, so the paper states no number for them
   (``value=None``).

Derived numbers (the fraction of loss recovered, Table 4's fractions and mean) are computed here
from the published ones, never typed a second time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from c2srepro.models.load import PAPER_MODEL

__all__ = [
    "CIRCUIT_FEATURE",
    "CIRCUIT_GENES",
    "FRACTION_LOSS_RECOVERED",
    "HYPERPARAMETERS",
    "MARKER_LIBRARY",
    "MARKER_TERM",
    "PAPER_DATA",
    "PAPER_MODEL",
    "PAPER_VALUES",
    "PaperValue",
    "TABLE1",
    "TABLE2",
    "TABLE3_INTERPRETABLE",
    "TABLE4",
]

PAPER_DATA = "Heart Cell Atlas v2"

# Experiments, "Training Hyperparameters".
HYPERPARAMETERS = {
    "model_layers": 24,
    "heldout_fraction": 0.1,  # the 90/10 train/validation split
    "lr": 1e-4,
    "tokens_per_batch": 2048,
    "l1_coefficient": 1.4e-4,
    "d_tc": 8192,
    "expansion_factor": 8,
    "training_tokens": 60_000_000,
    "prompt_genes": 64,  # Figure 4
    "live_threshold_table3": -4.0,  # Figure 3 / Table 3
    "live_threshold_table4": -3.0,
    "table4_fdr": 0.05,
}

# Table 1: validation loss; Table 2: mean KL divergence from the original model.
TABLE1 = {"original": 2.48, "transcoder": 4.63, "no_mlp": 12.67}
TABLE2 = {"transcoder": 2.406, "no_mlp": 10.52}
FRACTION_LOSS_RECOVERED = (TABLE1["no_mlp"] - TABLE1["transcoder"]) / (TABLE1["no_mlp"] - TABLE1["original"])

# Table 3: 20 random live features of layer 12 (of 24), 7 judged gene-level interpretable.
TABLE3_INTERPRETABLE = {"layer": 12, "n_layers": 24, "yes": 7, "n": 20}

# Table 4: live features (log10 E(f) >= -3) and those with a term at FDR < 0.05, per layer.
TABLE4 = pd.DataFrame(
    {
        "layer": list(range(24)),
        "live_features": [116, 179, 606, 665, 729, 919, 967, 921, 641, 542, 636, 625,
                          915, 865, 880, 868, 778, 766, 746, 791, 932, 938, 922, 269],
        "interpretable": [78, 159, 529, 552, 614, 780, 854, 805, 563, 460, 540, 533,
                          808, 762, 802, 776, 682, 679, 664, 710, 827, 835, 804, 220],
    }
).assign(fraction=lambda t: t["interpretable"] / t["live_features"])

# Case study (Figures 4-5): an endothelial cell, predicted "endothelial cell of artery".
CIRCUIT_FEATURE = 2692  # last-layer feature on the final token whose circuit Figure 5 shows
CIRCUIT_GENES = ("VWF", "PTPRB", "ANKRD13C", "KHDRBS1", "LPAR6", "ST6GALNAC3", "ART4", "DIAPH2", "MT-ND4")
MARKER_LIBRARY = "CellMarker_Augmented_2021"
MARKER_TERM = {"term": "Endothelial cell: heart", "fdr": 0.0013, "combined_score": 315.17}


@dataclass(frozen=True)
class PaperValue:
    """One number or statement of the paper. ``value`` None: shown only in a figure, no number."""

    quantity: str
    value: float | int | str | None
    source: str
    kind: str


def _paper_values() -> dict[str, PaperValue]:
    h = HYPERPARAMETERS
    v = {
        "model_layers": PaperValue("model layers", h["model_layers"], "Experiments", "setting"),
        "heldout_fraction": PaperValue(
            "held-out fraction of the data (90/10 split)", h["heldout_fraction"], "Experiments", "setting"),
        "lr": PaperValue("transcoder max learning rate", h["lr"], "Training hyperparameters", "setting"),
        "tokens_per_batch": PaperValue(
            "transcoder tokens per batch", h["tokens_per_batch"], "Training hyperparameters", "setting"),
        "l1_coefficient": PaperValue(
            "transcoder L1 coefficient", h["l1_coefficient"], "Training hyperparameters", "setting"),
        "d_tc": PaperValue("transcoder width (features)", h["d_tc"], "Training hyperparameters", "setting"),
        "expansion_factor": PaperValue(
            "transcoder expansion factor", h["expansion_factor"], "Training hyperparameters", "setting"),
        "training_tokens": PaperValue(
            "transcoder training tokens", h["training_tokens"], "Training hyperparameters", "setting"),
        "loss_original": PaperValue("validation loss, original", TABLE1["original"], "Table 1", "result"),
        "loss_transcoder": PaperValue("validation loss, transcoders", TABLE1["transcoder"], "Table 1", "result"),
        "loss_no_mlp": PaperValue("validation loss, no MLP", TABLE1["no_mlp"], "Table 1", "result"),
        "loss_ordering": PaperValue(
            "loss: original < transcoders < no MLP",
            f"{TABLE1['original']:g} < {TABLE1['transcoder']:g} < {TABLE1['no_mlp']:g}", "Table 1", "claim"),
        "fraction_loss_recovered": PaperValue(
            "fraction of loss recovered (derived)", FRACTION_LOSS_RECOVERED, "Table 1, derived", "result"),
        "kl_transcoder": PaperValue("KL(original || transcoders)", TABLE2["transcoder"], "Table 2", "result"),
        "kl_no_mlp": PaperValue("KL(original || no MLP)", TABLE2["no_mlp"], "Table 2", "result"),
        "kl_ordering": PaperValue(
            "KL: transcoders < no MLP", f"{TABLE2['transcoder']:g} < {TABLE2['no_mlp']:g}", "Table 2", "claim"),
        "mean_l0": PaperValue("mean L0 (active features per token)", None, "Figure 2", "result"),
        "table3_layer": PaperValue(
            "Table 3 layer (middle layer)",
            f"{TABLE3_INTERPRETABLE['layer']} of {TABLE3_INTERPRETABLE['n_layers']}", "Table 3", "setting"),
        "live_threshold_table3": PaperValue(
            "live threshold log10 E(f), Figure 3 / Table 3", h["live_threshold_table3"], "Figure 3", "setting"),
        "table3_n": PaperValue("Table 3 features sampled", TABLE3_INTERPRETABLE["n"], "Table 3", "setting"),
        "table3_interpretable": PaperValue(
            f"Table 3 gene-level interpretable ({TABLE3_INTERPRETABLE['yes']} of {TABLE3_INTERPRETABLE['n']})",
            TABLE3_INTERPRETABLE["yes"] / TABLE3_INTERPRETABLE["n"], "Table 3", "result"),
        "live_threshold_table4": PaperValue(
            "live threshold log10 E(f), Table 4", h["live_threshold_table4"], "Table 4", "setting"),
        "table4_fdr": PaperValue("Table 4 FDR threshold", h["table4_fdr"], "Table 4", "setting"),
        "table4_mean_fraction": PaperValue(
            "Table 4 mean interpretable fraction", float(TABLE4["fraction"].mean()), "Table 4", "result"),
        "table4_most_layers_over_80": PaperValue(
            "Table 4: over 80% interpretable in most layers",
            f"{int((TABLE4['fraction'] > 0.8).sum())} of {len(TABLE4)} layers", "Table 4, text", "claim"),
        "table4_layer0_dip": PaperValue(
            "Table 4: layer 0 has the lowest fraction", f"layer 0: {TABLE4['fraction'].iloc[0]:.3f}",
            "Table 4, text", "claim"),
        "prompt_genes": PaperValue("genes per prompt", h["prompt_genes"], "Figure 4", "setting"),
        "circuit_n_genes": PaperValue(
            "circuit genes: the pruned graph's, by influence", len(CIRCUIT_GENES), "Case study", "result"),
        "circuit_n_genes_greedy": PaperValue(
            "circuit genes: the greedy path search's", len(CIRCUIT_GENES), "Case study", "result"),
        "circuit_paper_genes": PaperValue(
            "paper's circuit genes recovered", ", ".join(CIRCUIT_GENES), "Case study", "result"),
        "top_marker_own_type": PaperValue(
            "top marker term is the cell's own type", f"{MARKER_TERM['term']} (cell: endothelial cell)",
            "Case study", "claim"),
        "top_marker_fdr": PaperValue("top marker term FDR (< 0.05)", MARKER_TERM["fdr"], "Case study", "claim"),
        "top_marker_combined_score": PaperValue(
            "top marker term combined score", MARKER_TERM["combined_score"], "Case study", "result"),
    }
    for row in TABLE4.itertuples():
        v[f"table4_fraction_layer_{row.layer}"] = PaperValue(
            f"Table 4 fraction, layer {row.layer}", float(row.fraction), "Table 4", "result")
    return v


PAPER_VALUES: dict[str, PaperValue] = _paper_values()
