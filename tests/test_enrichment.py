"""The vectorised over-representation engine against gseapy.enrich (its own loop over terms)."""

from __future__ import annotations

import logging
import random

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from c2srepro.enrichment import (
    GeneSetLibrary,
    compare_enrichment,
    enrich,
    enrich_best,
    gseapy_enrich,
    gseapy_enrich_many,
    load_library,
)
from c2srepro.enrichment import libraries as libmod
from c2srepro.enrichment import ora
from c2srepro.enrichment.ora import COLUMNS

RTOL = 1e-9


@pytest.fixture(scope="module")
def kegg() -> GeneSetLibrary:
    return load_library("KEGG_2021_Human")


@pytest.fixture(scope="module")
def markers() -> GeneSetLibrary:
    return load_library("cellconsensus_L2", top_n=100)


@pytest.fixture(scope="module")
def go_subset() -> GeneSetLibrary:
    # 250 random GO BP terms: gseapy loops over terms in Python, the full library costs ~1 s/query.
    go = load_library("GO_Biological_Process_2023")
    terms = random.Random(3).sample(go.terms, 250)
    return GeneSetLibrary(
        name="GO_BP_2023_subset", sets={t: go.sets[t] for t in terms}, source=go.source, version="subset", sha256=""
    )


@pytest.fixture(scope="module")
def synthetic() -> GeneSetLibrary:
    rng = random.Random(11)
    genes = [f"G{i:04d}" for i in range(3000)]
    sets = {f"S{j:03d}": rng.sample(genes, rng.randint(3, 300)) for j in range(120)}
    sets["BIG"] = genes[:400]  # a query equal to it drives p below the smallest double
    return GeneSetLibrary(name="synthetic", sets=sets, source="test", version="test", sha256="")


def _assert_matches_gseapy(ours: pd.DataFrame, gene_lists, libraries, background=None):
    reference = gseapy_enrich_many(gene_lists, libraries, background=background)
    cmp = compare_enrichment(ours, reference)
    assert cmp.only_ours == [] and cmp.only_reference == [], "different terms reported"
    assert cmp.n_ours == cmp.n_reference > 0
    assert cmp.overlap_mismatches == 0 and cmp.genes_mismatches == 0
    assert cmp.max_rel_diff["P-value"] <= RTOL
    assert cmp.max_rel_diff["Adjusted P-value"] <= RTOL
    # Odds ratio and combined score use gseapy's arithmetic; only float rounding may differ.
    assert cmp.max_rel_diff["Odds Ratio"] <= 1e-14
    assert cmp.max_rel_diff["Combined Score"] <= 1e-12
    return reference


def test_random_queries_match_gseapy(kegg, markers):
    rng = random.Random(0)
    pool = sorted(kegg.genes | markers.genes)
    lists = {f"q{i}": rng.sample(pool, rng.randint(5, 60)) for i in range(12)}
    ours = enrich(lists, [kegg, markers])
    assert list(ours.columns) == COLUMNS
    _assert_matches_gseapy(ours, lists, [kegg, markers])


def test_go_subset_matches_gseapy(go_subset):
    rng = random.Random(1)
    pool = sorted(go_subset.genes)
    lists = {i: rng.sample(pool, rng.randint(20, 80)) for i in range(4)}
    _assert_matches_gseapy(enrich(lists, go_subset), lists, [go_subset])


def test_tiny_queries_duplicates_and_absent_genes_match_gseapy(kegg):
    lists = {
        "one": ["TP53"],
        "two": ["TP53", "EGFR"],
        "dupes": ["VWF", "VWF", "EGFR", "EGFR", "EGFR", "KRAS"],
        "absent_mixed": ["NOT_A_GENE", "ALSO_NOT", "PIK3CA", "AKT1"],
        "padded": [" TP53 ", "MTOR\t"],
    }
    ours = enrich(lists, kegg)
    _assert_matches_gseapy(ours, lists, [kegg])
    dupes = ours[ours["query"] == "dupes"]
    # Duplicates count once: the same rows as the deduplicated query.
    again = enrich({"dupes": ["VWF", "EGFR", "KRAS"]}, kegg)
    pd.testing.assert_frame_equal(dupes.reset_index(drop=True), again)


def test_blank_entries_are_not_genes_even_with_a_number_background(kegg):
    # gseapy keeps one "" in the query and counts it in k under a number background (a
    # documented difference); here a blank is no gene under every background.
    for background in (None, 20_000):
        padded = enrich(["TP53", "EGFR", " ", ""], kegg, background=background)
        pd.testing.assert_frame_equal(padded, enrich(["TP53", "EGFR"], kegg, background=background))


def test_empty_and_unmatched_queries_give_no_rows_and_a_warning(kegg, caplog):
    lists = {"empty": [], "nothing_known": ["NOT_A_GENE", "XYZ1"], "real": ["TP53", "EGFR", "KRAS", "BRAF"]}
    with caplog.at_level(logging.WARNING, logger="c2srepro.enrichment.ora"):
        ours = enrich(lists, kegg)
    assert set(ours["query"]) == {"real"}
    assert "1 of 3 gene lists are empty" in caplog.text and "'empty'" in caplog.text
    assert "share no gene with the background of KEGG_2021_Human" in caplog.text
    assert "'nothing_known'" in caplog.text
    pd.testing.assert_frame_equal(ours, enrich({"real": lists["real"]}, kegg))
    none = enrich({"empty": []}, kegg)
    assert list(none.columns) == COLUMNS and len(none) == 0


def test_custom_background_list_matches_gseapy(kegg, markers):
    rng = random.Random(5)
    pool = sorted(kegg.genes | markers.genes)
    # Background: part of the library genes plus genes in no set; queries reach outside it.
    background = rng.sample(pool, 2500) + [f"EXTRA{i}" for i in range(300)]
    lists = {f"q{i}": rng.sample(pool, rng.randint(10, 50)) + ["EXTRA1", "EXTRA2"] for i in range(8)}
    ours = enrich(lists, [kegg, markers], background=background)
    _assert_matches_gseapy(ours, lists, [kegg, markers], background=background)
    # Sets are filtered to the background: every reported set size counts background genes only.
    bg = set(background)
    for term, overlap in ours.loc[ours["Gene_set"] == "KEGG_2021_Human", ["Term", "Overlap"]].head(50).itertuples(
        index=False
    ):
        assert int(overlap.split("/")[1]) == len(kegg.sets[term] & bg)


def test_background_size_number_matches_gseapy(kegg):
    rng = random.Random(6)
    lists = {f"q{i}": rng.sample(sorted(kegg.genes), 25) + ["NOT_IN_LIBRARY"] for i in range(4)}
    ours = enrich(lists, kegg, background=20_000)
    _assert_matches_gseapy(ours, lists, [kegg], background=20_000)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_underflowing_p_gives_infinite_combined_score_like_gseapy(synthetic):
    lists = {"big": sorted(synthetic.sets["BIG"]), "small": ["G0001", "G0500", "G2999"]}
    ours = enrich(lists, synthetic)
    reference = _assert_matches_gseapy(ours, lists, [synthetic])
    row = ours[(ours["query"] == "big") & (ours["Term"] == "BIG")].iloc[0]
    assert row["P-value"] == 0.0 and np.isinf(row["Combined Score"])
    assert np.isinf(reference.loc[(reference["query"] == "big") & (reference["Term"] == "BIG"), "Combined Score"]).all()


def test_fdr_is_benjamini_hochberg_per_query_per_library(kegg, markers):
    rng = random.Random(8)
    pool = sorted(kegg.genes | markers.genes)
    lists = {f"q{i}": rng.sample(pool, 40) for i in range(6)}
    ours = enrich(lists, [kegg, markers])
    for _, group in ours.groupby(["query", "Gene_set"]):
        expected = false_discovery_control(group["P-value"].to_numpy(), method="bh")
        np.testing.assert_allclose(group["Adjusted P-value"].to_numpy(), expected, rtol=1e-12)
    # Per library: the same query against both libraries at once equals each library alone.
    alone = enrich(lists, markers)
    both = ours[ours["Gene_set"] == markers.name].reset_index(drop=True)
    pd.testing.assert_frame_equal(both, alone)


def test_rows_are_ordered_by_query_library_and_term(kegg, markers):
    lists = {"z_last_name_first": ["TP53", "CD14", "LYZ", "EGFR"], "a_second": ["VWF", "PECAM1", "CDH5", "KDR"]}
    ours = enrich(lists, [markers, kegg])
    assert list(dict.fromkeys(ours["query"])) == ["z_last_name_first", "a_second"]
    for _, group in ours.groupby("query", sort=False):
        assert list(dict.fromkeys(group["Gene_set"])) == [markers.name, kegg.name]
        for _, block in group.groupby("Gene_set", sort=False):
            assert list(block["Term"]) == sorted(block["Term"])
    single = enrich(["VWF", "PECAM1", "CDH5", "KDR"], markers)
    assert set(single["query"]) == {"query"}
    row = single.sort_values("P-value").iloc[0]
    assert (row["Term"], row["Overlap"]) == ("other endothelial cell", "4/100")
    assert row["Genes"] == "CDH5;KDR;PECAM1;VWF"  # sorted symbols


def test_without_genes_the_statistics_are_unchanged(kegg):
    rng = random.Random(9)
    lists = {f"q{i}": rng.sample(sorted(kegg.genes), 30) for i in range(5)}
    full = enrich(lists, kegg)
    bare = enrich(lists, kegg, with_genes=False)
    pd.testing.assert_frame_equal(full.drop(columns="Genes"), bare.drop(columns="Genes"))
    assert (bare["Genes"] == "").all()


def test_bad_inputs_fail_with_the_fix(kegg, markers):
    with pytest.raises(ValueError, match="one string; pass a list of genes"):
        enrich("TP53 EGFR", kegg)
    with pytest.raises(ValueError, match="non-string entries.*dict \\{name: genes\\}"):
        enrich([["TP53"], ["EGFR"]], kegg)
    with pytest.raises(ValueError, match="gene list 'a' is one string"):
        enrich({"a": "TP53"}, kegg)
    with pytest.raises(ValueError, match="background gene list is empty"):
        enrich(["TP53"], kegg, background=[])
    with pytest.raises(ValueError, match="BioMart"):
        enrich(["TP53"], kegg, background="hsapiens_gene_ensembl")
    with pytest.raises(ValueError, match="shares no gene with library 'KEGG_2021_Human'.*Ensembl"):
        enrich(["TP53"], kegg, background=["ENSG00000141510"])
    with pytest.raises(ValueError, match="smaller than library 'KEGG_2021_Human'"):
        enrich(["TP53"], kegg, background=100)
    with pytest.raises(ValueError, match="library names must be distinct"):
        enrich(["TP53"], [kegg, kegg])


# ---------------------------------------------------------------------------------------------
# Case, as gseapy matches it


def test_lower_case_query_is_upper_cased_as_gseapy_does(kegg):
    lower = ["tp53", "egfr", "kras", "braf", "pik3ca"]
    ours = enrich(lower, kegg)
    _assert_matches_gseapy(ours, {"query": lower}, [kegg])
    assert len(ours) == 131
    # KEGG is upper case throughout, so the upper-cased query gives the rows of the upper-case one.
    pd.testing.assert_frame_equal(ours, enrich([g.upper() for g in lower], kegg))


def test_case_rule_counts_entries_as_gseapy_does(kegg, markers):
    upper9 = ["TP53", "KRAS", "BRAF", "PIK3CA", "AKT1", "MTOR", "VWF", "PECAM1", "CDH5"]
    lists = {
        "nine_of_ten_upper": upper9 + ["egfr"],  # 90%: kept as it is, egfr matches nothing
        "eight_of_ten_upper": upper9[:8] + ["egfr", "cd14"],  # 80%: upper-cased
        "a_blank_tips_it": upper9 + ["egfr", "  "],  # 9 of 11 entries: upper-cased
        "a_duplicate_counts": ["TP53"] + upper9[:8] + ["egfr"],  # 9 of 10 entries upper: kept
        "title_case": ["Vwf", "Pecam1", "Cdh5", "Kdr", "Cd14", "Lyz"],
    }
    ours = enrich(lists, [kegg, markers])
    _assert_matches_gseapy(ours, lists, [kegg, markers])
    genes = {name: set(";".join(group["Genes"]).split(";")) for name, group in ours.groupby("query")}
    assert "EGFR" not in genes["nine_of_ten_upper"] and "EGFR" not in genes["a_duplicate_counts"]
    assert {"EGFR", "CD14"} <= genes["eight_of_ten_upper"]
    assert "EGFR" in genes["a_blank_tips_it"]
    assert {"VWF", "KDR", "CD14", "LYZ"} <= genes["title_case"]


def test_upper_cased_query_against_a_mixed_case_library(markers):
    # cellconsensus keeps symbols such as C19orf33. gseapy upper-cases a lower-case query and
    # its background, so those members fall out of the sets (their upper-cased names are not
    # members) while an upper-case query keeps them.
    mixed = {t: g for t, g in markers.sets.items() if any(not s.isupper() for s in g)}
    assert mixed and markers.upper_case
    term = sorted(mixed)[0]
    members = sorted(markers.sets[term])
    lists = {"lower": [g.lower() for g in members[:30]], "upper": members[:30]}
    ours = enrich(lists, markers)
    _assert_matches_gseapy(ours, lists, [markers])
    rows = ours[ours["Term"] == term].set_index("query")["Overlap"]
    upper_members = sum(g == g.upper() for g in members)
    assert int(rows["lower"].split("/")[1]) == upper_members < len(members)
    assert int(rows["upper"].split("/")[1]) == len(members)
    rng = random.Random(12)
    background = [g.lower() for g in rng.sample(sorted(markers.genes), 2000)] + members
    for bg in (background, 25_000):
        _assert_matches_gseapy(enrich(lists, markers, background=bg), lists, [markers], background=bg)


def _mouse_library() -> GeneSetLibrary:
    rng = random.Random(4)
    genes = [f"Gm{i}" for i in range(400)] + ["Trp53", "Egfr", "Kras", "Braf", "Pik3ca"]
    sets = {f"set {j:02d}": rng.sample(genes, 40) + ["Trp53", "Egfr"] for j in range(15)}
    return GeneSetLibrary(name="mouse", sets=sets, source="test", version="test", sha256="")


@pytest.mark.parametrize("background", [None, 20_000])
def test_lower_case_library_gives_no_rows_and_says_why(background, caplog):
    mouse = _mouse_library()
    assert not mouse.upper_case
    query = ["TP53", "EGFR", "KRAS", "BRAF"]
    assert len(gseapy_enrich(query, mouse, background=background)) == 0  # gseapy: no rows either
    with caplog.at_level(logging.WARNING, logger="c2srepro.enrichment.ora"):
        ours = enrich(query, mouse, background=background)
    assert len(ours) == 0 and list(ours.columns) == COLUMNS
    assert "1 of 1 gene lists share no gene with" in caplog.text
    assert "mouse's genes are not upper case (e.g. 'Braf')" in caplog.text and "species" in caplog.text
    # Matching case-sensitively, as gseapy does, the mouse symbols themselves enrich.
    mouse_query = ["Trp53", "Egfr", "Kras", "Braf"]
    _assert_matches_gseapy(enrich(mouse_query, mouse, background=background), {"query": mouse_query}, [mouse],
                           background=background)


# ---------------------------------------------------------------------------------------------
# What is kept between calls


def _copy(lib: GeneSetLibrary) -> GeneSetLibrary:
    """The same sets in a new object: nothing prepared yet."""
    return GeneSetLibrary(name=lib.name, sets=lib.sets, source=lib.source, version=lib.version, sha256=lib.sha256)


def test_one_list_per_call_reuses_the_prepared_library_and_matches_the_batch(kegg):
    rng = random.Random(13)
    lists = {f"q{i}": rng.sample(sorted(kegg.genes), rng.randint(5, 40)) for i in range(6)}
    prepared = kegg.prepared
    singles = pd.concat([enrich({n: g}, kegg) for n, g in lists.items()], ignore_index=True)
    assert kegg.prepared is prepared
    pd.testing.assert_frame_equal(singles, enrich(lists, kegg))
    pd.testing.assert_frame_equal(singles, enrich(lists, _copy(kegg)))
    with pytest.raises(ValueError, match="read-only"):
        prepared.membership.data[0] = 7
    with pytest.raises(ValueError, match="read-only"):
        prepared.sizes[0] = 7


def test_prepared_matrices_follow_the_library_and_the_background(kegg):
    rng = random.Random(14)
    pool = sorted(kegg.genes)
    lists = {f"q{i}": rng.sample(pool, 30) for i in range(3)}
    smaller = kegg.filter_sizes(min_size=100)  # a changed library is a new object
    assert len(smaller.prepared.terms) == len(smaller) < len(kegg)
    pd.testing.assert_frame_equal(enrich(lists, smaller), enrich(lists, _copy(smaller)))
    backgrounds = [rng.sample(pool, 3000) + [f"OTHER{j}" for j in range(i)] for i in range(6)]
    # A, B, ..., then A again: every call equals the call on a library with nothing kept.
    for bg in backgrounds + backgrounds[:2]:
        pd.testing.assert_frame_equal(enrich(lists, kegg, background=bg), enrich(lists, _copy(kegg), background=bg))
    lock, kept = kegg._within_cache
    assert len(kept) <= libmod.BACKGROUND_CACHE_SIZE


def test_tail_memo_changes_no_value(kegg, monkeypatch):
    rng = random.Random(15)
    lists = {f"q{i}": rng.sample(sorted(kegg.genes), rng.randint(5, 50)) for i in range(20)}
    ora._TAILS.clear()
    cold = enrich(lists, kegg)
    warm = enrich(lists, kegg)  # every tail probability now comes from the memo
    pd.testing.assert_frame_equal(cold, warm)
    monkeypatch.setattr(ora, "TAIL_CACHE_SIZE", 50)
    ora._TAILS.clear()
    for name, genes in lists.items():
        pd.testing.assert_frame_equal(enrich({name: genes}, kegg), cold[cold["query"] == name].reset_index(drop=True))
        assert ora._TAILS.count == sum(len(t) for t in ora._TAILS.by_size.values()) <= 50


# ---------------------------------------------------------------------------------------------
# enrich_best: each (list, library)'s best row, streamed in chunks


def _best_of_full_table(full: pd.DataFrame, libraries) -> pd.DataFrame:
    """The reference: rank enrich()'s full table and keep the first row of every (query, Gene_set)."""
    ranked = full.assign(_lib=full["Gene_set"].map({lib.name: i for i, lib in enumerate(libraries)}))
    ranked = ranked.sort_values(
        ["Adjusted P-value", "Combined Score", "Term"], ascending=[True, False, True], kind="stable"
    )
    best = ranked.groupby(["query", "_lib"], sort=False).head(1)
    queries = {name: i for i, name in enumerate(dict.fromkeys(full["query"]))}
    best = best.assign(_q=best["query"].map(queries)).sort_values(["_q", "_lib"], kind="stable")
    return best.drop(columns=["_q", "_lib"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def go() -> GeneSetLibrary:
    return load_library("GO_Biological_Process_2023")


@pytest.mark.parametrize("background", ["library", "genes", "number"])
def test_enrich_best_is_the_full_tables_best_row_in_any_chunking(kegg, go, markers, background):
    rng = random.Random(21)
    libraries = [kegg, go, markers]
    pool = sorted(kegg.genes | go.genes | markers.genes)
    lists = {f"q{i}": rng.sample(pool, rng.randint(1, 40)) for i in range(300)}
    # Edge cases: empty, nothing known, lower case (upper-cased as gseapy does), duplicates.
    lists.update({"empty": [], "unknown": ["NOT_A_GENE"], "lower": [g.lower() for g in lists["q0"]],
                  "dupes": lists["q1"] * 2})
    bg = {"library": None, "genes": rng.sample(pool, 6000) + ["EXTRA"], "number": 30_000}[background]
    expected = _best_of_full_table(enrich(lists, libraries, background=bg), libraries)
    assert len(expected) > 500
    for chunk_size in (1, 37, 10_000):
        pd.testing.assert_frame_equal(enrich_best(lists, libraries, background=bg, chunk_size=chunk_size), expected)
    bare = enrich_best(lists, libraries, background=bg, with_genes=False)
    pd.testing.assert_frame_equal(bare.drop(columns="Genes"), expected.drop(columns="Genes"))
    assert (bare["Genes"] == "").all()


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
def test_enrich_best_breaks_ties_and_caps_like_the_full_table(synthetic):
    genes = sorted(synthetic.genes)
    # B_TWIN and A_TWIN hold the same genes: equal FDR and combined score, the first name wins.
    sets = {**{t: synthetic.sets[t] for t in synthetic.terms[:40]}, "A_TWIN": genes[:30], "B_TWIN": genes[:30]}
    twins = GeneSetLibrary(name="twins", sets=sets, source="test", version="test", sha256="")
    # 100 genes; a 60-gene query must share 10 genes with a 50-gene set (p = 1) and shares the
    # expected 6 with a 10-gene one (p = 0.64): BH gives both FDR 1, the score decides.
    hundred = [f"H{i:03d}" for i in range(100)]
    capped = GeneSetLibrary(
        name="capped", sets={"A_CERTAIN": hundred[:10] + hundred[60:], "B_CHANCE": hundred[:6] + hundred[60:64]},
        source="test", version="test", sha256="",
    )
    lists = {"underflow": sorted(synthetic.sets["BIG"]), "twins": genes[:12], "capped": hundred[:60]}
    for library, background in ((synthetic, None), (twins, None), (capped, hundred)):
        full = enrich(lists, library, background=background)
        best = enrich_best(lists, library, background=background, chunk_size=2)
        pd.testing.assert_frame_equal(best, _best_of_full_table(full, [library]))
    top = enrich_best(lists, synthetic).set_index("query")
    assert top.loc["underflow", "Term"] == "BIG" and top.loc["underflow", "Adjusted P-value"] == 0.0
    assert np.isinf(top.loc["underflow", "Combined Score"])
    assert enrich_best(lists, twins).set_index("query").loc["twins", "Term"] == "A_TWIN"
    assert (enrich(lists, capped, background=hundred)["Adjusted P-value"] == 1.0).all()
    row = enrich_best(lists, capped, background=hundred).iloc[0]
    assert (row["Term"], row["Adjusted P-value"], row["Overlap"]) == ("B_CHANCE", 1.0, "6/10")


def test_enrich_best_matches_gseapys_best_terms(kegg, go_subset):
    rng = random.Random(22)
    pool = sorted(kegg.genes | go_subset.genes)
    lists = {f"q{i}": rng.sample(pool, rng.randint(15, 40)) for i in range(6)}
    reference = _best_of_full_table(gseapy_enrich_many(lists, [kegg, go_subset]), [kegg, go_subset])
    best = enrich_best(lists, [kegg, go_subset], chunk_size=4)
    assert best[["query", "Gene_set", "Term", "Overlap"]].equals(reference[["query", "Gene_set", "Term", "Overlap"]])
    np.testing.assert_allclose(best["Adjusted P-value"].astype(float), reference["Adjusted P-value"].astype(float),
                               rtol=RTOL)
    assert [set(g.split(";")) for g in best["Genes"]] == [set(g.split(";")) for g in reference["Genes"]]


def test_enrich_best_rejects_a_bad_chunk_size(kegg):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            enrich_best({"q": ["TP53"]}, kegg, chunk_size=bad)
