"""The C2S cell-type prompt, its tokens, and the gene each token lies in.

1. Fill the C2S template with a cell sentence; for training, append the answer `` {label}.``.
2. Tokenise with the model's tokenizer, keeping each token's character span; the tokenizer's own
   leading markers are added as its ``tokenizer(text)`` adds them (C2S-Scale-Gemma-2's ``<bos>``;
   the Pythia BPE of the C2S Pythia models adds none), and lie in no gene.
3. A token belongs to a gene when its span overlaps that gene's span in the prompt. Gene spans
   are known exactly because the sentence is the genes joined by single spaces at a known
   offset, so the map is exact even when a symbol splits into several tokens (V|WF, ĠPT|PR|B).
4. The steps of the flow take different objects (an AnnData, cell sentences, ``EncodedPrompts``,
   one prompt's token ids); ``require_*`` check them at the door, so that the wrong one raises a
   ``TypeError`` naming the expected type and the call that makes it, not an error deep inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import anndata as ad
import torch

from c2srepro.data.cells import CellSentence
from c2srepro.data.tokenizer import CellTokenizer

# One of the C2S cell-type prediction prompts (the answer follows as " {cell_type}.").
C2S_CELL_TYPE_TEMPLATE = (
    "The following is a list of {num_genes} gene names ordered by descending expression level in "
    "a {organism} cell. Your task is to give the cell type which this cell belongs to based on "
    "its gene expression.\nCell sentence: {cell_sentence}.\nThe cell type corresponding to these "
    "genes is:"
)
SENTENCE_FIELD = "{cell_sentence}"


def answer_text(label: str) -> str:
    return f" {label}."


@dataclass
class Prompt:
    text: str
    gene_spans: list[tuple[int, int, str]]  # (start, end, symbol) of each gene in ``text``
    answer_start_char: int  # len(text) of the bare prompt; the answer, if any, follows


def build_prompt(
    sentence: CellSentence,
    *,
    organism: str = "Homo sapiens",
    template: str = C2S_CELL_TYPE_TEMPLATE,
    with_answer: bool = False,
) -> Prompt:
    """The prompt for one cell; ``with_answer`` appends the cell's label (training)."""
    if template.count(SENTENCE_FIELD) != 1:
        raise ValueError(f"the prompt template must contain {SENTENCE_FIELD} exactly once")
    head, tail = template.split(SENTENCE_FIELD)
    head = head.format(num_genes=len(sentence.genes), organism=organism)
    tail = tail.format(num_genes=len(sentence.genes), organism=organism)
    spans, cursor = [], len(head)
    for gene in sentence.genes:
        spans.append((cursor, cursor + len(gene), gene))
        cursor += len(gene) + 1
    text = head + sentence.text + tail
    answer_start_char = len(text)
    if with_answer:
        if sentence.label is None:
            raise ValueError(f"cell {sentence.cell_id!r} has no label to append as the answer")
        text += answer_text(sentence.label)
    return Prompt(text, spans, answer_start_char)


def genes_of_tokens(offsets: Sequence[tuple[int, int]], gene_spans: Sequence[tuple[int, int, str]]) -> list[str | None]:
    """For each token span, the gene whose span it overlaps (None for template text)."""
    genes: list[str | None] = []
    span_index = 0
    for start, end in offsets:
        while span_index < len(gene_spans) and gene_spans[span_index][1] <= start:
            span_index += 1
        inside = span_index < len(gene_spans) and gene_spans[span_index][0] < end
        if inside and span_index + 1 < len(gene_spans) and gene_spans[span_index + 1][0] < end:
            raise ValueError(f"token at characters {start}-{end} spans two genes")
        genes.append(gene_spans[span_index][2] if inside else None)
    return genes


@dataclass
class EncodedPrompts:
    """Tokenised prompts with, per token, the gene it lies in."""

    input_ids: list[list[int]] = field(default_factory=list)  # model token ids of each prompt
    answer_start: list[int] = field(default_factory=list)  # first answer token (== len if none)
    cell_index: list[int] = field(default_factory=list)  # row of the source cell in the AnnData
    gene_of_token: list[list[str | None]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> "EncodedPrompts":
        pick = lambda values: [values[i] for i in indices]  # noqa: E731
        return EncodedPrompts(*(pick(getattr(self, name)) for name in self.__dataclass_fields__))

    @property
    def n_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def encode_prompts(
    sentences: Sequence[CellSentence],
    tokenizer: CellTokenizer,
    *,
    with_answer: bool = False,
    organism: str = "Homo sapiens",
    template: str = C2S_CELL_TYPE_TEMPLATE,
) -> EncodedPrompts:
    """Tokenise the prompts of ``sentences`` and map each token to its gene."""
    require_cell_sentences(sentences, where="encode_prompts")
    require_cell_tokenizer(tokenizer, where="encode_prompts")
    encoded = EncodedPrompts()
    for sentence in sentences:
        prompt = build_prompt(sentence, organism=organism, template=template, with_answer=with_answer)
        ids, offsets = tokenizer.encode(prompt.text, special_tokens=True)
        answer_start = next(
            (i for i, (start, _) in enumerate(offsets) if start >= prompt.answer_start_char), len(ids)
        )
        encoded.input_ids.append(ids)
        encoded.answer_start.append(answer_start)
        encoded.cell_index.append(sentence.cell_index)
        encoded.gene_of_token.append(genes_of_tokens(offsets, prompt.gene_spans))
        encoded.labels.append(sentence.label)
        encoded.texts.append(prompt.text)
    return encoded


def pad_right(sequences: Sequence[Sequence[int]], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [batch, pos] and the attention mask [batch, pos] (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


_ENCODE_HINT = "encode them first: encode_prompts(cell_sentences(adata), tokenizer)"


def _described(obj) -> str:
    """What ``obj`` is, for an error message: its type, and for a sequence its first element's."""
    if isinstance(obj, torch.Tensor):
        return f"a {str(obj.dtype).removeprefix('torch.')} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)) and obj:
        return f"a {type(obj).__name__} of {len(obj)} {type(obj[0]).__name__}"
    return type(obj).__name__


def require_cell_sentences(sentences, *, where: str) -> None:
    """``TypeError`` unless ``sentences`` is a sequence of ``CellSentence``."""
    if isinstance(sentences, ad.AnnData):
        hint = "make the cell sentences first: cell_sentences(adata)"
    elif isinstance(sentences, CellSentence):
        hint = "pass a list, [sentence], for one cell"
    elif isinstance(sentences, (str, bytes)) or not isinstance(sentences, Sequence):
        hint = "make them with cell_sentences(adata)"
    else:
        wrong = next((s for s in sentences if not isinstance(s, CellSentence)), None)
        if wrong is None:
            return
        hint = f"found a {type(wrong).__name__}; make them with cell_sentences(adata)"
    raise TypeError(f"{where}: expected a list of CellSentence, got {_described(sentences)}: {hint}")


def require_cell_tokenizer(tokenizer, *, where: str) -> None:
    """``TypeError`` unless ``tokenizer`` is a ``CellTokenizer``."""
    if isinstance(tokenizer, CellTokenizer):
        return
    wrap = (
        "; a Hugging Face tokenizer of a full-vocabulary model can be wrapped as CellTokenizer(hf_tokenizer)"
        if hasattr(tokenizer, "convert_ids_to_tokens")
        else ""
    )
    raise TypeError(
        f"{where}: expected a CellTokenizer (token ids in the model's vocabulary, with character "
        f"offsets), got {type(tokenizer).__name__}: load the model's own with model, tokenizer = "
        f"load_c2s_model(model_dir) or CellTokenizer.load(model_dir=model_dir){wrap}"
    )


def require_encoded_prompts(prompts, *, where: str) -> None:
    """``TypeError`` unless ``prompts`` is ``EncodedPrompts`` (anything with ``input_ids``) or a
    sequence of token-id sequences."""
    if hasattr(prompts, "input_ids"):
        return
    if isinstance(prompts, (CellSentence, ad.AnnData, str, bytes)) or not hasattr(prompts, "__iter__"):
        bad = prompts
    elif isinstance(prompts, (list, tuple)):  # other iterables (tensors, iterators) are not walked twice
        bad = next((p for p in prompts if isinstance(p, (CellSentence, str, bytes)) or not hasattr(p, "__len__")), None)
    else:
        bad = None
    if bad is None:
        return
    if isinstance(bad, ad.AnnData):
        hint = "make cell sentences and " + _ENCODE_HINT
    elif isinstance(bad, CellSentence):
        hint = _ENCODE_HINT
    elif hasattr(bad, "__index__"):
        hint = "for a single prompt pass a list of one, [input_ids]"
    else:
        hint = f"found a {type(bad).__name__}; " + _ENCODE_HINT
    raise TypeError(
        f"{where}: expected EncodedPrompts (or a list of token-id lists), got {_described(prompts)}: {hint}"
    )


def require_prompt_ids(input_ids, *, where: str) -> None:
    """``TypeError`` unless ``input_ids`` is one prompt's integer token ids ([pos] or [1, pos])."""
    one = "one prompt's input ids ([pos] or [1, pos] integers)"
    if hasattr(input_ids, "input_ids"):
        raise TypeError(
            f"{where}: expected {one}, got {type(input_ids).__name__} of {len(input_ids.input_ids)} prompts: "
            "pass prompts.input_ids[i] for prompt i"
        )
    if isinstance(input_ids, CellSentence):
        raise TypeError(
            f"{where}: expected {one}, got a CellSentence: encode_prompts([sentence], tokenizer).input_ids[0]"
        )
    try:
        ids = None if isinstance(input_ids, (str, bytes)) else torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is not None and ids.numel() == 0:
        return  # an empty prompt is a ValueError of the caller's own checks
    if ids is None or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(
            f"{where}: expected {one}, got {_described(input_ids)}: prompt i's are "
            "encode_prompts(sentences, tokenizer).input_ids[i]"
        )
    if ids.dim() == 2 and ids.shape[0] > 1:
        raise TypeError(f"{where}: expected {one}, got a batch of {ids.shape[0]} prompts: pass one row")
