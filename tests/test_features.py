"""Feature statistics against a brute-force count over the model's own forward pass; Table 3 rule,
Table 4 with planted gene sets and the null control, and against the full enrichment table; save/load; figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from c2srepro.enrichment import GeneSetLibrary
from c2srepro.features import (
    InterpretRule,
    LayerFeatureStats,
    activating_tokens,
    collect_feature_stats,
    enrich_layer,
    interpret_features,
    load_feature_stats,
    null_gene_lists,
    plot_feature_frequency,
    plot_interpretable_fraction,
    read_human_labels,
    sample_live_features,
    save_feature_stats,
    symbol_family,
    table3,
    table4,
    write_feature_tables,
)
from c2srepro.data.prompts import EncodedPrompts
from c2srepro.transcoder import Transcoder, TranscoderConfig

VOCAB = 80
GENES = ["FOXO1", "FOXO3", "PSD3", "PTPN11", "PTPN12", "VWF", "ZBTB20", "MT-ND4"]
TOP_K = 5


# --------------------------------------------------------------------------- fixtures


def _prompts() -> EncodedPrompts:
    """Prompts of template tokens, 3-6 genes (1-3 tokens each, fixed ids per gene) and a 2-token answer."""
    rng = np.random.default_rng(4)
    pieces = {g: rng.integers(10, VOCAB, size=1 + i % 3).tolist() for i, g in enumerate(GENES)}
    encoded = EncodedPrompts()
    for cell in range(8):
        head = rng.integers(0, 10, size=3).tolist()
        ids, genes = list(head), [None] * 3
        for gene in rng.choice(GENES, size=3 + cell % 4, replace=False).tolist():
            ids += pieces[gene]
            genes += [gene] * len(pieces[gene])
        ids += [1, 2]
        genes += [None, None]
        answer_start = len(ids)
        ids += rng.integers(0, 10, size=2).tolist()
        genes += [None, None]
        encoded.input_ids.append(ids)
        encoded.answer_start.append(answer_start)
        encoded.cell_index.append(cell)
        encoded.gene_of_token.append(genes)
        encoded.labels.append("cell")
        encoded.texts.append("")
    return encoded


def _mlp_inputs(model, ids: list[int]) -> dict[int, torch.Tensor]:
    """MLP inputs of one prompt run alone, read by a plain PyTorch pre-hook on the MLP module (not the hooked model)."""
    record, handles = {}, []
    for layer, block in enumerate(model.gpt_neox.layers):
        hook = lambda module, args, layer=layer: record.__setitem__(layer, args[0][0])  # noqa: E731
        handles.append(block.mlp.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for handle in handles:
        handle.remove()
    return record


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=256,
    )
    model = GPTNeoXForCausalLM(config).eval().double()
    prompts = _prompts()
    transcoders = []
    gen = torch.Generator().manual_seed(7)
    for layer in range(2):
        tc = Transcoder(TranscoderConfig(d_model=64, d_transcoder=128, layer=layer), seed=layer).double()
        x = torch.cat([_mlp_inputs(model, ids)[layer] for ids in prompts.input_ids])
        pre = x @ tc.W_enc  # [tokens, d_tc]
        # Per-feature threshold halfway between two sorted pre-activations (no activation lands
        # near 0, so float noise cannot flip a count): firing rates ~0-40%, features 0-3 dead.
        ordered = pre.sort(dim=0).values  # [tokens, d_tc]
        # Identical contexts give identical pre-activations: step to a gap between distinct values.
        gaps = (ordered[1:] - ordered[:-1]) > 1e-6  # [tokens - 1, d_tc]
        k = (len(pre) * (0.6 + 0.4 * torch.rand(tc.cfg.d_tc, generator=gen))).long().clamp(max=len(pre) - 2)
        k = torch.tensor([int(gaps[: k[f] + 1, f].nonzero().max()) for f in range(tc.cfg.d_tc)])
        cols = torch.arange(tc.cfg.d_tc)
        bias = -(ordered[k, cols] + ordered[k + 1, cols]) / 2
        bias[:4] = -ordered[-1, :4] - 1.0
        with torch.no_grad():
            tc.b_enc.copy_(bias)
        transcoders.append(tc)
    z = {
        layer: [transcoders[layer].encode(_mlp_inputs(model, ids)[layer]).detach().numpy() for ids in prompts.input_ids]
        for layer in range(2)
    }
    return model, transcoders, prompts, z


@pytest.fixture(scope="module")
def collected(setup):
    model, transcoders, prompts, _ = setup
    return collect_feature_stats(model, transcoders, prompts, batch_size=3, top_k=TOP_K, context=2, progress=False)


def _counted(prompts: EncodedPrompts, i: int, positions: str) -> np.ndarray:
    n = len(prompts.input_ids[i])
    if positions == "all":
        return np.ones(n, dtype=bool)
    if positions == "prompt":
        return np.arange(n) < prompts.answer_start[i]
    return np.array([g is not None for g in prompts.gene_of_token[i]])


# --------------------------------------------------------------------------- statistics vs brute force


@pytest.mark.parametrize("positions", ["all", "genes", "prompt"])
def test_feature_frequencies_match_brute_force(setup, positions):
    model, transcoders, prompts, z = setup
    stats = collect_feature_stats(model, transcoders, prompts, positions=positions, batch_size=3, progress=False)
    for layer in range(2):
        rows = np.concatenate([z[layer][i][_counted(prompts, i, positions)] for i in range(len(prompts))])
        table = stats[layer].features
        assert stats[layer].n_tokens == len(rows)
        np.testing.assert_array_equal(table["n_fire"], (rows > 0).sum(axis=0))
        np.testing.assert_allclose(table["freq"], (rows > 0).mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(table["mean_act"], rows.mean(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(table["max_act"], rows.max(axis=0), rtol=1e-12)
        firing = (rows > 0).sum(axis=0) > 0
        expected = rows.sum(axis=0)[firing] / (rows > 0).sum(axis=0)[firing]
        np.testing.assert_allclose(table["mean_act_firing"].to_numpy()[firing], expected, rtol=1e-9)
        assert table["mean_act_firing"].to_numpy()[~firing].tolist() == [] or np.isnan(
            table["mean_act_firing"].to_numpy()[~firing]
        ).all()
        assert (table["log10_freq"].to_numpy()[:4] == -np.inf).all() and not table["live"].to_numpy()[:4].any()
    expected_tokens = {
        "all": prompts.n_tokens,
        "prompt": sum(prompts.answer_start),
        "genes": sum(g is not None for genes in prompts.gene_of_token for g in genes),
    }
    assert stats[0].n_tokens == expected_tokens[positions]


def test_gene_counts_match_brute_force(setup, collected):
    _, _, prompts, z = setup
    for layer in range(2):
        stats = collected[layer]
        gene_col = {g: j for j, g in enumerate(stats.genes)}
        occurrences = np.zeros(len(stats.genes), dtype=int)
        fire_occ = np.zeros((stats.d_tc, len(stats.genes)), dtype=int)
        fire_tok = np.zeros_like(fire_occ)
        act = np.zeros(fire_occ.shape)
        for i, genes in enumerate(prompts.gene_of_token):
            t = 0
            while t < len(genes):  # walk the runs of tokens of one gene: one occurrence each
                if genes[t] is None:
                    t += 1
                    continue
                end = t
                while end < len(genes) and genes[end] == genes[t]:
                    end += 1
                j = gene_col[genes[t]]
                block = z[layer][i][t:end]  # [tokens of the occurrence, d_tc]
                occurrences[j] += 1
                fire_occ[:, j] += (block > 0).any(axis=0)
                fire_tok[:, j] += (block > 0).sum(axis=0)
                act[:, j] += np.where(block > 0, block, 0).sum(axis=0)
                t = end
        assert stats.genes == sorted(GENES)
        np.testing.assert_array_equal(stats.gene_occurrences, occurrences)
        np.testing.assert_array_equal(stats.gene_fire_occurrences.toarray(), fire_occ)
        np.testing.assert_array_equal(stats.gene_fire_tokens.toarray(), fire_tok)
        np.testing.assert_allclose(stats.gene_act_sum.toarray(), act, rtol=1e-9, atol=1e-12)
        assert fire_occ.sum() > 50, "the fixture should make features fire on genes"
        np.testing.assert_array_equal(stats.features["n_fire_gene_tokens"], fire_tok.sum(axis=1))
        # Ranking from the brute-force counts: frequency, then firing occurrences, then symbol.
        ranked = stats.ranked_genes(range(stats.d_tc), top_n=None, min_occurrences=2)
        for f in range(stats.d_tc):
            expected = sorted(
                (g for j, g in enumerate(stats.genes) if occurrences[j] >= 2 and fire_occ[f, j] > 0),
                key=lambda g: (-fire_occ[f, gene_col[g]] / occurrences[gene_col[g]], -fire_occ[f, gene_col[g]], g),
            )
            assert ranked[f] == expected == stats.gene_table(f, min_occurrences=2)["gene"].tolist()


def test_top_examples_are_the_largest_activations(setup, collected):
    _, _, prompts, z = setup
    for layer in range(2):
        stats = collected[layer]
        flat = np.concatenate(z[layer])  # [all tokens, d_tc]
        where = [(i, p) for i, ids in enumerate(prompts.input_ids) for p in range(len(ids))]
        for f in range(stats.d_tc):
            ex = stats.top_examples(f)
            expected = np.sort(flat[:, f][flat[:, f] > 0])[::-1][:TOP_K]
            np.testing.assert_allclose(ex["activation"], expected, rtol=1e-12)
            assert ex["rank"].tolist() == list(range(len(ex)))
            for row in ex.itertuples():
                assert (row.prompt, row.position) in where
                assert z[layer][row.prompt][row.position, f] == pytest.approx(row.activation, rel=1e-12)
                assert row.token_id == prompts.input_ids[row.prompt][row.position]
                assert row.gene == prompts.gene_of_token[row.prompt][row.position]
                assert f"[[<{row.token_id}>]]" in row.context
        assert stats.top_examples(0).empty  # a dead feature has no examples


def test_padding_never_counted_batch_sizes_agree(setup, collected):
    model, transcoders, prompts, _ = setup
    # Batch size 1 has no padding at all; 8 pads every prompt but the longest. The last run
    # also takes the sparse (feature, gene) accumulation path instead of the dense one.
    for batch_size, dense_limit in ((1, 1 << 24), (8, 1 << 24), (2, 0)):
        other = collect_feature_stats(
            model, transcoders, prompts, batch_size=batch_size, top_k=TOP_K, context=2,
            dense_pairs_limit=dense_limit, progress=False,
        )
        for layer in range(2):
            a, b = collected[layer], other[layer]
            assert a.n_tokens == b.n_tokens == prompts.n_tokens
            np.testing.assert_array_equal(a.features["n_fire"], b.features["n_fire"])
            np.testing.assert_allclose(a.features["mean_act"], b.features["mean_act"], rtol=1e-10, atol=1e-14)
            for name in ("gene_fire_occurrences", "gene_fire_tokens"):
                np.testing.assert_array_equal(getattr(a, name).toarray(), getattr(b, name).toarray())
            np.testing.assert_allclose(a.gene_act_sum.toarray(), b.gene_act_sum.toarray(), rtol=1e-10)
            np.testing.assert_array_equal(a.gene_occurrences, b.gene_occurrences)
            # Equal activations (identical prefixes in two prompts) may keep either prompt's token.
            same = ["feature", "rank", "token_id", "token", "gene"]
            pd.testing.assert_frame_equal(a.examples[same], b.examples[same])
            np.testing.assert_allclose(a.examples["activation"], b.examples["activation"], rtol=1e-10)


class _PieceTokenizer:
    """Decodes id i to a fixed piece: " G<i>" for even ids (a leading space), "x<i>" for odd ones."""

    def decode(self, ids):
        return "".join(f" G{i}" if i % 2 == 0 else f"x{i}" for i in ids)


def test_one_layer_alone_and_decoded_examples(setup, collected):
    model, transcoders, prompts, _ = setup
    # Only layer 0: the forward pass stops after it, with the same statistics as a full pass.
    alone = collect_feature_stats(
        model, {0: transcoders[0]}, prompts, batch_size=3, top_k=TOP_K, context=2, tokenizer=_PieceTokenizer(),
        progress=False,
    )
    assert list(alone) == [0]
    pd.testing.assert_frame_equal(alone[0].features, collected[0].features)
    ex = alone[0].examples
    assert (ex["token_id"] == collected[0].examples["token_id"]).all()
    for row in ex.head(40).itertuples():
        ids = prompts.input_ids[row.prompt]
        piece = _PieceTokenizer().decode([row.token_id])
        assert row.token == piece.replace(" ", "_")
        left = _PieceTokenizer().decode(ids[max(0, row.position - 2) : row.position])
        right = _PieceTokenizer().decode(ids[row.position + 1 : row.position + 3])
        assert row.context == f"{left}[[{piece}]]{right}"


def test_bad_inputs_are_reported(setup):
    model, transcoders, prompts, _ = setup
    with pytest.raises(ValueError, match="positions must be one of"):
        collect_feature_stats(model, transcoders, prompts, positions="tokens", progress=False)
    broken = prompts.subset([0, 1])
    broken.gene_of_token[1] = broken.gene_of_token[1][:-1]
    with pytest.raises(ValueError, match="gene_of_token entries"):
        collect_feature_stats(model, transcoders, broken, progress=False)
    wrong = Transcoder(TranscoderConfig(d_model=64, d_transcoder=512, layer=5))
    with pytest.raises(ValueError, match="model has layers 0..1"):
        collect_feature_stats(model, [wrong], prompts, progress=False)
    with pytest.raises(ValueError, match="not a single Transcoder"):
        collect_feature_stats(model, transcoders[0], prompts, progress=False)


# --------------------------------------------------------------------------- synthetic statistics


def synthetic_stats(
    fire: dict[int, dict[str, int]],
    occurrences: dict[str, int],
    n_fire: list[int],
    *,
    n_tokens: int = 10_000,
    examples: pd.DataFrame | None = None,
    layer: int = 3,
) -> LayerFeatureStats:
    """Statistics with planted counts: ``fire[f][gene]`` firing occurrences (= firing tokens)."""
    genes = sorted(occurrences)
    col = {g: j for j, g in enumerate(genes)}
    triples = [(f, col[g], c) for f, by_gene in fire.items() for g, c in by_gene.items()]
    pf, pg, pc = (np.array(v, dtype=np.int64) for v in zip(*triples)) if triples else (np.empty(0, np.int64),) * 3
    return LayerFeatureStats.from_counts(
        layer=layer, positions="all", n_tokens=n_tokens, n_fire=np.array(n_fire),
        act_sum=np.array(n_fire, dtype=float) * 2.0, act_max=np.full(len(n_fire), 3.0),
        genes=genes, gene_occurrences=np.array([occurrences[g] for g in genes]),
        pair_feature=pf, pair_gene=pg, pair_fire_occurrences=pc, pair_fire_tokens=pc,
        pair_act_sum=pc * 2.0, examples=examples, n_prompts=100,
    )


def test_gene_ranking_by_frequency_with_min_occurrences():
    occ = {"RARE": 1, "HIGH": 5, "HALF_A": 4, "HALF_B": 8, "LOW": 5, "ZERO": 9}
    stats = synthetic_stats({0: {"RARE": 1, "HIGH": 4, "HALF_A": 2, "HALF_B": 4, "LOW": 2}}, occ, [100, 0])
    # 1/1 would top the list but is too rare; 0.5 ties are broken by count (4/8 before 2/4).
    assert stats.ranked_genes([0], top_n=None, min_occurrences=1)[0] == ["RARE", "HIGH", "HALF_B", "HALF_A", "LOW"]
    assert stats.ranked_genes([0], top_n=None, min_occurrences=5)[0] == ["HIGH", "HALF_B", "LOW"]
    assert stats.ranked_genes([0], top_n=2, min_occurrences=5)[0] == ["HIGH", "HALF_B"]
    table = stats.gene_table(0, min_occurrences=5)
    assert table["gene"].tolist() == ["HIGH", "HALF_B", "LOW"]
    assert table["frequency"].tolist() == [0.8, 0.5, 0.4]
    assert stats.gene_lists(top_n=2, min_occurrences=5) == {"L3/F0": ["HIGH", "HALF_B"]}
    assert stats.gene_universe(min_occurrences=5) == ["HALF_B", "HIGH", "LOW", "ZERO"]
    with pytest.raises(ValueError, match="min_occurrences must be >= 1"):
        stats.ranked_genes([0], min_occurrences=0)
    with pytest.raises(ValueError, match="feature 7 does not exist"):
        stats.gene_table(7)


def test_save_load_round_trip(tmp_path, collected):
    examples = pd.DataFrame(
        {
            "feature": [0, 0, 1], "rank": [0, 1, 0], "activation": [2.5, 1.0 / 3.0, 0.1],
            "prompt": [4, 2, 0], "position": [7, 1, 3], "token_id": [11, 12, 13],
            "token": ["NA", "nan", "_,"], "gene": pd.Series(["GNAI1", None, "NA"], dtype=object),
            "context": ['a "quoted", [[NA]] b', "x\\ny", ""],
        }
    )
    synthetic = synthetic_stats({0: {"A": 2}, 1: {"B": 1}}, {"A": 3, "B": 5}, [5, 2], examples=examples)
    silent = synthetic_stats({}, {"A": 3}, [0, 0])  # nothing fires: empty examples and matrices
    for original in (synthetic, silent, collected[1]):
        path = original.save(tmp_path / "stats")
        original.save(path)  # replacing an existing directory works
        loaded = LayerFeatureStats.load(path)
        pd.testing.assert_frame_equal(loaded.features, original.features)
        pd.testing.assert_frame_equal(loaded.examples, original.examples, check_dtype=False)
        assert loaded.genes == original.genes
        for name in ("gene_fire_occurrences", "gene_fire_tokens", "gene_act_sum"):
            np.testing.assert_array_equal(getattr(loaded, name).toarray(), getattr(original, name).toarray())
        np.testing.assert_array_equal(loaded.gene_occurrences, original.gene_occurrences)
        for name in ("layer", "positions", "n_tokens", "n_prompts", "live_threshold"):
            assert getattr(loaded, name) == getattr(original, name)
    assert [p.name for p in tmp_path.iterdir()] == ["stats"], "no temporary directories left behind"
    save_feature_stats(collected, tmp_path / "all")
    again = load_feature_stats(tmp_path / "all")
    assert sorted(again) == [0, 1]
    pd.testing.assert_frame_equal(again[0].features, collected[0].features)
    with pytest.raises(FileNotFoundError, match="no feature statistics for layers"):
        load_feature_stats(tmp_path / "all", layers=[5])


# --------------------------------------------------------------------------- Table 4


def _toy_library(name: str, sets: dict[str, list[str]]) -> GeneSetLibrary:
    return GeneSetLibrary(name=name, sets=sets, source="test", version="test", sha256="")


@pytest.fixture(scope="module")
def planted():
    """200 genes in 20 terms of 10; features 0-3 fire on 6 genes of one term each (enriched),
    4-5 on 6 genes from 6 different terms (not enriched), 6 only on template text, 7 never."""
    genes = [f"G{i:03d}" for i in range(200)]
    library = _toy_library("TOY", {f"T{j:02d}": genes[10 * j : 10 * j + 10] for j in range(20)})
    fire = {f: {genes[10 * f + i]: 8 for i in range(6)} for f in range(4)}
    fire[4] = {genes[10 * j] : 8 for j in range(10, 16)}
    fire[5] = {genes[10 * j + 1]: 8 for j in range(10, 16)}
    stats = synthetic_stats(fire, {g: 10 for g in genes}, [100, 100, 100, 100, 100, 100, 40, 0])
    # A second library in which feature 4's genes form a term: "any library" counts it.
    second = _toy_library("TOY2", {"F4_SET": list(fire[4]), "OTHER": genes[150:160]})
    return stats, library, second


def test_table4_counts_planted_features(planted):
    stats, library, second = planted
    result = table4({stats.layer: stats}, [library], top_n=25, min_occurrences=5, progress=False)
    row = result.summary.iloc[0]
    assert (row.layer, row.live_features, row.with_genes, row.no_genes, row.interpretable) == (3, 7, 6, 1, 4)
    assert row.fraction == pytest.approx(4 / 7)
    table = result.features.set_index("feature")
    assert table.loc[[0, 1, 2, 3], "interpretable"].all()
    assert table.loc[2, "top_term"] == "T02" and table.loc[2, "overlap"] == "6/10"
    assert table.loc[2, "top_fdr"] < 1e-6
    assert set(table.loc[2, "overlap_genes"].split(";")) == set(table.loc[2, "genes"].split(";"))
    assert table.loc[4, "status"] == "not significant" and table.loc[4, "top_fdr"] > 0.05
    assert table.loc[6, "status"] == "no genes" and not table.loc[6, "interpretable"]
    assert table.loc[6, "n_genes"] == 0 and table.loc[6, "top_term"] == ""
    assert 7 not in table.index  # dead: not live
    assert result.settings["libraries"] == [{"name": "TOY", "version": "test", "stand_in_for": None}]
    assert (result.settings["top_n"], result.settings["min_occurrences"], result.settings["nulls"]) == (25, 5, ["random"])
    both = table4({3: stats}, [library, second], min_occurrences=5, nulls=(), progress=False)
    assert both.summary.iloc[0].interpretable == 5
    assert both.features.set_index("feature").loc[4, "library"] == "TOY2"
    assert "random_fraction" not in both.summary.columns


def test_table4_layer_without_genes_is_marked_not_crashing(planted):
    _, library, _ = planted
    only_template = synthetic_stats({}, {"G000": 10, "G001": 10}, [50, 20, 0])
    result = table4({3: only_template}, [library], min_occurrences=5, progress=False)
    row = result.summary.iloc[0]
    assert (row.live_features, row.no_genes, row.interpretable, row.random_fraction) == (2, 2, 0, 0.0)
    assert set(result.features["status"]) == {"no genes"}


def test_null_control_is_seeded_and_size_matched(planted):
    stats, library, _ = planted
    lists = stats.ranked_genes(stats.live_features(), min_occurrences=5)
    a = null_gene_lists(stats, lists, kind="random", seed=1, min_occurrences=5)
    b = null_gene_lists(stats, lists, kind="random", seed=1, min_occurrences=5)
    c = null_gene_lists(stats, lists, kind="random", seed=2, min_occurrences=5)
    assert a == b and a != c
    assert {f: len(g) for f, g in a.items()} == {f: len(g) for f, g in lists.items()}
    universe = set(stats.gene_universe(min_occurrences=5))
    assert all(set(g) <= universe and len(set(g)) == len(g) for g in a.values())
    perm = null_gene_lists(stats, lists, kind="permutation", seed=1, min_occurrences=5)
    assert {f: len(g) for f, g in perm.items()} == {f: len(g) for f, g in lists.items()}
    assert perm != lists and sum(map(len, perm.values())) == len(set().union(*map(set, perm.values())))
    with pytest.raises(ValueError, match="null kind must be one of"):
        null_gene_lists(stats, lists, kind="shuffle")

    run = lambda seed: table4(  # noqa: E731
        {3: stats}, [library], min_occurrences=5, nulls=("random", "permutation"), seed=seed, progress=False
    )
    first, second = run(5), run(5)
    pd.testing.assert_frame_equal(first.summary, second.summary)
    pd.testing.assert_frame_equal(first.nulls, second.nulls)
    assert {"random_fraction", "permutation_fraction"} <= set(first.summary.columns)
    # Six random genes out of 200 almost never share 3+ genes with one 10-gene term.
    assert first.summary.iloc[0].random_fraction < first.summary.iloc[0].fraction
    nulls = first.nulls[first.nulls["kind"] == "random"].set_index("feature")
    assert nulls.loc[6, "status"] == "no genes" and nulls.loc[0, "n_genes"] == 6


def test_enrich_layer_background_and_errors(planted):
    stats, library, _ = planted
    corpus, _ = enrich_layer(stats, [library], min_occurrences=5, background="corpus", nulls=())
    assert corpus["interpretable"].sum() == 4
    with pytest.raises(ValueError, match="background must be 'library', 'corpus'"):
        enrich_layer(stats, [library], background="genome")
    with pytest.raises(ValueError, match="unknown null kinds"):
        enrich_layer(stats, [library], nulls=("bootstrap",))


def _random_layer(layer: int, genes: list[str], rng: np.random.Generator) -> LayerFeatureStats:
    """160 features firing on 0-30 random genes of ``genes`` (some rare, some outside the libraries)."""
    occurrences = {g: int(c) for g, c in zip(genes, rng.integers(1, 60, size=len(genes)))}
    fire = {}
    for f in range(150):
        chosen = rng.choice(len(genes), size=int(rng.integers(0, 31)), replace=False)
        fire[f] = {genes[j]: int(rng.integers(1, occurrences[genes[j]] + 1)) for j in chosen}
    n_fire = rng.integers(20, 400, size=160).tolist()
    n_fire[150:] = [0] * 5 + [15] * 5  # dead features, and live ones without genes
    return synthetic_stats(fire, occurrences, n_fire, layer=layer)


def _full_table_top_terms(stats, gene_lists, libraries, background) -> pd.DataFrame:
    """The reference: enrich() on every list at once, its whole table ranked, the first row per list."""
    from c2srepro.enrichment import enrich

    bg = stats.gene_universe(min_occurrences=5) if background == "corpus" else None
    full = enrich({f: g for f, g in gene_lists.items() if g}, libraries, background=bg)
    full = full.sort_values(["query", "Adjusted P-value", "Combined Score", "Gene_set", "Term"],
                            ascending=[True, True, False, True, True], kind="stable")
    return full.groupby("query", sort=False).head(1).set_index("query")


@pytest.mark.parametrize("background", ["library", "corpus"])
def test_table4_is_the_full_enrichment_tables_summary(background):
    from c2srepro.enrichment import load_library

    libraries = [load_library("KEGG_2021_Human"), load_library("GO_Biological_Process_2023")]
    rng = np.random.default_rng(26)
    pool = sorted(libraries[0].genes | libraries[1].genes)
    genes = rng.choice(pool, size=500, replace=False).tolist() + [f"NOTINLIB{i}" for i in range(20)]
    stats = {layer: _random_layer(layer, genes, rng) for layer in (0, 5)}
    result = table4(stats, libraries, min_occurrences=5, background=background, nulls=("random", "permutation"),
                    seed=3, progress=False)
    fractions = {}
    for (kind, layer), rows in [((None, l), result.features[result.features["layer"] == l]) for l in stats] + [
        ((k, l), result.nulls[(result.nulls["kind"] == k) & (result.nulls["layer"] == l)])
        for k in ("random", "permutation") for l in stats
    ]:
        lists = {f: g.split(";") if g else [] for f, g in zip(rows["feature"], rows["genes"])}
        top = _full_table_top_terms(stats[layer], lists, libraries, background)
        got = rows.set_index("feature")
        listed = [f for f in got.index if lists[f]]
        assert set(top.index) <= set(listed) and len(top) > 20
        assert got.loc[top.index, "top_term"].tolist() == top["Term"].tolist()
        assert got.loc[top.index, "library"].tolist() == top["Gene_set"].tolist()
        assert got.loc[top.index, "top_fdr"].tolist() == top["Adjusted P-value"].astype(float).tolist()
        assert got.loc[top.index, "overlap"].tolist() == top["Overlap"].tolist()
        if kind is None:  # nulls skip the overlap genes
            assert got.loc[top.index, "overlap_genes"].tolist() == top["Genes"].tolist()
        interpretable = top.index[top["Adjusted P-value"].to_numpy() < 0.05]
        assert set(got.index[got["interpretable"]]) == set(interpretable)
        fractions[kind, layer] = len(interpretable) / len(got)
        assert (got.loc[[f for f in listed if f not in top.index], "status"] == "no terms").all()
        assert (got.loc[[f for f in got.index if not lists[f]], "status"] == "no genes").all()
    summary = result.summary.set_index("layer")
    for layer in stats:
        assert summary.loc[layer, "fraction"] == fractions[None, layer]
        assert summary.loc[layer, "random_fraction"] == fractions["random", layer]
        assert summary.loc[layer, "permutation_fraction"] == fractions["permutation", layer]
    assert 0 < summary["fraction"].min() and summary["fraction"].max() < 1  # not a degenerate case


def test_write_feature_tables(tmp_path, planted):
    stats, library, _ = planted
    result = table4({3: stats}, [library], min_occurrences=5, nulls=(), progress=False)
    paths = write_feature_tables(result.features, tmp_path / "features")
    assert [p.name for p in paths] == ["layer_03.csv"]
    back = pd.read_csv(paths[0], keep_default_na=False)
    assert back["feature"].tolist() == list(range(7))
    assert back.loc[0, "genes"].split(";") == [f"G{i:03d}" for i in range(6)]
    assert back.loc[6, "status"] == "no genes"
    assert {"n_genes", "top_term", "top_fdr", "library"} <= set(back.columns)
    with pytest.raises(ValueError, match="lacks columns"):
        write_feature_tables(result.features.drop(columns="status"), tmp_path)


# --------------------------------------------------------------------------- Table 3


def _examples(feature: int, tokens: list[str], genes: list[str | None]) -> pd.DataFrame:
    n = len(tokens)
    return pd.DataFrame(
        {
            "feature": feature, "rank": range(n), "activation": np.linspace(3, 1, n), "prompt": range(n),
            "position": 5, "token_id": 0, "token": tokens, "gene": pd.Series(genes, dtype=object), "context": "",
        }
    )


@pytest.fixture(scope="module")
def judged():
    occ = {g: 40 for g in ["PSD3", "PTPN11", "PTPN12", "PTPN3", "PTPN6", "VWF", "ACTB", "MYH6", "TTN", "GAPDH",
                           "NPPA", "RYR2", "LAMC1", "LAMTOR4", "ABL1", "ABLIM1"]}
    fire = {
        0: {"PSD3": 30, "VWF": 2, "ACTB": 1},  # one gene
        1: {"PTPN11": 6, "PTPN12": 6, "PTPN3": 6, "PTPN6": 6, "VWF": 5, "ACTB": 5, "MYH6": 5},  # family
        2: {g: 4 for g in ["VWF", "ACTB", "MYH6", "TTN", "GAPDH", "NPPA", "RYR2", "LAMC1", "ABL1"]},  # diffuse
        3: {"PSD3": 5},  # mostly template text
        4: {"PSD3": 3},  # too little evidence
        # LAM* and ABL* look alike but are different stems (LAMC vs LAMTOR, ABL vs ABLIM).
        5: {"LAMC1": 4, "LAMTOR4": 4, "ABL1": 4, "ABLIM1": 4, "VWF": 4, "TTN": 4, "MYH6": 4, "GAPDH": 4},
    }
    examples = pd.concat(
        [
            _examples(0, ["PSD"] * 4 + ["_V"], ["PSD3"] * 4 + ["VWF"]),
            _examples(1, ["PN"] * 5, ["PTPN11", "PTPN12", "PTPN11", "PTPN3", "PTPN6"]),
            _examples(2, ["A", "B", "C", "A", "D"], ["VWF", "ACTB", None, "TTN", "MYH6"]),
            _examples(3, ["."] * 5, [None] * 5),
        ],
        ignore_index=True,
    )
    return synthetic_stats(fire, occ, [35, 45, 40, 50, 3, 32, 0], n_tokens=2000, examples=examples)


def test_interpret_rule_examples(judged):
    table = interpret_features(judged, range(7)).set_index("feature")
    assert table.loc[0, "rule"] == "Yes" and "top 3 genes" in table.loc[0, "rule_reason"]
    assert table.loc[0, "top_genes"].startswith("PSD3")
    assert table.loc[1, "rule"] == "Yes" and table.loc[1, "family"] == "PTPN*"
    assert table.loc[1, "family_share"] == pytest.approx(24 / 39)
    assert table.loc[2, "rule"] == "No" and "diffuse over 9 genes" == table.loc[2, "rule_reason"]
    assert table.loc[3, "rule"] == "No" and "outside genes" in table.loc[3, "rule_reason"]
    assert table.loc[4, "rule"] == "No" and "3 gene-token firings" in table.loc[4, "rule_reason"]
    assert table.loc[5, "rule"] == "No" and table.loc[5, "top_share"] == pytest.approx(12 / 32)
    assert table.loc[6, "rule"] == "No" and table.loc[6, "rule_reason"] == "never fires"
    strict = interpret_features(judged, [0], rule=InterpretRule(top_genes=1, min_top_share=0.95))
    assert strict.loc[0, "rule"] == "No"
    with pytest.raises(ValueError, match="min_top_share must be in"):
        InterpretRule(min_top_share=1.5)
    assert InterpretRule.from_dict(InterpretRule(top_genes=2).to_dict()) == InterpretRule(top_genes=2)


def test_symbol_family_and_activating_tokens(judged):
    assert [symbol_family(g) for g in ["PTPN11", "FOXO3", "HSP90AA1", "MT-ND4", "C1QA"]] == [
        "PTPN", "FOXO", "HSP", None, None,
    ]
    assert activating_tokens(judged.top_examples(0)) == "PSD token in PSD3"
    assert activating_tokens(judged.top_examples(1)) == "PN token in PTPN11, PTPN12, PTPN3, ..."
    assert activating_tokens(judged.top_examples(2)) == "mixed tokens: A (2), B (1), C (1)"
    assert activating_tokens(judged.top_examples(3)) == ". token in template text"
    assert activating_tokens(judged.top_examples(5)) == "no firing examples"


def test_table3_sampling_and_human_labels(tmp_path, judged, collected):
    stats = collected[1]
    first = sample_live_features(stats, n=20, seed=3)
    assert first.tolist() == sample_live_features(stats, n=20, seed=3).tolist()
    assert len(set(first.tolist())) == 20 and set(first.tolist()) <= set(stats.live_features(-4.0).tolist())
    assert first.tolist() != sample_live_features(stats, n=20, seed=4).tolist()
    table = table3(stats, n=20, seed=3)
    assert table["feature"].tolist() == first.tolist() and (table["source"] == "rule").all()

    labels = tmp_path / "labels.csv"
    labels.write_text("layer,feature,gene_level_interpretable\n3,2,yes\n3,0,No\n9,1,yes\n")
    assert read_human_labels(labels, layer=3) == {2: "Yes", 0: "No"}
    labelled = table3(judged, features=[0, 1, 2], human_labels=labels).set_index("feature")
    assert labelled["gene_level_interpretable"].tolist() == ["No", "Yes", "Yes"]
    assert labelled["source"].tolist() == ["human", "rule", "human"]
    assert labelled.loc[2, "rule"] == "No"  # the rule's own verdict stays visible
    bad = tmp_path / "bad.csv"
    bad.write_text("feature,label\n1,yes\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['gene_level_interpretable'\]"):
        table3(judged, features=[0], human_labels=bad)
    bad.write_text("feature,gene_level_interpretable\n1,maybe\n")
    with pytest.raises(ValueError, match="use yes/no"):
        read_human_labels(bad)


# --------------------------------------------------------------------------- figures


def test_figures(collected, planted):
    stats, library, _ = planted
    fig = plot_feature_frequency(collected[0], threshold=-1.0)
    ax = fig.axes[0]
    assert any(np.allclose(line.get_xdata(), -1.0) for line in ax.lines)
    live = int((collected[0].features["log10_freq"] >= -1.0).sum())
    assert ax.get_title().startswith(f"Layer 0: {live} live of {collected[0].d_tc}")
    result = table4({3: stats, 4: synthetic_stats({}, {"G000": 10}, [50], layer=4)}, [library], min_occurrences=5,
                    nulls=("random", "permutation"), progress=False)
    fig = plot_interpretable_fraction(result.summary)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["transcoder features", "random gene lists (null)", "permuted gene labels (null)"]
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), [4 / 7, 0.0])
    with pytest.raises(ValueError, match="lacks columns"):
        plot_interpretable_fraction(result.summary.drop(columns="fraction"))
