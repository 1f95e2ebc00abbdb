"""Cell-type prediction with a C2S model: candidate-label scoring and greedy generation.

1. Scoring: for each cell and each candidate label, the summed log-probability of the answer
   tokens `` {label}.`` after the prompt; the prediction is the best-scoring label. The prompt
   is run once per cell and every candidate continues from its key/value cache.
2. Generation: greedy decoding from the prompt until the answer's closing ``.`` (or a token
   budget), as a user of the hub model would query it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import answer_text, encode_prompts, pad_right
from c2srepro.data.tokenizer import CellTokenizer


@torch.no_grad()
def score_labels(
    model, tokenizer: CellTokenizer, sentences: Sequence[CellSentence], candidates: Sequence[str], **prompt_options
) -> np.ndarray:
    """Log-likelihood of each candidate answer: array [n_cells, n_candidates]."""
    if not candidates:
        raise ValueError("give at least one candidate label")
    prompts = encode_prompts(sentences, tokenizer, **prompt_options)
    # Prompt and answer are tokenised apart, as the answer is appended after the prompt's last
    # token; BPE never merges across the space that starts the answer.
    answers = [tokenizer.encode(answer_text(label))[0] for label in candidates]
    device = next(model.parameters()).device
    answer_ids, answer_mask = (t.to(device) for t in pad_right(answers, pad_id=tokenizer.pad_id))  # [candidate, pos]
    scores = np.zeros((len(prompts), len(candidates)))
    for row in tqdm(range(len(prompts)), desc="scoring labels", disable=len(prompts) < 50):
        prompt = torch.tensor([prompts.input_ids[row]], device=device)  # [1, pos]
        out = model(input_ids=prompt, use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each answer's first token
        cache = out.cache  # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` before)
        cache.batch_repeat_interleave(len(answers))  # the prompt is run once, shared by every candidate
        mask = torch.cat([torch.ones(len(answers), prompt.shape[1], dtype=answer_mask.dtype, device=device), answer_mask], 1)
        rest = torch.log_softmax(model(input_ids=answer_ids, attention_mask=mask, cache=cache).logits.float(), -1)
        # rest[c, j] predicts answer token j + 1
        following = rest[:, :-1].gather(-1, answer_ids[:, 1:, None])[..., 0] * answer_mask[:, 1:]
        scores[row] = (first[answer_ids[:, 0]] + following.sum(1)).cpu().numpy()
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
