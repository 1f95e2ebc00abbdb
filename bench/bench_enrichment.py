"""Vectorised enrichment engine vs gseapy.enrich's per-query loop, on the same work.

Batch (all lists in one call):

1. Libraries: KEGG_2021_Human and GO_Biological_Process_2023 (pyenrichr) and the
   cellconsensus L2 marker library (top 200 genes per cell type).
2. Gene lists: ``--n-lists`` random lists of 10-50 genes drawn from the libraries' genes, or
   the lists in ``--lists`` (a JSON ``{name: [genes]}`` or a GMT-style file, one list per line).
3. The engine runs on all lists against all libraries (timed; then once more under tracemalloc
   for its peak Python/numpy allocation). gseapy runs on the first ``--sample`` lists against
   the same libraries; its time per list is extrapolated to all lists.

One list per call (as a user enriching lists one at a time calls it):

4. Per library (KEGG_2021_Human, GO_Biological_Process_2023), ``--single`` gene lists, each
   ``enrich({name: genes}, library)`` on its own with the same library object. The first call
   (which prepares the library's matrices) is reported apart; the median wall and CPU time of
   the others is the cost per call, and so is the median with the tail-probability memo
   emptied before every call (the worst case: no (x, m, k) seen before). Lists:
   ``--single-source pbmc`` (default) takes the top 25 genes of real cells (scanpy's
   pbmc68k_reduced, C2S rank order), ``random`` draws 10-50 library genes. gseapy.enrich runs
   on the first ``--single-sample`` lists, one call each (median likewise).
5. Every sample's rows must match gseapy's (same terms; p, FDR within 1e-9 relative; odds ratio
   and combined score to float rounding; same overlap genes); the script exits 1 otherwise.
   Speed-ups are ratios of times (wall, and CPU for one list per call) measured side by side
   in this process.

Usage: python bench/bench_enrichment.py [--n-lists 2000] [--sample 10] [--lists PATH]
       [--single 200] [--single-sample 5] [--single-source pbmc|random] [--skip-batch]
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

import numpy as np
import pandas as pd

from c2srepro.enrichment import (
    compare_enrichment,
    enrich,
    gseapy_enrich_many,
    load_library,
    union_genes,
)
from c2srepro.enrichment import ora
from c2srepro.enrichment.libraries import parse_gmt_text

TARGET_SPEEDUP = 300.0
TARGET_SINGLE_SPEEDUP = 50.0  # on GO_Biological_Process_2023
SINGLE_LIBRARIES = ("KEGG_2021_Human", "GO_Biological_Process_2023")
PBMC_TOP_GENES = 25


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
    parser.add_argument("--single", type=int, default=200, help="lists enriched one call each, per library")
    parser.add_argument("--single-sample", type=int, default=5, help="of those, lists run through gseapy")
    parser.add_argument("--single-source", choices=("pbmc", "random"), default="pbmc")
    parser.add_argument("--skip-batch", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    same = True
    if not args.skip_batch:
        same &= batch(args)
    same &= single(args)
    return 0 if same else 1


def batch(args: argparse.Namespace) -> bool:
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
    return same


def pbmc_lists(n: int) -> dict[str, list[str]]:
    """Top genes of the first ``n`` cells of scanpy's pbmc68k_reduced, in C2S rank order."""
    from c2srepro.data.cells import cell_sentences
    from c2srepro.data.datasets import PBMC, load_dataset

    adata = load_dataset(PBMC)
    sentences = cell_sentences(adata, top_k=PBMC_TOP_GENES, use_raw=True, cells=range(min(n, adata.n_obs)))
    return {s.cell_id: list(s.genes) for s in sentences}


def single(args: argparse.Namespace) -> bool:
    """One ``enrich`` call per list, library object reused, against gseapy one call per list."""
    print("\n-- one list per call (median wall / CPU time per call) --")
    same = True
    rng = random.Random(args.seed)
    real = pbmc_lists(args.single) if args.single_source == "pbmc" else None
    for name in SINGLE_LIBRARIES:
        library = load_library(name)
        if real is not None:
            lists = real
            source = f"top {PBMC_TOP_GENES} genes of {len(real)} pbmc68k_reduced cells"
        else:
            pool = sorted(library.genes)
            lists = {f"list{i}": rng.sample(pool, rng.randint(10, 50)) for i in range(args.single)}
            source = f"{len(lists)} random lists of 10-50 genes of the library"
        items = list(lists.items())
        ora._TAILS.clear()  # warmed by these lists only, not by the batch run before
        first, _ = timed(lambda: enrich(dict(items[:1]), library))
        warm = np.array([timed(lambda: enrich({n: g}, library)) for n, g in items[1:]])
        cold = []
        for n, g in items[1:]:
            ora._TAILS.clear()  # no tail probability seen before, as for the first list of its length
            cold.append(timed(lambda: enrich({n: g}, library)))
        cold = np.array(cold)
        sample = items[: args.single_sample]
        reference, ours, theirs = [], [], []
        for n, g in sample:
            theirs.append(timed(lambda: reference.append(gseapy_enrich_many({n: g}, library))))
            ours.append(enrich({n: g}, library))
        theirs = np.array(theirs)
        cmp = compare_enrichment(pd.concat(ours, ignore_index=True), pd.concat(reference, ignore_index=True))
        ok = cmp.identical(rtol=1e-9) and cmp.n_ours > 0
        same &= ok
        ours_t, cold_t, gseapy_t = np.median(warm, axis=0), np.median(cold, axis=0), np.median(theirs, axis=0)
        print(f"{name}: {source}")
        print(f"  first call (prepares the library): {1e3 * first:.0f} ms wall")
        print(f"  enrich: {1e3 * ours_t[0]:.2f} / {1e3 * ours_t[1]:.2f} ms; with the tail memo emptied before each "
              f"call: {1e3 * cold_t[0]:.2f} / {1e3 * cold_t[1]:.2f} ms")
        print(f"  gseapy.enrich ({len(sample)} lists): {1e3 * gseapy_t[0]:.0f} / {1e3 * gseapy_t[1]:.0f} ms; "
              f"sample check: {cmp.n_ours} rows vs {cmp.n_reference} -> " + ("identical" if ok else "DIFFERENT"))
        speedup, worst = gseapy_t / ours_t, gseapy_t / cold_t
        target = "" if name != "GO_Biological_Process_2023" else (
            f" ({'meets' if speedup.min() >= TARGET_SINGLE_SPEEDUP else 'misses'} the "
            f"{TARGET_SINGLE_SPEEDUP:.0f}x target)"
        )
        print(f"  single-list speed-up: {speedup[0]:.0f}x wall / {speedup[1]:.0f}x CPU{target}; "
              f"memo emptied: {worst[0]:.0f}x / {worst[1]:.0f}x")
    return same


def timed(call) -> tuple[float, float]:
    """Wall and CPU seconds of ``call()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    sys.exit(main())
