"""Transcoder variants (TopK, BatchTopK, JumpReLU, skip): forward, gradients, training, files, attribution."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from _tiny_neox import tiny_setup
from safetensors.torch import load_file, save_file

from c2srepro.attribution import Node, build_replacement
from c2srepro.attribution.contributions import attribute, head_contributions
from c2srepro.attribution.linearised import replacement_forward
from c2srepro.attribution.full_graph import build_graph
from c2srepro.transcoder import TensorActivations, TrainConfig, Transcoder, TranscoderConfig, train_transcoders
from c2srepro.transcoder.model import activate
from c2srepro.transcoder.train import StackedTranscoders, _JumpReLU, _Step

VARIANTS = ("relu", "topk", "batchtopk", "jumprelu")


def direct_activation(pre, activation, *, k=None, threshold=None):
    """eq. 1 of each variant written element by element (an independent reference)."""
    out = torch.zeros_like(pre)
    for row in range(pre.shape[0]):
        if activation == "topk":
            kept = sorted(range(pre.shape[1]), key=lambda i: -float(pre[row, i]))[:k]
        for i in range(pre.shape[1]):
            value = float(pre[row, i])
            if activation == "relu":
                out[row, i] = max(value, 0.0)
            elif activation == "topk":
                out[row, i] = max(value, 0.0) if i in kept else 0.0
            else:
                out[row, i] = value if value > float(threshold[i]) else 0.0
    return out


@pytest.mark.parametrize("activation", VARIANTS)
def test_activation_matches_a_direct_formula(activation):
    generator = torch.Generator().manual_seed(0)
    pre = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    threshold = torch.rand(20, generator=generator, dtype=torch.float64)
    k = 4 if activation == "topk" else None
    got = activate(pre, activation=activation, k=k, threshold=threshold)
    torch.testing.assert_close(got, direct_activation(pre, activation, k=k, threshold=threshold), rtol=0, atol=0)
    if activation == "topk":
        assert bool(((got > 0).sum(-1) <= 4).all()) and bool(((got > 0).sum(-1) >= 1).all())


def test_jumprelu_straight_through_gradients_match_their_formulas():
    # Rajamanoharan et al. (2024): dz/dtheta = -(theta/eps) K((pre-theta)/eps), dH/dtheta = -(1/eps) K(.)
    eps = 0.5
    pre = torch.tensor([[0.1, 0.9, 1.2, -0.3], [0.75, 1.0, 0.2, 0.6]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([[0.3, 1.0, 1.0, 0.2]], dtype=torch.float64, requires_grad=True)
    grad_out = torch.tensor([[1.0, 2.0, -1.0, 0.5], [3.0, 1.5, 2.0, -2.0]], dtype=torch.float64)
    z = _JumpReLU.apply(pre, theta, eps)
    torch.testing.assert_close(z.detach(), pre.detach() * (pre.detach() > theta.detach()))
    g_pre, g_theta = torch.autograd.grad(z, [pre, theta], grad_out)
    kernel = ((pre.detach() - theta.detach()).abs() < eps / 2).double() / eps
    torch.testing.assert_close(g_pre, grad_out * (pre.detach() > theta.detach()))
    torch.testing.assert_close(g_theta, (-theta.detach() * kernel * grad_out).sum(0, keepdim=True))
    step = _Step.apply(pre, theta, eps)
    (g_theta_step,) = torch.autograd.grad(step, [theta], grad_out)
    torch.testing.assert_close(g_theta_step, (-kernel * grad_out).sum(0, keepdim=True))
    assert torch.autograd.grad(_Step.apply(pre, theta, eps).sum(), [pre], allow_unused=True)[0] is None


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation", VARIANTS)
def test_hand_written_gradients_equal_autograd_for_every_variant(activation, skip):
    # Training runs the hand-written loss_and_grads; the autograd statement of the same loss
    # (general_loss_and_grads) must give its loss terms, gradients and BatchTopK threshold.
    torch.manual_seed(0)
    tcfg = TrainConfig(activation=activation, skip=skip, k=5, aux_k=4, aux_k_coefficient=0.5, jumprelu_bandwidth=0.4)
    stack = StackedTranscoders(2, d_model=8, d_transcoder=32, train_config=tcfg).double()
    with torch.no_grad():
        stack.b_enc.normal_(0, 0.3)
        stack.b_dec.normal_()
        if skip:
            stack.W_skip.normal_(0, 0.3)
        if activation == "jumprelu":  # thresholds among the pre-activations, so the kernel sees some
            stack.log_threshold.copy_(torch.empty(2, 32, dtype=torch.float64).uniform_(0.05, 0.6).log())
    x, y = torch.randn(2, 40, 8, dtype=torch.float64), torch.randn(2, 40, 8, dtype=torch.float64)
    dead = torch.rand(2, 32) < 0.3 if activation in ("topk", "batchtopk") else None
    threshold = None if stack.threshold is None else stack.threshold.detach().clone()
    fast = stack.loss_and_grads(x, y, 0.05, dead=dead)
    fast_grads = {name: p.grad.clone() for name, p in stack.named_parameters() if p.requires_grad}
    fast_threshold = None if threshold is None else stack.threshold.detach().clone()
    if threshold is not None:
        with torch.no_grad():
            stack.threshold.copy_(threshold)
    general = stack.general_loss_and_grads(x, y, 0.05, dead=dead)
    assert set(fast_grads) == {name for name, p in stack.named_parameters() if p.grad is not None}
    for name, p in stack.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast_grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    for key in ("loss", "mse", "l1", "sq_error", "error", "counts"):
        torch.testing.assert_close(fast[key], general[key], rtol=1e-10, atol=1e-13, msg=key)
    if threshold is not None:
        torch.testing.assert_close(fast_threshold, stack.threshold.detach(), rtol=0, atol=0)
    if activation == "jumprelu":
        assert bool((stack.log_threshold.grad != 0).any())  # the kernel was exercised


def test_aux_k_loss_revives_only_dead_features():
    torch.manual_seed(0)
    tcfg = TrainConfig(activation="topk", k=2, aux_k=3, aux_k_coefficient=0.5)
    stack = StackedTranscoders(1, d_model=8, d_transcoder=16, train_config=tcfg).double()
    x, y = torch.randn(1, 30, 8, dtype=torch.float64), torch.randn(1, 30, 8, dtype=torch.float64)
    dead = torch.zeros(1, 16, dtype=torch.bool)
    dead[0, [3, 7, 11, 12]] = True
    without = stack.general_loss_and_grads(x, y, 0.0)
    grad_without = stack.W_enc.grad.clone()
    with_aux = stack.general_loss_and_grads(x, y, 0.0, dead=dead)
    # Reference: AuxK written out (Gao et al. 2024), the 3 largest dead pre-activations per token.
    pre = x[0] @ stack.W_enc[0].detach() + stack.b_enc[0].detach()
    masked = pre.masked_fill(~dead[0], -torch.inf)
    values, index = masked.topk(3, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
    residual = -without["error"][0]
    aux = ((z_aux @ stack.W_dec[0].detach() - residual) ** 2).sum(-1).mean() / 8
    torch.testing.assert_close(with_aux["loss"] - without["loss"], 0.5 * aux.reshape(1))
    changed = (stack.W_enc.grad - grad_without).abs().sum(1)[0] > 0
    assert set(changed.nonzero().flatten().tolist()) <= {3, 7, 11, 12} and bool(changed.any())


def _source(seed=0, n=3000, d=12):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=generator)
    w = torch.randn(2, d, d, generator=generator) / 3
    y = torch.relu(torch.bmm(x, w)) @ torch.randn(d, d, generator=generator) / 3 + 0.3 * torch.bmm(x, w)
    return TensorActivations(x, y), x, y


def _tcfg(activation, skip, **extra):
    return TrainConfig(
        activation=activation, skip=skip, k=3, expansion_factor=4, lr=1e-3, tokens_per_batch=128,
        buffer_tokens=1024, dead_window_tokens=640, resample_every_steps=0, log_every_steps=10, **extra,
    )


@pytest.mark.parametrize("activation", VARIANTS)
def test_each_variant_trains_exports_in_raw_units_and_records_its_architecture(activation, tmp_path):
    source, x, y = _source()
    result = train_transcoders(source, _tcfg(activation, True), steps=60, output_dir=tmp_path / "out", progress=False)
    tc = result.transcoders[1]
    assert tc.cfg.activation == activation and tc.cfg.skip and tc.W_skip is not None
    assert tc.cfg.k == (3 if activation in ("topk", "batchtopk") else None)
    assert float(tc.W_skip.detach().abs().sum()) > 0  # the skip path learned something
    with torch.no_grad():
        y_hat, z = tc.forward_with_activations(x[1])
        fvu = float(((y_hat - y[1]) ** 2).sum() / ((y[1] - y[1].mean(0)) ** 2).sum())
    assert fvu < 0.8  # far better than predicting the mean
    l0 = float((z > 0).sum(-1).double().mean())
    if activation == "topk":
        assert float((z > 0).sum(-1).max()) <= 3
    if activation == "batchtopk":
        assert float(tc.threshold.detach().min()) > 0 and tc.threshold.unique().numel() == 1  # one estimated threshold
        assert 1.0 < l0 < 9.0  # the inference threshold keeps about k per token
    if activation == "jumprelu":
        assert float(tc.threshold.detach().min()) > 0
    loaded = Transcoder.load(tmp_path / "out" / "layer_01")
    assert loaded.cfg == tc.cfg and loaded.train_config == result.train_config
    for name, p in tc.named_parameters():
        assert torch.equal(p, getattr(loaded, name)), name
    assert torch.equal(loaded(x[1]), tc(x[1]))


@pytest.mark.parametrize("activation", VARIANTS)
def test_export_folds_the_scales_into_every_weight(activation):
    # Raw transcoder on x = s_out x (training-space transcoder on x / s_in), thresholds included.
    from c2srepro.transcoder.train import _Trainer

    _, x, y = _source()
    trainer = _Trainer(_tcfg(activation, True), (0, 1), d_model=12, device=torch.device("cpu"))
    trainer.initialise(x, y)
    stack = trainer.stack
    with torch.no_grad():
        stack.W_skip.normal_(0, 0.1)
        stack.b_enc.normal_(0, 0.1)
        for name in ("log_threshold", "threshold"):
            if getattr(stack, name) is not None:
                getattr(stack, name).copy_(torch.rand_like(getattr(stack, name)) * 0.1 + (-3.0 if name == "log_threshold" else 0.0))
    tc = trainer.export()[1]
    s_in, s_out = float(trainer.scale_in[1]), float(trainer.scale_out[1])
    with torch.no_grad():
        x1 = x[1, :200] / s_in
        pre = x1 @ stack.W_enc[1] + stack.b_enc[1]
        theta = None
        if stack.log_threshold is not None:
            theta = stack.log_threshold[1].exp()
        elif stack.threshold is not None:
            theta = stack.threshold[1]
        z = activate(pre, activation=activation, k=3 if activation == "topk" else None, threshold=theta)
        expected = (z @ stack.W_dec[1] + stack.b_dec[1] + x1 @ stack.W_skip[1]) * s_out
        torch.testing.assert_close(tc(x[1, :200]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["batchtopk", "jumprelu", "topk"])
def test_resume_is_bit_identical_for_variants_with_skip(activation, tmp_path):
    source, _, _ = _source(seed=1, n=1500)
    tcfg = _tcfg(activation, True, checkpoint_every_steps=4)
    straight = train_transcoders(source, tcfg, steps=12, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_transcoders(source, tcfg, steps=12, checkpoint_dir=tmp_path, max_steps=5, progress=False)
    resumed = train_transcoders(source, tcfg, steps=12, checkpoint_dir=tmp_path, progress=False)
    for layer, tc in straight.transcoders.items():
        for name, p in tc.named_parameters():
            assert torch.equal(p, getattr(resumed.transcoders[layer], name)), (layer, name)


def test_bad_variant_settings_are_refused_clearly():
    base = dict(d_model=8, d_transcoder=16, layer=0)
    with pytest.raises(ValueError, match="k=17 is larger than the transcoder's width d_transcoder=16"):
        TranscoderConfig(**base, activation="topk", k=17)
    with pytest.raises(ValueError, match="a topk transcoder needs k"):
        TranscoderConfig(**base, activation="topk")
    with pytest.raises(ValueError, match="a relu transcoder takes k=None"):
        TranscoderConfig(**base, k=4)
    with pytest.raises(ValueError, match=r"activation must be one of \('relu', 'topk'"):
        TrainConfig(activation="gelu")
    with pytest.raises(ValueError, match="jumprelu_init_threshold must be > 0"):
        TrainConfig(activation="jumprelu", jumprelu_init_threshold=-0.1)
    source, _, _ = _source(n=300)
    with pytest.raises(ValueError, match="k=100 is larger than the transcoder's width d_transcoder=48"):
        train_transcoders(source, dataclasses.replace(_tcfg("topk", False), k=100), steps=2, progress=False)


def test_a_negative_threshold_in_a_file_is_refused(tmp_path):
    tc = Transcoder(TranscoderConfig(d_model=8, d_transcoder=16, layer=0, activation="jumprelu"))
    tc.save(tmp_path)
    state = load_file(str(tmp_path / "transcoder.safetensors"))
    state["threshold"][3] = -0.5
    save_file(state, str(tmp_path / "transcoder.safetensors"))
    (tmp_path / "sha256.json").unlink()  # as if written by another tool, without our checksums
    with pytest.raises(ValueError, match="threshold.* negative or not finite .*feature 3: -0.5"):
        Transcoder.load(tmp_path)


# --- attribution: every variant with a skip path, on a tiny float64 model ---------------------


def variant_transcoders(model, transcoders, input_ids, activation, *, skip=True):
    """The tiny ReLU transcoders turned into ``activation`` transcoders (with a random W_skip)."""
    from c2srepro.attribution.linearised import run_model

    run = run_model(model, input_ids)
    out = []
    for layer, relu in enumerate(transcoders):
        k = 5 if activation in ("topk", "batchtopk") else None
        cfg = dataclasses.replace(relu.cfg, activation=activation, k=k, skip=skip)
        tc = Transcoder(cfg).to(torch.float64)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(tc, name).copy_(getattr(relu, name))
            if skip:
                generator = torch.Generator().manual_seed(7 + layer)
                tc.W_skip.copy_(0.1 * torch.randn(tc.W_skip.shape, generator=generator, dtype=torch.float64))
            if tc.threshold is not None:
                pre = run.mlp_in[layer] @ tc.W_enc + tc.b_enc
                # thresholds between 0 and the feature's largest pre-activation: some fire, some not
                tc.threshold.copy_(pre.amax(0).clamp_min(0) * torch.rand(cfg.d_transcoder, generator=torch.Generator().manual_seed(layer), dtype=torch.float64))
        out.append(tc)
    return out


@pytest.fixture(scope="module", params=VARIANTS)
def variant_rep(request):
    model, transcoders, input_ids = tiny_setup(n_pos=10)
    tcs = variant_transcoders(model, transcoders, input_ids, request.param)
    return model, tcs, build_replacement(model, tcs, input_ids)


def test_variant_replacement_reproduces_the_model_and_its_active_set(variant_rep):
    model, tcs, rep = variant_rep
    assert rep.n_active > 0
    with torch.no_grad():
        logits = model(rep.input_ids[None]).logits[0]
    torch.testing.assert_close(rep.run.logits, logits)
    frozen = replacement_forward(rep)  # features recomputed by each variant's activation
    torch.testing.assert_close(frozen.logits, logits, rtol=1e-10, atol=1e-10)
    for layer, act in enumerate(rep.active):
        z = frozen.activations[layer]
        torch.testing.assert_close(z[act.position, act.feature], act.activation)
        assert int((z != 0).sum()) == len(act)


def autograd_contributions(rep, node):
    """value = sum over sources of source x d value/d source, by autograd (skip path included)."""
    acts = [z.detach().clone().requires_grad_() for z in replacement_forward(rep).activations]
    emb = rep.weights.embed[rep.input_ids].clone().requires_grad_()
    err = rep.errors.clone().requires_grad_()
    value = replacement_forward(rep, feature_acts=acts, embeddings=emb, errors=err).value(node)
    emb_grad, err_grad, *act_grads = torch.autograd.grad(value, [emb, err, *acts], materialize_grads=True)
    features = [acts[layer][a.position, a.feature] * act_grads[layer][a.position, a.feature]
                for layer, a in enumerate(rep.active)]
    return (emb * emb_grad).sum(-1), (err * err_grad).sum(-1), features


def test_variant_attribution_equals_autograd_and_is_complete(variant_rep):
    _, _, rep = variant_rep
    last = rep.active[-1]
    targets = [rep.logit_node(rep.n_pos - 1, 3), Node.feature(rep.n_layers - 1, int(last.position[-1]), int(last.feature[-1]))]
    for target in targets:
        result = attribute(rep, target)
        assert result.total() == pytest.approx(result.value, rel=1e-10, abs=1e-10)  # completeness
        emb, err, features = autograd_contributions(rep, target)
        torch.testing.assert_close(result.embedding, emb, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.error, err, rtol=1e-9, atol=1e-12)
        for mine, reference in zip(result.features, features):
            torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-12)
    graph = build_graph(rep, targets, batch_size=5)
    rows = graph.nodes[graph.nodes["computed"]]
    totals = graph.adjacency[rows.index.to_numpy()].sum(1).numpy() + rows["constant"] + rows["dropped"]
    assert totals.to_numpy() == pytest.approx(rows["value"].to_numpy(), rel=1e-9, abs=1e-10)


def test_skip_paths_are_their_own_share_of_an_edge(variant_rep):
    _, _, rep = variant_rep
    first = rep.active[0]
    source = Node.feature(0, int(first.position[0]), int(first.feature[0]))
    target = rep.logit_node(rep.n_pos - 1, 3)
    paths = head_contributions(rep, source, target)
    assert paths.total() == pytest.approx(attribute(rep, target).contribution(source), rel=1e-9, abs=1e-12)
    assert float(paths.skip.abs().sum()) > 0 and float(paths.skip[rep.n_layers - 1:].abs().sum()) == 0


# --- metrics beside the paper's ------------------------------------------------------------


def test_replacement_metrics_for_variants_with_skip():
    from _tc_models import encoded, random_prompts, small_model

    from c2srepro.transcoder import evaluate_replacement
    from c2srepro.transcoder.harvest import harvest_activations

    model = small_model(n_layers=2, act="relu")
    prompts = encoded(random_prompts(6, low=8, high=20, seed=3))
    rows = harvest_activations(model, prompts, progress=False).read_all()
    transcoders = {}
    for layer, activation in enumerate(("topk", "jumprelu")):
        mlp = model.gpt_neox.layers[layer].mlp
        d_model, d_mlp = model.config.hidden_size, model.config.intermediate_size
        cfg = TranscoderConfig(d_model=d_model, d_transcoder=d_mlp, layer=layer, activation=activation,
                               k=d_mlp // 4 if activation == "topk" else None, skip=True)
        tc = Transcoder(cfg)
        with torch.no_grad():
            tc.W_enc.copy_(mlp.dense_h_to_4h.weight.T)
            tc.b_enc.copy_(mlp.dense_h_to_4h.bias)
            tc.W_dec.copy_(mlp.dense_4h_to_h.weight.T)
            tc.b_dec.copy_(mlp.dense_4h_to_h.bias)
            tc.W_skip.copy_(0.02 * torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(layer)))
            if tc.threshold is not None:
                tc.threshold.fill_(0.05)
        transcoders[layer] = tc
    report, per_layer = evaluate_replacement(model, transcoders, prompts, dense_frequency=0.3, progress=False)
    assert report.kl_score == pytest.approx((report.kl_no_mlp - report.kl_transcoder) / report.kl_no_mlp)
    assert report.answer_kl_score == pytest.approx(
        (report.answer_kl_no_mlp - report.answer_kl_transcoder) / report.answer_kl_no_mlp)
    assert 0 < report.kl_score < 1 and report.kl_transcoder > 1e-6
    for layer, tc in transcoders.items():
        with torch.no_grad():
            x, y = rows.mlp_in[layer].double(), rows.mlp_out[layer].double()
            y_hat, z = tc.double().forward_with_activations(x)  # the skip path included
            tc.float()
        fvu = float(((y_hat - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        frequency = (z > 0).double().mean(0)
        assert per_layer.fvu[layer] == pytest.approx(fvu, rel=1e-4)
        assert per_layer.explained_variance[layer] == pytest.approx(1 - fvu, rel=1e-4, abs=1e-6)
        assert per_layer.dense_fraction[layer] == pytest.approx(float((frequency > 0.3).double().mean()))
        assert per_layer.dead_fraction[layer] == pytest.approx(float((frequency == 0).double().mean()))
    assert report.mean_dense_fraction == pytest.approx(per_layer.dense_fraction.mean())
    assert report.mean_explained_variance == pytest.approx(1 - per_layer.fvu.mean())
    assert 0 < report.mean_dense_fraction < 1
    with pytest.raises(ValueError, match="dense_frequency must lie in"):
        evaluate_replacement(model, transcoders, prompts, dense_frequency=1.5, progress=False)
