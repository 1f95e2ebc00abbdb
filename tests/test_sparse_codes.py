"""The TopK variants' sparse training path against dense products and torch.topk."""

import pytest
import torch

from c2srepro.transcoder import TrainConfig
from c2srepro.transcoder.sparse_codes import SparseCodes, token_sums, top_k
from c2srepro.transcoder.train import StackedTranscoders


@pytest.mark.parametrize("shape, k, block", [((3, 5, 256), 7, 8), ((2, 4096), 300, 8), ((4, 64), 5, 8), ((6, 40), 3, 8)])
def test_top_k_by_blocks_keeps_the_values_of_torch_topk(shape, k, block):
    # (4, 64) with k 5 and (6, 40) (not a multiple of the block) take torch.topk itself.
    torch.manual_seed(0)
    x = torch.randn(*shape)
    values, index = top_k(x, k, block=block)
    torch.testing.assert_close(values.sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values, rtol=0, atol=0)
    assert torch.equal(x.gather(-1, index), values)
    assert index.sort(-1).values.diff(dim=-1).gt(0).all()  # no position twice


def test_top_k_by_blocks_with_ties_and_minus_infinity_keeps_the_right_values():
    # AuxK masks live features with -inf, and quantised activations tie.
    torch.manual_seed(1)
    x = torch.randint(0, 4, (5, 512)).float()
    x[:, ::3] = -torch.inf
    values, index = top_k(x, 20)
    torch.testing.assert_close(values.sort(-1).values, x.topk(20, dim=-1).values.sort(-1).values, rtol=0, atol=0)
    assert torch.equal(x.gather(-1, index), values)
    assert index.sort(-1).values.diff(dim=-1).gt(0).all()


def test_token_sums_equal_sum_over_the_batch():
    x = torch.randn(3, 17, 9, dtype=torch.float64)
    torch.testing.assert_close(token_sums(x), x.sum(1))


def _dense(codes: SparseCodes, values: torch.Tensor) -> torch.Tensor:
    z = torch.zeros(codes.shape, dtype=values.dtype).index_put_((codes.rows, codes.cols), values, accumulate=True)
    n, b, f = codes.n_layers, codes.batch, codes.d_tc
    return torch.stack([z[i * b:(i + 1) * b, i * f:(i + 1) * f] for i in range(n)])


@pytest.mark.parametrize("kind", ["per_token", "per_batch"])
def test_sparse_products_equal_the_dense_ones(kind):
    torch.manual_seed(0)
    n, batch, d_tc, d, k = 3, 11, 40, 6, 4
    pre = torch.randn(n, batch, d_tc, dtype=torch.float64)
    if kind == "per_token":
        values, index = pre.topk(k, dim=-1)
        codes = SparseCodes.per_token(values, index, d_tc=d_tc)
        kept = torch.zeros_like(pre).scatter_(-1, index, 1.0)
    else:
        values, index = pre.view(n, -1).topk(k * batch, dim=-1)
        codes = SparseCodes.per_batch(values, index, batch=batch, d_tc=d_tc)
        kept = torch.zeros_like(pre).view(n, -1).scatter_(1, index, 1.0).view_as(pre)
    z = _dense(codes, codes.values)
    torch.testing.assert_close(z, pre * kept)  # the right entries, in the right places
    assert codes.rows.diff().ge(0).all()  # row-major, as CSR needs
    w, g, x = (torch.randn(n, d_tc, d, dtype=torch.float64), torch.randn(n, batch, d, dtype=torch.float64),
               torch.randn(n, batch, d, dtype=torch.float64))
    torch.testing.assert_close(codes.decode(w), torch.bmm(z, w))
    torch.testing.assert_close(codes.decode_grad(g, out=torch.empty_like(w)), torch.bmm(z.transpose(1, 2), g))
    dense_dz = torch.bmm(g, w.transpose(1, 2))
    torch.testing.assert_close(_dense(codes, codes.sampled(g, w)), dense_dz * kept)
    v = torch.randn(len(codes.values), dtype=torch.float64)
    torch.testing.assert_close(codes.encode_grad(v, x).transpose(1, 2), torch.bmm(x.transpose(1, 2), _dense(codes, v)))
    torch.testing.assert_close(codes.feature_sums(v), _dense(codes, v).sum(1))


@pytest.mark.parametrize("batch", [30, 6])
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_path_at_a_width_that_takes_the_block_top_k_equals_autograd(activation, batch):
    # test_variants' check runs at d_tc 32, where top_k falls back to torch.topk; here the
    # blocks are used (256 / 8 = 32 blocks >= 2 k), with AuxK on. A batch of 6 < d_model / 2
    # takes the dense product for dL/dW_enc, 30 the sparse one.
    torch.manual_seed(0)
    tcfg = TrainConfig(activation=activation, k=6, aux_k=5, aux_k_coefficient=0.5)
    stack = StackedTranscoders(2, d_model=16, d_transcoder=256, train_config=tcfg).double()
    with torch.no_grad():
        stack.b_enc.normal_(0, 0.3)
        stack.b_dec.normal_()
    x, y = torch.randn(2, batch, 16, dtype=torch.float64), torch.randn(2, batch, 16, dtype=torch.float64)
    dead = torch.rand(2, 256) < 0.3
    threshold = None if stack.threshold is None else stack.threshold.detach().clone()
    fast = stack.loss_and_grads(x, y, 0.0, dead=dead)
    fast_grads = {name: p.grad.clone() for name, p in stack.named_parameters() if p.requires_grad}
    if threshold is not None:
        with torch.no_grad():
            stack.threshold.copy_(threshold)
    general = stack.general_loss_and_grads(x, y, 0.0, dead=dead)
    for name, p in stack.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    for key in ("loss", "mse", "l1", "counts", "error"):
        torch.testing.assert_close(fast[key], general[key], rtol=1e-10, atol=1e-13, msg=key)
