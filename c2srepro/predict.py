"""Cell-type prediction with a C2S model: candidate-label scoring and greedy generation.

1. Scoring: for each cell and each candidate label, the summed log-probability of the answer
   tokens `` {label}.`` after the prompt; the prediction is the best-scoring label. The prompt
   is run once per cell; the candidates reuse its key/value cache.
2. Generation: greedy decoding from the prompt until the answer's closing ``.`` (or a token
   budget), as a user of the hub model would query it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from c2srepro.cells import CellSentence
from c2srepro.prompts import answer_text, encode_prompts
from c2srepro.tokenizer import CellTokenizer


@torch.no_grad()
def score_labels(
    model, tokenizer: CellTokenizer, sentences: Sequence[CellSentence], candidates: Sequence[str], **prompt_options
) -> np.ndarray:
    """Log-likelihood of each candidate answer: array [n_cells, n_candidates]."""
    if not candidates:
        raise ValueError("give at least one candidate label")
    prompts = encode_prompts(sentences, tokenizer, **prompt_options)
    answers = [tokenizer.encode(answer_text(label))[0] for label in candidates]
    device = next(model.parameters()).device
    scores = np.zeros((len(prompts), len(candidates)))
    for row in tqdm(range(len(prompts)), desc="scoring labels", disable=len(prompts) < 50):
        # Prompt and answer are tokenised apart, as the answer is appended after the prompt's last
        # token; BPE never merges across the space that starts the answer.
        prompt = torch.tensor(prompts.input_ids[row], device=device)
        width = max(len(a) for a in answers)
        batch = torch.full((len(answers), len(prompt) + width), tokenizer.pad_id, device=device)
        mask = torch.zeros_like(batch)
        for column, answer in enumerate(answers):
            batch[column, : len(prompt)] = prompt
            batch[column, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
            mask[column, : len(prompt) + len(answer)] = 1
        log_probs = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), dim=-1)
        for column, answer in enumerate(answers):
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer), device=device)
            scores[row, column] = log_probs[column, positions, torch.tensor(answer, device=device)].sum().item()
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
