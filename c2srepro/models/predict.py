"""Cell-type prediction with a C2S model: candidate-label scoring and greedy generation.

1. Scoring: for each cell and each candidate label, the summed log-probability of the answer
   tokens `` {label}.`` after the prompt; the prediction is the best-scoring label. The prompt
   is run once per cell and every candidate continues from its key/value cache (two forward
   passes per cell, :func:`label_log_likelihoods`; hooks installed around it see both).
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
from c2srepro.data.prompts import answer_text, encode_prompts, pad_right
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


def answer_log_likelihoods(
    logits: Float[Tensor, "candidate answer vocab"],
    answer_ids: Int[Tensor, "candidate answer"],
    answer_mask: Int[Tensor, "candidate answer"],
) -> Float[Tensor, "candidate"]:
    """Summed log-probability of each candidate's answer tokens; ``logits[c, j]`` predicts answer token j."""
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return (log_probs.gather(-1, answer_ids[..., None])[..., 0] * answer_mask).sum(dim=-1)


def label_probabilities(log_likelihood: np.ndarray) -> np.ndarray:
    """Each candidate's probability among the candidates: the softmax of their log-likelihoods over
    the last axis (shifted by the maximum, so large negative scores do not underflow to 0/0)."""
    shifted = np.exp(log_likelihood - log_likelihood.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@torch.no_grad()
def label_log_likelihoods(
    model,
    prompt: Int[Tensor, "pos"],
    answer_ids: Int[Tensor, "candidate answer"],
    answer_mask: Int[Tensor, "candidate answer"],
) -> Float[Tensor, "candidate"]:
    """Step 1 for one prompt: a pass over the prompt, then one over every answer from its cache."""
    out = model(input_ids=prompt[None], use_cache=True)
    cache = out.cache  # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` before)
    cache.batch_repeat_interleave(len(answer_ids))  # the prompt is run once, shared by every candidate
    prompt_mask = torch.ones(len(answer_ids), prompt.shape[0], dtype=answer_mask.dtype, device=answer_mask.device)
    rest = model(input_ids=answer_ids, attention_mask=torch.cat([prompt_mask, answer_mask], 1), cache=cache).logits
    # The prompt's last position predicts each answer's first token, answer position j token j + 1.
    first = out.logits[:, -1:].expand(len(answer_ids), 1, -1)
    return answer_log_likelihoods(torch.cat([first, rest[:, :-1]], dim=1), answer_ids, answer_mask)


@torch.no_grad()
def score_labels(
    model, tokenizer: CellTokenizer, sentences: Sequence[CellSentence], candidates: Sequence[str], **prompt_options
) -> np.ndarray:
    """Log-likelihood of each candidate answer: array [n_cells, n_candidates]."""
    prompts = encode_prompts(sentences, tokenizer, **prompt_options)  # checks sentences and tokenizer first
    device = next(model.parameters()).device
    answer_ids, answer_mask = answer_tokens(tokenizer, candidates, device=device)
    scores = np.zeros((len(prompts), len(candidates)))
    for row in tqdm(range(len(prompts)), desc="scoring labels", disable=len(prompts) < 50):
        prompt = torch.tensor(prompts.input_ids[row], device=device)
        scores[row] = label_log_likelihoods(model, prompt, answer_ids, answer_mask).cpu().numpy()
    return scores


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
