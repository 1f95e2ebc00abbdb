"""The sparsity frontier of the transcoder variants: L0 against fraction of loss recovered and FVU.

1. Read a profile's model and prompts as the book does (``results/<profile>/`` of chapter 1),
   harvest the training prompts' MLP activations into the same cache chapter 2 uses.
2. For each variant and sparsity setting (ReLU: the L1 coefficient around chapter 2's value;
   TopK / BatchTopK: k; JumpReLU: the L0 coefficient), train every layer's transcoder with
   chapter 2's other settings (width, lr, batch, tokens, resampling, seed); ``--skip`` adds the
   W_skip path to every variant; ``--variants`` runs some of them only.
3. Evaluate each set on the held-out prompts (``evaluate_replacement``): L0, fraction of loss
   recovered, KL score, FVU, dead and dense fractions (means over layers). Held-out cell-type
   accuracy with every MLP replaced (chapter 3's own check) is left out: it costs a generation
   per held-out cell for each of the many sets.
4. Write ``results/<profile>/frontier.csv`` (one row per variant and setting; ``paper_setting``
   marks ReLU at chapter 2's L1 coefficient, without skip) with its provenance, and the
   tracked copy chapter 3 draws without retraining: ``bench/frontier/<profile>.csv`` (+
   ``.provenance.json``: parameters, commit, package versions, the model and split
   fingerprints) and ``<profile>.png`` (``c2srepro.transcoder.plots.plot_frontier``). Rows of
   the variants run replace those of an earlier run on the same model and split, so
   ``--skip`` and ``--variants`` runs add their curves to one table.

    python bench/bench_frontier.py [--results-dir results/default] [--skip] [--variants relu topk ...]
        [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

PAPER_L1 = 1.12e-3  # chapter 2's default-profile L1 coefficient (the paper's setting, rescaled there)
SETTINGS = {
    "relu": ("l1_coefficient", [PAPER_L1 / 4, PAPER_L1 / 2, PAPER_L1, PAPER_L1 * 2, PAPER_L1 * 4]),
    "topk": ("k", [4, 8, 16, 32]),
    "batchtopk": ("k", [4, 8, 16, 32]),
    "jumprelu": ("l0_coefficient", [3e-5, 1e-4, 3e-4, 1e-3]),
}
CACHE = Path(__file__).parent / "frontier"


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
            row = {
                "variant": activation + ("+skip" if skip else ""), "setting": f"{field}={value:g}",
                "l0": report.mean_l0, "fraction_loss_recovered": report.fraction_loss_recovered,
                "kl_score": report.kl_score, "fvu": report.mean_fvu, "dead_fraction": report.mean_dead_fraction,
                "dense_fraction": report.mean_dense_fraction, "train_seconds": result.seconds,
                "paper_setting": activation == "relu" and value == base.l1_coefficient and not skip,
            }
            print(json.dumps(row), file=sys.stderr, flush=True)  # a long sweep's progress
            rows.append(row)
    return pd.DataFrame(rows)


def merged(new: pd.DataFrame, path: Path, identity: dict) -> pd.DataFrame:
    """``new`` and the rows of other variants in ``path``, when it holds the same model and split."""
    record = path.with_name(path.name + ".provenance.json")
    if not path.is_file() or not record.is_file():
        return new
    earlier = json.loads(record.read_text())["inputs"]
    if any(earlier.get(key) != value for key, value in identity.items()):
        return new
    old = pd.read_csv(path)
    return pd.concat([old[~old["variant"].isin(new["variant"])], new], ignore_index=True)


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="results/default")
    parser.add_argument("--skip", action="store_true", help="train every variant with a W_skip path")
    parser.add_argument("--variants", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per run (chapter 2's)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    from c2srepro._cache import atomic_path, short_hash
    from c2srepro.book.provenance import write_table
    from c2srepro.book.stages import model_stage
    from c2srepro.transcoder import TrainConfig, harvest_activations
    from c2srepro.transcoder.plots import plot_frontier

    results = Path(args.results_dir)
    stage = model_stage(results)
    seed = 0
    harvest_key = short_hash({"model": stage.summary["model_source"], "split": stage.split_parameters, "seed": seed})
    source = harvest_activations(stage.model, stage.prompts("train"), directory=results / "activations" / harvest_key,
                                 seed=seed, progress=False)
    base = TrainConfig(expansion_factor=8, l1_coefficient=PAPER_L1, lr=3e-3, tokens_per_batch=512,
                       training_tokens=args.tokens, seed=seed, resample_every_steps=100)
    settings = {name: SETTINGS[name] for name in args.variants}
    frame = frontier_rows(stage.model, source, stage.prompts("heldout"), base, settings=settings, skip=args.skip)
    profile = stage.summary["provenance"]["params"].get("profile") or results.name
    identity = {"model": stage.fingerprints["model"], "split": stage.fingerprints["split"]}
    params = {"profile": profile, "results_dir": str(results), "train_config": base.to_dict(),
              "settings": {name: [field, values] for name, (field, values) in SETTINGS.items()},
              "command": " ".join(sys.argv[1:]), "commit": commit()}
    for path in (results / "frontier.csv", CACHE / f"{profile}.csv"):
        path.parent.mkdir(parents=True, exist_ok=True)
        table = merged(frame, path, identity)
        write_table(path, table, params=params, inputs=identity)
        fig = plot_frontier(table, title=f"{profile} profile: the sparsity frontier of each variant")
        with atomic_path(path.with_suffix(".png"), suffix=".png") as tmp:
            fig.savefig(tmp, dpi=150)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
