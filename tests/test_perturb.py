import numpy as np
import pytest
import torch
from conftest import tiny_c2s

from c2srepro.biology.perturb import (
    knock_out,
    move_gene,
    perturbation_effects,
    remove_gene,
    removal_effects,
    swap_genes,
)
from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import answer_text, build_prompt, encode_prompts
from c2srepro.models.predict import score_labels

CELL = CellSentence(7, "c7", ("CD14", "LYZ", "S100A8", "VWF", "PTPRB"), "CD14+ Monocyte")
OTHER = CellSentence(8, "c8", ("NKG7", "GNLY", "CST7", "CD14"), "CD56+ NK")
LABELS = ["CD14+ Monocyte", "CD56+ NK", "CD19+ B"]


def test_remove_moves_the_genes_below_up_one_rank():
    removed = remove_gene(CELL, "LYZ")
    assert removed.genes == ("CD14", "S100A8", "VWF", "PTPRB")
    assert (removed.cell_id, removed.cell_index, removed.label) == (CELL.cell_id, CELL.cell_index, CELL.label)
    assert knock_out(CELL, ["PTPRB", "CD14"]).genes == ("LYZ", "S100A8", "VWF")


def test_move_and_swap():
    assert move_gene(CELL, "VWF", 1).genes == ("VWF", "CD14", "LYZ", "S100A8", "PTPRB")
    assert move_gene(CELL, "CD14", 5).genes == ("LYZ", "S100A8", "VWF", "PTPRB", "CD14")
    assert move_gene(CELL, "LYZ", 2).genes == CELL.genes
    assert swap_genes(CELL, "CD14", "PTPRB").genes == ("PTPRB", "LYZ", "S100A8", "VWF", "CD14")
    for perturbed in (move_gene(CELL, "VWF", 3), swap_genes(CELL, "LYZ", "VWF"), remove_gene(CELL, "VWF")):
        assert len(set(perturbed.genes)) == len(perturbed.genes)
        assert set(perturbed.genes) <= set(CELL.genes)


def test_perturbed_prompts_map_tokens_to_genes_exactly(tokenizer):
    for perturbed in (remove_gene(CELL, "LYZ"), move_gene(CELL, "PTPRB", 1), swap_genes(CELL, "CD14", "VWF")):
        prompt = encode_prompts([perturbed], tokenizer)
        genes = [g for g in prompt.gene_of_token[0] if g is not None]
        assert list(dict.fromkeys(genes)) == list(perturbed.genes)
        text = prompt.texts[0]
        for gene in perturbed.genes:  # each gene's tokens spell the gene
            ids = [i for i, g in zip(prompt.input_ids[0], prompt.gene_of_token[0]) if g == gene]
            assert tokenizer.decode(ids).strip() == gene
        assert perturbed.text in text


def test_perturbation_errors():
    with pytest.raises(ValueError, match="gene 'XIST' is not in cell 'c7'"):
        remove_gene(CELL, "XIST")
    with pytest.raises(ValueError, match="rank must be in 1..5"):
        move_gene(CELL, "LYZ", 0)
    with pytest.raises(ValueError, match="swap needs two different genes"):
        swap_genes(CELL, "LYZ", "LYZ")
    with pytest.raises(ValueError, match="leaves an empty sentence"):
        knock_out(CELL, list(CELL.genes))
    with pytest.raises(ValueError, match="repeated"):
        knock_out(CELL, ["LYZ", "LYZ"])
    with pytest.raises(TypeError, match="pass \\['LYZ'\\]"):
        knock_out(CELL, "LYZ")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return tiny_c2s(tokenizer, [CELL, OTHER, remove_gene(CELL, "LYZ")], LABELS)


@torch.no_grad()
def full_sequence_scores(model, cell_tokenizer, sentences, labels) -> np.ndarray:
    """The reference: one uncached forward pass over each prompt + answer, its answer tokens' log-probabilities summed."""
    scores = np.zeros((len(sentences), len(labels)))
    for i, ids in enumerate(encode_prompts(sentences, cell_tokenizer).input_ids):
        for j, label in enumerate(labels):
            answer = list(cell_tokenizer.encode(answer_text(label))[0])
            logits = model(input_ids=torch.tensor([list(ids) + answer])).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)[len(ids) - 1 : -1]
            scores[i, j] = float(log_probs.gather(-1, torch.tensor(answer)[:, None]).sum())
    return scores


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_batched_scores_equal_full_sequence_passes(tiny, batch_size):
    model, cell_tokenizer = tiny
    sentences = [CELL, OTHER, remove_gene(CELL, "LYZ")]
    ours = score_labels(model, cell_tokenizer, sentences, LABELS, batch_size=batch_size)
    reference = full_sequence_scores(model, cell_tokenizer, sentences, LABELS)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_effects_are_score_differences(tiny):
    model, cell_tokenizer = tiny
    effects = removal_effects(model, cell_tokenizer, CELL, LABELS, genes=["LYZ", "VWF"], keep_gene_count=False)
    direct = score_labels(model, cell_tokenizer, [CELL, remove_gene(CELL, "LYZ"), remove_gene(CELL, "VWF")], LABELS)
    assert effects.label == LABELS[int(direct[0].argmax())]
    label = LABELS.index(effects.label)
    np.testing.assert_allclose(effects.delta, direct[1:, label] - direct[0, label], atol=1e-5)
    p = np.exp(direct - direct.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(effects.total_variation, 0.5 * np.abs(p[1:] - p[0]).sum(1), atol=1e-5)
    assert effects.names == ["remove LYZ", "remove VWF"]
    assert list(effects.table()["delta_logprob"]) == list(effects.delta)


def test_kept_gene_count_changes_only_the_gene_list(tiny):
    model, cell_tokenizer = tiny
    perturbed = remove_gene(CELL, "LYZ")
    effects = perturbation_effects(model, cell_tokenizer, CELL, [perturbed], LABELS, label="CD56+ NK")
    template = build_prompt(CELL).text.replace(CELL.text, "{cell_sentence}")
    direct = score_labels(model, cell_tokenizer, [CELL, perturbed], LABELS, template=template)
    np.testing.assert_allclose(effects.scores[0], direct[1], atol=1e-5)
    assert effects.delta[0] == pytest.approx(direct[1, 1] - direct[0, 1], abs=1e-5)


def test_effect_errors(tiny):
    model, cell_tokenizer = tiny
    with pytest.raises(ValueError, match="label 'B cell' is not among the candidates"):
        perturbation_effects(model, cell_tokenizer, CELL, [remove_gene(CELL, "LYZ")], LABELS, label="B cell")
    with pytest.raises(ValueError, match="1 perturbed sentences but 2 names"):
        perturbation_effects(model, cell_tokenizer, CELL, [remove_gene(CELL, "LYZ")], LABELS, names=["a", "b"])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_labels(model, cell_tokenizer, [CELL], LABELS, batch_size=0)
    with pytest.raises(TypeError, match="expected a list of CellSentence"):
        score_labels(model, cell_tokenizer, CELL, LABELS)
