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
