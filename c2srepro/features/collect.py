"""Stream transcoder feature statistics over a corpus of cell-sentence prompts, all layers at once.

1. Prompts are sorted by length (less padding) and cut into batches of ``batch_size``; each
   batch is right-padded with an attention mask, so every real token keeps its position ids and
   never attends to the padding after it: its activations are those of the prompt run alone.
2. One forward pass per batch records ``blocks.{l}.hook_mlp_in``, the MLP input x of each chosen
   layer (:class:`c2srepro.models.hooked.HookedModel`); the pass stops as soon as the deepest one
   is recorded, since nothing later (other blocks, the LM head) is needed.
3. Per layer, z = ReLU(x W_enc + b_enc) (eq. 1) on the counted positions only. Padding is never
   counted; ``positions`` picks ``"all"`` real tokens, ``"genes"`` (tokens inside a gene symbol)
   or ``"prompt"`` (tokens before the answer).
4. Streaming sums per feature f: counted tokens N, firing tokens n_f = #{z_f > 0}, sum of z_f
   (float64) and max z_f; E(f) = n_f / N.
5. Top examples: the batch's own ``top_k`` largest z_f per feature are merged with the running
   ``top_k`` by one ``torch.topk`` over their concatenation; only z_f > 0 are kept in the end.
6. Genes: an occurrence is a maximal run of tokens of one gene in one prompt. Per batch, the
   firing entries (z_f > 0 on gene tokens) are counted and their z summed per (occurrence,
   feature) slot with ``bincount``; the nonzero slots are the firing occurrences. Mapped to
   (feature, gene) they are added to a dense [d_tc * n_genes] sum when that is small (the mini
   model), else to a COO buffer of int64 keys summed by key from time to time: a dense matrix
   would hold 8192 x 30k values per layer at the paper's scale.
7. Token strings and context windows are decoded for the kept examples only, once per distinct
   (prompt, position).

:func:`example_activations` goes back to the kept examples of chosen features for a viewer:
the prompts they come from are rerun (batched as in steps 1-3) and z_f is read at every token
of each example's window, so a feature panel can colour the whole context, not only its peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm import tqdm

from c2srepro.data.prompts import pad_right
from c2srepro.features.stats import (
    EXAMPLE_COLUMNS,
    LIVE_THRESHOLD_TABLE4,
    POSITION_MODES,
    LayerFeatureStats,
    feature_key,
)
from c2srepro.models.hooked import HookedModel, as_hooked, hook_name
from c2srepro.transcoder.fit import check_transcoders_fit
from c2srepro.transcoder.model import Transcoder

log = logging.getLogger(__name__)

DEFAULT_TOP_EXAMPLES = 20
DEFAULT_CONTEXT = 6
_MIN_FLUSH = 1 << 22
# Up to 2**24 (feature, gene) pairs (the mini model's 1024 x ~700) the sums live in a dense
# tensor; beyond (the paper's 8192 x ~30k = 2.5e8) in the sparse buffer.
DENSE_PAIRS_LIMIT = 1 << 24
_NO_GENE = -1


class _DensePairSums:
    """Sums per (feature, gene) key in one dense [d_tc * n_genes, width] tensor (small models)."""

    def __init__(self, size: int, width: int, device: torch.device):
        self.sums = torch.zeros(size, width, dtype=torch.float64, device=device)

    def add(self, keys: Int[Tensor, " n"], values: Float[Tensor, "n width"]) -> None:
        self.sums.index_add_(0, keys, values)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        keys = (self.sums[:, 0] > 0).nonzero().squeeze(1)
        return keys.cpu().numpy(), self.sums[keys].cpu().numpy()


class _SparsePairSums:
    """Sums per int64 key fed in many small pieces: a COO buffer summed by key (np.unique) when
    it holds as many entries as the sums so far (and at least ``min_flush``), so every entry
    takes part in O(log) sorts over the whole run."""

    def __init__(self, width: int, min_flush: int = _MIN_FLUSH):
        self.width, self.min_flush = width, min_flush
        self.keys = np.empty(0, dtype=np.int64)
        self.values = np.empty((0, width), dtype=np.float64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._n_pending = 0

    def add(self, keys: Int[Tensor, " n"], values: Float[Tensor, "n width"]) -> None:
        self._pending.append((keys.cpu().numpy(), values.cpu().numpy()))
        self._n_pending += len(keys)
        if self._n_pending >= max(self.min_flush, len(self.keys)):
            self._consolidate()

    def _consolidate(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys] + [k for k, _ in self._pending])
        values = np.concatenate([self.values] + [v for _, v in self._pending])
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.values = np.stack(
            [np.bincount(inverse, weights=values[:, j], minlength=len(self.keys)) for j in range(self.width)], axis=1
        )
        self._pending, self._n_pending = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._consolidate()
        return self.keys, self.values


class _LayerAccumulator:
    """Streaming statistics of one layer's features (module docstring, steps 4-6)."""

    def __init__(self, d_tc: int, n_genes: int, top_k: int, device: torch.device, dense_pairs_limit: int):
        self.d_tc, self.n_genes, self.top_k = d_tc, n_genes, top_k
        self.n_tokens = 0
        self.n_fire = torch.zeros(d_tc, dtype=torch.long, device=device)
        self.act_sum = torch.zeros(d_tc, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(d_tc, dtype=torch.float64, device=device)  # z >= 0: 0 is a safe start
        self.top_val = torch.zeros(top_k, d_tc, dtype=torch.float64, device=device)  # 0 marks an empty slot
        self.top_code = torch.full((top_k, d_tc), -1, dtype=torch.long, device=device)
        # Columns: firing occurrences, firing tokens, summed z.
        if d_tc * n_genes <= dense_pairs_limit:
            self.pairs = _DensePairSums(d_tc * n_genes, 3, device)
        else:
            self.pairs = _SparsePairSums(3)

    def add(
        self,
        z: Float[Tensor, "row d_tc"],
        code: Int[Tensor, " row"],
        occurrence: Int[Tensor, " row"],
        occurrence_gene: Int[Tensor, " occ"],
    ) -> None:
        self.n_tokens += z.shape[0]
        self.n_fire += (z > 0).sum(dim=0)
        self.act_sum += z.sum(dim=0, dtype=torch.float64)
        self.act_max = torch.maximum(self.act_max, z.max(dim=0).values.double())

        k = min(self.top_k, z.shape[0])
        batch_val, batch_row = z.topk(k, dim=0)  # [k, d_tc]
        merged_val = torch.cat([self.top_val, batch_val.double()])
        merged_code = torch.cat([self.top_code, code[batch_row]])
        self.top_val, pick = merged_val.topk(self.top_k, dim=0)
        self.top_code = merged_code.gather(0, pick)

        in_gene = occurrence >= 0
        if not in_gene.any():
            return
        z_gene, occ = z[in_gene], occurrence[in_gene]
        token, feature = (z_gene > 0).nonzero(as_tuple=True)
        if len(token) == 0:
            return
        # One slot per (batch occurrence, feature): firing tokens and summed z by bincount over
        # the firing entries only (a batch of 16 prompts of 64 genes has 1024 x d_tc slots).
        slot = occ[token] * self.d_tc + feature
        size = len(occurrence_gene) * self.d_tc
        fire_tokens = torch.bincount(slot, minlength=size)
        z_sum = torch.bincount(slot, weights=z_gene[token, feature].double(), minlength=size)
        hit = fire_tokens.nonzero().squeeze(1)  # the firing occurrences
        key = (hit % self.d_tc) * self.n_genes + occurrence_gene[hit // self.d_tc]
        n_tokens = fire_tokens[hit].double()
        self.pairs.add(key, torch.stack([torch.ones_like(n_tokens), n_tokens, z_sum[hit]], dim=1))


def _check_inputs(hooked: HookedModel, transcoders, prompts, positions: str) -> dict[int, Transcoder]:
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    by_layer = check_transcoders_fit(hooked, transcoders)
    n = len(prompts.input_ids)
    if n == 0:
        raise ValueError("no prompts given: the corpus is empty")
    if len(prompts.answer_start) != n or len(prompts.gene_of_token) != n:
        raise ValueError(
            f"EncodedPrompts is inconsistent: {n} prompts, {len(prompts.answer_start)} answer starts, "
            f"{len(prompts.gene_of_token)} gene maps"
        )
    for i, (ids, genes) in enumerate(zip(prompts.input_ids, prompts.gene_of_token)):
        if not ids:
            raise ValueError(f"prompt {i} has no tokens: drop it from the corpus")
        if len(genes) != len(ids):
            raise ValueError(f"prompt {i} has {len(ids)} tokens but {len(genes)} gene_of_token entries")
    return by_layer


def _occurrences(
    genes: Sequence[str | None], gene_index: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per token its gene id and occurrence index in the prompt (both -1 outside genes), and
    per occurrence its gene id."""
    gene_ids = np.array([_NO_GENE if g is None else gene_index[g] for g in genes], dtype=np.int64)
    inside = gene_ids >= 0
    starts = inside & np.r_[True, gene_ids[1:] != gene_ids[:-1]]
    occurrence = np.where(inside, np.cumsum(starts) - 1, _NO_GENE)
    return gene_ids, occurrence, gene_ids[starts]


def collect_feature_stats(
    model: nn.Module | HookedModel,
    transcoders: Sequence[Transcoder] | Mapping[int, Transcoder],
    prompts,
    *,
    positions: str = "all",
    batch_size: int = 16,
    top_k: int = DEFAULT_TOP_EXAMPLES,
    context: int = DEFAULT_CONTEXT,
    tokenizer=None,
    live_threshold: float = LIVE_THRESHOLD_TABLE4,
    dense_pairs_limit: int = DENSE_PAIRS_LIMIT,
    progress: bool = True,
) -> dict[int, LayerFeatureStats]:
    """{layer: LayerFeatureStats} for every transcoder, from one pass of ``model`` over ``prompts``.

    ``transcoders``: a list (the layer of each is its ``cfg.layer``) or {layer: Transcoder}.
    ``prompts``: ``EncodedPrompts`` (input_ids, answer_start, gene_of_token). ``positions``:
    which real tokens count (module docstring, step 3). ``top_k`` examples are kept per feature
    with ``context`` tokens either side; ``tokenizer`` (a ``CellTokenizer``) decodes them, else
    tokens are shown as ``<id>``. Per (feature, gene) sums are dense up to ``dense_pairs_limit``
    pairs, sparse beyond (same results). Among equal activations (identical contexts, such as the
    template prefix every prompt shares) the kept examples are an arbitrary choice.
    """
    hooked = as_hooked(model)
    by_layer = _check_inputs(hooked, transcoders, prompts, positions)
    if batch_size < 1 or top_k < 1 or context < 0:
        raise ValueError(f"need batch_size >= 1, top_k >= 1, context >= 0; got {batch_size}, {top_k}, {context}")
    layers = list(by_layer)
    names = {layer: hook_name(layer, "hook_mlp_in") for layer in layers}
    device = hooked.device
    genes = sorted({g for prompt_genes in prompts.gene_of_token for g in prompt_genes if g is not None})
    gene_index = {g: i for i, g in enumerate(genes)}
    stride = max(len(ids) for ids in prompts.input_ids)  # token code = prompt * stride + position
    accumulators = {
        layer: _LayerAccumulator(tc.cfg.d_tc, len(genes), top_k, device, dense_pairs_limit)
        for layer, tc in by_layer.items()
    }
    gene_occurrences = torch.zeros(len(genes), dtype=torch.long, device=device)  # moved once, at the end

    order = sorted(range(len(prompts.input_ids)), key=lambda i: len(prompts.input_ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = hooked.model.training
    hooked.model.eval()
    try:
        for batch in tqdm(batches, desc="feature statistics", disable=not progress):
            rows = _batch_rows(prompts, batch, positions, gene_index, stride)
            if rows is None:
                continue
            ids, mask, keep, code, occurrence, occurrence_gene = (t.to(device) for t in rows)
            record = hooked.cache(ids, names.values(), attention_mask=mask)
            gene_occurrences += torch.bincount(occurrence_gene, minlength=len(genes))
            for layer, tc in by_layer.items():
                x = record[names[layer]][keep].to(tc.W_enc.device, tc.W_enc.dtype)  # [row, d_model]
                with torch.no_grad():
                    z = tc.encode(x).to(device)  # eq. 1, [row, d_tc]
                accumulators[layer].add(z, code, occurrence, occurrence_gene)
    finally:
        hooked.model.train(was_training)

    n_tokens = accumulators[layers[0]].n_tokens
    if n_tokens == 0:
        raise ValueError(f"no tokens were counted with positions={positions!r}: the prompts have none of that kind")
    decoder = _ExampleDecoder(prompts, tokenizer, context)
    out = {}
    for layer, acc in accumulators.items():
        keys, values = acc.pairs.result()
        out[layer] = LayerFeatureStats.from_counts(
            layer=layer,
            positions=positions,
            n_tokens=n_tokens,
            n_fire=acc.n_fire.cpu().numpy(),
            act_sum=acc.act_sum.cpu().numpy(),
            act_max=acc.act_max.cpu().numpy(),
            genes=genes,
            gene_occurrences=gene_occurrences.cpu().numpy(),
            pair_feature=keys // max(len(genes), 1),
            pair_gene=keys % max(len(genes), 1),
            pair_fire_occurrences=np.rint(values[:, 0]).astype(np.int64),
            pair_fire_tokens=np.rint(values[:, 1]).astype(np.int64),
            pair_act_sum=values[:, 2],
            examples=decoder.examples(acc.top_val.cpu().numpy(), acc.top_code.cpu().numpy(), stride),
            n_prompts=len(prompts.input_ids),
            live_threshold=live_threshold,
        )
    log.info("feature statistics: %d prompts, %d counted tokens, layers %s", len(prompts.input_ids), n_tokens, layers)
    return out


def _batch_rows(prompts, batch: Sequence[int], positions: str, gene_index: Mapping[str, int], stride: int):
    """Padded ids and mask [batch, pos], the counted-position mask, and per counted row its token
    code, batch-wide occurrence id (-1 outside genes), plus each occurrence's gene id."""
    ids, mask = pad_right([prompts.input_ids[i] for i in batch])
    keep = torch.zeros_like(mask, dtype=torch.bool)
    codes, occurrences, occurrence_genes = [], [], []
    n_occ = 0
    for row, i in enumerate(batch):
        length = len(prompts.input_ids[i])
        gene_ids, occurrence, gene_of_occurrence = _occurrences(prompts.gene_of_token[i], gene_index)
        if positions == "all":
            counted = np.ones(length, dtype=bool)
        elif positions == "prompt":
            counted = np.arange(length) < prompts.answer_start[i]
        else:
            counted = gene_ids >= 0
        keep[row, :length] = torch.from_numpy(counted)
        occ = occurrence[counted]
        # Renumber this prompt's counted occurrences after those of earlier prompts in the batch.
        seen, local = np.unique(occ[occ >= 0], return_inverse=True)
        batch_occ = np.full(len(occ), _NO_GENE, dtype=np.int64)
        batch_occ[occ >= 0] = local + n_occ
        n_occ += len(seen)
        occurrence_genes.append(gene_of_occurrence[seen])
        occurrences.append(batch_occ)
        codes.append(i * stride + np.flatnonzero(counted))
    if not keep.any():
        return None
    return (
        ids,
        mask,
        keep,
        torch.from_numpy(np.concatenate(codes).astype(np.int64)),
        torch.from_numpy(np.concatenate(occurrences)),
        torch.from_numpy(np.concatenate(occurrence_genes)),
    )


class _ExampleDecoder:
    """Token strings (a leading space shown as ``_``, as in the paper's Table 3) and context
    windows for kept examples, each distinct (prompt, position) decoded once."""

    def __init__(self, prompts, tokenizer, context: int):
        self.prompts, self.tokenizer, self.context = prompts, tokenizer, context
        self._piece: dict[int, str] = {}
        self._cache: dict[int, tuple[int, str, str | None, str]] = {}

    def piece(self, token_id: int) -> str:
        if token_id not in self._piece:
            self._piece[token_id] = (
                f"<{token_id}>" if self.tokenizer is None else self.tokenizer.decode([token_id])
            )
        return self._piece[token_id]

    def describe(self, prompt: int, position: int) -> tuple[int, str, str | None, str]:
        code = (prompt, position)
        if code not in self._cache:
            ids = self.prompts.input_ids[prompt]
            token_id = int(ids[position])
            piece = self.piece(token_id)
            sep = " " if self.tokenizer is None else ""
            left = sep.join(self.piece(int(t)) for t in ids[max(0, position - self.context) : position])
            right = sep.join(self.piece(int(t)) for t in ids[position + 1 : position + 1 + self.context])
            context = f"{left}{sep}[[{piece}]]{sep}{right}".replace("\n", "\\n")
            token = piece.replace(" ", "_").replace("\n", "\\n")
            self._cache[code] = (token_id, token, self.prompts.gene_of_token[prompt][position], context)
        return self._cache[code]

    def examples(self, top_val: np.ndarray, top_code: np.ndarray, stride: int) -> pd.DataFrame:
        """One row per kept example (activation > 0); ``top_val``/``top_code`` are [top_k, d_tc]."""
        rank, feature = np.nonzero(top_val > 0)
        order = np.lexsort((rank, feature))
        rank, feature = rank[order], feature[order]
        codes = top_code[rank, feature]
        prompt, position = codes // stride, codes % stride
        described = [self.describe(int(p), int(q)) for p, q in zip(prompt.tolist(), position.tolist())]
        return pd.DataFrame(
            {
                "feature": feature.astype(np.int64),
                "rank": rank.astype(np.int64),
                "activation": top_val[rank, feature],
                "prompt": prompt.astype(np.int64),
                "position": position.astype(np.int64),
                "token_id": np.array([d[0] for d in described], dtype=np.int64),
                "token": [d[1] for d in described],
                "gene": pd.Series([d[2] for d in described], dtype=object),
                "context": [d[3] for d in described],
            },
            columns=EXAMPLE_COLUMNS,
        )


@dataclass(frozen=True)
class ExampleWindow:
    """One kept top example of a feature with its feature's activation at every token around it."""

    prompt: int  # index in the corpus the statistics were collected on
    position: int  # the example's token in the prompt
    start: int  # first position of the window
    tokens: list[str]  # the window's token strings, as the tokenizer decodes them
    activations: list[float]  # z_f at each token of the window
    gene: str | None  # the gene the example's token lies in

    @property
    def center(self) -> int:
        """Index of the example's token in ``tokens``."""
        return self.position - self.start


def example_activations(
    model: nn.Module | HookedModel,
    transcoders: Sequence[Transcoder] | Mapping[int, Transcoder],
    prompts,
    stats: Mapping[int, LayerFeatureStats],
    features: Iterable[tuple[int, int]],
    *,
    n_examples: int = DEFAULT_TOP_EXAMPLES,
    context: int = DEFAULT_CONTEXT,
    tokenizer=None,
    batch_size: int = 16,
    rtol: float = 1e-3,
) -> dict[tuple[int, int], list[ExampleWindow]]:
    """{(layer, feature): its top ``n_examples`` examples with token-level activations}.

    ``stats``: what :func:`collect_feature_stats` returned for ``prompts`` (the examples name
    prompts by index). Each example's window spans ``context`` tokens either side. Each distinct
    prompt is run once; the activation recomputed at an example's own token must match the one
    the statistics kept (relative tolerance ``rtol``), else the prompts are not the statistics'.
    """
    hooked = as_hooked(model)
    by_layer = _check_inputs(hooked, transcoders, prompts, "all")
    if n_examples < 1 or context < 0 or batch_size < 1:
        raise ValueError(f"need n_examples >= 1, context >= 0, batch_size >= 1; got {n_examples}, {context}, {batch_size}")
    wanted: dict[tuple[int, int], pd.DataFrame] = {}
    for layer, feature in dict.fromkeys((int(l), int(f)) for l, f in features):
        if layer not in stats or layer not in by_layer:
            raise ValueError(f"layer {layer} has no feature statistics or no transcoder: collect them with "
                             "collect_feature_stats on every layer the features come from")
        examples = stats[layer].top_examples(feature, n_examples)
        if len(examples) and int(examples["prompt"].max()) >= len(prompts.input_ids):
            raise ValueError(f"the statistics of layer {layer} name prompt {int(examples['prompt'].max())}, but only "
                             f"{len(prompts.input_ids)} prompts were given: pass the prompts they were collected on")
        wanted[(layer, feature)] = examples
    needed = sorted({int(p) for examples in wanted.values() for p in examples["prompt"]},
                    key=lambda i: len(prompts.input_ids[i]))
    layers = sorted({layer for layer, _ in wanted})
    names = {layer: hook_name(layer, "hook_mlp_in") for layer in layers}
    columns = {layer: sorted({f for l, f in wanted if l == layer}) for layer in layers}
    acts: dict[tuple[int, int], np.ndarray] = {}  # (layer, prompt) -> z [pos, len(columns[layer])]
    was_training = hooked.model.training
    hooked.model.eval()
    try:
        for start in range(0, len(needed), batch_size):
            batch = needed[start : start + batch_size]
            ids, mask = pad_right([prompts.input_ids[i] for i in batch])
            record = hooked.cache(ids.to(hooked.device), names.values(), attention_mask=mask.to(hooked.device))
            for layer in layers:
                tc = by_layer[layer]
                x = record[names[layer]].to(tc.W_enc.device, tc.W_enc.dtype)
                with torch.no_grad():
                    z = tc.encode(x)[..., columns[layer]].to(torch.float64).cpu().numpy()  # eq. 1
                for row, i in enumerate(batch):
                    acts[(layer, i)] = z[row, : len(prompts.input_ids[i])]
    finally:
        hooked.model.train(was_training)

    piece = _ExampleDecoder(prompts, tokenizer, context).piece
    out: dict[tuple[int, int], list[ExampleWindow]] = {}
    for (layer, feature), examples in wanted.items():
        column = columns[layer].index(feature)
        windows = []
        for example in examples.itertuples():
            prompt, position = int(example.prompt), int(example.position)
            z = acts[(layer, prompt)][:, column]
            if not np.isclose(z[position], example.activation, rtol=rtol, atol=1e-6):
                raise ValueError(
                    f"feature {feature_key(layer, feature)} fires {z[position]:.6g} at prompt {prompt}, position "
                    f"{position}, but its statistics kept {example.activation:.6g} there: the prompts, model or "
                    "transcoders are not those the statistics were collected with")
            lo, hi = max(0, position - context), min(len(z), position + context + 1)
            windows.append(ExampleWindow(
                prompt=prompt, position=position, start=lo,
                tokens=[piece(int(t)) for t in prompts.input_ids[prompt][lo:hi]],
                activations=z[lo:hi].tolist(), gene=example.gene if isinstance(example.gene, str) else None,
            ))
        out[(layer, feature)] = windows
    return out
