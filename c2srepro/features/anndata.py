"""Transcoder features of cells as an AnnData (cells x features), for scanpy.

1. The cells of the input AnnData become C2S cell sentences (``c2srepro.data.cells``) and then
   prompts without an answer (``c2srepro.data.prompts``), as the model sees them at inference.
2. Prompts are sorted by length (less padding) and run in batches through the model, once for all
   the layers asked (``feature_activations_by_layer``); each layer's MLP input x is taken from the
   harvest path (``c2srepro.transcoder.harvest.harvest_batch``:
   right padding, padded positions dropped, rows in prompt-major order).
3. z = ReLU(x W_enc + b_enc) (eq. 1) on the counted positions of each prompt: ``"genes"`` (tokens
   inside a gene symbol), ``"all"`` real tokens, or ``"prompt"`` (before the answer; without an
   answer the same as ``"all"``).
4. Each cell's value of feature f is its z_f reduced over the cell's counted positions: ``"max"``,
   ``"mean"``, ``"sum"``, or ``"last"`` (the last counted position; with ``positions="all"`` the
   token that predicts the cell type).
5. ``var`` per feature: its id ``L{layer}F{feature}`` (the var name, so that
   ``sc.pl.umap(result, color="L3F979")`` works), the book's key ``L3/F979``, the fraction of
   cells with a nonzero value, the firing frequency over counted tokens and the mean value; and
   its top genes (``LayerFeatureStats.ranked_genes``: genes by the fraction of their occurrences
   the feature fires on), from ``stats`` when given, else from ``collect_feature_stats`` over
   the same prompts (a second pass of the model).
6. ``obs`` and ``obsm`` (e.g. the cells' ``X_umap``) are those of the encoded cells, with the
   ``uns`` colours of their categories; ``uns["feature_activations"]`` records the parameters.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from c2srepro.data.cells import cell_sentences, require_anndata
from c2srepro.data.prompts import C2S_CELL_TYPE_TEMPLATE, EncodedPrompts, encode_prompts
from c2srepro.features.collect import collect_feature_stats
from c2srepro.features.stats import DEFAULT_MIN_OCCURRENCES, POSITION_MODES, LayerFeatureStats, feature_key
from c2srepro.models.hooked import as_hooked
from c2srepro.transcoder.fit import check_transcoders_fit
from c2srepro.transcoder.harvest import HOOK_POINT, as_prompt_set, harvest_batch
from c2srepro.transcoder.model import Transcoder

REDUCTIONS = ("max", "mean", "sum", "last")
UNS_KEY = "feature_activations"


def feature_name(layer: int, feature: int) -> str:
    """The var name of a feature in ``feature_activations``' result, e.g. ``"L3F979"``."""
    return f"L{layer}F{feature}"


def feature_activations(
    adata: ad.AnnData,
    model: nn.Module,
    tokenizer,
    transcoders: Transcoder | Sequence[Transcoder] | Mapping[int, Transcoder],
    *,
    layer: int,
    stats: LayerFeatureStats | None = None,
    **options,
) -> ad.AnnData:
    """Cells x features AnnData of the layer-``layer`` transcoder's activations (module docstring).

    ``options`` are ``feature_activations_by_layer``'s: ``reduce``, ``positions``, ``top_k``,
    ``seed``, ``use_raw``, ``expression_layer`` (``cell_sentences``' ``layer``), ``symbol_column``
    and ``cells`` make the cell sentences as ``cell_sentences`` does; ``tokenizer`` is the model's
    ``CellTokenizer``. ``n_top_genes`` genes per feature go into ``var["top_genes"]``
    (space-separated), ranked over genes seen in at least ``min_occurrences`` prompts, from
    ``stats`` if given (e.g. the book's feature statistics), else computed on these cells;
    ``n_top_genes=0`` skips them.
    """
    one = [transcoders] if isinstance(transcoders, Transcoder) else transcoders
    by_layer = feature_activations_by_layer(adata, model, tokenizer, one, layers=[layer],
                                            stats=None if stats is None else {layer: stats}, **options)
    return by_layer[layer]


def feature_activations_by_layer(
    adata: ad.AnnData,
    model: nn.Module,
    tokenizer,
    transcoders: Sequence[Transcoder] | Mapping[int, Transcoder],
    *,
    layers: Sequence[int] | None = None,
    reduce: Literal["max", "mean", "sum", "last"] = "max",
    positions: Literal["genes", "all", "prompt"] = "genes",
    top_k: int = 64,
    seed: int = 0,
    use_raw: bool = False,
    expression_layer: str | None = None,
    symbol_column: str | None = None,
    cells: Sequence[int] | None = None,
    organism: str = "Homo sapiens",
    template: str = C2S_CELL_TYPE_TEMPLATE,
    n_top_genes: int = 10,
    min_occurrences: int = DEFAULT_MIN_OCCURRENCES,
    stats: Mapping[int, LayerFeatureStats] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, ad.AnnData]:
    """{layer: cells x features AnnData} for ``layers`` (default: every layer with a transcoder),
    as ``feature_activations`` makes one, from a single pass of the model over the cells: each batch
    is run once and every layer's transcoder reads its own MLP input from that run.
    ``stats``: {layer: LayerFeatureStats} for the top genes; layers without one are counted in
    one further pass over the same prompts."""
    require_anndata(adata, where="feature_activations")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if batch_size < 1 or n_top_genes < 0:
        raise ValueError(f"need batch_size >= 1 and n_top_genes >= 0; got {batch_size}, {n_top_genes}")
    asked = None if layers is None else as_hooked(model).check_layers(list(layers))
    fitted = check_transcoders_fit(model, transcoders, layers=asked)
    layers = sorted(fitted)
    stats = dict(stats or {})
    for layer, layer_stats in stats.items():
        if layer in fitted and (layer_stats.layer != layer or layer_stats.d_tc != fitted[layer].cfg.d_tc):
            raise ValueError(
                f"stats are of layer {layer_stats.layer} with {layer_stats.d_tc} features, the transcoder of layer "
                f"{layer} has {fitted[layer].cfg.d_tc}: pass the statistics of this transcoder, or stats=None"
            )

    sentences = cell_sentences(
        adata, top_k=top_k, seed=seed, symbol_column=symbol_column, use_raw=use_raw, layer=expression_layer,
        cells=cells,
    )
    prompts = encode_prompts(sentences, tokenizer, organism=organism, template=template)
    reduced = _reduced_activations(
        model, fitted, prompts, reduce=reduce, positions=positions, batch_size=batch_size, progress=progress,
    )
    missing = [layer for layer in layers if layer not in stats]
    if n_top_genes and missing:
        stats.update(collect_feature_stats(
            model, {layer: fitted[layer] for layer in missing}, prompts, positions="genes", batch_size=batch_size,
            top_k=1, progress=progress,
        ))

    rows = np.array([s.cell_index for s in sentences])
    settings = {
        "reduce": reduce, "positions": positions, "top_k": top_k, "seed": seed, "use_raw": use_raw,
        "expression_layer": expression_layer or "", "symbol_column": symbol_column or "", "organism": organism,
        "n_top_genes": n_top_genes, "min_occurrences": min_occurrences,
        "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
    }
    out = {}
    for layer in layers:
        values, n_fire, n_tokens = reduced[layer]
        d_tc = fitted[layer].cfg.d_tc
        var = pd.DataFrame(
            {
                "feature": np.arange(d_tc),
                "key": [feature_key(layer, f) for f in range(d_tc)],
                "cell_frequency": (values > 0).mean(axis=0),
                "token_frequency": n_fire / n_tokens,
                "mean": values.mean(axis=0, dtype=np.float64),
            },
            index=pd.Index([feature_name(layer, f) for f in range(d_tc)]),
        )
        if n_top_genes:
            ranked = stats[layer].ranked_genes(range(d_tc), top_n=n_top_genes, min_occurrences=min_occurrences)
            var["top_genes"] = [" ".join(ranked[f]) for f in range(d_tc)]
        result = ad.AnnData(X=values, obs=adata.obs.iloc[rows].copy(), var=var)
        for key, matrix in adata.obsm.items():
            result.obsm[key] = matrix.iloc[rows].copy() if isinstance(matrix, pd.DataFrame) else np.asarray(matrix)[rows]
        for column in result.obs.columns:
            if f"{column}_colors" in adata.uns:
                result.uns[f"{column}_colors"] = adata.uns[f"{column}_colors"]
        result.uns[UNS_KEY] = {
            "layer": layer,
            "hook_point": HOOK_POINT.format(layer=layer) + " input",
            **settings,
            "top_genes_from": ("" if not n_top_genes
                               else f"{stats[layer].n_prompts} prompts, positions={stats[layer].positions!r}"),
            "d_tc": d_tc,
            "n_counted_tokens": n_tokens,
        }
        out[layer] = result
    return out


def _counted(prompts: EncodedPrompts, index: int, positions: str) -> np.ndarray:
    """Which positions of prompt ``index`` are counted (module docstring, step 3)."""
    n = len(prompts.input_ids[index])
    if positions == "genes":
        return np.array([g is not None for g in prompts.gene_of_token[index]], dtype=bool)
    if positions == "prompt":
        return np.arange(n) < prompts.answer_start[index]
    return np.ones(n, dtype=bool)


@torch.no_grad()
def _reduced_activations(
    model: nn.Module,
    transcoders: Mapping[int, Transcoder],
    prompts: EncodedPrompts,
    *,
    reduce: str,
    positions: str,
    batch_size: int,
    progress: bool,
) -> dict[int, tuple[np.ndarray, np.ndarray, int]]:
    """{layer: ([cell, d_tc] reduced activations, per feature its firing count over counted tokens,
    the number of counted tokens)} (steps 2-4), every layer from the same run of each batch."""
    prompt_set = as_prompt_set(prompts)
    counted = [_counted(prompts, i, positions) for i in range(len(prompts))]
    empty = [prompts.cell_index[i] for i, c in enumerate(counted) if not c.any()]
    if empty:
        raise ValueError(f"cells {empty[:5]} have no tokens with positions={positions!r}: choose positions='all'")
    layers = sorted(transcoders)
    first = transcoders[layers[0]]
    device, dtype = first.W_enc.device, first.W_enc.dtype
    values = {layer: np.zeros((len(prompts), transcoders[layer].cfg.d_tc), dtype=np.float32) for layer in layers}
    n_fire = {layer: torch.zeros(transcoders[layer].cfg.d_tc, dtype=torch.long, device=device) for layer in layers}
    order = sorted(range(len(prompts)), key=lambda i: len(prompt_set.input_ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    desc = f"feature activations, layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}"
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=desc, disable=not progress):
            block = harvest_batch(model, prompt_set, batch, layers, dtype=dtype, device=device)
            keep = torch.from_numpy(np.concatenate([counted[i] for i in batch])).to(device)
            lengths = torch.tensor([int(counted[i].sum()) for i in batch], device=device)
            for index, layer in enumerate(layers):
                z = transcoders[layer].encode(block.mlp_in[index][keep])  # eq. 1, [row, d_tc]
                n_fire[layer] += (z > 0).sum(dim=0)
                values[layer][batch] = _reduce(z, lengths, reduce).float().cpu().numpy()
    finally:
        model.train(was_training)
    n_tokens = int(sum(c.sum() for c in counted))
    return {layer: (values[layer], n_fire[layer].cpu().numpy(), n_tokens) for layer in layers}


def _reduce(z: torch.Tensor, lengths: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce [row, d_tc] over consecutive segments of ``lengths`` rows (one per prompt)."""
    if reduce == "last":
        return z[lengths.cumsum(0) - 1]
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=z.device), lengths)
    out = torch.zeros(len(lengths), z.shape[1], dtype=z.dtype, device=z.device)
    if reduce == "max":
        return out.scatter_reduce_(0, segment[:, None].expand_as(z), z, "amax")  # z >= 0: a zero start is safe
    out.index_add_(0, segment, z)
    return out / lengths[:, None] if reduce == "mean" else out
