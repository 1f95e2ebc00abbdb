"""The sparsity frontier of the transcoder variants: L0 against fraction of loss recovered and FVU.

1. Read a profile's model and prompts as the book does (``results/<profile>/`` of chapter 1),
   harvest the training prompts' MLP activations into the same cache chapter 2 uses.
2. For each variant and sparsity setting (ReLU: the L1 coefficient around chapter 2's value;
   TopK / BatchTopK: k; JumpReLU: the L0 coefficient), train every layer's transcoder with
   chapter 2's other settings (width, lr, batch, tokens, resampling, seed); ``--skip`` adds the
   W_skip path to every variant.
3. Evaluate each set on the held-out prompts (``evaluate_replacement``): L0, fraction of loss
   recovered, KL score, FVU, dead and dense fractions (means over layers).
4. Write ``results/<profile>/frontier.csv`` (one row per variant and setting; ``paper_setting``
   marks ReLU at chapter 2's L1 coefficient) and ``frontier.png`` (L0 against fraction of loss
   recovered and against FVU, one curve per variant).

    python bench/bench_frontier.py [--results-dir results/default] [--skip] [--tokens N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

PAPER_L1 = 1.12e-3  # chapter 2's default-profile L1 coefficient (the paper's setting, rescaled there)
SETTINGS = {
    "relu": ("l1_coefficient", [PAPER_L1 / 4, PAPER_L1 / 2, PAPER_L1, PAPER_L1 * 2]),
    "topk": ("k", [8, 16, 32, 64]),
    "batchtopk": ("k", [8, 16, 32, 64]),
    "jumprelu": ("l0_coefficient", [1e-4, 3e-4, 1e-3, 3e-3]),
}


def frontier_rows(model, train_source, heldout, base, *, settings=SETTINGS, skip=False) -> pd.DataFrame:
    """Steps 2-3: one row per (variant, setting) trained on ``train_source``, judged on ``heldout``."""
    import dataclasses

    from c2srepro.transcoder import evaluate_replacement, train_transcoders

    rows = []
    for activation, (field, values) in settings.items():
        for value in values:
            tcfg = dataclasses.replace(base, activation=activation, skip=skip, **{field: value})
            result = train_transcoders(train_source, tcfg, progress=False)
            report, per_layer = evaluate_replacement(model, result.transcoders, heldout, progress=False)
            rows.append({
                "variant": activation + ("+skip" if skip else ""), "setting": f"{field}={value:g}",
                "l0": report.mean_l0, "fraction_loss_recovered": report.fraction_loss_recovered,
                "kl_score": report.kl_score, "fvu": report.mean_fvu, "dead_fraction": report.mean_dead_fraction,
                "dense_fraction": report.mean_dense_fraction, "train_seconds": result.seconds,
                "paper_setting": activation == "relu" and value == base.l1_coefficient and not skip,
            })
    return pd.DataFrame(rows)


def plot(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("fraction_loss_recovered", "fvu")):
        for variant, group in frame.groupby("variant"):
            group = group.sort_values("l0")
            ax.plot(group["l0"], group[metric], marker="o", label=variant)
        paper = frame[frame["paper_setting"]]
        ax.scatter(paper["l0"], paper[metric], s=160, facecolors="none", edgecolors="black", label="paper's setting")
        ax.set(xscale="log", xlabel="mean L0 (features per token)", ylabel=metric.replace("_", " "))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="results/default")
    parser.add_argument("--skip", action="store_true", help="train every variant with a W_skip path")
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per run (chapter 2's)")
    args = parser.parse_args()

    from c2srepro._cache import atomic_path, short_hash
    from c2srepro.book.stages import model_stage
    from c2srepro.transcoder import TrainConfig, harvest_activations

    results = Path(args.results_dir)
    stage = model_stage(results)
    seed = 0
    harvest_key = short_hash({"model": stage.summary["model_source"], "split": stage.split_parameters, "seed": seed})
    source = harvest_activations(stage.model, stage.prompts("train"), directory=results / "activations" / harvest_key,
                                 seed=seed, progress=False)
    base = TrainConfig(expansion_factor=8, l1_coefficient=PAPER_L1, lr=3e-3, tokens_per_batch=512,
                       training_tokens=args.tokens, seed=seed, resample_every_steps=100)
    frame = frontier_rows(stage.model, source, stage.prompts("heldout"), base, skip=args.skip)
    name = "frontier-skip" if args.skip else "frontier"
    with atomic_path(results / f"{name}.csv", suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    with atomic_path(results / f"{name}.png", suffix=".png") as tmp:
        plot(frame, tmp)
    print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
