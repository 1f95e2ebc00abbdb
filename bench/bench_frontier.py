"""The sparsity frontier of the transcoder variants: L0 against fraction of loss recovered and FVU.

1. Read a profile's model and prompts as the book does (``results/<profile>/`` of chapter 1),
   harvest the training prompts' MLP activations into the same cache chapter 2 uses.
2. For each variant and sparsity setting (ReLU: the L1 coefficient around chapter 2's value;
   TopK / BatchTopK: k; JumpReLU: its initial threshold, at the default L0 coefficient), train
   every layer's transcoder with chapter 2's other settings (width, lr, batch, resampling, seed)
   for ``--tokens`` tokens (chapter 2's 300,000 by default); ``--skip`` adds the W_skip path to
   every variant; ``--variants`` runs some of them only.
3. Evaluate each set on the held-out prompts (``evaluate_replacement``): L0, fraction of loss
   recovered, KL score, FVU, dead and dense fractions (means over layers), and chapter 3's
   held-out cell-type accuracy with every MLP replaced (``replaced_accuracy``; a generation per
   held-out cell, ``--accuracy-cells`` of them, 0 to leave it out).
4. Write ``results/<profile>/frontier.csv`` (one row per variant and setting; ``paper_setting``
   marks ReLU at chapter 2's L1 coefficient, without skip) with its provenance, and the
   tracked copy chapter 3 draws without retraining: ``bench/frontier/<profile>.csv`` (+
   ``.provenance.json``: parameters with the model's held-out accuracy, package versions, the
   model's weights and split fingerprints and its recipe (``stages.model_recipe``), and per variant the command and commit that measured its rows) and ``<profile>.png`` (``c2srepro.transcoder.plots.plot_frontier``). Rows of
   the variants run replace those of an earlier run on the same model and split, so
   ``--skip`` and ``--variants`` runs add their curves to one table; the table is written after
   every point, and a rerun keeps the points of the same setting and run length (a stopped
   sweep resumes).

    python bench/bench_frontier.py [--results-dir results/default] [--skip] [--variants relu topk ...]
        [--tokens N] [--accuracy-cells N] [--replot]
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
    "relu": ("l1_coefficient", [PAPER_L1 / 4, PAPER_L1 / 2, PAPER_L1, PAPER_L1 * 2]),
    "topk": ("k", [4, 8, 16, 32]),
    # In a run this short, Adam moves log theta by at most ~lr per step whatever the L0
    # coefficient (3e-5 to 1e-4 gave the same L0, 207), so the threshold it starts from is the
    # knob; on the default profile every feature dies from 1e-2 on.
    "jumprelu": ("jumprelu_init_threshold", [3e-3, 5e-3, 7e-3, 1e-2]),
    "batchtopk": ("k", [4, 8, 16, 32]),
}
CACHE = Path(__file__).parent / "frontier"


def frontier_row(stage, train_source, base, activation: str, field: str, value: float, *, skip: bool,
                 accuracy_cells: int | None) -> dict:
    """Steps 2-3 for one (variant, setting): trained on ``train_source``, judged on the held-out prompts."""
    import dataclasses

    from c2srepro.models.evaluate import heldout_accuracy
    from c2srepro.transcoder import evaluate_replacement, replace_mlps, train_transcoders

    tcfg = dataclasses.replace(base, activation=activation, skip=skip, **{field: value})
    result = train_transcoders(train_source, tcfg, progress=False)
    report, _ = evaluate_replacement(stage.model, result.transcoders, stage.prompts("heldout"), progress=False)
    row = {
        "variant": activation + ("+skip" if skip else ""), "setting": f"{field}={value:g}",
        "l0": report.mean_l0, "fraction_loss_recovered": report.fraction_loss_recovered,
        "kl_score": report.kl_score, "fvu": report.mean_fvu, "dead_fraction": report.mean_dead_fraction,
        "dense_fraction": report.mean_dense_fraction, "training_tokens": base.training_tokens,
        "train_seconds": result.seconds,
        "paper_setting": activation == "relu" and value == base.l1_coefficient and not skip,
    }
    if accuracy_cells != 0:
        with replace_mlps(stage.model, result.transcoders):
            row["replaced_accuracy"] = heldout_accuracy(stage.model, stage.tokenizer, stage.split, max_cells=accuracy_cells)
    return row


def earlier_rows(path: Path, identity: dict) -> tuple[pd.DataFrame | None, dict]:
    """The rows in ``path`` and the runs that made them (variant -> command and commit) when its
    provenance records the same model and split, else (None, {})."""
    record = path.with_name(path.name + ".provenance.json")
    if not path.is_file() or not record.is_file():
        return None, {}
    earlier = json.loads(record.read_text())
    if any(earlier["inputs"].get(key) != value for key, value in identity.items()):
        return None, {}
    return pd.read_csv(path), earlier["params"].get("runs", {})


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
        # The tables this script writes are tracked: their own changes do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                f":(exclude){CACHE.name}"], capture_output=True, text=True, check=True,
                               cwd=Path(__file__).parent).stdout.strip()
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", default="results/default")
    parser.add_argument("--skip", action="store_true", help="train every variant with a W_skip path")
    parser.add_argument("--variants", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--tokens", type=int, default=300_000, help="training tokens per run (chapter 2's)")
    parser.add_argument("--accuracy-cells", type=int, default=None,
                        help="held-out cells for the accuracy with every MLP replaced (default all; 0: skip it)")
    parser.add_argument("--replot", action="store_true", help="only redraw the figures from the tables written")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from c2srepro._cache import atomic_path, short_hash
    from c2srepro.book.provenance import write_table
    from c2srepro.book.stages import model_recipe, model_stage
    from c2srepro.transcoder import TrainConfig, harvest_activations
    from c2srepro.transcoder.plots import plot_frontier

    def draw(table: pd.DataFrame, path: Path, profile: str) -> None:
        fig = plot_frontier(table, title=f"{profile} profile: the sparsity frontier of each variant")
        with atomic_path(path.with_suffix(".png"), suffix=".png") as tmp:
            fig.savefig(tmp, dpi=150)
        plt.close(fig)

    results = Path(args.results_dir)
    if args.replot:
        profile = json.loads((results / "model.json").read_text())["provenance"]["params"].get("profile") or results.name
        for path in (results / "frontier.csv", CACHE / f"{profile}.csv"):
            if path.is_file():
                draw(pd.read_csv(path), path, profile)
        return
    stage = model_stage(results)
    seed = 0
    harvest_key = short_hash({"model": stage.summary["model_source"], "split": stage.split_parameters, "seed": seed})
    source = harvest_activations(stage.model, stage.prompts("train"), directory=results / "activations" / harvest_key,
                                 seed=seed, progress=False)
    base = TrainConfig(expansion_factor=8, l1_coefficient=PAPER_L1, lr=3e-3, tokens_per_batch=512,
                       training_tokens=args.tokens, seed=seed, resample_every_steps=100)
    profile = stage.summary["provenance"]["params"].get("profile") or results.name
    identity = {"model": stage.fingerprints["model"], "split": stage.fingerprints["split"]}
    # Recorded beside the weights: the book tells a sibling model (same recipe, another machine) from another one.
    inputs = identity | {"recipe": model_recipe(stage.summary)}
    params = {"profile": profile, "results_dir": str(results), "heldout_accuracy": stage.summary["heldout_accuracy"],
              "train_config": base.to_dict(),
              "settings": {name: [field, values] for name, (field, values) in SETTINGS.items()}}
    this_run = {"command": " ".join(sys.argv[1:]), "commit": commit()}
    paths = (results / "frontier.csv", CACHE / f"{profile}.csv")
    suffix = "+skip" if args.skip else ""
    # Rows of the variants run here replace an earlier run's, except those of the same setting
    # and run length, which are kept (a long sweep that was stopped resumes where it was).
    mine = [name + suffix for name in args.variants]
    table, _ = earlier_rows(paths[0], identity)
    if table is None:
        table = pd.DataFrame()
    else:
        ran = table["variant"].isin(mine)
        wanted = {(name + suffix, f"{field}={value:g}") for name in args.variants for field, values in [SETTINGS[name]]
                  for value in values}
        keep = [r and (v, st) in wanted and t == args.tokens  # this run's own rows; the others are re-read
                for r, v, st, t in zip(ran, table["variant"], table["setting"], table["training_tokens"])]
        table = table[keep].reset_index(drop=True)
    written = table
    for name in args.variants:
        field, values = SETTINGS[name]
        for value in values:
            if len(table) and ((table["variant"] == name + suffix) & (table["setting"] == f"{field}={value:g}")).any():
                continue
            row = frontier_row(stage, source, base, name, field, value, skip=args.skip, accuracy_cells=args.accuracy_cells)
            print(json.dumps(row), file=sys.stderr, flush=True)  # a long sweep's progress
            table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
            for path in paths:  # after every point: a stopped sweep keeps what it measured
                path.parent.mkdir(parents=True, exist_ok=True)
                # Other variants' rows as the file holds them now: sweeps of other variants may
                # run beside this one into the same table.
                others, runs = earlier_rows(path, identity)
                others = None if others is None else others[~others["variant"].isin(mine)]
                written = table if others is None or others.empty else pd.concat([others, table], ignore_index=True)
                # Each variant's rows name the command and commit that measured them.
                present = set(written["variant"])
                runs = {name: run for name, run in runs.items() if name in present}
                runs.update({name: this_run for name in mine if name in present})
                write_table(path, written, params=params | {"runs": dict(sorted(runs.items()))}, inputs=inputs)
                draw(written, path, profile)
    print(written.to_string(index=False))


if __name__ == "__main__":
    main()
