"""The biological reading of a circuit: label map, marker-term pick, same-prompt control, own-type rate, summary."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from c2srepro._cache import write_json_atomic
from c2srepro.biology.casestudy import (
    CircuitSummary,
    MarkerTerm,
    circuit_enrichment,
    compare_targets,
    dataset_key,
    label_marker_terms,
    influential_genes,
    own_type_rate,
    pick_cell,
    prompt_subset_control,
    read_label_map,
    summarise_circuit,
    top_marker_term,
    traced_own_type_rate,
)
from c2srepro.data.cells import CellSentence
from c2srepro.enrichment import GeneSetLibrary, enrich, load_library

PBMC_LABELS = [
    "CD14+ Monocyte", "CD56+ NK", "CD19+ B", "Dendritic", "CD4+/CD25 T Reg", "CD8+ Cytotoxic T",
    "CD4+/CD45RO+ Memory", "CD8+/CD45RA+ Naive Cytotoxic", "CD4+/CD45RA+/CD25- Naive T", "CD34+",
]
HEART_LABELS = [
    "Adipocyte", "Atrial Cardiomyocyte", "Endothelial", "Fibroblast", "Lymphoid", "Mast", "Mesothelial",
    "Myeloid", "Neural", "Pericytes", "Smooth Muscle", "Ventricular Cardiomyocyte",
]
MARKER_LIBRARIES = ("cellconsensus_L2", "CellMarker_2.0")


@pytest.fixture(scope="module")
def libraries() -> dict[str, GeneSetLibrary]:
    return {name: load_library(name) for name in MARKER_LIBRARIES}


def planted_library() -> tuple[GeneSetLibrary, list[str], list[str]]:
    """A prompt of 60 genes, a 2,000-gene universe, term PLANT = the 8 circuit genes, 40 random terms."""
    rng = np.random.default_rng(42)
    universe = [f"G{i}" for i in range(2000)]
    prompt = universe[:60]
    circuit = prompt[3:11]
    sets = {"PLANT": circuit}
    for t in range(40):
        sets[f"T{t:02d}"] = rng.choice(universe, size=int(rng.integers(10, 60)), replace=False).tolist()
    sets["FILLER"] = universe[1000:]  # puts the whole universe into the library's background
    return GeneSetLibrary("planted", sets, source="test", version="1", sha256="-"), prompt, circuit


# ---------------------------------------------------------------------------------------------
# Label map


def test_label_map_covers_both_datasets_in_both_libraries(libraries):
    table = read_label_map()
    for dataset, labels in (("pbmc68k_reduced", PBMC_LABELS), ("heart_cell_atlas_v2", HEART_LABELS)):
        assert sorted(table.loc[table["dataset"] == dataset, "label"].unique()) == sorted(labels)
        for name in MARKER_LIBRARIES:
            for label in labels:
                terms = label_marker_terms(dataset, label, name)
                exact = label_marker_terms(dataset, label, libraries[name], strict=True)
                assert exact and set(exact) <= set(terms), (dataset, label, name)


def test_every_mapped_term_exists_in_its_library(libraries):
    table = read_label_map()
    assert set(table["library"]) == set(MARKER_LIBRARIES)
    for name, rows in table.groupby("library"):
        missing = sorted(set(rows["term"]) - set(libraries[name].terms))
        assert not missing, f"{name}: terms not in the loaded library (typos?): {missing}"


def test_pbmc_labels_match_the_dataset_and_key_choices():
    import scanpy as sc

    labels = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].cat.categories
    assert sorted(labels) == sorted(PBMC_LABELS)
    assert label_marker_terms("pbmc68k_reduced", "CD14+ Monocyte", "cellconsensus_L2") == ["monocyte"]
    assert "Endothelial cell: Heart" in label_marker_terms("heart_cell_atlas_v2", "Endothelial", "CellMarker_2.0")
    # A path to the atlas file resolves to the atlas's labels.
    assert dataset_key("/data/cache/Global_raw.h5ad") == "heart_cell_atlas_v2"
    assert "muscle cell" in label_marker_terms("data/cache/Global_raw.h5ad", "Atrial Cardiomyocyte", "cellconsensus_L2")
    # strict drops the enclosing types.
    treg = label_marker_terms("pbmc68k_reduced", "CD4+/CD25 T Reg", "CellMarker_2.0")
    assert "T cell: Blood" in treg
    strict = label_marker_terms("pbmc68k_reduced", "CD4+/CD25 T Reg", "CellMarker_2.0", strict=True)
    assert "T cell: Blood" not in strict and "Regulatory T(Treg) cell: Blood" in strict


def test_label_map_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="label 'Platelet' is unmapped.*mapped labels"):
        label_marker_terms("pbmc68k_reduced", "Platelet", "cellconsensus_L2")
    with pytest.raises(ValueError, match="dataset 'pbmc3k' is not in the label map"):
        label_marker_terms("pbmc3k", "CD14+ Monocyte", "cellconsensus_L2")
    with pytest.raises(ValueError, match="library 'KEGG_2021_Human' has no label map"):
        label_marker_terms("pbmc68k_reduced", "CD14+ Monocyte", "KEGG_2021_Human")
    header = "dataset,label,library,term,level,note\n"
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "d,l,lib,t,maybe,\n")
    with pytest.raises(ValueError, match="level must be one of"):
        read_label_map(bad)
    bad.write_text(header + "d,l,lib,t,exact,\nd,l,lib,t,broad,\n")
    with pytest.raises(ValueError, match="listed twice"):
        read_label_map(bad)
    bad.write_text(header + "d,l,lib,,exact,\n")
    with pytest.raises(ValueError, match="empty 'term'"):
        read_label_map(bad)
    good = tmp_path / "good.csv"
    good.write_text("# a comment line\n" + header + 'd,l,lib,t,exact,"see #3, kept"\n')
    assert read_label_map(good)["note"].tolist() == ["see #3, kept"]
    with pytest.raises(FileNotFoundError, match="label map"):
        read_label_map(tmp_path / "absent.csv")


# ---------------------------------------------------------------------------------------------
# Top marker term


def synthetic_enrichment() -> pd.DataFrame:
    rows = [  # term, FDR, combined score, odds ratio, p
        ("strong but not significant", 0.20, 900.0, 90.0, 0.01),
        ("significant, high score", 0.01, 300.0, 30.0, 0.001),
        ("significant, tie, larger p", 0.04, 300.0, 20.0, 0.004),
        ("significant, low score", 0.001, 50.0, 5.0, 0.0001),
        ("at the threshold", 0.05, 1000.0, 99.0, 0.02),
    ]
    return pd.DataFrame({
        "query": "query", "Gene_set": "lib", "Term": [r[0] for r in rows], "Overlap": "1/5",
        "P-value": [r[4] for r in rows], "Adjusted P-value": [r[1] for r in rows],
        "Odds Ratio": [r[3] for r in rows], "Combined Score": [r[2] for r in rows], "Genes": "A",
    })


def test_top_marker_term_is_the_best_score_with_fdr_below_threshold():
    df = synthetic_enrichment()
    top = top_marker_term(df)
    assert top == MarkerTerm("significant, high score", 0.01, 300.0, 30.0)
    term, fdr, score, odds = top  # unpacks as the paper's (term, FDR, score, odds ratio)
    assert (term, fdr) == ("significant, high score", 0.01)
    # FDR < fdr is strict: 0.05 does not pass 0.05 but passes 0.06.
    assert top_marker_term(df, fdr=0.06).term == "at the threshold"
    assert top_marker_term(df, score="Odds Ratio").term == "significant, high score"
    assert top_marker_term(df, score="P-value").term == "significant, low score"
    assert top_marker_term(df, fdr=0.0005) is None
    assert top_marker_term(df.iloc[:0]) is None


def test_top_marker_term_libraries_and_errors():
    df = synthetic_enrichment()
    other = df.assign(Gene_set="other", **{"Combined Score": df["Combined Score"] * 10})
    both = pd.concat([df, other], ignore_index=True)
    with pytest.raises(ValueError, match="several libraries"):
        top_marker_term(both)
    assert top_marker_term(both, library="other").combined_score == 3000.0
    with pytest.raises(ValueError, match="not in the enrichment"):
        top_marker_term(both, library="nope")
    with pytest.raises(ValueError, match="lacks columns"):
        top_marker_term(df.drop(columns="Odds Ratio"))
    with pytest.raises(ValueError, match="fdr must lie"):
        top_marker_term(df, fdr=0)
    with pytest.raises(ValueError, match="score must be one of"):
        top_marker_term(df, score="Rank")


def test_circuit_enrichment_ranks_like_the_paper(libraries):
    genes = ["VWF", "PTPRB", "ANKRD13C", "KHDRBS1", "LPAR6", "ST6GALNAC3", "ART4", "DIAPH2", "MT-ND4"]
    lib = libraries["CellMarker_2.0"]
    ranked = circuit_enrichment(genes, [lib, libraries["cellconsensus_L2"]])
    raw = enrich(genes, [lib, libraries["cellconsensus_L2"]])
    assert len(ranked) == len(raw)
    assert list(dict.fromkeys(ranked["Gene_set"])) == ["CellMarker_2.0", "cellconsensus_L2"]
    for name, rows in ranked.groupby("Gene_set", sort=False):
        significant = rows["significant"].to_numpy()
        assert (significant == (rows["Adjusted P-value"] < 0.05).to_numpy()).all()
        assert not (np.diff(significant.astype(int)) > 0).any()  # significant rows first
        scores = rows.loc[rows["significant"], "Combined Score"].to_numpy()
        assert (np.diff(scores) <= 0).all()
        # The pick equals a direct filter of the unsorted table (independent of the sort).
        sub = raw[(raw["Gene_set"] == name) & (raw["Adjusted P-value"] < 0.05)]
        assert top_marker_term(ranked, library=name).combined_score == sub["Combined Score"].max()
        assert rows.iloc[0]["Term"] == top_marker_term(ranked, library=name).term
    with pytest.raises(ValueError, match="gene list is empty"):
        circuit_enrichment([], lib)
    with pytest.raises(ValueError, match="one string"):
        circuit_enrichment("VWF", lib)


# ---------------------------------------------------------------------------------------------
# Same-prompt control


def test_control_places_a_planted_circuit_at_the_top():
    lib, prompt, circuit = planted_library()
    result = prompt_subset_control(circuit, prompt, lib, n_random=300, seed=0, target_terms=["PLANT"])
    assert result["circuit_top_term"] == "PLANT"
    assert result["percentile"] > 99 and result["p_value"] < 0.01
    assert result["target_percentile"] > 99 and result["circuit_top_is_target"]
    # Random subsets that happen to share a gene or two with PLANT name it too (what the control
    # is for), but far from always.
    assert 0 < result["random_top_is_target_fraction"] < 0.5
    assert len(result["random_scores"]) == 300 and result["n_genes"] == 8 and result["n_prompt_genes"] == 60
    json.dumps(result)  # JSON-ready
    # The percentile is the mid-rank of the circuit's score among the random scores.
    random = np.array(result["random_scores"])
    below, tied = (random < result["circuit_score"]).sum(), (random == result["circuit_score"]).sum()
    assert result["percentile"] == pytest.approx(100 * (below + tied / 2) / 300)


def test_control_places_random_circuits_in_the_middle():
    lib, prompt, _ = planted_library()
    rng = np.random.default_rng(1)
    percentiles = [
        prompt_subset_control(rng.choice(prompt, 8, replace=False).tolist(), prompt, lib, n_random=100, seed=s)[
            "percentile"
        ]
        for s in range(30)
    ]
    assert 30 < np.mean(percentiles) < 70
    assert min(percentiles) < 50 < max(percentiles)


def test_control_is_seeded_and_its_scores_are_the_subsets_top_terms():
    lib, prompt, circuit = planted_library()
    first = prompt_subset_control(circuit, prompt, lib, n_random=50, seed=3)
    assert first == prompt_subset_control(circuit, prompt, lib, n_random=50, seed=3)
    assert first["random_scores"] != prompt_subset_control(circuit, prompt, lib, n_random=50, seed=4)["random_scores"]
    # With a prompt one gene longer than the circuit, the only subsets leave one gene out: every
    # random score must be the top-term score of one of them, computed here independently.
    small_prompt = circuit + ["G500"]
    control = prompt_subset_control(circuit, small_prompt, lib, n_random=200, seed=0)
    expected = set()
    for left_out in small_prompt:
        subset = [g for g in small_prompt if g != left_out]
        top = top_marker_term(circuit_enrichment(subset, lib))
        expected.add(top.combined_score if top else 0.0)
    assert set(control["random_scores"]) == expected
    # Genes given per token (None for template text, repeats for multi-token genes) are allowed.
    per_token = [None] + [g for gene in prompt for g in (gene, gene)] + [None]
    assert prompt_subset_control(circuit, per_token, lib, n_random=50, seed=3) == first


def test_control_errors_name_the_problem():
    lib, prompt, circuit = planted_library()
    with pytest.raises(ValueError, match="circuit gene list is empty"):
        prompt_subset_control([], prompt, lib)
    with pytest.raises(ValueError, match="not among the prompt's genes"):
        prompt_subset_control(["G1999"], prompt, lib)
    with pytest.raises(ValueError, match="no control"):
        prompt_subset_control(prompt, prompt, lib)
    with pytest.raises(ValueError, match="target_terms must be non-empty terms"):
        prompt_subset_control(circuit, prompt, lib, target_terms=["Endothelial cell: Heart"])
    with pytest.raises(ValueError, match="n_random must be"):
        prompt_subset_control(circuit, prompt, lib, n_random=0)
    with pytest.raises(ValueError, match="score must be one of"):
        prompt_subset_control(circuit, prompt, lib, score="Overlap")


# ---------------------------------------------------------------------------------------------
# Own-type rate


def test_own_type_rate_counts_cells_whose_top_term_is_their_type(libraries):
    lib = libraries["cellconsensus_L2"]
    others = {t: g for t, g in lib.sets.items()}

    def unique_markers(term: str, n: int = 10) -> list[str]:
        rest = set().union(*(g for t, g in others.items() if t != term))
        return sorted(lib.sets[term] - rest)[:n]

    cells = [
        ("CD14+ Monocyte", unique_markers("monocyte")),
        ("CD56+ NK", unique_markers("natural killer cell")),
        ("CD19+ B", unique_markers("monocyte")),  # a B cell whose circuit says monocyte
        ("Dendritic", []),  # a circuit without genes
    ]
    rows, rate = own_type_rate(cells, lib, dataset="pbmc68k_reduced")
    assert rows["top_term"].tolist()[:3] == ["monocyte", "natural killer cell", "monocyte"]
    assert rows["own_type"].tolist() == [True, True, False, False]
    assert rate == 0.5
    assert rows.loc[0, "own_rank"] == 1 and math.isnan(rows.loc[3, "own_rank"]) and rows.loc[3, "n_genes"] == 0
    assert rows.loc[3, "top_term"] is None
    with pytest.raises(ValueError, match="label 'Platelet' is unmapped"):
        own_type_rate([("Platelet", unique_markers("monocyte"))], lib, dataset="pbmc68k_reduced")
    with pytest.raises(ValueError, match="no cells"):
        own_type_rate([], lib, dataset="pbmc68k_reduced")


# ---------------------------------------------------------------------------------------------
# A traced cell on a tiny C2S model: the cell, its graphs, its own-type rate, its summary

TINY_CELLS = [
    CellSentence(0, "a", ("CD14", "LYZ", "S100A8", "FCN1"), "CD14+ Monocyte"),
    CellSentence(1, "b", ("NKG7", "GNLY", "CST7", "PRF1"), "CD56+ NK"),
    CellSentence(2, "c", ("CD79A", "MS4A1", "CD19", "CD74"), "CD19+ B"),
    CellSentence(3, "d", ("GNLY", "NKG7", "KLRD1", "GZMB"), "CD56+ NK"),
]
TINY_LABELS = ["CD14+ Monocyte", "CD56+ NK", "CD19+ B", "Dendritic"]
TINY_PREDICTED = ["CD14+ Monocyte", "CD56+ NK", "CD14+ Monocyte", "CD56+ NK"]  # cell 2 is wrong


@pytest.fixture(scope="module")
def tiny_replacement(tokenizer):
    import torch
    from _tiny_neox import tiny_transcoders
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from c2srepro.attribution import ReplacementModel
    from c2srepro.data.prompts import answer_text, build_prompt
    from c2srepro.data.tokenizer import CellTokenizer
    from c2srepro.models.mini_c2s import build_vocabulary

    texts = [build_prompt(c, with_answer=True).text for c in TINY_CELLS] + [answer_text(label) for label in TINY_LABELS]
    cell_tokenizer = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=cell_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=128)).eval()
    ids = torch.tensor(cell_tokenizer.encode(build_prompt(TINY_CELLS[0]).text)[0])
    return ReplacementModel(model, tiny_transcoders(model, ids, firing=0.3), cell_tokenizer)


def test_pick_cell_by_label_takes_the_first_correct_one():
    cell, predicted = pick_cell(TINY_CELLS, TINY_PREDICTED, "CD56+ NK")
    assert cell.cell_id == "b" and predicted == "CD56+ NK"
    later, _ = pick_cell(TINY_CELLS, ["x", "CD19+ B", "x", "CD56+ NK"], "CD56+ NK")
    assert later.cell_id == "d"
    assert pick_cell(TINY_CELLS, TINY_PREDICTED, 2) == (TINY_CELLS[2], "CD14+ Monocyte")


def test_pick_cell_errors():
    with pytest.raises(ValueError, match="cell index 5 is out of range: there are 4 cells"):
        pick_cell(TINY_CELLS, TINY_PREDICTED, 5)
    with pytest.raises(ValueError, match="no cell is labelled 'B cell'"):
        pick_cell(TINY_CELLS, TINY_PREDICTED, "B cell")
    with pytest.raises(ValueError, match="classifies none of the 1 cells labelled 'CD19\\+ B'"):
        pick_cell(TINY_CELLS, TINY_PREDICTED, "CD19+ B")
    with pytest.raises(ValueError, match="4 cells but 3 predictions"):
        pick_cell(TINY_CELLS, TINY_PREDICTED[:3], 0)


def test_compare_targets_asks_each_question_of_one_cell(tiny_replacement):
    from c2srepro.attribution import LabelTarget

    cell, label = TINY_CELLS[0], TINY_PREDICTED[0]
    graphs, table = compare_targets(tiny_replacement, cell, label, candidates=TINY_LABELS,
                                    kinds=["label_vs_candidates", "first_token", "feature", "label"])
    assert table["target kind"].tolist() == ["label_vs_candidates", "first_token", "feature", "label"]
    direct = tiny_replacement.attribute(cell, LabelTarget(label, candidates=TINY_LABELS))
    assert torch_equal(graphs["label_vs_candidates"].adjacency, direct.adjacency)
    row = table.iloc[0]
    assert row["value"] == pytest.approx(direct.info["targets"][0]["value"], rel=1e-12)
    assert row["top genes"].split(", ") == direct.genes()["gene"].head(10).tolist()
    assert row["influential genes"] == len(influential_genes(direct.genes()))
    assert row["replacement"] == pytest.approx(direct.scores()["replacement"])
    assert table.set_index("target kind").loc["first_token", "target"].startswith("logit")
    reused, _ = compare_targets(tiny_replacement, cell, label, candidates=TINY_LABELS, kinds=["label_vs_candidates"],
                                graphs={"label_vs_candidates": direct})
    assert reused["label_vs_candidates"] is direct
    kept, rows = compare_targets(tiny_replacement, cell, label, candidates=TINY_LABELS, kinds=["first_token", "label"],
                                 keep=["label"])
    assert list(kept) == ["label"] and rows["target kind"].tolist() == ["first_token", "label"]
    with pytest.raises(ValueError, match=r"target kinds \['logit'\] are not among"):
        compare_targets(tiny_replacement, cell, label, candidates=TINY_LABELS, kinds=["logit"])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_traced_own_type_rate_traces_the_first_correct_cells(tiny_replacement, libraries):
    from c2srepro.attribution import LabelTarget

    library = libraries["cellconsensus_L2"]
    rows, rate = traced_own_type_rate(tiny_replacement, TINY_CELLS, TINY_PREDICTED, library, dataset="pbmc68k_reduced",
                                      n_cells=2, candidates=TINY_LABELS, gene_threshold=0.5, progress=False)
    # Independent composition: the first two correct cells (0 and 1), each its label among the labels.
    by_hand = [(c.label, influential_genes(
        tiny_replacement.attribute(c, LabelTarget(c.label, candidates=TINY_LABELS)).genes(), threshold=0.5))
        for c in TINY_CELLS[:2]]
    expected_rows, expected_rate = own_type_rate(by_hand, library, dataset="pbmc68k_reduced")
    pd.testing.assert_frame_equal(rows, expected_rows)
    assert rate == expected_rate and rows["label"].tolist() == ["CD14+ Monocyte", "CD56+ NK"]

    none_correct, no_rate = traced_own_type_rate(tiny_replacement, TINY_CELLS[2:3], ["CD56+ NK"], library,
                                                 dataset="pbmc68k_reduced", n_cells=5, candidates=TINY_LABELS,
                                                 progress=False)
    assert none_correct.empty and no_rate is None
    with pytest.raises(ValueError, match="4 cells but 3 predictions"):
        traced_own_type_rate(tiny_replacement, TINY_CELLS, TINY_PREDICTED[:3], library, dataset="pbmc68k_reduced",
                             n_cells=2, candidates=TINY_LABELS)
    with pytest.raises(ValueError, match="n_cells must be >= 1"):
        traced_own_type_rate(tiny_replacement, TINY_CELLS, TINY_PREDICTED, library, dataset="pbmc68k_reduced",
                             n_cells=0, candidates=TINY_LABELS)
    with pytest.raises(ValueError, match="target kind must be one of"):
        traced_own_type_rate(tiny_replacement, TINY_CELLS, TINY_PREDICTED, library, dataset="pbmc68k_reduced",
                             n_cells=1, candidates=TINY_LABELS, target="logit", progress=False)


@pytest.fixture(scope="module")
def traced_summary(tiny_replacement, libraries):
    """Every piece chapter 6 gathers for one cell, and the summary of them."""
    from c2srepro.attribution import LabelTarget, ablate, greedy_paths

    cell, label = TINY_CELLS[0], TINY_PREDICTED[0]
    graph = tiny_replacement.attribute(cell, LabelTarget(label, candidates=TINY_LABELS))
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    genes = influential_genes(graph.genes(), threshold=0.5)
    greedy = greedy_paths(graph, k=8, depth=2)
    library = libraries["cellconsensus_L2"]
    enrichment = circuit_enrichment(genes, library) if genes else None
    control = prompt_subset_control(genes, cell.genes, library, n_random=20) if genes else None
    ablation = ablate(tiny_replacement, cell, pruned.top_features(pruned.n_nodes), labels=TINY_LABELS, n_random=2,
                      freeze_attention=True)
    intervention = ablate(tiny_replacement, cell, graph.top_features(2), labels=TINY_LABELS, n_random=2)
    own_type = traced_own_type_rate(tiny_replacement, TINY_CELLS, TINY_PREDICTED, library, dataset="pbmc68k_reduced",
                                    n_cells=2, candidates=TINY_LABELS, progress=False)
    _, targets = compare_targets(tiny_replacement, cell, label, candidates=TINY_LABELS, kinds=["label_vs_candidates"],
                                 graphs={"label_vs_candidates": graph})
    pieces = dict(cell=cell, predicted_label=label, graph=graph, pruned=pruned, genes=genes, greedy=greedy,
                  enrichment=enrichment, greedy_enrichment=None, control=control, ablation=ablation,
                  intervention=intervention, own_type=own_type, targets=targets, library=library,
                  dataset="pbmc68k_reduced", gene_threshold=0.5)
    return pieces, summarise_circuit(**pieces)


def test_the_summary_reads_each_piece(traced_summary):
    pieces, summary = traced_summary
    graph, pruned = pieces["graph"], pieces["pruned"]
    assert summary.cell_id == "a" and summary.cell_label == summary.predicted_label == "CD14+ Monocyte"
    assert summary.target["kind"] == "LabelTarget" and summary.target["node_id"] == graph.node(graph.targets[0]).id
    assert summary.graph_size["nodes"] == graph.n_nodes and summary.pruned_graph_size["nodes"] == pruned.n_nodes
    assert summary.graph_size["edges"] == int((graph.adjacency != 0).sum())
    assert (summary.node_threshold, summary.edge_threshold, summary.gene_threshold) == (0.8, 0.98, 0.5)
    assert summary.replacement_score == graph.scores()["replacement"]
    assert summary.genes == pieces["genes"]
    assert summary.greedy_k == 8 and summary.greedy_depth == 2 and summary.greedy_target == summary.target
    assert summary.ablation == pieces["ablation"].summary() and summary.ablation["mode"] == "frozen"
    assert summary.intervention["n_features"] == 2 and summary.intervention["mode"] == "recomputed"
    assert summary.own_type_rate == pieces["own_type"][1] and summary.own_type_rate_cells == 2
    assert len(summary.targets) == 1 and summary.targets[0]["target kind"] == "label_vs_candidates"
    top = top_marker_term(pieces["enrichment"]) if pieces["enrichment"] is not None else None
    assert summary.top_marker_term == (top.term if top else None)
    assert summary.prompt_subset_percentile == (pieces["control"]["percentile"] if pieces["control"] else None)


def test_the_summary_round_trips_through_json_and_names_a_missing_field(tmp_path, traced_summary):
    _, summary = traced_summary
    path = write_json_atomic(tmp_path / "circuit_summary.json", summary.to_dict())
    data = json.loads(path.read_text())
    assert CircuitSummary.from_dict(data) == CircuitSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert CircuitSummary.from_dict({**data, "provenance": {"params": {}}}).genes == summary.genes
    renamed = {("ablation_drop" if key == "ablation" else key): value for key, value in data.items()}
    with pytest.raises(ValueError, match=r"fields missing \['ablation'\], unknown \['ablation_drop'\]; rerun chapter 6"):
        CircuitSummary.from_dict(renamed)


def test_a_question_without_answer_writes_null(tmp_path, traced_summary):
    pieces, _ = traced_summary
    unanswered = {"target kind": "feature", "target": None, "value": None, "note": "no feature fires"}
    targets = pd.concat([pieces["targets"], pd.DataFrame([unanswered])], ignore_index=True)
    summary = summarise_circuit(**{**pieces, "targets": targets})
    row = summary.targets[-1]
    assert row["value"] is None and row["note"] == "no feature fires"
    assert summary.targets[0]["value"] == pytest.approx(pieces["targets"]["value"].iloc[0])
    path = write_json_atomic(tmp_path / "circuit_summary.json", summary.to_dict())  # refuses NaN
    assert json.loads(path.read_text())["targets"][-1]["value"] is None


def test_summary_edge_cases(traced_summary):
    pieces, summary = traced_summary
    bare = summarise_circuit(**{**pieces, "enrichment": None, "control": None, "ablation": None, "intervention": None})
    assert bare.top_marker_term is None and bare.top_marker_matches_cell_type is False and bare.ablation is None
    assert bare.prompt_subset_percentile is None and bare.top_marker_library == "cellconsensus_L2"
    if summary.top_marker_term is not None:
        own = summarise_circuit(**{**pieces, "dataset": None, "target_terms": [summary.top_marker_term]})
        assert own.top_marker_matches_cell_type is True
    with pytest.raises(ValueError, match="pass dataset="):
        summarise_circuit(**{**pieces, "dataset": None})
    with pytest.raises(ValueError, match="label 'CD14\\+ Monocyte' is unmapped"):
        summarise_circuit(**{**pieces, "dataset": "heart_cell_atlas_v2"})


def test_exactly_tied_top_terms_all_count_as_the_top():
    from c2srepro.biology.casestudy import top_marker_ties

    table = pd.DataFrame({
        "Gene_set": ["L"] * 3, "Term": ["macrophage", "monocyte", "B cell"],
        "P-value": [1e-9, 1e-9, 1e-3], "Adjusted P-value": [1e-8, 1e-8, 1e-3],
        "Odds Ratio": [50.0, 50.0, 5.0], "Combined Score": [900.0, 900.0, 30.0],
    })
    assert top_marker_ties(table) == ["macrophage", "monocyte"]
    assert top_marker_ties(table.iloc[[1, 2]]) == ["monocyte"]
    assert top_marker_ties(table.assign(**{"Adjusted P-value": 0.5})) == []


def test_a_marker_library_the_circuit_misses_is_reported_as_no_term():
    markers = GeneSetLibrary("markers", {"B cell": ["CD79A", "MS4A1"], "NK": ["NKG7", "GNLY"]},
                             source="test", version="1", sha256="-")
    pathways = GeneSetLibrary("pathways", {"lysosome": ["LYZ", "CTSS", "FTL"]}, source="test", version="1", sha256="-")
    enrichment = circuit_enrichment(["LYZ", "CTSS"], [markers, pathways])
    assert set(enrichment["Gene_set"]) == {"pathways"}  # no marker term holds a circuit gene
    assert top_marker_term(enrichment, library="markers") is None
    with pytest.raises(ValueError, match="library 'markerz' is not in the enrichment"):  # a typo still is an error
        top_marker_term(enrichment, library="markerz")
