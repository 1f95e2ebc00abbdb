import anndata as ad
import numpy as np
import pandas as pd
import pytest
from _tiny_neox import GENES, TOKENS, sentence_replacement
from scipy.stats import false_discovery_control, kstest

from c2srepro.attribution import build_graph, gene_view
from c2srepro.biology.cohort import (
    break_ties,
    CellInfluence,
    aggregate,
    cell_influence,
    cohort_anndata,
    compare_rankings,
    permutation_null,
    prerank,
    prerank_types,
    shuffled_cohort,
    top_by_type,
)
from c2srepro.enrichment.libraries import GeneSetLibrary


@pytest.fixture(scope="module")
def graphs():
    rep = sentence_replacement()
    return [build_graph(rep, rep.logit_node(rep.n_pos - 1, token), genes=GENES, tokens=TOKENS) for token in (3, 5, 9)]


def test_cohort_is_the_per_cell_graphs_summed(graphs):
    cells = [cell_influence(g, cell_id=f"c{i}", label="x" if i < 2 else "y") for i, g in enumerate(graphs)]
    cohort = cohort_anndata(cells)
    assert list(cohort.obs["type"]) == ["x", "x", "y"] and list(cohort.var_names) == ["VWF", "PTPRB", "KHDRBS1"]
    summed = sum(gene_view(g).genes.set_index("gene")["influence"] for g in graphs)
    np.testing.assert_allclose(cohort.X.sum(axis=0), summed[cohort.var_names].to_numpy())
    np.testing.assert_array_equal(cohort.layers["influence"], cohort.X)
    features = cohort_anndata(cells, kind="features")
    total = sum(float(g.node_influence()[g.indices("feature")].sum()) for g in graphs)
    assert features.X.sum() == pytest.approx(total)
    assert all(name.startswith("L") and "/" in name for name in features.var_names)
    table = aggregate(cohort)
    x = table[(table["type"] == "x") & (table["gene"] == "VWF")].iloc[0]
    assert x["mean_influence"] == pytest.approx(cohort.X[:2, 0].mean())
    assert 0 <= table["fraction_in_pruned"].min() and table["fraction_in_pruned"].max() <= 1


def test_pruned_membership_follows_kept_edges(graphs):
    loose = cell_influence(graphs[0], cell_id="a", label="x", node_threshold=1.0, edge_threshold=1.0)
    tight = cell_influence(graphs[0], cell_id="a", label="x", node_threshold=0.05, edge_threshold=0.05)
    assert loose.genes["in_pruned"].all()
    assert tight.genes["in_pruned"].sum() <= loose.genes["in_pruned"].sum()
    assert tight.features["in_pruned"].sum() < loose.features["in_pruned"].sum()


def _cohort(values, labels, in_sentence=None):
    in_sentence = np.ones(np.shape(values)) if in_sentence is None else np.asarray(in_sentence, float)
    return ad.AnnData(X=np.asarray(values, float), obs=pd.DataFrame({"type": pd.Categorical(labels)},
                      index=[f"c{i}" for i in range(len(labels))]),
                      layers={"influence": np.asarray(values, float), "in_sentence": in_sentence},
                      var=pd.DataFrame(index=pd.Index([f"G{j}" for j in range(np.shape(values)[1])], name="gene")))


def _brute_force(values, labels, n_permutations, seed):
    rng = np.random.default_rng(seed)
    types = sorted(set(labels))

    def contrast(lab):
        frame = pd.DataFrame(values)
        return np.array([frame[lab == t].mean().to_numpy() - frame[lab != t].mean().to_numpy() for t in types])

    observed = contrast(labels)
    count = np.zeros_like(observed)
    for _ in range(n_permutations):
        count += contrast(labels[rng.permutation(len(labels))]) >= observed
    return observed, (1 + count) / (1 + n_permutations)


def test_permutation_null_matches_a_brute_force_reference():
    rng = np.random.default_rng(3)
    values = rng.gamma(1.0, size=(12, 5))
    labels = np.array(list("aaaabbbbcccc"))
    values[labels == "a", 0] += 3.0  # G0 drives type a
    null = permutation_null(_cohort(values, labels), n_permutations=200, seed=7)
    observed, p = _brute_force(values, labels, 200, 7)
    np.testing.assert_allclose(null["contrast"].to_numpy(), observed.ravel())
    np.testing.assert_allclose(null["p_value"].to_numpy(), p.ravel())
    np.testing.assert_allclose(null["fdr"].to_numpy(), np.concatenate([false_discovery_control(r) for r in p]))
    assert null.loc[(null["type"] == "a") & (null["gene"] == "G0"), "p_value"].item() < 0.01
    assert top_by_type(null, n=1).loc[0, "gene"] == "G0"
    again = permutation_null(_cohort(values, labels), n_permutations=200, seed=7)
    pd.testing.assert_frame_equal(again, null)


def test_permutation_p_values_are_uniform_without_signal():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(40, 300))
    labels = np.array(["a", "b"] * 20)
    null = permutation_null(_cohort(values, labels), n_permutations=199, seed=1)
    p = null.loc[null["type"] == "a", "p_value"].to_numpy()
    assert kstest(p, "uniform").pvalue > 0.01
    planted = values.copy()
    planted[labels == "a"] += 1.0
    p_planted = permutation_null(_cohort(planted, labels), n_permutations=199, seed=1)
    assert kstest(p_planted.loc[p_planted["type"] == "a", "p_value"], "uniform").pvalue < 1e-6


def test_cohort_errors():
    values = np.ones((3, 2))
    with pytest.raises(ValueError, match="at least two cell types"):
        permutation_null(_cohort(values, ["a", "a", "a"]))
    with pytest.raises(ValueError, match="'cluster' is not in the cohort's obs"):
        permutation_null(_cohort(values, ["a", "b", "a"]), groupby="cluster")
    with pytest.raises(ValueError, match="n_permutations must be >= 1"):
        permutation_null(_cohort(values, ["a", "b", "a"]), n_permutations=0)
    with pytest.raises(ValueError, match="no cells"):
        cohort_anndata([])
    with pytest.raises(ValueError, match="kind must be 'genes' or 'features'"):
        cohort_anndata([CellInfluence("a", "x", pd.DataFrame(), pd.DataFrame())], kind="tokens")
    cell = CellInfluence("a", "x", pd.DataFrame({"influence": [1.0], "in_pruned": [True]}, index=["G"]), pd.DataFrame())
    with pytest.raises(ValueError, match="cell ids must be unique"):
        cohort_anndata([cell, cell])


def test_compare_rankings_runs_scanpy_on_influence_and_expression():
    rng = np.random.default_rng(0)
    labels = np.array(list("aaaaabbbbb"))
    influence = rng.gamma(1.0, size=(10, 30))
    influence[labels == "a", :3] += 5
    cohort = _cohort(influence, labels)
    expression = _cohort(influence[:, ::-1].copy(), labels)
    expression.var_names = cohort.var_names  # gene j's expression is gene (29 - j)'s influence
    table = compare_rankings(cohort, expression, n=3)
    assert list(table["type"]) == ["a", "b"]
    assert table.loc[0, "overlap_top3"] == 0
    assert set(table.loc[0, "top_influence"].split(", ")) == {"G0", "G1", "G2"}
    assert compare_rankings(cohort, cohort.copy(), n=3)["overlap_top3"].tolist() == [3, 3]


LIBRARY = GeneSetLibrary(name="toy", source="test", version="0", sha256="0", sets={
    "type a": [f"G{j}" for j in range(6)],
    "type b": [f"G{j}" for j in range(20, 26)],
    "other": [f"G{j}" for j in range(10, 16)],
})


def test_prerank_is_gseapys_prerank():
    import gseapy

    rng = np.random.default_rng(1)
    ranking = pd.Series(rng.normal(size=30), index=[f"G{j}" for j in range(30)])
    ranking.iloc[:6] += 3
    ours = prerank(ranking, LIBRARY, permutation_num=100, seed=3)
    direct = gseapy.prerank(rnk=ranking, gene_sets=LIBRARY.to_dict(), permutation_num=100, seed=3, min_size=5,
                            max_size=500, threads=1, outdir=None, no_plot=True).res2d
    direct = direct.set_index("Term")
    for _, row in ours.iterrows():
        assert row["NES"] == pytest.approx(float(direct.loc[row["Term"], "NES"]))
        assert row["FDR q-val"] == pytest.approx(float(direct.loc[row["Term"], "FDR q-val"]))
    assert ours.loc[0, "Term"] == "type a" and list(ours["NES"]) == sorted(ours["NES"], reverse=True)
    with pytest.raises(ValueError, match="no gene of the ranking is in library 'toy'"):
        prerank(pd.Series([1.0, 2.0], index=["x", "y"]), LIBRARY)
    with pytest.raises(TypeError, match="GeneSetLibrary"):
        prerank(ranking, LIBRARY.to_dict())


def test_prerank_types_finds_the_own_term_and_the_shuffle_control_loses_it():
    rng = np.random.default_rng(2)
    labels = np.array(["a"] * 10 + ["b"] * 10)
    values = rng.gamma(1.0, size=(20, 30))
    values[labels == "a", :6] += 4
    values[labels == "b", 20:26] += 4
    cohort = _cohort(values, labels)
    own = {"a": ["type a"], "b": ["type b"]}
    table = prerank_types(cohort, LIBRARY, own, permutation_num=200, seed=0)
    assert table["own_first"].all() and (table["own_fdr"] < 0.05).all()
    assert list(table["top_term"]) == ["type a", "type b"]
    shuffled = shuffled_cohort(cohort, seed=0)
    assert sorted(shuffled.obs["type"]) == sorted(labels) and list(shuffled.obs["type"]) != list(labels)
    control = prerank_types(shuffled, LIBRARY, own, permutation_num=200, seed=0)
    assert not (control["own_first"] & (control["own_fdr"] < 0.05)).all()
    with pytest.raises(ValueError, match="types \\['c'\\] have no cells"):
        prerank_types(cohort, LIBRARY, own, types=["c"])


def test_break_ties_orders_ties_by_the_stated_rule_and_keeps_every_other_order():
    values = pd.Series([0.0, 2.0, 0.0, 0.0, 1.0, 2.0], index=["D", "B", "A", "C", "E", "F"])
    tiebreak = pd.Series([0.1, 0.0, 0.1, 0.5, 0.0, 1.0], index=values.index)
    split = break_ties(values, tiebreak)
    assert split.is_unique
    # F before B (tiebreak), C before A and D (tiebreak), A before D (name), and no value crosses a gap
    assert list(split.sort_values(ascending=False).index) == ["F", "B", "E", "C", "A", "D"]
    assert (split - values).abs().max() < 1 / 3
    assert break_ties(pd.Series([1.0, 3.0], index=["x", "y"]), pd.Series([0.0, 0.0], index=["x", "y"])).tolist() == [1.0, 3.0]


def test_prerank_types_ranks_the_types_own_genes_without_ties(monkeypatch):
    """Genes absent from every sentence of the type are left out, and gseapy meets no tied value (its
    "order of those genes will be arbitrary" case)."""
    import c2srepro.biology.cohort as cohort_module

    rng = np.random.default_rng(4)
    labels = np.array(["a"] * 6 + ["b"] * 6)
    values = np.zeros((12, 30))
    values[:, :12] = rng.gamma(1.0, size=(12, 12)) * (rng.random((12, 12)) < 0.5)  # many exact zeros: ties
    in_sentence = np.ones((12, 30))
    in_sentence[labels == "a", 24:] = 0  # G24..G29 are in no sentence of type a
    cohort = _cohort(values, labels, in_sentence)
    seen = {}
    real_prerank = cohort_module.prerank

    def spy(ranking, library, **options):
        seen[len(seen)] = ranking
        return real_prerank(ranking, library, **options)

    monkeypatch.setattr(cohort_module, "prerank", spy)
    prerank_types(cohort, LIBRARY, {"a": ["type a"], "b": ["type b"]}, permutation_num=20, seed=0)
    assert (values[labels == "a"][:, :24] == 0).all(axis=0).any()  # the input does hold ties
    assert set(seen[0].index) == {f"G{j}" for j in range(24)} and seen[0].is_unique
    assert set(seen[1].index) == {f"G{j}" for j in range(30)} and seen[1].is_unique
    with pytest.raises(ValueError, match="in_sentence"):
        prerank_types(ad.AnnData(X=values, obs=cohort.obs, layers={"influence": values}), LIBRARY, {})
