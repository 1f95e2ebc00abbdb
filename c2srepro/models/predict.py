"""Cell-type prediction with a C2S model: candidate-label scoring and greedy generation.

1. Scoring: for each cell and each candidate label, the summed log-probability of the answer
   tokens `` {label}.`` after the prompt; the prediction is the best-scoring label. Prompts of
   equal length run once, together, and every candidate continues from their key/value cache
   (two forward passes per batch, :func:`score_labels`; :func:`label_log_likelihoods` does the
   same for one prompt, and hooks installed around either see both passes).
   Log-probabilities are taken in float32, or in the model's dtype when it is wider.
2. Generation: greedy decoding from the prompt until the answer's closing ``.`` (or a token
   budget), as a user of the hub model would query it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import answer_text, encode_prompts, pad_right, require_cell_sentences
from c2srepro.data.tokenizer import CellTokenizer


def answer_tokens(
    tokenizer: CellTokenizer, candidates: Sequence[str], *, device: torch.device | str = "cpu"
) -> tuple[Int[Tensor, "candidate answer"], Int[Tensor, "candidate answer"]]:
    """Each candidate's answer `` {label}.`` as right-padded token ids and their mask (1 on real tokens)."""
    if not candidates:
        raise ValueError("give at least one candidate label")
    # Prompt and answer are tokenised apart, as the answer is appended after the prompt's last
    # token; BPE never merges across the space that starts the answer.
    answers = [tokenizer.encode(answer_text(label))[0] for label in candidates]
    return tuple(t.to(device) for t in pad_right(answers, pad_id=tokenizer.pad_id))


def _wide(logits: Tensor) -> Tensor:
    """Logits in float32, or in their own dtype when it is wider (module docstring, step 1)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def answer_log_likelihoods(
    logits: Float[Tensor, "candidate answer vocab"],
    answer_ids: Int[Tensor, "candidate answer"],
    answer_mask: Int[Tensor, "candidate answer"],
) -> Float[Tensor, "candidate"]:
    """Summed log-probability of each candidate's answer tokens; ``logits[c, j]`` predicts answer token j."""
    log_probs = torch.log_softmax(_wide(logits), dim=-1)
    return (log_probs.gather(-1, answer_ids[..., None])[..., 0] * answer_mask).sum(dim=-1)


def label_probabilities(log_likelihood: np.ndarray) -> np.ndarray:
    """Each candidate's probability among the candidates: the softmax of their log-likelihoods over
    the last axis (shifted by the maximum, so large negative scores do not underflow to 0/0)."""
    shifted = np.exp(log_likelihood - log_likelihood.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@torch.no_grad()
def label_log_likelihoods(
    model,
    prompt: Int[Tensor, "*rows pos"],
    answer_ids: Int[Tensor, "candidate answer"],
    answer_mask: Int[Tensor, "candidate answer"],
) -> Float[Tensor, "*rows candidate"]:
    """Step 1 for one prompt, or several of one length: a pass over the prompts, then one over
    every answer from their cache."""
    prompts = prompt if prompt.dim() == 2 else prompt[None]
    n_rows, n_candidates = prompts.shape[0], len(answer_ids)
    out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache = out.cache  # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` before)
    cache.batch_repeat_interleave(n_candidates)  # row-major: prompt r's candidates are adjacent
    ones = torch.ones(n_rows * n_candidates, prompts.shape[1], dtype=answer_mask.dtype, device=answer_mask.device)
    mask = torch.cat([ones, answer_mask.repeat(n_rows, 1)], 1)
    rest = model(input_ids=answer_ids.repeat(n_rows, 1), attention_mask=mask, cache=cache).logits
    # The prompt's last position predicts each answer's first token, answer position j token j + 1.
    first = out.logits[:, -1:].repeat_interleave(n_candidates, dim=0)
    logits = torch.cat([first, rest[:, :-1]], dim=1)
    scores = answer_log_likelihoods(logits, answer_ids.repeat(n_rows, 1), answer_mask.repeat(n_rows, 1))
    return scores.view(n_rows, n_candidates) if prompt.dim() == 2 else scores


@torch.no_grad()
def score_labels(
    model,
    tokenizer: CellTokenizer,
    sentences: Sequence[CellSentence],
    candidates: Sequence[str],
    *,
    batch_size: int = 64,
    progress: bool | None = None,
    **prompt_options,
) -> Float[np.ndarray, "sentence candidate"]:
    """Log-likelihood of each candidate answer after each sentence's prompt: [sentence, candidate]
    (module docstring, step 1). Prompts of equal token length run together, unpadded, and share
    their key/value cache with every candidate's answer, ``batch_size`` answer sequences a pass."""
    require_cell_sentences(sentences, where="score_labels")
    if not candidates:
        raise ValueError("give at least one candidate label")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = encode_prompts(sentences, tokenizer, **prompt_options)
    device = next(model.parameters()).device
    answer_ids, answer_mask = answer_tokens(tokenizer, candidates, device=device)  # [candidate, answer]
    by_length: dict[int, list[int]] = {}
    for row, ids in enumerate(prompts.input_ids):
        by_length.setdefault(len(ids), []).append(row)
    per_pass = max(1, batch_size // len(candidates))  # prompts per pass: each continues into every candidate
    chunks = [rows[i : i + per_pass] for rows in by_length.values() for i in range(0, len(rows), per_pass)]
    scores = torch.zeros(len(prompts), len(candidates), dtype=torch.float64, device=device)  # moved once, at the end
    for rows in tqdm(chunks, desc="label scores", disable=not progress if progress is not None else len(chunks) < 50):
        prompt = torch.tensor([prompts.input_ids[r] for r in rows], device=device)  # [rows, pos], one length
        scores[rows] = label_log_likelihoods(model, prompt, answer_ids, answer_mask).to(torch.float64)
    return scores.cpu().numpy()


def predict_labels(model, tokenizer, sentences, candidates, **prompt_options) -> list[str]:
    scores = score_labels(model, tokenizer, sentences, candidates, **prompt_options)
    return [candidates[i] for i in scores.argmax(axis=1)]


@torch.no_grad()
def generate_labels(
    model, tokenizer: CellTokenizer, sentences: Sequence[CellSentence], *, max_new_tokens: int = 16, **prompt_options
) -> list[str]:
    """Greedy answers, cut at the first ``.``, stripped."""
    prompts = encode_prompts(sentences, tokenizer, **prompt_options)
    device = next(model.parameters()).device
    answers = []
    for ids in tqdm(prompts.input_ids, desc="generating", disable=len(prompts) < 50):
        sequence = torch.tensor([ids], device=device)
        out = model.generate(
            sequence, attention_mask=torch.ones_like(sequence), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id,
        )
        text = tokenizer.decode(out[0, len(ids) :].tolist())
        answers.append(text.split(".")[0].strip())
    return answers
