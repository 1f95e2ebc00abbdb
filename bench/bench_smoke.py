"""Cost of the smoke profile's inputs: building the random Pythia-410m directory and one forward pass.

1. Build the synthetic atlas (``build_smoke_atlas``, 4 cells per type, written to a scratch file)
   and time it.
2. Build the random Pythia-410m directory into a temporary folder (``smoke_model_dir``, the real
   24 x 1024 shape unless ``--layers``/``--hidden`` shrink it); report build time and disk size.
3. Load it with ``load_c2s_model`` (float32) and time it.
4. Encode one endothelial cell of the atlas as the C2S prompt with its top ``--genes`` genes
   (64, as in the paper's Figure 4: about 300 tokens) and time ``--repeats`` forward passes under
   ``torch.no_grad``; print the median and the fastest.

Usage: python bench/bench_smoke.py [--genes 64] [--repeats 3] [--layers 24] [--hidden 1024] [--keep DIR]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--keep", type=Path, default=None, help="build the model here and keep it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from c2srepro.data.cells import cell_sentences, read_cells
    from c2srepro.models.load import load_c2s_model
    from c2srepro.data.prompts import encode_prompts
    from c2srepro.book.smoke import LABEL_COLUMN, SYMBOL_COLUMN, build_smoke_atlas, smoke_model_dir
    from c2srepro.data.tokenizer import pythia_tokenizer_file

    pythia_tokenizer_file()  # a download on a fresh cache: keep it out of the timed build
    with tempfile.TemporaryDirectory() as scratch:
        # the builds go to a scratch folder, so the figures are builds, not cache hits
        started = time.perf_counter()
        build_smoke_atlas(n_cells_per_type=4, seed=0).write_h5ad(Path(scratch) / "atlas.h5ad")
        atlas_s = time.perf_counter() - started

        target = args.keep or Path(scratch) / "model"
        n_heads = max(1, args.hidden // 64)
        started = time.perf_counter()
        directory = smoke_model_dir(directory=target, n_layers=args.layers, hidden=args.hidden, n_heads=n_heads)
        build_s = time.perf_counter() - started
        disk = _disk_bytes(directory)

        started = time.perf_counter()
        model, tokenizer = load_c2s_model(directory)
        load_s = time.perf_counter() - started

        adata = read_cells(Path(scratch) / "atlas.h5ad", backed=False, label_column=LABEL_COLUMN)
        cell = int((adata.obs[LABEL_COLUMN] == "Endothelial").to_numpy().argmax())
        sentence = cell_sentences(
            adata, top_k=args.genes, symbol_column=SYMBOL_COLUMN, label_column=LABEL_COLUMN, cells=[cell]
        )
        prompt = encode_prompts(sentence, tokenizer)
        input_ids = torch.tensor([prompt.input_ids[0]])
        times = []
        with torch.no_grad():
            for _ in range(args.repeats):
                started = time.perf_counter()
                model(input_ids=input_ids)
                times.append(time.perf_counter() - started)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"smoke atlas: {adata.n_obs} cells x {adata.n_vars} genes, built in {atlas_s:.1f} s")
    print(f"model: {args.layers} layers x {args.hidden} hidden, {n_params / 1e6:.1f} M parameters")
    print(f"build (init + save_pretrained + tokenizer): {build_s:.1f} s; disk {disk / 2**30:.2f} GiB")
    print(f"load_c2s_model: {load_s:.1f} s ({model.dtype})")
    print(
        f"forward, {input_ids.shape[1]} tokens ({args.genes}-gene prompt): median {statistics.median(times):.2f} s, "
        f"fastest {min(times):.2f} s over {args.repeats}"
    )


if __name__ == "__main__":
    main()
