"""The feature atlas on planted statistics, cells, terms and graphs: its tables equal what they
are built from, the specificity score equals sklearn's AUROC, and searches find what was planted."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from c2srepro.enrichment import GeneSetLibrary
from c2srepro.features import (
    FeatureAtlas,
    LayerFeatureStats,
    feature_anchor,
    feature_atlas,
    feature_card_url,
    load_cell_activations,
    save_cell_activations,
    specificity_auroc,
    table4,
)

LAYER = 2
TYPES = ["B cell", "CD56+ NK", "CD14+ Monocyte"]


def _stats(fire: dict[int, dict[str, int]], occurrences: dict[str, int], n_fire: list[int]) -> LayerFeatureStats:
    genes = sorted(occurrences)
    col = {g: j for j, g in enumerate(genes)}
    triples = [(f, col[g], c) for f, by_gene in fire.items() for g, c in by_gene.items()]
    pf, pg, pc = (np.array(v, dtype=np.int64) for v in zip(*triples))
    examples = pd.DataFrame({
        "feature": [0, 0, 1], "rank": [0, 1, 0], "activation": [3.0, 2.0, 1.5], "prompt": [1, 4, 2],
        "position": [5, 7, 3], "token_id": [11, 12, 13], "token": ["_NK", "G7", "_CD"],
        "gene": pd.Series(["NKG7", "NKG7", None], dtype=object), "context": ["a [[_NK]] G7", "NK [[G7]] b", "[[_CD]]"],
    })
    return LayerFeatureStats.from_counts(
        layer=LAYER, positions="all", n_tokens=10_000, n_fire=np.array(n_fire), act_sum=np.array(n_fire) * 2.0,
        act_max=np.full(len(n_fire), 3.0), genes=genes, gene_occurrences=np.array([occurrences[g] for g in genes]),
        pair_feature=pf, pair_gene=pg, pair_fire_occurrences=pc, pair_fire_tokens=pc, pair_act_sum=pc * 2.0,
        examples=examples, n_prompts=100,
    )


@pytest.fixture(scope="module")
def planted():
    """Feature 0 fires on NK genes (a planted cytotoxicity term) and marks NK cells; feature 1 on
    antigen-presentation genes and B cells; feature 2 on 6 unrelated genes; feature 3 is dead."""
    filler = [f"G{i:03d}" for i in range(120)]
    nk = ["NKG7", "GNLY", "PRF1", "GZMB", "KLRD1", "CTSW"]
    mhc = ["HLA-DRA", "HLA-DRB1", "CD74", "HLA-DPA1", "HLA-DQA1", "HLA-DPB1"]
    sets = {f"T{j:02d}": filler[10 * j: 10 * j + 10] for j in range(12)}
    sets["Natural killer cell mediated cytotoxicity"] = nk + filler[:4]
    sets["Antigen processing and presentation"] = mhc + filler[4:8]
    kegg = GeneSetLibrary(name="TOY_KEGG", sets=sets, source="test", version="t", sha256="")
    go = GeneSetLibrary(name="TOY_GO", sets={"cell killing (GO:0001906)": nk[:4] + filler[50:56],
                                               "other (GO:1)": filler[60:70]}, source="test", version="t", sha256="")
    fire = {0: {g: 9 - i for i, g in enumerate(nk)}, 1: {g: 8 for g in mhc},
            2: {filler[10 * j + 1]: 8 for j in range(6)}}
    stats = _stats(fire, {g: 10 for g in filler + nk + mhc}, [60, 300, 200, 0])

    rng = np.random.default_rng(0)
    labels = np.repeat(TYPES, [12, 10, 14])
    x = rng.exponential(1.0, size=(len(labels), 4)).round(1)  # rounding plants ties
    x[rng.random(x.shape) < 0.3] = 0.0  # and zeros, as ReLU activations have
    x[labels == "CD56+ NK", 0] += 3.0
    x[labels == "B cell", 1] += 2.0
    x[:, 3] = 0.0
    cells = ad.AnnData(X=x.astype(np.float32), obs=pd.DataFrame({"cell_type": pd.Categorical(labels)},
                                                                 index=[f"cell{i}" for i in range(len(labels))]))

    influence = np.zeros((3, 3))
    influence[:, 0] = [0.5, 0.2, 0.0]  # feature 0 in two graphs
    influence[1, 2] = 0.1  # feature 2 in one
    influence[2, 1] = 0.05  # "L7/1": a layer the atlas does not hold
    graphs = ad.AnnData(X=influence.copy(), obs=pd.DataFrame({"cell_type": ["CD56+ NK", "CD56+ NK", "B cell"]},
                                                             index=["g0", "g1", "g2"]),
                        var=pd.DataFrame(index=[f"L{LAYER}/0", f"L7/1", f"L{LAYER}/2"]))
    graphs.layers["influence"] = influence
    graphs.layers["in_pruned"] = (influence > 0.3).astype(float)

    t4 = table4({LAYER: stats}, [kegg, go], min_occurrences=5, nulls=(), progress=False).features
    atlas = feature_atlas({LAYER: stats}, table4_features=t4, cells={LAYER: cells}, graphs=graphs,
                          libraries=[kegg, go], n_genes=4, n_cells=3)
    return stats, cells, t4, atlas


def test_atlas_equals_the_results_it_is_built_from(planted):
    stats, _, t4, atlas = planted
    assert atlas.features.index.tolist() == ["L02-F0000", "L02-F0001", "L02-F0002"]  # dead feature 3 left out
    for f in (0, 1, 2):
        row = atlas.features.loc[feature_anchor(LAYER, f)]
        assert row["freq"] == stats.features.at[f, "freq"]
        assert row["top_genes"].split() == stats.ranked_genes([f], top_n=4)[f]
        expected = t4.set_index("feature").loc[f]
        assert (row["status"], row["top_term"], row["library"]) == (expected["status"], expected["top_term"],
                                                                    expected["library"])
        assert row["top_fdr"] == pytest.approx(expected["top_fdr"])
        terms = atlas.terms[atlas.terms["feature"] == f]
        if expected["status"] == "interpretable":
            # Table 4's top term is the best of the atlas's per-library terms
            best = terms.sort_values("fdr", kind="stable").iloc[0]
            assert best["fdr"] == pytest.approx(expected["top_fdr"])
            assert expected["top_term"] in set(terms["term"])
        assert (terms["fdr"] < 0.05).all()
        table = stats.gene_table(f).head(4)
        rows = atlas.genes[atlas.genes["feature"] == f]
        assert rows["gene"].tolist() == table["gene"].tolist()
        for column in ("frequency", "firing_occurrences", "occurrences", "mean_act"):
            np.testing.assert_allclose(rows[column].to_numpy(dtype=float), table[column].to_numpy(dtype=float))
    first = atlas.features.loc["L02-F0000"]
    assert first["top_genes"].split() == ["NKG7", "GNLY", "PRF1", "GZMB"]
    assert first["table3"] == "Yes" and first["activating_tokens"] == "_NK token in NKG7"
    assert set(atlas.terms.loc[atlas.terms["feature"] == 0, "library"]) == {"TOY_KEGG", "TOY_GO"}
    assert atlas.features.loc["L02-F0002", "status"] == "not significant"
    assert atlas.features.loc["L02-F0002", "n_terms"] == 0


def test_specificity_is_sklearns_auroc(planted):
    _, cells, _, atlas = planted
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    x = np.asarray(cells.X, dtype=np.float64)
    for f in (0, 1, 2):
        for kind in TYPES:
            row = atlas.types[(atlas.types["feature"] == f) & (atlas.types["cell_type"] == kind)].iloc[0]
            assert row["auroc"] == pytest.approx(roc_auc_score(labels == kind, x[:, f]), abs=1e-12)
            assert row["mean_activation"] == pytest.approx(x[labels == kind, f].mean())
            assert row["n_cells"] == (labels == kind).sum()
    assert atlas.features.loc["L02-F0000", "top_type"] == "CD56+ NK"
    assert atlas.features.loc["L02-F0001", "top_type"] == "B cell"
    top = atlas.cells[atlas.cells["feature"] == 0]
    assert top["activation"].tolist() == sorted(x[:, 0], reverse=True)[:3]
    assert top["cell_id"].tolist() == [cells.obs_names[i] for i in np.argsort(-x[:, 0], kind="stable")[:3]]
    with pytest.raises(ValueError, match="needs cells of the type and others"):
        specificity_auroc(x, np.ones(len(x), dtype=bool))


def test_graph_appearances(planted):
    *_, atlas = planted
    row = atlas.features.loc["L02-F0000"]
    assert (row["n_graphs"], row["n_pruned"], row["max_influence"]) == (2, 1, 0.5)
    assert atlas.features.loc["L02-F0001", "n_graphs"] == 0  # only layer 7's feature 1 was in a graph
    assert atlas.graphs[atlas.graphs["feature"] == 2]["cell_id"].tolist() == ["g1"]


def test_searches_find_what_was_planted(planted):
    *_, atlas = planted
    by_gene = atlas.search(gene="gnly")
    assert by_gene["anchor"].tolist() == ["L02-F0000"] and by_gene["gene_rank"].tolist() == [2]
    by_term = atlas.search(term="ANTIGEN")
    assert by_term["feature"].tolist() == [1]
    assert by_term["matched_term"].tolist() == ["Antigen processing and presentation"]
    nk = atlas.for_type("cd56+ nk")
    assert nk["feature"].iloc[0] == 0 and nk["auroc"].is_monotonic_decreasing
    assert len(nk) == 3
    assert atlas.search(gene="NKG7", layer=5).empty


@pytest.mark.parametrize("query, near", [
    ({"gene": "NKG8"}, "NKG7"), ({"term": "antigne"}, "antigen"), ({"cell_type": "NK cel"}, "CD56+ NK"),
])
def test_unknown_queries_give_an_empty_table_naming_near_matches(planted, query, near, caplog):
    *_, atlas = planted
    result = atlas.for_type(query["cell_type"]) if "cell_type" in query else atlas.search(**query)
    assert result.empty and "anchor" in result.columns
    # The columns a hit carries, so a notebook that selects them runs on any profile.
    assert {"gene": "gene_rank", "term": "matched_term", "cell_type": "auroc"}[next(iter(query))] in result.columns
    assert near in result.attrs["message"] and "no feature of the atlas" in result.attrs["message"]
    assert near in caplog.text


def test_round_trip_anchor_and_card(planted, tmp_path):
    *_, atlas = planted
    again = FeatureAtlas.load(atlas.save(tmp_path / "atlas"))
    for name in ("features", "genes", "cells", "types", "terms", "graphs", "examples"):
        pd.testing.assert_frame_equal(getattr(again, name), getattr(atlas, name), check_dtype=False,
                                      check_index_type=False)
    assert again.settings == atlas.settings
    card = atlas.card(LAYER, 0)
    assert card["summary"]["anchor"] == "L02-F0000" and len(card["examples"]) == 2
    assert card["genes"]["gene"].tolist() == ["NKG7", "GNLY", "PRF1", "GZMB"]
    assert feature_anchor(3, 123) == "L03-F0123" and feature_anchor(12, 6027) == "L12-F6027"
    assert feature_card_url(3, 123) == "A2-feature-atlas.html#L03-F0123"
    with pytest.raises(ValueError, match="L2/F3 is not in the atlas"):
        atlas.card(LAYER, 3)


def test_cell_activations_round_trip(planted, tmp_path):
    _, cells, _, _ = planted
    loaded = load_cell_activations(save_cell_activations({LAYER: cells}, tmp_path / "cells"))
    np.testing.assert_array_equal(loaded[LAYER].X, cells.X)
    assert loaded[LAYER].obs["cell_type"].tolist() == cells.obs["cell_type"].tolist()
    with pytest.raises(FileNotFoundError, match="no cell activations"):
        load_cell_activations(tmp_path)


def test_bad_inputs_name_the_fix(planted):
    stats, cells, t4, _ = planted
    with pytest.raises(ValueError, match="has no column 'type'"):
        feature_atlas({LAYER: stats}, cells={LAYER: cells}, groupby="type")
    with pytest.raises(ValueError, match="cells has no AnnData for layer 2"):
        feature_atlas({LAYER: stats}, cells={0: cells})
    with pytest.raises(ValueError, match="lacks columns \\['genes'"):
        feature_atlas({LAYER: stats}, table4_features=t4.drop(columns="genes"), libraries=["KEGG_2021_Human"])
    with pytest.raises(ValueError, match="without libraries"):
        feature_atlas({LAYER: stats}, table4_features=t4)
    with pytest.raises(ValueError, match="one of gene= or term="):
        feature_atlas({LAYER: stats}).search()
    bare = feature_atlas({LAYER: stats})  # nothing but chapter 4's statistics: the columns stay empty
    assert bare.features["top_type"].eq("").all() and bare.terms.empty and bare.features["n_graphs"].eq(0).all()


def test_book_page_links_rows_to_cards_offline(planted):
    from c2srepro.book.atlas import atlas_table, feature_card, feature_cards, show_table

    *_, atlas = planted
    table = atlas_table(atlas)
    assert table["feature"].iloc[0] == '<a href="#L02-F0000">L2/F0</a>'
    assert table.loc[0, "specific to"].startswith("CD56+ NK")  # the hidden column a type search reads
    card = feature_card(atlas, LAYER, 0)
    assert card.startswith('<div id="L02-F0000"') and card.count("<mark") == 2  # one per top example
    assert "Natural killer cell mediated cytotoxicity" in card and 'href="06-circuit.html"' in card
    assert feature_cards(atlas).data.count('class="c2s-atlas-card"') == len(atlas.features)
    page = show_table(table).data
    assert 'id="atlas-table"' in page and "<script src=" not in page  # DataTables comes with the page


def test_cards_are_chosen_and_only_they_are_linked(planted):
    from c2srepro.book.atlas import atlas_table, card_features

    *_, atlas = planted
    cards = card_features(atlas, per_type=1, per_layer=0)
    assert (LAYER, 0) in cards and (LAYER, 1) in cards  # the NK and the B cell feature
    table = atlas_table(atlas, cards)
    linked = table["feature"].str.startswith("<a ").to_numpy()
    assert linked.sum() == len(cards)
    assert table.loc[0, "terms"] != "" and table.loc[0, "top term"] not in table.loc[0, "terms"]


def test_a_graphs_features_link_to_the_cards_the_atlas_holds():
    from _tiny_neox import GENES, TOKENS, sentence_replacement

    from c2srepro.attribution import LogitTarget, build_graph
    from c2srepro.book.atlas import card_links, graph_features
    from c2srepro.book.display import table

    rep = sentence_replacement()
    graph = build_graph(rep, LogitTarget(int(rep.input_ids[-1]), rep.n_pos - 2), tokens=TOKENS, genes=GENES)
    pruned = graph.prune(node_threshold=0.9, edge_threshold=0.99)
    kept = pruned.nodes[pruned.nodes["kind"] == "feature"]
    pairs = sorted(set(zip(kept["layer"].astype(int), kept["feature"].astype(int))))
    live = {pairs[0][0]: {pairs[0][1]}}  # the atlas holds one of them only
    frame = graph_features(graph, pruned, live, top_genes={pairs[0]: "VWF, PTPRB"})
    assert sorted(zip(frame["layer"], frame["feature"])) == pairs
    assert frame["influence"].is_monotonic_decreasing
    influence = dict(zip(graph.nodes["node_id"], graph.node_influence().tolist()))
    first = frame.iloc[0]
    ids = kept.loc[(kept["layer"] == first["layer"]) & (kept["feature"] == first["feature"]), "node_id"]
    assert first["influence"] == pytest.approx(sum(influence[i] for i in ids))
    row = frame.set_index(["layer", "feature"]).loc[pairs[0]]
    assert row["card"] == (f'<a href="A2-feature-atlas.html#{feature_anchor(*pairs[0])}">'
                           f"L{pairs[0][0]}/F{pairs[0][1]}</a>")
    assert row["top genes"] == "VWF, PTPRB"
    assert card_links(pruned, live) == {pairs[0]: f"A2-feature-atlas.html#{feature_anchor(*pairs[0])}"}
    assert card_links(pruned, {}) == {}
    assert not any(c.startswith("<a ") for c in frame.set_index(["layer", "feature"]).drop(index=pairs[0])["card"])
    html_table = table(frame, html_columns=["card"]).to_html()
    assert row["card"] in html_table  # the link stays a link
    escaped = table(frame).to_html()
    assert row["card"] not in escaped and "&lt;a href" in escaped  # elsewhere HTML is escaped
    with pytest.raises(ValueError, match=r"html_columns \['link'\] are not columns"):
        table(frame, html_columns=["link"])


def test_labels_name_genes_type_and_term_for_another_viewer(planted):
    *_, atlas = planted
    labels = atlas.labels(n_genes=2, min_auroc=0.7)
    assert set(labels) == set(zip(atlas.features["layer"], atlas.features["feature"]))
    for row in atlas.features.itertuples(index=False):
        text = labels[(row.layer, row.feature)]
        genes = row.top_genes.split()[:2] if isinstance(row.top_genes, str) else []
        assert (f"top genes {', '.join(genes)}" in text) == bool(genes)
        assert (f"type {row.top_type} (AUROC" in text) == (isinstance(row.top_type, str) and row.top_auroc >= 0.7)
        assert (f"term {row.top_term}" in text) == (isinstance(row.top_term, str) and bool(row.top_term))
    assert any("type " in t for t in labels.values())  # the planted NK and B cell features
    with pytest.raises(ValueError, match="n_genes must be >= 1"):
        atlas.labels(n_genes=0)


def test_chapter4_keeps_a_seeded_sample_of_the_heldout_cells(monkeypatch):
    import types

    import c2srepro.book.sources
    import c2srepro.data.datasets
    import c2srepro.features
    from c2srepro.book.atlas import heldout_activations

    heldout = [types.SimpleNamespace(cell_index=10 + i, label=f"type{i % 3}") for i in range(9)]
    stage = types.SimpleNamespace(
        split_parameters={"dataset": "d", "top_k": 4, "seed": 0, "use_raw": False, "symbol_column": None},
        split=types.SimpleNamespace(cells=lambda which: heldout), model=None, tokenizer=None,
    )
    asked = []

    def activations(adata, model, tokenizer, transcoders, *, cells, **options):
        asked.append(list(cells))
        return {layer: ad.AnnData(np.zeros((len(cells), 2), dtype=np.float32)) for layer in transcoders}

    monkeypatch.setattr(c2srepro.features, "feature_activations_by_layer", activations)
    monkeypatch.setattr(c2srepro.book.sources, "resolve_dataset", lambda name: name)
    monkeypatch.setattr(c2srepro.data.datasets, "load_dataset", lambda name: None)
    everything = heldout_activations(stage, {0: None, 1: None}, {}, positions="all")
    assert asked[-1] == list(range(10, 19)) and sorted(everything) == [0, 1]
    sample = heldout_activations(stage, {0: None}, {}, positions="all", max_cells=4, seed=3)
    kept = asked[-1]
    assert len(kept) == 4 and kept == sorted(kept) and set(kept) <= set(range(10, 19))
    assert list(sample[0].obs["cell_type"]) == [f"type{(c - 10) % 3}" for c in kept]  # labels follow the sample
    assert heldout_activations(stage, {0: None}, {}, positions="all", max_cells=4, seed=3) and asked[-1] == kept
    heldout_activations(stage, {0: None}, {}, positions="all", max_cells=4, seed=4)
    assert asked[-1] != kept, "another seed, another sample"
    heldout_activations(stage, {0: None}, {}, positions="all", max_cells=50)
    assert asked[-1] == list(range(10, 19))
    with pytest.raises(ValueError, match="max_cells must be >= 1 or None, got 0"):
        heldout_activations(stage, {0: None}, {}, positions="all", max_cells=0)
