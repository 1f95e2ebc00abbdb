"""Mini-C2S: held-out accuracy beside the logistic-regression baseline, and training wall time.

Targets (issue 3): held-out accuracy >= 0.70 and >= 0.9 x the baseline (0/1 bag of each cell's
top-K genes, same split); training <= 5 minutes on 2 CPU cores.

    python bench/bench_mini_c2s.py [--epochs N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from c2srepro.models.evaluate import baseline_accuracy, heldout_predictions
from c2srepro.models.mini_c2s import MiniC2SConfig, pbmc_split, train_mini_c2s, training_meta
from c2srepro.models.load import load_c2s_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = MiniC2SConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    cfg = MiniC2SConfig(epochs=args.epochs, seed=args.seed)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        directory = train_mini_c2s(cfg, directory=f"{folder}/mini", force=True)
        wall = time.perf_counter() - started
        model, tokenizer = load_c2s_model(directory)
        split = pbmc_split(cfg)
        predictions = heldout_predictions(model, tokenizer, split)
        accuracy = float((predictions["label"] == predictions["predicted"]).mean())
        baseline = baseline_accuracy(split, seed=cfg.seed)
        meta = training_meta(directory)
    figures = {
        "heldout_accuracy": round(accuracy, 4),
        "baseline_accuracy": round(baseline, 4),
        "ratio_to_baseline": round(accuracy / baseline, 4),
        "train_seconds_loop": round(meta["train_seconds"], 1),
        "train_seconds_wall": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
        "epochs": cfg.epochs,
        "n_heldout": len(predictions),
        "meets_targets": accuracy >= 0.70 and accuracy >= 0.9 * baseline and wall <= 300,
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
