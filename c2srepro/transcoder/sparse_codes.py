"""The active entries of every layer's codes as one sparse matrix, for the TopK variants' training.

A TopK transcoder keeps k of its d_tc features per token, so three of the five dense products of
a training step (z W_dec, z^T dL/dy_hat and x^T dL/dpre) and the gathering of dL/dz touch
mostly zeros. Here the kept entries of all layers form one block-diagonal matrix
Z of shape [L B, L d_tc] (row l B + b is token b of layer l, column l d_tc + f feature f of
layer l), held in CSR both as itself and as its transpose, and the products become sparse ones:

1. ``decode(W)``:          Z W              ([L B, d]: y_hat' before biases, eq. 2)
2. ``decode_grad(g)``:     Z^T g            ([L d_tc, d]: dL/dW_dec)
3. ``sampled(g, W)``:      (g W^T)[Z != 0]  (dL/dz at the kept entries only)
4. ``encode_grad(v, x)``:  V^T x            ([L d_tc, d]: dL/dW_enc transposed, V = Z's pattern
                                            holding the values ``v``)
5. ``feature_sums(v)``:    sum over tokens of ``v`` per feature ([L, d_tc]: dL/db_enc, counts)

Because Z is block-diagonal, a product with the stacked [L B, d] or [L d_tc, d] operands never
mixes layers. On CPU each costs about k / d_tc of the dense product (measured in
``bench/bench_transcoder.py``).
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # The rows and columns are built sorted and in range here, so torch's invariant checks (a
    # pass over them per matrix) are left off; CSR support is "beta" in torch, but the products
    # used here are its stable ones.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def top_k(x: Float[Tensor, "... n"], k: int, *, block: int = 8) -> tuple[Float[Tensor, "... k"], Int[Tensor, "... k"]]:
    """The ``k`` largest entries along the last axis (unsorted), as ``torch.topk``, by blocks.

    1. Split the axis into ``n / block`` blocks of ``block`` entries, block j holding entries
       j, j + n / block, ... (so that its maximum is an elementwise max of contiguous rows), and
       take each block's maximum.
    2. Keep the ``k`` blocks with the largest maxima: the j-th largest entry's block is among
       them, since fewer than j blocks can hold an entry larger than it.
    3. Select the ``k`` largest of those ``k * block`` candidates.
    On CPU, ``torch.topk`` costs ~7 ns an entry; this reads every entry once and sorts about a
    third as many (1.6x faster for TopK's rows, 2.4x for BatchTopK's [L, B d_tc] at the mini
    shape). The values are those of ``torch.topk``; among equal values the positions kept may differ.
    """
    n = x.shape[-1]
    if n % block or n // block < 2 * k:
        return x.topk(k, dim=-1, sorted=False)
    n_blocks = n // block
    strided = x.unflatten(-1, (block, n_blocks))  # [..., block, n_blocks]: column j is block j
    _, best = strided.amax(-2).topk(k, dim=-1, sorted=False)  # [..., k] block numbers
    candidates = strided.gather(-1, best.unsqueeze(-2).expand(*best.shape[:-1], block, k)).flatten(-2)
    values, position = candidates.topk(k, dim=-1, sorted=False)  # position = row * k + kept block
    return values, (position // k).mul_(n_blocks).add_(best.gather(-1, position % k))


def token_sums(t: Float[Tensor, "layer batch n"]) -> Float[Tensor, "layer n"]:
    """Per layer, the sum over the batch axis: as a product with ones, ~5x faster than
    ``sum(1)`` on CPU, whose reduction runs along the strided axis."""
    ones = t.new_ones(t.shape[0], 1, t.shape[1])
    return torch.bmm(ones, t).squeeze(1)


def _stable_order(keys: Int[Tensor, " nnz"]) -> Int[Tensor, " nnz"]:
    """``argsort(keys, stable=True)``, on int32 keys where they fit (torch's CPU radix sort is
    about twice as fast on them as on int64)."""
    narrow = keys.numel() and int(keys.max()) < torch.iinfo(torch.int32).max
    return torch.argsort(keys.int() if narrow else keys, stable=True)


def _row_pointers(rows: Int[Tensor, " nnz"], n_rows: int) -> Int[Tensor, " n_rows_plus_1"]:
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class SparseCodes:
    """The kept entries of ``n_layers`` layers' [batch, d_tc] codes: token rows ``l B + b``,
    feature columns ``l d_tc + f``, in row-major order (columns ascending within a row)."""

    def __init__(
        self, rows: Int[Tensor, " nnz"], cols: Int[Tensor, " nnz"], values: Float[Tensor, " nnz"],
        *, n_layers: int, batch: int, d_tc: int,
    ):
        self.rows, self.cols, self.values = rows, cols, values
        self.n_layers, self.batch, self.d_tc = n_layers, batch, d_tc
        self.shape = (n_layers * batch, n_layers * d_tc)
        self._crow = _row_pointers(rows, self.shape[0])
        order = _stable_order(cols)  # stable: each column's rows stay ascending
        self._t_order, self._t_rows = order, rows[order]
        self._t_crow = _row_pointers(cols, self.shape[1])

    @classmethod
    def per_token(
        cls, values: Float[Tensor, "layer batch k"], index: Int[Tensor, "layer batch k"], *, d_tc: int
    ) -> "SparseCodes":
        """TopK's codes: ``k`` entries per token, at features ``index`` (any order within a token)."""
        n, batch, _ = values.shape
        token = torch.arange(n * batch, device=index.device).view(n, batch, 1)
        return cls._from_positions(values, token * d_tc + index, n_layers=n, batch=batch, d_tc=d_tc)

    @classmethod
    def per_batch(
        cls, values: Float[Tensor, "layer kept"], flat_index: Int[Tensor, "layer kept"], *, batch: int, d_tc: int
    ) -> "SparseCodes":
        """BatchTopK's codes: per layer, entries anywhere in the flattened [batch d_tc] codes."""
        n = values.shape[0]
        layer = torch.arange(n, device=flat_index.device)[:, None]
        return cls._from_positions(values, layer * (batch * d_tc) + flat_index, n_layers=n, batch=batch, d_tc=d_tc)

    @classmethod
    def _from_positions(cls, values: Tensor, position: Tensor, *, n_layers: int, batch: int, d_tc: int) -> "SparseCodes":
        """From each entry's position in the flattened [L, B, d_tc] codes, in any order."""
        order = _stable_order(position.reshape(-1))
        position = position.reshape(-1)[order]
        rows = position // d_tc
        cols = (position % d_tc).add_((rows // batch) * d_tc)
        return cls(rows, cols, values.reshape(-1)[order], n_layers=n_layers, batch=batch, d_tc=d_tc)

    def matrix(self, values: Float[Tensor, " nnz"] | None = None) -> Tensor:
        """Z (or Z's pattern holding ``values``) as a [L B, L d_tc] CSR matrix."""
        return _csr(self._crow, self.cols, self.values if values is None else values, self.shape)

    def transposed(self, values: Float[Tensor, " nnz"] | None = None) -> Tensor:
        """Z^T (or the pattern's transpose holding ``values``) as a [L d_tc, L B] CSR matrix."""
        values = self.values if values is None else values
        return _csr(self._t_crow, self._t_rows, values[self._t_order], (self.shape[1], self.shape[0]))

    def decode(self, weight: Float[Tensor, "layer d_tc d"]) -> Float[Tensor, "layer batch d"]:
        """Step 1: Z W, each token's kept features times their rows of ``weight``."""
        d = weight.shape[-1]
        return (self.matrix() @ weight.reshape(-1, d)).view(self.n_layers, self.batch, d)

    def decode_grad(
        self, grad: Float[Tensor, "layer batch d"], *, out: Tensor, accumulate: bool = False
    ) -> Float[Tensor, "layer d_tc d"]:
        """Step 2: Z^T g, written into ``out`` (a gradient buffer reused across steps), or added
        to it with ``accumulate``."""
        d = grad.shape[-1]
        flat = out.view(-1, d)
        torch.addmm(flat, self.transposed(), grad.reshape(-1, d), beta=1 if accumulate else 0, out=flat)
        return out

    def sampled(self, grad: Float[Tensor, "layer batch d"], weight: Float[Tensor, "layer d_tc d"]) -> Float[Tensor, " nnz"]:
        """Step 3: g W^T at the kept entries only, in their order."""
        d = grad.shape[-1]
        pattern = self.matrix()
        return torch.sparse.sampled_addmm(pattern, grad.reshape(-1, d), weight.reshape(-1, d).t(), beta=0.0).values()

    def encode_grad(
        self, values: Float[Tensor, " nnz"], x: Float[Tensor, "layer batch d"]
    ) -> Float[Tensor, "layer d_tc d"]:
        """Step 4: V^T x for the pattern holding ``values``, i.e. dL/dW_enc with its last two axes swapped."""
        d = x.shape[-1]
        return (self.transposed(values) @ x.reshape(-1, d)).view(self.n_layers, self.d_tc, d)

    def add_to_dense(self, dense: Float[Tensor, "layer batch d_tc"], values: Float[Tensor, " nnz"]) -> None:
        """Adds ``values`` at the kept entries' places in ``dense`` (in place)."""
        positions = self.rows * self.d_tc + self.cols % self.d_tc  # flat index into [L, B, d_tc]
        dense.view(-1).index_add_(0, positions, values)

    def feature_sums(self, values: Float[Tensor, " nnz"]) -> Float[Tensor, "layer d_tc"]:
        """Step 5: per layer and feature, the sum of ``values`` over the tokens."""
        sums = values.new_zeros(self.shape[1]).index_add_(0, self.cols, values)
        return sums.view(self.n_layers, self.d_tc)

    def layer_sums(self, values: Float[Tensor, " nnz"]) -> Float[Tensor, " layer"]:
        """Per layer, the sum of ``values`` over its tokens and features."""
        return self.feature_sums(values).sum(-1)
