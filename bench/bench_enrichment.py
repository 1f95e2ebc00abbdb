"""Vectorised enrichment engine vs gseapy.enrich's per-query loop, on the same work.

1. Libraries: KEGG_2021_Human and GO_Biological_Process_2023 (pyenrichr) and the
   cellconsensus L2 marker library (top 200 genes per cell type).
2. Gene lists: ``--n-lists`` random lists of 10-50 genes drawn from the libraries' genes, or
   the lists in ``--lists`` (a JSON ``{name: [genes]}`` or a GMT-style file, one list per line).
3. The engine runs on all lists against all libraries (timed; then once more under tracemalloc
   for its peak Python/numpy allocation). gseapy runs on the first ``--sample`` lists against
   the same libraries; its time per list is extrapolated to all lists.
4. The sample's rows must match (same terms; p, FDR within 1e-9 relative; odds ratio and
   combined score to float rounding; same overlap genes); the script exits 1 otherwise.

Usage: python bench/bench_enrichment.py [--n-lists 2000] [--sample 10] [--lists PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import sys
import time
import tracemalloc
from pathlib import Path

from c2srepro.enrichment import compare_enrichment, enrich, gseapy_enrich_many, load_library, union_genes
from c2srepro.enrichment.libraries import parse_gmt_text

TARGET_SPEEDUP = 300.0


def read_lists(path: Path) -> dict[str, list[str]]:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {str(k): list(v) for k, v in data.items()}
    return parse_gmt_text(path.read_text(), origin=str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-lists", type=int, default=2000)
    parser.add_argument("--sample", type=int, default=10, help="lists run through gseapy")
    parser.add_argument("--lists", type=Path, default=None, help="JSON {name: genes} or GMT-style file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    start = time.perf_counter()
    libraries = [
        load_library("KEGG_2021_Human"),
        load_library("GO_Biological_Process_2023"),
        load_library("cellconsensus_L2", top_n=200),
    ]
    print(f"libraries loaded in {time.perf_counter() - start:.2f} s: " + ", ".join(repr(lib) for lib in libraries))

    if args.lists is not None:
        lists = read_lists(args.lists)
        source = str(args.lists)
    else:
        rng = random.Random(args.seed)
        pool = sorted(union_genes(libraries))
        lists = {f"list{i}": rng.sample(pool, rng.randint(10, 50)) for i in range(args.n_lists)}
        source = f"random, 10-50 genes from {len(pool)} library genes, seed {args.seed}"
    n_genes = sum(len(v) for v in lists.values())
    print(f"gene lists: {len(lists)} ({n_genes} genes in all; {source})")

    enrich(dict(list(lists.items())[:2]), libraries)  # warm-up: first-call imports and caches
    start = time.perf_counter()
    ours = enrich(lists, libraries)
    engine_s = time.perf_counter() - start
    rss_after_engine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    enrich(lists, libraries)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"engine: {engine_s:.2f} s for {len(lists)} lists x {len(libraries)} libraries -> {len(ours)} rows "
          f"({1e3 * engine_s / len(lists):.2f} ms per list)")
    print(f"engine peak traced allocation: {peak / 2**20:.0f} MiB; process peak RSS so far: {rss_after_engine:.0f} MiB")

    sample = dict(list(lists.items())[: args.sample])
    start = time.perf_counter()
    reference = gseapy_enrich_many(sample, libraries)
    gseapy_s = time.perf_counter() - start
    per_list = gseapy_s / len(sample)
    extrapolated = per_list * len(lists)
    print(f"gseapy.enrich: {gseapy_s:.2f} s for {len(sample)} lists ({per_list:.3f} s per list); "
          f"extrapolated to {len(lists)} lists: {extrapolated:.0f} s")

    cmp = compare_enrichment(ours[ours["query"].isin(list(sample))], reference)
    same = cmp.identical(rtol=1e-9)
    print(f"sample check: {cmp.n_ours} rows vs gseapy {cmp.n_reference}; terms only in one: "
          f"{len(cmp.only_ours) + len(cmp.only_reference)}; max relative difference "
          + ", ".join(f"{k} {v:.1e}" for k, v in cmp.max_rel_diff.items())
          + f"; overlap/genes mismatches {cmp.overlap_mismatches}/{cmp.genes_mismatches} -> "
          + ("identical" if same else "DIFFERENT"))
    speedup = extrapolated / engine_s
    verdict = "meets" if speedup >= TARGET_SPEEDUP else "misses"
    print(f"speed-up: {speedup:.0f}x ({verdict} the {TARGET_SPEEDUP:.0f}x target)")
    print(f"process peak RSS (with gseapy): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
