import pytest

from c2srepro.data.cells import CellSentence
from c2srepro.data.prompts import build_prompt, encode_prompts, genes_of_tokens
from c2srepro.data.tokenizer import PYTHIA_SHA256, CellTokenizer, pythia_tokenizer_file
from c2srepro._cache import sha256_file

SPLIT_GENES = ("VWF", "PTPRB", "HSP90AA1", "MT-ND4", "GOLGA4", "PSD3", "RDX")


def test_tokenizer_file_is_pinned():
    assert sha256_file(pythia_tokenizer_file()) == PYTHIA_SHA256


def test_pythia_vocabulary_and_specials(tokenizer):
    assert len(tokenizer.bpe) == 50_277  # the OLMo file's three PII tokens are dropped
    assert tokenizer.bpe.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]
    assert tokenizer.eos_id == 0 and tokenizer.pad_id == 1


def test_gene_symbols_split_as_in_the_paper(tokenizer):
    ids, _ = tokenizer.encode(" VWF PTPRB HSP90AA1 GOLGA4 PSD3")
    assert tokenizer.tokens(ids) == ["ĠV", "WF", "ĠPT", "PR", "B", "ĠHSP", "90", "AA", "1", "ĠG", "OL", "GA", "4", "ĠPSD", "3"]


def test_token_to_gene_map_on_multi_token_genes(tokenizer):
    sentence = CellSentence(0, "c0", SPLIT_GENES, "endothelial cell")
    encoded = encode_prompts([sentence], tokenizer, with_answer=True)
    tokens, genes = tokenizer.tokens(encoded.input_ids[0]), encoded.gene_of_token[0]
    # every gene's tokens, concatenated, spell the gene (with its leading space)
    for gene in SPLIT_GENES:
        pieces = [t for t, g in zip(tokens, genes) if g == gene]
        assert len(pieces) >= 2, gene
        assert "".join(pieces).replace("Ġ", " ").strip() == gene
    # template text and the answer map to no gene
    answer = encoded.answer_start[0]
    assert all(g is None for g in genes[answer:])
    assert tokenizer.decode(encoded.input_ids[0][answer:]) == " endothelial cell."
    assert genes[:5] == [None] * 5
    # the period after the last gene is not part of it
    last = max(i for i, g in enumerate(genes) if g == "RDX")
    assert tokens[last + 1] == "." and genes[last + 1] is None


def test_prompt_template_and_answer():
    sentence = CellSentence(3, "c3", ("CD14", "LYZ"), "CD14+ Monocyte")
    prompt = build_prompt(sentence, with_answer=True)
    assert "list of 2 gene names" in prompt.text
    assert "Cell sentence: CD14 LYZ.\nThe cell type corresponding to these genes is: CD14+ Monocyte." in prompt.text
    assert [prompt.text[s:e] for s, e, _ in prompt.gene_spans] == ["CD14", "LYZ"]
    assert prompt.text[prompt.answer_start_char :] == " CD14+ Monocyte."


def test_answer_requires_label():
    with pytest.raises(ValueError, match="no label"):
        build_prompt(CellSentence(0, "c0", ("A",), None), with_answer=True)


def test_template_needs_the_sentence_field():
    with pytest.raises(ValueError, match="exactly once"):
        build_prompt(CellSentence(0, "c0", ("A",), None), template="no field")


def test_genes_of_tokens_rejects_a_token_across_two_genes():
    with pytest.raises(ValueError, match="spans two genes"):
        genes_of_tokens([(0, 9)], [(0, 3, "AAA"), (4, 7, "BBB")])


def test_a_hugging_face_tokenizer_is_a_type_error_naming_cell_tokenizer(tokenizer):
    sentence = CellSentence(0, "c0", ("CD14", "LYZ"), None)
    with pytest.raises(TypeError, match=r"encode_prompts: expected a CellTokenizer .* got GPTNeoXTokenizer\w*: .*"
                       r"load_c2s_model\(model_dir\) or CellTokenizer\.load.*CellTokenizer\(hf_tokenizer\)"):
        encode_prompts([sentence], tokenizer.bpe)
    wrapped = encode_prompts([sentence], CellTokenizer(tokenizer.bpe))  # the fix the message names
    assert wrapped.input_ids == encode_prompts([sentence], tokenizer).input_ids


def test_encode_prompts_wants_cell_sentences(tokenizer):
    from tests.conftest import make_adata

    adata = make_adata([[1, 2]], ["a", "b"])
    with pytest.raises(TypeError, match=r"expected a list of CellSentence, got AnnData: .*cell_sentences\(adata\)"):
        encode_prompts(adata, tokenizer)
    with pytest.raises(TypeError, match=r"got a list of 2 str: found a str; make them with cell_sentences"):
        encode_prompts(["CD14 LYZ", "CD3E"], tokenizer)
    with pytest.raises(TypeError, match=r"pass a list, \[sentence\]"):
        encode_prompts(CellSentence(0, "c0", ("A",), None), tokenizer)


def test_a_tokenizer_that_adds_bos_gets_it_on_prompts_not_on_answers(tokenizer, tmp_path):
    # Gemma's tokenizer (C2S-Scale) starts every text with <bos> as tokenizer(text) does; the Pythia
    # BPE saved with add_bos_token=True behaves the same way, with <|endoftext|> as its bos.
    from transformers import AutoTokenizer

    tokenizer.bpe.save_pretrained(tmp_path)
    with_bos = CellTokenizer(AutoTokenizer.from_pretrained(tmp_path, add_bos_token=True))
    sentence = CellSentence(0, "c0", SPLIT_GENES, "endothelial cell")
    plain = encode_prompts([sentence], tokenizer, with_answer=True)
    marked = encode_prompts([sentence], with_bos, with_answer=True)
    # the reference: the Hugging Face tokenizer's own default call on the prompt text
    assert marked.input_ids[0] == with_bos.bpe(plain.texts[0])["input_ids"]
    assert marked.input_ids[0] == [0] + plain.input_ids[0]  # <bos> first; the Pythia BPE adds nothing
    assert marked.gene_of_token[0] == [None] + plain.gene_of_token[0]
    assert marked.answer_start[0] == plain.answer_start[0] + 1
    # an answer continues a prompt: it is encoded without a second <bos>
    assert with_bos.encode(" endothelial cell.")[0] == tokenizer.encode(" endothelial cell.")[0]
