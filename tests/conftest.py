import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


@pytest.fixture(scope="session")
def tokenizer():
    from c2srepro.data.tokenizer import CellTokenizer

    return CellTokenizer.load()


def make_adata(matrix, genes, labels=None, var=None) -> ad.AnnData:
    adata = ad.AnnData(
        X=sp.csr_matrix(np.asarray(matrix, dtype=np.float32)),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(len(matrix))]),
        var=var if var is not None else pd.DataFrame(index=genes),
    )
    if labels is not None:
        adata.obs["cell_type"] = labels
    return adata


def tiny_c2s(tokenizer, cells, labels, *, dtype=None, seed=0):
    """A random 2-layer GPT-NeoX over the vocabulary of ``cells``' prompts and answers, with its CellTokenizer."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from c2srepro.data.cells import CellSentence
    from c2srepro.data.prompts import build_prompt
    from c2srepro.data.tokenizer import CellTokenizer
    from c2srepro.models.mini_c2s import build_vocabulary

    texts = [build_prompt(c, with_answer=True).text for c in cells]
    texts += [build_prompt(CellSentence(0, "x", cells[0].genes, label), with_answer=True).text for label in labels]
    cell_tokenizer = CellTokenizer(tokenizer.bpe, build_vocabulary(texts, tokenizer.bpe))
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=cell_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, rotary_pct=0.25,
                           use_parallel_residual=True, max_position_embeddings=128)
    model = GPTNeoXForCausalLM(config).eval()
    return (model.to(dtype) if dtype is not None else model), cell_tokenizer
