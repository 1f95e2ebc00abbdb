"""The feature atlas in the book (appendix A2): what chapter 4 adds for it, how the appendix reads
the chapters' results, and the page: one searchable table and one card per feature.

1. Chapter 4 writes ``feature_cells/layer_XX.h5ad``: the held-out cells' (at most its
   ``max_atlas_cells``, a seeded sample) activation of every feature of every layer, from one pass
   of the model (:func:`c2srepro.features.feature_activations_by_layer`, the maximum over the
   cell's counted tokens, chapter 4's ``positions``), the cell type in ``obs["cell_type"]``, with
   ``feature_cells/provenance.json`` recording the model, split and transcoders it used.
2. :func:`book_atlas` builds :func:`c2srepro.features.feature_atlas` from chapter 4's statistics
   and cell activations, chapter 5's per-feature tables and settings (libraries, live threshold,
   FDR, ``min_occurrences``) and chapter 6's attribution graph (its cell's feature influence and
   pruned-graph membership, with chapter 6's thresholds). Each input is refused when made from
   another model, split or transcoder set than the current ones; chapter 6's graph is optional
   (the atlas then says it has none). Nothing runs the model.
   Chapter 6 links its graph's features to their cards (:func:`graph_features`): a feature the
   atlas holds (live at chapter 5's threshold) and the stored pruned graph keeps always has one.
3. The page: :func:`atlas_table` is one row per live feature, its first column linking to the
   card (``#L03-F0123``, :func:`c2srepro.features.feature_anchor`); :func:`show_table` draws it
   with itables (DataTables) offline, its JavaScript embedded in the page: a search box over
   every column (genes, tokens, types, terms, hidden columns included), sortable columns and a
   SearchBuilder for conditions such as layer = 2, log10 E(f) > -2 or FDR < 0.01.
   :func:`feature_cards` writes the cards as plain HTML with inline styles (Quarto drops a
   Styler's ``<style>`` block): the top examples with each firing token shaded by its activation,
   the activation by cell type as a small inline SVG, the genes, the terms and the graphs.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from c2srepro.book.display import format_p
from c2srepro.book.provenance import write_result
from c2srepro.book.stages import check_consumed, feature_stats, fingerprints
from c2srepro.features.atlas import FeatureAtlas, feature_anchor, feature_atlas, load_cell_activations, save_cell_activations

CELLS_DIRECTORY = "feature_cells"
CELLS_RESULT = f"{CELLS_DIRECTORY}/provenance.json"
TABLE4_RESULT = "table4.csv"
TABLE4_FEATURES = "features"
CIRCUIT_RESULT = "circuit_summary.json"
GRAPH_RESULT = "graph.safetensors"  # chapter 6's attribution graph
CIRCUIT_PAGE = "06-circuit.html"
ATLAS_PAGE = "A2-feature-atlas.html"
GROUPBY = "cell_type"
# A type whose AUROC reaches this is listed in the table's hidden "specific to" column, so that a
# search for a type finds the features that prefer it, not only those it tops.
SPECIFIC_AUROC = 0.7
# content-visibility: the browser lays out a card only when it scrolls into view (a page of a
# few hundred cards loads faster; an anchor still scrolls to its card).
CARD_STYLE = ("border: 1px solid #ddd; border-radius: 4px; padding: 0.5em 0.8em; margin: 0.8em 0; "
              "font-size: 0.85em; scroll-margin-top: 4em; content-visibility: auto; contain-intrinsic-size: auto 320px")


def heldout_activations(stage, transcoders: Mapping[int, Any], stats: Mapping[int, Any], *, positions: str,
                        max_cells: int | None = None, seed: int = 0) -> dict:
    """{layer: held-out cells x features AnnData} (module docstring, step 1): every held-out cell, or
    a seeded sample of ``max_cells`` of them (in the split's order), since every layer's dense cells
    x features matrix is held at once (70,430 x 8,192 x 24 float32 would be 55 GB)."""
    from c2srepro.book.sources import resolve_dataset
    from c2srepro.data.datasets import load_dataset
    from c2srepro.features import feature_activations_by_layer

    split = stage.split_parameters
    adata = load_dataset(resolve_dataset(split["dataset"]))
    heldout = stage.split.cells("heldout")
    if max_cells is not None:
        if max_cells < 1:
            raise ValueError(f"max_cells must be >= 1 or None, got {max_cells}")
        if max_cells < len(heldout):
            keep = np.sort(np.random.default_rng(seed).choice(len(heldout), size=max_cells, replace=False))
            heldout = [heldout[i] for i in keep]
    out = feature_activations_by_layer(
        adata, stage.model, stage.tokenizer, transcoders, positions=positions, reduce="max",
        top_k=split["top_k"], seed=split["seed"], use_raw=split["use_raw"], symbol_column=split["symbol_column"],
        cells=[c.cell_index for c in heldout], stats=stats, progress=False,
    )
    for cells in out.values():
        cells.obs[GROUPBY] = pd.Categorical([c.label for c in heldout])
    return out


def write_heldout_activations(results_dir: str | os.PathLike, cells: Mapping[int, Any], *,
                              params: Mapping[str, Any]) -> Path:
    """Save chapter 4's cell activations with their provenance (module docstring, step 1)."""
    directory = save_cell_activations(cells, Path(results_dir) / CELLS_DIRECTORY)
    write_result(Path(results_dir) / CELLS_RESULT,
                 {"layers": sorted(int(k) for k in cells), "cells": int(next(iter(cells.values())).n_obs),
                  "groupby": GROUPBY},
                 params=params, inputs=fingerprints(results_dir))
    return directory


def chapter5_settings(results_dir: str | os.PathLike) -> dict[str, Any]:
    """Chapter 5's parameters (libraries, live threshold, FDR, ...), as its Table 4 recorded them."""
    check_consumed(results_dir, TABLE4_RESULT, made_by="05-enrichment")
    path = Path(results_dir) / f"{TABLE4_RESULT}.provenance.json"
    return json.loads(path.read_text())["params"]


def live_features(results_dir: str | os.PathLike) -> dict[int, set[int]]:
    """{layer: the features the atlas holds}: those live at chapter 5's threshold in chapter 4's statistics."""
    threshold = float(chapter5_settings(results_dir)["live_threshold"])
    return {layer: set(stats.live_features(threshold).tolist()) for layer, stats in feature_stats(results_dir).items()}


def card_links(pruned, live: Mapping[int, set[int]], *, page: str = ATLAS_PAGE) -> dict[tuple[int, int], str]:
    """(layer, feature) -> the URL of its card on the atlas page, for each transcoder feature of the
    pruned graph that the atlas holds (``live``, :func:`live_features`): the links of chapter 6's
    interactive graph (``graph_figure(links=...)``) and of its feature table."""
    features = pruned.nodes[pruned.nodes["kind"] == "feature"]
    return {(int(layer), int(feature)): f"{page}#{feature_anchor(int(layer), int(feature))}"
            for layer, feature in zip(features["layer"], features["feature"]) if int(feature) in live.get(int(layer), ())}


def graph_features(graph, pruned, live: Mapping[int, set[int]], *,
                   top_genes: Mapping[tuple[int, int], str] | None = None, page: str = ATLAS_PAGE) -> pd.DataFrame:
    """The pruned graph's transcoder features (targets excluded), one row per (layer, feature), most
    influential first: its positions, its summed influence on the targets in the whole graph, its top
    genes, and in ``card`` its key, linked (HTML) to its card on the atlas page where the atlas holds
    it (``live``, :func:`live_features`; module docstring, step 2)."""
    nodes = pruned.nodes[(pruned.nodes["kind"] == "feature") & ~pruned.nodes["is_target"].astype(bool)]
    influence = dict(zip(graph.nodes["node_id"], graph.node_influence().tolist()))
    frame = pd.DataFrame({"layer": nodes["layer"].astype(int), "feature": nodes["feature"].astype(int),
                          "position": nodes["position"].astype(int),
                          "influence": [influence[n] for n in nodes["node_id"]]})
    frame = (frame.groupby(["layer", "feature"], as_index=False)
             .agg(positions=("position", lambda p: ", ".join(map(str, sorted(p)))), influence=("influence", "sum"))
             .sort_values("influence", ascending=False, kind="stable").reset_index(drop=True))
    links = card_links(pruned, live, page=page)
    keys = [(int(layer), int(feature)) for layer, feature in zip(frame["layer"], frame["feature"])]
    frame.insert(0, "card", [f'<a href="{links[key]}">{html.escape(f"L{key[0]}/F{key[1]}")}</a>' if key in links
                             else html.escape(f"L{key[0]}/F{key[1]}") for key in keys])
    frame["top genes"] = [(top_genes or {}).get((l_, f_), "") for l_, f_ in zip(frame["layer"], frame["feature"])]
    return frame


def graph_cohort(results_dir: str | os.PathLike):
    """Chapter 6's graph as a one-cell cohort of feature influence, or None when chapter 6 left none."""
    from c2srepro.attribution.full_graph import Graph
    from c2srepro.biology.casestudy import CircuitSummary
    from c2srepro.biology.cohort import TYPE_COLUMN, cell_influence, cohort_anndata

    results = Path(results_dir)
    if not (results / CIRCUIT_RESULT).is_file():
        return None
    check_consumed(results_dir, CIRCUIT_RESULT, made_by="06-circuit")
    summary = CircuitSummary.from_dict(json.loads((results / CIRCUIT_RESULT).read_text()))
    graph = Graph.load(results / GRAPH_RESULT)
    cell = cell_influence(graph, cell_id=summary.cell_id, label=summary.cell_label,
                          node_threshold=summary.node_threshold, edge_threshold=summary.edge_threshold)
    cohort = cohort_anndata([cell], kind="features")
    cohort.obs[GROUPBY] = cohort.obs[TYPE_COLUMN].astype(str)
    return cohort


def book_atlas(results_dir: str | os.PathLike, **options) -> FeatureAtlas:
    """The atlas of one profile's results (module docstring, step 2); ``options`` go to
    :func:`c2srepro.features.feature_atlas` (``n_genes``, ``n_cells``, ...)."""
    results = Path(results_dir)
    stats = feature_stats(results_dir)
    check_consumed(results_dir, CELLS_RESULT, made_by="04-features")
    cells = load_cell_activations(results / CELLS_DIRECTORY)
    settings = chapter5_settings(results_dir)
    tables = [pd.read_csv(path, keep_default_na=False, na_values={"top_fdr": [""]}).assign(
        layer=int(path.stem.removeprefix("layer_"))) for path in sorted((results / TABLE4_FEATURES).glob("layer_*.csv"))]
    if not tables:
        raise FileNotFoundError(f"no {results / TABLE4_FEATURES}/layer_XX.csv: run the 05-enrichment chapter of this "
                                "profile first")
    return feature_atlas(
        stats, table4_features=pd.concat(tables, ignore_index=True), cells=cells, graphs=graph_cohort(results_dir),
        libraries=settings["libraries"], groupby=GROUPBY, live_threshold=float(settings["live_threshold"]),
        fdr=float(settings["fdr"]), min_occurrences=int(settings["min_occurrences"]), **options,
    )


# --------------------------------------------------------------------------- the page


def card_features(atlas: FeatureAtlas, *, per_type: int = 10, per_layer: int = 50) -> list[tuple[int, int]]:
    """The features that get a card (module docstring, step 3), in table order: every feature kept
    by a stored pruned graph, the ``per_type`` most specific features of each cell type, and the
    ``per_layer`` features of each layer with the smallest FDR among the interpretable ones."""
    f = atlas.features
    chosen = set(map(tuple, atlas.graphs.loc[atlas.graphs["in_pruned"].astype(bool), ["layer", "feature"]].to_numpy()))
    specific = atlas.types.sort_values(["auroc", "mean_activation"], ascending=False, kind="stable")
    chosen |= set(map(tuple, specific.groupby("cell_type").head(per_type)[["layer", "feature"]].to_numpy()))
    enriched = f[f["status"] == "interpretable"].sort_values("top_fdr", kind="stable").groupby("layer").head(per_layer)
    chosen |= set(map(tuple, enriched[["layer", "feature"]].to_numpy()))
    keys = list(zip(f["layer"].tolist(), f["feature"].tolist()))
    chosen = {(int(a), int(b)) for a, b in chosen}
    return [k for k in keys if k in chosen]


def atlas_table(atlas: FeatureAtlas, cards: Sequence[tuple[int, int]] | None = None) -> pd.DataFrame:
    """One row per live feature for the page's table (module docstring, step 3); a feature of
    ``cards`` (default: all) links to its card."""
    f = atlas.features
    specific = (atlas.types[atlas.types["auroc"] >= SPECIFIC_AUROC].sort_values("auroc", ascending=False)
                .groupby(["layer", "feature"])["cell_type"].agg(", ".join))
    keys = pd.MultiIndex.from_frame(f[["layer", "feature"]])
    carded = set(f["anchor"]) if cards is None else {feature_anchor(layer, feature) for layer, feature in cards}
    link = [f'<a href="#{a}">{html.escape(k)}</a>' if a in carded else html.escape(k) for a, k in zip(f["anchor"], f["key"])]
    return pd.DataFrame({
        "feature": link,
        "layer": f["layer"].to_numpy(),
        "log10 E(f)": f["log10_freq"].round(2).to_numpy(),
        "top genes": f["top_genes"].to_numpy(),
        "fires on": f["activating_tokens"].to_numpy(),
        "top type": f["top_type"].to_numpy(),
        "AUROC": f["top_auroc"].round(2).to_numpy(),
        "top term": f["top_term"].to_numpy(),
        # Text such as "0.021" or "5.5e-05": DataTables still sorts and filters it as numbers.
        "FDR": [format_p(v) for v in f["top_fdr"]],
        "Table 3": f["table3"].to_numpy(),
        "graphs": f["n_graphs"].to_numpy(),
        "specific to": specific.reindex(keys).fillna("").to_numpy(),
        "terms": _other_terms(atlas, keys),
    })


def _other_terms(atlas: FeatureAtlas, keys: pd.MultiIndex) -> list[str]:
    """Per feature its kept terms other than the top one, names only (GO ids dropped): the hidden
    column a term search reads, as short as it can be (it is most of the table's weight)."""
    top = atlas.features.set_index(["layer", "feature"])["top_term"]
    terms = atlas.terms[atlas.terms["term"].to_numpy() != top.reindex(
        pd.MultiIndex.from_frame(atlas.terms[["layer", "feature"]])).to_numpy()]
    names = terms.assign(name=terms["term"].str.replace(r"\s*\(GO:\d+\)$", "", regex=True))
    joined = names.groupby(["layer", "feature"])["name"].agg(lambda n: "; ".join(dict.fromkeys(n)))
    return joined.reindex(keys).fillna("").tolist()


def show_table(table: pd.DataFrame, *, page_length: int = 15):
    """The atlas table as itables' offline DataTable (module docstring, step 3); the last two
    columns (types with AUROC >= 0.7, every kept term) are hidden but searched."""
    from IPython.display import HTML
    from itables import options, to_html_datatable
    from itables.javascript import generate_init_offline_itables_html

    hidden = [table.columns.get_loc(c) for c in ("specific to", "terms")]
    # The DataTables bundle goes into the page with the table (offline: nothing loads from a CDN).
    bundle = generate_init_offline_itables_html(options.dt_bundle)
    return HTML(bundle + to_html_datatable(
        table, connected=False, allow_html=True, maxBytes=0, pageLength=page_length, order=[],
        lengthMenu=[page_length, 50, 200],
        classes="display compact", layout={"top1": "searchBuilder"}, columnDefs=[{"visible": False, "targets": hidden}],
        table_id="atlas-table", showIndex=False, display_logo_when_loading=False, deferRender=True,
    ))


def _svg_types(types: pd.DataFrame) -> str:
    """Mean (bar), median (tick) and maximum (dot) activation per cell type, with its AUROC."""
    row_h, label_w, bar_w = 13, 185, 150
    scale = bar_w / max(float(types["max_activation"].max()), 1e-12)
    parts = []
    for i, r in enumerate(types.sort_values("auroc", ascending=False, kind="stable").itertuples()):
        y, median = i * row_h, label_w + round(r.median_activation * scale)
        parts.append(
            f'<text x="{label_w - 4}" y="{y + 10}" text-anchor="end">{html.escape(r.cell_type[:30])}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{round(r.mean_activation * scale)}" height="8" fill="#4c78a8"/>'
            f'<path d="M{median} {y + 1}v12" stroke="#222"/>'
            f'<circle cx="{label_w + round(r.max_activation * scale)}" cy="{y + 7}" r="2.5" fill="#e45756"/>'
            f'<text x="{label_w + bar_w + 8}" y="{y + 10}">{r.auroc:.2f}</text>')
    return (f'<svg width="{label_w + bar_w + 40}" height="{row_h * len(types) + 3}" font-size="10" role="img" '
            f'aria-label="activation by cell type">{"".join(parts)}</svg>')


def _context(text: str, activation: float, top: float) -> str:
    """An example's context with its firing token shaded by the activation (``[[token]]`` marks it)."""
    left, _, rest = text.partition("[[")
    token, _, right = rest.partition("]]")
    alpha = 0.15 + 0.85 * min(activation / top, 1.0) if top > 0 else 1.0
    mark = (f'<mark style="background: rgba(228, 87, 86, {alpha:.2f}); padding: 0 1px" '
            f'title="{activation:.3g}">{html.escape(token)}</mark>')
    return (f'<code style="white-space: pre-wrap">{html.escape(left)}{mark}{html.escape(right)}</code>'
            f' <span style="color: #666">{activation:.3g}</span>')


def feature_card(atlas: FeatureAtlas, layer: int, feature: int, *, graph_page: str = CIRCUIT_PAGE) -> str:
    """One feature's card as HTML (module docstring, step 3), its id the feature's anchor."""
    return _card_html(atlas.card(layer, feature), fdr=atlas.settings["fdr"], graph_page=graph_page)


def _card_html(card: Mapping[str, Any], *, fdr: float, graph_page: str) -> str:
    s = card["summary"]
    head = (f'<b>{html.escape(s["key"])}</b> &middot; log10 E(f) {s["log10_freq"]:.2f} &middot; max activation '
            f'{s["max_act"]:.3g} &middot; {s["gene_share"]:.0%} of firings on gene tokens &middot; Table 3 rule: '
            f'{html.escape(s["table3"])} ({html.escape(s["table3_reason"])})')
    genes = ", ".join(f"{html.escape(g.gene)} ({g.frequency:.2f})" for g in card["genes"].itertuples()) or "none"
    examples = "".join(f"<li>{_context(e.context, e.activation, s['max_act'])}</li>"
                       for e in card["examples"].itertuples())
    cells = ", ".join(f"{html.escape(c.cell_id)} ({html.escape(c.cell_type)}, {c.activation:.3g})"
                      for c in card["cells"].itertuples()) or "none active"
    terms = "".join(f"<li>{html.escape(t.term)} <span style='color:#666'>({html.escape(t.library)}, FDR "
                    f"{t.fdr:.2g}, {html.escape(str(t.overlap))})</span></li>" for t in card["terms"].itertuples())
    graphs = ", ".join(
        f'<a href="{graph_page}">{html.escape(g.cell_id)}</a> ({html.escape(g.cell_type)}, influence {g.influence:.3g}'
        f'{", in the pruned graph" if g.in_pruned else ""})' for g in card["graphs"].itertuples())
    types = _svg_types(card["types"]) if len(card["types"]) else ""
    terms = f'<ul style="margin: 0">{terms}</ul>' if terms else "none"
    return (
        f'<div id="{s["anchor"]}" class="c2s-atlas-card" style="{CARD_STYLE}">'
        f"<div>{head}</div>"
        f"<div><i>Top genes</i> (share of occurrences it fires on): {genes}</div>"
        f'<div><i>Top examples</i> ({html.escape(s["activating_tokens"])}):<ol style="margin: 0">{examples}</ol></div>'
        f'<div style="display: flex; flex-wrap: wrap; gap: 1em"><div>{types}</div>'
        f"<div><i>Held-out cells</i>: active in {s['cell_frequency']:.0%}; top {cells}<br>"
        f"<span style='color:#666'>bar: mean, tick: median, dot: maximum activation per type; right: AUROC</span></div></div>"
        f"<div><i>Terms</i> (FDR &lt; {fdr}): {terms}</div>"
        f"<div><i>Attribution graphs</i>: {graphs or 'in none of the stored graphs'}</div>"
        f'<div><a href="#atlas-table">back to the table</a></div></div>'
    )


def feature_cards(atlas: FeatureAtlas, features: Sequence[tuple[int, int]] | None = None):
    """The cards of ``features`` ((layer, feature) pairs; default every feature of the atlas), as one HTML output."""
    from IPython.display import HTML

    if features is None:
        features = list(zip(atlas.features["layer"].tolist(), atlas.features["feature"].tolist()))
    fdr = atlas.settings["fdr"]
    return HTML("".join(_card_html(card, fdr=fdr, graph_page=CIRCUIT_PAGE) for card in atlas.cards(features)))
