"""Train one transcoder per MLP layer, every layer in one batched loop (paper eq. 4).

The paper gives max lr 1e-4, 2048 tokens per batch, L1 coefficient 1.4e-4, expansion 8 and 60M
tokens (``TrainConfig`` defaults). Those values are the defaults of the reference transcoder
implementation of Dunefsky et al. (2024), which the paper cites; where the paper is silent we
chose as follows (``TrainConfig`` holds every knob; each saved transcoder keeps it in
``training.json`` beside its ``TranscoderConfig``, which this module builds from the activations:
``d_model`` from the source, ``d_transcoder = expansion_factor * d_model``, the scales of step 1,
the hook points and the model's architecture, name and fingerprint where the source knows them):

1. Normalisation. Per layer, two fixed scalars are estimated from the first buffer of training
   rows: s_in = sqrt(E||x||^2 / d_model) and s_out = E||y||, where x is the MLP input and
   y = MLP(x). Training sees x' = x / s_in (unit RMS per coordinate, so one encoder
   initialisation suits every layer) and y' = y / s_out (mean norm 1). When training ends the
   scalars are folded into the weights, so a saved ``Transcoder`` maps raw MLP inputs to raw MLP
   outputs, and its activations z are in the units of the MLP output (a feature's z is the
   length of what it writes along its unit-norm decoder row).
2. Loss, per token and averaged over the batch:
       L = (1/d_model) ||y_hat' - y'||^2 + lambda_t ||z'||_1
   This is eq. 4 times the constant 1 / (d_model s_out^2), with the eq. 4 coefficient
   lambda_eq4 = lambda * d_model * s_out. Why: the reference implementation's reconstruction
   term is the squared error averaged over coordinates and divided by the target's norm, and
   the paper's lambda = 1.4e-4 has its meaning there. Dividing by one dataset-wide norm instead
   of each token's own keeps eq. 4 exactly (a per-token divisor would reweight tokens) while
   lambda keeps that meaning, for every layer and model whatever its activation scale.
3. Decoder rows have unit norm: before each step the gradient component along each row is
   removed, after it each row is rescaled to norm 1. Why: otherwise the L1 term is dodged by
   shrinking z and growing the decoder; unit rows also make z comparable across features.
4. Schedule (``c2srepro._schedule``, shared with the mini-C2S): the lr rises linearly over
   ``warmup_fraction`` of the steps (rounded, at least 1) to the maximum, then decays along a
   cosine to ``min_lr_fraction`` of it; lambda rises linearly from 0 over
   ``l1_warmup_fraction``. Why: a "maximum" learning rate implies a schedule; warm-up keeps the
   first Adam steps on a large error from pushing features dead; the decay lowers the noise in
   the final weights, which matters most for short runs; the lambda ramp lets features find
   their directions before sparsity pressure sets in.
5. Dead features: every ``resample_every_steps`` steps, up to ``resample_until_fraction`` of
   training, features that did not fire during the last ``resample_every_steps`` steps are
   re-initialised on tokens of the current batch drawn with probability proportional to their
   squared error: decoder row = that token's error direction, encoder column = its input
   direction scaled to 0.2 x the mean live encoder norm, encoder bias 0, Adam moments of those
   entries zeroed. Why: a dead feature is wasted capacity, and short runs (the embedded profile
   trains for a few hundred steps) do not give features time to revive on their own; 0 turns it
   off (the paper reports many dead features, Table 4's live counts). Each layer draws its
   tokens from its own generator, seeded by (seed, layer), so that a layer's transcoder does
   not depend on which other layers train beside it (``c2srepro.transcoder.distributed``
   trains the layers on several processes and relies on this).
6. Initialisation: ``Transcoder(cfg, seed=seed)``, the same for every layer (encoder
   Kaiming-uniform, decoder rows the encoder columns normalised), b_enc = 0 and b_dec = the
   mean of y' over the first buffer; then each encoder is scaled so that the features'
   initial output has mean norm 0.1 (the target's is 1). Why: unscaled, the initial output is
   several times the target and the first hundreds of steps only shrink it (a small random
   model, 200 steps: FVU 2.8 unscaled vs 0.002 scaled at lr 1e-3; at lr 1e-4, 0.36 with
   initial norm 1 vs 0.08 with 0.1).
7. Optimiser: Adam (betas 0.9, 0.999). The layers' weights are stacked, [layer, ...], and trained
   with batched matrix products; Adam acts element by element and the loss is a sum of per-layer
   terms, so this is exactly one independent transcoder and optimiser per layer (on CPU,
   training a subset of the layers gives those layers' weights bit for bit).
8. Checkpoints, with a ``checkpoint_dir``, after every ``checkpoint_every_fraction`` of the
   run (a tenth by default, so every run, short or long, holds some), every
   ``checkpoint_every_seconds`` of wall time and, if set, every ``checkpoint_every_steps``
   steps (``c2srepro._checkpoint``): one atomic file with weights, Adam state, step, data
   position, dead-feature counters, resampling generators, unlogged metric sums, history.
   Training again with the same ``checkpoint_dir`` resumes, and gives the same weights, bit for
   bit, as an uninterrupted run. The checkpoint's sha256 is recorded beside it; a damaged or
   unreadable checkpoint is reported and training starts afresh.
9. Run length. The schedules of step 4 span ``TrainConfig.total_steps``; ``steps=n`` makes a run
   of exactly n steps (short runs are whole runs, with their warm-up and decay). ``max_steps``
   instead pauses a longer run part way: it needs a ``checkpoint_dir`` to resume from, warns
   that the run is unfinished, and writes no ``output_dir`` until a later call finishes it.
10. A non-finite loss stops training with ``FloatingPointError`` naming the layer, the step and
    whether the batch or the weights were at fault; nothing is saved for that step.

11. Variants (``TrainConfig.activation``; the transcoder's ``TranscoderConfig`` records it). The
    paper's ``relu`` (eq. 1, L1 penalty, the loss of choice 2) and every other variant, with or
    without ``skip``, run the same loop (data, schedules, decoder constraint, resampling,
    checkpoints) and the same hand-written gradients (``loss_and_grads``: one pass over each
    [layer, batch, d_tc] tensor where autograd would keep several, and for the TopK variants
    products over the kept entries alone; ``general_loss_and_grads`` states the loss for
    autograd, and the tests check the two agree):
    - ``topk`` (Gao et al. 2024): z keeps each token's k largest pre-activations (through a
      ReLU), no sparsity penalty; the AuxK loss below.
    - ``batchtopk`` (Bussmann et al. 2024): z keeps the k * B largest ReLU'd pre-activations of
      the whole batch (k per token on average); the AuxK loss. Its inference threshold is the
      running mean of the smallest kept activation, theta <- theta + r (min - theta) each step
      (r = ``batchtopk_threshold_lr``, as SAELens; the first step sets theta = min); the saved transcoder infers with
      z = pre [pre > theta] (per token, no batch needed).
    - ``jumprelu`` (Rajamanoharan et al. 2024): z = pre H(pre - theta), theta = exp(log theta)
      per feature, started at ``jumprelu_init_threshold``; penalty ``l0_coefficient`` x the
      number of active features (ramped as lambda in choice 4). H has no useful derivative, so
      theta learns through straight-through estimators with a rectangle kernel of width
      epsilon = ``jumprelu_bandwidth``: d z / d theta = -(theta / epsilon) K((pre - theta) /
      epsilon), d H / d theta = -(1 / epsilon) K(...), K(u) = [|u| < 1/2]; d H / d pre = 0.
    - AuxK (Gao et al. 2024), for ``topk`` and ``batchtopk``: the ``aux_k`` (default d_model // 2)
      largest pre-activations among features dead for ``dead_window_tokens`` (choice 5's
      counters) reconstruct the main error e = y' - y_hat' with the decoder alone, and
      ``aux_k_coefficient`` x (1/d) ||e_hat - e||^2 joins the loss: a gradient that revives
      dead features without resampling (set ``resample_every_steps=0`` to rely on it alone).
    - ``skip`` (Paulo et al. 2025): y_hat' += x' W_skip', W_skip' started at zero; saved as
      W_skip = W_skip' s_out / s_in. Thresholds are saved in raw units, theta s_out.

Logged per layer every ``log_every_steps`` steps (means over the steps since the last log):
loss, mse = (1/d)||y_hat' - y'||^2, fvu = sum ||y_hat - y||^2 / sum ||y - mean y||^2 per batch,
l1 = ||z'||_1, l0 = number of active features per token, dead_fraction = features that have not
fired for ``dead_window_tokens`` tokens (or since the start, early on).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm import tqdm

from c2srepro._cache import CorruptFileError, atomic_path, record_checksums, remove_temporaries, verify_checksums
from c2srepro._device import resolve_device
from c2srepro._checkpoint import CheckpointClock
from c2srepro._schedule import linear_warmup, warmup_cosine
from c2srepro.transcoder.config import TOPK_ACTIVATIONS, TrainConfig, TranscoderConfig, check_k
from c2srepro.transcoder.harvest import (
    ActivationSource,
    BufferPosition,
    CachedActivations,
    ShuffleBuffer,
    StreamingActivations,
    derived_seed,
    model_fingerprint,
)
from c2srepro.transcoder.model import Transcoder, activate, save_transcoders
from c2srepro.transcoder.sparse_codes import SparseCodes, token_sums, top_k

log = logging.getLogger(__name__)

CHECKPOINT_FILENAME = "trainer_state.pt"
CHECKPOINT_FORMAT = "c2srepro-transcoder-training/3"
# TrainConfig fields that do not change the trained weights, so a resumed run may change them.
_RESUMABLE_CHANGES = {"checkpoint_every_fraction", "checkpoint_every_seconds", "checkpoint_every_steps", "device"}
INIT_OUTPUT_NORM = 0.1


@dataclass
class TrainingResult:
    transcoders: dict[int, Transcoder]  # layer -> transcoder in raw model units
    history: pd.DataFrame  # one row per (logged step, layer)
    step: int
    total_steps: int
    complete: bool  # False when paused by max_steps (the transcoders are then part-trained)
    seconds: float  # wall time of this call
    loop_seconds: float  # of which in the step loop (steps, buffer refills, logging, checkpoints)
    train_config: TrainConfig  # as run: with ``steps=`` applied


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Fraction of the max lr at 0-based ``step`` of the run (choice 4)."""
    total = cfg.total_steps
    warmup = max(1, round(cfg.warmup_fraction * total))
    return warmup_cosine(step, total_steps=total, warmup_steps=warmup, final_fraction=cfg.min_lr_fraction)


def l1_factor(step: int, cfg: TrainConfig) -> float:
    """Fraction of the L1 coefficient at 0-based ``step`` of the run (choice 4)."""
    return linear_warmup(step, warmup_steps=round(cfg.l1_warmup_fraction * cfg.total_steps))


class _JumpReLU(torch.autograd.Function):
    """z = pre H(pre - theta); straight-through gradient for theta (choice 11)."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype) / eps
        grad_theta = (-theta * kernel * grad).sum_to_size(theta.shape)
        return grad * (pre > theta), grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta) (the L0 count); straight-through gradient for theta, none for pre."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype) / eps
        return None, (-kernel * grad).sum_to_size(theta.shape), None


def _batch_topk(pre: Float[Tensor, "layer batch d_tc"], k: int) -> Float[Tensor, "layer batch d_tc"]:
    """Per layer, the k * batch largest ReLU'd pre-activations of the batch kept, the rest 0."""
    n, batch, d_tc = pre.shape
    flat = torch.relu(pre).reshape(n, batch * d_tc)
    values, index = flat.topk(k * batch, dim=-1, sorted=False)
    return torch.zeros_like(flat).scatter(-1, index, values).reshape(n, batch, d_tc)


class StackedTranscoders(nn.Module):
    """The transcoders of ``n_layers`` layers, weights stacked on a leading layer axis; every
    layer starts as ``Transcoder(..., seed=seed)`` (choice 6). ``train_config`` (default: the
    paper's ReLU) picks the variant and its parameters (choice 11)."""

    def __init__(
        self, n_layers: int, *, d_model: int, d_transcoder: int, seed: int = 0, train_config: TrainConfig | None = None
    ):
        super().__init__()
        tcfg = train_config or TrainConfig()
        self.activation, self.k, self.skip = tcfg.activation, tcfg.k, tcfg.skip
        self.bandwidth, self.threshold_lr = tcfg.jumprelu_bandwidth, tcfg.batchtopk_threshold_lr
        self.aux_k = min(tcfg.aux_k or max(1, d_model // 2), d_transcoder)
        self.aux_k_coefficient = tcfg.aux_k_coefficient
        if self.activation in TOPK_ACTIVATIONS:
            check_k(self.k, d_transcoder, activation=self.activation)
        n, d_tc = n_layers, d_transcoder
        self.W_enc = nn.Parameter(torch.empty(n, d_model, d_tc))  # [L, d_model, d_tc]
        self.b_enc = nn.Parameter(torch.empty(n, d_tc))  # [L, d_tc]
        self.W_dec = nn.Parameter(torch.empty(n, d_tc, d_model))  # [L, d_tc, d_model]
        self.b_dec = nn.Parameter(torch.empty(n, d_model))  # [L, d_model]
        init = Transcoder(TranscoderConfig(d_model=d_model, d_transcoder=d_tc, layer=0), seed=seed)
        with torch.no_grad():
            for name, param in init.named_parameters():
                getattr(self, name).copy_(param)  # broadcast over the layer axis
        # Variant parameters follow the four above, so the paper's variant is unchanged.
        self.W_skip = nn.Parameter(torch.zeros(n, d_model, d_model)) if self.skip else None  # [L, d_in, d_out]
        self.log_threshold = (
            nn.Parameter(torch.full((n, d_tc), math.log(tcfg.jumprelu_init_threshold)))
            if self.activation == "jumprelu" else None
        )
        # BatchTopK's inference threshold: a running estimate, not trained by the optimiser.
        self.threshold = (
            nn.Parameter(torch.zeros(n, d_tc), requires_grad=False) if self.activation == "batchtopk" else None
        )
        self._scratch: dict[str, Tensor] = {}  # loss_and_grads' buffers, not state

    def train_activation(self, pre: Float[Tensor, "layer batch d_tc"]) -> Float[Tensor, "layer batch d_tc"]:
        """The training activation of the variant (choice 11), differentiable as described there."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "topk":
            return activate(pre, activation="topk", k=self.k)
        if self.activation == "batchtopk":
            return _batch_topk(pre, self.k)
        return _JumpReLU.apply(pre, self.log_threshold.exp().unsqueeze(1), self.bandwidth)

    def forward(
        self, x: Float[Tensor, "layer batch d_model"]
    ) -> tuple[Float[Tensor, "layer batch d_tc"], Float[Tensor, "layer batch d_model"]]:
        pre = torch.baddbmm(self.b_enc.unsqueeze(1), x, self.W_enc)
        z = self.train_activation(pre)  # eq. 1
        y_hat = torch.baddbmm(self.b_dec.unsqueeze(1), z, self.W_dec)  # eq. 2
        if self.W_skip is not None:
            y_hat = y_hat + torch.bmm(x, self.W_skip)
        return z, y_hat

    def general_loss_and_grads(
        self, x: Float[Tensor, "layer batch d_model"], y: Float[Tensor, "layer batch d_model"],
        coefficient: float, *, dead: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms per layer of any variant (choice 11), gradients by autograd into ``.grad``:
        the loss as autograd sees it, the reference the hand-written ``loss_and_grads`` (which
        training runs) is tested against."""
        batch, d_model = x.shape[1], x.shape[2]
        for param in self.parameters():
            param.grad = None
        with torch.enable_grad():
            pre = torch.baddbmm(self.b_enc.unsqueeze(1), x, self.W_enc)
            z = self.train_activation(pre)
            y_hat = torch.baddbmm(self.b_dec.unsqueeze(1), z, self.W_dec)
            if self.W_skip is not None:
                y_hat = y_hat + torch.bmm(x, self.W_skip)
            error = y_hat - y
            sq_error = error.square().sum(-1)  # [L, B]
            mse = sq_error.mean(-1) / d_model  # [L]
            l1 = z.abs().sum(-1).mean(-1)  # [L]
            if self.activation == "relu":
                penalty = coefficient * l1
            elif self.activation == "jumprelu":
                step = _Step.apply(pre, self.log_threshold.exp().unsqueeze(1), self.bandwidth)
                penalty = coefficient * step.sum(-1).mean(-1)
            else:
                penalty = torch.zeros_like(mse)
            loss = mse + penalty
            if self.activation in TOPK_ACTIVATIONS and dead is not None and bool(dead.any()):
                loss = loss + self._aux_k_loss(pre, error.detach(), dead)
            loss.sum().backward()  # the layers are independent: the sum's gradient is each one's
        if self.activation == "batchtopk":
            self._update_threshold(z.detach().flatten(1))
        active = (z.detach() > 0).to(x.dtype)
        return {
            "loss": loss.detach(), "mse": mse.detach(), "l1": l1.detach(), "sq_error": sq_error.detach(),
            "error": error.detach(), "counts": active.sum(1),
        }

    def _aux_k_loss(
        self, pre: Float[Tensor, "layer batch d_tc"], error: Float[Tensor, "layer batch d_model"], dead: Tensor
    ) -> Float[Tensor, "layer"]:
        """AuxK (choice 11): the dead features' top pre-activations reconstruct the main error."""
        k = min(self.aux_k, int(dead.sum(-1).max()))
        masked = pre.masked_fill(~dead.unsqueeze(1), -torch.inf)
        values, index = masked.topk(k, dim=-1, sorted=False)
        z_aux = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))  # relu(-inf) = 0: no gradient
        residual = -error  # what the main reconstruction missed
        aux = (torch.bmm(z_aux, self.W_dec) - residual).square().sum(-1).mean(-1) / pre.new_tensor(error.shape[-1])
        return self.aux_k_coefficient * aux

    @torch.no_grad()
    def loss_and_grads(
        self, x: Float[Tensor, "layer batch d_model"], y: Float[Tensor, "layer batch d_model"],
        coefficient: float, *, dead: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms per layer (choices 2 and 11) and their gradients, written to each ``.grad``.

        Written out by hand rather than by autograd so that each [layer, batch, d_tc] tensor
        is touched as few times as possible; ``general_loss_and_grads`` states the same loss for
        autograd, and the tests check the two agree for every variant. With A = [z > 0] (the
        active set, which every variant's z is linear on) and c the sparsity coefficient:
            dL/dy_hat  = 2 (y_hat - y) / (d B)
            dL/dW_dec  = z^T dL/dy_hat,          dL/db_dec = sum_b dL/dy_hat
            dL/dW_skip = x^T dL/dy_hat           (skip)
            dL/dz      = dL/dy_hat W_dec^T (+ c / B for ReLU's L1)
            dL/dpre    = dL/dz * A (+ AuxK's own term, on the dead features it keeps)
            dL/dW_enc  = x^T dL/dpre,            dL/db_enc = sum_b dL/dpre
            JumpReLU:  dL/dlog theta = -theta sum_b K_eps(pre - theta) (theta dL/dz + c / B)
        ReLU and JumpReLU run these as dense products. The TopK variants keep k of d_tc features
        per token, so every product but the encoder's runs on the kept entries alone
        (``SparseCodes``), and dL/dz is computed only there.

        The [layer, batch, d_tc] tensors and the gradients are buffers kept from step to step:
        on CPU a fresh tensor of tens of MB costs a page fault per 4 KiB on first write, as
        much as a pass over it.
        """
        pre = torch.baddbmm(self.b_enc.unsqueeze(1), x, self.W_enc, out=self._workspace("pre", x))
        if self.activation in TOPK_ACTIVATIONS:
            return self._sparse_loss_and_grads(x, y, pre, dead)
        return self._dense_loss_and_grads(x, y, pre, coefficient)

    def _workspace(self, name: str, x: Tensor) -> Tensor:
        """A [layer, batch, d_tc] buffer for the batch ``x``, reused across steps of the same shape."""
        shape = (x.shape[0], x.shape[1], self.b_enc.shape[-1])
        buffer = self._scratch.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != x.dtype or buffer.device != x.device:
            buffer = self._scratch[name] = torch.empty(shape, dtype=x.dtype, device=x.device)
        return buffer

    @staticmethod
    def _grad_buffer(param: Tensor) -> Tensor:
        if param.grad is None or param.grad.shape != param.shape or param.grad.dtype != param.dtype:
            param.grad = torch.empty_like(param)
        return param.grad

    def _reconstruction_terms(self, y_hat: Tensor, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """From y_hat (without the skip path), in place: the error, its terms and dL/dy_hat;
        sets the gradients of b_dec and W_skip."""
        batch, d_model = x.shape[1], x.shape[2]
        error = y_hat
        if self.W_skip is not None:
            error.baddbmm_(x, self.W_skip)
        error.sub_(y)  # minus the target
        sq_error = error.square().sum(-1)  # [L, B]
        grad_y = error * (2.0 / (d_model * batch))  # [L, B, d]
        self.b_dec.grad = token_sums(grad_y)
        if self.W_skip is not None:
            torch.bmm(x.transpose(1, 2), grad_y, out=self._grad_buffer(self.W_skip))
        return {"error": error, "sq_error": sq_error, "mse": sq_error.mean(-1) / d_model, "grad_y": grad_y}

    def _dense_loss_and_grads(self, x: Tensor, y: Tensor, pre: Tensor, coefficient: float) -> dict[str, Tensor]:
        batch = x.shape[1]
        active = self._workspace("active", x)  # A as 0/1 floats: boolean masks are ~10x slower on CPU
        if self.activation == "relu":
            z = pre.clamp_min_(0)  # eq. 1, in place: ReLU reads pre no further
            torch.sign(z, out=active)
        else:
            theta = self.log_threshold.exp()  # [L, d_tc]
            torch.gt(pre, theta.unsqueeze(1), out=active)
            z = torch.mul(pre, active, out=self._workspace("z", x))
        counts = token_sums(active)  # [L, d_tc] tokens on which each feature fired (float)
        l1 = z.sum(dim=(1, 2)) / batch  # [L]; z >= 0, so this is the mean ||z||_1
        terms = self._reconstruction_terms(torch.baddbmm(self.b_dec.unsqueeze(1), z, self.W_dec), x, y)  # eq. 2
        grad_y = terms.pop("grad_y")
        torch.bmm(z.transpose(1, 2), grad_y, out=self._grad_buffer(self.W_dec))
        grad_pre = torch.bmm(grad_y, self.W_dec.transpose(1, 2), out=self._workspace("grad_pre", x))  # dL/dz
        if self.activation == "relu":
            loss = terms["mse"] + coefficient * l1
            grad_pre.add_(coefficient / batch)
        else:
            loss = terms["mse"] + coefficient * counts.sum(-1) / batch
            # K(u) = [|u| < 1/2], u = (pre - theta) / eps; the sum over tokens splits in two
            band = torch.sub(pre, theta.unsqueeze(1), out=self._workspace("band", x))
            band.abs_().lt_(self.bandwidth / 2)
            in_band = token_sums(band)
            band_grad = token_sums(band.mul_(grad_pre))
            # theta = exp(log theta): chain rule
            self.log_threshold.grad = -(theta / self.bandwidth) * (theta * band_grad + (coefficient / batch) * in_band)
        grad_pre.mul_(active)
        torch.bmm(x.transpose(1, 2), grad_pre, out=self._grad_buffer(self.W_enc))
        self.b_enc.grad = token_sums(grad_pre)
        return {"loss": loss, "l1": l1, "counts": counts} | terms

    def _sparse_loss_and_grads(self, x: Tensor, y: Tensor, pre: Tensor, dead: Tensor | None) -> dict[str, Tensor]:
        n, batch = pre.shape[:2]
        codes = self._kept_codes(pre)
        fired = torch.sign(codes.values)
        counts = codes.feature_sums(fired)
        l1 = codes.layer_sums(codes.values) / batch
        terms = self._reconstruction_terms(codes.decode(self.W_dec).add_(self.b_dec.unsqueeze(1)), x, y)  # eq. 2
        grad_y = terms.pop("grad_y")
        codes.decode_grad(grad_y, out=self._grad_buffer(self.W_dec))
        grad_kept = codes.sampled(grad_y, self.W_dec).mul_(fired)  # dL/dpre at the kept entries
        if self.activation == "batchtopk":
            self._update_threshold(codes.values.view(n, -1))
        loss = terms["mse"].clone()
        grads = [(codes, grad_kept)]
        if dead is not None and bool(dead.any()):
            aux, aux_codes, aux_grad_kept = self._aux_k_terms(pre, terms["error"], dead)
            loss += aux
            grads.append((aux_codes, aux_grad_kept))
        self.b_enc.grad = sum(c.feature_sums(g) for c, g in grads)
        grad_enc = self._grad_buffer(self.W_enc)
        # The sparse product gives dL/dW_enc transposed, and on CPU the copy that transposes it
        # back costs as much as the dense product with ~d_model / 2 tokens (measured at
        # Pythia-410m's width): below that batch, scatter dL/dpre and take the dense product.
        if 2 * batch >= x.shape[-1]:
            grad_enc.copy_(sum(c.encode_grad(g, x) for c, g in grads).transpose(1, 2))
        else:
            grad_pre = self._workspace("grad_pre", x).zero_()
            for c, g in grads:
                c.add_to_dense(grad_pre, g)
            torch.bmm(x.transpose(1, 2), grad_pre, out=grad_enc)
        return {"loss": loss, "l1": l1, "counts": counts} | terms

    def _kept_codes(self, pre: Float[Tensor, "layer batch d_tc"]) -> SparseCodes:
        """The TopK variants' kept entries, relu'd (the largest of relu(pre) are relu of the largest of pre)."""
        n, batch, d_tc = pre.shape
        if self.activation == "topk":
            values, index = top_k(pre, self.k)
            return SparseCodes.per_token(values.clamp_min_(0), index, d_tc=d_tc)
        values, index = top_k(pre.view(n, batch * d_tc), self.k * batch)
        return SparseCodes.per_batch(values.clamp_min_(0), index, batch=batch, d_tc=d_tc)

    def _aux_k_terms(
        self, pre: Tensor, error: Tensor, dead: Tensor
    ) -> tuple[Float[Tensor, " layer"], SparseCodes, Float[Tensor, " nnz"]]:
        """AuxK by hand (``_aux_k_loss``'s loss, on the dead features' kept entries): its loss per
        layer, its kept entries and dL/dpre there; adds its dL/dW_dec to ``W_dec.grad``.
        Overwrites ``pre``."""
        k = min(self.aux_k, int(dead.sum(-1).max()))
        values, index = top_k(pre.masked_fill_(~dead.unsqueeze(1), -torch.inf), k)
        codes = SparseCodes.per_token(values.clamp_min_(0), index, d_tc=pre.shape[-1])  # relu(-inf) = 0: no gradient
        aux_error = codes.decode(self.W_dec).add_(error)  # e_hat - e, with e = -error
        d_model, batch = error.shape[-1], error.shape[1]
        aux = self.aux_k_coefficient * aux_error.square().sum(-1).mean(-1) / d_model
        grad_aux = aux_error.mul_(2.0 * self.aux_k_coefficient / (d_model * batch))
        codes.decode_grad(grad_aux, out=self.W_dec.grad, accumulate=True)
        return aux, codes, codes.sampled(grad_aux, self.W_dec).mul_(torch.sign(codes.values))

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """BatchTopK's inference threshold: a running mean of the smallest kept activation (choice 11)."""
        smallest = torch.where(kept > 0, kept, torch.inf).amin(-1)  # [L]
        smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold[:, 0])
        # The first estimate is taken whole (a running mean started at 0 would stay
        # biased low for ~1/r steps, too long for short runs).
        rate = torch.where(self.threshold[:, :1] > 0, self.threshold_lr, 1.0)
        self.threshold.add_(rate * (smallest[:, None] - self.threshold))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        # Remove the gradient along each unit decoder row: that direction only changes its norm.
        W, g = self.W_dec, self.W_dec.grad
        g.addcmul_(torch.linalg.vecdot(g, W).unsqueeze(-1), W, value=-1)  # no W-sized temporary

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))


def train_transcoders(
    source: ActivationSource,
    train_config: TrainConfig | None = None,
    *,
    steps: int | None = None,
    layers: Sequence[int] | None = None,
    checkpoint_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    replace_output: bool = True,
    max_steps: int | None = None,
    progress: bool = True,
) -> TrainingResult:
    """Train a transcoder for each of ``layers`` (default: every layer of ``source``).

    ``train_config`` (default ``TrainConfig()``, the paper's settings) is shared by all layers;
    each transcoder's ``TranscoderConfig`` is built here from ``source`` (its ``d_model``, the
    layer, the normalisation scalars). The run lasts ``train_config.total_steps`` steps, or
    exactly ``steps`` (which sets ``training_tokens = steps * tokens_per_batch``), looping over
    the source in fresh orders as often as needed. With ``checkpoint_dir`` the run checkpoints
    there and a later call resumes from it; ``max_steps`` pauses this call after that many
    steps (choice 9: it needs ``checkpoint_dir`` and warns). With ``output_dir`` a finished run
    saves one ``Transcoder`` per layer in ``output_dir/layer_XX``, replacing the folder as a whole
    (no layer of an earlier, larger run survives) unless ``replace_output=False`` (writers that
    each own some layers: the ranks of a distributed run).
    """
    started = time.perf_counter()
    if not isinstance(source, ActivationSource):
        raise TypeError(
            f"train_transcoders takes an ActivationSource, got {type(source).__name__}: "
            "harvest_activations(model, prompts) returns one (TensorActivations wraps tensors)"
        )
    if isinstance(train_config, TranscoderConfig):
        raise TypeError(
            "train_transcoders takes a TrainConfig (training settings, with expansion_factor for the "
            "width); the TranscoderConfig of each transcoder is built from the activations"
        )
    if train_config is not None and not isinstance(train_config, TrainConfig):
        raise TypeError(f"train_config must be a TrainConfig or None, got {type(train_config).__name__}")
    tcfg = train_config or TrainConfig()
    if steps is not None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 or None, got {steps!r}")
        tcfg = replace(tcfg, training_tokens=steps * tcfg.tokens_per_batch)
    if max_steps is not None:
        if not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be an integer >= 0 or None, got {max_steps!r}")
        if checkpoint_dir is None:
            raise ValueError(
                "max_steps pauses a run so that a later call resumes it, which needs checkpoint_dir; "
                "for a shorter complete run pass steps= instead"
            )
    chosen = tuple(source.layers) if layers is None else tuple(sorted(set(layers)))
    missing = sorted(set(chosen) - set(source.layers))
    if missing or not chosen:
        raise ValueError(f"layers {missing or '[]'} are not among the harvested layers {list(source.layers)}")
    select = torch.as_tensor([source.layers.index(layer) for layer in chosen])
    device = resolve_device(tcfg.device, parameter="TrainConfig.device")
    batch_tokens, total = tcfg.tokens_per_batch, tcfg.total_steps

    trainer = _Trainer(tcfg, chosen, d_model=source.d_model, device=device, provenance=_provenance(source))
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_FILENAME if checkpoint_dir is not None else None
    buffer_args = dict(
        batch_tokens=batch_tokens, buffer_tokens=max(tcfg.buffer_tokens, batch_tokens), seed=tcfg.seed, device=device
    )
    position = None
    if checkpoint is not None:
        remove_temporaries(checkpoint.parent, CHECKPOINT_FILENAME)  # a killed run's half-written checkpoint
    if checkpoint is not None and checkpoint.is_file():
        try:
            position = trainer.load(checkpoint, source_rows=source.n_rows)
        except CorruptFileError as error:  # a cache: rebuilt from step 0 rather than failing every rerun
            log.warning("%s: training from step 0", error)
    if position is not None:
        buffer = ShuffleBuffer(source, position=position, **buffer_args)
        log.info("resuming transcoder training at step %d of %d from %s", trainer.step, total, checkpoint)
    else:
        buffer = ShuffleBuffer(source, **buffer_args)
        first_in, first_out = buffer.current_rows()
        trainer.initialise(first_in[select], first_out[select])

    stop = total if max_steps is None else min(total, trainer.step + max_steps)
    clock = CheckpointClock(
        total, every_fraction=tcfg.checkpoint_every_fraction, every_seconds=tcfg.checkpoint_every_seconds,
        every_steps=tcfg.checkpoint_every_steps, stop=stop,
    )
    loop_started = time.perf_counter()
    bar = tqdm(total=total, initial=trainer.step, unit="step", desc="training transcoders", disable=not progress)
    with bar:
        while trainer.step < stop:
            x, y = buffer.next_batch()
            if len(select) != x.shape[0]:
                x, y = x[select.to(x.device)], y[select.to(x.device)]
            trainer.train_step(x, y)
            if trainer.step % tcfg.log_every_steps == 0 or trainer.step == total:
                trainer.log_metrics()
                bar.set_postfix(trainer.postfix())
            if checkpoint is not None and clock.due(trainer.step):
                trainer.save(checkpoint, buffer.position, source_rows=source.n_rows)
                clock.saved()
            bar.update(1)
    loop_seconds = time.perf_counter() - loop_started

    transcoders = trainer.export()
    complete = trainer.step == total
    if complete and output_dir is not None:
        save_transcoders(transcoders, output_dir, replace=replace_output)
    elif not complete:
        unsaved = "no output_dir was given" if output_dir is None else f"{output_dir} was not written"
        warnings.warn(
            f"transcoder training paused at step {trainer.step} of {total} (max_steps={max_steps}): the "
            f"transcoders returned are part-trained and {unsaved}; call again with "
            f"checkpoint_dir={str(checkpoint_dir)!r} to finish, or pass steps= for a shorter run",
            stacklevel=2,
        )
    return TrainingResult(
        transcoders, pd.DataFrame(trainer.history), trainer.step, total, complete,
        time.perf_counter() - started, loop_seconds, tcfg,
    )


def _provenance(source: ActivationSource) -> dict[str, str | None]:
    """The model the activations came from, where the source knows it."""
    if isinstance(source, StreamingActivations):
        name = getattr(source.model.config, "name_or_path", "") or None
        return {
            "model_type": source.hooked.adapter.model_type,
            "model_name": name,
            "model_fingerprint": model_fingerprint(source.model),
        }
    if isinstance(source, CachedActivations):
        return {key: source.manifest.get(key) for key in ("model_type", "model_name", "model_fingerprint")}
    return {"model_type": None, "model_name": None, "model_fingerprint": None}


class _Trainer:
    """State and arithmetic of one multi-layer training run."""

    def __init__(
        self, tcfg: TrainConfig, layers: tuple[int, ...], *, d_model: int, device: torch.device,
        provenance: dict[str, str | None] | None = None,
    ):
        self.tcfg, self.layers, self.device, self.total = tcfg, layers, device, tcfg.total_steps
        self.provenance = provenance or {}
        self.n_layers, self.d_model, self.d_tc = len(layers), d_model, tcfg.expansion_factor * d_model
        self.batch_tokens = tcfg.tokens_per_batch
        self.dead_window = max(1, math.ceil(tcfg.dead_window_tokens / self.batch_tokens))  # steps
        self.stack = StackedTranscoders(
            self.n_layers, d_model=d_model, d_transcoder=self.d_tc, seed=tcfg.seed, train_config=tcfg
        ).to(device)
        self.optimizer = torch.optim.Adam(
            self.stack.parameters(), lr=tcfg.lr, betas=tcfg.adam_betas, fused=device.type in ("cpu", "cuda") or None
        )
        self.step = 0
        self.scale_in = torch.ones(self.n_layers, device=device)
        self.scale_out = torch.ones(self.n_layers, device=device)
        self.since_fired = torch.zeros(self.n_layers, self.d_tc, dtype=torch.long, device=device)
        self.generators = [torch.Generator(device=device).manual_seed(derived_seed(tcfg.seed, layer)) for layer in layers]
        self.sums = self._zero_sums()
        self.history: list[dict[str, Any]] = []

    def _zero_sums(self) -> dict[str, Tensor]:
        names = ("loss", "mse", "fvu", "l1", "l0")
        return {name: torch.zeros(self.n_layers, dtype=torch.float64, device=self.device) for name in names} | {
            "steps": torch.zeros((), dtype=torch.long, device=self.device)
        }

    @torch.no_grad()
    def initialise(self, x: Float[Tensor, "layer rows d_model"], y: Float[Tensor, "layer rows d_model"]) -> None:
        """Normalisation scalars and b_dec from the first buffer (choices 1 and 6)."""
        self._check_finite_rows(x, y, "the first buffer of activations")
        self.scale_in = (x.square().sum(-1).mean(-1) / self.d_model).sqrt()  # [L]
        self.scale_out = y.norm(dim=-1).mean(-1)  # [L]
        flat = [self.layers[i] for i in range(self.n_layers) if self.scale_in[i] == 0 or self.scale_out[i] == 0]
        if flat:
            raise ValueError(f"the MLP inputs or outputs of layers {flat} are all zero: nothing to learn there")
        self.stack.b_dec.copy_(y.mean(1) / self.scale_out[:, None])
        # Scale each encoder so the features' initial output has mean norm INIT_OUTPUT_NORM
        # (the target y' has mean norm 1); ReLU and TopK are positively homogeneous, so this is
        # exact for them (JumpReLU's small initial threshold makes it nearly so).
        sample = x[:, :4096] / self.scale_in[:, None, None]
        z = self.stack.train_activation(torch.baddbmm(self.stack.b_enc.unsqueeze(1), sample, self.stack.W_enc))
        norm = torch.bmm(z, self.stack.W_dec).norm(dim=-1).mean(-1).clamp_min(1e-8)  # [L]
        self.stack.W_enc.mul_((INIT_OUTPUT_NORM / norm)[:, None, None])

    def train_step(self, x_raw: Float[Tensor, "layer batch d_model"], y_raw: Float[Tensor, "layer batch d_model"]) -> None:
        x = x_raw / self.scale_in[:, None, None]  # x' (choice 1)
        y = y_raw / self.scale_out[:, None, None]  # y'
        lr = self.tcfg.lr * lr_factor(self.step, self.tcfg)
        coefficient = self.tcfg.l0_coefficient if self.tcfg.activation == "jumprelu" else self.tcfg.l1_coefficient
        l1_coefficient = coefficient * l1_factor(self.step, self.tcfg)
        dead = self.since_fired >= self.dead_window if self.tcfg.activation in TOPK_ACTIVATIONS else None
        terms = self.stack.loss_and_grads(x, y, l1_coefficient, dead=dead)
        loss, counts = terms["loss"], terms["counts"]
        if not bool(torch.isfinite(loss).all()):
            self._raise_non_finite(loss, x_raw, y_raw)
        self.stack.project_decoder_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.stack.normalise_decoder()
        self.step += 1

        with torch.no_grad():
            self.since_fired = torch.where(counts > 0, 0, self.since_fired + 1)
            variance = (y - y.mean(1, keepdim=True)).square().sum(-1).sum(-1)  # [L]
            self.sums["loss"] += loss
            self.sums["mse"] += terms["mse"]
            self.sums["fvu"] += terms["sq_error"].sum(-1) / variance.clamp_min(1e-30)
            self.sums["l1"] += terms["l1"]
            self.sums["l0"] += counts.sum(-1).double() / x.shape[1]
            self.sums["steps"] += 1
            every = self.tcfg.resample_every_steps
            if every and self.step % every == 0 and self.step <= self.tcfg.resample_until_fraction * self.total:
                self._resample(x, terms["error"].neg_(), terms["sq_error"], every)
        self._last_lr, self._last_l1 = lr, l1_coefficient

    @torch.no_grad()
    def _resample(self, x: Tensor, residual: Tensor, sq_error: Tensor, window: int) -> None:
        """Choice 5: re-initialise features silent for ``window`` steps on high-error tokens."""
        dead = self.since_fired >= window  # [L, d_tc]
        state = self.optimizer.state
        for i in range(self.n_layers):
            index = dead[i].nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            weights = sq_error[i].clamp_min(0)
            if float(weights.sum()) <= 0:
                continue
            tokens = torch.multinomial(weights, index.numel(), replacement=True, generator=self.generators[i])
            live = ~dead[i]
            enc_norm = self.stack.W_enc[i][:, live].norm(dim=0).mean() if live.any() else torch.tensor(1.0, device=self.device)
            direction_in = x[i, tokens]  # [n_dead, d_model]
            direction_in = direction_in / direction_in.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            direction_out = residual[i, tokens]
            direction_out = direction_out / direction_out.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            self.stack.W_enc[i][:, index] = (direction_in * 0.2 * enc_norm).T
            self.stack.b_enc[i][index] = 0.0
            self.stack.W_dec[i][index] = direction_out
            for param, rows in ((self.stack.W_enc, (i, slice(None), index)), (self.stack.b_enc, (i, index)), (self.stack.W_dec, (i, index))):
                for moment in ("exp_avg", "exp_avg_sq"):
                    if param in state:
                        state[param][moment][rows] = 0.0
            self.since_fired[i, index] = 0
            log.info("layer %d step %d: resampled %d dead features", self.layers[i], self.step, index.numel())

    def _raise_non_finite(self, loss: Tensor, x: Tensor, y: Tensor) -> None:
        bad = [i for i in range(self.n_layers) if not bool(torch.isfinite(loss[i]))]
        i = bad[0]
        layer = self.layers[i]
        if not bool(torch.isfinite(x[i]).all()) or not bool(torch.isfinite(y[i]).all()):
            cause = (
                "the training batch holds non-finite MLP activations: check the harvested "
                "activations (model dtype, overflow in float16)"
            )
        else:
            cause = f"the transcoder diverged: lower the learning rate (now {self.tcfg.lr})"
        raise FloatingPointError(
            f"non-finite transcoder loss ({loss[i].item()}) in layer {layer} at step {self.step} "
            f"(layers affected: {[self.layers[j] for j in bad]}); {cause}. Nothing was saved for "
            "this step; a checkpoint, if any, holds the last good state"
        )

    def _check_finite_rows(self, x: Tensor, y: Tensor, what: str) -> None:
        for i in range(self.n_layers):
            if not bool(torch.isfinite(x[i]).all()) or not bool(torch.isfinite(y[i]).all()):
                raise FloatingPointError(
                    f"non-finite MLP activations of layer {self.layers[i]} in {what} (step "
                    f"{self.step}): check the harvested activations (model dtype, float16 overflow)"
                )

    def log_metrics(self) -> None:
        steps = int(self.sums["steps"])
        if steps == 0:
            return
        dead = (self.since_fired >= min(self.dead_window, self.step)).double().mean(-1)  # [L]
        means = {name: (self.sums[name] / steps).tolist() for name in ("loss", "mse", "fvu", "l1", "l0")}
        for i, layer in enumerate(self.layers):
            row = {
                "step": self.step, "tokens": self.step * self.batch_tokens, "layer": layer,
                "lr": self._last_lr, "l1_coefficient": self._last_l1,
            }
            row.update({name: values[i] for name, values in means.items()})
            row["dead_fraction"] = float(dead[i])
            self.history.append(row)
        self.sums = self._zero_sums()

    def postfix(self) -> dict[str, str]:
        recent = self.history[-self.n_layers :]
        return {
            "fvu": f"{sum(r['fvu'] for r in recent) / len(recent):.3f}",
            "l0": f"{sum(r['l0'] for r in recent) / len(recent):.1f}",
        }

    def _check_finite_weights(self) -> None:
        for name, param in self.stack.named_parameters():
            finite = torch.isfinite(param).flatten(1).all(-1)
            if not bool(finite.all()):
                layer = self.layers[int((~finite).nonzero()[0])]
                raise FloatingPointError(
                    f"{name} of layer {layer} is non-finite after step {self.step}: the transcoder "
                    f"diverged (lower the learning rate, now {self.tcfg.lr}); not checkpointed"
                )

    def save(self, path: Path, position: BufferPosition, *, source_rows: int) -> None:
        self._check_finite_weights()
        state = {
            "format": CHECKPOINT_FORMAT,
            "train_config": self.tcfg.to_dict(),
            "d_model": self.d_model,
            "layers": list(self.layers),
            "source_rows": source_rows,
            "step": self.step,
            "total_steps": self.total,
            "position": position.to_dict(),
            "params": {name: p.detach().cpu() for name, p in self.stack.named_parameters()},
            "optimizer": self.optimizer.state_dict(),
            "scale_in": self.scale_in.cpu(),
            "scale_out": self.scale_out.cpu(),
            "since_fired": self.since_fired.cpu(),
            "generators": [generator.get_state() for generator in self.generators],
            "sums": {name: t.cpu() for name, t in self.sums.items()},
            "last_lr": getattr(self, "_last_lr", self.tcfg.lr),
            "last_l1": getattr(self, "_last_l1", 0.0),
            "history": self.history,
        }
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        record_checksums(path.parent, [path.name])

    def load(self, path: Path, *, source_rows: int) -> BufferPosition:
        verify_checksums(path.parent, fix="the checkpoint cannot be resumed from")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError) as error:  # truncated: torch's zip reader fails
            raise CorruptFileError(f"{path} cannot be read ({str(error).splitlines()[0]})") from error
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path} is not a transcoder training checkpoint of this c2srepro ({CHECKPOINT_FORMAT}): "
                "delete it, or use a fresh checkpoint_dir, to train afresh"
            )
        mine = {"d_model": self.d_model, "layers": list(self.layers), "source_rows": source_rows}
        differs = sorted(key for key, value in mine.items() if state[key] != value)
        saved_train = state["train_config"]
        differs += sorted(
            f"train_config.{key}" for key, value in self.tcfg.to_dict().items()
            if key not in _RESUMABLE_CHANGES and saved_train.get(key) != value
        )
        if differs:
            raise ValueError(
                f"the checkpoint {path} was written with different {differs}: resume with the same "
                "settings and activations, or use a fresh checkpoint_dir"
            )
        with torch.no_grad():
            for name, param in self.stack.named_parameters():
                param.copy_(state["params"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.scale_in = state["scale_in"].to(self.device)
        self.scale_out = state["scale_out"].to(self.device)
        self.since_fired = state["since_fired"].to(self.device)
        for generator, generator_state in zip(self.generators, state["generators"]):
            generator.set_state(generator_state)
        self.sums = {name: t.to(self.device) for name, t in state["sums"].items()}
        self._last_lr, self._last_l1 = state["last_lr"], state["last_l1"]
        self.history = list(state["history"])
        return BufferPosition(**state["position"])

    @torch.no_grad()
    def export(self) -> dict[int, Transcoder]:
        """Per-layer ``Transcoder``s in raw units: the scalars folded in (choice 1)."""
        out = {}
        for i, layer in enumerate(self.layers):
            s_in, s_out = float(self.scale_in[i]), float(self.scale_out[i])
            tcfg = self.tcfg
            cfg = TranscoderConfig(
                d_model=self.d_model, d_transcoder=self.d_tc, layer=layer, input_scale=s_in, output_scale=s_out,
                activation=tcfg.activation, k=tcfg.k if tcfg.activation in TOPK_ACTIVATIONS else None,
                skip=tcfg.skip, **self.provenance,
            )
            transcoder = Transcoder(cfg, train_config=tcfg)
            transcoder.W_enc.copy_(self.stack.W_enc[i] * (s_out / s_in))
            transcoder.b_enc.copy_(self.stack.b_enc[i] * s_out)
            transcoder.W_dec.copy_(self.stack.W_dec[i])
            transcoder.b_dec.copy_(self.stack.b_dec[i] * s_out)
            if self.stack.W_skip is not None:
                transcoder.W_skip.copy_(self.stack.W_skip[i] * (s_out / s_in))
            if self.stack.log_threshold is not None:
                transcoder.threshold.copy_(self.stack.log_threshold[i].exp() * s_out)
            if self.stack.threshold is not None:
                transcoder.threshold.copy_(self.stack.threshold[i] * s_out)
            out[layer] = transcoder.cpu()
        return out
