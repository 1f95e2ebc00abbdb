"""The replacement model: the C2S model with its MLPs replaced by transcoders, or removed.

1. ``replace_mlps`` makes ``blocks.{l}.hook_mlp_out`` of every chosen layer ``transcoder(x)`` for the
   MLP input x = ``blocks.{l}.hook_mlp_in`` (:meth:`c2srepro.models.hooked.HookedModel.replace_mlps`);
   ``remove_mlps`` makes it zeros (the MLP's contribution to the residual stream is dropped).
   Hooks are removed when the ``with`` block ends, even on error, and the model is never modified,
   so calling the model itself inside the block runs the replacement.
2. ``evaluate_replacement`` runs each right-padded batch of prompts three times: as is (recording
   every chosen MLP's input and output), with the chosen MLPs replaced, and with them removed.
3. Next-token loss: the cross-entropy of the logits at position t for token t+1, averaged over
   every real token t+1 >= 1 ("all tokens") and over those with t+1 >= answer_start ("answer
   tokens", the cell type; none when prompts carry no answer).
4. KL(original || modified) of the next-token distributions at the same positions, averaged.
5. Fraction of loss recovered = (L_noMLP - L_transcoder) / (L_noMLP - L_original): 1 when the
   transcoders are as good as the MLPs, 0 when no better than removing them (SAELens'
   ``ce_loss_score``). KL score = (KL_noMLP - KL_transcoder) / KL_noMLP, the same for the
   divergences (SAELens' ``kl_div_score``).
6. Per layer, on the original model's MLP inputs (so each transcoder is judged on the
   distribution it was trained on, not on the drift of earlier replacements): L0 (active
   features per token), FVU = sum ||t(x) - y||^2 / sum ||y - mean y||^2 over all evaluated
   tokens and explained variance 1 - FVU (SAELens' ``explained_variance``), each feature's firing
   frequency E(f), the dead fraction (E(f) = 0), the dense fraction (E(f) > ``dense_frequency``,
   features firing on more than that share of tokens) and the number of live features
   (log10 E(f) >= ``live_log10_threshold``; the paper uses -4 and -3). The transcoder output
   includes a skip transcoder's W_skip path.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm import tqdm

from c2srepro.data.prompts import pad_right
from c2srepro.models.hooked import HookedModel, as_hooked, hook_name
from c2srepro.transcoder.fit import check_transcoders_fit
from c2srepro.transcoder.harvest import as_prompt_set
from c2srepro.transcoder.model import Transcoder


@contextmanager
def replace_mlps(
    model: nn.Module | HookedModel, transcoders: Mapping[int, Transcoder], *, layers: Sequence[int] | None = None
) -> Iterator[nn.Module]:
    """Inside the block, the MLP of each of ``layers`` (default: every layer with a transcoder)
    outputs ``transcoders[layer](x)`` (step 1). Yields the Hugging Face model."""
    hooked = as_hooked(model)
    chosen = check_transcoders_fit(hooked, transcoders, layers=layers)
    device = hooked.device

    def substitute(transcoder: Transcoder):
        transcoder.to(device)
        return lambda x: transcoder(x.to(transcoder.W_enc.dtype))

    with hooked.replace_mlps({layer: substitute(tc) for layer, tc in chosen.items()}):
        yield hooked.model


@contextmanager
def remove_mlps(model: nn.Module | HookedModel, *, layers: Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Inside the block, the MLP of each of ``layers`` (default all) outputs zeros. Yields the Hugging Face model."""
    hooked = as_hooked(model)
    with hooked.replace_mlps({layer: torch.zeros_like for layer in hooked.check_layers(layers)}):
        yield hooked.model


@dataclass
class ReplacementReport:
    """Losses and divergences of the replacement and no-MLP models (dump with ``to_dict``)."""

    loss_original: float
    loss_transcoder: float
    loss_no_mlp: float
    kl_transcoder: float
    kl_no_mlp: float
    fraction_loss_recovered: float
    kl_score: float
    answer_loss_original: float
    answer_loss_transcoder: float
    answer_loss_no_mlp: float
    answer_kl_transcoder: float
    answer_kl_no_mlp: float
    answer_fraction_loss_recovered: float
    answer_kl_score: float
    mean_l0: float  # mean over layers of the per-layer L0
    mean_fvu: float
    mean_explained_variance: float
    mean_dead_fraction: float
    mean_dense_fraction: float
    layers: list[int]
    n_prompts: int
    n_tokens: int  # predicted tokens (all)
    n_answer_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (no answer tokens) becomes None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def next_token_terms(
    logits: Float[Tensor, "batch pos vocab"],
    reference_logits: Float[Tensor, "batch pos vocab"] | None,
    ids: Int[Tensor, "batch pos"],
) -> tuple[Float[Tensor, "batch pos_1"], Float[Tensor, "batch pos_1"] | None]:
    """Per predicted position t (predicting token t+1): cross-entropy and KL(reference || model)."""
    log_p = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [batch, pos-1, vocab]
    nll = -log_p.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if reference_logits is None:
        return nll, None
    log_q = torch.log_softmax(reference_logits[:, :-1].float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    return nll, kl


def evaluate_replacement(
    model: nn.Module,
    transcoders: Mapping[int, Transcoder],
    prompts,
    *,
    layers: Sequence[int] | None = None,
    batch_prompts: int = 8,
    live_log10_threshold: float = -4.0,
    dense_frequency: float = 0.1,
    progress: bool = True,
) -> tuple[ReplacementReport, pd.DataFrame]:
    """Compare the original, transcoder-replaced and MLP-removed models on ``prompts``.

    ``prompts``: ``EncodedPrompts`` (its ``answer_start`` marks the answer tokens) or lists of
    token ids. The same ``layers`` (default: every layer with a transcoder) are replaced and
    removed. Returns the summary and a per-layer table (layer, l0, fvu, mse, dead_fraction,
    n_live_features, n_features, n_tokens, explained_variance, dense_fraction).
    """
    hooked = as_hooked(model)
    fitting = check_transcoders_fit(hooked, transcoders, layers=layers)
    chosen = tuple(fitting)
    prompt_set = as_prompt_set(prompts)
    answer_start = list(getattr(prompts, "answer_start", None) or [len(ids) for ids in prompt_set.input_ids])
    if batch_prompts < 1:
        raise ValueError(f"batch_prompts must be >= 1, got {batch_prompts}")
    if not 0 < dense_frequency < 1:
        raise ValueError(f"dense_frequency must lie in (0, 1) (a share of tokens), got {dense_frequency}")
    hooked.model.eval()
    device = hooked.device
    for transcoder in fitting.values():
        transcoder.to(device)
    recorded = {layer: (hook_name(layer, "hook_mlp_in"), hook_name(layer, "hook_mlp_out")) for layer in chosen}

    totals = {key: 0.0 for key in ("orig", "tc", "none", "kl_tc", "kl_none")}
    answer = dict(totals)
    n_all = n_answer = 0
    stats = {layer: _LayerStats(fitting[layer], device) for layer in chosen}
    starts = range(0, len(prompt_set), batch_prompts)
    for start in tqdm(starts, desc="evaluating replacement", disable=not progress):
        indices = list(range(start, min(start + batch_prompts, len(prompt_set))))
        ids, mask = pad_right([prompt_set.input_ids[i] for i in indices])
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits_orig, record = hooked.run_with_cache(
                ids, [name for pair in recorded.values() for name in pair], attention_mask=mask
            )
            with replace_mlps(hooked, fitting):
                logits_tc = hooked.forward(ids, attention_mask=mask)
            with remove_mlps(hooked, layers=chosen):
                logits_none = hooked.forward(ids, attention_mask=mask)
            keep = mask.bool()
            for layer, (mlp_in, mlp_out) in recorded.items():
                stats[layer].add(record[mlp_in][keep], record[mlp_out][keep])
            valid = mask[:, 1:].bool()  # the predicted token t+1 is real
            first_answer = torch.as_tensor([answer_start[i] for i in indices], device=device)
            is_answer = valid & (torch.arange(1, ids.shape[1], device=device)[None] >= first_answer[:, None])
            nll_orig, _ = next_token_terms(logits_orig, None, ids)
            nll_tc, kl_tc = next_token_terms(logits_tc, logits_orig, ids)
            nll_none, kl_none = next_token_terms(logits_none, logits_orig, ids)
            for key, values in (("orig", nll_orig), ("tc", nll_tc), ("none", nll_none), ("kl_tc", kl_tc), ("kl_none", kl_none)):
                totals[key] += float(values[valid].double().sum())
                answer[key] += float(values[is_answer].double().sum())
            n_all += int(valid.sum())
            n_answer += int(is_answer.sum())

    mean = lambda total, n: total / n if n else float("nan")  # noqa: E731
    loss = {key: mean(value, n_all) for key, value in totals.items()}
    answer_loss = {key: mean(value, n_answer) for key, value in answer.items()}
    per_layer = pd.DataFrame([stats[layer].row(layer, live_log10_threshold, dense_frequency) for layer in chosen])
    report = ReplacementReport(
        loss_original=loss["orig"],
        loss_transcoder=loss["tc"],
        loss_no_mlp=loss["none"],
        kl_transcoder=loss["kl_tc"],
        kl_no_mlp=loss["kl_none"],
        fraction_loss_recovered=_recovered(loss),
        kl_score=_kl_score(loss),
        answer_loss_original=answer_loss["orig"],
        answer_loss_transcoder=answer_loss["tc"],
        answer_loss_no_mlp=answer_loss["none"],
        answer_kl_transcoder=answer_loss["kl_tc"],
        answer_kl_no_mlp=answer_loss["kl_none"],
        answer_fraction_loss_recovered=_recovered(answer_loss),
        answer_kl_score=_kl_score(answer_loss),
        mean_l0=float(per_layer["l0"].mean()),
        mean_fvu=float(per_layer["fvu"].mean()),
        mean_explained_variance=float(per_layer["explained_variance"].mean()),
        mean_dead_fraction=float(per_layer["dead_fraction"].mean()),
        mean_dense_fraction=float(per_layer["dense_fraction"].mean()),
        layers=list(chosen),
        n_prompts=len(prompt_set),
        n_tokens=n_all,
        n_answer_tokens=n_answer,
    )
    return report, per_layer


def _recovered(loss: dict[str, float]) -> float:
    gap = loss["none"] - loss["orig"]
    return (loss["none"] - loss["tc"]) / gap if gap else float("nan")


def _kl_score(loss: dict[str, float]) -> float:
    return (loss["kl_none"] - loss["kl_tc"]) / loss["kl_none"] if loss["kl_none"] else float("nan")


class _LayerStats:
    """Running sums for one layer's transcoder on the original MLP inputs (step 6)."""

    def __init__(self, transcoder: Transcoder, device: torch.device):
        self.transcoder = transcoder
        d_model, d_tc = transcoder.cfg.d_model, transcoder.cfg.d_tc
        self.n = 0
        self.sum_y = torch.zeros(d_model, dtype=torch.float64, device=device)
        self.sum_y2 = 0.0
        self.sum_err2 = 0.0
        self.sum_l0 = 0.0
        self.fires = torch.zeros(d_tc, dtype=torch.long, device=device)

    def add(self, x: Float[Tensor, "row d_model"], y: Float[Tensor, "row d_model"]) -> None:
        param = self.transcoder.W_enc
        y_hat, z = self.transcoder.forward_with_activations(x.to(param.dtype))  # [row, d_model], [row, d_tc]
        y = y.to(torch.float64)
        active = z > 0
        self.n += y.shape[0]
        self.sum_y += y.sum(0)
        self.sum_y2 += float(y.square().sum())
        self.sum_err2 += float((y_hat.double() - y).square().sum())
        self.sum_l0 += float(active.sum())
        self.fires += active.sum(0)

    def row(self, layer: int, live_log10_threshold: float, dense_frequency: float) -> dict[str, Any]:
        variance = self.sum_y2 - float(self.sum_y.square().sum()) / self.n
        frequency = self.fires.double() / self.n
        live = frequency >= 10.0**live_log10_threshold
        fvu = self.sum_err2 / variance if variance > 0 else float("nan")
        return {
            "layer": layer,
            "l0": self.sum_l0 / self.n,
            "fvu": fvu,
            "mse": self.sum_err2 / self.n,
            "dead_fraction": float((self.fires == 0).double().mean()),
            "n_live_features": int(live.sum()),
            "n_features": int(self.fires.numel()),
            "n_tokens": self.n,
            "explained_variance": 1.0 - fvu,
            "dense_fraction": float((frequency > dense_frequency).double().mean()),
        }
