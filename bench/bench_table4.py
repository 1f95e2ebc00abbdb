"""Table 4's enrichment at the paper's scale: the streamed best terms against the full table.

1. Gene lists: ``--layers`` x ``--features`` lists of ``--genes`` genes (the paper's 24 x 8,192
   x 20 by default: 196,608 lists), each drawn without replacement from the union of
   KEGG_2021_Human and GO_Biological_Process_2023 genes with a seeded generator. Such a list
   overlaps about 240 terms, so the full table has about 47 million (list, term) rows.
2. Each way runs in its own child process, so that its peak RSS is its own:
   ``streamed``: ``enrich_best`` on all lists (``--chunk-size`` lists at a time), what Table 4
   calls now; ``per-layer``: ``enrich`` on one layer's lists at a time (the full table, overlap
   genes included) reduced to the best row per (list, library), what Table 4 did before;
   ``one-call`` (only with ``--one-call``; about 15 GB): ``enrich`` on all lists at once, reduced.
3. Per way: wall and CPU seconds from the lists in hand to the best rows (libraries loaded and
   lists drawn before the clock starts) and the child's peak RSS (``ru_maxrss``, lists and
   libraries included). CPU seconds matter when the machine is shared: the load average before
   and after is recorded beside them.
4. Every way must give the same best rows, value for value; the script exits 1 otherwise, or
   when the streamed way misses ``--target-s`` wall seconds or ``--target-gb`` peak RSS.
5. ``--results-dir results/<profile>``: instead, a book's real lists. Chapter 05's feature lists
   and null lists of every layer (its parameters from ``table4.csv.provenance.json``), with the
   library and the corpus background, through ``best_terms`` (streamed) and through ``enrich``'s
   full table ranked the same way; every feature's status, top term, FDR, library, overlap and
   overlap genes must agree, and the Table 4 fractions with them.

Usage: python bench/bench_table4.py [--ways streamed per-layer] [--one-call] [--out PATH]
       python bench/bench_table4.py --results-dir results/default
``--out`` writes the figures as JSON with their provenance (command, packages, library hashes).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from c2srepro.enrichment import enrich, enrich_best, load_library, union_genes
from c2srepro.enrichment.ora import DEFAULT_CHUNK_SIZE

LIBRARIES = ("KEGG_2021_Human", "GO_Biological_Process_2023")
WAYS = ("streamed", "per-layer", "one-call")
TARGET_S = 60.0
TARGET_GB = 4.0


def gene_lists(layers: int, features: int, genes: int, seed: int, libraries) -> dict[tuple[int, int], list[str]]:
    pool = np.array(sorted(union_genes(libraries)), dtype=object)
    rng = np.random.default_rng(seed)
    return {
        (layer, feature): pool[rng.choice(len(pool), size=genes, replace=False)].tolist()
        for layer in range(layers)
        for feature in range(features)
    }


def best_of(full: pd.DataFrame, libraries) -> pd.DataFrame:
    """``enrich``'s table ranked as Table 4 ranks it, first row per (list, library), in ``enrich``'s order."""
    ranked = full.assign(_lib=full["Gene_set"].map({lib.name: i for i, lib in enumerate(libraries)}))
    ranked = ranked.sort_values(
        ["Adjusted P-value", "Combined Score", "Term"], ascending=[True, False, True], kind="stable"
    )
    best = ranked.groupby(["query", "_lib"], sort=False).head(1)
    order = {name: i for i, name in enumerate(dict.fromkeys(full["query"]))}
    best = best.assign(_q=best["query"].map(order)).sort_values(["_q", "_lib"], kind="stable")
    return best.drop(columns=["_q", "_lib"]).reset_index(drop=True)


def child(args: argparse.Namespace) -> dict:
    libraries = [load_library(name) for name in LIBRARIES]
    lists = gene_lists(args.layers, args.features, args.genes, args.seed, libraries)
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    if args.way == "streamed":
        best = enrich_best(lists, libraries, chunk_size=args.chunk_size)
    elif args.way == "per-layer":
        frames = []
        for layer in range(args.layers):
            part = {key: genes for key, genes in lists.items() if key[0] == layer}
            frames.append(best_of(enrich(part, libraries), libraries))
        best = pd.concat(frames, ignore_index=True)
    else:
        best = best_of(enrich(lists, libraries), libraries)
    figures = {
        "way": args.way,
        "wall_s": round(time.perf_counter() - wall, 2),
        "cpu_s": round(time.process_time() - cpu, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "best_rows": len(best),
    }
    best.to_pickle(args.result)
    return figures


def check_results(results_dir: Path) -> bool:
    """Step 5: a book's Table 4 lists, streamed against the full table."""
    from c2srepro.book.stages import feature_stats
    from c2srepro.features.table4 import _background, _libraries, best_terms, null_gene_lists

    params = json.loads((results_dir / "table4.csv.provenance.json").read_text())["params"]
    libraries = _libraries(params["libraries"])
    stats = feature_stats(str(results_dir))
    same, checked = True, 0
    for layer, layer_stats in sorted(stats.items()):
        lists = layer_stats.ranked_genes(layer_stats.live_features(params["live_threshold"]), top_n=params["top_genes"],
                                         min_occurrences=params["min_occurrences"])
        drawn = [lists] + [null_gene_lists(layer_stats, lists, kind=kind, seed=params["seed"],
                                           min_occurrences=params["min_occurrences"]) for kind in ("random", "permutation")]
        for background in ("library", "corpus"):
            bg = _background(layer_stats, background, params["min_occurrences"])
            for gene_lists in drawn:
                streamed = best_terms(gene_lists, libraries, background=bg, fdr=params["fdr"])
                queries = {k: v for k, v in gene_lists.items() if v}
                full = enrich(queries, libraries, background=bg).sort_values(
                    ["query", "Adjusted P-value", "Combined Score", "Gene_set", "Term"],
                    ascending=[True, True, False, True, True], kind="stable")
                top = full.groupby("query", sort=False).head(1).set_index("query")
                mine = streamed.loc[top.index]
                agree = (mine["top_term"].tolist() == top["Term"].tolist()
                         and mine["top_fdr"].tolist() == top["Adjusted P-value"].astype(float).tolist()
                         and mine["library"].tolist() == top["Gene_set"].tolist()
                         and mine["overlap"].tolist() == top["Overlap"].tolist()
                         and mine["overlap_genes"].tolist() == top["Genes"].tolist()
                         and set(streamed.index[streamed["interpretable"]])
                         == set(top.index[top["Adjusted P-value"].to_numpy() < params["fdr"]])
                         and (streamed.drop(index=top.index)["status"].isin(["no terms", "no genes"])).all())
                same &= agree
                checked += len(gene_lists)
        print(f"layer {layer}: {len(lists)} live features, x3 lists x2 backgrounds: "
              + ("identical" if same else "DIFFERENT"), flush=True)
    print(f"{checked} lists of {results_dir}: streamed and full-table best terms "
          + ("identical" if same else "DIFFER"))
    return same


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--features", type=int, default=8192)
    parser.add_argument("--genes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--ways", nargs="+", default=["streamed", "per-layer"], choices=WAYS[:2])
    parser.add_argument("--one-call", action="store_true", help="also the one-call way (about 15 GB at full size)")
    parser.add_argument("--target-s", type=float, default=TARGET_S)
    parser.add_argument("--target-gb", type=float, default=TARGET_GB)
    parser.add_argument("--out", help="also write the figures here, as JSON with their provenance")
    parser.add_argument("--results-dir", type=Path, help="check a book's Table 4 lists instead (step 5)")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.way:
        print(json.dumps(child(args)))
        return 0
    if args.results_dir is not None:
        return 0 if check_results(args.results_dir) else 1

    ways = list(dict.fromkeys(args.ways + (["one-call"] if args.one_call else [])))
    if "streamed" not in ways:
        parser.error("--ways must include streamed (the figure the targets apply to)")
    figures: dict = {
        "lists": args.layers * args.features, "layers": args.layers, "features": args.features,
        "genes_per_list": args.genes, "libraries": list(LIBRARIES), "chunk_size": args.chunk_size,
        "cpu_count": os.cpu_count(), "ways": {},
    }
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in ways:
            result = Path(tmp) / f"{way}.pkl"
            command = [sys.executable, __file__, "--way", way, "--result", str(result)] + [
                f"--{name}={getattr(args, name.replace('-', '_'))}"
                for name in ("layers", "features", "genes", "seed", "chunk-size")
            ]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
            figures["ways"][way] = json.loads(out.stdout.strip().splitlines()[-1])
            tables[way] = pd.read_pickle(result)
            print(f"{way}: {figures['ways'][way]}", flush=True)

    same = True
    for way in ways[1:]:
        try:
            pd.testing.assert_frame_equal(tables[way], tables["streamed"])
        except AssertionError as error:
            same = False
            print(f"{way} and streamed best rows DIFFER: {error}")
    streamed = figures["ways"]["streamed"]
    meets = streamed["wall_s"] <= args.target_s and streamed["peak_rss_mb"] <= args.target_gb * 1024
    figures["same_best_rows"] = same
    figures["target"] = {"wall_s": args.target_s, "peak_rss_gb": args.target_gb, "met": meets}
    print(f"best rows identical across {', '.join(ways)}: {same}")
    print(f"streamed: {streamed['wall_s']} s wall, {streamed['cpu_s']} s CPU, {streamed['peak_rss_mb']} MB peak RSS "
          f"-> {'meets' if meets else 'misses'} the {args.target_s:.0f} s / {args.target_gb:.0f} GB target "
          f"(load average {streamed['load_average_before']} -> {streamed['load_average_after']} "
          f"on {os.cpu_count()} cores)")
    if args.out:
        from c2srepro.book.provenance import write_result

        libraries = [load_library(name) for name in LIBRARIES]
        write_result(
            args.out, figures,
            params={"command": " ".join(sys.argv[1:]), "seed": args.seed},
            inputs={lib.name: f"{lib.version}; sha256:{lib.sha256}" for lib in libraries},
        )
    return 0 if same and meets else 1


if __name__ == "__main__":
    sys.exit(main())
