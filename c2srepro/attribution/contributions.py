"""Exact attribution of a target to every source node of the linearised replacement model.

A target reads the residual stream r_m at position t through a frozen layer norm (m = l' for a
transcoder feature of layer l', m = n_layers for a logit):

    pre = LN(r_m)[t] . w + b_w = r_m[t] . v + c,   v = sigma^-1[t] * C (g ⊙ w),   c = b . w + b_w

with w = f_enc^(l',j) (and b_w = b_enc^(l',j)) for a feature, w = W_U[token] (b_w = 0) for a logit,
g, b the layer norm's weight and bias, and C = I - 11^T/d its mean-centering (symmetric). ``c`` is the
target's *reading bias*.

1. Backward pass through the frozen model (a vector-Jacobian product, written out): let
   G_l = d pre / d r_l, a [pos, d_model] field. Then G_m = v at t (0 elsewhere) and, for l < m,
       G_l = G_{l+1} + Attn_l^T(G_{l+1}) + Skip_l^T(G_{l+1})        (residual + attention + skip)
       Attn_l^T(G)[s] = C (g1 ⊙ sigma^-1[s] sum_h W_V^h sum_t A^(l,h)[t,s] (W_O^h G[t]))
       Skip_l^T(G)[s] = C (g2 ⊙ sigma^-1[s] (W_skip G[s]))           (skip transcoders only)
   i.e. the transposed OV circuit of each head, carrying a destination position's gradient back to
   the source positions it attended to with the frozen pattern A, and the transposed skip path of a
   skip transcoder through the frozen LN2 (same position). The rest of the MLPs does not appear:
   features and error terms are the sources, not functions of r_l.
2. A source that writes vector u into r_{l+1} at position s contributes u . G_{l+1}[s]:
       feature (l, s, i):  z^(l,i)[s] * (f_dec^(l,i) . G_{l+1}[s])                      # eq. 5
   which, for a target at the same position with no attention in between, is exactly the paper's
   z^(l,i) (f_dec^(l,i) . f_enc^(l',j)) with the frozen layer norm applied to f_enc. Likewise
   error (l, s): e_l[s] . G_{l+1}[s]; bias (l, s): written_bias_l . G_{l+1}[s];
   embedding s: r_0[s] . G_0[s].
3. The model is affine in its sources, so reading bias + all contributions = pre exactly (up to
   float rounding); :meth:`Attribution.total` checks that. Many targets share one backward pass:
   G gets a leading target axis and each target is seeded when the pass reaches its read layer.

The frozen norms and attention are the architecture's (``rep.weights``: ``feature_reading``,
``logit_reading``, ``attention_transpose``, ``head_transpose``); GPT-NeoX's are written out above.
Gemma-2's norms are RMS norms (no centering C, no bias), its attention transpose passes the frozen
post-attention norm first, and its transcoder of layer l reads r_l + Attn_l(r_l): such a target is
seeded after the sources layer l writes into r_{l+1} and before layer l's attention (``_seed_step``).

Attention paths (:func:`head_contributions`): unrolling step 1 for a single target gives
G_{l+1} = G_m + sum_{j=l+1}^{m-1} Attn_j^T(G_{j+1}), so a source's contribution splits exactly into
its residual path (same position only: u . v) plus one term per head (j, h), the part that leaves
the source position first through head h of layer j (later hops through any heads or skip paths),
plus, for skip transcoders, one term per layer j for the part that leaves first through j's skip path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from c2srepro.attribution.linearised import LinearisedReplacement
from c2srepro.attribution.nodes import SOURCE_KINDS, Node

@dataclass(frozen=True)
class Attribution:
    """Contributions of every source node to one target; they sum (with the reading bias) to ``value``."""

    replacement: LinearisedReplacement
    target: Node
    value: float  # the target's pre-activation (feature) or logit, from the real forward pass
    reading_bias: float  # c: LN bias . w (+ b_enc) for a feature, final LN bias . W_U[token] for a logit
    embedding: Float[Tensor, "pos"]
    features: list[Float[Tensor, "active"]]  # aligned with replacement.active[layer]
    error: Float[Tensor, "layer pos"]
    bias: Float[Tensor, "layer pos"]

    def total(self) -> float:
        """reading bias + every contribution: equals ``value`` (the exactness of the decomposition)."""
        parts = [self.embedding.sum(), self.error.sum(), self.bias.sum()] + [f.sum() for f in self.features]
        return self.reading_bias + float(torch.stack(parts).sum())

    def contribution(self, node: Node) -> float:
        """The contribution of one source node (0 for a feature that does not fire)."""
        if node.kind == "embedding":
            return float(self.embedding[node.position])
        if node.kind == "error":
            return float(self.error[node.layer, node.position])
        if node.kind == "bias":
            return float(self.bias[node.layer, node.position])
        if node.kind == "feature":
            i = self.replacement.active_index(node)
            return 0.0 if i is None else float(self.features[node.layer][i])
        raise ValueError(f"a {node.kind} node is not a source")

    def top(self, k: int, *, kinds: Sequence[str] = ("feature", "error", "embedding")) -> list[tuple[Node, float]]:
        """The ``k`` nonzero contributions of largest magnitude among source nodes of ``kinds``."""
        unknown = set(kinds) - set(SOURCE_KINDS)
        if unknown:
            raise ValueError(f"unknown source kinds {sorted(unknown)}; choose from {SOURCE_KINDS}")
        candidates: list[tuple[Node, float]] = []

        def take(values: Tensor, to_node) -> None:
            flat = values.reshape(-1)
            magnitudes, order = flat.abs().topk(min(k, flat.numel()))
            candidates.extend((to_node(int(i)), float(flat[i])) for m, i in zip(magnitudes, order) if m > 0)

        n_pos = self.replacement.n_pos
        if "feature" in kinds:
            for layer, (values, act) in enumerate(zip(self.features, self.replacement.active)):
                take(values, lambda i, layer=layer, act=act: Node.feature(layer, act.position[i], act.feature[i]))
        if "error" in kinds:
            take(self.error, lambda i: Node.error(i // n_pos, i % n_pos))
        if "bias" in kinds:
            take(self.bias, lambda i: Node.bias(i // n_pos, i % n_pos))
        if "embedding" in kinds:
            take(self.embedding, Node.embedding)
        candidates.sort(key=lambda item: -abs(item[1]))
        return candidates[:k]


@dataclass(frozen=True)
class HeadPaths:
    """One source's contribution to one target, split by the first attention head (or skip path) it
    travels through."""

    residual: float  # the direct residual path (nonzero only if source and target share a position)
    heads: Float[Tensor, "layer head"]  # heads[j, h]: the part leaving the source first through head h of layer j
    skip: Float[Tensor, "layer"]  # skip[j]: the part leaving first through layer j's W_skip (0 without one)

    def total(self) -> float:
        return self.residual + float(self.heads.sum()) + float(self.skip.sum())


@dataclass(frozen=True)
class Reading:
    """What a target reads: sum_j r[positions[j]] . vectors[j] + constant, r the residual stream it
    reads at backward ``step`` (module docstring, first equation, summed over positions)."""

    positions: tuple[int, ...]
    vectors: Float[Tensor, "read d_model"]
    constant: float
    step: int

    @property
    def last_position(self) -> int:
        return max(self.positions)


def _read_layer(rep: LinearisedReplacement, target: Node) -> int:
    return rep.n_layers if target.kind == "logit" else target.layer


def _seed_step(rep: LinearisedReplacement, target: Node) -> int:
    """When the backward pass seeds ``target``: step 2m when it reads r_m, step 2m - 1 when it reads
    r_{m-1} + Attn_{m-1}(r_{m-1}) (a Gemma-2 transcoder of layer m - 1), between the sources layer
    m - 1 writes into r_m and that layer's attention."""
    layer = _read_layer(rep, target)
    return 2 * layer + 1 if target.kind == "feature" and rep.weights.mlp_reads_attention else 2 * layer


def _seed(grad: Tensor, readings: Sequence[Reading], steps: Tensor, step: int) -> Tensor:
    """Add each reading's vectors at their positions (G = v there) for the readings seeded at ``step``.

    ``grad`` holds only the readings seeded before ``step`` (a prefix: ``readings`` are ordered by
    step, latest first) over the positions they read up to; it is first grown, with zeros, to the
    readings seeded by ``step`` and their positions. Rows that are not seeded yet and positions
    after every seeded reading's last one hold zeros, so leaving them out changes no result while
    the pass costs what the readings seeded so far need, not what the whole batch does."""
    seeded = int((steps >= step).sum())
    if seeded > grad.shape[0]:
        n_pos = max(r.last_position for r in readings[:seeded]) + 1
        grad = torch.nn.functional.pad(grad, (0, 0, 0, n_pos - grad.shape[1], 0, seeded - grad.shape[0]))
    for i in (steps == step).nonzero().flatten().tolist():
        for position, vector in zip(readings[i].positions, readings[i].vectors):
            grad[i, position] += vector
    return grad


def node_reading(rep: LinearisedReplacement, target: Node) -> Reading:
    """The reading of a feature's pre-activation or of one token's raw logit (module docstring, first
    equation), from the architecture's frozen norms (``rep.weights.feature_reading`` / ``logit_reading``)."""
    if target.kind == "logit":
        v, c = rep.weights.logit_reading(rep.run, target.position, target.index)
    else:
        tc = rep.transcoders[target.layer]
        v, c = rep.weights.feature_reading(rep.run, target.layer, target.position, tc.W_enc[:, target.index])
        c += float(tc.b_enc[target.index])
    return Reading((target.position,), v[None], c, _seed_step(rep, target))


def _attention_transpose(
    rep: LinearisedReplacement, layer: int, grad: Float[Tensor, "target pos d_model"]
) -> Float[Tensor, "target pos d_model"]:
    """Attn_l^T(G): the gradient the frozen attention of ``layer`` carries back to its source positions."""
    return rep.weights.attention_transpose(rep.run, layer, grad)


def _skip_transpose(
    rep: LinearisedReplacement, layer: int, grad: Float[Tensor, "target pos d_model"]
) -> Float[Tensor, "target pos d_model"] | None:
    """Skip_l^T(G): the gradient a skip transcoder's W_skip path carries back to the residual its MLP
    reads, through that MLP input's frozen norm (None: no skip path)."""
    w_skip = rep.transcoders[layer].W_skip
    if w_skip is None:
        return None
    return rep.weights.mlp_input_transpose(rep.run, layer, grad @ w_skip.T)


def _layer_transpose(
    rep: LinearisedReplacement,
    layer: int,
    grad: Float[Tensor, "target pos d_model"],
    seed_mlp_input: Callable[[Tensor], Tensor],
) -> Float[Tensor, "target pos d_model"]:
    """G_{m-1} from G_m: back through ``layer``'s linear paths (skip, attention; step 1).
    ``seed_mlp_input`` returns the gradient with the targets added that read the residual this
    layer's MLP reads (r + Attn(r) where ``mlp_reads_attention``, Gemma-2; else r itself, seeded
    with the rest), grown to their rows and positions (``_seed``)."""
    skip = _skip_transpose(rep, layer, grad)
    if skip is not None and rep.weights.mlp_reads_attention:
        grad, skip = grad + skip, None  # the skip path reads r + Attn(r): it passes attention too
    grad = seed_mlp_input(grad)
    carried = grad + _attention_transpose(rep, layer, grad)
    if skip is None:
        return carried
    grown = (0, 0, 0, grad.shape[1] - skip.shape[1], 0, grad.shape[0] - skip.shape[0])
    return carried + torch.nn.functional.pad(skip, grown)


def residual_gradients(
    rep: LinearisedReplacement, readings: Sequence[Reading]
) -> Iterator[tuple[int | None, Float[Tensor, "target pos d_model"]]]:
    """The shared backward pass of ``readings`` (steps 1-3 of the module docstring), top layer first.

    Yields (layer, G_{layer+1}) for each layer from the last one the readings read down to layer 0,
    the gradient the sources that layer writes into r_{layer+1} are read by; then (None, G_0), read by
    the token embeddings. Each reading's vectors are seeded at its positions at the step it reads the
    residual stream. ``readings`` must be ordered by step, latest first (:func:`by_step`): a yielded
    G covers only the readings seeded so far, ``readings[:len(G)]`` (the others are still 0), and
    the positions up to the last one they read (nothing after it contributes), ``G.shape[1]``.
    """
    steps = torch.tensor([r.step for r in readings])
    if bool((steps[1:] > steps[:-1]).any()):
        raise ValueError("residual_gradients needs the readings ordered by step, latest first (by_step)")
    grad = rep.weights.embed.new_zeros(0, 0, rep.weights.d_model)
    for m in range((int(steps.max()) + 1) // 2, 0, -1):  # grad holds G_m = d value / d r_m
        grad = _seed(grad, readings, steps, 2 * m)
        yield m - 1, grad  # sources written by layer m - 1 land in r_m
        # G_{m-1} = G_m + (Attn^T + Skip^T)(G_m), seeding the targets that read r_m less this layer's sources
        grad = _layer_transpose(rep, m - 1, grad, lambda g: _seed(g, readings, steps, 2 * m - 1))
    yield None, _seed(grad, readings, steps, 0)


def by_step(readings: Sequence[Reading]) -> list[int]:
    """The order :func:`residual_gradients` needs: latest step first, then the given order."""
    return sorted(range(len(readings)), key=lambda i: -readings[i].step)


def _feature_contributions(
    rep: LinearisedReplacement, layer: int, grad: Float[Tensor, "target pos d_model"]
) -> Float[Tensor, "target active"]:
    """z^(l,i)[s] * (f_dec^(l,i) . G_{l+1}[s]) for every active feature of ``layer`` (eq. 5)."""
    act = rep.active[layer]
    n_pos = grad.shape[1]
    # f_dec . G for every feature and position as one dense matmul: on CPU this is much faster
    # than gathering the decoder row of each active (position, feature) pair.
    projected = grad @ rep.transcoders[layer].W_dec.T  # [target, pos, d_tc]
    out = grad.new_zeros(grad.shape[0], len(act))
    visible = act.position < n_pos  # features after every target contribute 0
    out[:, visible] = act.activation[visible] * projected[:, act.position[visible], act.feature[visible]]
    return out


@torch.no_grad()
def attribute_many(rep: LinearisedReplacement, targets: Sequence[Node]) -> list[Attribution]:
    """Attributions of several targets with one shared backward pass (steps 1-3 of the module docstring)."""
    if not targets:
        return []
    for target in targets:
        rep.check_target(target)
    n_targets, n_layers = len(targets), rep.n_layers
    readings = [node_reading(rep, t) for t in targets]
    order = by_step(readings)  # the order residual_gradients needs; undone on return
    targets, readings = [targets[i] for i in order], [readings[i] for i in order]
    error = rep.weights.embed.new_zeros(n_targets, n_layers, rep.n_pos)
    bias = error.new_zeros(n_targets, n_layers, rep.n_pos)
    embedding = error.new_zeros(n_targets, rep.n_pos)
    features = [error.new_zeros(n_targets, len(a)) for a in rep.active]
    for layer, grad in residual_gradients(rep, readings):
        n, n_pos = grad.shape[:2]  # the targets seeded so far, the positions they read up to
        if layer is None:
            embedding[:n, :n_pos] = torch.einsum("ntd,td->nt", grad, rep.weights.embed[rep.input_ids[:n_pos]])
            continue
        features[layer][:n] = _feature_contributions(rep, layer, grad)
        error[:n, layer, :n_pos] = torch.einsum("ntd,td->nt", grad, rep.errors[layer, :n_pos])
        bias[:n, layer, :n_pos] = grad @ rep.written_bias[layer]
    attributions = [
        Attribution(
            replacement=rep,
            target=target,
            value=rep.value(target),
            reading_bias=readings[i].constant,
            embedding=embedding[i],
            features=[f[i] for f in features],
            error=error[i],
            bias=bias[i],
        )
        for i, target in enumerate(targets)
    ]
    back = {i: k for k, i in enumerate(order)}
    return [attributions[back[i]] for i in range(n_targets)]


def attribute(rep: LinearisedReplacement, target: Node) -> Attribution:
    """Contributions of every source node to ``target`` (an active feature or a logit)."""
    return attribute_many(rep, [target])[0]


def _source_vector(rep: LinearisedReplacement, source: Node) -> Float[Tensor, "d_model"]:
    """The vector u a source writes into the residual stream."""
    if source.kind == "embedding":
        return rep.weights.embed[rep.input_ids[source.position]]
    if source.kind == "error":
        return rep.errors[source.layer, source.position]
    if source.kind == "bias":
        return rep.written_bias[source.layer]
    if source.kind == "feature":
        i = rep.active_index(source)
        if i is None:
            raise ValueError(f"source feature {source.id} does not fire on this prompt: it contributes nothing")
        return rep.active[source.layer].activation[i] * rep.transcoders[source.layer].W_dec[source.index]
    raise ValueError(f"a {source.kind} node is not a source")


@torch.no_grad()
def head_contributions(rep: LinearisedReplacement, source: Node, target: Node) -> HeadPaths:
    """Split one edge (source -> target) into its residual path and its first-hop attention heads."""
    rep.check_target(target)
    if source.kind != "embedding":
        rep.check_layer(source.layer)
    rep.check_position(source.position)
    u = _source_vector(rep, source)
    v = node_reading(rep, target).vectors[0]
    m, s = _read_layer(rep, target), source.position
    heads = u.new_zeros(rep.n_layers, rep.weights.n_heads)
    skip = u.new_zeros(rep.n_layers)
    if source.layer >= m or s > target.position:
        return HeadPaths(residual=0.0, heads=heads, skip=skip)  # the source cannot reach the target
    n_pos = target.position + 1
    grad = u.new_zeros(1, n_pos, rep.weights.d_model)
    grad[0, target.position] = v
    first = (_seed_step(rep, target) + 1) // 2 - 1  # the last attention before the target reads
    for j in range(first, source.layer, -1):  # grad holds G_{j+1} (or the gradient at r_mid of layer j)
        # Per head, Attn_{j,h}^T(G)[s] (the transposed OV circuit, evaluated at the source position only).
        through_skip = _skip_transpose(rep, j, grad)
        mid = grad
        if through_skip is not None:
            skip[j] = through_skip[0, s] @ u
            if rep.weights.mlp_reads_attention:  # Gemma-2: attention's output passes the skip path too
                mid = grad + through_skip
        heads[j] = rep.weights.head_transpose(rep.run, j, mid[0], s) @ u
        grad = _layer_transpose(rep, j, grad, lambda g: g)
    return HeadPaths(residual=float(u @ v) if s == target.position else 0.0, heads=heads, skip=skip)
