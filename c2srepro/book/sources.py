"""The profiles' names for their inputs, resolved to what the library takes (a path or an AnnData).

The library never sees these names: ``mini`` (train or reuse the embedded mini-C2S),
``smoke-pythia-410m`` and ``smoke-gemma2-2b`` (random models of Pythia-410m's and of a 2-layer
Gemma-2-2B's shape, ``c2srepro.book.smoke.SMOKE_ARCHITECTURES``) and ``smoke-atlas`` (a synthetic
file shaped like the Heart Cell Atlas v2) are the book's fixtures; any other value passes through as a
Hugging Face id, a local path, or a dataset name the library knows (``pbmc68k_reduced``).
"""

from __future__ import annotations

import os
from pathlib import Path

from c2srepro.book.smoke import SMOKE_ARCHITECTURES, SMOKE_ATLAS, smoke_atlas_path, smoke_model_dir
from c2srepro.data.cells import read_cells

MINI = "mini"


def resolve_model_source(model: str, *, mini_config=None) -> str | Path:
    """Where the model named ``model`` lives: ``mini`` trains (or reuses) the embedded mini-C2S,
    a smoke model's name (``smoke-pythia-410m``, ``smoke-gemma2-2b``) builds (or reuses) that random
    model; any other value is a Hugging Face id or a local directory, returned as is."""
    if model == MINI:
        from c2srepro.models.mini_c2s import train_mini_c2s

        return train_mini_c2s(mini_config)
    if model in SMOKE_ARCHITECTURES:
        return smoke_model_dir(model)
    return model


def resolve_dataset(dataset: str | os.PathLike):
    """``smoke-atlas`` as an AnnData (read backed, as the real atlas is); any other value as is."""
    if str(dataset) == SMOKE_ATLAS:
        return read_cells(smoke_atlas_path(), backed=True)
    return dataset
