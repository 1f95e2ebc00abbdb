"""Files for circuit-tracer's graph viewer: its own pydantic models accept them, and its own page renders them.

The ``circuit-tracer`` wheel (pinned below) is fetched once with ``pip download --no-deps`` into the
cache and never installed (its pins conflict with ours): the test reads its ``frontend/`` folder,
loads ``graph_models.py`` and ``feature_models.py`` as single files (they import only pydantic),
and serves its viewer assets with the exported files in headless Chromium. (PyPI's
``circuit-tracer`` 0.5.0 is published from a fork of decoderesearch/circuit-tracer; its frontend
differs from decoderesearch's main branch only in where a local transcoder's features are fetched
from, which a scan of c2srepro's does not use.)

The viewer's page loads six scripts from CDNs. dagre 0.8.5 and pako 2.1.0 are unpkg URLs of npm
packages, answered from those packages; transformer-circuits.pub's ``d3.js`` is answered with d3
7.9.0's ``dist/d3.js`` (the viewer calls d3 >= 6: ``d3.sort``, ``d3.group``). Three exist in no npm
package:

- ``jetpack_2024-07-20.js``, Anthropic's fork of d3-jetpack. npm's d3-jetpack is not it: 2.2.1's
  plugin build calls d3-collection's ``nest`` (d3 v4/v5) for ``nestBy`` and its ``conventions``
  returns no ``drawAxis`` method, which the viewer's link graph calls; 2.3.0's d3 7 bundle holds
  two copies of d3-selection and adds its methods (``appendMany``, ``at``, ``st``) to the one
  ``d3.select`` does not use. The test answers it with d3-collection 1.0.7 + d3-jetpack 2.2.1's
  plugin, which carries the page up to the link graph's ``c.drawAxis()``.
- ``hotserver-client-ws.js``, the live-reload client of the authors' dev server (the
  ``hot-server`` package only injects an inline snippet), and ``npy_v0.js``, their ``.npy``
  reader (the viewer reads ``.npy`` files only, which a local graph never has): refused.

So the files are checked three ways: against the viewer's pydantic models; by the viewer's own
loaders and ``formatData`` in the page with npm packages only; and drawn, with ``FORK_DRAWAXIS``
(a few lines of ours that give npm's jetpack the one fork method the viewer calls) after npm's
jetpack: the nodes render and a feature's panel shows its examples.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from _circuit_tracer import wheel as circuit_tracer_wheel
from _tiny_neox import GENES, TOKENS, VOCAB, tiny_setup

from c2srepro.attribution import build_graph, build_replacement, prune_graph
from c2srepro.attribution.export import cantor_pairing, export_viewer_files, viewer_features, viewer_graph
from c2srepro.attribution.linearised import run_model
from c2srepro.data.prompts import EncodedPrompts
from c2srepro.features import collect_feature_stats, example_activations

VIEWER_LIB = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
JETPACK = VIEWER_LIB + "jetpack_2024-07-20.js"
SCRIPTS = {
    VIEWER_LIB + "d3.js": [("d3", "7.9.0", "dist/d3.js")],
    # d3-jetpack's plugin build for a global d3, with the d3-collection it calls for nestBy.
    JETPACK: [("d3-collection", "1.0.7", "dist/d3-collection.js"), ("d3-jetpack", "2.2.1", "build/d3-jetpack.cjs")],
}
# The fork's conventions() returns c with c.drawAxis(svg = c.svg); npm's has d3.drawAxis(c) only.
FORK_DRAWAXIS = """
(function () {
  var conventions = d3.conventions
  d3.conventions = function (c) {
    c = conventions(c)
    c.drawAxis = function (svg) { return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg})) }
    return c
  }
})()
"""
NO_NPM_PACKAGE = {VIEWER_LIB + "hotserver-client-ws.js", VIEWER_LIB + "npy_v0.js"}
MISSING_FORK_API = "JavaScript error: c.drawAxis is not a function"
SLUG = "tiny-cell"


@pytest.fixture(scope="module")
def frontend(tmp_path_factory) -> Path:
    """circuit-tracer's ``frontend/`` folder out of its wheel (downloaded once into the cache)."""
    out = tmp_path_factory.mktemp("circuit_tracer")
    with zipfile.ZipFile(circuit_tracer_wheel()) as archive:
        members = [m for m in archive.namelist() if m.startswith("circuit_tracer/frontend/")]
        archive.extractall(out, members)
    return out / "circuit_tracer" / "frontend"


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(f"_circuit_tracer_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup():
    """A tiny model on the cell-sentence prompt, its feature statistics over a small corpus, the graph."""
    model, transcoders, input_ids = tiny_setup(n_pos=len(TOKENS))
    generator = torch.Generator().manual_seed(3)
    corpus = [input_ids.tolist()] + [torch.randint(0, VOCAB, (len(TOKENS),), generator=generator).tolist()
                                     for _ in range(5)]
    prompts = EncodedPrompts(input_ids=corpus, answer_start=[len(TOKENS)] * len(corpus),
                             cell_index=list(range(len(corpus))), gene_of_token=[list(GENES)] * len(corpus),
                             labels=[None] * len(corpus), texts=[""] * len(corpus))
    stats = collect_feature_stats(model, transcoders, prompts, batch_size=4, top_k=4, context=2, progress=False)
    rep = build_replacement(model, transcoders, input_ids)
    graph = build_graph(rep, [rep.logit_node(rep.n_pos - 1, 5)], tokens=TOKENS, genes=GENES)
    return model, transcoders, prompts, stats, graph


@pytest.fixture(scope="module")
def exported(setup, tmp_path_factory) -> Path:
    model, transcoders, prompts, stats, graph = setup
    windows = example_activations(model, transcoders, prompts, stats, viewer_features(graph), context=3)
    data = tmp_path_factory.mktemp("viewer") / "data"
    export_viewer_files(graph, data, slug=SLUG, stats=stats, examples=windows, logit_probabilities={5: 0.25})
    return data


def test_files_validate_against_circuit_tracers_models(frontend, exported, setup):
    graph_models, feature_models = _module(frontend / "graph_models.py"), _module(frontend / "feature_models.py")
    data = json.loads((exported / f"{SLUG}.json").read_text())
    parsed = graph_models.Model.model_validate(data)
    listing = json.loads((exported / "graph-metadata.json").read_text())
    assert [graph_models.Metadata.model_validate(g).slug for g in listing["graphs"]] == [SLUG]
    feature_files = sorted((exported / "c2srepro").glob("*.json"))
    assert feature_files
    for path in feature_files:
        feature_models.Model.model_validate(json.loads(path.read_text()))

    # Ids as circuit-tracer's own constructors write them, node for node.
    _, _, _, _, graph = setup
    pruning = prune_graph(graph)
    by_id = {n.node_id: n for n in parsed.nodes}
    for index in pruning.node_mask.nonzero().flatten().tolist():
        row = graph.nodes.iloc[index]
        influence = float(pruning.cumulative[index])
        if row["kind"] == "feature":
            ref = graph_models.Node.feature_node(int(row["layer"]), int(row["position"]), int(row["feature"]))
        elif row["kind"] == "error":
            ref = graph_models.Node.error_node(int(row["layer"]), int(row["position"]))
        elif row["kind"] == "embedding":
            ref = graph_models.Node.token_node(int(row["position"]), int(row["token_id"]))
        else:
            ref = graph_models.Node.logit_node(int(row["position"]), int(row["logit_token"]), "x", graph.n_layers,
                                               target_logit=True, token_prob=0.25)
        if ref.node_id not in by_id:  # a kept node without a kept edge: dropped, as circuit-tracer does
            assert row["kind"] in ("feature", "error")
            continue
        ours = by_id[ref.node_id]
        assert (ours.jsNodeId, ours.feature, ours.layer, ours.ctx_idx, ours.feature_type) == (
            ref.jsNodeId, ref.feature, ref.layer, ref.ctx_idx, ref.feature_type)
        assert ours.influence == pytest.approx(influence)
        if row["kind"] == "logit":
            assert ours.is_target_logit and ours.clerp.endswith("(p=0.250)")

    # Every link is an edge of the pruned graph with its weight; gene and token in the labels.
    index_of = {}
    for index, row in graph.nodes.iterrows():
        node_id = next((n.node_id for n in parsed.nodes if n.ctx_idx == row["position"] and _same(n, row, graph)), None)
        if node_id is not None:
            index_of[node_id] = index
    assert len(data["links"]) == int(pruning.edge_mask.sum())
    for link in data["links"]:
        assert link["weight"] == graph.adjacency[index_of[link["target"]], index_of[link["source"]]].item()
    assert data["metadata"]["prompt_tokens"][2] == "V [VWF]" and data["metadata"]["prompt_tokens"][0] == "cell"
    for node in parsed.nodes:
        if node.feature_type == "cross layer transcoder":
            gene = GENES[node.ctx_idx]
            assert f'"{TOKENS[node.ctx_idx]}"' in node.clerp and (gene is None or f"in {gene}" in node.clerp)


def _same(node, row, graph) -> bool:
    kind = {"cross layer transcoder": "feature", "mlp reconstruction error": "error"}.get(node.feature_type,
                                                                                          node.feature_type)
    if kind != row["kind"]:
        return False
    if kind == "feature":
        return node.layer == str(row["layer"]) and node.feature == cantor_pairing(int(row["layer"]), int(row["feature"]))
    return kind in ("embedding", "logit") or node.layer == str(row["layer"])


def test_feature_files_hold_token_level_activations(setup, exported):
    model, transcoders, prompts, stats, graph = setup
    layer, feature = viewer_features(graph)[0]
    document = json.loads((exported / "c2srepro" / f"{cantor_pairing(layer, feature)}.json").read_text())
    examples = document["examples_quantiles"][0]["examples"]
    top = stats[layer].top_examples(feature)
    assert len(examples) == len(top) > 0
    for example, kept in zip(examples, top.itertuples()):
        # Independent reference: the transcoder's encoder on the model's own MLP input.
        z = transcoders[layer].encode(run_model(model, torch.tensor(prompts.input_ids[kept.prompt])).mlp_in[layer])
        z = z[:, feature].detach().numpy()
        start = kept.position - example["train_token_ind"]
        np.testing.assert_allclose(example["tokens_acts_list"], z[start : start + len(example["tokens"])], atol=1e-9)
        assert example["tokens_acts_list"][example["train_token_ind"]] == pytest.approx(kept.activation)
        assert len(example["tokens"]) == min(kept.position + 4, len(TOKENS)) - max(kept.position - 3, 0)
    assert document["activation_frequency"] == pytest.approx(stats[layer].features["freq"][feature])


# The viewer's own data pipeline (util.getFile, utilCg.formatData) run in the page over our files.
FORMAT_JS = """
async (slug) => {
  const {graphs} = await util.getFile('./data/graph-metadata.json', false)
  const data = await util.getFile(`./graph_data/${slug}.json`, false)
  const nodeIds = data.nodes.map(d => d.node_id)
  const formatted = await utilCg.formatData(data, {pinnedIds: [], clerps: null})
  const feature = formatted.nodes.find(d => d.feature_type == 'cross layer transcoder')
  const examples = initFeatureExamples({containerSel: d3.select('body').append('div')})
  const loaded = await examples.loadFeature(formatted.metadata.scan, feature.featureIndex)
  return {
    listed: graphs.map(g => g.slug), nodes: nodeIds.length, kept: formatted.nodes.length,
    links: data.links.length, linked: formatted.links.length,
    connected: formatted.nodes.filter(d => d.sourceLinks.length + d.targetLinks.length > 0).length,
    logit: formatted.nodes.filter(d => d.feature_type == 'logit').length,
    examples: loaded.examples_quantiles[0].examples.length, featureIndex: loaded.featureIndex,
  }
}
"""


@pytest.fixture
def site(frontend, exported, tmp_path) -> Path:
    """circuit-tracer's viewer assets with the exported files, laid out as its server serves them."""
    site = tmp_path / "site"
    shutil.copytree(frontend / "assets", site)
    shutil.copytree(exported, site / "data")
    # circuit-tracer's server answers /data/ and /graph_data/ from the same folder.
    (site / "graph_data").symlink_to(site / "data", target_is_directory=True)
    return site


def test_the_viewer_reads_the_files_in_chromium(site, exported):
    """circuit-tracer's own page and scripts, offline in Chromium, with npm packages only.

    With npm's d3-jetpack in place of Anthropic's fork the page stops where the link graph calls
    the fork's ``c.drawAxis`` (module docstring); the test asserts that this is the only error,
    that the page listed our graph, and runs the viewer's own loaders and ``formatData`` over our
    files in the page: every node and link kept and linked, the feature file of a node found
    through the graph's ``scan`` and its Cantor index.
    """
    from c2srepro.book.browser import open_page

    data = json.loads((exported / f"{SLUG}.json").read_text())
    check = open_page(site, f"index.html?slug={SLUG}", selector="select.graph-prompt-select option",
                      substitutes=SCRIPTS, evaluate=f"() => ({FORMAT_JS})({json.dumps(SLUG)})")
    assert set(check.refused) <= NO_NPM_PACKAGE, check.refused
    assert check.errors == [MISSING_FORK_API], check.errors
    assert check.count == 1
    found = check.value
    assert found["listed"] == [SLUG]
    assert found["kept"] == found["nodes"] == len(data["nodes"])
    assert found["linked"] == found["links"] == len(data["links"]) > 0
    assert found["connected"] == len(data["nodes"]) and found["logit"] == 1
    layer, feature = next((int(n["layer"]), int(n["node_id"].split("_")[1])) for n in data["nodes"]
                          if n["feature_type"] == "cross layer transcoder")
    assert found["featureIndex"] == cantor_pairing(layer, feature) and found["examples"] > 0


def test_the_viewer_draws_the_nodes_with_the_forks_drawaxis(site, exported, tmp_path):
    """The same page with ``FORK_DRAWAXIS`` (ours, not the fork: the one method the npm release
    lacks, which the viewer calls) loaded after npm's d3-jetpack: the graph's nodes are drawn and
    a clicked feature's panel shows its examples from the feature file."""
    from c2srepro.book.browser import open_page

    adapter = tmp_path / "fork-drawaxis.js"
    adapter.write_text(FORK_DRAWAXIS)
    scripts = {**SCRIPTS, JETPACK: [*SCRIPTS[JETPACK], adapter]}
    data = json.loads((exported / f"{SLUG}.json").read_text())
    threshold = data["metadata"]["node_threshold"]
    # The viewer's pruning slider starts at the graph's node threshold: it hides the nodes past it.
    shown = [n for n in data["nodes"] if n["feature_type"] in ("embedding", "logit") or n["influence"] <= threshold]
    check = open_page(site, f"index.html?slug={SLUG}", selector=".link-graph text.node", substitutes=scripts)
    assert check.errors == [] and set(check.refused) <= NO_NPM_PACKAGE
    assert check.count == len(shown) > 0

    feature = next(n for n in shown if n["feature_type"] == "cross layer transcoder")
    layer, index = int(feature["layer"]), int(feature["node_id"].split("_")[1])
    examples = json.loads((exported / "c2srepro" / f"{cantor_pairing(layer, index)}.json").read_text())
    check = open_page(site, f"index.html?slug={SLUG}&clickedId={feature['node_id']}",
                      selector=".feature-example-list .ctx-container", substitutes=scripts)
    assert check.errors == []
    assert check.count == len(examples["examples_quantiles"][0]["examples"]) > 0


def test_bad_inputs(setup, exported, tmp_path):
    model, transcoders, prompts, stats, graph = setup
    path = graph.save(tmp_path / "graph.safetensors")
    assert viewer_graph(path, slug=SLUG) == viewer_graph(graph, slug=SLUG)
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    save_file(load_file(str(path)), str(tmp_path / "old.safetensors"), metadata={**metadata, "schema_version": "0"})
    with pytest.raises(ValueError, match="schema version 0.*rebuild the graph"):
        export_viewer_files(tmp_path / "old.safetensors", tmp_path / "out", slug=SLUG)
    with pytest.raises(TypeError, match="expected a Graph"):
        viewer_graph({"nodes": []}, slug=SLUG)
    with pytest.raises(ValueError, match="slug must be letters"):
        viewer_graph(graph, slug="../up")
    with pytest.raises(ValueError, match=r"node_threshold must be in \(0, 1\]"):
        viewer_graph(graph, slug=SLUG, node_threshold=0.0)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "graph-metadata.json").write_text("[]")
    with pytest.raises(ValueError, match="not circuit-tracer's graph list"):
        export_viewer_files(graph, foreign, slug=SLUG)
    with pytest.raises(ValueError, match="no examples for .* features"):
        export_viewer_files(graph, tmp_path / "out", slug=SLUG, stats=stats, examples={})
    assert not list((tmp_path / "out").glob("*.json"))  # refused before anything is written
    with pytest.raises(ValueError, match="stats has no layer"):
        viewer_graph(graph, slug=SLUG, stats={})
    shuffled = EncodedPrompts(input_ids=prompts.input_ids[::-1], answer_start=prompts.answer_start,
                              cell_index=prompts.cell_index, gene_of_token=prompts.gene_of_token,
                              labels=prompts.labels, texts=prompts.texts)
    with pytest.raises(ValueError, match="not those the statistics were collected with"):
        example_activations(model, transcoders, shuffled, stats, viewer_features(graph))


def test_a_second_graph_joins_the_listing(setup, exported, tmp_path):
    *_, graph = setup
    data = tmp_path / "data"
    shutil.copytree(exported, data)
    export_viewer_files(graph, data, slug="other", prune=False)
    export_viewer_files(graph, data, slug="other", prune=False)  # same slug again: replaced, not repeated
    listing = json.loads((data / "graph-metadata.json").read_text())
    assert [g["slug"] for g in listing["graphs"]] == [SLUG, "other"]
    unpruned = json.loads((data / "other.json").read_text())
    assert len(unpruned["links"]) == int((graph.adjacency != 0).sum())


def test_feature_labels_replace_the_top_genes_in_the_viewers_feature_label(setup):
    from c2srepro.attribution.export import viewer_graph

    _, _, _, stats, graph = setup
    plain = viewer_graph(graph, slug="plain", stats=stats)
    features = [n for n in plain["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and all("; top genes " in n["clerp"] for n in features)  # from the statistics
    first = (int(features[0]["layer"]), int(features[0]["node_id"].split("_")[1]))
    labelled = viewer_graph(graph, slug="labelled", stats=stats,
                            feature_labels={first: "top genes VWF, PTPRB; type Endothelial (AUROC 0.95)"})
    by_id = {n["node_id"]: n["clerp"] for n in labelled["nodes"]}
    for node in features:
        key = (int(node["layer"]), int(node["node_id"].split("_")[1]))
        if key == first:
            assert by_id[node["node_id"]].endswith("; top genes VWF, PTPRB; type Endothelial (AUROC 0.95)")
            assert by_id[node["node_id"]].count("top genes") == 1
        else:
            assert by_id[node["node_id"]] == node["clerp"]
